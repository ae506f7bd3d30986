"""Training throughput: a plain nanoGPT-style loop against train.py's own path, in one run.

Both train the same GPT-2 shape on random tokens and are timed after warmup (CUDA events on
the GPU, so the clock stops when the GPU is done, not when the host has queued the work).
MFU = (6N + 12*L*H*Q*T) * tokens/s / 989 TFLOP/s (H100 SXM bf16 dense), per GPU.

    # H100, GPT-2 124M, batch 32 x 1024 (the comparison the project reports)
    python bench/train_bench.py --out bench/results/training_h100.json
    python bench/train_bench.py --compile_mode=max-autotune-no-cudagraphs --out /tmp/t.json
    # CPU smoke test of both code paths
    python bench/train_bench.py --shape tiny --device cpu --steps 3 --out /tmp/train_bench.json
    # DDP scaling: only our path, global tokens/s from rank 0 (run for N = 1, 2, 4, 8)
    torchrun --standalone --nproc_per_node=8 bench/train_bench.py --ddp_only \\
        --out bench/results/train_ddp_8.json

"baseline" is written out below on purpose (bf16 autocast, torch.compile, fused AdamW, SDPA
via model.py, data made on the GPU): it is the yardstick. "ours" goes through train.py's
pieces: TrainConfig, configure_optimizers, precision(), wrap_model(), the TrainBatches loader
(a background thread, pinned memory, non_blocking copies) and train_step(), which never
reads the loss back to the host.
"""
from __future__ import annotations

import argparse
import datetime
import json
import logging
import sys
import time
from contextlib import nullcontext
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from checkpoint import atomic_write_text  # noqa: E402
from data import TrainBatches  # noqa: E402
from model import GPT, GPTConfig  # noqa: E402
from train import TrainConfig, dist_setup, get_lr, precision, train_step, wrap_model  # noqa: E402

log = logging.getLogger("train_bench")

SHAPES = {  # model shape plus the default micro-batch
    "124M": dict(n_layer=12, n_head=12, n_embd=768, block_size=1024, batch_size=32, vocab_size=50304),
    "tiny": dict(n_layer=2, n_head=2, n_embd=64, block_size=64, batch_size=4, vocab_size=512),
}


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
        return time.perf_counter() - self.t0


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


