"""quantization.py, quantize_model.py and loading quantized checkpoints.

A 2-layer, 64-dim model trained by train.py for a few dozen steps on the tiny stdlib dataset of
conftest.py is quantized by the real CLI (in a subprocess), loaded back in a fresh process
through checkpoint.load_model, and checked against the in-process quantized model: the same
greedy tokens, perplexity within the gate, refusals with the right exit codes, and no pickle
ever executed on the way in.
"""
from __future__ import annotations

import json
import pickle
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import safe_open

import checkpoint
from checkpoint import CheckpointError
from engine import Engine, SamplingParams, generate_without_cache
from quantization import (MODES, WeightOnlyInt8Linear, check_device, perplexity,
                          quantize_int4_grouped, quantize_int8_per_channel, quantize_model,
                          unpack_int4)

ROOT = Path(__file__).resolve().parents[1]
PROMPT = [5, 17, 42, 7, 99, 3, 250, 11]
INT8_MODES = ("int8-dynamic", "int8-weight-only")
# small and quick: the speed part of the CLI is exercised, not measured
FAST = ["--ppl-windows", "8", "--ppl-block", "32", "--bench-tokens", "4", "--bench-runs", "1"]


def cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "quantize_model.py", *args], cwd=ROOT,
                          capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory: pytest.TempPathFactory, tiny_train_config) -> Path:
    """A float checkpoint that has learned something (loss well under uniform)."""
    from train import train

    out = tmp_path_factory.mktemp("qckpt") / "float"
    train(tiny_train_config(out, n_embd=64, n_head=2, block_size=64, max_iters=40,
                            eval_interval=20, learning_rate=1e-2, min_lr=1e-3, fim_rate=0.0))
    return out


@pytest.fixture(scope="module")
def float_model(ckpt: Path):
    state, meta = checkpoint.load_state(ckpt)
    return checkpoint.build_model(state, meta).eval()


@pytest.fixture(scope="module")
def val_tokens(tiny_data_dir: Path) -> np.ndarray:
    return np.fromfile(tiny_data_dir / "val.bin", dtype=np.uint16)


def test_model_is_trained(float_model, val_tokens: np.ndarray) -> None:
    # otherwise "loss within the gate" would compare two near-uniform models
    assert perplexity(float_model, val_tokens, 32, 8) < 0.5 * float_model.config.vocab_size


# ---------------------------------------------------------------------------------------------
# quantizers

def test_int8_per_channel_error_is_half_a_step() -> None:
    w = torch.randn(48, 80) * torch.linspace(0.01, 3.0, 48)[:, None]  # rows of very different range
    w[3] = 0.0  # an all-zero row must not divide by zero
    q, scales = quantize_int8_per_channel(w)
    assert q.dtype == torch.int8 and q.abs().max() <= 127
    err = (q.float() * scales[:, None] - w).abs()
    assert bool((err <= scales[:, None] / 2 + 1e-6).all())
    assert bool((q[3] == 0).all())


def test_int4_packs_two_per_byte_and_round_trips() -> None:
    w = torch.randn(16, 128)
    packed, scales, mins = quantize_int4_grouped(w, 32)
    assert packed.dtype == torch.uint8 and packed.shape == (16, 64) and scales.shape == (16, 4)
    q = unpack_int4(packed)
    assert int(q.max()) <= 15
    deq = (q.float().view(16, 4, 32) * scales[..., None] + mins[..., None]).view(16, 128)
    assert bool(((deq - w).abs() <= scales.repeat_interleave(32, dim=1) / 2 + 1e-5).all())


# ---------------------------------------------------------------------------------------------
# in-process: the engine runs quantized models, loss stays close

