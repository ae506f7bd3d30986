"""Decode speed of a float checkpoint against its quantized copy, through engine.Engine.

    python benchmark_quantization.py --ckpt out-code-assistant \\
        --quantized out-code-assistant-int8-dynamic [--tokens 32] [--runs 3] [--batch 16]
    python benchmark_quantization.py --ckpt A --quantized B --device cuda --dtype bfloat16

Speed only (quantize_model.py adds size and perplexity). Both models run through the same
Engine with greedy sampling after a warmup; each figure is the median of --runs runs:
    ms/token at batch 1   decode only: from the request's first token (after prefill) to its
                          last, over N - 1 tokens, by the engine's own timestamps
    tokens/s at batch 16  N tokens for each of 16 prompts submitted together, prefill included
"""
from __future__ import annotations

import argparse
import logging
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn as nn

from checkpoint import CheckpointError, build_model, load_state
from engine import Engine, SamplingParams

log = logging.getLogger(__name__)


def load_model_for_bench(directory: str | Path, device: str = "cpu",
                         dtype: torch.dtype | None = None) -> tuple[nn.Module, dict[str, Any]]:
    """(model, meta) float or quantized, without the tokenizer (prompts here are token ids)."""
    state, meta = load_state(directory)
    if meta.get("quantization"):
        from quantization import build_quantized_model
        model = build_quantized_model(state, meta)
        # int8-dynamic runs torch.ao's fp32 kernels: only the weight-only modes take a dtype
        if dtype is not None and meta["quantization"]["mode"] != "int8-dynamic":
            model = model.to(dtype=dtype)
    else:
        model = build_model(state, meta)
        if dtype is not None:
            model = model.to(dtype=dtype)
    return model.to(device).eval(), meta


def _seconds(fn: Callable[[], Any]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def _decode_ms_per_token(engine: Engine, prompt: list[int], params: SamplingParams) -> float:
    """One request's decode time per token, from the engine's own timestamps (first token,
    i.e. after prefill, to finish), so prefill never counts and one run gives one sample."""
    req = engine.submit(prompt, params)
    while not req.finished:
        engine.step()
    if req.finish_reason != "length":
        raise RuntimeError(f"benchmark request ended with {req.finish_reason}: {req.error}")
    return (req.finish_time - req.first_token_time) / (len(req.tokens) - 1) * 1000


def measure_speed(models: dict[str, nn.Module], tokens: int = 32, runs: int = 3, batch: int = 16,
                  prompt_len: int = 16) -> dict[str, dict[str, float]]:
    """Per model name: ms_per_token_b1 (median), ms_per_token_b1_min, tokens_per_s_b1 and
    tokens_per_s_b<batch> (median).

    The models' runs are interleaved (run 1 of each, then run 2 of each, ...), so a noisy
    neighbour on a shared machine slows all of them alike and the ratios stay fair."""
    if tokens < 2:
        raise ValueError("tokens must be >= 2 (decode time starts after the first token)")
    greedy = SamplingParams(max_tokens=tokens, temperature=0.0)
    engines, prompts = {}, {}
    for name, model in models.items():
        vocab = model.config.vocab_size
        # a small length bucket keeps the KV cache (and the CUDA graphs) to what is measured
        max_seq_len = min(model.config.block_size, prompt_len + tokens + 1)
        engines[name] = engine = Engine(model, max_batch=batch, max_seq_len=max_seq_len)
        engine.warmup(max_seq_len)
        prompts[name] = [[(17 * row + 7 * i + 1) % vocab for i in range(prompt_len)]
                         for row in range(batch)]
        # untimed: first-call allocations and caches, both paths
        engine.generate(prompts[name][0], greedy)
        engine.generate_batch(prompts[name], greedy)
    decode: dict[str, list[float]] = {n: [] for n in models}
    batched: dict[str, list[float]] = {n: [] for n in models}
    for _ in range(runs):
        for name, engine in engines.items():
            p = prompts[name]
            decode[name].append(_decode_ms_per_token(engine, p[0], greedy))
            batched[name].append(_seconds(lambda: engine.generate_batch(p, greedy)))
    out = {}
    for name in models:
        ms = max(statistics.median(decode[name]), 1e-6)  # a virtual machine's clock can stall
        out[name] = {"ms_per_token_b1": ms, "ms_per_token_b1_min": min(decode[name]),
                     "tokens_per_s_b1": 1000.0 / ms,
                     f"tokens_per_s_b{batch}": batch * tokens / max(statistics.median(batched[name]), 1e-9)}
    return out


def format_table(rows: list[tuple[str, ...]], header: tuple[str, ...]) -> str:
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    line = lambda r: "  ".join(str(c).rjust(w) if i else str(c).ljust(w)  # noqa: E731
                               for i, (c, w) in enumerate(zip(r, widths)))
    return "\n".join([line(header), line(tuple("-" * w for w in widths)), *map(line, rows)])


def ratio(before: float, after: float) -> str:
    return f"{before / after:.2f}x" if after else "-"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--ckpt", required=True, help="the float model directory")
    p.add_argument("--quantized", required=True, help="the quantized model directory")
    p.add_argument("--tokens", type=int, default=32)
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"])
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    dtype = getattr(torch, args.dtype) if args.dtype else None
    try:
        models = {label: load_model_for_bench(directory, args.device, dtype)[0]
                  for label, directory in (("float", args.ckpt), ("quantized", args.quantized))}
    except CheckpointError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    results = measure_speed(models, args.tokens, args.runs, args.batch)
    f, q = results["float"], results["quantized"]
    key = f"tokens_per_s_b{args.batch}"
    print(format_table([
        ("decode ms/token, batch 1", f"{f['ms_per_token_b1']:.2f}", f"{q['ms_per_token_b1']:.2f}",
         ratio(f["ms_per_token_b1"], q["ms_per_token_b1"])),
        (f"tokens/s, batch {args.batch}", f"{f[key]:.1f}", f"{q[key]:.1f}", ratio(q[key], f[key])),
    ], ("", "float", "quantized", "speed-up")))
    return 0


if __name__ == "__main__":
    sys.exit(main())
