"""Tune decode_kernels' one-row matmul block sizes inside a whole captured decode step.

    python bench/tune_decode.py --shapes 124M,355M,774M --out bench/results/decode_tuning_h100.json \
        --table decode_kernels_tuned.json

Triton's autotuner times each kernel alone, launched on its own; in the engine's step the
kernels run back to back with programmatic dependent launch (each one reads its weights while
the one before still runs), so the block sizes fastest alone need not be fastest there, and
the autotuner's pick moves between processes with its timing noise. Here, for each GPT-2
shape in bf16 and int8 weight-only at batch 1 (GPT.decode_step, 10 steps per CUDA graph, 100
positions in):
1. autotuned: the step with the autotuner's picks;
2. coordinate descent: for each of the step's matmuls (qkv, attention projection, fc, fc
   projection, lm_head), every candidate config, the others held, the fastest step kept;
3. the autotuned and the tuned step timed again, interleaved, --repeats times each.
--table merges the picks into a tuned table (decode_kernels.TUNED_PATH's format) under this
GPU's name, where the engine finds them.

--int8-converts half,half_offset tunes int8 once per DECODE_INT8_CONVERT and then times the
conversions' tuned steps side by side, interleaved (int8_convert_side_by_side); the table takes
the first one's picks.
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

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import decode_kernels  # noqa: E402
from model import GPT, GPTConfig  # noqa: E402
from quantization import quantize_model  # noqa: E402

from decode_kernels_bench import graph_us  # noqa: E402  (bench/, the script's own folder)

SHAPES = {"124M": (12, 12, 768), "355M": (24, 16, 1024), "774M": (36, 20, 1280)}  # layers, heads, width
STEPS_PER_GRAPH = 10


def decode_inputs(model: GPT, batch: int, generator: torch.Generator | None = None
                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(tokens, pos, cache) for `batch` rows of model's decode step, every row 100 positions in
    a random bf16 cache of 257 positions."""
    cfg = model.config
    D = cfg.n_embd // cfg.n_head
    cache = torch.randn(cfg.n_layer, 2, batch, cfg.n_head, 257, D, device="cuda", dtype=torch.bfloat16,
                        generator=generator)
    tokens = torch.randint(0, cfg.vocab_size, (batch,), device="cuda", generator=generator)
    return tokens, torch.full((batch,), 100, device="cuda"), cache


def step_us(model: GPT, tokens: torch.Tensor, pos: torch.Tensor, cache: torch.Tensor, replays: int) -> float:
    """GPU microseconds per decode step, STEPS_PER_GRAPH steps captured in one graph (the
    first, outside the capture, compiles a config not yet used)."""
    with torch.no_grad():
        return graph_us(lambda i: model.decode_step(tokens, pos, cache, 128, write_kv=True),
                        calls=STEPS_PER_GRAPH, replays=replays)


def autotuned_picks() -> dict[str, dict[str, int]]:
    """The autotuner's cached picks by tuned-table key (its cache key starts N, K, then the
    flags in decode_kernels._KEY order, then INT8_BITS)."""
    picks = {}
    for key, config in decode_kernels._gemv_kernel.cache.items():
        N, K, scales, ln, gelu, residual, kv = key[:7]
        name = decode_kernels.gemv_key(N, K, int8=bool(scales), ln=bool(ln), gelu=bool(gelu),
                                       residual=bool(residual), kv=bool(kv))
        picks[name] = dict(config.kwargs, num_warps=config.num_warps)
    return picks


def tune(name: str, weights: str, model: GPT, args: argparse.Namespace) -> dict:
    tokens, pos, cache = decode_inputs(model, 1)
    table = decode_kernels.tuned_table(tokens.device)
    table.clear()
    decode_kernels._gemv_kernel.cache.clear()
    start = time.perf_counter()
    autotuned_us = step_us(model, tokens, pos, cache, args.replays)
    picks = autotuned_picks()
    table.update(picks)  # the descent starts from the autotuner's picks
    best_us = step_us(model, tokens, pos, cache, args.replays)
    kernels = []
    for key, chosen in picks.items():
        K = int(key.split("_")[1][1:])
        tried = {}
        for config in decode_kernels.gemv_candidates(K):
            table[key] = config
            try:
                us = step_us(model, tokens, pos, cache, args.replays)
            except Exception as e:  # a config past the SM's registers or shared memory: skipped
                print(f"[{name} {weights}] {key} {config}: {type(e).__name__}: {str(e)[:200]}", flush=True)
                continue
            tried[json.dumps(config)] = us
            if us < best_us:
                best_us, chosen = us, config
        table[key] = chosen
        kernels.append({"key": key, "autotuned": picks[key], "tuned": chosen,
                        "step_us_by_config": {c: round(us, 2) for c, us in tried.items()}})
        print(f"[{name} {weights}] {key}: autotuned {picks[key]} -> {chosen}, step {best_us:.1f} us", flush=True)
    tuned = dict(table)
    # side by side, interleaved: the autotuner's picks (table off) against the tuned ones
    runs: dict[str, list[float]] = {"autotuned": [], "tuned": []}
    for _ in range(args.repeats):
        decode_kernels.USE_TUNED = False
        runs["autotuned"].append(round(step_us(model, tokens, pos, cache, args.replays), 2))
        decode_kernels.USE_TUNED = True
        runs["tuned"].append(round(step_us(model, tokens, pos, cache, args.replays), 2))
    with torch.no_grad():  # the tuned step computes what the autotuned one does (up to summation order)
        decode_kernels.USE_TUNED = False
        want = model.decode_step(tokens, pos, cache, 128, write_kv=True)[0].float()
        decode_kernels.USE_TUNED = True
        got = model.decode_step(tokens, pos, cache, 128, write_kv=True)[0].float()
    err = ((got - want).abs().max() / want.abs().max()).item()
    if not err < 2e-2:
        raise SystemExit(f"[{name} {weights}] tuned logits differ from autotuned ones: relative error {err:.3g}")
    row = {"shape": name, "weights": weights, "batch": 1, "positions": 100, "tuned_vs_autotuned_rel_err": err,
           "autotuned_us_per_step": runs["autotuned"], "tuned_us_per_step": runs["tuned"],
           "speedup": round(statistics.median(runs["autotuned"]) / statistics.median(runs["tuned"]), 3),
           "first_autotuned_us_per_step": round(autotuned_us, 2), "seconds": round(time.perf_counter() - start, 1),
           "kernels": kernels, "table": tuned}
    print(json.dumps({k: v for k, v in row.items() if k not in ("kernels", "table")}), flush=True)
    return row


