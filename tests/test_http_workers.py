"""HTTP_WORKERS > 1: several HTTP processes in front of one engine process (serve_api.Supervisor).

Real processes throughout: `python serve_api.py` with HTTP_WORKERS=2 on the tiny checkpoint.
Checked here: answers come from both workers and equal a single server's greedy output; one
engine process only; /metrics from any worker counts every worker's requests; the admission
bound still answers 429 (split per worker); a SIGKILLed worker leaves the engine serving the
other (and is restarted), and a stopped one cannot stall the other; SIGTERM drains every worker and exits 0 with no process left behind,
and a killed supervisor leaves none either; bad HTTP_WORKERS values stop the start (exit 2).
"""
from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
from server_utils import ROOT, ServerProcess, clean_env, metric_value, wait_for  # noqa: E402

STEP_DELAY_MS = "20"
PROMPTS = ["def add(a, b):\n    ", "class Stack:\n    def push(self, item):\n", "import os\n\n\ndef main():\n"]


def private_dir(worker_pid: int) -> Path:
    """The supervisor's private directory, from a worker's environment (the engine socket is in it)."""
    environ = Path(f"/proc/{worker_pid}/environ").read_bytes().split(b"\0")
    sock = next(v for v in environ if v.startswith(b"CODE_ASSISTANT_ENGINE_SOCKET=")).split(b"=", 1)[1]
    return Path(sock.decode()).parent


def alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"  # a zombie has exited
    except (FileNotFoundError, ProcessLookupError):  # gone, or going while we read
        return False


def children(pid: int) -> dict[int, str]:
    """Live child processes of pid: {pid: command line}."""
    out = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            cmd = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except (FileNotFoundError, ProcessLookupError):
            continue
        if int(stat[1]) == pid and stat[0] != "Z":
            out[int(entry.name)] = cmd
    return out


def engines(srv: ServerProcess) -> list[int]:
    return [p for p, cmd in children(srv.proc.pid).items() if "engine_process.py" in cmd]


def workers(srv: ServerProcess) -> list[int]:
    return [p for p, cmd in children(srv.proc.pid).items() if "serve_api.py" in cmd]


def complete(url: str, prompt: str, max_tokens: int = 12) -> httpx.Response:
    with httpx.Client(timeout=60) as c:  # a new connection each time: any worker may take it
        return c.post(url + "/complete", json={"code": prompt, "max_tokens": max_tokens, "temperature": 0})


