"""serve_vllm.py (vLLM's engine) against serve_api.py (ours): the same API, the same greedy tokens.

Both run as real uvicorn servers on one tiny checkpoint (2 layers, 64 wide, head dim 32, the
smallest vLLM's CPU attention takes; seeded random weights, see `ckpt`). serve_vllm.py runs under .venv-vllm's python
(scripts/setup_vllm_venv.sh); this test process stays in .venv and only talks HTTP. Without
.venv-vllm the module is skipped, or fails under `make test` (CODE_ASSISTANT_REQUIRE_TOOLS=1).
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Iterator

import httpx
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
from server_utils import ROOT, VLLM_PYTHON, ServerProcess, VLLMServer, clean_env  # noqa: E402

pytestmark = pytest.mark.slow  # real servers, ~1 min: `make test-fast` skips it

KEY = "sk-test-vllm-3c1e"
AUTH = {"Authorization": f"Bearer {KEY}"}
MODEL = "tiny-code"
PROMPTS = [
    "def fibonacci(n):\n    ",
    "import os\n\n\ndef list_files(root):\n",
    "class Stack:\n    def __init__(self):\n        self.",
    "for i in range(10):\n    print(",
    "    return sorted(items, key=lambda x: x[",
    "# heap queue algorithm\n",
]


def vllm_python() -> Path:
    if VLLM_PYTHON.exists():
        return VLLM_PYTHON
    hint = f"{VLLM_PYTHON} not found: run `bash scripts/setup_vllm_venv.sh`"
    if os.environ.get("CODE_ASSISTANT_REQUIRE_TOOLS") == "1":
        pytest.fail(hint)
    pytest.skip(hint)


@pytest.fixture(scope="module")
def servers(ckpt: Path) -> Iterator[tuple[ServerProcess, ServerProcess]]:
    """(serve_vllm, serve_api), started side by side; the response cache off so every request generates."""
    vllm_python()
    env = {"API_KEYS": KEY, "CACHE_SIZE": "0", "MAX_CONCURRENT_SEQUENCES": "8", "MAX_QUEUE": "16"}
    ours, theirs = VLLMServer(ckpt, env), ServerProcess(ckpt, env)
    try:
        ours.start(wait_ready=False)
        theirs.start()
        ours.wait_ready()
        yield ours, theirs
    finally:
        ours.close()
        theirs.close()


@pytest.fixture(scope="module")
def vllm(servers) -> ServerProcess:
    return servers[0]


@pytest.fixture(scope="module")
def clients(servers) -> Iterator[tuple[httpx.Client, httpx.Client]]:
    with httpx.Client(base_url=servers[0].url, headers=AUTH, timeout=120) as a, \
            httpx.Client(base_url=servers[1].url, headers=AUTH, timeout=120) as b:
        yield a, b


def both(clients, method: str, path: str, **kw) -> tuple[httpx.Response, httpx.Response]:
    return tuple(getattr(c, method)(path, **kw) for c in clients)  # type: ignore[return-value]


# ---- greedy equality ----------------------------------------------------------------------

@pytest.mark.parametrize("prompt", PROMPTS)
def test_greedy_complete_equals_serve_api(clients, prompt: str) -> None:
    got, want = both(clients, "post", "/complete", json={"code": prompt, "max_tokens": 40, "temperature": 0})
    assert got.status_code == want.status_code == 200, (got.text, want.text)
    assert got.json()["completion"] == want.json()["completion"]
    assert got.json()["tokens"] == want.json()["tokens"]


def test_greedy_fim_and_stop_strings_equal_serve_api(clients) -> None:
    bodies = [
        {"model": MODEL, "prompt": "def add(a, b):\n    ", "suffix": "\n\nprint(add(1, 2))\n",
         "max_tokens": 30, "temperature": 0},
        {"model": MODEL, "prompt": PROMPTS[1], "max_tokens": 60, "temperature": 0, "stop": ["\n\n", "return"]},
        {"model": MODEL, "prompt": "x" * 600, "max_tokens": 20, "temperature": 0},  # cut to the context
        {"model": MODEL, "prompt": PROMPTS[0], "max_tokens": 300, "temperature": 0},  # past the context end
    ]
    for body in bodies:
        got, want = both(clients, "post", "/v1/completions", json=body)
        assert got.status_code == want.status_code == 200, (got.text, want.text)
        g, w = got.json(), want.json()
        assert g["choices"][0]["text"] == w["choices"][0]["text"], body
        assert g["choices"][0]["finish_reason"] == w["choices"][0]["finish_reason"], body
        assert g["usage"] == w["usage"], body


def test_seeded_sampling_is_repeatable(clients) -> None:
    body = {"code": PROMPTS[0], "max_tokens": 20, "temperature": 0.8, "top_k": 40, "seed": 7}
    first, second = (clients[0].post("/complete", json=body) for _ in range(2))
    assert first.status_code == second.status_code == 200
    assert first.json()["completion"] == second.json()["completion"]
    assert 1 <= first.json()["tokens"] <= 20


# ---- the OpenAI client and streaming -------------------------------------------------------

def test_openai_client_completions_and_stream(servers) -> None:
    from openai import OpenAI

    ours, theirs = (OpenAI(base_url=s.url + "/v1", api_key=KEY, max_retries=0) for s in servers)
    assert [m.id for m in ours.models.list().data] == [MODEL]
    kw = dict(model=MODEL, prompt=PROMPTS[2], max_tokens=24, temperature=0)
    got, want = ours.completions.create(**kw), theirs.completions.create(**kw)
    assert got.choices[0].text == want.choices[0].text
    assert got.usage.completion_tokens == want.usage.completion_tokens
    fim = ours.completions.create(model=MODEL, prompt="def add(a, b):\n    ", suffix="\n\nprint(add(1, 2))\n",
                                  max_tokens=16, temperature=0)
    assert fim.choices[0].finish_reason in ("stop", "length")
    stream = ours.completions.create(**kw, stream=True, stream_options={"include_usage": True})
    chunks = list(stream)
    text = "".join(c.choices[0].text for c in chunks if c.choices)
    assert text == got.choices[0].text
    assert chunks[-1].usage.completion_tokens == got.usage.completion_tokens


def test_streaming_sse_format(clients) -> None:
    body = {"model": MODEL, "prompt": PROMPTS[3], "max_tokens": 12, "stream": True}
    with clients[0].stream("POST", "/v1/completions", json=body) as r:
        assert r.status_code == 200
        assert r.headers["content-type"].startswith("text/event-stream")
        events = [line[6:] for line in r.iter_lines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    assert all(c["object"] == "text_completion" for c in chunks)
    assert chunks[-1]["choices"][0]["finish_reason"] in ("stop", "length")


# ---- errors, auth, ops ----------------------------------------------------------------------

@pytest.mark.parametrize("method,path,kw", [
    ("post", "/complete", {"json": {"code": 5}}),
    ("post", "/complete", {"json": {"code": "x", "max_tokens": 0}}),
    ("post", "/complete", {"json": {"code": "x", "temperature": -1}}),
    ("post", "/complete", {"content": b"{not json", "headers": {"Content-Type": "application/json"}}),
    ("post", "/v1/completions", {"json": {"model": "gpt-4", "prompt": "x"}}),
    ("post", "/v1/completions", {"json": {"model": MODEL, "prompt": "x", "n": 2}}),
    ("post", "/v1/completions", {"json": {"model": MODEL, "prompt": [1, 2]}}),
    ("post", "/complete", {"json": {"code": "x"}, "headers": {"Authorization": "Bearer wrong"}}),
    ("get", "/v1/models", {"headers": {"Authorization": ""}}),
    ("get", "/nope", {}),
])
def test_errors_match_serve_api(clients, method: str, path: str, kw: dict) -> None:
    got, want = both(clients, method, path, **kw)
    assert 400 <= got.status_code < 500
    assert got.status_code == want.status_code
    g, w = got.json(), want.json()
    assert set(g) == {"error"} and set(g["error"]) == {"message", "type", "param", "code"}
    assert g == w


def test_health_ready_stats_metrics(servers, clients) -> None:
    for path in ("/health", "/ready"):
        got, want = both(clients, "get", path)
        assert got.status_code == 200 and got.json()["status"] == want.json()["status"]
    stats = clients[0].get("/stats").json()
    assert stats["ready"] is True and stats["device"].startswith("cpu (vLLM")
    assert stats["requests_by_status"].get("200", 0) >= 1

    def metric_names(c: httpx.Client) -> set[str]:
        r = c.get("/metrics", headers={"Authorization": ""})
        assert r.status_code == 200
        return {line.split()[2] for line in r.text.splitlines() if line.startswith("# TYPE")}

    ours, theirs = metric_names(clients[0]), metric_names(clients[1])
    assert ours == theirs
    assert "code_completion_time_to_first_token_seconds" in ours
    text = clients[0].get("/metrics").text
    ttft = [ln for ln in text.splitlines() if ln.startswith("code_completion_time_to_first_token_seconds_count")]
    assert ttft and float(ttft[0].split()[-1]) >= 1  # vLLM's per-request stats reach our histograms


def test_bad_vllm_setting_stops_the_start(ckpt: Path) -> None:
    env = clean_env({"MODEL_PATH": str(ckpt), "GPU_MEMORY_UTILIZATION": "1.5"})
    r = subprocess.run([str(vllm_python()), str(ROOT / "serve_vllm.py")], cwd=str(ROOT), env=env,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2
    assert "GPU_MEMORY_UTILIZATION" in r.stderr and "Traceback" not in r.stderr


def test_quantized_checkpoint_is_refused_at_start(ckpt: Path, tmp_path: Path) -> None:
    from checkpoint import load_state, save_model

    state, meta = load_state(ckpt)
    quant = {"mode": "int8-dynamic", "group_size": None, "source": str(ckpt)}
    save_model(tmp_path / "int8", state, {**meta, "quantization": quant}, ckpt)
    env = clean_env({"MODEL_PATH": str(tmp_path / "int8"), "PORT": "0"})
    r = subprocess.run([str(vllm_python()), str(ROOT / "serve_vllm.py")], cwd=str(ROOT), env=env,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 1
    assert "quantized (int8-dynamic)" in r.stderr and str(ckpt) in r.stderr

def _descendants(pid: int) -> set[int]:
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    found, todo = set(), [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.add(child)
            todo.append(child)
    return found


def test_sigterm_exits_0_and_leaves_no_vllm_process(vllm: ServerProcess) -> None:
    # last in this module: it stops the shared server (its fixture's close() is then a no-op)
    engine_pids = _descendants(vllm.proc.pid)
    assert engine_pids, "vLLM should run its engine in child processes"
    assert vllm.terminate(timeout=60) == 0, vllm.logs()[-3000:]

    def alive() -> list[int]:
        out = []
        for pid in engine_pids:
            try:
                if Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z":
                    out.append(pid)
            except OSError:
                pass  # gone
        return out

    deadline = time.monotonic() + 15  # multiprocessing's resource tracker exits just after its parent
    while alive() and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not alive()
