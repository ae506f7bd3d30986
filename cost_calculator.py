"""What serving costs: GPUs needed for a traffic profile and a latency SLO, $/month, $/1K requests.

Capacity comes from a measured load test, not from a guess: give it one or more JSON files
written by `benchmark_api.py --mode sweep --out ...` (or `bench/serving_gpu.py`'s output, whose
`concurrency` list has the same rows). One replica's capacity is the highest req/s among the
levels that answered every request with p95 latency within the SLO. The rest is arithmetic:

    peak req/s       = requests_per_day / 86400 * peak_to_mean
    replicas at peak = max(min_replicas, ceil(peak req/s / (capacity * target_utilization)))
    always-on        = replicas at peak, every hour of the month
    autoscaled       = the HPA following a daily curve: each hour gets the replicas its load
                       needs (never below min_replicas); the curve is a smooth single-peaked day
                       whose busiest hour is peak_to_mean times the mean
    spot             = autoscaled, with min_replicas on demand and the rest on spot, plus
                       spot_overhead extra spot capacity for preempted pods being replaced

Usage:
    python cost_calculator.py --bench=bench/results/serving_h100.json --requests_per_day=1000000
    python cost_calculator.py config/cost_example.py --gpu=A10G --price_per_hour=1.10
    python cost_calculator.py --bench=a.json,b.json --out=bench/results/cost.json   # side by side + PNG

GPU prices are illustrative list prices per GPU-hour (PRICES below, with the date they were
read); pass --price_per_hour / --spot_price_per_hour for your provider and region.
"""
from __future__ import annotations

import json
import math
import sys
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from configurator import ConfigError, parse_config

HOURS_PER_MONTH = 730.0  # 8760 / 12

# (on-demand, spot) USD per GPU-hour: rough public-cloud list prices as of 2025, single-GPU
# shares of common instance types. Illustrative only: override them with your own quote.
PRICES: dict[str, tuple[float, float]] = {
    "T4": (0.35, 0.12),
    "L4": (0.80, 0.28),
    "A10G": (1.01, 0.40),
    "A100-80GB": (3.67, 1.40),
    "H100": (3.90, 1.80),
    "CPU-2core": (0.10, 0.03),  # a 2-vCPU general-purpose VM, for the CPU demo model
}


@dataclass
class CostConfig:
    bench: str = "bench/results/serving_h100.json"  # comma-separated JSON files from load tests
    gpu: str = "H100"  # one for all files, or comma-separated, one per file
    price_per_hour: float | None = None  # on-demand USD per replica-hour; default from PRICES
    spot_price_per_hour: float | None = None
    requests_per_day: int = 1_000_000
    peak_to_mean: float = 3.0  # busiest hour's rate over the daily mean (office-hours traffic)
    p95_slo_ms: float = 500.0
    target_utilization: float = 0.7  # run each replica at this share of its measured capacity
    min_replicas: int = 2  # high availability: one pod may be drained or preempted
    spot_overhead: float = 0.1  # extra spot capacity held for replacing preempted pods
    out: str = ""  # JSON path; a PNG of cost against traffic goes beside it


@dataclass
class Capacity:
    source: str
    gpu: str
    device: str
    clients: int
    req_per_s: float
    p95_ms: float
    tokens_per_request: float


class CostError(ValueError):
    """A bad input; the message names it and is fit to print as one line."""


def load_levels(path: Path) -> tuple[str, list[dict[str, Any]]]:
    """(device, per-level rows) of a benchmark_api.py or bench/serving_gpu.py result file."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise CostError(f"benchmark file not found: {path}") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CostError(f"benchmark file {path} is not readable JSON: {type(e).__name__}") from None
    rows = data.get("results", data.get("concurrency")) if isinstance(data, dict) else None
    if not isinstance(rows, list) or not rows:
        raise CostError(f"benchmark file {path} has no 'results' or 'concurrency' rows")
    needed = ("clients", "req_per_s", "p95_ms", "errors", "tokens_per_s")
    for row in rows:
        if not isinstance(row, dict) or any(k not in row for k in needed):
            raise CostError(f"benchmark file {path}: every row needs {', '.join(needed)}")
    return str(data.get("device", "unknown")), rows


def capacity_within_slo(path: Path, gpu: str, p95_slo_ms: float) -> Capacity:
    """The best level that met the SLO with no errors: one replica's usable capacity."""
    device, rows = load_levels(path)
    ok = [r for r in rows if r["errors"] == 0 and r["p95_ms"] is not None and r["req_per_s"] > 0
          and r["p95_ms"] <= p95_slo_ms]
    if not ok:
        best = min((r["p95_ms"] for r in rows if r["p95_ms"] is not None), default=None)
        raise CostError(f"{path}: no level met p95 <= {p95_slo_ms:g} ms without errors "
                        f"(best p95 {best} ms); raise --p95_slo_ms or make the server faster")
    best_row = max(ok, key=lambda r: r["req_per_s"])
    return Capacity(source=str(path), gpu=gpu, device=device, clients=int(best_row["clients"]),
                    req_per_s=float(best_row["req_per_s"]), p95_ms=float(best_row["p95_ms"]),
                    tokens_per_request=float(best_row["tokens_per_s"]) / float(best_row["req_per_s"]))


