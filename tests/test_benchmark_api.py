"""benchmark_api.py against a real `python serve_api.py` subprocess on a loopback port.

The server loads tests/server_utils.py's tiny random-weight checkpoint (a real 512-token BPE,
2 layers), so each completion of a few tokens takes milliseconds. The
CLI runs as a subprocess, exactly as a person would run it, and run_sweep in-process.
"""
from __future__ import annotations

import json
import math
import subprocess
import sys
import sysconfig
import time
from pathlib import Path
from typing import Iterator

import pytest

ROOT = Path(__file__).resolve().parents[1]
for p in (ROOT, ROOT / "tests"):
    if str(p) not in sys.path:
        sys.path.insert(0, str(p))

import benchmark_api  # noqa: E402

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
LEVEL_FIELDS = ("clients", "requests", "req_per_s", "tokens_per_s", "p50_ms", "p95_ms", "p99_ms",
                "ttft_p50_ms", "tpot_p50_ms", "errors", "error_codes")
MAX_TOKENS = 6


@pytest.fixture(scope="module")
def server_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    # the colleague's helpers: the shared tiny checkpoint and a real `python serve_api.py`
    from server_utils import ServerProcess, tiny_checkpoint

    ckpt = tiny_checkpoint(tmp_path_factory)
    # CACHE_SIZE=0: every request reaches the engine, so latencies are the model's
    with ServerProcess(ckpt, {"DEVICE": "cpu", "MAX_CONCURRENT_SEQUENCES": "4", "MAX_QUEUE": "64",
                              "CACHE_SIZE": "0", "LOG_LEVEL": "warning"}) as srv:
        yield srv.url


@pytest.fixture(scope="module")
def val_files(tmp_path_factory: pytest.TempPathFactory) -> Path:
    # collect_code.py's layout: a JSON list of absolute paths of held-out source files
    lib = Path(sysconfig.get_paths()["stdlib"])
    files = [str(lib / n) for n in ("glob.py", "linecache.py", "stat.py") if (lib / n).exists()]
    path = tmp_path_factory.mktemp("val") / "val_files.json"
    path.write_text(json.dumps(files))
    return path


def run_cli(*args: str, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "benchmark_api.py", "--no-progress", *args], cwd=ROOT,
                          capture_output=True, text=True, timeout=timeout)


def check_level(row: dict, stream: bool) -> None:
    for key in LEVEL_FIELDS:
        assert key in row, key
    assert row["errors"] == 0, row["error_codes"]
    assert row["error_codes"] == {}
    assert row["req_per_s"] > 0 and row["tokens_per_s"] > 0
    assert row["p50_ms"] <= row["p95_ms"] <= row["p99_ms"]
    assert row["cache_hits"] == 0  # the server's cache is off: every answer ran the model
    # from the engine's counters in /stats: it decoded, a row or more per step
    assert row["engine_steps_per_s"] > 0 and row["engine_mean_batch"] >= 1
    assert row["engine_prefills_per_s"] > 0 and row["engine_mean_prefill_rows"] >= 1
    if stream:
        # >= 0, not > 0: where the clock ticks every 4 ms (our CI VMs) a first token that comes
        # within a tick reads as 0
        assert row["ttft_p50_ms"] is not None and 0 <= row["ttft_p50_ms"] <= row["p50_ms"]
        assert row["tpot_p50_ms"] is not None and row["tpot_p50_ms"] >= 0
    else:
        # no first token is visible in a non-streamed answer: null, not a guess
        assert row["ttft_p50_ms"] is None and row["tpot_p50_ms"] is None


def check_output(out: Path, mode: str, stream: bool, levels: list[int]) -> dict:
    data = json.loads(out.read_text())
    for key in ("url", "date", "command", "device", "mode", "results"):
        assert key in data, key
    assert data["mode"] == mode
    assert [r["clients"] for r in data["results"]] == levels
    for row in data["results"]:
        check_level(row, stream)
    png = out.with_suffix(".png")
    assert png.read_bytes()[:8] == PNG_MAGIC
    return data


# ---- prompts (no server) -----------------------------------------------------------------
def test_prompts_cut_from_held_out_files(val_files: Path) -> None:
    a, desc = benchmark_api.load_prompts(val_files, n=20, target_tokens=64, seed=3)
    b, _ = benchmark_api.load_prompts(val_files, n=20, target_tokens=64, seed=3)
    c, _ = benchmark_api.load_prompts(val_files, n=20, target_tokens=64, seed=4)
    assert a == b and a != c  # seeded
    assert len(a) == 20 and str(val_files) in desc
    sources = "".join(Path(p).read_text() for p in json.loads(val_files.read_text()))
    for p in a:
        assert p in sources  # a verbatim window of real code
        assert p.endswith("\n") or sources.endswith(p)  # cut at a line boundary
        assert len(p) <= 64 * benchmark_api.CHARS_PER_TOKEN + 200
    builtin, desc = benchmark_api.load_prompts(None)
    assert builtin and "builtin" in desc


