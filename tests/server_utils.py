"""Helpers for the server tests: a tiny checkpoint, a real uvicorn server process, a real redis-server.

    ckpt = tiny_checkpoint(tmp_path_factory)          # built once per test session
    with ServerProcess(ckpt, {"API_KEYS": "k"}) as srv:
        httpx.get(srv.url + "/ready")

Every server runs `python serve_api.py` in a subprocess on a free port, with the environment
scrubbed of our settings so a developer's shell cannot change what the tests see. Its stdout and
stderr go to a file the tests read (to check, for instance, that an API key is never logged).
"""
from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import sysconfig
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, Callable

import httpx

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

STDLIB_FILES = ("textwrap.py", "shlex.py", "bisect.py", "heapq.py", "fnmatch.py", "glob.py",
                "colorsys.py", "string.py", "copy.py", "abc.py")
# Variables serving.Settings reads: never inherited from the developer's shell.
SETTINGS_ENV = ("MODEL_PATH", "MODEL_NAME", "DEVICE", "DTYPE", "MAX_CONCURRENT_SEQUENCES", "MAX_QUEUE",
                "MAX_PROMPT_TOKENS", "REQUEST_TIMEOUT_S", "API_KEYS", "API_KEYS_FILE", "RATE_LIMIT_PER_MINUTE",
                "LOG_LEVEL", "HOST", "PORT", "REDIS_URL", "CACHE_SIZE", "CACHE_TTL_S", "DRAIN_TIMEOUT_S",
                "ENGINE_PROCESS", "CODE_ASSISTANT_FAULT_INJECT", "CODE_ASSISTANT_TEST_STEP_DELAY_MS",
                "HTTP_WORKERS", "CODE_ASSISTANT_ENGINE_SOCKET", "CODE_ASSISTANT_LISTEN_FD", "PROMETHEUS_MULTIPROC_DIR")
BLOCK_SIZE = 256

_lock = threading.Lock()
_ckpt: Path | None = None


def build_checkpoint(directory: Path, block_size: int = BLOCK_SIZE) -> Path:
    """A 2-layer GPT with random weights and a 512-token BPE trained on a few stdlib files."""
    import torch

    from checkpoint import save_model
    from model import GPT, GPTConfig
    from tokenizer import padded_vocab_size, train_bpe

    lib = Path(sysconfig.get_paths()["stdlib"])
    texts = [(lib / n).read_text(encoding="utf-8") for n in STDLIB_FILES if (lib / n).exists()]
    tok = train_bpe(texts, 512)
    tok_dir = directory / "tokenizer"
    tok.save(tok_dir)
    torch.manual_seed(0)
    cfg = GPTConfig(block_size=block_size, vocab_size=padded_vocab_size(tok.n_vocab), n_layer=2, n_head=2,
                    n_embd=64, dropout=0.0)
    model = GPT(cfg)
    out = directory / "model"
    save_model(out, model.state_dict(), {"model_config": cfg.to_dict(), "step": 0}, tok_dir)
    return out


def tiny_checkpoint(tmp_path_factory: Any) -> Path:
    """The session's checkpoint, built on first use (shared by every server test module)."""
    global _ckpt
    with _lock:
        if _ckpt is None:
            _ckpt = build_checkpoint(tmp_path_factory.mktemp("server-ckpt"))
        return _ckpt