def bench_ours(shape: dict, args: argparse.Namespace, steps: int, warmup: int) -> dict:
    """train.py's path: same model shape and random data, through the real loader and step."""
    cfg = TrainConfig(n_layer=shape["n_layer"], n_head=shape["n_head"], n_embd=shape["n_embd"],
                      block_size=shape["block_size"], batch_size=shape["batch_size"],
                      gradient_accumulation_steps=args.grad_accum * args.world_size, dropout=0.0,
                      fim_rate=0.0, device=args.device, dtype=args.dtype, compile=args.compile,
                      compile_mode=args.compile_mode, max_iters=warmup + steps, warmup_iters=10)
    device = args.torch_device
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
    timer = Timer(device)
    for i in range(warmup + steps):
        if i == warmup:
            if args.world_size > 1:
                torch.distributed.barrier()
            timer.start()
        loss = train_step(train_model, optimizer, scaler, loader, autocast, cfg.grad_clip, get_lr(i, cfg))
    elapsed = timer.stop()
    profile = None
    if args.profile and args.rank == 0:
        # where a step's time goes: the top kernels by device time over 3 steps
        from torch.profiler import ProfilerActivity, profile as torch_profile
        acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
        with torch_profile(activities=acts) as prof:
            for i in range(3):
                loss = train_step(train_model, optimizer, scaler, loader, autocast, cfg.grad_clip,
                                  get_lr(i, cfg))
            if device.type == "cuda":
                torch.cuda.synchronize()
        sort = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
        profile = prof.key_averages().table(sort_by=sort, row_limit=25)
    loader.close()
    # global tokens: every rank does local_accum micro-batches of B x T per step
    tokens_per_s = steps * cfg.batch_size * cfg.block_size * cfg.gradient_accumulation_steps / elapsed
    return {"tokens_per_s": tokens_per_s,
            "mfu": model.estimate_mfu(tokens_per_s / args.world_size, cfg.block_size),
            "final_loss": loss.item(), "world_size": args.world_size,
            "compile_mode": cfg.compile_mode if cfg.compile else None,
            **({"profile_3_steps": profile} if profile else {}),
            "shape": {"n_layer": cfg.n_layer, "n_head": cfg.n_head, "n_embd": cfg.n_embd,
                      "block_size": cfg.block_size, "batch_size": cfg.batch_size,
                      "grad_accum": cfg.gradient_accumulation_steps}}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--shape", choices=tuple(SHAPES), default="124M")
    p.add_argument("--steps", type=int, default=30, help="timed steps (after warmup)")
    p.add_argument("--warmup", type=int, default=None, help="untimed steps (default 10 on CUDA, 1 on CPU)")
    p.add_argument("--batch_size", type=int, default=None, help="micro-batch (default: the shape's)")
    p.add_argument("--block_size", type=int, default=None)
    p.add_argument("--grad_accum", type=int, default=1, help="micro-steps per optimizer step, per rank")
    p.add_argument("--device", default="auto", help="cpu | cuda | auto")
    p.add_argument("--dtype", default=None, help="default bfloat16 on CUDA, float32 on CPU")
    p.add_argument("--compile", type=lambda s: s.lower() in ("1", "true", "yes"), default=None,
                   help="torch.compile (default: on for CUDA)")
    p.add_argument("--compile_mode", default="default")
    p.add_argument("--ddp_only", action="store_true", help="measure only our path (under torchrun)")
    p.add_argument("--profile", action="store_true", help="add a profile of 3 steps of our path")
    p.add_argument("--out", default=None, help="write the JSON here")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")

    args.rank, _, args.world_size, args.torch_device = dist_setup(args.device)
    device = args.torch_device
    args.device = str(device) if args.world_size == 1 else device.type  # TrainConfig wants a string
    cuda = device.type == "cuda"
    args.dtype = args.dtype or ("bfloat16" if cuda else "float32")
    args.compile = cuda if args.compile is None else args.compile
    warmup = args.warmup if args.warmup is not None else (10 if cuda else 1)
    shape = dict(SHAPES[args.shape])
    if args.batch_size:
        shape["batch_size"] = args.batch_size
    if args.block_size:
        shape["block_size"] = args.block_size

    result = {"device": torch.cuda.get_device_name(device) if cuda else "cpu",
              "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
              "command": " ".join(sys.argv), "torch": torch.__version__, "dtype": args.dtype,
              "steps": args.steps, "warmup": warmup, "peak_flops": 989e12}
    try:
        if not args.ddp_only:
            result["baseline"] = bench_baseline(shape, device, args.steps, warmup, args.dtype, args.compile)
            log.info("baseline: %.0f tok/s", result["baseline"]["tokens_per_s"])
            if cuda:
                torch.cuda.empty_cache()
        result["ours"] = bench_ours(shape, args, args.steps, warmup)
    finally:
        if args.world_size > 1:
            torch.distributed.destroy_process_group()
    if args.rank != 0:
        return 0
    rows = [(name, result[name]) for name in ("baseline", "ours") if name in result]
    log.info("%-9s %12s %8s  %s", "path", "tokens/s", "MFU", "shape")
    for name, r in rows:
        s = r["shape"]
        log.info("%-9s %12.0f %7.1f%%  L%d H%d C%d T%d B%d x%d%s", name, r["tokens_per_s"], 100 * r["mfu"],
                 s["n_layer"], s["n_head"], s["n_embd"], s["block_size"], s["batch_size"], s["grad_accum"],
                 f" on {args.world_size} ranks" if name == "ours" and args.world_size > 1 else "")
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(args.out, json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