@pytest.mark.parametrize("mode", MODES)
def test_engine_runs_quantized_model_on_cpu(float_model, mode: str) -> None:
    qmodel, _ = quantize_model(float_model, mode, group_size=32)
    assert isinstance(qmodel, type(float_model))  # still a model.GPT: the engine relies on it
    assert qmodel.transformer.wte.weight.dtype == torch.float32
    engine = Engine(qmodel, max_batch=4)
    greedy = SamplingParams(max_tokens=12)
    reference = generate_without_cache(qmodel, PROMPT, 12)
    assert engine.generate(PROMPT, greedy) == reference
    prompts = [PROMPT, PROMPT[:3], PROMPT[2:]]
    batched = engine.generate_batch(prompts, greedy)
    assert batched == [generate_without_cache(qmodel, p, 12) for p in prompts]


@pytest.mark.parametrize("mode", INT8_MODES)
def test_int8_loss_within_gate(float_model, val_tokens: np.ndarray, mode: str) -> None:
    qmodel, state = quantize_model(float_model, mode)
    before = perplexity(float_model, val_tokens, 32, 8)
    after = perplexity(qmodel, val_tokens, 32, 8)
    assert abs(after / before - 1) * 100 <= 2.0
    assert state["lm_head.qweight"].dtype == torch.int8
    # the tied embedding is lm_head's int8 rows dequantized, not a second float copy
    assert "transformer.wte.weight" not in state
    if mode == "int8-weight-only":
        assert isinstance(qmodel.lm_head, WeightOnlyInt8Linear)
        assert torch.equal(qmodel.transformer.wte.weight, qmodel.lm_head.dequantized_weight())


# ---------------------------------------------------------------------------------------------
# the CLI, and loading in a fresh process

LOAD_AND_GENERATE = """
import json, sys
from checkpoint import load_model
from engine import Engine, SamplingParams, generate_without_cache
model, tok, meta = load_model(sys.argv[1])
prompt = json.loads(sys.argv[2])
print(json.dumps({"engine": Engine(model, max_batch=2).generate(prompt, SamplingParams(max_tokens=12)),
                  "naive": generate_without_cache(model, prompt, 12),
                  "lm_head": f"{type(model.lm_head).__module__}.{type(model.lm_head).__name__}", "mode": meta["quantization"]["mode"]}))
"""


