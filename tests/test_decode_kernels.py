"""decode_kernels.py's Triton kernels, run on the CPU by Triton's interpreter (TRITON_INTERPRET=1).

The interpreter is switched on when Triton is imported, so the checks run in a fresh Python
process. Every block-size config the GPU autotuner may pick is run on shapes that leave
partial blocks in both N and K, against torch's own ops; then the model's fused decode step
against its torch-ops decode step, and the engine on top of it against generation without a
cache. bf16 is left out here: the interpreter computes bf16 tl.dot wrongly on the CPU (fp16
takes the same code path in the kernel); tests/test_engine_cuda.py checks bf16 on a GPU.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def run_interpreted(code: str) -> str:
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=str(ROOT))
    r = subprocess.run([sys.executable, "-W", "ignore::RuntimeWarning", "-c", textwrap.dedent(code)], cwd=ROOT,
                       env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    return r.stdout


def test_linear_matches_torch_for_every_config_and_epilogue() -> None:
    out = run_interpreted("""
        import torch
        from torch.nn import functional as F
        import decode_kernels as dk
        from quantization import quantize_int8_per_channel

        assert dk.INTERPRET and dk.available()
        torch.manual_seed(0)
        cases = 0
        for rows, n, k in [(1, 72, 96), (1, 5, 7), (1, 300, 520), (2, 40, 64), (7, 33, 100), (16, 130, 270),
                             (40, 70, 130)]:
            w, bias, r = torch.randn(n, k), torch.randn(n), torch.randn(rows, n)
            q, s = quantize_int8_per_channel(w)
            g, lb = torch.randn(k), torch.randn(k)
            for dtype, tol in ((torch.float32, 1e-4), (torch.float16, 2e-2)):
                x = torch.randn(rows, k).to(dtype)
                xn = F.layer_norm(x.float(), (k,), g, lb)
                # int8 + bias, and bf16-style weights with every epilogue, for every config
                plain = (x.float() @ q.float().T) * s + bias
                full = r + F.gelu(xn @ w.T + bias, approximate="tanh")
                for config in dk.configs(rows):
                    for y, want in (
                        (dk.linear(x, q, bias.to(dtype), scales=s.to(dtype), config=config), plain),
                        (dk.linear(x, w.to(dtype), bias.to(dtype), ln_weight=g.to(dtype), ln_bias=lb.to(dtype),
                                   gelu=True, residual=r.to(dtype), config=config), full)):
                        assert y.dtype == dtype and y.shape == (rows, n)
                        err = ((y.float() - want).abs().max() / want.abs().max()).item()
                        assert err < tol, (rows, n, k, dtype, config, err)
                        cases += 1
                # the flags one at a time (first config): LayerNorm without bias, no bias at all
                y = dk.linear(x, w.to(dtype), ln_weight=g.to(dtype), config=dk.configs(rows)[0])
                want = F.layer_norm(x.float(), (k,), g) @ w.T
                assert ((y.float() - want).abs().max() / want.abs().max()).item() < tol
                cases += 1
        # every int8 value, -128 included, through the one-row kernel's bits, its conversion
        # instruction (DECODE_INT8_CONVERT=cvt) and fp16 (half, half_offset: their plain-ops
        # twins here); half_offset over several K blocks and a masked tail too, where the
        # offset it leaves on the products must come off exactly once per x element
        every = torch.arange(-128, 128, dtype=torch.int16).to(torch.int8).view(4, 64)
        x, ones = torch.randn(1, 64), torch.ones(4)
        long_w = torch.randint(-128, 128, (40, 1040), dtype=torch.int8)
        long_x, long_s = torch.randn(1, 1040) * 3, torch.rand(40) + 0.5
        long_want = (long_x @ long_w.float().T) * long_s
        # the interpreter can't run PTX
        assert dk.int8_convert_mode("half") == dk.HALF_OPS and dk.int8_convert_mode("half_offset") == dk.HALF_OFFSET_OPS
        assert set(dk.INT8_CONVERTS) == {"bits", "cvt", "half", "half_offset"}
        for convert in dk.INT8_CONVERTS:
            dk.INT8_CONVERT = convert
            want = x @ every.float().T
            err = ((dk.linear(x, every, scales=ones) - want).abs().max() / want.abs().max()).item()
            assert err < 1e-5, (convert, err)
            for config in dk.configs(1)[:3]:  # BLOCK_K 256 and 512: 5 and 3 K blocks, the last masked
                y = dk.linear(long_x, long_w, scales=long_s, config=config)
                err = ((y - long_want).abs().max() / long_want.abs().max()).item()
                assert err < 1e-5, (convert, config, err)
        # the custom ops inside a compiled function with a dynamic row count (the engine's case)
        q, s = quantize_int8_per_channel(torch.randn(24, 48))
        f = torch.compile(lambda x, r: dk.linear_op(x, q, None, s, None, None, 1e-5, False, r) + 1,
                          dynamic=True, fullgraph=True)
        for rows in (2, 3, 11):
            x, r = torch.randn(rows, 48), torch.randn(rows, 24)
            assert torch.allclose(f(x, r), r + (x @ q.float().T) * s + 1, atol=1e-4)
        for bad, message in ((lambda: dk.linear(torch.randn(17, 40), q, scales=s), "width 48"),
                             (lambda: dk.linear(torch.randn(2, 48), q), "scales")):
            try:
                bad()
            except ValueError as e:
                assert message in str(e), e
            else:
                raise AssertionError(message)
        print("cases", cases)
    """)
    assert "cases 370" in out  # 2 dtypes x (2 checks x 89 (shape, config) pairs + 7 shapes)


def test_attention_matches_softmax_over_cache_and_own_token() -> None:
    out = run_interpreted("""
        import torch
        import decode_kernels as dk

        torch.manual_seed(0)
        n_layer, S, H, L, D = 2, 6, 3, 150, 16
        cache = torch.randn(n_layer, 2, S, H, L, D)
        pos = torch.tensor([0, 1, 63, 64, 65, 149])  # empty, partial and whole 64-position blocks
        B = len(pos)
        qkv = torch.randn(B, 3 * H * D)
        for layer in range(n_layer):
            for block_t in (16, 64):
                y = dk.attention(qkv, cache, layer, pos, H, block_t=block_t)
                for b in range(B):
                    q, k, v = qkv[b].view(3, H, D)
                    keys = torch.cat([cache[layer, 0, b, :, :pos[b]], k[:, None]], 1)  # (H, n + 1, D)
                    values = torch.cat([cache[layer, 1, b, :, :pos[b]], v[:, None]], 1)
                    p = ((keys @ q[:, :, None]).squeeze(-1) / D ** 0.5).softmax(-1)  # (H, n + 1)
                    want = (p[:, None, :] @ values).squeeze(1).reshape(H * D)
                    assert torch.allclose(y[b], want, atol=1e-5), (layer, block_t, b)
        print("ok")
    """)
    assert "ok" in out


def test_qkv_kernel_stores_keys_and_values_in_the_cache() -> None:
    """With a cache, the qkv matmul also writes its key and value columns into the layer's
    cache at (slot b, pos[b]) for each row b, and nothing else there."""
    out = run_interpreted("""
        import torch
        import decode_kernels as dk

        torch.manual_seed(0)
        n_layer, H, L, D = 2, 4, 100, 16
        C = H * D
        pos = torch.tensor([0, 7, 99] + list(range(10, 27)))  # first, middle and last position, ...
        S = len(pos)
        cache = torch.randn(n_layer, 2, S, H, L, D)
        cases = 0
        for dtype, tol in ((torch.float32, 1e-4), (torch.float16, 2e-2)):
            x, w = torch.randn(S, C).to(dtype), torch.randn(3 * C, C).to(dtype)
            for rows in (1, 3, S):  # the GEMV, the 16-row tl.dot tile and the row-tiled kernel
                for config in dk.configs(rows):
                    stored = cache.to(dtype)
                    y = dk.linear(x[:rows], w, kv_cache=stored, layer=1, pos=pos[:rows], n_head=H, config=config)
                    want = x[:rows].float() @ w.float().T
                    assert ((y.float() - want).abs().max() / want.abs().max()).item() < tol
                    expected = cache.to(dtype)
                    for b in range(rows):
                        expected[1, :, b, :, pos[b]] = y[b].view(3, H, D)[1:]
                    assert torch.equal(stored, expected), (rows, config)  # those positions and nothing else
                    cases += 1
        try:
            dk.linear(x, w, kv_cache=cache[:, :, :, :2], pos=pos, n_head=H)
        except ValueError as e:
            assert "cache" in str(e)
        else:
            raise AssertionError("a cache of the wrong head count was accepted")
        print("cases", cases)
    """)
    assert "cases 70" in out  # 2 dtypes x (19 GEMV + 8 16-row + 8 row-tiled configs)


def test_fused_decode_step_and_engine_match_torch_ops() -> None:
    """GPT.decode_step on the kernels equals the torch-ops step (float and int8 model), and the
    engine on them gives every request the greedy tokens of generation without a cache."""
    out = run_interpreted("""
        import torch
        import model as model_module
        from engine import Engine, SamplingParams, generate_without_cache
        from model import GPT, GPTConfig
        from quantization import quantize_model

        torch.manual_seed(0)
        cfg = GPTConfig(n_layer=2, n_head=4, n_embd=64, block_size=128, vocab_size=96)
        float_model = GPT(cfg).eval()
        int8_model, _ = quantize_model(float_model, "int8-weight-only")
        cache = torch.randn(cfg.n_layer, 2, 20, 4, 129, 16)
        import decode_kernels
        for m, kernel_rows in ((float_model, 16), (int8_model.eval(), 16), (float_model, 32), (int8_model, 32)):
            decode_kernels.KERNEL_ROWS = kernel_rows  # 18 rows: torch ops, then the row-tiled kernel
            for tokens, pos in (([3], [0]), ([3, 7, 9], [0, 5, 70]), (list(range(18)), list(range(18)))):
                tokens, pos = torch.tensor(tokens), torch.tensor(pos)
                with torch.no_grad():
                    model_module.DECODE_KERNELS = "torch"
                    want, want_kv = m.decode_step(tokens, pos, cache, 72)
                    model_module.DECODE_KERNELS = "triton"
                    got, got_kv = m.decode_step(tokens, pos, cache, 72)
                assert torch.allclose(got, want, atol=1e-4), (got - want).abs().max()
                assert torch.allclose(got_kv, want_kv, atol=1e-5)
                # write_kv: the same logits, and the new K/V in the cache at (row, pos) only
                written = cache.clone()
                with torch.no_grad():
                    got, none = m.decode_step(tokens, pos, written, 72, write_kv=True)
                assert none is None and torch.allclose(got, want, atol=1e-4)
                expected = cache.clone()
                expected[:, :, torch.arange(len(pos)), :, pos] = want_kv
                assert torch.allclose(written, expected, atol=1e-5)
        decode_kernels.KERNEL_ROWS = 16
        # a float lm_head wider than WIDE_N goes to torch ops from 2 rows on: the same logits
        wide_model = GPT(GPTConfig(n_layer=1, n_head=4, n_embd=64, block_size=128, vocab_size=320)).eval()
        decode_kernels.WIDE_N = 4 * 64  # the fc layer's width: only the lm_head is wider
        kernel_op, widths = decode_kernels.linear_op, []
        decode_kernels.linear_op = lambda x, w, *rest: widths.append(w.shape[0]) or kernel_op(x, w, *rest)
        tokens, pos = torch.tensor([3, 7]), torch.tensor([4, 9])
        with torch.no_grad():
            wide, _ = wide_model.decode_step(tokens, pos, cache, 16)
        decode_kernels.linear_op = kernel_op
        assert widths == [192, 64, 256, 64], widths
        with torch.no_grad():
            model_module.DECODE_KERNELS = "torch"
            want, _ = wide_model.decode_step(tokens, pos, cache, 16)
        model_module.DECODE_KERNELS = "triton"
        assert torch.allclose(wide, want, atol=1e-4)
        decode_kernels.WIDE_N = 16384
        engine = Engine(float_model, max_batch=4)
        prompts = [[5, 6, 7], [1] * 20, [9, 8], [4] * 33, [2, 3]]  # 5 requests over 4 slots
        outs = engine.generate_batch(prompts, SamplingParams(max_tokens=12))
        for p, o in zip(prompts, outs):
            assert o == generate_without_cache(float_model, p, 12), (p, o)
        print("ok")
    """)
    assert "ok" in out


def test_tuned_table_loads_and_refuses_unknown_configs(tmp_path: Path) -> None:
    """The committed table of in-step tuned block sizes (bench/tune_decode.py) loads, names only
    configs the autotuner could pick for each matmul's width, and a table naming any other
    config is refused at load. The candidates are pruned by K as the autotuner prunes them. The
    tuner's merge of a run into the table keeps the other picks and names the earlier run."""
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"devices": {"GPU X": {"gemv": {
        "N768_K768_float": {"BLOCK_N": 3, "BLOCK_K": 64, "num_warps": 4}}}}}))
    out = run_interpreted(f"""
        import json
        from pathlib import Path
        import decode_kernels as dk

        key = dk.gemv_key(2304, 768, int8=False, ln=True, gelu=False, residual=False, kv=True)
        assert key == "N2304_K768_float_ln_kv", key
        key = dk.gemv_key(768, 3072, int8=True, ln=False, gelu=False, residual=True, kv=False)
        assert key == "N768_K3072_int8_residual", key
        narrow, wide = dk.gemv_candidates(768), dk.gemv_candidates(5120)
        assert max(c["BLOCK_K"] for c in narrow) == 1024 and max(c["BLOCK_K"] for c in wide) == 8192
        assert len(narrow) < len(wide) == len(dk.configs(1))
        table = dk.load_tuned(dk.TUNED_PATH)
        assert table, "the tuned table is committed"
        entries = 0
        for device, gemv in table.items():
            for key, config in gemv.items():
                K = int(key.split("_")[1][1:])
                assert config in dk.gemv_candidates(K), (device, key, config)
                entries += 1
        try:
            dk.load_tuned(Path({str(bad)!r}))
        except ValueError as e:
            assert "N768_K768_float" in str(e), e
        else:
            raise AssertionError("a config the kernel doesn't have was accepted")
        assert dk.load_tuned(Path({str(tmp_path / "absent.json")!r})) == {{}}
        # the tuner merges one run's picks into the table: the other picks and GPUs stay, and
        # the entry names the run before it
        import sys
        sys.path.insert(0, "bench")
        from tune_decode import write_table
        device = next(iter(table))
        key, pick = "N768_K768_int8_residual", dk.gemv_candidates(768)[-1]
        merged = Path({str(tmp_path / "merged.json")!r})
        write_table(merged, device, {{key: pick}}, {{"date": "2031-01-01", "command": "python tune"}})
        entry = json.loads(merged.read_text())["devices"][device]
        assert entry["gemv"][key] == pick and entry["command"] == "python tune", entry
        assert len(entry["gemv"]) >= len(table[device]) and entry["earlier_runs"][-1]["command"] != "python tune"
        assert dk.load_tuned(merged)[device][key] == pick
        print("entries", entries)
    """)
    assert int(out.split()[-1]) >= 5


