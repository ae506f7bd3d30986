"""train.py end to end on a 2-layer CPU model: checkpoints, resume, crash safety, config errors,
SIGTERM, and DDP (2 gloo processes) against one process with the same global batch."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import asdict
from pathlib import Path

import pytest
import torch

import checkpoint
from checkpoint import load_model, load_resume, read_meta
from train import train

from conftest import ROOT

TORCHRUN = Path(sys.executable).with_name("torchrun")


def train_losses(out_dir: Path) -> dict[int, float]:
    lines = (Path(out_dir) / "train_log.jsonl").read_text().splitlines()
    return {e["iter"]: e["loss"] for e in map(json.loads, lines) if e["kind"] == "train"}


def cli_args(cfg) -> list[str]:
    return [f"--{k}={v}" for k, v in asdict(cfg).items()]


def test_best_checkpoint_and_resume(tiny_ckpt_dir, tiny_train_config, tmp_path):
    model, tok, meta = load_model(tiny_ckpt_dir)
    assert meta["step"] in (3, 6) and meta["tokenizer"] == "bpe" and meta["data_hash"]
    assert meta["val_loss"] == min(e["val_loss"] for e in map(json.loads, (tiny_ckpt_dir / "train_log.jsonl")
                                                               .read_text().splitlines()) if e["kind"] == "eval")
    assert (tiny_ckpt_dir / "loss_curve.png").stat().st_size > 1000
    log_entry = next(e for e in map(json.loads, (tiny_ckpt_dir / "train_log.jsonl").read_text().splitlines())
                     if e["kind"] == "train")
    assert {"iter", "loss", "lr", "tokens_per_s", "mfu"} <= set(log_entry)
    # resume from a copy so the session fixture stays as it was
    out = tmp_path / "resumed"
    out.mkdir()
    for f in tiny_ckpt_dir.iterdir():
        (out / f.name).write_bytes(f.read_bytes())
    assert load_resume(out)["step"] == 6
    result = train(tiny_train_config(out, init_from="resume", max_iters=9, eval_interval=3))
    assert result["step"] == 9
    assert min(train_losses(out)) == 1 and max(train_losses(out)) == 9
    assert sorted(train_losses(out)) == list(range(1, 10))  # 1..6 kept from before, 7..9 new


def test_straight_equals_resumed(tiny_train_config, tmp_path):
    """20 steps in one go and 10 + resume + 10 end at the same loss (CPU fp32, dropout 0)."""
    kw = dict(lr_decay_iters=20, eval_interval=5, fim_rate=0.5)
    straight = train(tiny_train_config(tmp_path / "a", max_iters=20, **kw))
    train(tiny_train_config(tmp_path / "b", max_iters=10, **kw))
    resumed = train(tiny_train_config(tmp_path / "b", max_iters=20, init_from="resume", **kw))
    a, b = train_losses(tmp_path / "a"), train_losses(tmp_path / "b")
    assert sorted(a) == sorted(b) == list(range(1, 21))
    for it in range(1, 21):
        assert abs(a[it] - b[it]) < 1e-6, it
    assert abs(straight["best_val_loss"] - resumed["best_val_loss"]) < 1e-6
    assert read_meta(tmp_path / "a")["val_loss"] == pytest.approx(read_meta(tmp_path / "b")["val_loss"], abs=1e-6)


def test_crash_mid_save_keeps_previous_checkpoint(tiny_ckpt_dir, tmp_path, monkeypatch):
    out = tmp_path / "ckpt"
    out.mkdir()
    for f in tiny_ckpt_dir.iterdir():
        (out / f.name).write_bytes(f.read_bytes())
    old_model, _, old_meta = load_model(out)
    old_step = load_resume(out)["step"]

    def crashing_write(path, write_fn):
        def half_then_die(tmp):
            Path(tmp).write_bytes(b"\0" * 100)  # a partial file...
            raise KeyboardInterrupt("killed during the write")  # ...and the process dies
        return real_atomic_write(path, half_then_die)

    real_atomic_write = checkpoint.atomic_write
    monkeypatch.setattr(checkpoint, "atomic_write", crashing_write)
    state = {k: torch.zeros_like(v) for k, v in old_model.state_dict().items()}
    with pytest.raises(KeyboardInterrupt):
        checkpoint.save_model(out, state, {**old_meta, "step": 999})
    with pytest.raises(KeyboardInterrupt):
        checkpoint.save_resume(out, {"step": 999})
    monkeypatch.undo()
    model, _, meta = load_model(out)
    assert meta["step"] == old_meta["step"]
    for k, v in old_model.state_dict().items():
        assert torch.equal(model.state_dict()[k], v)
    assert load_resume(out)["step"] == old_step
    assert not [p for p in out.iterdir() if p.name.endswith(".tmp")]  # no litter


@pytest.mark.slow
def test_sigkill_during_saves_leaves_a_loadable_checkpoint(tiny_ckpt_dir, tmp_path):
    """A real kill -9 at an arbitrary moment of a loop of saves (no cooperation from the code)."""
    out = tmp_path / "ckpt"
    out.mkdir()
    for f in tiny_ckpt_dir.iterdir():
        (out / f.name).write_bytes(f.read_bytes())
    script = (
        "import sys, torch, checkpoint\n"
        "state, meta = checkpoint.load_state(sys.argv[1])\n"
        "big = {k: v.repeat(20, *([1] * (v.dim() - 1))) if v.dim() else v for k, v in state.items()}\n"
        "print('ready', flush=True)\n"
        "for i in range(10**6):\n"
        "    checkpoint.save_model(sys.argv[1], state, {**meta, 'step': i})\n"
        "    checkpoint.save_resume(sys.argv[1], {'step': i, 'big': big})\n")
    proc = subprocess.Popen([sys.executable, "-c", script, str(out)], cwd=ROOT,
                            stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "ready"
    time.sleep(1.5)
    proc.kill()
    proc.wait()
    _, _, meta = load_model(out)
    assert isinstance(meta["step"], int)
    assert isinstance(load_resume(out)["step"], int)


@pytest.mark.parametrize("arg, name", [("--n_layr=3", "n_layr"), ("--dtype=float8", "dtype"),
                                       ("--batch_size=many", "batch_size")])
def test_bad_config_is_a_clear_error(arg, name):
    proc = subprocess.run([sys.executable, "train.py", "config/tiny.py", arg], cwd=ROOT,
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode != 0
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and name in lines[0] and "Traceback" not in proc.stderr, proc.stderr


def test_sigterm_saves_resume_and_exits_zero(tiny_train_config, tmp_path):
    out = tmp_path / "spot"
    cfg = tiny_train_config(out, max_iters=100000, eval_interval=1000, eval_iters=1)
    proc = subprocess.Popen([sys.executable, "train.py", *cli_args(cfg)], cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    log_path = out / "train_log.jsonl"
    deadline = time.time() + 60
    while time.time() < deadline and len(train_losses(out) if log_path.exists() else {}) < 3:
        time.sleep(0.1)
    proc.send_signal(signal.SIGTERM)
    output, _ = proc.communicate(timeout=60)
    assert proc.returncode == 0, output
    assert "stopped by signal" in output
    stopped_at = load_resume(out)["step"]
    assert stopped_at >= 3
    result = train(tiny_train_config(out, init_from="resume", max_iters=stopped_at + 2,
                                     eval_interval=1000, eval_iters=1))
    assert result["step"] == stopped_at + 2
    assert sorted(train_losses(out))[-3:] == [stopped_at, stopped_at + 1, stopped_at + 2]


@pytest.mark.skipif(not TORCHRUN.exists(), reason="torchrun not installed beside python")
@pytest.mark.slow
def test_ddp_two_processes_match_one(tiny_train_config, tmp_path):
    """2 gloo ranks with 1 micro-step each == 1 process with 2 micro-steps (same global batch)."""
    kw = dict(max_iters=6, gradient_accumulation_steps=2, eval_interval=3, eval_iters=2, fim_rate=0.5)
    train(tiny_train_config(tmp_path / "one", **kw))
    cfg = tiny_train_config(tmp_path / "two", **kw)
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    proc = subprocess.run([str(TORCHRUN), "--standalone", "--nproc_per_node=2", "train.py", *cli_args(cfg)],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stderr[-3000:]
    one, two = train_losses(tmp_path / "one"), train_losses(tmp_path / "two")
    assert sorted(one) == sorted(two) == list(range(1, 7))
    for it in one:
        assert abs(one[it] - two[it]) < 1e-4, (it, one[it], two[it])
    assert read_meta(tmp_path / "two")["val_loss"] == pytest.approx(read_meta(tmp_path / "one")["val_loss"], abs=1e-4)
