"""Int8 weight-only matmul for decode-sized inputs (1-16 rows) as one Triton kernel.

    y = (x @ q.T) * scales (+ bias)      x (M, K) bf16/fp16, q (N, K) int8, scales/bias (N,)

Why a kernel of our own: in the engine's compiled decode step (dynamic batch size) Inductor
turns `F.linear(x, q.to(bf16)) * scales` into a kernel that writes the whole weight in bf16
and then cuBLAS's GEMV that reads it back, so the int8 model moved *more* bytes per step than
the bf16 one (0.75x at batch 1, bench/results/quantization_h100.json). Here each program
reads its rows of int8 weights once, converts them in registers and applies the scales and
bias on the way out: one kernel, half the weight bytes of bf16.

It is registered as the custom op `code_assistant::int8_linear`, so torch.compile keeps it
as one opaque call inside the compiled step and CUDA graphs capture it like any kernel. Each
shape's block sizes are autotuned on first use, which the engine's warm-up runs before it
captures a graph. Larger inputs (prefill, big batches) are compute-bound and stay on cuBLAS.

Without Triton (the CPU build of torch) `available()` is False and callers use the plain
formula; the tests run the kernels on the CPU through Triton's interpreter
(TRITON_INTERPRET=1), where the launchers below accept CPU tensors.
"""
from __future__ import annotations

import os

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # torch's CPU wheels ship without Triton
    triton = None

MAX_ROWS = 16  # above this the matmul has enough rows to be compute-bound: cuBLAS wins
# Triton's interpreter (CPU tests) has no GPU to autotune on: there the launcher takes the
# block sizes from its caller, which runs every config in turn.
INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"


def available() -> bool:
    return triton is not None


if triton is not None:
    # Batch 1 is a GEMV: each program owns BLOCK_N output columns and walks K, so the weight is
    # read once in total. Small BLOCK_N gives the 768-wide layers enough programs for 132 SMs.
    _GEMV_CONFIGS = [triton.Config({"BLOCK_N": n, "BLOCK_K": k}, num_warps=w)
                     for n, k, w in ((4, 256, 2), (4, 512, 4), (8, 256, 4), (8, 512, 4),
                                     (16, 256, 4), (16, 512, 8), (32, 128, 4), (32, 256, 8))]
    # 2-16 rows: one tl.dot tile of 16 rows (the rows past M masked), so the tensor cores do
    # the multiply and the weight tile is still read once for all rows.
    _SMALL_MM_CONFIGS = [triton.Config({"BLOCK_N": n, "BLOCK_K": k}, num_warps=w)
                         for n, k, w in ((16, 128, 4), (16, 256, 4), (32, 128, 4), (32, 256, 4),
                                         (64, 128, 4), (64, 256, 8))]

    @triton.jit
    def _int8_gemv_kernel(x_ptr, w_ptr, s_ptr, b_ptr, y_ptr, N, K,
                          HAS_BIAS: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
        offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
        n_mask = offs_n < N
        acc = tl.zeros((BLOCK_N,), dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            offs_k = k0 + tl.arange(0, BLOCK_K)
            k_mask = offs_k < K
            x = tl.load(x_ptr + offs_k, mask=k_mask, other=0.0).to(tl.float32)
            w = tl.load(w_ptr + offs_n[:, None] * K + offs_k[None, :],
                        mask=n_mask[:, None] & k_mask[None, :], other=0)
            acc += tl.sum(w.to(tl.float32) * x[None, :], axis=1)
        y = acc * tl.load(s_ptr + offs_n, mask=n_mask, other=0.0).to(tl.float32)
        if HAS_BIAS:
            y += tl.load(b_ptr + offs_n, mask=n_mask, other=0.0).to(tl.float32)
        tl.store(y_ptr + offs_n, y.to(y_ptr.dtype.element_ty), mask=n_mask)

    @triton.jit
    def _int8_small_mm_kernel(x_ptr, w_ptr, s_ptr, b_ptr, y_ptr, M, N, K,
                              HAS_BIAS: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
        offs_m = tl.arange(0, 16)
        offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
        m_mask, n_mask = offs_m < M, offs_n < N
        acc = tl.zeros((16, BLOCK_N), dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            offs_k = k0 + tl.arange(0, BLOCK_K)
            k_mask = offs_k < K
            x = tl.load(x_ptr + offs_m[:, None] * K + offs_k[None, :],
                        mask=m_mask[:, None] & k_mask[None, :], other=0.0)
            w = tl.load(w_ptr + offs_n[None, :] * K + offs_k[:, None],  # (BLOCK_K, BLOCK_N): q.T
                        mask=k_mask[:, None] & n_mask[None, :], other=0)
            acc += tl.dot(x, w.to(x.dtype))
        y = acc * tl.load(s_ptr + offs_n, mask=n_mask, other=0.0).to(tl.float32)[None, :]
        if HAS_BIAS:
            y += tl.load(b_ptr + offs_n, mask=n_mask, other=0.0).to(tl.float32)[None, :]
        tl.store(y_ptr + offs_m[:, None] * N + offs_n[None, :], y.to(y_ptr.dtype.element_ty),
                 mask=m_mask[:, None] & n_mask[None, :])


    if not INTERPRET:
        _int8_gemv_kernel = triton.autotune(configs=_GEMV_CONFIGS, key=["N", "K"])(_int8_gemv_kernel)
        _int8_small_mm_kernel = triton.autotune(configs=_SMALL_MM_CONFIGS, key=["N", "K"])(_int8_small_mm_kernel)


def configs(rows: int) -> list[dict[str, int]]:
    """The block sizes the autotuner chooses from for `rows` input rows (the tests run each)."""
    return [dict(c.kwargs) for c in (_GEMV_CONFIGS if rows == 1 else _SMALL_MM_CONFIGS)]


def int8_matmul(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor,
                bias: torch.Tensor | None, config: dict[str, int] | None = None) -> torch.Tensor:
    """(M, K) x int8 (N, K) -> (M, N) in x's dtype, M <= MAX_ROWS, through the Triton kernels.
    `config` (block sizes) only under the interpreter; on a GPU the autotuner picks them."""
    if triton is None:
        raise RuntimeError("int8_matmul needs Triton (pip install triton); callers check available() first")
    M, K = x.shape
    N = qweight.shape[0]
    if M > MAX_ROWS or qweight.shape[1] != K:
        raise ValueError(f"int8_matmul takes up to {MAX_ROWS} rows of width {qweight.shape[1]}, got {tuple(x.shape)}")
    x, qweight = x.contiguous(), qweight.contiguous()
    y = torch.empty((M, N), dtype=x.dtype, device=x.device)
    b = bias if bias is not None else scales  # any pointer: HAS_BIAS=False never reads it
    blocks = (config or configs(M)[0]) if INTERPRET else {}
    grid = lambda meta: (triton.cdiv(N, meta["BLOCK_N"]),)  # noqa: E731
    if M == 1:
        _int8_gemv_kernel[grid](x, qweight, scales, b, y, N, K, HAS_BIAS=bias is not None, **blocks)
    else:
        _int8_small_mm_kernel[grid](x, qweight, scales, b, y, M, N, K, HAS_BIAS=bias is not None, **blocks)
    return y


@torch.library.custom_op("code_assistant::int8_linear", mutates_args=())
def int8_linear_op(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor,
                   bias: torch.Tensor | None) -> torch.Tensor:
    """The compiled step's view of int8_matmul: one opaque op, its output shape from the fake."""
    return int8_matmul(x, qweight, scales, bias)


@int8_linear_op.register_fake
def _(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    return x.new_empty((x.shape[0], qweight.shape[0]))