def test_kernels_compile_for_hopper() -> None:
    """Every kernel through Triton's real compiler for sm_90, down to a cubin with the ptxas
    Triton ships (no GPU needed): the interpreter runs Python and accepts code the compiler
    refuses (a loop variable changing shape, say). One build per weight dtype, with the
    epilogues and the PDL wait the model uses."""
    out = run_interpreted("""
        import re
        import sys
        sys.path.insert(0, "bench")
        # compiles for sm_90 (it unsets TRITON_INTERPRET before triton is imported)
        from int8_convert_sass import build, loop_instructions
        import decode_kernels as dk

        flags = dict(HAS_BIAS=True, HAS_LN=True, HAS_LN_BIAS=True, GELU=True, HAS_RESIDUAL=True, USE_PDL=True)
        built, int_to_float = [], {}

        def int_to_float_count(kernel):  # the weights' int-to-float conversions in PTX (cvt.rn.f32.s16 ...)
            return len(re.findall(r"cvt[.]rn[.]f32[.]s(8|16)", kernel.asm["ptx"]))

        floats, ints = {"pos_ptr": "*i64"}, {"pos_ptr": "*i64", "w_ptr": "*i8"}
        for pointers, scales, mode in ((floats, False, dk.CVT), (ints, True, dk.BITS), (ints, True, dk.CVT)):
            gemv = build(dk._gemv_kernel, pointers, KV_OUT=True, HAS_SCALES=scales, INT8_BITS=mode, **flags,
                         **dk._GEMV_CONFIGS[0].kwargs)
            int_to_float[mode] = int_to_float_count(gemv)
            if scales and mode == dk.BITS:
                bits_gemv = gemv
            built += [gemv, build(dk._small_mm_kernel, pointers, KV_OUT=True, HAS_SCALES=scales, **flags,
                                  BLOCK_M=16, **dk._SMALL_MM_CONFIGS[0].kwargs),
                      build(dk._mm_kernel, pointers, KV_OUT=True, HAS_SCALES=scales, **flags,
                            **dk._MM_CONFIGS[0].kwargs)]
        # DECODE_INT8_CONVERT=half: its inline PTX assembles, with packed fp16 subtractions and
        # no int-to-float conversion
        half = build(dk._gemv_kernel, ints, KV_OUT=True, HAS_SCALES=True, INT8_BITS=dk.HALF, **flags,
                     **dk._GEMV_CONFIGS[0].kwargs)
        int_to_float[dk.HALF] = int_to_float_count(half)
        assert "sub.rn.f16x2" in half.asm["ptx"] and "prmt.b32" in half.asm["ptx"]
        # ... and fewer instructions in its K loop than the bits conversion (int8_convert_sass.json)
        assert sum(loop_instructions(half).values()) < sum(loop_instructions(bits_gemv).values())
        # half_offset: half without its f16x2 subtractions, fewer instructions still
        offset = build(dk._gemv_kernel, ints, KV_OUT=True, HAS_SCALES=True, INT8_BITS=dk.HALF_OFFSET, **flags,
                       **dk._GEMV_CONFIGS[0].kwargs)
        int_to_float[dk.HALF_OFFSET] = int_to_float_count(offset)
        assert "prmt.b32" in offset.asm["ptx"] and "sub.rn.f16x2" not in offset.asm["ptx"]
        assert sum(loop_instructions(offset).values()) < sum(loop_instructions(half).values())
        built += [half, offset]
        built.append(build(dk._attention_kernel, {"pos_ptr": "*i64"}, D=64, BLOCK_T=128, USE_PDL=True))
        assert all(k.asm["cubin"] and "griddepcontrol.wait" in k.asm["ptx"] for k in built)
        assert int_to_float[dk.BITS] == int_to_float[dk.HALF] == int_to_float[dk.HALF_OFFSET] == 0, int_to_float
        assert int_to_float[dk.CVT] > 0, int_to_float
        print("built", len(built))
    """)
    assert "built 12" in out
