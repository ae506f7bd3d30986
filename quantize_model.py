"""Quantize a trained checkpoint, behind a perplexity gate, and report size, quality and speed.

    # CPU serving (torch.ao dynamic int8): writes out-code-assistant-int8-dynamic/
    python quantize_model.py --ckpt out-code-assistant --mode int8-dynamic
    # GPU serving (int8 weights, dequantized inside the matmul)
    python quantize_model.py --ckpt out-code-assistant --mode int8-weight-only
    # 4-bit, group-wise: usually refused by the gate on small models; --force writes it anyway
    python quantize_model.py --ckpt out-code-assistant --mode int4-weight-only --group-size 64

    MODEL_PATH=out-code-assistant-int8-dynamic python serve_api.py   # loads like any checkpoint
    python sample.py --ckpt out-code-assistant-int8-dynamic

Options: --out DIR (default: `<ckpt>-<mode>`, a sibling of the float directory, e.g.
out-code-assistant-int8-dynamic), --data-dir (default: the dataset the checkpoint was trained
on, else data/stdlib), --max-ppl-increase PERCENT (default 2.0), --force, --no-bench.

The quality gate: perplexity on val.bin over fixed windows before and after (and evaluate.py's
next-line exact match, when it exists). If perplexity rises by more than --max-ppl-increase
percent nothing is written and the exit code is 3, unless --force. The output directory gets
model.safetensors (int8/int4 tensors + scales; meta["quantization"] names the mode), meta.json,
the tokenizer, and quantization_report.json (also printed as a table).

Exit codes: 0 written, 2 bad input (missing/corrupt checkpoint, unknown mode, no data), 3 refused
by the gate.
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import logging
import sys
from pathlib import Path
from typing import Any

import torch

import checkpoint
from benchmark_quantization import format_table, load_model_for_bench, measure_speed, ratio
from data import DataError, open_tokens, read_data_meta
from quantization import (DEFAULT_GROUP_SIZE, MODES, QuantizationError, perplexity,
                          quantization_meta, quantize_model)

log = logging.getLogger("quantize_model")

EXIT_BAD_INPUT = 2
EXIT_GATE = 3
REPORT_FILE = "quantization_report.json"
EXACT_MATCH_FILES = 20  # held-out files the exact-match lines are drawn from


def default_out(ckpt: str | Path, mode: str) -> Path:
    ckpt = Path(ckpt)
    return ckpt.parent / f"{ckpt.name}-{mode}"


def _next_line_exact_match(models: dict[str, torch.nn.Module], ckpt: Path, meta: dict[str, Any],
                           data_dir: Path, n: int) -> dict[str, float] | None:
    """evaluate.py's next-line exact match per model on the held-out files, or None where that
    can't be had (evaluate.py absent, no val_files.json, no tokenizer in the checkpoint)."""
    try:
        from evaluate import held_out_files, next_line_exact_match, read_texts
    except ImportError:
        return None
    from tokenizer import TokenizerError, load_tokenizer

    try:
        texts = read_texts(held_out_files(meta, None, str(data_dir)), EXACT_MATCH_FILES, 0)
        tokenizer = load_tokenizer(ckpt)
    except (FileNotFoundError, TokenizerError) as e:
        log.warning("next-line exact match skipped: %s", e)
        return None
    if not texts:
        return None
    return {name: float(next_line_exact_match(m, tokenizer, texts, n)) for name, m in models.items()}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--ckpt", required=True, help="float model directory (model.safetensors)")
    p.add_argument("--mode", required=True, help=" | ".join(MODES))  # checked by hand: one-line error
    p.add_argument("--group-size", type=int, default=DEFAULT_GROUP_SIZE, help="int4 group size")
    p.add_argument("--out", default=None, help="output directory (default: <ckpt>-<mode>)")
    p.add_argument("--data-dir", default=None, help="dataset with val.bin for the perplexity gate")
    p.add_argument("--max-ppl-increase", type=float, default=2.0, help="percent")
    p.add_argument("--force", action="store_true", help="write even if the gate fails")
    p.add_argument("--ppl-windows", type=int, default=32, help="val windows for perplexity")
    p.add_argument("--ppl-block", type=int, default=256, help="window length (capped at block_size)")
    p.add_argument("--exact-match-n", type=int, default=50, help="samples for next-line exact match")
    p.add_argument("--bench-tokens", type=int, default=32, help="tokens per speed run")
    p.add_argument("--bench-runs", type=int, default=3)
    p.add_argument("--no-bench", action="store_true", help="skip the speed measurement")
    return p.parse_args(argv)


