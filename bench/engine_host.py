"""Host (Python) time of the engine loop per step, with the model's compute stubbed out.

    python bench/engine_host.py                      # 128 rows, 64-token prompts, 50 new tokens
    python bench/engine_host.py --max-tokens 900     # little turnover: rows decode ~900 steps each
    python bench/engine_host.py --profile            # and a cProfile top 15 of one more run
    python bench/engine_host.py --rows 1 --connections 4 --stats-interval 0,0.02 \
        --out bench/results/engine_host_flush_cpu.json  # one stream, 4 HTTP workers' connections

On a GPU a decode step is one CUDA graph replay, so under load the step rate is bounded by the
host's bookkeeping around it. Here the real Engine.step runs (_drop_cancelled, _admit, _prefill,
_launch_decode, _finish_decode, _emit, _release, _deactivate) with only the model replaced:
_run_decode returns precomputed tokens and _run_prefill zero logits, about as cheap as a replay.
The engine's few other tensor ops (the prefill's input copy and slot writes, stopping rows) run
on the CPU, where a GPU would launch kernels at a similar host cost.
Requests carry the server's own on_token (engine_process.token_collector: new tokens gathered
per request id) and read the stats after each step as _Worker.flush does, and a closed loop keeps --rows of them in
flight as benchmark_api's clients do: every finished request is replaced at the next step. The
first wave's lengths are staggered so that requests finish a few per step, as under load.
Greedy only (sampling adds device work, not host work).

With --connections N the real engine_process._Worker sends each step's messages (tokens,
finished requests, stats) over N pipes, each read by a child process as an HTTP worker reads
its connection; requests are spread over the connections. --stats-interval takes a list of
engine_process.STATS_INTERVAL_S values, run in turn within each run (side by side).

Prints, per run and the median: us per engine step (one Engine.step: a prefill when due, one
decode launch and its read-back) and us per row-step (one request's token in one decode step).
"""
from __future__ import annotations

import argparse
import cProfile
import datetime as dt
import json
import multiprocessing
import pstats
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from engine import Engine, SamplingParams  # noqa: E402
import engine_process  # noqa: E402
from engine_process import token_collector  # noqa: E402
from model import GPT, GPTConfig  # noqa: E402

VOCAB = 512


