"""A decode step's GPU time by batch size: decode_kernels' fused matmuls against cuBLAS.

    python bench/decode_rows.py --out bench/results/decode_rows_h100.json

Up to decode_kernels.KERNEL_ROWS rows a layer is five kernels (LayerNorm, bias, GELU,
residual and the K/V store fused into the matmuls); above it the matmuls go to cuBLAS with
their LayerNorms, GELU and residual adds and one K/V scatter for the whole step as separate
kernels. For each GPT-2 shape, in bf16 and int8 weight-only, and each batch size, the step
(GPT.decode_step, 10 steps per CUDA graph, every row 100 positions in) is timed with the
matmuls above 16 rows on cuBLAS ("cublas") and on the kernels ("kernels"), twice, interleaved,
and the two steps' logits compared.
At batch 1 it also times the one-row matmul on the tensor-core tile ("one_row_dot",
DECODE_ONE_ROW=dot) against the GEMV. With --plot, a PNG of the step time against batch size.
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import decode_kernels  # noqa: E402
from model import GPT, GPTConfig  # noqa: E402
from quantization import quantize_model  # noqa: E402

from tune_decode import SHAPES, STEPS_PER_GRAPH, decode_inputs, step_us  # noqa: E402  (bench/, the script's own folder)


def use(kernel_rows: int, int8_kernel_rows: int, one_row: str) -> None:
    """Matmuls up to kernel_rows rows (int8: int8_kernel_rows) on the kernels; one_row: the one-row kernel."""
    decode_kernels.KERNEL_ROWS, decode_kernels.INT8_KERNEL_ROWS = kernel_rows, int8_kernel_rows
    decode_kernels.ONE_ROW = one_row


def logits(model: GPT, batch: int) -> torch.Tensor:
    tokens, pos, cache = decode_inputs(model, batch, torch.Generator("cuda").manual_seed(batch))
    with torch.no_grad():
        return model.decode_step(tokens, pos, cache, 128, write_kv=True)[0].float()


def measure(model: GPT, batches: list[int], replays: int) -> list[dict]:
    rows = []
    defaults = decode_kernels.KERNEL_ROWS, decode_kernels.INT8_KERNEL_ROWS, decode_kernels.ONE_ROW
    small, large = decode_kernels.MAX_ROWS, max(batches)
    for batch in batches:
        row = {"batch": batch}
        variants = [("cublas", small, small, "gemv"), ("kernels", large, large, "gemv")]
        if batch == 1:  # both equal at one row; the one-row kernel choice instead
            variants = [("gemv", 1, 1, "gemv"), ("one_row_dot", 1, 1, "dot")]
        for name, *setting in variants * 2:
            use(*setting)
            row.setdefault(f"{name}_us", []).append(step_us(model, *decode_inputs(model, batch), replays))
        for name, *_ in variants:
            row[f"{name}_us_min"] = min(row[f"{name}_us"])
        first, second = variants[0][0], variants[1][0]
        row["speedup"] = round(row[f"{first}_us_min"] / row[f"{second}_us_min"], 3)
        use(*variants[0][1:])
        want = logits(model, batch)
        use(*variants[1][1:])
        row["logits_rel_err"] = round(((logits(model, batch) - want).abs().max() / want.abs().max()).item(), 5)
        print(json.dumps(row), flush=True)
        rows.append(row)
    use(*defaults)
    return rows


def plot(result: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for run in result["runs"]:
        rows = [r for r in run["rows"] if r["batch"] > 1]
        for name, style in (("cublas", "--"), ("kernels", "-")):
            ax.plot([r["batch"] for r in rows], [r[f"{name}_us_min"] for r in rows], style, marker="o",
                    label=f"{run['shape']} {run['weights']} {name}")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("batch (rows per step)")
    ax.set_ylabel("GPU us per decode step")
    ax.set_title(f"decode step above 16 rows: fused kernels vs cuBLAS\n{result['device']}", fontsize=10)
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--shapes", default="124M,355M")
    ap.add_argument("--weights", default="bf16,int8")
    ap.add_argument("--batches", default="1,16,32,64,128,256")
    ap.add_argument("--replays", type=int, default=30)
    ap.add_argument("--out", default="bench/results/decode_rows_h100.json")
    ap.add_argument("--plot", default="", help="PNG path")
    args = ap.parse_args()
    torch.manual_seed(0)
    batches = [int(b) for b in args.batches.split(",")]
    result = {"device": torch.cuda.get_device_name(),
              "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
              "command": "python " + " ".join(sys.argv), "torch": torch.__version__,
              "positions": 100, "steps_per_graph": STEPS_PER_GRAPH, "runs": []}
    for shape in args.shapes.split(","):
        n_layer, n_head, n_embd = SHAPES[shape]
        with torch.device("cuda"):
            model = GPT(GPTConfig(n_layer=n_layer, n_head=n_head, n_embd=n_embd, vocab_size=50304, block_size=1024))
        model = model.to(torch.bfloat16).eval()
        for weights in args.weights.split(","):
            start = time.perf_counter()
            m = model if weights == "bf16" else quantize_model(model, "int8-weight-only")[0].cuda().to(torch.bfloat16)
            print(f"== {shape} {weights}", flush=True)
            rows = measure(m.eval(), batches, args.replays)
            result["runs"].append({"shape": shape, "weights": weights, "rows": rows,
                                   "seconds": round(time.perf_counter() - start, 1)})
            Path(args.out).parent.mkdir(parents=True, exist_ok=True)
            Path(args.out).write_text(json.dumps(result, indent=2) + "\n")  # each run as it ends
            del m
        del model
        torch.cuda.empty_cache()
    if args.plot:
        plot(result, Path(args.plot))


if __name__ == "__main__":
    main()