def side_by_side(name: str, model: GPT, rows: list[dict], args: argparse.Namespace) -> dict:
    """The int8 conversions' tuned steps timed in turn, --repeats rounds: each with its own
    picks, so what differs between them is the conversion (and what it made the tuner pick)."""
    tokens, pos, cache = decode_inputs(model, 1)
    table = decode_kernels.tuned_table(tokens.device)
    times: dict[str, list[float]] = {row["int8_convert"]: [] for row in rows}
    for _ in range(args.repeats):
        for row in rows:
            decode_kernels.INT8_CONVERT = row["int8_convert"]
            table.clear()
            table.update(row["table"])
            times[row["int8_convert"]].append(round(step_us(model, tokens, pos, cache, args.replays), 2))
    first = rows[0]["int8_convert"]
    result = {"shape": name, "us_per_step": times,
              f"speedup_vs_{first}": {c: round(min(times[first]) / min(t), 3) for c, t in times.items()}}
    print(json.dumps(result), flush=True)
    return result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--shapes", default="124M,355M,774M")
    ap.add_argument("--weights", default="bf16,int8", help="bf16 and/or int8 (int8 weight-only)")
    ap.add_argument("--replays", type=int, default=20, help="graph replays per timing")
    ap.add_argument("--repeats", type=int, default=5, help="autotuned/tuned timings, interleaved, at the end")
    ap.add_argument("--out", default="bench/results/decode_tuning_h100.json")
    ap.add_argument("--table", default=None, help="merge the picks into this tuned table (JSON)")
    ap.add_argument("--int8-converts", default=decode_kernels.INT8_CONVERT,
                    help="int8 conversions to tune and compare (comma-separated; the first one's picks go "
                         f"into --table): {', '.join(decode_kernels.INT8_CONVERTS)}")
    args = ap.parse_args()
    converts = args.int8_converts.split(",")
    unknown = sorted(set(converts) - set(decode_kernels.INT8_CONVERTS))
    if unknown:
        raise SystemExit(f"--int8-converts: unknown {', '.join(unknown)}; choose from "
                         f"{', '.join(decode_kernels.INT8_CONVERTS)}")
    if not (torch.cuda.is_available() and decode_kernels.available()):
        raise SystemExit("tune_decode.py needs a CUDA GPU and Triton")
    device = torch.cuda.get_device_name()
    result = {"device": device, "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
              "command": "python " + " ".join(sys.argv), "torch": torch.__version__, "rows": []}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    merged: dict[str, dict[str, int]] = {}
    for name in args.shapes.split(","):
        n_layer, n_head, n_embd = SHAPES[name]
        torch.manual_seed(0)
        with torch.device("cuda"):
            model = GPT(GPTConfig(n_layer=n_layer, n_head=n_head, n_embd=n_embd, vocab_size=50304, block_size=1024))
        model = model.to(torch.bfloat16).eval()
        for weights in args.weights.split(","):
            m = model if weights == "bf16" else quantize_model(model, "int8-weight-only")[0].cuda().to(torch.bfloat16)
            rows = []
            for convert in converts if weights == "int8" else [None]:
                if convert:
                    decode_kernels.INT8_CONVERT = convert
                row = tune(name, weights, m.eval(), args)
                if convert:
                    row["int8_convert"] = convert
                rows.append(row)
                result["rows"].append(row)
                out.write_text(json.dumps(result, indent=2) + "\n")  # each row as it ends
            merged.update(rows[0]["table"])
            if len(rows) > 1:
                result.setdefault("int8_convert_side_by_side", []).append(side_by_side(name, m, rows, args))
                out.write_text(json.dumps(result, indent=2) + "\n")
            decode_kernels.INT8_CONVERT = converts[0]
            if args.table:
                write_table(Path(args.table), device, merged, result)
            del m
        del model
        torch.cuda.empty_cache()


def write_table(path: Path, device: str, picks: dict[str, dict[str, int]], result: dict) -> None:
    """decode_kernels.TUNED_PATH's table with this GPU's picks merged in, written to path."""
    existing = json.loads(decode_kernels.TUNED_PATH.read_text()) if decode_kernels.TUNED_PATH.exists() else {}
    devices = existing.get("devices", {})
    entry = devices.get(device, {"gemv": {}})
    entry["gemv"] = dict(sorted({**entry["gemv"], **picks}.items()))
    # a run that tunes some shapes keeps the others' picks, so the runs before it stay named
    earlier = entry.get("earlier_runs", [])
    if "command" in entry and entry["date"] != result["date"]:
        earlier.append({"date": entry["date"], "command": entry["command"]})
    entry.update(date=result["date"], command=result["command"], earlier_runs=earlier)
    devices[device] = entry
    path.write_text(json.dumps({"devices": dict(sorted(devices.items()))}, indent=1) + "\n")
    decode_kernels.load_tuned(path)  # the table it wrote loads


if __name__ == "__main__":
    main()