def in_parallel(fn, args: list) -> list:
    results: list = [None] * len(args)

    def one(i: int) -> None:
        results[i] = fn(*args[i])

    threads = [threading.Thread(target=one, args=(i,)) for i in range(len(args))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    return results


def stats_by_worker(url: str, tries: int = 40) -> dict[int, dict]:
    """/stats of every worker that answers within `tries` new connections."""
    seen: dict[int, dict] = {}
    for _ in range(tries):
        s = httpx.get(url + "/stats", timeout=10).json()
        seen[s["worker_pid"]] = s
    return seen


@pytest.fixture(scope="module")
def two(ckpt: Path):
    """HTTP_WORKERS=2: 2 sequences + 6 waiting in all (4 admitted per worker), 20 ms per engine step."""
    env = {"HTTP_WORKERS": "2", "MAX_CONCURRENT_SEQUENCES": "2", "MAX_QUEUE": "6", "CACHE_SIZE": "0",
           "CODE_ASSISTANT_TEST_STEP_DELAY_MS": STEP_DELAY_MS}
    with ServerProcess(ckpt, env) as srv:
        assert wait_for(lambda: len(workers(srv)) == 2, 10.0)
        yield srv


def test_one_engine_both_workers_and_greedy_output_equals_one_worker(two: ServerProcess, ckpt: Path) -> None:
    assert len(engines(two)) == 1 and len(workers(two)) == 2, children(two.proc.pid)
    with ServerProcess(ckpt, {"CACHE_SIZE": "0"}) as one:
        expected = [complete(one.url, p).json()["completion"] for p in PROMPTS]
    sent = 0
    for _ in range(8):  # the kernel hands connections to whichever worker accepts first: ask until both did
        results = in_parallel(complete, [(two.url, p) for p in PROMPTS])  # 3 at once: under any worker's 4
        sent += len(results)
        assert [r.status_code for r in results] == [200] * len(results)
        assert [r.json()["completion"] for r in results] == expected
        by_pid = stats_by_worker(two.url)
        if len(by_pid) == 2 and all(s["requests"] > 0 for s in by_pid.values()):
            break
    assert sorted(by_pid) == sorted(workers(two)), by_pid
    assert all(s["requests"] > 0 and s["http_workers"] == 2 for s in by_pid.values()), by_pid
    assert sum(s["requests"] for s in by_pid.values()) == sent
    # the engine's numbers are the one engine's, whichever worker answers
    assert {(s["running"], s["waiting"], s["device"]) for s in by_pid.values()} == {(0, 0, "cpu")}
    # and so are its cumulative counts (idle now): every request's prompt went through a prefill
    engine_counts = {tuple(sorted(s["engine"].items())) for s in by_pid.values()}
    assert len(engine_counts) == 1 and dict(*engine_counts)["prefill_rows"] >= sent, engine_counts
    prefill_rows = dict(*engine_counts)["prefill_rows"]
    # /metrics on any worker counts every worker's requests
    for _ in range(6):
        text = httpx.get(two.url + "/metrics", timeout=10).text
        assert metric_value(text, "code_completion_requests_total", {"endpoint": "/complete", "status": "200"}) == sent
        assert metric_value(text, "code_completion_active_requests") == 0.0
        assert metric_value(text, "model_loaded") == 1.0 and metric_value(text, "code_completion_ready") == 1.0
        assert metric_value(text, "code_completion_max_in_flight_requests") == 8.0  # 2 + 6, split 4 / 4
        assert metric_value(text, "code_completion_engine_prefill_rows_total") == prefill_rows  # not summed


def test_every_single_process_metric_name_is_exported(two: ServerProcess) -> None:
    from prometheus_client import generate_latest
    from prometheus_client.parser import text_string_to_metric_families

    from serving import Metrics

    # *_created (each series' creation time) exists in single-process mode only: no rule or panel reads it
    single = {f.name for f in text_string_to_metric_families(generate_latest(Metrics().registry).decode())
              if not f.name.endswith("_created")}
    text = httpx.get(two.url + "/metrics", timeout=10).text
    multi = {f.name for f in text_string_to_metric_families(text) if f.samples}
    assert single <= multi, single - multi


def test_overflow_still_gets_429(two: ServerProcess, long_prompt: str) -> None:
    n = 16
    barrier = threading.Barrier(n)

    def one(i: int) -> int:
        with httpx.Client(timeout=30) as c:
            barrier.wait()
            return c.post(two.url + "/complete",
                          json={"code": long_prompt + f"# {i}\n", "max_tokens": 20, "temperature": 0}).status_code

    statuses = sorted(in_parallel(one, [(i,) for i in range(n)]))
    # 8 admitted in all (4 per worker) however the connections spread
    assert set(statuses) <= {200, 429} and 200 in statuses and statuses.count(429) >= n - 8, statuses
    text = httpx.get(two.url + "/metrics", timeout=10).text
    assert (metric_value(text, "code_completion_rejections_total", {"reason": "server_overloaded"}) or 0) >= n - 8


def test_killed_worker_leaves_the_engine_serving(two: ServerProcess) -> None:
    engine, victim = engines(two)[0], workers(two)[0]
    before = metric_value(httpx.get(two.url + "/metrics", timeout=10).text, "code_completion_requests_total",
                          {"endpoint": "/complete", "status": "200"})
    os.kill(victim, signal.SIGKILL)
    assert wait_for(lambda: not alive(victim), 5.0)
    results = in_parallel(complete, [(two.url, p) for p in PROMPTS])
    assert [r.status_code for r in results] == [200] * len(results)
    assert engines(two) == [engine] and alive(engine)
    assert wait_for(lambda: len(workers(two)) == 2, 15.0), "the supervisor did not restart the worker"
    # the dead worker's counts stay in the totals
    text = httpx.get(two.url + "/metrics", timeout=10).text
    after = metric_value(text, "code_completion_requests_total", {"endpoint": "/complete", "status": "200"})
    assert after == before + len(results)
    assert "worker exited" in two.logs() and "HTTP worker disconnected" in two.logs()


@pytest.mark.slow
def test_a_stopped_worker_cannot_stall_the_other(ckpt: Path) -> None:
    """SIGSTOP one worker while the other serves a steady load. The engine keeps sending it
    stats; once its socket buffer is full the engine must not block on it (every request would
    stall), but hold its messages and, after ENGINE_UNREAD_TIMEOUT_S, disconnect it. Woken
    again, it finds its engine connection gone and stops; the supervisor starts a fresh one."""
    env = {"HTTP_WORKERS": "2", "MAX_CONCURRENT_SEQUENCES": "8", "MAX_QUEUE": "16", "CACHE_SIZE": "0",
           "ENGINE_UNREAD_TIMEOUT_S": "2"}
    with ServerProcess(ckpt, env) as srv:
        assert wait_for(lambda: len(workers(srv)) == 2, 10.0)
        frozen = workers(srv)[0]
        os.kill(frozen, signal.SIGSTOP)  # it accepts nothing now: every new connection goes to the other
        answered: list[float] = []
        failed: list[str] = []
        deadline = time.monotonic() + 40

        def load() -> None:
            with httpx.Client(timeout=5) as c:
                while time.monotonic() < deadline and "HTTP worker stopped reading" not in srv.logs():
                    try:
                        r = c.post(srv.url + "/complete", json={"code": PROMPTS[0], "max_tokens": 16, "temperature": 0})
                        (answered.append(time.monotonic()) if r.status_code == 200 else failed.append(str(r.status_code)))
                    except httpx.HTTPError as e:
                        failed.append(type(e).__name__)

        try:
            in_parallel(load, [()] * 6)
            # the other worker answered throughout: no request failed, no long pause (with the
            # engine blocked on the stopped worker's socket these become 429s and timeouts)
            assert not failed, failed[:5]
            gaps = [b - a for a, b in zip(answered, answered[1:])]
            assert answered and max(gaps, default=0) < 4.0, max(gaps)
            assert "HTTP worker stopped reading: disconnected" in srv.logs(), "its socket buffer never filled"
        finally:
            os.kill(frozen, signal.SIGCONT)
        assert wait_for(lambda: not alive(frozen), 20.0), "the dropped worker did not stop"
        assert wait_for(lambda: len(workers(srv)) == 2, 15.0), "the supervisor did not start a new worker"
        results = in_parallel(complete, [(srv.url, p) for p in PROMPTS])
        assert [r.status_code for r in results] == [200] * len(results)


@pytest.mark.slow
def test_sigterm_drains_every_worker_and_exits_0_with_no_orphans(ckpt: Path, long_prompt: str) -> None:
    env = {"HTTP_WORKERS": "2", "MAX_CONCURRENT_SEQUENCES": "8", "MAX_QUEUE": "8", "DRAIN_TIMEOUT_S": "30",
           "CACHE_SIZE": "0", "CODE_ASSISTANT_TEST_STEP_DELAY_MS": STEP_DELAY_MS}
    srv = ServerProcess(ckpt, env).start()
    try:
        assert wait_for(lambda: len(workers(srv)) == 2, 10.0)
        procs = [srv.proc.pid, *engines(srv), *workers(srv)]
        private = private_dir(procs[-1])
        assert private.stat().st_mode & 0o777 == 0o700
        results: list = []
        t = threading.Thread(target=lambda: results.extend(in_parallel(
            lambda: complete(srv.url, long_prompt, 60), [()] * 6)))
        t.start()
        running = lambda: metric_value(httpx.get(srv.url + "/metrics").text,  # noqa: E731
                                       "code_completion_requests_running") or 0
        assert wait_for(lambda: running() == 6, 15.0)
        srv.proc.send_signal(signal.SIGTERM)
        time.sleep(0.3)  # both workers have the signal: any connection now meets a draining one
        ready = [httpx.get(srv.url + "/ready").status_code for _ in range(3)]
        t.join(60)
        assert ready == [503, 503, 503]
        assert [r.status_code for r in results] == [200] * 6
        assert all(r.json()["tokens"] == 60 for r in results)
        assert srv.proc.wait(30) == 0
        assert srv.logs().count("SIGTERM: draining") == 2
        assert wait_for(lambda: not any(alive(p) for p in procs), 5.0), [p for p in procs if alive(p)]
        assert not private.exists()  # the engine socket and the metrics files went with it
    finally:
        srv.close()


@pytest.mark.slow
def test_killed_supervisor_leaves_no_process_behind(ckpt: Path) -> None:
    srv = ServerProcess(ckpt, {"HTTP_WORKERS": "2"}).start()
    try:
        assert wait_for(lambda: len(workers(srv)) == 2, 10.0)
        procs = [*engines(srv), *workers(srv)]
        private = private_dir(procs[-1])
        srv.proc.kill()  # no shutdown at all: the engine sees its control socket close, the workers the engine
        srv.proc.wait(10)
        assert wait_for(lambda: not any(alive(p) for p in procs), 20.0), [p for p in procs if alive(p)]
    finally:
        srv.close()
    shutil.rmtree(private)  # a killed supervisor cannot remove its private directory: the test does


@pytest.mark.parametrize("env", [{"HTTP_WORKERS": "0"}, {"HTTP_WORKERS": "65"}, {"HTTP_WORKERS": "two"},
                                 {"HTTP_WORKERS": "2", "ENGINE_PROCESS": "0"}])
def test_bad_http_workers_exits_2_naming_it(env: dict[str, str]) -> None:
    proc = subprocess.run([sys.executable, str(ROOT / "serve_api.py")], cwd=str(ROOT), env=clean_env(env),
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2, proc.stderr
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and "HTTP_WORKERS" in lines[0] and "Traceback" not in proc.stderr, proc.stderr


def test_http_workers_under_the_uvicorn_cli_exits_2() -> None:
    proc = subprocess.run([sys.executable, "-m", "uvicorn", "serve_api:app"], cwd=str(ROOT),
                          env=clean_env({"HTTP_WORKERS": "2"}), capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and "HTTP_WORKERS" in proc.stderr and "python serve_api.py" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_engine_that_cannot_load_exits_1_with_the_reason(tmp_path: Path) -> None:
    srv = ServerProcess(tmp_path / "no-such-model", {"HTTP_WORKERS": "2"}).start(wait_ready=False)
    try:
        assert srv.proc.wait(60) == 1
        assert "cannot load the model" in srv.logs() and "Traceback" not in srv.logs()
        assert "HTTP worker started" not in srv.logs()  # no worker starts without an engine
    finally:
        srv.close()
