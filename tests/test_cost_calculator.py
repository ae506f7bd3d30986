"""cost_calculator.py: capacity from a load test within the SLO, replicas, and money arithmetic."""
from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

import cost_calculator as cc

ROOT = Path(__file__).resolve().parents[1]


def row(clients: int, rps: float, p95: float, errors: int = 0, tokens: float = 50.0) -> dict:
    return {"clients": clients, "req_per_s": rps, "p95_ms": p95, "errors": errors, "tokens_per_s": rps * tokens}


def bench_file(tmp_path: Path, rows: list[dict], key: str = "results") -> Path:
    path = tmp_path / f"bench_{key}.json"
    path.write_text(json.dumps({"device": "Test GPU", key: rows}))
    return path


def run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "cost_calculator.py", *args], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize("key", ["results", "concurrency"])  # benchmark_api.py / bench/serving_gpu.py
def test_capacity_is_the_best_level_within_the_slo_without_errors(tmp_path: Path, key: str) -> None:
    rows = [row(1, 20, 50), row(8, 100, 90), row(32, 250, 140, errors=1),  # errors: not usable
            row(64, 300, 250), row(128, 290, 400)]                            # 400 ms: over the SLO
    cap = cc.capacity_within_slo(bench_file(tmp_path, rows, key), "H100", p95_slo_ms=300)
    assert (cap.clients, cap.req_per_s, cap.p95_ms, cap.device) == (64, 300, 250, "Test GPU")
    assert cap.tokens_per_request == pytest.approx(50.0)
    tighter = cc.capacity_within_slo(bench_file(tmp_path, rows, key), "H100", p95_slo_ms=100)
    assert tighter.req_per_s == 100


def test_no_level_within_the_slo_is_an_error_naming_it(tmp_path: Path) -> None:
    with pytest.raises(cc.CostError, match="p95 <= 10 ms"):
        cc.capacity_within_slo(bench_file(tmp_path, [row(1, 20, 50)]), "H100", p95_slo_ms=10)


def test_daily_curve_has_the_asked_peak_and_a_mean_of_one() -> None:
    for peak in (1.0, 2.0, 3.0, 8.0):
        curve = cc.daily_curve(peak)
        assert len(curve) == 24
        assert max(curve) == pytest.approx(peak, rel=1e-6)
        assert sum(curve) / 24 == pytest.approx(1.0)


def test_estimate_arithmetic(tmp_path: Path) -> None:
    cap = cc.Capacity(source="x.json", gpu="H100", device="d", clients=64, req_per_s=100.0,
                      p95_ms=80.0, tokens_per_request=40.0)
    cfg = cc.CostConfig(requests_per_day=86_400 * 100, peak_to_mean=3.0, target_utilization=0.5,
                        min_replicas=2, price_per_hour=2.0, spot_price_per_hour=0.5, spot_overhead=0.1)
    est = cc.estimate(cap, cfg)
    # mean 100 req/s, peak 300; a replica carries 100 * 0.5 = 50 req/s
    assert est["mean_req_per_s"] == pytest.approx(100.0) and est["peak_req_per_s"] == pytest.approx(300.0)
    assert est["replicas_at_peak"] == 6
    hourly = [max(2, math.ceil(100.0 * f / 50.0)) for f in cc.daily_curve(3.0)]
    assert est["replicas_by_hour"] == hourly and max(hourly) == 6 and min(hourly) >= 2
    avg = sum(hourly) / 24
    month = cc.HOURS_PER_MONTH
    assert est["monthly_usd"]["always_on"] == pytest.approx(6 * 2.0 * month)
    assert est["monthly_usd"]["autoscaled"] == pytest.approx(avg * 2.0 * month)
    assert est["monthly_usd"]["autoscaled_spot"] == pytest.approx((2 * 2.0 + (avg - 2) * 1.1 * 0.5) * month)
    requests_month = 86_400 * 100 * month / 24
    assert est["usd_per_1k_requests"]["always_on"] == pytest.approx(6 * 2.0 * month / requests_month * 1e3)
    assert est["usd_per_1m_tokens"]["autoscaled"] == pytest.approx(avg * 2.0 * month / (requests_month * 40) * 1e6)
    # spot never costs more than on demand here, and autoscaling never more than always-on
    m = est["monthly_usd"]
    assert m["autoscaled_spot"] <= m["autoscaled"] <= m["always_on"]


def test_low_traffic_still_pays_for_the_ha_floor() -> None:
    cap = cc.Capacity("x.json", "T4", "d", 8, 1000.0, 50.0, 30.0)
    est = cc.estimate(cap, cc.CostConfig(requests_per_day=100, min_replicas=2))
    assert est["replicas_at_peak"] == 2 and est["replicas_by_hour"] == [2] * 24
    assert est["monthly_usd"]["always_on"] == pytest.approx(2 * cc.PRICES["T4"][0] * cc.HOURS_PER_MONTH)


def test_cli_side_by_side_writes_json_and_png(tmp_path: Path) -> None:
    a = bench_file(tmp_path, [row(1, 20, 50), row(64, 300, 250)])
    b = tmp_path / "b.json"
    b.write_text(json.dumps({"device": "cpu", "concurrency": [row(4, 10, 200)]}))
    out = tmp_path / "cost" / "cost.json"
    r = run(f"--bench={a},{b}", "--gpu=H100,CPU-2core", "--requests_per_day=2000000",
            "--p95_slo_ms=300", f"--out={out}")
    assert r.returncode == 0, r.stderr
    data = json.loads(out.read_text())
    assert [e["capacity"]["req_per_s"] for e in data["estimates"]] == [300, 10]
    assert [e["gpu"] for e in data["estimates"]] == ["H100", "CPU-2core"]
    assert data["estimates"][1]["price_per_hour"] == cc.PRICES["CPU-2core"][0]
    assert out.with_suffix(".png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "H100" in r.stdout and "CPU-2core" in r.stdout


def test_cli_recipe_file_and_committed_h100_result() -> None:
    r = run("config/cost_example.py", "--bench=bench/results/serving_h100.json")
    assert r.returncode == 0, r.stderr
    assert "serving_h100.json" in r.stdout and "H100" in r.stdout


@pytest.mark.parametrize("args, message", [
    (["--bench=missing.json"], "benchmark file not found: missing.json"),
    (["--gpu=TPU9"], "gpu: no listed price for 'TPU9'"),
    (["--target_utilization=1.5"], "target_utilization"),
    (["--peak_to_mean=0"], "peak_to_mean"),
    (["--requests_per_day=lots"], "requests_per_day"),
    (["--no_such_key=1"], "unknown config key: no_such_key"),
    (["--p95_slo_ms=1"], "no level met p95 <= 1 ms"),
])
def test_bad_input_is_one_line_exit_2(args: list[str], message: str) -> None:
    r = run(*args)
    assert r.returncode == 2 and message in r.stderr, r.stderr
    assert "Traceback" not in r.stderr and len(r.stderr.strip().splitlines()) == 1


def test_corrupt_bench_file_is_named(tmp_path: Path) -> None:
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    r = run(f"--bench={bad}")
    assert r.returncode == 2 and f"benchmark file {bad} is not readable JSON" in r.stderr
    rowless = tmp_path / "rowless.json"
    rowless.write_text(json.dumps({"results": [{"clients": 1}]}))
    r = run(f"--bench={rowless}")
    assert r.returncode == 2 and "every row needs" in r.stderr
