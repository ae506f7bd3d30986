"""The engine's CUDA path (compiled decode step in CUDA graphs): skipped without a GPU.

CI has no GPU, so tests/test_engine.py covers the same logic eagerly on CPU; this file is what
the GPU machine runs (`python -m pytest tests/test_engine_cuda.py`)."""
from __future__ import annotations

import random

import pytest
import torch

from engine import Engine, SamplingParams, generate_without_cache
from model import GPT, GPTConfig

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@pytest.fixture(scope="module")
def model() -> GPT:
    torch.manual_seed(0)
    torch.backends.cuda.matmul.allow_tf32 = False  # exact fp32 for the token-for-token check
    torch.backends.cudnn.allow_tf32 = False
    return GPT(GPTConfig(block_size=256, vocab_size=512, n_layer=3, n_head=4, n_embd=128)).cuda().eval()


@pytest.mark.parametrize("compile,decode_steps", [(False, 1), (False, 8), (True, 8)])
def test_graphed_decode_equals_no_cache_greedy(model, compile, decode_steps):
    rng = random.Random(0)
    reqs = [([rng.randrange(512) for _ in range(rng.randint(1, 120))], rng.randint(1, 60)) for _ in range(12)]
    reference = [generate_without_cache(model, p, n) for p, n in reqs]
    engine = Engine(model, max_batch=8, prefill_chunk=32, prefill_batch=3, compile=compile,
                    decode_steps=decode_steps)
    engine.warmup(engine.max_seq_len)
    out = engine.generate_batch([p for p, _ in reqs[:6]], SamplingParams(max_tokens=60))
    for (p, n), got, ref in zip(reqs[:6], out, reference[:6]):
        assert got[:n] == ref[:n]
    # one at a time: requests of every length through the batch-1 graphs
    for (p, n), ref in zip(reqs[6:], reference[6:]):
        assert engine.generate(p, SamplingParams(max_tokens=n)) == ref


def test_seeded_sampling_is_reproducible_across_batches(model):
    engine = Engine(model, max_batch=8, compile=True)
    params = SamplingParams(max_tokens=30, temperature=0.9, top_k=40, top_p=0.95, seed=7)
    alone = engine.generate([5, 6, 7, 8], params)
    noise = [[rng_tok] * 9 for rng_tok in range(1, 6)]
    batch = engine.generate_batch([[5, 6, 7, 8]] + noise, params)
    assert batch[0] == alone and len(alone) == 30


def test_bf16_engine_runs_at_full_batch(model):
    m = GPT(model.config).cuda().to(torch.bfloat16).eval()
    engine = Engine(m, max_batch=64)
    engine.warmup(128)
    out = engine.generate_batch([[i % 500 + 1] * 64 for i in range(64)], SamplingParams(max_tokens=50))
    assert all(len(o) == 50 for o in out)


