"""Training throughput: a plain nanoGPT-style loop against train.py's own path, in one run.

Both train the same GPT-2 shape on random tokens and are timed after warmup (CUDA events on
the GPU, so the clock stops when the GPU is done, not when the host has queued the work).
MFU = (6N + 12*L*H*Q*T) * tokens/s / 989 TFLOP/s (H100 SXM bf16 dense), per GPU.

    # H100, GPT-2 124M: baseline (batch 32 x 1024) and a sweep of train.py settings (~6 min)
    python bench/train_bench.py --profile --out bench/results/training_h100.json
    # only some variants: LOSS:SDPA:MICRO_BATCH[:CHUNK_ROWS], each accumulated to --seqs_per_step
    python bench/train_bench.py --variants fused:cudnn:64,fused:auto:32:16384 --out /tmp/t.json
    # CPU smoke test of every code path (tiny model, no compile, a few steps)
    python bench/train_bench.py --smoke --out /tmp/train_bench.json
    # DDP scaling: only our path, global tokens/s from rank 0 (run for N = 1, 2, 4, 8)
    torchrun --standalone --nproc_per_node=8 bench/train_bench.py --ddp_only \\
        --loss_impl=fused --out bench/results/train_ddp_8.json

"baseline" is written out below on purpose (bf16 autocast, torch.compile, fused AdamW, SDPA
via model.py, data made on the GPU, one micro-batch per step): it is the yardstick. Our path
goes through train.py's pieces: TrainConfig, configure_optimizers, precision(),
attention_backend(), wrap_model(), the TrainBatches loader (a background thread, pinned
memory, non_blocking copies) and train_step(), which never reads the loss back to the host.

The sweep runs our path once per variant: loss_impl plain | fused (model.py's chunked
lm_head + cross-entropy), sdpa_backend auto | cudnn | ..., micro-batch 32 | 48 | 64, each with
gradient accumulation to the same --seqs_per_step (192 = 6 x 32 = 4 x 48 = 3 x 64), so every
variant's optimizer step sees the same tokens. Each variant compiles afresh
(torch.compiler.reset(): the kernels and the SDPA backend are fixed at trace time). "ours" is
the fastest variant, with its settings; "variants" has them all (tokens/s, MFU, peak memory,
first-step time incl. compile, top kernels with --profile). Variants left when
--time_budget runs out are listed under sweep.skipped, not run.
"""
from __future__ import annotations

import argparse
import copy
import datetime
import json
import logging
import math
import sys
import time
from contextlib import nullcontext
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from checkpoint import atomic_write_text  # noqa: E402
from configurator import ConfigError  # noqa: E402
from data import TrainBatches  # noqa: E402
from model import FUSED_LOSS_CHUNK_ROWS, GPT, GPTConfig  # noqa: E402
from train import (LOSS_IMPLS, SDPA_BACKENDS, TrainConfig, attention_backend, dist_setup,  # noqa: E402
                   get_lr, precision, train_step, wrap_model)

log = logging.getLogger("train_bench")

SHAPES = {  # model shape plus the default micro-batch
    "124M": dict(n_layer=12, n_head=12, n_embd=768, block_size=1024, batch_size=32, vocab_size=50304),
    "tiny": dict(n_layer=2, n_head=2, n_embd=64, block_size=64, batch_size=4, vocab_size=512),
}
# LOSS:SDPA:MICRO_BATCH, most telling first: the time budget cuts from the end.
SWEEPS = {
    "124M": ("plain:auto:32", "fused:auto:32", "fused:cudnn:32", "fused:auto:64", "fused:cudnn:64",
             "fused:auto:48", "plain:auto:64", "plain:cudnn:32"),
    # cudnn is unavailable on a CPU: the smoke run checks that it is reported, not fatal
    "tiny": ("plain:auto:4", "fused:auto:4", "fused:math:4", "fused:cudnn:4", "fused:auto:8",
             "fused:auto:6", "plain:auto:8"),
}
SEQS_PER_STEP = {"124M": 192, "tiny": 24}