def run(args: argparse.Namespace) -> int:
    if args.mode not in MODES:
        raise QuantizationError(f"unknown mode {args.mode!r} (choose from {', '.join(MODES)})")
    ckpt = Path(args.ckpt)
    out = Path(args.out) if args.out else default_out(ckpt, args.mode)
    if out.resolve() == ckpt.resolve():
        raise QuantizationError(f"--out {out} is the float checkpoint itself")
    state, meta = checkpoint.load_state(ckpt)
    if meta.get("quantization"):
        raise QuantizationError(f"{ckpt} is already quantized ({meta['quantization'].get('mode')})")
    model = checkpoint.build_model(state, meta).eval()
    del state
    data_dir = Path(args.data_dir or (meta.get("config") or {}).get("data_dir") or "data/stdlib")
    val = open_tokens(data_dir, "val", read_data_meta(data_dir))
    block = min(args.ppl_block, model.config.block_size)

    qmodel, qstate = quantize_model(model, args.mode, args.group_size, source=str(ckpt))
    ppl_before = perplexity(model, val, block, args.ppl_windows)
    ppl_after = perplexity(qmodel, val, block, args.ppl_windows)
    increase = (ppl_after / ppl_before - 1.0) * 100.0
    exact = _next_line_exact_match({"before": model, "after": qmodel}, ckpt, meta, data_dir,
                                   args.exact_match_n)
    em_before, em_after = (exact["before"], exact["after"]) if exact else (None, None)
    passed = increase <= args.max_ppl_increase
    if not passed and not args.force:
        print(f"refused: {args.mode} raises perplexity {ppl_before:.3f} -> {ppl_after:.3f} "
              f"(+{increase:.2f}% > {args.max_ppl_increase}%); nothing written (--force to write anyway)",
              file=sys.stderr)
        return EXIT_GATE
    if not passed:
        log.warning("gate failed (+%.2f%%) but --force: writing %s", increase, out)

    qmeta = {k: v for k, v in meta.items() if k != "format"}
    qmeta["quantization"] = {**quantization_meta(args.mode, args.group_size, str(ckpt)),
                             "ppl_before": ppl_before, "ppl_after": ppl_after}
    checkpoint.save_model(out, qstate, qmeta, tokenizer_dir=ckpt)
    size_before = (ckpt / checkpoint.MODEL_FILE).stat().st_size / 1e6
    size_after = (out / checkpoint.MODEL_FILE).stat().st_size / 1e6

    report: dict[str, Any] = {
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "command": " ".join(["python", "quantize_model.py", *sys.argv[1:]]),
        "source": str(ckpt), "out": str(out), "mode": args.mode,
        "group_size": args.group_size if args.mode == "int4-weight-only" else None,
        "size_mb": {"before": size_before, "after": size_after},
        "perplexity": {"before": ppl_before, "after": ppl_after, "increase_pct": increase,
                       "max_increase_pct": args.max_ppl_increase, "passed": passed,
                       "windows": args.ppl_windows, "block": block, "data_dir": str(data_dir)},
        "next_line_exact_match": {"before": em_before, "after": em_after},
        "notes": ("size: model.safetensors bytes. The quantized file stores the tied wte/lm_head "
                  "matrix once, as lm_head's int8 rows; the float embedding is dequantized from "
                  "them at load (so it is float again in memory)."),
    }
    rows = [("size on disk, MB", f"{size_before:.2f}", f"{size_after:.2f}", ratio(size_before, size_after)),
            ("perplexity (val)", f"{ppl_before:.3f}", f"{ppl_after:.3f}", f"{increase:+.2f}%")]
    if em_before is not None:
        rows.append(("next-line exact match", f"{em_before:.3f}", f"{em_after:.3f}", ""))
    if not args.no_bench:
        # the quantized model measured is the one read back from the file just written
        loaded, _ = load_model_for_bench(out)
        speed = measure_speed({"before": model, "after": loaded}, args.bench_tokens, args.bench_runs)
        before, after = speed["before"], speed["after"]
        report["speed"] = {"before": before, "after": after, "device": "cpu",
                           "threads": torch.get_num_threads()}
        rows += [("decode ms/token, batch 1", f"{before['ms_per_token_b1']:.2f}",
                  f"{after['ms_per_token_b1']:.2f}",
                  ratio(before["ms_per_token_b1"], after["ms_per_token_b1"])),
                 ("tokens/s, batch 16", f"{before['tokens_per_s_b16']:.1f}",
                  f"{after['tokens_per_s_b16']:.1f}",
                  ratio(after["tokens_per_s_b16"], before["tokens_per_s_b16"]))]
    checkpoint.atomic_write_text(out / REPORT_FILE, json.dumps(report, indent=2) + "\n")
    print(format_table(rows, ("", "fp32", args.mode, "change")))
    print(f"wrote {out} ({REPORT_FILE} beside it)")
    return 0


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        return run(args)
    except (checkpoint.CheckpointError, QuantizationError, DataError) as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_BAD_INPUT


if __name__ == "__main__":
    sys.exit(main())
