# code-assistant completion server (serve_api.py): non-root, read-only-rootfs friendly, no model inside.
#
# The model is mounted, never baked in: a checkpoint dir (model.safetensors + meta.json, or an
# INT8 dir from quantize_model.py) at /models/current, the /models volume mounted read-only.
# /tmp is the only place the server writes (HOME, TMPDIR and the torch caches point there);
# give it an emptyDir (k8s) or --tmpfs /tmp (docker) when the root filesystem is read-only.
#
# CPU image (default): torch==2.13.0 from PyTorch's CPU index, not PyPI's CUDA build (GBs smaller).
#   docker build -t code-assistant:cpu .
# GPU image: the same file with torch's CUDA build: from PyPI (its default on linux x86_64), or
# from PyTorch's index for a CUDA version your driver supports; run with the NVIDIA runtime.
#   docker build -t code-assistant:gpu --build-arg TORCH_INDEX_URL= .
#   docker build -t code-assistant:gpu --build-arg TORCH_INDEX_URL=https://download.pytorch.org/whl/cu128 .
#   (add --build-arg EXTRA_APT_PACKAGES="gcc libc6-dev": Triton compiles with it, see below)
#   docker run --gpus all --read-only --tmpfs /tmp:exec ...   (DEVICE=auto picks CUDA)
#   (exec: torch.compile loads the kernels it builds from /tmp; docker's --tmpfs is noexec)
# Run:
#   docker run --rm -p 8000:8000 --read-only --tmpfs /tmp \
#     -v "$PWD/out-code-assistant-int8-dynamic:/models/current:ro" code-assistant:cpu
# Without a Docker engine, or behind a private index / proxy CA: scripts/build_image.py builds
# with docker or buildah and passes this machine's pip settings (PIP_INDEX_URL,
# PIP_EXTRA_INDEX_URL, PIP_FIND_LINKS, PIP_CERT) as build args. They are declared in the build
# stage only, so the runtime image's history has none of them. Keep credentials out of build
# args anyway: build logs and caches keep them.
ARG BASE_IMAGE=python:3.11-slim

# ---- build: a venv with the pinned requirements ------------------------------------------------
# checkov:skip=CKV_DOCKER_7: the base is a build arg, pinned by its default tag (python:3.11-slim)
FROM ${BASE_IMAGE} AS build

ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
# pip reads these from the environment; unset, they change nothing.
ARG PIP_INDEX_URL
ARG PIP_EXTRA_INDEX_URL
ARG PIP_FIND_LINKS
ARG PIP_CERT
ARG PIP_DEFAULT_TIMEOUT=60
ENV PIP_DISABLE_PIP_VERSION_CHECK=1

# Only the requirements first, so a code change does not reinstall torch. The serving set only:
# no tokenizer training, de-duplication or plotting libraries in the image.
COPY requirements-serve.txt /tmp/requirements-serve.txt
RUN python3 -m venv /opt/venv \
 && /opt/venv/bin/pip install --no-cache-dir \
      ${TORCH_INDEX_URL:+--extra-index-url "$TORCH_INDEX_URL"} -r /tmp/requirements-serve.txt \
 && /opt/venv/bin/python -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda)"

# ---- runtime: only /opt/venv crosses over (no pip settings, mounts or requirements file) -------
FROM ${BASE_IMAGE} AS runtime

# torch.compile on CUDA (the engine's decode step) has Triton build its launcher with a C
# compiler at first use, so a GPU image needs one: --build-arg EXTRA_APT_PACKAGES="gcc libc6-dev".
# The CPU image installs nothing here.
ARG EXTRA_APT_PACKAGES=""
# DL3008 (pin apt versions): the builder names the packages, and may pin them (gcc=4:12.2.0-3).
# hadolint ignore=DL3008
RUN if [ -n "$EXTRA_APT_PACKAGES" ]; then \
      apt-get update \
      && apt-get install -y --no-install-recommends $EXTRA_APT_PACKAGES \
      && rm -rf /var/lib/apt/lists/*; \
    fi

# A fixed UID/GID (10001) that the k8s securityContext names; no login shell, home in /tmp.
RUN groupadd --gid 10001 app \
 && useradd --uid 10001 --gid app --no-log-init --no-create-home --home-dir /tmp \
      --shell /usr/sbin/nologin app

COPY --from=build /opt/venv /opt/venv

WORKDIR /app
# Only what serving imports (serve_api -> serving, engine_process -> checkpoint, model, engine,
# tokenizer, quantization -> decode_kernels). Owned by root: the server cannot change its own code.
COPY serve_api.py serving.py engine.py engine_process.py model.py tokenizer.py checkpoint.py \
     quantization.py decode_kernels.py ./
# Bytecode made now: at run time the tree is read-only and nothing is written beside the code.
RUN /opt/venv/bin/python -m compileall -q /app

ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    HOME=/tmp \
    TMPDIR=/tmp \
    XDG_CACHE_HOME=/tmp/.cache \
    TORCHINDUCTOR_CACHE_DIR=/tmp/torchinductor \
    TRITON_CACHE_DIR=/tmp/triton \
    MPLCONFIGDIR=/tmp/matplotlib \
    MODEL_PATH=/models/current \
    HOST=0.0.0.0 \
    PORT=8000

USER 10001:10001
EXPOSE 8000

# Liveness (/health answers 200 while the model loads; /ready is the readiness probe).
# urllib raises on any non-2xx answer, so the exit code is the verdict; no curl in the image.
HEALTHCHECK --interval=30s --timeout=5s --start-period=30s --retries=3 \
  CMD ["python", "-c", "import os, urllib.request as r; r.urlopen('http://127.0.0.1:%s/health' % os.environ.get('PORT', '8000'), timeout=4)"]

# serve_api.py drains on SIGTERM: /ready turns 503, in-flight requests finish (DRAIN_TIMEOUT_S,
# default 30 s; give k8s a terminationGracePeriodSeconds above it), then it exits.
STOPSIGNAL SIGTERM
CMD ["python", "serve_api.py"]

# Last, so a new revision does not invalidate the layers above.
ARG BASE_IMAGE
ARG VERSION=dev
ARG REVISION=unknown
ARG CREATED=unknown
LABEL org.opencontainers.image.title="code-assistant" \
      org.opencontainers.image.description="Self-hosted code-completion server (FastAPI + our own inference engine); mount a model at /models/current" \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.revision="${REVISION}" \
      org.opencontainers.image.created="${CREATED}" \
      org.opencontainers.image.base.name="${BASE_IMAGE}"