def test_percentile_matches_linear_interpolation() -> None:
    xs = [5.0, 1.0, 3.0, 2.0, 4.0]
    assert benchmark_api.percentile(xs, 50) == 3.0
    assert benchmark_api.percentile(xs, 95) == pytest.approx(4.8)
    assert benchmark_api.percentile([], 50) is None


# ---- against the real server -------------------------------------------------------------
def test_cli_sequential_complete(server_url: str, val_files: Path, tmp_path: Path) -> None:
    out = tmp_path / "seq.json"
    r = run_cli("--url", server_url, "--mode", "sequential", "--requests", "4",
                "--max-tokens", str(MAX_TOKENS), "--prompts-from", str(val_files),
                "--prompt-tokens", "48", "--out", str(out))
    assert r.returncode == 0, r.stderr
    data = check_output(out, "sequential", False, [1])
    assert data["results"][0]["ok"] == 4
    assert data["results"][0]["output_tokens"] > 0


def test_cli_concurrent_stream(server_url: str, tmp_path: Path) -> None:
    out = tmp_path / "conc.json"
    r = run_cli("--url", server_url, "--mode", "concurrent", "--clients", "4", "--stream",
                "--requests", "8", "--max-tokens", str(MAX_TOKENS), "--out", str(out))
    assert r.returncode == 0, r.stderr
    assert "built-in" in r.stderr  # no --prompts-from: it says so
    data = check_output(out, "concurrent", True, [4])
    assert data["endpoint"] == "v1" and data["stream"] is True
    assert data["prompts"].startswith("builtin")