def build(args: argparse.Namespace) -> Engine:
    """An engine over a stub model, with --rows requests in flight and kept there."""
    torch.manual_seed(0)
    model = GPT(GPTConfig(block_size=1024, vocab_size=VOCAB, n_layer=1, n_head=1, n_embd=8)).eval()
    eos = VOCAB - 1
    engine = Engine(model, max_batch=args.rows, max_queue=4 * args.rows, prefill_batch=args.rows, eos_id=eos,
                    decode_steps=args.decode_steps, prefill_wait_steps=args.prefill_wait_steps)
    tokens = torch.randint(0, eos, (max(engine.step_buckets), args.rows))  # never eos: all run to max_tokens
    engine._run_decode = lambda B, length, steps: tokens[:steps, :B]
    engine._run_prefill = lambda rows, T, length: torch.zeros(rows, 1, VOCAB)
    prompt = torch.randint(0, eos, (args.prompt_len,)).tolist()
    rids = iter(range(1 << 62))
    if args.connections:
        worker = connect(engine, args.connections)
        clients = list(worker.clients.values())

        def submit(max_tokens: int) -> None:  # through the worker, spread over its connections
            rid = next(rids)
            worker.submit(clients[rid % len(clients)], rid, prompt, (max_tokens, 0.0, 0, 1.0, None, (eos,)))

        def on_step_end() -> None:
            # the worker's messages for this step, then the clients' next requests
            worker.flush()
            for _ in range(args.rows - engine.num_running - engine.num_waiting):
                submit(args.max_tokens)
    else:
        new_tokens: dict[int, list[int]] = {}  # as _Worker's: this step's tokens per request id
        finished: list[int] = []

        def submit(max_tokens: int) -> None:
            rid = next(rids)
            engine.submit(prompt, SamplingParams(max_tokens=max_tokens, stop_token_ids=(eos,)),
                          on_token=token_collector(new_tokens, rid), on_finish=lambda r: finished.append(rid))

        def on_step_end() -> tuple:
            # what _Worker.flush reads from the engine after every step, then the clients' next requests
            stats = (engine.num_running, engine.num_waiting, round(engine.kv_cache_usage, 6),
                     bool(engine.healthy), dict(engine.counters))
            new_tokens.clear()
            for _ in range(len(finished)):
                submit(args.max_tokens)
            finished.clear()
            return stats

    engine.on_step_end = on_step_end
    for i in range(args.rows):
        submit(1 + i * args.max_tokens // args.rows)
    for _ in range(min(3 * args.max_tokens, 200)):  # into the steady state
        engine.step()
    return engine


def _read_until_closed(conn: multiprocessing.connection.Connection) -> None:
    try:
        while True:
            conn.recv_bytes()
    except (EOFError, OSError):
        pass


def connect(engine: Engine, n: int) -> "engine_process._Worker":
    """A real _Worker over `engine` with n connections, each read by a child process."""
    worker = engine_process._Worker(engine, {})
    for i in range(n):
        to_child, from_parent = multiprocessing.Pipe()
        from_child, to_parent = multiprocessing.Pipe()
        worker.add_client(from_parent, to_parent, owner=i == 0)
        multiprocessing.Process(target=_read_until_closed, args=(from_child,), daemon=True).start()
        from_child.close()
    return worker


def run(engine: Engine, steps: int) -> tuple[float, float]:
    """(us per engine step, us per row-step) over `steps` engine steps."""
    row_steps = engine.counters["decode_row_steps"]
    t0 = time.perf_counter()
    for _ in range(steps):
        engine.step()
    dt = time.perf_counter() - t0
    return dt / steps * 1e6, dt / (engine.counters["decode_row_steps"] - row_steps) * 1e6


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rows", type=int, default=128, help="requests in flight (and the engine's max_batch)")
    p.add_argument("--prompt-len", type=int, default=64)
    p.add_argument("--max-tokens", type=int, default=50)
    p.add_argument("--decode-steps", type=int, default=1, help="Engine decode_steps")
    p.add_argument("--prefill-wait-steps", type=int, default=4, help="Engine prefill_wait_steps (the GPU server's 4)")
    p.add_argument("--steps", type=int, default=2000, help="timed engine steps per run")
    p.add_argument("--runs", type=int, default=5)
    p.add_argument("--profile", action="store_true", help="then a cProfile top 15 of one more run")
    p.add_argument("--connections", type=int, default=0,
                   help="send each step's messages through a real _Worker to this many connections "
                        "(0: read the stats only)")
    p.add_argument("--stats-interval", default=str(engine_process.STATS_INTERVAL_S),
                   help="engine_process.STATS_INTERVAL_S values, comma-separated, run side by side "
                        "(with --connections)")
    p.add_argument("--out", default=None, help="also write the results here (JSON)")
    args = p.parse_args()
    intervals = [float(v) for v in args.stats_interval.split(",")]
    engine = build(args)
    results: dict[float, list[tuple[float, float]]] = {v: [] for v in intervals}
    for i in range(args.runs):
        for interval in intervals:
            engine_process.STATS_INTERVAL_S = interval
            results[interval].append(run(engine, args.steps))
            print(f"run {i} stats interval {interval}: {results[interval][-1][0]:7.1f} us/step  "
                  f"{results[interval][-1][1]:5.2f} us/row-step")
    summary = []
    for interval, rs in results.items():
        summary.append({"stats_interval_s": interval, "us_per_step": round(statistics.median(r[0] for r in rs), 2),
                        "us_per_row_step": round(statistics.median(r[1] for r in rs), 3),
                        "runs_us_per_step": [round(r[0], 2) for r in rs]})
        print(f"median (stats interval {interval}): {summary[-1]['us_per_step']:7.1f} us/step  "
              f"{summary[-1]['us_per_row_step']:5.2f} us/row-step  (rows={args.rows}, prompt={args.prompt_len}, "
              f"max_tokens={args.max_tokens}, decode_steps={args.decode_steps}, "
              f"prefill_wait_steps={args.prefill_wait_steps}, connections={args.connections})")
    if args.out:
        Path(args.out).write_text(json.dumps({
            "device": f"cpu: {multiprocessing.cpu_count()} cores", "torch": torch.__version__,
            "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
            "command": "python " + " ".join(sys.argv), "rows": args.rows, "connections": args.connections,
            "results": summary,
            "notes": ["Host time per engine step with a stub model (no GPU work); each connection's messages are "
                      "read by a child process. stats_interval_s 0 is the behaviour before STATS_INTERVAL_S: "
                      "every connection hears the stats after every step."]}, indent=1) + "\n")
    if args.profile:
        prof = cProfile.Profile()
        prof.runcall(run, engine, args.steps)
        pstats.Stats(prof).sort_stats("tottime").print_stats(15)


if __name__ == "__main__":
    main()