class Timer:
    """Wall time of a stretch of device work: CUDA events on the GPU, perf_counter on the CPU."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"

    def start(self) -> None:
        if self.cuda:
            self.t0 = torch.cuda.Event(enable_timing=True)
            self.t0.record()
        else:
            self.t0 = time.perf_counter()

    def stop(self) -> float:
        if self.cuda:
            t1 = torch.cuda.Event(enable_timing=True)
            t1.record()
            t1.synchronize()
            return self.t0.elapsed_time(t1) / 1000.0
        # max(): the virtual machines this runs on in CI advance their clock in 4 ms ticks
        return max(time.perf_counter() - self.t0, 1e-9)


def model_config(shape: dict) -> GPTConfig:
    return GPTConfig(block_size=shape["block_size"], vocab_size=shape["vocab_size"],
                     n_layer=shape["n_layer"], n_head=shape["n_head"], n_embd=shape["n_embd"],
                     dropout=0.0)


def bench_baseline(shape: dict, device: torch.device, steps: int, warmup: int, dtype: str,
                   compile: bool) -> dict:
    """The plain nanoGPT loop, written out."""
    torch.manual_seed(0)
    model = GPT(model_config(shape)).to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=6e-4, betas=(0.9, 0.95), weight_decay=0.1,
                                  fused=device.type == "cuda")
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
    train_model = torch.compile(model) if compile else model
    ctx = torch.autocast(device.type, dtype=torch.bfloat16) if dtype == "bfloat16" else nullcontext()
    B, T = shape["batch_size"], shape["block_size"]
    data = torch.randint(0, shape["vocab_size"], (8, B, T + 1), device=device)  # (8, B, T+1)
    timer = Timer(device)
    for i in range(warmup + steps):
        if i == warmup:
            timer.start()
        batch = data[i % len(data)]
        with ctx:
            _, loss = train_model(batch[:, :-1], batch[:, 1:])
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    elapsed = timer.stop()
    tokens_per_s = steps * B * T / elapsed
    return {"tokens_per_s": tokens_per_s, "mfu": model.estimate_mfu(tokens_per_s, T),
            "final_loss": loss.item(),
            "shape": {**{k: shape[k] for k in ("n_layer", "n_head", "n_embd", "block_size", "batch_size")},
                      "grad_accum": 1}}


def top_kernels(prof, device: torch.device, steps: int, n: int = 10) -> list[dict]:
    """The n largest entries by self device time (CUDA kernels on the GPU), in ms per step."""
    cuda = device.type == "cuda"
    events = [e for e in prof.key_averages()
              if not cuda or e.device_type == torch.autograd.DeviceType.CUDA]
    key = (lambda e: e.self_device_time_total) if cuda else (lambda e: e.self_cpu_time_total)
    return [{"name": e.key[:80], "ms_per_step": round(key(e) / 1000 / steps, 3)}
            for e in sorted(events, key=key, reverse=True)[:n]]


def bench_ours(shape: dict, args: argparse.Namespace, steps: int, warmup: int, loss_impl: str,
               sdpa_backend: str, grad_accum: int, profile_steps: int = 0,
               loss_chunk_rows: int = FUSED_LOSS_CHUNK_ROWS) -> dict:
    """train.py's path: same model shape and random data, through the real loader and step.
    grad_accum is per rank; steps and warmup count optimizer steps (the first, which
    compiles, is always a warmup step)."""
    warmup = max(warmup, 1)
    cfg = TrainConfig(n_layer=shape["n_layer"], n_head=shape["n_head"], n_embd=shape["n_embd"],
                      block_size=shape["block_size"], batch_size=shape["batch_size"],
                      gradient_accumulation_steps=grad_accum * args.world_size, dropout=0.0,
                      fim_rate=0.0, device=args.device, dtype=args.dtype, compile=args.compile,
                      compile_mode=args.compile_mode, max_iters=warmup + steps, warmup_iters=10,
                      loss_impl=loss_impl, loss_chunk_rows=loss_chunk_rows, sdpa_backend=sdpa_backend)
    device = args.torch_device
    settings = {"loss_impl": loss_impl, "sdpa_backend": sdpa_backend, "batch_size": cfg.batch_size,
                "grad_accum": cfg.gradient_accumulation_steps,
                **({"loss_chunk_rows": loss_chunk_rows} if loss_impl == "fused" else {})}
    if args.compile:
        torch.compiler.reset()  # a fresh trace: the SDPA kernel is chosen when tracing
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    try:
        attention = attention_backend(cfg.sdpa_backend, device, cfg.dtype, cfg.n_embd // cfg.n_head)
    except ConfigError as e:
        return {"settings": settings, "error": str(e)}
    torch.manual_seed(cfg.seed)
    model = GPT(model_config(shape)).to(device)
    optimizer = model.configure_optimizers(cfg.weight_decay, cfg.learning_rate, (cfg.beta1, cfg.beta2),
                                           device.type)
    autocast, scaler = precision(device, cfg.dtype)
    train_model, _ = wrap_model(model, cfg, device, args.world_size)
    # Random tokens in host memory, read like the memmap: windows, pinning, async copies.
    tokens = np.random.default_rng(0).integers(0, shape["vocab_size"], size=4_000_000, dtype=np.int64)
    tokens = tokens.astype(np.uint16 if shape["vocab_size"] < 2**16 else np.uint32)
    loader = TrainBatches(tokens, block_size=cfg.block_size, batch_size=cfg.batch_size, seed=cfg.seed,
                          grad_accum=cfg.gradient_accumulation_steps, rank=args.rank,
                          world_size=args.world_size, device=device,
                          prefetch=cfg.prefetch if device.type == "cuda" else 0)

    def step(i: int) -> torch.Tensor:
        return train_step(train_model, optimizer, scaler, loader, autocast, cfg.grad_clip,
                          get_lr(i, cfg), attention)

    timer = Timer(device)
    profile = None
    try:
        t0 = time.perf_counter()
        loss = step(0)
        loss.item()  # the first step compiles: its time says what a variant costs to try
        first_step_s = time.perf_counter() - t0
        for i in range(1, warmup + steps):
            if i == warmup:
                if args.world_size > 1:
                    torch.distributed.barrier()
                timer.start()
            loss = step(i)
        elapsed = timer.stop()
        if profile_steps and args.rank == 0:
            # where a step's time goes: the top kernels by device time
            from torch.profiler import ProfilerActivity, profile as torch_profile
            acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
            with torch_profile(activities=acts) as prof:
                for i in range(profile_steps):
                    loss = step(i)
                if device.type == "cuda":
                    torch.cuda.synchronize()
            sort = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
            profile = {"top_kernels": top_kernels(prof, device, profile_steps),
                       "table": prof.key_averages().table(sort_by=sort, row_limit=25)}
    finally:
        loader.close()
    # global tokens: every rank does local_accum micro-batches of B x T per step
    tokens_per_s = steps * cfg.batch_size * cfg.block_size * cfg.gradient_accumulation_steps / elapsed
    result = {"settings": settings, "tokens_per_s": tokens_per_s,
              "mfu": model.estimate_mfu(tokens_per_s / args.world_size, cfg.block_size),
              "final_loss": loss.item(), "first_step_s": round(first_step_s, 1),
              "world_size": args.world_size, "compile_mode": cfg.compile_mode if cfg.compile else None,
              "shape": {"n_layer": cfg.n_layer, "n_head": cfg.n_head, "n_embd": cfg.n_embd,
                        "block_size": cfg.block_size, "batch_size": cfg.batch_size,
                        "grad_accum": cfg.gradient_accumulation_steps}}
    if device.type == "cuda":
        result["peak_memory_gib"] = round(torch.cuda.max_memory_allocated(device) / 2**30, 2)
    if profile:
        result[f"profile_{profile_steps}_steps"] = profile
    return result


def parse_variant(text: str, seqs_per_step: int) -> tuple[str, str, int, int, int]:
    """'fused:cudnn:64[:8192]' -> (loss_impl, sdpa_backend, micro_batch, grad_accum, chunk_rows)."""
    parts = text.split(":")
    if (len(parts) not in (3, 4) or parts[0] not in LOSS_IMPLS or parts[1] not in SDPA_BACKENDS
            or not all(n.isdigit() and int(n) > 0 for n in parts[2:])):
        raise ValueError(f"variant {text!r} is not LOSS:SDPA:BATCH[:CHUNK_ROWS] with LOSS in "
                         f"{LOSS_IMPLS}, SDPA in {SDPA_BACKENDS}")
    batch = int(parts[2])
    chunk_rows = int(parts[3]) if len(parts) == 4 else FUSED_LOSS_CHUNK_ROWS
    if seqs_per_step % batch:
        raise ValueError(f"variant {text!r}: micro-batch {batch} does not divide seqs_per_step {seqs_per_step}")
    return parts[0], parts[1], batch, seqs_per_step // batch, chunk_rows


def run_sweep(shape: dict, args: argparse.Namespace, variants: list[str], started: float) -> dict:
    """Our path once per variant, within args.time_budget seconds of `started`."""
    rows, skipped, longest = [], [], 0.0
    for name in variants:
        loss_impl, sdpa, batch, accum, chunk_rows = parse_variant(name, args.seqs_per_step)
        spent = time.perf_counter() - started
        if spent + longest > args.time_budget:
            skipped.append(name)
            continue
        # steps count optimizer steps; each has `accum` micro-batches: time about the same
        # number of micro-batches as the baseline
        steps = math.ceil(args.micro_steps / accum)
        warmup = math.ceil(args.warmup_micro_steps / accum)
        t0 = time.perf_counter()
        try:
            r = bench_ours({**shape, "batch_size": batch}, args, steps, warmup, loss_impl, sdpa, accum,
                           profile_steps=1 if args.profile else 0, loss_chunk_rows=chunk_rows)
        except torch.OutOfMemoryError:
            r = {"settings": {"loss_impl": loss_impl, "sdpa_backend": sdpa, "batch_size": batch,
                              "grad_accum": accum}, "error": "out of memory"}
        longest = max(longest, time.perf_counter() - t0)
        rows.append({"name": name, **r, "wall_s": round(time.perf_counter() - t0, 1)})
        if "error" in r:
            log.info("%-16s skipped: %s", name, r["error"])
        else:
            log.info("%-16s %10.0f tok/s  mfu %5.1f%%  first step %.1f s", name, r["tokens_per_s"],
                     100 * r["mfu"], r["first_step_s"])
    return {"variants": rows, "skipped": skipped}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--shape", choices=tuple(SHAPES), default="124M")
    p.add_argument("--smoke", action="store_true",
                   help="CPU end-to-end check: tiny shape, cpu, float32, no compile (unless --compile), a few steps")
    p.add_argument("--steps", type=int, default=30, help="timed steps of the baseline (after warmup)")
    p.add_argument("--warmup", type=int, default=None, help="untimed baseline steps (default 10 on CUDA, 1 on CPU)")
    p.add_argument("--batch_size", type=int, default=None, help="baseline micro-batch (default: the shape's)")
    p.add_argument("--block_size", type=int, default=None)
    p.add_argument("--device", default="auto", help="cpu | cuda | auto")
    p.add_argument("--dtype", default=None, help="default bfloat16 on CUDA, float32 on CPU")
    p.add_argument("--compile", type=lambda s: s.lower() in ("1", "true", "yes"), default=None,
                   help="torch.compile (default: on for CUDA)")
    p.add_argument("--compile_mode", default="default")
    p.add_argument("--variants", default=None,
                   help="comma-separated LOSS:SDPA:BATCH[:CHUNK_ROWS] (default: the shape's sweep)")
    p.add_argument("--seqs_per_step", type=int, default=None,
                   help="sequences per optimizer step of every variant (default 192; tiny 24)")
    p.add_argument("--micro_steps", type=int, default=36, help="timed micro-batches per variant")
    p.add_argument("--warmup_micro_steps", type=int, default=None,
                   help="untimed micro-batches per variant, the compile included (default: --warmup)")
    p.add_argument("--time_budget", type=float, default=420.0,
                   help="seconds: no variant starts that the longest one so far would push past it")
    p.add_argument("--ddp_only", action="store_true", help="measure only our path (under torchrun)")
    p.add_argument("--loss_impl", choices=LOSS_IMPLS, default="fused", help="--ddp_only: loss")
    p.add_argument("--sdpa_backend", choices=SDPA_BACKENDS, default="auto", help="--ddp_only: SDPA")
    p.add_argument("--grad_accum", type=int, default=1, help="--ddp_only: micro-steps per step, per rank")
    p.add_argument("--profile", action="store_true", help="profile one step of each variant")
    p.add_argument("--out", default=None, help="write the JSON here")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    started = time.perf_counter()
    if args.smoke:
        args.shape, args.device, args.dtype = "tiny", "cpu", args.dtype or "float32"
        args.compile = False if args.compile is None else args.compile
        args.steps, args.micro_steps = min(args.steps, 3), min(args.micro_steps, 6)

    args.rank, _, args.world_size, args.torch_device = dist_setup(args.device)
    device = args.torch_device
    args.device = str(device) if args.world_size == 1 else device.type  # TrainConfig wants a string
    cuda = device.type == "cuda"
    args.dtype = args.dtype or ("bfloat16" if cuda else "float32")
    args.compile = cuda if args.compile is None else args.compile
    warmup = args.warmup if args.warmup is not None else (10 if cuda else 1)
    if args.warmup_micro_steps is None:
        args.warmup_micro_steps = warmup
    args.seqs_per_step = args.seqs_per_step or SEQS_PER_STEP[args.shape]
    shape = dict(SHAPES[args.shape])
    if args.batch_size:
        shape["batch_size"] = args.batch_size
    if args.block_size:
        shape["block_size"] = args.block_size
    variants = args.variants.split(",") if args.variants else list(SWEEPS[args.shape])
    try:
        for name in variants:
            parse_variant(name, args.seqs_per_step)
    except ValueError as e:
        p.error(str(e))

    result = {"device": torch.cuda.get_device_name(device) if cuda else "cpu",
              "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
              "command": " ".join(sys.argv), "torch": torch.__version__, "dtype": args.dtype,
              "steps": args.steps, "warmup": warmup, "peak_flops": 989e12}
    try:
        if args.ddp_only:
            result["ours"] = bench_ours(shape, args, args.steps, warmup, args.loss_impl, args.sdpa_backend,
                                        args.grad_accum, profile_steps=3 if args.profile else 0)
        else:
            result["baseline"] = bench_baseline(shape, device, args.steps, warmup, args.dtype, args.compile)
            log.info("baseline: %.0f tok/s", result["baseline"]["tokens_per_s"])
            sweep = run_sweep(shape, args, variants, started)
            ok = [v for v in sweep["variants"] if "error" not in v]
            if ok:
                best = max(ok, key=lambda v: v["tokens_per_s"])
                result["ours"] = copy.deepcopy({k: v for k, v in best.items() if k != "wall_s"})
            # per variant only the top kernels: the full table is kept for "ours"
            for v in sweep["variants"]:
                v.get("profile_1_steps", {}).pop("table", None)
            result["variants"] = sweep["variants"]
            result["sweep"] = {"seqs_per_step": args.seqs_per_step,
                               "tokens_per_step": args.seqs_per_step * shape["block_size"],
                               "micro_steps": args.micro_steps, "warmup_micro_steps": args.warmup_micro_steps,
                               "time_budget_s": args.time_budget, "skipped": sweep["skipped"],
                               "total_s": round(time.perf_counter() - started, 1)}
    finally:
        if args.world_size > 1:
            torch.distributed.destroy_process_group()
    if args.rank != 0:
        return 0
    if "error" in result.get("ours", {}):
        log.error("train_bench.py: error: %s", result["ours"]["error"])
        return 2
    if "ours" in result:
        result["target"] = {"mfu>=0.45": {"measured": round(result["ours"]["mfu"], 4),
                                          "met": result["ours"]["mfu"] >= 0.45}}
    rows = [(name, result[name]) for name in ("baseline", "ours") if name in result]
    log.info("%-9s %12s %8s  %s", "path", "tokens/s", "MFU", "shape")
    for name, r in rows:
        s = r["shape"]
        extra = ""
        if name == "ours":
            extra = f" loss {r['settings']['loss_impl']}, sdpa {r['settings']['sdpa_backend']}"
            extra += f" on {args.world_size} ranks" if args.world_size > 1 else ""
        log.info("%-9s %12.0f %7.1f%%  L%d H%d C%d T%d B%d x%d%s", name, r["tokens_per_s"], 100 * r["mfu"],
                 s["n_layer"], s["n_head"], s["n_embd"], s["block_size"], s["batch_size"], s["grad_accum"],
                 extra)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(args.out, json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