def prices(gpu: str, cfg: CostConfig) -> tuple[float, float]:
    listed = PRICES.get(gpu)
    if listed is None and (cfg.price_per_hour is None or cfg.spot_price_per_hour is None):
        raise CostError(f"gpu: no listed price for {gpu!r} (known: {', '.join(PRICES)}); "
                        f"give --price_per_hour and --spot_price_per_hour")
    on_demand = cfg.price_per_hour if cfg.price_per_hour is not None else listed[0]
    spot = cfg.spot_price_per_hour if cfg.spot_price_per_hour is not None else listed[1]
    return on_demand, spot


def replicas_for(rate: float, cap: Capacity, cfg: CostConfig) -> int:
    return max(cfg.min_replicas, math.ceil(rate / (cap.req_per_s * cfg.target_utilization)))


def daily_curve(peak_to_mean: float, hours: int = 24) -> list[float]:
    """Hourly load as multiples of the mean: exp(k cos(phase)), k solved so max/mean is as asked.

    One smooth peak per day is what office-hours code completion looks like; a flat day
    (peak_to_mean 1) is k = 0."""
    def shape(k: float) -> list[float]:
        w = [math.exp(k * math.cos(2 * math.pi * h / hours)) for h in range(hours)]
        mean = sum(w) / hours
        return [x / mean for x in w]

    lo, hi = 0.0, 1.0
    while max(shape(hi)) < peak_to_mean and hi < 1e3:
        hi *= 2
    for _ in range(60):  # bisection: max/mean grows with k
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if max(shape(mid)) < peak_to_mean else (lo, mid)
    return shape((lo + hi) / 2)


def estimate(cap: Capacity, cfg: CostConfig, requests_per_day: float | None = None) -> dict[str, Any]:
    """Monthly cost of serving requests_per_day on replicas of this measured capacity."""
    rpd = cfg.requests_per_day if requests_per_day is None else requests_per_day
    on_demand, spot = prices(cap.gpu, cfg)
    mean_rps = rpd / 86400.0
    peak_rps = mean_rps * cfg.peak_to_mean
    hourly = [replicas_for(mean_rps * f, cap, cfg) for f in daily_curve(cfg.peak_to_mean)]
    peak, mean = replicas_for(peak_rps, cap, cfg), sum(hourly) / len(hourly)
    requests_per_month = rpd * HOURS_PER_MONTH / 24.0
    tokens_per_month = requests_per_month * cap.tokens_per_request
    always_on = peak * on_demand * HOURS_PER_MONTH
    autoscaled = mean * on_demand * HOURS_PER_MONTH
    # the on-demand floor keeps serving through a preemption wave; the rest rides on spot
    spot_replicas = (mean - cfg.min_replicas) * (1.0 + cfg.spot_overhead)
    spot_mix = (cfg.min_replicas * on_demand + spot_replicas * spot) * HOURS_PER_MONTH
    plans = {"always_on": always_on, "autoscaled": autoscaled, "autoscaled_spot": spot_mix}
    return {
        "gpu": cap.gpu, "requests_per_day": rpd, "mean_req_per_s": mean_rps, "peak_req_per_s": peak_rps,
        "replicas_at_peak": peak, "replicas_mean_autoscaled": mean, "replicas_by_hour": hourly,
        "price_per_hour": on_demand, "spot_price_per_hour": spot,
        "monthly_usd": plans,
        "usd_per_1k_requests": {k: v / requests_per_month * 1e3 for k, v in plans.items()},
        "usd_per_1m_tokens": {k: v / tokens_per_month * 1e6 for k, v in plans.items()},
    }


