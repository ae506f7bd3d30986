"""Why is int8 weight-only slow at batch 16? Time one Linear's variants on the GPU.

    python bench/int8_matmul.py --out bench/results/int8_matmul_h100.json

For GPT-2 124M/774M layer shapes and M = 1, 16 rows: bf16 F.linear; our int8_linear compiled
with dynamic shapes (what WeightOnlyInt8Linear ran); compiled for static shapes; and
dequantise-then-cuBLAS; and decode_kernels.py's Triton kernel (what the engine now runs for 1-16
rows, autotuned on its first call). Times are per call inside a CUDA graph (triton's do_bench_cudagraph),
so launch overhead is excluded and the kernels alone are compared. The coordinate-descent
variant is gpt-fast's setting (inductor tunes each generated kernel's block sizes).
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import decode_kernels  # noqa: E402
from quantization import int8_linear  # noqa: E402

SHAPES = {"124M c_attn": (768, 2304), "124M attn c_proj": (768, 768), "124M c_fc": (768, 3072),
          "124M mlp c_proj": (3072, 768), "124M lm_head": (768, 50304),
          "774M c_attn": (1280, 3840), "774M attn c_proj": (1280, 1280), "774M c_fc": (1280, 5120),
          "774M mlp c_proj": (5120, 1280), "774M lm_head": (1280, 50304)}


def dequant_then_mm(x, q, s, b):
    return F.linear(x, q.to(x.dtype) * s.to(x.dtype)[:, None], b)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="bench/results/int8_matmul_h100.json")
    ap.add_argument("--variants", default=None, help="comma-separated subset of the variants (default all)")
    args = ap.parse_args()
    from triton.testing import do_bench_cudagraph

    torch.manual_seed(0)
    torch._dynamo.config.cache_size_limit = 256  # one compile per shape and variant
    dev, dtype = "cuda", torch.bfloat16
    variants = {
        "bf16_linear": lambda x, w, q, s, b: F.linear(x, w, b),
        "int8_compiled_dynamic": (lambda f: lambda x, w, q, s, b: f(x, q, s, b))(torch.compile(int8_linear, dynamic=True)),
        "int8_compiled_static": (lambda f: lambda x, w, q, s, b: f(x, q, s, b))(torch.compile(int8_linear, dynamic=False)),
        "int8_compiled_static_coordinate_descent": (lambda f: lambda x, w, q, s, b: f(x, q, s, b))(
            torch.compile(int8_linear, dynamic=False, options={"coordinate_descent_tuning": True})),
        "int8_dequant_then_cublas": lambda x, w, q, s, b: dequant_then_mm(x, q, s, b),
        "int8_triton": lambda x, w, q, s, b: decode_kernels.linear(x, q, b, scales=s),  # what the engine runs
    }
    if args.variants:
        variants = {k: variants[k] for k in args.variants.split(",")}
    rows = []
    for name, (k, n) in SHAPES.items():
        w = torch.randn(n, k, device=dev, dtype=dtype) * 0.02
        s = (w.float().abs().amax(dim=1) / 127).to(dtype)
        q = (w.float() / s.float()[:, None]).round().clamp(-127, 127).to(torch.int8)
        b = torch.zeros(n, device=dev, dtype=dtype)
        for m in (1, 16):
            x = torch.randn(m, k, device=dev, dtype=dtype)
            row = {"layer": name, "in": k, "out": n, "rows": m}
            for vname, fn in variants.items():
                for _ in range(3):
                    fn(x, w, q, s, b)
                row[vname + "_us"] = round(do_bench_cudagraph(lambda: fn(x, w, q, s, b), rep=50) * 1000, 2)
            if "int8_triton" in variants:  # the kernel against the plain formula, relative max error
                want = dequant_then_mm(x, q, s, b).float()
                got = decode_kernels.linear(x, q, b, scales=s).float()
                row["int8_triton_rel_err"] = float((got - want).abs().max() / want.abs().max())
            row["bf16_weight_read_us_at_3TBps"] = round(n * k * 2 / 3.0e12 * 1e6, 2)
            rows.append(row)
            print(json.dumps(row), flush=True)
    out = {"device": torch.cuda.get_device_name(), "date": dt.date.today().isoformat(),
           "command": "python " + " ".join(sys.argv), "torch": torch.__version__, "rows": rows}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=2) + "\n")


if __name__ == "__main__":
    main()
