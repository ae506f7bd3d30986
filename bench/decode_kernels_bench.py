"""decode_kernels.py's kernels one at a time on a GPU, inside CUDA graphs as the engine runs them.

    python bench/decode_kernels_bench.py --out bench/results/decode_kernels_h200.json

GPT-2 124M shapes in bf16. Each measurement captures back-to-back calls in one CUDA graph and
replays it, so a call's time includes the in-graph launch gap but not the host:
- linear: the five matmuls of a decode step (LayerNorm + QKV, attention projection +
  residual, LayerNorm + fc + GELU, fc projection + residual, LayerNorm + lm_head) at 1 and
  16 rows, the Triton kernel against the same math in torch ops (cuBLAS + elementwise). Each
  call reads its own copy of the weight, 150+ MB in all, so weights come from HBM as in a
  real step (the same weight 20 times over would sit in the H200's 50 MB L2);
- attention: every (block_t, num_warps) candidate at batch 1, 16, 128 and 256 with each row
  100 positions in (and 1,000 at batch 1);
- step: a whole decode step (GPT.decode_step, eager, 10 steps per graph) at batch 1 and 16:
  the new K/V returned or stored by the qkv kernel, and stored with programmatic dependent
  launch (STEP_VARIANTS), side by side.
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import sys
from pathlib import Path

import torch
from torch.nn import functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import decode_kernels  # noqa: E402
from model import GPT, GPTConfig  # noqa: E402

C, H, D, V = 768, 12, 64, 50304
ATTENTION_CANDIDATES = [(32, 2), (64, 2), (64, 4), (128, 4), (128, 8), (256, 8)]


def graph_us(fn, calls: int = 20, replays: int = 50) -> float:
    """Microseconds per call of fn(i), i in range(calls), captured in one CUDA graph."""
    fn(0)  # autotune and compile outside the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for i in range(calls):
            fn(i)
    graph.replay()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(replays):
        graph.replay()
    end.record()
    torch.cuda.synchronize()
    return round(start.elapsed_time(end) * 1000 / (replays * calls), 2)


def linear_rows(rows: int) -> list[dict]:
    bf = dict(device="cuda", dtype=torch.bfloat16)
    g, b = torch.randn(C, **bf), torch.randn(C, **bf)
    out = []
    for name, n, k, ln, gelu, residual, bias in (("ln_1+c_attn", 3 * C, C, True, False, False, True),
                                                  ("attn.c_proj+residual", C, C, False, False, True, True),
                                                  ("ln_2+c_fc+gelu", 4 * C, C, True, True, False, True),
                                                  ("mlp.c_proj+residual", C, 4 * C, False, False, True, True),
                                                  ("ln_f+lm_head", V, C, True, False, False, False)):
        copies = min(64, -(-150 * 2 ** 20 // (n * k * 2)))  # >= 150 MB of weights in all
        x, ws = torch.randn(rows, k, **bf), [torch.randn(n, k, **bf) * 0.02 for _ in range(copies)]
        bb = torch.randn(n, **bf) if bias else None
        r = torch.randn(rows, n, **bf) if residual else None

        def triton_fn(i):
            return decode_kernels.linear(x, ws[i], bb, ln_weight=g if ln else None, ln_bias=b if ln else None,
                                         gelu=gelu, residual=r)

        def torch_fn(i):
            y = F.linear(F.layer_norm(x, (k,), g, b) if ln else x, ws[i], bb)
            y = F.gelu(y, approximate="tanh") if gelu else y
            return y + r if residual else y

        out.append({"layer": name, "rows": rows, "N": n, "K": k, "weight_mb": round(n * k * 2 / 1e6, 2),
                    "triton_us": graph_us(triton_fn, copies), "torch_ops_us": graph_us(torch_fn, copies)})
    return out


def attention_rows() -> list[dict]:
    out = []
    for B, n in ((1, 100), (1, 1000), (16, 100), (128, 100), (256, 100)):
        cache = torch.randn(1, 2, B, H, 1024, D, device="cuda", dtype=torch.bfloat16)
        qkv = torch.randn(B, 3 * C, device="cuda", dtype=torch.bfloat16)
        pos = torch.full((B,), n, device="cuda")
        row = {"batch": B, "positions": n, "kv_mb": round(B * H * n * D * 2 * 2 / 1e6, 2)}
        for block_t, warps in ATTENTION_CANDIDATES:
            row[f"t{block_t}_w{warps}_us"] = graph_us(
                lambda i: decode_kernels.attention(qkv, cache, 0, pos, H, block_t=block_t, num_warps=warps))
        out.append(row)
    return out


# (name, DECODE_PDL, write_kv): the new K/V returned stacked (as before) or stored by the qkv
# kernel (the engine's way), without and with programmatic dependent launch for one row
STEP_VARIANTS = [("kv_returned", "0", False), ("kv_stored", "0", True), ("kv_stored_pdl", "auto", True)]


def step_rows() -> list[dict]:
    model = GPT(GPTConfig()).cuda().to(torch.bfloat16).eval()
    cache = torch.randn(12, 2, 17, H, 257, D, device="cuda", dtype=torch.bfloat16)
    out = []
    for B in (1, 16):
        tokens = torch.randint(0, V, (B,), device="cuda")
        pos = torch.full((B,), 100, device="cuda")
        row = {"batch": B, "positions": 100}
        for name, pdl, write_kv in STEP_VARIANTS * 2:  # twice, interleaved: drift shows as a spread
            decode_kernels.PDL = pdl
            with torch.no_grad():
                us = graph_us(lambda i: model.decode_step(tokens, pos, cache, 128, write_kv=write_kv), calls=10)
            row.setdefault(f"{name}_us_per_step", []).append(us)
        out.append(row)
    decode_kernels.PDL = "auto"
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default="bench/results/decode_kernels_h200.json")
    args = ap.parse_args()
    torch.manual_seed(0)
    result = {"device": torch.cuda.get_device_name(),
              "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
              "command": "python " + " ".join(sys.argv), "torch": torch.__version__,
              "step": step_rows(), "linear": linear_rows(1) + linear_rows(16),
              "attention": attention_rows()}
    print(json.dumps(result, indent=1))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
