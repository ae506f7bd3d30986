"""HTTP_WORKERS=1 vs N: the same checkpoint behind 1 or more HTTP processes and one engine process.

One `python serve_api.py` per worker count, all started up front (each with its own engine:
mind the accelerator memory), then benchmark_api.run_sweep at each client count against each
server in turn, round after round (interleaved: a noisy neighbour slows every variant alike).
Closed-loop clients on POST /complete, greedy, response cache off (its /stats hit count is per
worker). Writes --out JSON (every run, plus the median per workers x clients) and a PNG beside it.

Usage:
    # this CPU (2 cores: the engine, the workers and the load generator share them)
    python bench/http_workers.py --model-path /tmp/tiny/model --device cpu --clients-list 32,64 \\
        --max-tokens 32 --max-concurrent-sequences 64 --out bench/results/http_workers_cpu.json
    # one GPU, a real model
    python bench/http_workers.py --model-path out-code-assistant --device cuda --dtype bfloat16 \\
        --workers-list 1,2,4 --clients-list 64,128,256 --rounds 3 --out bench/results/http_workers_h100.json

By default the load generator is one Python process: past ~1000 req/s it can be the limit itself
(watch its CPU; the JSON records the load average of every run). --load-processes N splits each
level's clients and requests over N processes (benchmark_api.run_sweep processes=N).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Sequence

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

FIELDS = ("req_per_s", "tokens_per_s", "p50_ms", "p95_ms", "p99_ms", "errors")


def _ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x.strip()]


def summarize(runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The median of each field over the rounds, per (workers, clients)."""
    keys = sorted({(r["workers"], r["clients"]) for r in runs})
    out = []
    for w, c in keys:
        rows = [r for r in runs if r["workers"] == w and r["clients"] == c]
        med = {f: statistics.median(r[f] for r in rows if r.get(f) is not None)
               for f in FIELDS if any(r.get(f) is not None for r in rows)}
        out.append({"workers": w, "clients": c, "rounds": len(rows), **{k: round(v, 2) for k, v in med.items()}})
    return out


def plot(summary: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 4))
    for w in sorted({s["workers"] for s in summary}):
        rows = [s for s in summary if s["workers"] == w]
        ax1.plot([r["clients"] for r in rows], [r["req_per_s"] for r in rows], "o-", label=f"HTTP_WORKERS={w}")
        ax2.plot([r["clients"] for r in rows], [r["p95_ms"] for r in rows], "o-", label=f"HTTP_WORKERS={w}")
    ax1.set(xlabel="concurrent clients", ylabel="requests / s", title="throughput")
    ax2.set(xlabel="concurrent clients", ylabel="p95 latency (ms)", title="p95 latency")
    for ax in (ax1, ax2):
        ax.set_xscale("log", base=2)
        ax.set_ylim(bottom=0)  # differences of a few percent must look like that
        ax.legend()
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model-path", required=True, help="checkpoint directory (MODEL_PATH)")
    p.add_argument("--device", default="auto", help="DEVICE for the server: auto, cpu, cuda, cuda:N")
    p.add_argument("--dtype", default="auto", help="DTYPE for the server: auto, float32, bfloat16, float16")
    p.add_argument("--workers-list", type=_ints, default=[1, 2], help="HTTP_WORKERS values to compare")
    p.add_argument("--clients-list", type=_ints, default=[32, 64], help="concurrent clients per level")
    p.add_argument("--rounds", type=int, default=2, help="interleaved repetitions of every level")
    p.add_argument("--requests", type=int, default=600, help="requests per level (upper bound)")
    p.add_argument("--duration", type=float, default=20.0, help="seconds per level (upper bound)")
    # defaults as bench/serving_gpu.py's server sweep (serving_h100.json: 290 req/s at 128 clients)
    p.add_argument("--max-tokens", type=int, default=50)
    p.add_argument("--max-concurrent-sequences", type=int, default=256)
    p.add_argument("--max-queue", type=int, default=1024)
    p.add_argument("--load-processes", type=int, default=1,
                   help="load-generator processes per level (benchmark_api run_sweep processes=)")
    p.add_argument("--out", required=True, help="JSON results path (a PNG goes beside it)")
    args = p.parse_args(argv)

    import benchmark_api
    from server_utils import ServerProcess  # the server tests' launcher: scrubbed env, free port

    env = {"DEVICE": args.device, "DTYPE": args.dtype, "CACHE_SIZE": "0", "LOG_LEVEL": "warning", "REQUEST_TIMEOUT_S": "300",
           "MAX_CONCURRENT_SEQUENCES": str(args.max_concurrent_sequences), "MAX_QUEUE": str(args.max_queue)}
    servers = {w: ServerProcess(args.model_path, {**env, "HTTP_WORKERS": str(w)}, ready_timeout=600.0)
               for w in args.workers_list}
    runs: list[dict[str, Any]] = []
    try:
        for srv in servers.values():
            srv.start()
        for r in range(args.rounds):
            for clients in args.clients_list:
                for w, srv in servers.items():
                    t0 = time.time()
                    row = benchmark_api.run_sweep(srv.url, [clients], max_tokens=args.max_tokens,
                                                  requests_per_level=args.requests, duration_s=args.duration,
                                                  warmup=2, seed=r, progress=False,
                                                  processes=args.load_processes)[0]
                    row.update(workers=w, round=r, started=t0, loadavg=list(os.getloadavg()))
                    runs.append(row)
                    print(json.dumps({k: row.get(k) for k in ("round", "workers", "clients", *FIELDS)}), flush=True)
    finally:
        for srv in servers.values():
            srv.close()
    summary = summarize(runs)
    result = {"date": datetime.now(timezone.utc).isoformat(timespec="seconds"), "host": platform.node(),
              "cpus": os.cpu_count(), "argv": sys.argv[1:] if argv is None else list(argv),
              "load_processes": args.load_processes, "settings": vars(args), "summary": summary, "runs": runs}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    try:
        plot(summary, out.with_suffix(".png"))
    except ImportError:
        pass  # matplotlib is optional here: the JSON has everything
    for s in summary:
        print(json.dumps(s))
    return result


if __name__ == "__main__":
    main()
