"""The fused, chunked lm_head + cross-entropy (model.py) against F.cross_entropy on full
logits, alone and inside a tiny GPT with tied embeddings; train.py's loss_impl and
sdpa_backend switches."""
from __future__ import annotations

import json
import logging

import pytest
import torch
from torch.nn import functional as F

import train
from configurator import ConfigError
from model import GPT, GPTConfig, fused_linear_cross_entropy


def reference(x: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy((x @ weight.t()).float(), targets, ignore_index=-1)


def loss_and_grads(fn, x: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor):
    x, weight = x.detach().requires_grad_(), weight.detach().requires_grad_()
    loss = fn(x, weight, targets)
    (2.5 * loss).backward()  # a grad_output other than 1 must scale the saved gradients
    return loss.detach(), x.grad, weight.grad


def problem(n: int = 37, c: int = 16, v: int = 101, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x, weight = torch.randn(n, c, generator=g), torch.randn(v, c, generator=g)
    targets = torch.randint(0, v, (n,), generator=g)
    targets[::5] = -1  # ignored rows
    return x, weight, targets


@pytest.mark.parametrize("chunk_rows", [1, 8, 37, 64])  # 37 rows: 8 leaves a remainder
def test_matches_cross_entropy_fp32(chunk_rows):
    x, weight, targets = problem()
    ref = loss_and_grads(reference, x, weight, targets)
    ours = loss_and_grads(lambda a, b, t: fused_linear_cross_entropy(a, b, t, chunk_rows), x, weight, targets)
    assert ours[0].dtype == torch.float32
    for r, o in zip(ref, ours):
        torch.testing.assert_close(o, r, rtol=1e-5, atol=1e-6)
    assert ours[1][::5].abs().max() == 0  # ignored rows get no gradient


def test_no_grad_gives_the_same_loss():
    x, weight, targets = problem()
    with torch.no_grad():
        loss = fused_linear_cross_entropy(x, weight, targets, chunk_rows=8)
    torch.testing.assert_close(loss, reference(x, weight, targets), rtol=1e-6, atol=1e-6)


def test_bf16_autocast_matches_the_plain_path():
    """Logits in bf16, loss in float32, as F.linear under autocast followed by .float()."""
    x, weight, targets = problem(n=64, c=32, v=256)

    def plain(a, b, t):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return F.cross_entropy(F.linear(a, b).float(), t, ignore_index=-1)

    def fused(a, b, t):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return fused_linear_cross_entropy(a, b, t, chunk_rows=24)

    ref, ours = loss_and_grads(plain, x, weight, targets), loss_and_grads(fused, x, weight, targets)
    torch.testing.assert_close(ours[0], ref[0], rtol=1e-5, atol=1e-5)  # same bf16 logits
    for r, o in zip(ref[1:], ours[1:]):
        assert o.dtype == r.dtype == torch.float32
        assert (o - r).abs().max() <= 2e-2 * r.abs().max()  # bf16 rounding of the gradients


def tiny_gpt_pair(loss_impl: str) -> tuple[GPT, GPT]:
    cfg = GPTConfig(block_size=16, vocab_size=96, n_layer=2, n_head=2, n_embd=32, dropout=0.0)
    torch.manual_seed(0)
    plain = GPT(cfg)
    other = GPT(cfg)
    other.load_state_dict(plain.state_dict())
    other.loss_impl, other.loss_chunk_rows = loss_impl, 10  # 3 x 16 = 48 rows: 5 chunks
    return plain, other


def tiny_batch() -> tuple[torch.Tensor, torch.Tensor]:
    idx = torch.randint(0, 96, (3, 17), generator=torch.Generator().manual_seed(3))
    x, y = idx[:, :-1], idx[:, 1:].clone()
    y[0, :4] = -1  # e.g. a masked prompt
    return x, y


def test_tied_embedding_gradients_through_gpt():
    plain, fused = tiny_gpt_pair("fused")
    assert fused.lm_head.weight is fused.transformer.wte.weight
    x, y = tiny_batch()
    logits, ref = plain(x, y)
    ref.backward()
    none, loss = fused(x, y)
    loss.backward()
    assert logits is not None and none is None  # fused returns no logits
    torch.testing.assert_close(loss, ref, rtol=1e-6, atol=1e-6)
    for (name, p), q in zip(plain.named_parameters(), fused.parameters()):
        torch.testing.assert_close(q.grad, p.grad, rtol=1e-5, atol=1e-6, msg=name)


def test_fused_loss_traces_in_one_graph():
    """torch.compile with fullgraph=True: dynamo traces the autograd.Function and its chunk
    loop without a graph break (aot_eager: the same trace as inductor, no C++ compiler)."""
    plain, fused = tiny_gpt_pair("fused")
    x, y = tiny_batch()
    _, ref = plain(x, y)
    ref.backward()
    _, loss = torch.compile(fused, backend="aot_eager", fullgraph=True)(x, y)
    loss.backward()
    torch.testing.assert_close(loss, ref, rtol=1e-6, atol=1e-6)
    for p, q in zip(plain.parameters(), fused.parameters()):
        torch.testing.assert_close(q.grad, p.grad, rtol=1e-5, atol=1e-6)


def train_losses(out_dir) -> list[float]:
    lines = (out_dir / "train_log.jsonl").read_text().splitlines()
    return [e["loss"] for e in map(json.loads, lines) if e["kind"] == "train"]


def test_training_curve_fused_equals_plain(tiny_train_config, tmp_path):
    kw = dict(max_iters=8, eval_interval=4, loss_chunk_rows=50)  # 4 x 32 rows: chunks of 50
    fused = train.train(tiny_train_config(tmp_path / "fused", loss_impl="fused", **kw))
    plain = train.train(tiny_train_config(tmp_path / "plain", loss_impl="plain", **kw))
    a, b = train_losses(tmp_path / "fused"), train_losses(tmp_path / "plain")
    assert len(a) == len(b) == 8
    for la, lb in zip(a, b):
        assert abs(la - lb) < 1e-5, (a, b)
    assert abs(fused["best_val_loss"] - plain["best_val_loss"]) < 1e-5


def test_sdpa_math_backend_trains_on_cpu(tiny_train_config, tmp_path):
    kw = dict(max_iters=3, eval_interval=3)
    auto = train.train(tiny_train_config(tmp_path / "auto", **kw))
    math_ = train.train(tiny_train_config(tmp_path / "math", sdpa_backend="math", **kw))
    assert abs(auto["train_loss"] - math_["train_loss"]) < 1e-4


def test_unavailable_sdpa_backend_is_one_line_error(tiny_train_config, tmp_path, caplog):
    cfg = tiny_train_config(tmp_path / "x", max_iters=1)
    args = [f"--{k}={v}" for k, v in vars(cfg).items()] + ["--sdpa_backend=cudnn"]
    with caplog.at_level(logging.ERROR, logger="train"):
        assert train.main(args) == 2
    [record] = [r for r in caplog.records if r.levelno >= logging.ERROR]
    message = record.getMessage()
    assert "sdpa_backend" in message and "cudnn" in message and "\n" not in message


@pytest.mark.parametrize("key, value", [("loss_impl", "chunky"), ("sdpa_backend", "fast"),
                                        ("loss_chunk_rows", 0)])
def test_bad_loss_or_sdpa_config(tiny_train_config, tmp_path, key, value):
    with pytest.raises(ConfigError, match=key):
        tiny_train_config(tmp_path, **{key: value})


def test_train_bench_smoke(tmp_path):
    """bench/train_bench.py end to end on the CPU: baseline, a sweep with an unavailable
    backend (recorded, not fatal), the fastest variant as "ours"."""
    import importlib.util

    from conftest import ROOT

    spec = importlib.util.spec_from_file_location("train_bench", ROOT / "bench" / "train_bench.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    out = tmp_path / "bench.json"
    assert bench.main(["--smoke", "--steps=2", "--micro_steps=2", "--out", str(out),
                       "--variants=plain:auto:4,fused:cudnn:4,fused:math:8"]) == 0
    result = json.loads(out.read_text())
    assert {"baseline", "ours", "variants", "sweep", "device", "date", "command"} <= set(result)
    by_name = {v["name"]: v for v in result["variants"]}
    assert "cudnn" in by_name["fused:cudnn:4"]["error"]
    assert by_name["fused:math:8"]["shape"]["grad_accum"] == 3  # 24 sequences per step
    assert result["ours"]["settings"]["loss_impl"] in ("plain", "fused")
    assert result["ours"]["tokens_per_s"] == max(v["tokens_per_s"] for v in result["variants"] if "error" not in v)
