"""bench/serving_gpu.py's server sweep on the CPU: the path the H100 run takes (HTTP workers in
front of one engine process, the load generator over several processes), on a tiny model."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_server_only_sweep_with_http_workers_and_load_processes(tmp_path: Path) -> None:
    out = tmp_path / "serving.json"
    proc = subprocess.run(
        [sys.executable, "bench/serving_gpu.py", "--device", "cpu", "--shape", "tiny", "--server-only",
         "--http-workers", "2", "--load-processes", "2", "--clients", "1,4", "--new-tokens", "8",
         "--rates", "4", "--requests-per-level", "40", "--steady-clients", "4", "--steady-requests", "30",
         "--out", str(out)],
        cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(out.read_text())
    assert result["server_http_workers"] == 2 and result["load_processes"] == 2
    rows = {r["clients"]: r for r in result["concurrency"]}
    assert sorted(rows) == [1, 4]
    assert rows[1]["processes"] == 1 and rows[4]["processes"] == 2  # one client: no split
    for r in rows.values():
        assert r["errors"] == 0 and r["ok"] >= 1 and r["req_per_s"] > 0
        assert r["engine_steps_per_s"] > 0 and r["engine_mean_batch"] >= 1  # the engine's own counters
        assert r["p50_ms"] <= r["p95_ms"] <= r["p99_ms"]
        assert r["requests"] == 40 and r["stopped_by"] == "requests"  # --requests-per-level
    [steady] = result["steady"]  # the long level after the sweep, its own request bound
    assert steady["clients"] == 4 and steady["requests"] == 30 and steady["errors"] == 0
    [open_row] = result["open_loop"]  # Poisson arrivals at 4 req/s for 10 s
    assert open_row["rate"] == 4.0 and open_row["errors"] == 0 and open_row["ok"] >= 10
    assert result["single_stream_p50_ms"]["server"] == result["server_single"][0]["p50_ms"]
    assert "server_single_stream_p50_ms" in result["targets"]
    assert not out.with_suffix(".partial.json").exists()  # removed once the whole run is written