@pytest.mark.parametrize("mode", INT8_MODES)
def test_cli_writes_checkpoint_that_a_fresh_process_loads(ckpt: Path, tiny_data_dir: Path,
                                                          float_model, tmp_path: Path, mode: str) -> None:
    out = tmp_path / "q"
    result = cli("--ckpt", str(ckpt), "--mode", mode, "--out", str(out),
                 "--data-dir", str(tiny_data_dir), *FAST)
    assert result.returncode == 0, result.stderr
    report = json.loads((out / "quantization_report.json").read_text())
    assert report["perplexity"]["passed"] and report["perplexity"]["increase_pct"] <= 2.0
    assert report["size_mb"]["after"] < report["size_mb"]["before"]
    assert {"ms_per_token_b1", "tokens_per_s_b16"} <= set(report["speed"]["after"])
    assert (out / "tokenizer.json").exists()
    with safe_open(str(out / checkpoint.MODEL_FILE), framework="pt") as f:
        meta = json.loads(f.metadata()["meta"])
        assert meta["quantization"]["mode"] == mode
        assert f.get_tensor("transformer.h.0.mlp.c_fc.qweight").dtype == torch.int8

    qmodel, _ = quantize_model(float_model, mode)
    before = Engine(qmodel, max_batch=2).generate(PROMPT, SamplingParams(max_tokens=12))
    fresh = subprocess.run([sys.executable, "-c", LOAD_AND_GENERATE, str(out), json.dumps(PROMPT)],
                           cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert fresh.returncode == 0, fresh.stderr
    loaded = json.loads(fresh.stdout.strip().splitlines()[-1])
    assert loaded["mode"] == mode and loaded["lm_head"] != "torch.nn.modules.linear.Linear"
    assert loaded["engine"] == before == loaded["naive"]


def test_gate_refuses_int4_and_force_writes(ckpt: Path, tiny_data_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "q4"
    args = ["--ckpt", str(ckpt), "--mode", "int4-weight-only", "--group-size", "64",
            "--out", str(out), "--data-dir", str(tiny_data_dir), "--max-ppl-increase", "0.001", *FAST]
    refused = cli(*args)
    assert refused.returncode == 3, refused.stderr
    # the last line (evaluate.py's exact-match progress may come before it)
    line = refused.stderr.strip().splitlines()[-1]
    assert line.startswith("refused:") and "->" in line and "%" in line
    assert not out.exists()

    forced = cli(*args, "--force", "--no-bench")
    assert forced.returncode == 0, forced.stderr
    state, meta = checkpoint.load_state(out)
    assert meta["quantization"] == {**meta["quantization"], "mode": "int4-weight-only", "group_size": 64}
    assert state["lm_head.qweight"].dtype == torch.uint8  # two 4-bit values per byte


# ---------------------------------------------------------------------------------------------
# bad and hostile input

class _TouchOnUnpickle:
    """Unpickling this opens (creates) a file: a stand-in for arbitrary code execution."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


def test_pickles_are_never_executed(ckpt: Path, tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    bad = tmp_path / "bad"
    shutil.copytree(ckpt, bad)
    # a model file replaced by a pickle (the chapter's torch.save format)
    (bad / checkpoint.MODEL_FILE).write_bytes(pickle.dumps({"model": _TouchOnUnpickle(marker)}))
    with pytest.raises(CheckpointError):
        checkpoint.load_model(bad)
    result = cli("--ckpt", str(bad), "--mode", "int8-dynamic")
    assert result.returncode == 2 and "Traceback" not in result.stderr
    # a resume.pt holding one
    torch.save({"model": _TouchOnUnpickle(marker)}, bad / checkpoint.RESUME_FILE)
    with pytest.raises(CheckpointError):
        checkpoint.load_resume(bad)
    assert not marker.exists()


def test_garbage_and_incomplete_quantized_checkpoints_are_refused(ckpt: Path, float_model,
                                                                  tmp_path: Path) -> None:
    garbage = tmp_path / "garbage"
    shutil.copytree(ckpt, garbage)
    (garbage / checkpoint.MODEL_FILE).write_bytes(b"\x00\x01 not a safetensors file" * 100)
    with pytest.raises(CheckpointError):
        checkpoint.load_model(garbage)

    _, state = quantize_model(float_model, "int8-weight-only")
    meta = {"model_config": float_model.config.to_dict(),
            "quantization": {"mode": "int8-weight-only"}}
    del state["transformer.h.1.attn.c_proj.scales"]
    checkpoint.save_model(tmp_path / "partial", state, meta, tokenizer_dir=ckpt)
    with pytest.raises(CheckpointError, match="c_proj.scales"):
        checkpoint.load_model(tmp_path / "partial")
    checkpoint.save_model(tmp_path / "unknown", state, {**meta, "quantization": {"mode": "int3"}})
    with pytest.raises(CheckpointError, match="int3"):
        checkpoint.load_model(tmp_path / "unknown")


def test_int8_dynamic_is_refused_off_the_cpu() -> None:
    check_device({"quantization": {"mode": "int8-dynamic"}}, "cpu")
    check_device({"quantization": {"mode": "int8-weight-only"}}, "cuda")
    with pytest.raises(CheckpointError, match="CPU only"):
        check_device({"quantization": {"mode": "int8-dynamic"}}, "cuda")


@pytest.mark.parametrize("case", ["unknown-mode", "missing", "corrupt"])
def test_cli_bad_input_is_one_line_exit_2(ckpt: Path, tmp_path: Path, case: str) -> None:
    mode, path, name = "int8-dynamic", ckpt, None
    if case == "unknown-mode":
        mode = name = "int7-magic"
    elif case == "missing":
        path = tmp_path / "no-such-ckpt"
        name = str(path)
    else:
        path = tmp_path / "corrupt"
        path.mkdir()
        (path / checkpoint.MODEL_FILE).write_bytes(b"\xff" * 64)
        name = str(path)
    result = cli("--ckpt", str(path), "--mode", mode, "--out", str(tmp_path / "out"))
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:") and name in lines[0], result.stderr
    assert not (tmp_path / "out").exists()