def test_int8_weight_only_kernel_matches_plain_formula_and_serves(model):
    """bf16 int8-weight-only: the Triton kernels (the 16-row tile up to 16 rows, the row-tiled
    kernel above, up to INT8_KERNEL_ROWS) against the plain formula, and the compiled engine
    serving the quantized model through them at batches on both sides of 16 rows."""
    import decode_kernels
    from quantization import WeightOnlyInt8Linear, quantize_model, set_int8_kernel
    qmodel, _ = quantize_model(model.cpu().float(), "int8-weight-only")
    model.cuda()
    qmodel = qmodel.cuda().to(torch.bfloat16).eval()
    assert decode_kernels.available() and set_int8_kernel(qmodel, True) > 0
    lin = next(m for m in qmodel.modules() if isinstance(m, WeightOnlyInt8Linear))
    assert decode_kernels.INT8_KERNEL_ROWS >= 256
    for rows in (1, 5, 16, 17, 40, 100, 256):
        x = torch.randn(rows, lin.in_features, device="cuda", dtype=torch.bfloat16)
        assert decode_kernels.on_kernels(x, lin), rows
        plain = (x.float() @ lin.qweight.float().T) * lin.scales.float() + lin.bias.float()
        err = ((lin(x).float() - plain).abs().max() / plain.abs().max()).item()
        assert err < 2e-2, (rows, err)
    # one row through each int8 conversion; half's inline PTX runs only here (not in the interpreter)
    every = torch.arange(-128, 128, dtype=torch.int16).to(torch.int8).view(4, 64).cuda()
    x = torch.randn(1, 64, device="cuda", dtype=torch.bfloat16)
    ones = torch.ones(4, device="cuda", dtype=torch.bfloat16)
    # and several K blocks with a masked tail (half_offset takes its offset off per x element)
    long_w = torch.randint(-128, 128, (40, 1040), dtype=torch.int8, device="cuda")
    long_x = torch.randn(1, 1040, device="cuda", dtype=torch.bfloat16)
    long_want = long_x.float() @ long_w.float().T
    before = decode_kernels.INT8_CONVERT
    try:
        for convert in decode_kernels.INT8_CONVERTS:
            decode_kernels.INT8_CONVERT = convert
            got = decode_kernels.linear(x, every, scales=ones).float()
            assert torch.allclose(got, x.float() @ every.float().T, rtol=1e-2, atol=1e-2), convert
            got = decode_kernels.linear(long_x, long_w, scales=torch.ones(40, device="cuda")).float()
            err = ((got - long_want).abs().max() / long_want.abs().max()).item()
            assert err < 1e-2, (convert, err)
    finally:
        decode_kernels.INT8_CONVERT = before
    engine = Engine(qmodel, max_batch=48, compile=True)
    engine.warmup(64)
    prompt = [5, 6, 7, 8]
    with torch.no_grad():
        logits, _ = qmodel(torch.tensor([prompt], device="cuda"))
    for batch in (3, 40):  # decode rows on the 16-row tile, then on the row-tiled kernel
        out = engine.generate_batch([prompt] * batch, SamplingParams(max_tokens=20))
        assert all(len(o) == 20 for o in out) and out[0][0] == int(logits[0, -1].argmax())


def test_bf16_decode_kernels_match_torch_ops(model):
    """decode_kernels.py in bf16 on the GPU (the interpreter tests can't run bf16 tl.dot): the
    fused decode step, eager and compiled with a dynamic batch, against the torch-ops step, at
    batches on the kernels' GEMV (1), tl.dot (5, 16) and cuBLAS-plus-attention-kernel (40) paths."""
    import model as model_module
    cfg = model.config
    m = GPT(cfg).cuda().to(torch.bfloat16).eval()
    D = cfg.n_embd // cfg.n_head
    cache = torch.randn(cfg.n_layer, 2, 41, cfg.n_head, 257, D, device="cuda", dtype=torch.bfloat16)
    compiled = torch.compile(m.decode_step, dynamic=True, fullgraph=True)
    try:
        for B in (1, 5, 16, 40):
            tokens = torch.randint(0, cfg.vocab_size, (B,), device="cuda")
            pos = torch.randint(0, 200, (B,), device="cuda")
            with torch.no_grad():
                model_module.DECODE_KERNELS = "torch"
                want, want_kv = m.decode_step(tokens, pos, cache, 256)
                model_module.DECODE_KERNELS = "triton"
                for step in (m.decode_step, compiled):
                    got, got_kv = step(tokens, pos, cache, 256)
                    err = ((got.float() - want.float()).abs().max() / want.float().abs().max()).item()
                    assert err < 3e-2, (B, err)
                    assert torch.allclose(got_kv.float(), want_kv.float(), atol=3e-2, rtol=3e-2)
                    # the engine's way: the step writes the new K/V into the cache itself
                    written = cache.clone()
                    got, none = step(tokens, pos, written, 256, write_kv=True)
                    err = ((got.float() - want.float()).abs().max() / want.float().abs().max()).item()
                    assert none is None and err < 3e-2, (B, err)
                    rows = torch.arange(B, device="cuda")
                    assert torch.allclose(written[:, :, rows, :, pos].float(), want_kv.float(), atol=3e-2, rtol=3e-2)
                    untouched = torch.ones_like(cache, dtype=torch.bool)
                    untouched[:, :, rows, :, pos] = False
                    assert torch.equal(written[untouched], cache[untouched])  # nothing else written
    finally:
        model_module.DECODE_KERNELS = "triton"
