#!/usr/bin/env bash
# Start serve_api.py on MODEL_PATH, complete code through it with curl, then stop it.
set -euo pipefail
PORT=${PORT:-8000}
URL="http://127.0.0.1:${PORT}"
.venv/bin/python serve_api.py > serve_demo.log 2>&1 &
pid=$!
trap 'kill -TERM $pid 2>/dev/null; wait $pid 2>/dev/null || true' EXIT
for _ in $(seq 1 120); do
  curl -fs "$URL/ready" >/dev/null 2>&1 && break
  kill -0 $pid 2>/dev/null || { echo "server exited; see serve_demo.log"; exit 1; }
  sleep 0.5
done
echo "== POST /complete"
curl -s "$URL/complete" -H 'Content-Type: application/json' \
  -d '{"code": "def read_lines(path):", "max_tokens": 40}'
echo
echo "== POST /v1/completions with a suffix (fill in the middle)"
curl -s "$URL/v1/completions" -H 'Content-Type: application/json' \
  -d '{"model": "code-assistant", "prompt": "def add(a, b):", "suffix": "\n\nprint(add(1, 2))\n", "max_tokens": 20, "temperature": 0}'
echo
echo "== GET /stats"
curl -s "$URL/stats"
echo
