"""Triton kernels for the decode step (1-16 rows per matmul), so a step is few kernels.

At batch 1 a GPT-2 124M decode step read ~0.25 GB of weights in ~0.06 ms on an H200, yet
took ~0.5 ms: ~190 kernels of a few microseconds each (cuBLAS GEMVs and their split-K
reduces, LayerNorms, bias and GELU pointwise kernels, the attention's batched GEMVs, mask,
softmax and concatenation). Per layer, the kernels here make it five (on the H200, 200 -> 80
kernels and 566 -> 401 us per step at batch 1, bench/results/decode_variants_h200.json; with
the K/V stored by the qkv kernel, PDL and the engine's fused pick, 66 kernels and 195 us,
decode_variants_triton_h200.json):

    linear:     y = [residual +] act(LN(x) @ W.T * scales + bias)   x (M, K), W (N, K), M small
                (LayerNorm on the way in, bias / GELU / residual on the way out; W bf16 or
                int8 with per-row scales, read once, converted in registers). For the
                attention's qkv it can also store the new keys and values into the cache.
    attention:  one new token per row against its cached keys and values plus itself, as one
                online softmax (cache positions below pos[b] only: the new ones come from qkv)

Why int8 needs its own kernel too: in the compiled step (dynamic batch size) Inductor turned
`F.linear(x, q.to(bf16)) * scales` into a kernel that writes the whole weight in bf16 and
cuBLAS's GEMV that reads it back, more bytes than bf16 (bench/results/quantization_h100.json,
previous_run_2026_11_25).

They are custom ops (`code_assistant::decode_linear`, `decode_qkv`, which declares that it
writes the cache, and `decode_attention`), so torch.compile keeps each as one opaque call in
the compiled step and CUDA graphs capture them like any kernel. The linear's block sizes are
autotuned per shape on first use, which the engine's warm-up runs before it captures a graph.
Above 16 rows the kernel tiles the rows too; it serves int8 weights up to 256 rows (see
KERNEL_ROWS). Larger inputs (long prefills) are compute-bound and stay on cuBLAS;
`linear_module` falls back to the same math in torch ops.

Tried and dropped: fusing the attention with its projection, and the MLP's two matmuls, into
one kernel each (split-K over heads / hidden units, partial rows summed with atomics). Each
took twice the time of the two kernels it replaced (bench/results/decode_split_k_h200.json).
And, at batch 1, the attention inside the qkv kernel (the program storing the last of a head's
q, k and v columns counted in with an atomic and ran that head's attention): 54 kernels per
step instead of 66, but 233 against 213 us on an H100, the heads' attention serialised at the
kernel's tail (bench/results/decode_variants_attend_h100.json, code of commit f619460).
And one row on the tensor cores (the 16-row tl.dot tile, 15 rows masked, DECODE_ONE_ROW=dot):
0.52-0.68x of the GEMV's step, worst for int8 (bench/results/decode_rows_h100.json).

Without Triton (the CPU build of torch) `available()` is False and callers use torch ops;
the tests run the kernels on the CPU through Triton's interpreter (TRITON_INTERPRET=1),
where the launchers below accept CPU tensors, and compile them for sm_90 without a GPU.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from torch import nn
from torch.nn import functional as F

try:
    import triton
    import triton.language as tl
except ImportError:  # torch's CPU wheels ship without Triton
    triton = None

MAX_ROWS = 16  # rows of one tl.dot tile: the small kernel's limit
# Up to KERNEL_ROWS rows (INT8_KERNEL_ROWS for int8 weights) the matmuls run here, above on
# cuBLAS (int8: quantization.int8_linear). From 17 rows the kernel tiles M as well (_MM_CONFIGS,
# autotuned per row count: the engine's batch buckets are powers of two). Measured on an H100
# (bench/results/decode_rows_h100.json, step at 32-256 rows): bf16 0.78-0.92x of cuBLAS's step
# (its split-K keeps 132 SMs busy on these small matmuls, with separate LayerNorm, GELU and
# residual kernels), so bf16 stays there; int8 1.3-1.9x of int8_linear's (which writes the
# weight in bf16 for cuBLAS to read back). DECODE_KERNEL_ROWS / DECODE_INT8_KERNEL_ROWS override.
KERNEL_ROWS = int(os.environ.get("DECODE_KERNEL_ROWS", str(MAX_ROWS)))
INT8_KERNEL_ROWS = int(os.environ.get("DECODE_INT8_KERNEL_ROWS", "256"))
# One row: "gemv" (default) the CUDA-core kernel below, "dot" the tensor-core tile of 16 rows
# with 15 of them masked (bench/decode_rows.py measures both).
ONE_ROW = os.environ.get("DECODE_ONE_ROW", "gemv")
if ONE_ROW not in ("gemv", "dot"):
    raise ValueError(f"DECODE_ONE_ROW must be gemv or dot, got {ONE_ROW!r}")
WIDE_N = 16384  # float matmuls with more outputs than this take cuBLAS from 2 rows on
# Triton's interpreter (CPU tests) has no GPU to autotune on: there the launcher takes the
# block sizes from its caller, which runs every config in turn.
INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
# Programmatic dependent launch (Hopper and later): each kernel may start while the one before
# it still runs, reads its weights (which nothing writes) and only then waits for the earlier
# kernel's outputs, so a step's launches overlap their start-up. DECODE_PDL: "auto" (default)
# for one-row kernels on compute capability 9+, "1" for every kernel, "0" never. On an H200
# it took a batch-1 step from 257-280 to 244 us (bench/results/decode_kernels_h200.json,
# step) but, on every kernel, a batch-16 one from 423 to 437 us (decode_kernels_pdl_h200.json).
PDL = os.environ.get("DECODE_PDL", "auto")
if PDL not in ("auto", "0", "1"):
    raise ValueError(f"DECODE_PDL must be auto, 0 or 1, got {PDL!r}")
# How the one-row kernel turns int8 weights into fp32 in registers. "half" (default): two
# weights per instruction through fp16, in inline PTX; "bits": through their bit pattern, with
# full-rate integer and float ops (_weight_fp32); "cvt": the int-to-float conversion
# instruction, which Hopper runs at a quarter of the FMA rate. In the compiled sm_90 K loop
# (bench/int8_convert_sass.py) "half" issues 4.82 instructions per weight against "bits" 5.84
# (bf16: 3.98 per weight, 1.99 per byte); on an H100 it took a tuned int8 batch-1 step from
# 383 to 348 us (355M) and 716 to 689 us (774M) (bench/results/int8_convert_h100.json).
# "half_offset": "half" without its two f16x2 subtractions per four weights; the products
# keep the weights' offset of 1152 and the kernel takes 1152 * sum(x) off once per output.
# Not yet timed on a GPU, so opt-in.
INT8_CONVERTS = ("half", "bits", "cvt", "half_offset")
INT8_CONVERT = os.environ.get("DECODE_INT8_CONVERT", "half")
if INT8_CONVERT not in INT8_CONVERTS:
    raise ValueError(f"DECODE_INT8_CONVERT must be one of {', '.join(INT8_CONVERTS)}, got {INT8_CONVERT!r}")
CVT, BITS, HALF, HALF_OPS, HALF_OFFSET, HALF_OFFSET_OPS = range(6)  # _weight_fp32's INT8_BITS
HALF_BASE = 1152.0  # fp16 0x6400 | (w ^ 0x80) is 1024 + (w + 128): w + HALF_BASE, exactly


def int8_convert_mode(convert: str) -> int:
    """INT8_BITS for an INT8_CONVERT name; the interpreter can't run PTX, so "half" and
    "half_offset" run there as the same arithmetic in plain ops."""
    return {"cvt": CVT, "bits": BITS, "half": HALF_OPS if INTERPRET else HALF,
            "half_offset": HALF_OFFSET_OPS if INTERPRET else HALF_OFFSET}[convert]


# The one-row kernel's block sizes tuned inside a whole captured decode step, per GPU model
# (bench/tune_decode.py): the autotuner times each kernel alone, where it can't see what PDL
# overlaps in a real step, and its pick moves from process to process with timing noise. A
# matmul found in the table for the GPU launches with that entry; any other is autotuned.
# DECODE_TUNED=0 ignores the table.
TUNED_PATH = Path(__file__).with_name("decode_kernels_tuned.json")
USE_TUNED = os.environ.get("DECODE_TUNED", "1") != "0"
_tuned: dict[str, dict[str, dict[str, int]]] | None = None  # GPU name -> gemv_key -> config
_device_names: dict[int, str] = {}


def available() -> bool:
    return triton is not None


def supports(x: torch.Tensor) -> bool:
    """Whether the kernels can run on x: Triton with a GPU in bf16/fp16 (fp32 on a GPU would
    make tl.dot round to tf32), or the interpreter on the CPU (the tests, fp32 included)."""
    if triton is None:
        return False
    if INTERPRET:
        return not x.is_cuda
    return x.is_cuda and x.dtype in (torch.bfloat16, torch.float16)


if triton is not None:
    # Batch 1 is a GEMV: each program owns BLOCK_N output columns and walks K, so the weight is
    # read once in total. Small BLOCK_N gives the 768-wide layers enough programs for 132 SMs.
    _GEMV_CONFIGS = [triton.Config({"BLOCK_N": n, "BLOCK_K": k}, num_warps=w)
                     for n, k, w in ((4, 256, 2), (4, 512, 4), (8, 256, 4), (8, 512, 4),
                                     (16, 256, 4), (16, 512, 8), (32, 128, 4), (32, 256, 8),
                                     # whole 768-wide rows per load: more bytes in flight per
                                     # program, for weights that come from HBM, not L2
                                     (2, 1024, 4), (4, 1024, 4), (8, 1024, 8), (4, 2048, 8),
                                     # whole rows of the MLP's projection (K = 3072-5120) in one
                                     # load: with PDL all of a program's weight is requested before
                                     # the wait, none after it
                                     (2, 2048, 4), (2, 4096, 8), (4, 4096, 8), (2, 8192, 8),
                                     # 8-16 KB of int8 per load, for int8's half-size rows
                                     (32, 512, 8), (16, 1024, 8), (8, 2048, 8))]
    # 2-16 rows: one tl.dot tile of 16 rows (the rows past M masked), so the tensor cores do
    # the multiply and the weight tile is still read once for all rows.
    _SMALL_MM_CONFIGS = [triton.Config({"BLOCK_N": n, "BLOCK_K": k}, num_warps=w)
                         for n, k, w in ((16, 128, 4), (16, 256, 4), (32, 128, 4), (32, 256, 4),
                                         (64, 128, 4), (64, 256, 8), (16, 512, 4), (32, 512, 8))]
    # 17-256 rows: tiles of BLOCK_M rows, the weight tile read once per row tile (from L2 after
    # the first), software-pipelined over K like a plain matmul.
    _MM_CONFIGS = [triton.Config({"BLOCK_M": m, "BLOCK_N": n, "BLOCK_K": k}, num_warps=w, num_stages=s)
                   for m, n, k, w, s in ((32, 32, 128, 4, 4), (32, 64, 128, 4, 4), (32, 128, 64, 4, 4),
                                         (64, 32, 128, 4, 4), (64, 64, 64, 4, 4), (64, 64, 128, 8, 3),
                                         (64, 128, 64, 8, 3), (128, 64, 64, 8, 3))]
    _KEY = ["N", "K", "HAS_SCALES", "HAS_LN", "GELU", "HAS_RESIDUAL", "KV_OUT", "USE_PDL"]
    # for the kernels
    _BITS, _HALF, _HALF_OPS = tl.constexpr(BITS), tl.constexpr(HALF), tl.constexpr(HALF_OPS)
    _HALF_OFFSET, _HALF_OFFSET_OPS = tl.constexpr(HALF_OFFSET), tl.constexpr(HALF_OFFSET_OPS)
    _HALF_BASE = tl.constexpr(HALF_BASE)

    def _half_ptx(subtract: bool) -> str:
        """PTX for four int8 weights (one b32, $4) into four fp32 ($0-$3): each byte w ^ 0x80
        as the low byte of the half 0x64XX, 1024 + w + 128 = w + HALF_BASE, exact; with
        `subtract` two f16x2 subtractions of HALF_BASE leave w itself."""
        sub = """
                mov.b32 c, 0x64806480;
                sub.rn.f16x2 lo, lo, c;
                sub.rn.f16x2 hi, hi, c;""" if subtract else ""
        return """{
                .reg .b32 t, lo, hi, c;
                .reg .b16 h0, h1, h2, h3;
                xor.b32 t, $4, 0x80808080;
                prmt.b32 lo, t, 0x64646464, 0x4140;
                prmt.b32 hi, t, 0x64646464, 0x4342;""" + sub + """
                mov.b32 {h0, h1}, lo;
                mov.b32 {h2, h3}, hi;
                cvt.f32.f16 $0, h0;
                cvt.f32.f16 $1, h1;
                cvt.f32.f16 $2, h2;
                cvt.f32.f16 $3, h3;
                }"""

    _HALF_PTX, _HALF_OFFSET_PTX = tl.constexpr(_half_ptx(True)), tl.constexpr(_half_ptx(False))

    @triton.jit
    def _ptx_weights_fp32(w, ASM: tl.constexpr):
        return tl.inline_asm_elementwise(asm=ASM, constraints="=r,=r,=r,=r,r", args=[w], dtype=tl.float32,
                                         is_pure=True, pack=4)

    @triton.jit
    def _weight_fp32(w, INT8_BITS: tl.constexpr):
        """A weight tile in fp32 (INT8_BITS: the int8 conversion, see INT8_CONVERT).
        BITS: w + 128 as the low byte of the float 2^23 is exactly the float 2^23 + w + 128, so
        an xor, an or and a subtraction replace the int-to-float conversion (quarter rate on
        Hopper). HALF: the same through fp16 (w + 128 as the low byte of the half 1024 is
        1024 + w + 128, exact), which packs two weights per instruction: per four weights one
        xor, two byte permutes and two f16x2 subtractions in PTX, then four half-to-float
        conversions (HALF_OPS: the same arithmetic in plain ops, what the interpreter runs).
        HALF_OFFSET (and its twin HALF_OFFSET_OPS): HALF without the subtractions, so each
        value is w + HALF_BASE; the caller takes HALF_BASE * x off the products (_gemv_kernel).
        The tl.dot kernel needs none of this: Triton converts int8 to bf16 without it."""
        if INT8_BITS == _HALF:
            return _ptx_weights_fp32(w, _HALF_PTX)
        elif INT8_BITS == _HALF_OFFSET:
            return _ptx_weights_fp32(w, _HALF_OFFSET_PTX)
        elif INT8_BITS == _HALF_OPS or INT8_BITS == _HALF_OFFSET_OPS:
            half = ((w.to(tl.uint8, bitcast=True) ^ 0x80).to(tl.uint16) | 0x6400).to(tl.float16, bitcast=True)
            if INT8_BITS == _HALF_OPS:
                half = half - _HALF_BASE
            return half.to(tl.float32)
        elif INT8_BITS == _BITS:
            bits = (w.to(tl.uint8, bitcast=True).to(tl.uint32) ^ 0x80) | 0x4B000000
            return bits.to(tl.float32, bitcast=True) - 8388736.0
        else:
            return w.to(tl.float32)

    @triton.jit
    def _row_stats(x_ptr, offs_m, m_mask, K, eps, HAS_LN: tl.constexpr, BLOCK_K: tl.constexpr):
        """LayerNorm's mean and 1/std of rows offs_m of x (M, K) in fp32 (zeros without HAS_LN),
        in one pass that sums x and x^2 elementwise and reduces once at the end (a reduction
        per block would put a cross-warp exchange on the critical path of every iteration)."""
        mean = tl.zeros(offs_m.shape, dtype=tl.float32)
        rstd = mean
        if HAS_LN:
            total = tl.zeros((offs_m.shape[0], BLOCK_K), dtype=tl.float32)
            total_sq = tl.zeros((offs_m.shape[0], BLOCK_K), dtype=tl.float32)
            for k0 in range(0, K, BLOCK_K):
                offs_k = k0 + tl.arange(0, BLOCK_K)
                mask = m_mask[:, None] & (offs_k < K)[None, :]
                x = tl.load(x_ptr + offs_m[:, None] * K + offs_k[None, :], mask=mask, other=0.0).to(tl.float32)
                total += x
                total_sq += x * x
            mean = tl.sum(total, axis=1) / K
            var = tl.maximum(tl.sum(total_sq, axis=1) / K - mean * mean, 0.0)
            rstd = 1.0 / tl.sqrt(var + eps)
        return mean, rstd

    @triton.jit
    def _wait_for_inputs(USE_PDL: tl.constexpr):
        """With programmatic dependent launch (see PDL): wait until the kernel before this one
        has finished (its outputs are this one's inputs), then let the next one launch."""
        if USE_PDL:
            tl.extra.cuda.gdc_wait()
            tl.extra.cuda.gdc_launch_dependents()

    @triton.jit
    def _load_x(x_ptr, lnw_ptr, lnb_ptr, offs_m, m_mask, offs_k, k_mask, K, mean, rstd,
                HAS_LN: tl.constexpr, HAS_LN_BIAS: tl.constexpr):
        """An (R, BLOCK_K) tile of x in fp32, LayerNorm applied when HAS_LN (zero past K)."""
        mask = m_mask[:, None] & k_mask[None, :]
        x = tl.load(x_ptr + offs_m[:, None] * K + offs_k[None, :], mask=mask, other=0.0).to(tl.float32)
        if HAS_LN:
            g = tl.load(lnw_ptr + offs_k, mask=k_mask, other=0.0).to(tl.float32)
            x = (x - mean[:, None]) * rstd[:, None] * g[None, :]
            if HAS_LN_BIAS:
                x += tl.load(lnb_ptr + offs_k, mask=k_mask, other=0.0).to(tl.float32)[None, :]
            x = tl.where(mask, x, 0.0)
        return x

    @triton.jit
    def _epilogue_inputs(s_ptr, b_ptr, r_ptr, pos_ptr, offs_m, m_mask, offs_n, n_mask, N,
                         HAS_SCALES: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_RESIDUAL: tl.constexpr,
                         KV_OUT: tl.constexpr):
        """What the epilogue adds to the product, loaded before the product is made (with PDL,
        before the wait: none of it is written by the kernel just before): the scales and bias
        (N,), the residual (R, N) and the rows' cache positions (R,), in fp32 (positions int).
        Loaded after the main loop instead, they cost one more memory round trip per kernel."""
        scale = tl.full(offs_n.shape, 1.0, tl.float32)
        bias = tl.zeros(offs_n.shape, tl.float32)
        residual = tl.zeros((offs_m.shape[0], offs_n.shape[0]), tl.float32)
        pos = tl.zeros(offs_m.shape, tl.int64)
        if HAS_SCALES:
            scale = tl.load(s_ptr + offs_n, mask=n_mask, other=0.0).to(tl.float32)
        if HAS_BIAS:
            bias = tl.load(b_ptr + offs_n, mask=n_mask, other=0.0).to(tl.float32)
        if HAS_RESIDUAL:
            residual = tl.load(r_ptr + offs_m[:, None] * N + offs_n[None, :],
                               mask=m_mask[:, None] & n_mask[None, :], other=0.0).to(tl.float32)
        if KV_OUT:
            pos = tl.load(pos_ptr + offs_m, mask=m_mask, other=0).to(tl.int64)
        return scale, bias, residual, pos

    @triton.jit
    def _epilogue(acc, scale, bias, residual, y_ptr, offs_m, m_mask, offs_n, n_mask, N,
                  HAS_SCALES: tl.constexpr, HAS_BIAS: tl.constexpr, GELU: tl.constexpr,
                  HAS_RESIDUAL: tl.constexpr):
        """acc (R, BLOCK_N) fp32 -> scales, bias, GELU (tanh), residual (from _epilogue_inputs)
        -> y in y's dtype, which it returns as stored."""
        y = acc
        if HAS_SCALES:
            y = y * scale[None, :]
        if HAS_BIAS:
            y += bias[None, :]
        if GELU:  # 0.5 y (1 + tanh(u)) = y sigmoid(2u), u = sqrt(2/pi) (y + 0.044715 y^3)
            y = y * tl.sigmoid(1.5957691216057308 * (y + 0.044715 * y * y * y))
        if HAS_RESIDUAL:
            y += residual
        y = y.to(y_ptr.dtype.element_ty)
        tl.store(y_ptr + offs_m[:, None] * N + offs_n[None, :], y, mask=m_mask[:, None] & n_mask[None, :])
        return y

    @triton.jit
    def _store_kv(y, kv_ptr, pos, offs_m, m_mask, offs_n, n_mask, C, D, stride_kv, stride_s, stride_h, stride_t):
        """The key and value columns [C, 3C) of a qkv tile y (R, BLOCK_N) into the layer's cache
        (2, S, H, L, D): row m's at slot m, position pos[m]."""
        kv = offs_n // C - 1  # 0 key, 1 value (-1: a query column, not stored)
        col = offs_n % C
        offs_col = kv * stride_kv + (col // D) * stride_h + col % D
        offs = offs_col[None, :] + (offs_m * stride_s + pos * stride_t)[:, None]
        tl.store(kv_ptr + offs, y.to(kv_ptr.dtype.element_ty), mask=m_mask[:, None] & (n_mask & (kv >= 0))[None, :])

    @triton.jit
    def _gemv_kernel(x_ptr, w_ptr, s_ptr, b_ptr, lnw_ptr, lnb_ptr, r_ptr, y_ptr, N, K, eps,
                     kv_ptr, pos_ptr, C, D, stride_kv, stride_s, stride_h, stride_t, KV_OUT: tl.constexpr,
                     HAS_SCALES: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_LN: tl.constexpr,
                     HAS_LN_BIAS: tl.constexpr, GELU: tl.constexpr, HAS_RESIDUAL: tl.constexpr,
                     USE_PDL: tl.constexpr, INT8_BITS: tl.constexpr, BLOCK_N: tl.constexpr,
                     BLOCK_K: tl.constexpr):
        offs_m = tl.arange(0, 1)
        m_mask = offs_m < 1
        offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
        n_mask = offs_n < N
        offs_k = tl.arange(0, BLOCK_K)
        k_mask = offs_k < K
        w = tl.load(w_ptr + offs_n[:, None] * K + offs_k[None, :], mask=n_mask[:, None] & k_mask[None, :], other=0)
        scale, bias, residual, pos = _epilogue_inputs(s_ptr, b_ptr, r_ptr, pos_ptr, offs_m, m_mask, offs_n, n_mask, N,
                                                      HAS_SCALES, HAS_BIAS, HAS_RESIDUAL, KV_OUT)
        _wait_for_inputs(USE_PDL)  # the first weight block and the epilogue's inputs are in flight
        mean, rstd = _row_stats(x_ptr, offs_m, m_mask, K, eps, HAS_LN, BLOCK_K)
        # products summed elementwise, reduced over K once at the end (as in _row_stats)
        x = _load_x(x_ptr, lnw_ptr, lnb_ptr, offs_m, m_mask, offs_k, k_mask, K, mean, rstd, HAS_LN, HAS_LN_BIAS)
        acc = _weight_fp32(w, INT8_BITS) * x  # x (1, BLOCK_K) broadcasts over N
        # half_offset: the weights come with HALF_BASE added, taken off below as HALF_BASE * x
        # summed over K (one add per x element, not per weight; fp32 keeps the difference to
        # ~1e-4 of the output, under bf16's rounding)
        OFFSET: tl.constexpr = INT8_BITS == _HALF_OFFSET or INT8_BITS == _HALF_OFFSET_OPS
        x_sum = x
        for k0 in range(BLOCK_K, K, BLOCK_K):
            offs_k = k0 + tl.arange(0, BLOCK_K)
            k_mask = offs_k < K
            x = _load_x(x_ptr, lnw_ptr, lnb_ptr, offs_m, m_mask, offs_k, k_mask, K, mean, rstd, HAS_LN, HAS_LN_BIAS)
            w = tl.load(w_ptr + offs_n[:, None] * K + offs_k[None, :],
                        mask=n_mask[:, None] & k_mask[None, :], other=0)
            acc += _weight_fp32(w, INT8_BITS) * x
            if OFFSET:
                x_sum += x
        if OFFSET:
            acc -= _HALF_BASE * x_sum
        y = _epilogue(tl.sum(acc, axis=1)[None, :], scale, bias, residual, y_ptr, offs_m, m_mask, offs_n, n_mask, N,
                      HAS_SCALES, HAS_BIAS, GELU, HAS_RESIDUAL)
        if KV_OUT:
            _store_kv(y, kv_ptr, pos, offs_m, m_mask, offs_n, n_mask, C, D, stride_kv, stride_s, stride_h, stride_t)

    @triton.jit
    def _small_mm_kernel(x_ptr, w_ptr, s_ptr, b_ptr, lnw_ptr, lnb_ptr, r_ptr, y_ptr, M, N, K, eps,
                         kv_ptr, pos_ptr, C, D, stride_kv, stride_s, stride_h, stride_t, KV_OUT: tl.constexpr,
                         HAS_SCALES: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_LN: tl.constexpr,
                         HAS_LN_BIAS: tl.constexpr, GELU: tl.constexpr, HAS_RESIDUAL: tl.constexpr,
                         USE_PDL: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                         BLOCK_K: tl.constexpr):
        offs_m = tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
        m_mask, n_mask = offs_m < M, offs_n < N
        scale, bias, residual, pos = _epilogue_inputs(s_ptr, b_ptr, r_ptr, pos_ptr, offs_m, m_mask, offs_n, n_mask, N,
                                                      HAS_SCALES, HAS_BIAS, HAS_RESIDUAL, KV_OUT)
        _wait_for_inputs(USE_PDL)  # weights: nothing to prefetch across tl.dot's pipelined loop
        mean, rstd = _row_stats(x_ptr, offs_m, m_mask, K, eps, HAS_LN, BLOCK_K)
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            offs_k = k0 + tl.arange(0, BLOCK_K)
            k_mask = offs_k < K
            x = _load_x(x_ptr, lnw_ptr, lnb_ptr, offs_m, m_mask, offs_k, k_mask, K, mean, rstd, HAS_LN, HAS_LN_BIAS)
            x = x.to(x_ptr.dtype.element_ty)  # the tensor cores take x in its own dtype, as cuBLAS would
            w = tl.load(w_ptr + offs_n[None, :] * K + offs_k[:, None],  # (BLOCK_K, BLOCK_N): W.T
                        mask=k_mask[:, None] & n_mask[None, :], other=0)
            acc += tl.dot(x, w.to(x.dtype))
        y = _epilogue(acc, scale, bias, residual, y_ptr, offs_m, m_mask, offs_n, n_mask, N,
                      HAS_SCALES, HAS_BIAS, GELU, HAS_RESIDUAL)
        if KV_OUT:
            _store_kv(y, kv_ptr, pos, offs_m, m_mask, offs_n, n_mask, C, D, stride_kv, stride_s, stride_h, stride_t)

    @triton.jit
    def _softmax_tile(k, v, t_mask, q, m, denom, acc):
        """Online softmax: fold a tile of keys k and values v (BLOCK_T, D), positions t_mask,
        into the running max m, denominator and weighted sum acc (D,) of query q."""
        s = tl.where(t_mask, tl.sum(k.to(tl.float32) * q[None, :], axis=1), float("-inf"))
        m_new = tl.maximum(m, tl.max(s, axis=0))
        alpha = tl.exp(m - m_new)
        p = tl.exp(s - m_new)
        denom = denom * alpha + tl.sum(p, axis=0)
        acc = acc * alpha + tl.sum(p[:, None] * v.to(tl.float32), axis=0)
        return m_new, denom, acc

    @triton.jit
    def _attention_kernel(qkv_ptr, cache_ptr, pos_ptr, y_ptr, scale,
                          stride_kv, stride_s, stride_h, stride_t, H,
                          D: tl.constexpr, BLOCK_T: tl.constexpr, USE_PDL: tl.constexpr):
        """Program (b, h): row b's query for head h against the row's first pos[b] cached
        keys/values (slot b) and its own new key/value, in one pass (online softmax)."""
        b, h = tl.program_id(0), tl.program_id(1)
        C = H * D
        offs_d = tl.arange(0, D)
        # The cached positions and pos were written by earlier steps, not by the kernel just
        # before this one (the qkv matmul): with PDL the first tile is read before the wait.
        n = tl.load(pos_ptr + b)
        keys = cache_ptr + b * stride_s + h * stride_h
        first = tl.arange(0, BLOCK_T)
        first_offs = first[:, None] * stride_t + offs_d[None, :]
        first_k = tl.load(keys + first_offs, mask=(first < n)[:, None], other=0.0)
        first_v = tl.load(keys + stride_kv + first_offs, mask=(first < n)[:, None], other=0.0)
        _wait_for_inputs(USE_PDL)
        row = qkv_ptr + b * 3 * C + h * D
        q = tl.load(row + offs_d).to(tl.float32) * scale
        acc = tl.load(row + 2 * C + offs_d).to(tl.float32)  # own value, weight exp(own - m) = 1
        m = tl.sum(q * tl.load(row + C + offs_d).to(tl.float32), axis=0)  # running max: own score
        m, denom, acc = _softmax_tile(first_k, first_v, first < n, q, m, m * 0.0 + 1.0, acc)
        for t0 in range(BLOCK_T, n, BLOCK_T):
            offs_t = t0 + tl.arange(0, BLOCK_T)
            t_mask = offs_t < n
            offs = offs_t[:, None] * stride_t + offs_d[None, :]
            k = tl.load(keys + offs, mask=t_mask[:, None], other=0.0)
            v = tl.load(keys + stride_kv + offs, mask=t_mask[:, None], other=0.0)
            m, denom, acc = _softmax_tile(k, v, t_mask, q, m, denom, acc)
        tl.store(y_ptr + b * C + h * D + offs_d, (acc / denom).to(y_ptr.dtype.element_ty))

    def _prune_gemv_configs(configs: list, named_args: dict, **kwargs) -> list:
        """The autotuner's candidates for K: none whose K block is past K's next power of two
        (from 1024 down every config stays): a longer block only adds masked lanes."""
        return [c for c in configs if c.kwargs["BLOCK_K"] <= max(1024, triton.next_power_of_2(named_args["K"]))]

    if not INTERPRET:
        _gemv_kernel = triton.autotune(configs=_GEMV_CONFIGS, key=_KEY + ["INT8_BITS"],
                                       prune_configs_by={"early_config_prune": _prune_gemv_configs})(_gemv_kernel)
        _mm_kernel = triton.autotune(configs=_MM_CONFIGS, key=_KEY + ["M"])(_small_mm_kernel)
        _small_mm_kernel = triton.autotune(configs=_SMALL_MM_CONFIGS, key=_KEY)(_small_mm_kernel)
    else:
        _mm_kernel = _small_mm_kernel


def attention_blocks(batch: int) -> tuple[int, int]:
    """The attention kernel's (cached positions per iteration, warps) for `batch` rows. Measured
    on an H200 at 100 positions (bench/results/decode_kernels_h200.json): with few programs
    (B x 12 heads) long tiles keep more bytes in flight (batch 1: 3.0 us against 4.0 us at 64
    positions x 4 warps); with thousands of programs small ones keep the SMs busy (batch 256:
    29 us at 64 x 2 against 31-51 us for the others)."""
    return (128, 4) if batch <= 16 else (64, 2)


def configs(rows: int) -> list[dict[str, int]]:
    """The block sizes the autotuner chooses from for `rows` input rows (the tests run each)."""
    if rows == 1:
        return [dict(c.kwargs) for c in _GEMV_CONFIGS]
    if rows <= MAX_ROWS:
        return [dict(c.kwargs, BLOCK_M=MAX_ROWS) for c in _SMALL_MM_CONFIGS]
    return [dict(c.kwargs) for c in _MM_CONFIGS]


def gemv_candidates(K: int) -> list[dict[str, int]]:
    """The one-row kernel's configs for width K, as the autotuner prunes them, with warps."""
    _need_triton()
    return [dict(c.kwargs, num_warps=c.num_warps) for c in _prune_gemv_configs(_GEMV_CONFIGS, {"K": K})]


def gemv_key(N: int, K: int, *, int8: bool, ln: bool, gelu: bool, residual: bool, kv: bool) -> str:
    """A one-row matmul's name in the tuned table: its shape and what is fused into it."""
    fused = [name for name, on in (("ln", ln), ("gelu", gelu), ("residual", residual), ("kv", kv)) if on]
    return "_".join([f"N{N}", f"K{K}", "int8" if int8 else "float", *fused])


def load_tuned(path: Path) -> dict[str, dict[str, dict[str, int]]]:
    """{GPU name: {gemv_key: config}} from a tuned table ({"devices": {name: {"gemv": ...}}});
    empty without the file. An entry that is not one of the kernel's configs is refused."""
    if not path.exists():
        return {}
    _need_triton()
    known = gemv_candidates(1 << 30)  # every config
    table = {}
    for device, entry in json.loads(path.read_text())["devices"].items():
        table[device] = entry["gemv"]
        for key, c in entry["gemv"].items():
            if c not in known:
                raise ValueError(f"{path}: {device} {key}: {c} is not one of the one-row kernel's configs")
    return table


def tuned_table(device: torch.device) -> dict[str, dict[str, int]]:
    """The tuned configs for device's GPU model, read from TUNED_PATH on first use. Mutable:
    bench/tune_decode.py tries its candidates through it."""
    global _tuned
    if _tuned is None:
        _tuned = load_tuned(TUNED_PATH)
    index = device.index if device.index is not None else torch.cuda.current_device()
    if index not in _device_names:
        _device_names[index] = torch.cuda.get_device_name(index)
    return _tuned.setdefault(_device_names[index], {})


_CAPABILITY: dict[int, tuple[int, int]] = {}


def _use_pdl(x: torch.Tensor, rows: int) -> bool:
    """Whether kernels on x's device with `rows` rows launch with PDL (see PDL)."""
    if INTERPRET or PDL == "0":
        return False
    if PDL == "1":
        return True
    index = x.device.index if x.device.index is not None else torch.cuda.current_device()
    if index not in _CAPABILITY:
        _CAPABILITY[index] = torch.cuda.get_device_capability(index)
    return rows == 1 and _CAPABILITY[index] >= (9, 0)


def _launch_options(pdl: bool) -> dict:
    """Launch options every kernel takes (the interpreter knows none)."""
    return {} if INTERPRET else {"launch_pdl": pdl}


def _need_triton() -> None:
    if triton is None:
        raise RuntimeError("decode_kernels needs Triton (pip install triton); callers check available() first")


def _head_size(width: int, cache: torch.Tensor, n_head: int) -> int:
    """The head size D of a qkv `width` (3C) wide, after checking that the cache is laid out
    (n_layer, 2, S, n_head, L, D) with D contiguous, as the kernels index it."""
    D = width // 3 // n_head
    if cache.size(3) != n_head or cache.size(5) != D or cache.stride(5) != 1:
        raise ValueError(f"the decode kernels need a (n_layer, 2, S, {n_head}, L, {D}) cache, got {tuple(cache.shape)}")
    return D


def _cache_args(cache: torch.Tensor | None, layer: int, pos: torch.Tensor | None, n_head: int, width: int) -> list:
    """(kv_ptr, pos_ptr, C, D, strides of the layer's cache) for a kernel's K/V store, or
    placeholders when there is no cache to write."""
    if cache is None:
        return [None, None, 1, 1, 0, 0, 0, 0]
    D = _head_size(width, cache, n_head)
    layer_cache = cache[layer]
    return [layer_cache, pos, width // 3, D, *layer_cache.stride()[:4]]


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None, *,
           scales: torch.Tensor | None = None, ln_weight: torch.Tensor | None = None,
           ln_bias: torch.Tensor | None = None, eps: float = 1e-5, gelu: bool = False,
           residual: torch.Tensor | None = None, kv_cache: torch.Tensor | None = None, layer: int = 0,
           pos: torch.Tensor | None = None, n_head: int = 1, config: dict[str, int] | None = None) -> torch.Tensor:
    """[residual +] gelu?(LayerNorm?(x) @ weight.T * scales? + bias?) for x (M, K),
    weight (N, K) in x's dtype or int8 (with scales (N,)); -> (M, N) in x's dtype. The
    LayerNorm (ln_weight, ln_bias, eps) is over K. With kv_cache (n_layer, 2, S, n_head, L, D)
    the output is a qkv (N = 3C) and its key and value columns are also written into
    kv_cache[layer] at (slot m, position pos[m]) for every row m. `config` (block sizes) only
    under the interpreter; on a GPU the autotuner picks them. With PDL the kernel reads its
    weights, scales, bias, residual and pos before it waits for the kernel launched just
    before it: only x may come from that kernel (the decode step's residuals are two or more
    kernels back)."""
    _need_triton()
    M, K = x.shape
    N = weight.shape[0]
    if weight.shape[1] != K:
        raise ValueError(f"decode_kernels.linear: x {tuple(x.shape)} against a weight of width {weight.shape[1]}")
    if (weight.dtype == torch.int8) != (scales is not None):
        raise ValueError("an int8 weight needs its scales, and only an int8 weight takes scales")
    x, weight = x.contiguous(), weight.contiguous()
    y = torch.empty((M, N), dtype=x.dtype, device=x.device)
    any_ptr = weight  # an absent operand's pointer: its HAS_ flag is off, so it is never read
    args = [x, weight] + [t if t is not None else any_ptr for t in (scales, bias, ln_weight, ln_bias)]
    args += [residual.contiguous() if residual is not None else any_ptr, y]
    kv = _cache_args(kv_cache, layer, pos, n_head, N)
    kv[:2] = [t if t is not None else any_ptr for t in kv[:2]]
    flags = dict(HAS_SCALES=scales is not None, HAS_BIAS=bias is not None, HAS_LN=ln_weight is not None,
                 HAS_LN_BIAS=ln_bias is not None, GELU=gelu, HAS_RESIDUAL=residual is not None,
                 KV_OUT=kv_cache is not None)
    blocks = (config or configs(M)[0]) if INTERPRET else {}
    grid = lambda meta: (triton.cdiv(N, meta["BLOCK_N"]), triton.cdiv(M, meta.get("BLOCK_M", M)))  # noqa: E731
    pdl = _use_pdl(x, M)
    if M == 1 and ONE_ROW == "gemv":
        bits = int8_convert_mode(INT8_CONVERT) if scales is not None else CVT
        kernel = _gemv_kernel
        if not INTERPRET and USE_TUNED:
            key = gemv_key(N, K, int8=scales is not None, ln=ln_weight is not None, gelu=gelu,
                           residual=residual is not None, kv=kv_cache is not None)
            tuned = tuned_table(x.device).get(key)
            if tuned is not None:
                kernel, blocks = _gemv_kernel.fn, tuned  # the jit function under the autotuner
        kernel[grid](*args, N, K, eps, *kv, **flags, USE_PDL=pdl, INT8_BITS=bits, **blocks, **_launch_options(pdl))
    elif M <= MAX_ROWS:  # one tile of 16 rows
        if not INTERPRET:
            blocks = {"BLOCK_M": MAX_ROWS}
        _small_mm_kernel[grid](*args, M, N, K, eps, *kv, **flags, USE_PDL=pdl, **blocks, **_launch_options(pdl))
    else:
        _mm_kernel[grid](*args, M, N, K, eps, *kv, **flags, USE_PDL=pdl, **blocks, **_launch_options(pdl))
    return y


def attention(qkv: torch.Tensor, cache: torch.Tensor, layer: int, pos: torch.Tensor, n_head: int,
              block_t: int | None = None, num_warps: int | None = None) -> torch.Tensor:
    """Decode attention: qkv (B, 3C) this step's q, k, v per row; cache (n_layer, 2, S, H, Lmax,
    D), row b's keys/values in slot b at positions [0, pos[b]); -> (B, C) in qkv's dtype, the
    heads side by side. Reads cache positions below pos[b] only: the step's own k, v come from qkv."""
    _need_triton()
    B, C3 = qkv.shape
    D = _head_size(C3, cache, n_head)
    if D & (D - 1):
        raise ValueError(f"the attention kernel needs a power-of-two head size, got {D}")
    qkv = qkv.contiguous()
    default_t, default_warps = attention_blocks(B)
    block_t, num_warps = block_t or default_t, num_warps or default_warps
    y = torch.empty((B, C3 // 3), dtype=qkv.dtype, device=qkv.device)
    layer_cache = cache[layer]
    pdl = _use_pdl(qkv, B)
    _attention_kernel[(B, n_head)](qkv, layer_cache, pos, y, D ** -0.5, *layer_cache.stride()[:4],
                                   n_head, D=D, BLOCK_T=block_t, num_warps=num_warps, USE_PDL=pdl,
                                   **_launch_options(pdl))
    return y


# The compiled step's view of these: opaque ops, their output shapes from the fakes.
@torch.library.custom_op("code_assistant::decode_linear", mutates_args=())
def linear_op(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, scales: torch.Tensor | None,
              ln_weight: torch.Tensor | None, ln_bias: torch.Tensor | None, eps: float, gelu: bool,
              residual: torch.Tensor | None) -> torch.Tensor:
    return linear(x, weight, bias, scales=scales, ln_weight=ln_weight, ln_bias=ln_bias, eps=eps, gelu=gelu,
                  residual=residual)


@linear_op.register_fake
def _(x, weight, bias, scales, ln_weight, ln_bias, eps, gelu, residual) -> torch.Tensor:
    return x.new_empty((x.shape[0], weight.shape[0]))


@torch.library.custom_op("code_assistant::decode_qkv", mutates_args=("cache",))
def qkv_op(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, scales: torch.Tensor | None,
           ln_weight: torch.Tensor | None, ln_bias: torch.Tensor | None, eps: float, cache: torch.Tensor,
           layer: int, pos: torch.Tensor, n_head: int) -> torch.Tensor:
    return linear(x, weight, bias, scales=scales, ln_weight=ln_weight, ln_bias=ln_bias, eps=eps, kv_cache=cache,
                  layer=layer, pos=pos, n_head=n_head)


@qkv_op.register_fake
def _(x, weight, bias, scales, ln_weight, ln_bias, eps, cache, layer, pos, n_head) -> torch.Tensor:
    return x.new_empty((x.shape[0], weight.shape[0]))


@torch.library.custom_op("code_assistant::decode_attention", mutates_args=())
def attention_op(qkv: torch.Tensor, cache: torch.Tensor, layer: int, pos: torch.Tensor, n_head: int) -> torch.Tensor:
    return attention(qkv, cache, layer, pos, n_head)


@attention_op.register_fake
def _(qkv, cache, layer, pos, n_head) -> torch.Tensor:
    return qkv.new_empty((qkv.shape[0], qkv.shape[1] // 3))


def weights_of(module: nn.Module) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(weight, scales) of an nn.Linear (scales None) or a WeightOnlyInt8Linear."""
    return (module.qweight, module.scales) if hasattr(module, "qweight") else (module.weight, None)


def on_kernels(x: torch.Tensor, module: nn.Module) -> bool:
    """Whether x (rows, width) times a linear module runs on the kernel: up to KERNEL_ROWS rows
    (INT8_KERNEL_ROWS for an int8 module) where `supports(x)`, not an int8 module with its
    `triton` flag off, and not a float matmul wider than WIDE_N from 2 rows on (the lm_head:
    cuBLAS's tensor-core tiles measured faster there, 16 rows x 50k: 26.9 against 35.1 us on
    an H200, bench/results/decode_kernels_h200.json)."""
    int8 = hasattr(module, "qweight")
    if x.shape[0] > (INT8_KERNEL_ROWS if int8 else KERNEL_ROWS) or not supports(x):
        return False
    if not getattr(module, "triton", True):
        return False
    return int8 or x.shape[0] == 1 or module.weight.shape[0] <= WIDE_N


def qkv_module(x: torch.Tensor, module: nn.Module, ln: nn.LayerNorm, cache: torch.Tensor, layer: int,
               pos: torch.Tensor, n_head: int) -> torch.Tensor:
    """module(ln(x)) for the attention's qkv matmul where `on_kernels(x, module)`, its key and
    value columns also stored into cache[layer] at (row b, pos[b]) by the same kernel."""
    weight, scales = weights_of(module)
    return qkv_op(x, weight, module.bias, scales, ln.weight, ln.bias, ln.eps, cache, layer, pos, n_head)


def linear_module(x: torch.Tensor, module: nn.Module, *, ln: nn.LayerNorm | None = None, gelu: bool = False,
                  residual: torch.Tensor | None = None) -> torch.Tensor:
    """[residual +] gelu?(module(ln?(x))) for x (M, K) and an nn.Linear or a
    WeightOnlyInt8Linear (anything with qweight and scales): one kernel where `on_kernels`,
    else torch ops."""
    if on_kernels(x, module):
        weight, scales = weights_of(module)
        ln_weight, ln_bias, eps = (ln.weight, ln.bias, ln.eps) if ln is not None else (None, None, 1e-5)
        return linear_op(x, weight, module.bias, scales, ln_weight, ln_bias, eps, gelu, residual)
    if ln is not None:
        x = ln(x)
    y = module(x)
    if gelu:
        y = F.gelu(y, approximate="tanh")
    return y if residual is None else residual + y
