"""Host (Python) time of the engine loop per step, with the model's compute stubbed out.

    python bench/engine_host.py                      # 128 rows, 64-token prompts, 50 new tokens
    python bench/engine_host.py --max-tokens 900     # little turnover: rows decode ~900 steps each
    python bench/engine_host.py --profile            # and a cProfile top 15 of one more run

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

Prints, per run and the median: us per engine step (one Engine.step: a prefill when due, one
decode launch and its read-back) and us per row-step (one request's token in one decode step).
"""
from __future__ import annotations

import argparse
import cProfile
import pstats
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from engine import Engine, SamplingParams  # noqa: E402
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
    new_tokens: dict[int, list[int]] = {}  # as _Worker's: this step's tokens per request id
    finished: list[int] = []
    rids = iter(range(1 << 62))

    def submit(max_tokens: int) -> None:
        rid = next(rids)
        engine.submit(prompt, SamplingParams(max_tokens=max_tokens, stop_token_ids=(eos,)),
                      on_token=token_collector(new_tokens, rid), on_finish=lambda r: finished.append(rid))

    def on_step_end() -> tuple:
        # what _Worker.flush reads from the engine after every step, then the clients' next requests
        stats = (engine.num_running, engine.num_waiting, round(engine.kv_cache_usage, 6), bool(engine.healthy),
                 dict(engine.counters))
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
    args = p.parse_args()
    engine = build(args)
    results = []
    for i in range(args.runs):
        results.append(run(engine, args.steps))
        print(f"run {i}: {results[-1][0]:7.1f} us/step  {results[-1][1]:5.2f} us/row-step")
    print(f"median: {statistics.median(r[0] for r in results):7.1f} us/step  "
          f"{statistics.median(r[1] for r in results):5.2f} us/row-step  (rows={args.rows}, "
          f"prompt={args.prompt_len}, max_tokens={args.max_tokens}, decode_steps={args.decode_steps}, "
          f"prefill_wait_steps={args.prefill_wait_steps})")
    if args.profile:
        prof = cProfile.Profile()
        prof.runcall(run, engine, args.steps)
        pstats.Stats(prof).sort_stats("tottime").print_stats(15)


if __name__ == "__main__":
    main()