def report(caps: list[Capacity], results: list[dict[str, Any]], cfg: CostConfig) -> str:
    lines = [f"traffic: {cfg.requests_per_day:,} requests/day, peak {cfg.peak_to_mean:g}x mean, "
             f"p95 SLO {cfg.p95_slo_ms:g} ms, replicas run at {cfg.target_utilization:.0%} of capacity",
             f"{'benchmark':<30} {'gpu':<9} {'cap req/s':>9} {'@p95 ms':>8} {'peak':>5} {'avg':>5} "
             f"{'always-on $/mo':>15} {'autoscaled':>11} {'+spot':>9} {'$/1K req':>9} {'$/1M tok':>9}"]
    for cap, r in zip(caps, results):
        m, per_req, per_tok = r["monthly_usd"], r["usd_per_1k_requests"], r["usd_per_1m_tokens"]
        lines.append(f"{Path(cap.source).name[:30]:<30} {cap.gpu[:9]:<9} {cap.req_per_s:>9.1f} {cap.p95_ms:>8.0f} "
                     f"{r['replicas_at_peak']:>5} {r['replicas_mean_autoscaled']:>5.1f} {m['always_on']:>15,.0f} "
                     f"{m['autoscaled']:>11,.0f} {m['autoscaled_spot']:>9,.0f} "
                     f"{per_req['autoscaled_spot']:>9.4f} {per_tok['autoscaled_spot']:>9.3f}")
    for gpu, r in {r["gpu"]: r for r in results}.items():
        lines.append(f"price {gpu}: ${r['price_per_hour']:.2f}/h on demand, ${r['spot_price_per_hour']:.2f}/h spot")
    lines.append("$/1K req and $/1M tok are for the autoscaled + spot plan")
    return "\n".join(lines)


def plot(caps: list[Capacity], cfg: CostConfig, path: Path) -> None:
    """Monthly cost (autoscaled, on demand and with spot) against traffic, per benchmark."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    traffic = [10 ** (3 + i / 8) for i in range(8 * 5 + 1)]  # 1K .. 100M requests/day
    fig, ax = plt.subplots(figsize=(8, 5))
    for cap in caps:
        name = f"{Path(cap.source).stem} on {cap.gpu}"
        for plan, style in (("autoscaled", "-"), ("autoscaled_spot", "--")):
            ax.plot(traffic, [estimate(cap, cfg, t)["monthly_usd"][plan] for t in traffic], style,
                    label=f"{name} ({plan.replace('_', ' + ')})")
    ax.set(xscale="log", yscale="log", xlabel="requests per day", ylabel="USD per month",
           title=f"p95 <= {cfg.p95_slo_ms:g} ms, peak {cfg.peak_to_mean:g}x mean")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    try:
        cfg = parse_config(CostConfig, sys.argv[1:] if argv is None else argv)
        if cfg.requests_per_day < 0:
            raise CostError("requests_per_day: must be >= 0")
        if cfg.min_replicas < 1:
            raise CostError("min_replicas: must be >= 1")
        for name in ("peak_to_mean", "p95_slo_ms"):
            if getattr(cfg, name) <= 0:
                raise CostError(f"{name}: must be > 0")
        if not 0 < cfg.target_utilization <= 1:
            raise CostError("target_utilization: must be in (0, 1]")
        if cfg.spot_overhead < 0:
            raise CostError("spot_overhead: must be >= 0")
        paths = [Path(p.strip()) for p in cfg.bench.split(",") if p.strip()]
        if not paths:
            raise CostError("bench: give at least one benchmark JSON file")
        gpus = [g.strip() for g in cfg.gpu.split(",")]
        if len(gpus) not in (1, len(paths)):
            raise CostError(f"gpu: give one GPU or one per bench file ({len(paths)}), not {len(gpus)}")
        gpus = gpus * len(paths) if len(gpus) == 1 else gpus
        caps = [capacity_within_slo(p, g, cfg.p95_slo_ms) for p, g in zip(paths, gpus)]
        results = [estimate(c, cfg) for c in caps]
    except (ConfigError, CostError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    print(report(caps, results, cfg))
    out = {"config": asdict(cfg), "hours_per_month": HOURS_PER_MONTH,
           "estimates": [{"capacity": asdict(c), **r} for c, r in zip(caps, results)]}
    if cfg.out:
        path = Path(cfg.out)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(out, indent=2) + "\n", encoding="utf-8")
        plot(caps, cfg, path.with_suffix(".png"))
        print(f"wrote {path} and {path.with_suffix('.png')}")
    return out


if __name__ == "__main__":
    main()