@pytest.mark.parametrize("stream", [False, True])
def test_cli_sweep(server_url: str, val_files: Path, tmp_path: Path, stream: bool) -> None:
    out = tmp_path / "sweep.json"
    extra = ["--stream"] if stream else ["--endpoint", "v1"]
    r = run_cli("--url", server_url, "--mode", "sweep", "--clients-list", "1,4", *extra,
                "--requests", "6", "--max-tokens", str(MAX_TOKENS), "--prompts-from",
                str(val_files), "--prompt-tokens", "32", "--out", str(out))
    assert r.returncode == 0, r.stderr
    data = check_output(out, "sweep", stream, [1, 4])
    # the next step of the pipeline reads this very file: cost from the measured capacity
    cost = subprocess.run([sys.executable, "cost_calculator.py", f"--bench={out}", "--gpu=CPU-2core",
                           "--p95_slo_ms=1e9", f"--out={tmp_path / 'cost.json'}"],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert cost.returncode == 0, cost.stderr
    estimate = json.loads((tmp_path / "cost.json").read_text())["estimates"][0]
    assert estimate["capacity"]["req_per_s"] == max(row["req_per_s"] for row in data["results"])


def test_cli_rate_mode_is_open_loop(server_url: str, val_files: Path, tmp_path: Path) -> None:
    """--mode rate: requests arrive as a seeded Poisson process at each offered rate for
    --duration seconds, whatever the answers (no client waits for its previous one)."""
    out = tmp_path / "rate.json"
    r = run_cli("--url", server_url, "--mode", "rate", "--rates", "5,20", "--duration", "3", "--requests", "1000",
                "--max-tokens", str(MAX_TOKENS), "--prompts-from", str(val_files), "--prompt-tokens", "32",
                "--out", str(out), timeout=120)
    assert r.returncode == 0, r.stderr
    data = json.loads(out.read_text())
    assert data["mode"] == "rate" and [row["rate"] for row in data["results"]] == [5.0, 20.0]
    for row in data["results"]:
        check_level(row, False)
        assert row["stopped_by"] == "duration" and row["clients"] >= 1  # clients: the peak in flight
        # a Poisson count over 3 s: about rate x 3 arrivals, well within 4 standard deviations
        mean, issued = row["rate"] * 3, row["requests"] + row["cancelled"]
        assert abs(issued - mean) <= 4 * mean ** 0.5 + 1, (issued, mean)
    assert out.with_suffix(".png").read_bytes()[:8] == PNG_MAGIC
    bad = run_cli("--url", server_url, "--mode", "rate", "--rates", "5,-1")
    assert bad.returncode == 2 and "rates must be positive" in bad.stderr


@pytest.mark.parametrize("stream", [False, True])
def test_run_sweep_in_process(server_url: str, stream: bool) -> None:
    rows = benchmark_api.run_sweep(server_url, [1, 4], endpoint="v1" if stream else "complete",
                                   stream=stream, max_tokens=MAX_TOKENS, requests_per_level=6,
                                   duration_s=30, progress=False)
    assert [r["clients"] for r in rows] == [1, 4]
    for row in rows:
        check_level(row, stream)
        assert row["requests"] == 6 and row["stopped_by"] == "requests"


def test_errors_are_counted_by_status(server_url: str) -> None:
    # a URL prefix the server does not route: every request is a 404, reported, not raised
    rows = benchmark_api.run_sweep(server_url + "/no-such-prefix", [2], max_tokens=MAX_TOKENS,
                                   requests_per_level=4, duration_s=10, warmup=0, progress=False)
    row = rows[0]
    assert row["errors"] == 4 and row["error_codes"] == {"404": 4}
    assert row["req_per_s"] == 0 and row["p50_ms"] is None


def test_duration_is_a_hard_stop(server_url: str) -> None:
    t0 = time.perf_counter()
    rows = benchmark_api.run_sweep(server_url, [2], max_tokens=MAX_TOKENS,
                                   requests_per_level=100_000, duration_s=1.0, drain_s=5.0,
                                   warmup=0, progress=False)
    assert time.perf_counter() - t0 < 10
    assert rows[0]["stopped_by"] == "duration" and rows[0]["ok"] > 0
    assert rows[0]["errors"] == 0


def test_split_is_even_and_larger_first() -> None:
    assert benchmark_api.split(128, 3) == [43, 43, 42]
    assert benchmark_api.split(16, 2) == [8, 8]
    assert sum(benchmark_api.split(7, 4)) == 7


def test_run_sweep_over_processes(server_url: str) -> None:
    # two spawned load processes, 2 clients each: their samples merged into one row
    rows = benchmark_api.run_sweep(server_url, [4], max_tokens=MAX_TOKENS, requests_per_level=16,
                                   duration_s=20, drain_s=10, processes=2, progress=False)
    row = rows[0]
    assert row["processes"] == 2 and row["clients"] == 4
    assert row["errors"] == 0, row["error_codes"]
    assert row["ok"] >= 1 and row["ok"] + row["errors"] == row["requests"]
    assert row["requests"] <= 16  # the bound is split over the processes, not given to each
    assert row["requests"] == 16 and row["stopped_by"] == "requests" and row["cancelled"] == 0
    assert row["p50_ms"] is not None and row["p50_ms"] <= row["p95_ms"] <= row["p99_ms"]
    assert row["duration_s"] > 0 and row["req_per_s"] > 0


def test_cli_rate_mode_over_processes(server_url: str, tmp_path: Path) -> None:
    """--mode rate --processes 2: each process sends Poisson arrivals at half the rate, and the
    merged row reads like a one-process row at the offered total rate."""
    out = tmp_path / "rate2.json"
    rate, duration = 40.0, 2.0
    r = run_cli("--url", server_url, "--mode", "rate", "--rates", str(rate), "--duration", str(duration),
                "--requests", "1000", "--processes", "2", "--max-tokens", str(MAX_TOKENS), "--out", str(out),
                timeout=120)
    assert r.returncode == 0, r.stderr
    data = json.loads(out.read_text())
    assert data["processes"] == 2 and len(data["results"]) == 1
    row = data["results"][0]
    check_level(row, False)
    assert row["processes"] == 2 and row["rate"] == rate and row["stopped_by"] == "duration"
    # the arrivals are seeded, so the count does not depend on how fast this machine is: only
    # the Poisson spread around rate x duration (within 4 standard deviations)
    mean, issued = rate * duration, row["requests"] + row["cancelled"]
    assert abs(issued - mean) <= 4 * mean ** 0.5 + 1, (issued, mean)
    # clients: the sum of the two processes' peaks in flight, each at least one
    assert row["clients"] >= 2
    assert row["p50_ms"] is not None and row["duration_s"] > 0


def test_run_sweep_open_loop_splits_bounds_over_processes(server_url: str) -> None:
    # 40 requests over 2 processes: 20 each, reached long before the 20 s duration bound. All
    # 40 answered means both processes sent (neither may send more than its 20)
    rows = benchmark_api.run_sweep(server_url, rates=[40.0], processes=2, max_tokens=MAX_TOKENS,
                                   requests_per_level=40, duration_s=20, drain_s=10, max_in_flight=3,
                                   progress=False)
    assert len(rows) == 1
    row = rows[0]
    assert row["processes"] == 2 and row["rate"] == 40.0
    assert row["errors"] == 0, row["error_codes"]
    assert row["requests"] == row["ok"] == 40 and row["cancelled"] == 0
    assert row["stopped_by"] == "requests" and row["duration_s"] < 20
    # max_in_flight is split too (2 + 1): the summed peaks cannot pass it
    assert 2 <= row["clients"] <= 3


def test_open_loop_arguments() -> None:
    # several processes with rates are accepted now; bad values are still refused up front
    # (before any request, so no server is needed)
    args = benchmark_api.parse_args(["--mode", "rate", "--rates", "100", "--processes", "4"])
    assert args.processes == 4 and args.rates == [100.0]
    for bad in ({"rates": [0.0]}, {"rates": [10.0, -1.0]}, {"rates": [math.inf]},
                {"rates": [10.0], "max_in_flight": 0}, {"rates": [10.0], "processes": 0}):
        with pytest.raises(ValueError):
            benchmark_api.run_sweep("http://127.0.0.1:9", progress=False, **bad)
    with pytest.raises(SystemExit):
        benchmark_api.parse_args(["--mode", "rate", "--max-in-flight", "0"])
