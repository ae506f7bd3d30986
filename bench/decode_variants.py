"""Where a decode step's time goes on one GPU, and which engine variant is fastest.

    python bench/decode_variants.py --variants triton:1,matmul:1 --out bench/results/decode_variants_h200.json

GPT-2 124M shape, random bf16 weights, 64-token prompts, 50 new tokens, greedy. A variant is
attention:decode_steps. attention is "triton" (decode_kernels.py: fused LayerNorm/linear/
epilogue kernels for up to 16 rows and one attention kernel per layer, model.DECODE_KERNELS)
or torch ops with the attention over the cache as batched GEMVs ("matmul") or as reductions
for Inductor ("reduce"); decode_steps is 1 or up to that many steps per CUDA-graph launch.
For each it measures, side by side in one process:
- graph_gpu_us_per_step: one captured step replayed back to back, GPU time per step (the floor
  the host can't beat), at batch 1, 16 and the big batch (256), and kernels_per_step there;
- graph_launch_us: host time of one replay() call (the CUDA graph launch itself);
- engine_b1_p50_ms: Engine.generate of one request, 50 tokens (prefill included), and
  engine_b1_first_token_p50_ms the same for 1 token (the prefill's), so
  engine_b1_us_per_decode_step is what each of the 49 others took;
- engine_b16/b256_tokens_per_s: 16 or 256 requests at once.
The gap between engine_b1 and 50 x graph_gpu_us is host work the GPU waits for.
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import statistics
import sys
import time
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import model as model_module  # noqa: E402
from engine import Engine, SamplingParams  # noqa: E402
from model import GPT, GPTConfig  # noqa: E402

SHAPE = dict(n_layer=12, n_head=12, n_embd=768, block_size=1024, vocab_size=50304)


def timed_ms(fn, runs: int) -> list[float]:
    out = []
    for _ in range(runs):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        out.append((time.perf_counter() - t0) * 1000)
    return out


def graph_costs(engine: Engine, batch: int, length: int, replays: int = 200) -> dict:
    """GPU time per step and host time per launch of the one-step greedy graph."""
    graph, _ = engine._graph(batch, length, 1)
    engine.active_buf.zero_()  # idle rows: every replay writes the same position, in bounds
    # every row attends over 100 positions (a 64-token prompt 36 tokens in): the Triton
    # attention reads each row's own positions only, the torch ops read all `length`
    engine.pos_buf.fill_(min(100, length - 1))
    graph.replay()
    torch.cuda.synchronize()
    launch = []
    t0 = time.perf_counter()
    for _ in range(replays):
        t = time.perf_counter()
        graph.replay()
        launch.append(time.perf_counter() - t)
    torch.cuda.synchronize()
    total = time.perf_counter() - t0
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(10):
            graph.replay()
        torch.cuda.synchronize()
    kernels = sum(1 for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA
                  and "memcpy" not in e.name.lower() and "memset" not in e.name.lower())
    engine.pos_buf.zero_()
    # the kernels by GPU time over the 10 steps: where a step's time goes
    top = sorted(prof.key_averages(), key=lambda e: e.device_time_total, reverse=True)[:12]
    return {"graph_gpu_us_per_step": round(total / replays * 1e6, 1),
            "graph_launch_us": round(statistics.median(launch) * 1e6, 1),
            "kernels_per_step": round(kernels / 10),
            "top_kernels": [{"name": e.key[:90], "calls_per_step": e.count / 10,
                             "us_per_step": round(e.device_time_total / 10, 1)} for e in top]}


def measure_variant(model: GPT, prompt: list[int], big: list[list[int]], attention: str, steps: int,
                    args: argparse.Namespace) -> dict:
    """One engine variant, compiled afresh: its row of the results."""
    params = SamplingParams(max_tokens=50)
    torch._dynamo.reset()
    model_module.DECODE_KERNELS = "triton" if attention == "triton" else "torch"
    model_module.DECODE_ATTENTION = "matmul" if attention == "triton" else attention
    t0 = time.perf_counter()
    engine = Engine(model, max_batch=args.big_batch, max_seq_len=256, max_queue=4 * args.big_batch,
                    prefill_batch=args.big_batch, decode_steps=steps)
    for _ in range(2):  # compile and capture what the runs below use (no full warmup: time)
        engine.generate(prompt, params)
        engine.generate_batch(big[:16], params)
        engine.generate_batch(big, params)
    row = {"attention": attention, "decode_steps": steps,
           "compile_and_capture_s": round(time.perf_counter() - t0, 1)}
    b1 = timed_ms(lambda: engine.generate(prompt, params), args.runs)
    row["engine_b1_p50_ms"] = round(statistics.median(b1), 2)
    # the first token alone (the prefill's): the rest of engine_b1 is 49 decode steps
    first = timed_ms(lambda: engine.generate(prompt, SamplingParams(max_tokens=1)), args.runs)
    row["engine_b1_first_token_p50_ms"] = round(statistics.median(first), 2)
    row["engine_b1_us_per_decode_step"] = round((row["engine_b1_p50_ms"] - row["engine_b1_first_token_p50_ms"])
                                                / 49 * 1000, 1)
    for n in (16, args.big_batch):
        bb = timed_ms(lambda: engine.generate_batch(big[:n], params), 3)
        row[f"engine_b{n}_ms"] = round(statistics.median(bb), 2)
        row[f"engine_b{n}_tokens_per_s"] = round(n * 50 / statistics.median(bb) * 1000)
    for b in (1, 16, args.big_batch):
        row[f"b{b}"] = graph_costs(engine, b, 128)
    engine._reset_slots()
    row["graphs_captured"] = len(engine._graphs)
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--variants", default="triton:1,triton:8,matmul:1,matmul:8",
                    help="attention:decode_steps pairs, attention one of triton, matmul, reduce")
    ap.add_argument("--runs", type=int, default=20)
    ap.add_argument("--big-batch", type=int, default=256)
    ap.add_argument("--out", default="bench/results/decode_variants_h200.json")
    args = ap.parse_args()
    torch.manual_seed(0)
    cfg = GPTConfig(**SHAPE)
    model = GPT(cfg).cuda().to(torch.bfloat16).eval()
    g = torch.Generator().manual_seed(1)
    prompt = torch.randint(0, cfg.vocab_size - 64, (64,), generator=g).tolist()
    big = [torch.randint(0, cfg.vocab_size - 64, (64,), generator=g).tolist() for _ in range(args.big_batch)]
    result = {"device": torch.cuda.get_device_name(),
              "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
              "command": "python " + " ".join(sys.argv), "torch": torch.__version__,
              "shape": "124M", "dtype": "bfloat16", "prompt_tokens": 64, "new_tokens": 50, "variants": []}
    for spec in args.variants.split(","):
        attention, steps = spec.split(":")
        row = measure_variant(model, prompt, big, attention, int(steps), args)
        print(json.dumps(row), flush=True)
        result["variants"].append(row)
        torch.cuda.empty_cache()  # the variant's engine went with measure_variant's frame
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