def wait_for(cond: Callable[[], Any], timeout: float, interval: float = 0.02) -> bool:
    """Poll cond until it is true or timeout seconds pass; its last answer either way."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if cond():
            return True
        time.sleep(interval)
    return bool(cond())


def wait_http_ok(proc: subprocess.Popen, url: str, timeout: float, logs: Callable[[], str],
                 name: str = "server") -> None:
    """Poll url until it answers 200; RuntimeError (with logs()) if proc exits first, TimeoutError after timeout s."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{name} exited with {proc.returncode}:\n{logs()}")
        try:
            if httpx.get(url, timeout=1.0).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.1)
    raise TimeoutError(f"{name} not ready in {timeout}s:\n{logs()}")


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def clean_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in SETTINGS_ENV}
    env.update({"PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)})
    env.update(extra or {})
    return env


class ServerProcess:
    """`python serve_api.py` on a free port; `start()` returns once /ready answers 200."""

    def __init__(self, ckpt: Path | str, env: dict[str, str] | None = None, ready_timeout: float = 90.0,
                 use_uvicorn_cli: bool = False) -> None:
        self.port = free_port()
        # `uvicorn serve_api:app` (host/port on the command line) or `python serve_api.py` (from the env)
        self.argv = ([sys.executable, "-m", "uvicorn", "serve_api:app", "--host", "127.0.0.1", "--port", str(self.port),
                      "--timeout-keep-alive", "75"]
                     if use_uvicorn_cli else [sys.executable, str(ROOT / "serve_api.py")])
        self.url = f"http://127.0.0.1:{self.port}"
        self.env = clean_env({"MODEL_PATH": str(ckpt), "HOST": "127.0.0.1", "PORT": str(self.port),
                              "MODEL_NAME": "tiny-code", "LOG_LEVEL": "info", **(env or {})})
        self.ready_timeout = ready_timeout
        self._log = tempfile.NamedTemporaryFile(prefix="server-", suffix=".log", delete=False)
        self.proc: subprocess.Popen | None = None

    def start(self, wait_ready: bool = True) -> "ServerProcess":
        self.proc = subprocess.Popen(self.argv, cwd=str(ROOT), env=self.env,
                                     stdout=self._log, stderr=subprocess.STDOUT, start_new_session=True)
        if wait_ready:
            self.wait_ready()
        return self

    def wait_ready(self) -> None:
        wait_http_ok(self.proc, self.url + "/ready", self.ready_timeout, lambda: self.logs()[-4000:])

    def logs(self) -> str:
        return Path(self._log.name).read_text(encoding="utf-8", errors="replace")

    def terminate(self, timeout: float = 30.0) -> int:
        """SIGTERM, then wait; SIGKILL only if it hangs. Returns the exit code."""
        if self.proc is None:
            return 0
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        return self.proc.returncode

    def close(self) -> None:
        self.terminate()
        self._log.close()
        Path(self._log.name).unlink(missing_ok=True)

    def __enter__(self) -> "ServerProcess":
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.close()


VLLM_PYTHON = ROOT / ".venv-vllm" / "bin" / "python"  # scripts/setup_vllm_venv.sh
# serve_vllm.py's own variables: never inherited from the developer's shell
VLLM_SETTINGS_ENV = ("GPU_MEMORY_UTILIZATION", "MAX_MODEL_LEN", "TENSOR_PARALLEL_SIZE", "ENFORCE_EAGER",
                     "KV_CACHE_GIB", "HF_EXPORT_DIR")


class VLLMServer(ServerProcess):
    """`.venv-vllm/bin/python serve_vllm.py` on a free port, vLLM on the CPU with a 1 GiB KV cache."""

    def __init__(self, ckpt: Path, env: dict[str, str] | None = None) -> None:
        super().__init__(ckpt, {"KV_CACHE_GIB": "1", "ENFORCE_EAGER": "1", **(env or {})}, ready_timeout=300)
        for name in VLLM_SETTINGS_ENV:
            if name not in (env or {}) and name not in ("KV_CACHE_GIB", "ENFORCE_EAGER"):
                self.env.pop(name, None)
        self.argv = [str(VLLM_PYTHON), str(ROOT / "serve_vllm.py")]


def redis_server_binary() -> str | None:
    """redis-server on PATH; as root, install it with apt-get when missing (the Makefile's way)."""
    found = shutil.which("redis-server")
    if found or os.geteuid() != 0 or not shutil.which("apt-get"):
        return found
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    for cmd in (["apt-get", "install", "-y", "-q", "redis-server"],
                ["sh", "-c", "apt-get update -q && apt-get install -y -q redis-server"]):
        try:
            subprocess.run(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=300, check=False)
        except (OSError, subprocess.TimeoutExpired):
            continue
        if shutil.which("redis-server"):
            break
    return shutil.which("redis-server")


class RedisProcess:
    """A throwaway redis-server on a free port, no persistence."""

    def __init__(self, binary: str) -> None:
        self.port = free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self._dir = tempfile.mkdtemp(prefix="redis-")
        self.proc = subprocess.Popen([binary, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
                                      "--appendonly", "no", "--dir", self._dir],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.5) as s:
                    s.sendall(b"PING\r\n")
                    if s.recv(16).startswith(b"+PONG"):
                        return
            except OSError:
                time.sleep(0.05)
        self.close()
        raise RuntimeError("redis-server did not start")

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        shutil.rmtree(self._dir, ignore_errors=True)


def metric_value(text: str, name: str, labels: dict[str, str] | None = None) -> float | None:
    """One sample from Prometheus text, by name and (a subset of) labels."""
    for line in text.splitlines():
        if line.startswith("#") or not line.startswith(name):
            continue
        head, _, value = line.rpartition(" ")
        metric, _, label_text = head.partition("{")
        if metric != name:
            continue
        if labels:
            got = dict(kv.split("=", 1) for kv in label_text.rstrip("}").split(",") if "=" in kv)
            if any(got.get(k) != f'"{v}"' for k, v in labels.items()):
                continue
        return float(value)
    return None


def long_running_prompt(ckpt: Path | str, max_tokens: int = 200) -> str:
    """A prompt whose greedy completion runs the full max_tokens (no end-of-text on the way), so
    tests that need a request to stay in flight do not depend on luck with random weights."""
    from checkpoint import load_model
    from engine import Engine, SamplingParams

    model, tok, _ = load_model(ckpt, "cpu")
    engine = Engine(model, max_batch=1, max_queue=4, eos_id=tok.eot_id)
    stops = (tok.eot_id, tok.fim_prefix_id, tok.fim_middle_id, tok.fim_suffix_id)
    for i in range(50):
        prompt = f"def handler_{i}(request, context):\n    "
        out = engine.generate(tok.encode(prompt), SamplingParams(max_tokens=max_tokens, stop_token_ids=stops))
        if len(out) == max_tokens:
            return prompt
    raise RuntimeError("no prompt found whose greedy completion avoids end-of-text")
