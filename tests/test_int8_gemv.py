"""int8_gemv.py's Triton kernels, run on the CPU by Triton's interpreter (TRITON_INTERPRET=1).

The interpreter is switched on when Triton is imported, so the checks run in a fresh Python
process. Every block-size config the GPU autotuner may pick is run on shapes that leave
partial blocks in both N and K, against the plain formula. bf16 is left out here: the
interpreter computes bf16 tl.dot wrongly on the CPU (fp16 takes the same code path in the
kernel); tests/test_engine_cuda.py checks bf16 on a GPU.
"""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

CHECKS = textwrap.dedent("""
    import torch
    import int8_gemv
    from quantization import quantize_int8_per_channel

    assert int8_gemv.INTERPRET and int8_gemv.available()
    torch.manual_seed(0)
    cases = 0
    for rows, n, k in [(1, 72, 96), (1, 5, 7), (1, 300, 520), (2, 40, 64), (7, 33, 100), (16, 130, 270)]:
        q, s = quantize_int8_per_channel(torch.randn(n, k))
        bias = torch.randn(n)
        for dtype, tol in ((torch.float32, 1e-4), (torch.float16, 2e-2)):
            x = torch.randn(rows, k).to(dtype)
            plain = (x.float() @ q.float().T) * s
            for config in int8_gemv.configs(rows):
                for b in (bias, None):
                    y = int8_gemv.int8_matmul(x, q, s.to(dtype), None if b is None else b.to(dtype), config)
                    want = plain if b is None else plain + b
                    assert y.dtype == dtype and y.shape == (rows, n)
                    err = ((y.float() - want).abs().max() / want.abs().max()).item()
                    assert err < tol, (rows, n, k, dtype, config, b is None, err)
                    cases += 1
    # the custom op inside a compiled function with a dynamic row count (the engine's case)
    q, s = quantize_int8_per_channel(torch.randn(24, 48))
    f = torch.compile(lambda x: int8_gemv.int8_linear_op(x, q, s, None) + 1, dynamic=True, fullgraph=True)
    for rows in (2, 3, 11):
        x = torch.randn(rows, 48)
        assert torch.allclose(f(x), (x @ q.float().T) * s + 1, atol=1e-4)
    try:
        int8_gemv.int8_matmul(torch.randn(17, 48), q, s, None)
    except ValueError as e:
        assert "16 rows" in str(e)
    else:
        raise AssertionError("17 rows were accepted")
    print("cases", cases)
""")


def test_kernels_match_the_plain_formula_for_every_config() -> None:
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=str(ROOT))
    r = subprocess.run([sys.executable, "-c", CHECKS], cwd=ROOT, env=env, capture_output=True,
                       text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "cases 168" in r.stdout  # 6 shapes x 2 dtypes x 2 bias x configs (8 for 1 row, 6 else)
