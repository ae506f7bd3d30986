"""Checkpoints: tensors in safetensors plus JSON meta, always written atomically.

A model directory (what `MODEL_PATH`, sample.py and evaluate.py take) holds
    model.safetensors   the weights; the meta JSON is also embedded in its header, so the
                        one file that is renamed into place carries everything needed
    meta.json           a readable copy of that meta (model config, tokenizer, step, val loss,
                        data hash, quantization)
    tokenizer.json (+ tokenizer.tiktoken)   the tokenizer, so the directory is self-contained
Training also keeps `resume.pt` (model, optimizer, step, RNG, data position) for
`init_from=resume`: plain tensors and containers, loaded with `weights_only=True`.
"""
from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, safe_open, save_file

from model import GPT, GPTConfig

log = logging.getLogger(__name__)

MODEL_FILE = "model.safetensors"
META_FILE = "meta.json"
RESUME_FILE = "resume.pt"
FORMAT = "code-assistant/1"


class CheckpointError(RuntimeError):
    """A checkpoint that is missing, corrupt or of the wrong kind."""


def _fsync_dir(directory: Path) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write(path: str | Path, write_fn) -> None:
    """Call write_fn(tmp_path), fsync, then rename over `path`: a kill never leaves half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write_fn(tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
        _fsync_dir(path.parent)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def atomic_write_text(path: str | Path, text: str) -> None:
    atomic_write(path, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))


def _tied_free(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    # lm_head.weight is wte.weight (tied); safetensors refuses shared storage, so store it once.
    return {k: v.detach().contiguous().cpu() for k, v in state.items() if k != "lm_head.weight"}


def save_model(directory: str | Path, state: dict[str, torch.Tensor], meta: dict[str, Any],
               tokenizer_dir: str | Path | None = None) -> None:
    """Write weights + meta into `directory` atomically; copy the tokenizer files beside them."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    meta = {"format": FORMAT, **meta}
    if tokenizer_dir is not None and Path(tokenizer_dir).resolve() != directory.resolve():
        for name in ("tokenizer.json", "tokenizer.tiktoken"):
            src = Path(tokenizer_dir) / name
            if src.exists():
                atomic_write(directory / name, lambda tmp, src=src: shutil.copyfile(src, tmp))
    tensors = _tied_free(state)
    atomic_write(directory / MODEL_FILE,
                 lambda tmp: save_file(tensors, tmp, metadata={"meta": json.dumps(meta)}))
    atomic_write_text(directory / META_FILE, json.dumps(meta, indent=2) + "\n")


def read_meta(directory: str | Path) -> dict[str, Any]:
    """The meta embedded in model.safetensors (the authority; meta.json is a copy)."""
    path = Path(directory) / MODEL_FILE
    if not path.exists():
        raise CheckpointError(f"no checkpoint at {path}")
    try:
        with safe_open(str(path), framework="pt") as f:
            header = f.metadata() or {}
        meta = json.loads(header["meta"])
    except (SafetensorError, KeyError, ValueError, OSError) as e:
        raise CheckpointError(f"corrupt checkpoint {path}: {type(e).__name__}") from None
    if meta.get("format") != FORMAT:
        raise CheckpointError(f"{path} is not a code-assistant checkpoint")
    return meta


def load_state(directory: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    meta = read_meta(directory)
    try:
        state = load_file(str(Path(directory) / MODEL_FILE))
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(f"corrupt checkpoint {directory}: {type(e).__name__}") from None
    return state, meta


def build_model(state: dict[str, torch.Tensor], meta: dict[str, Any]) -> GPT:
    """A float GPT from a (tied-free) state dict; quantized checkpoints go through quantization.py."""
    try:
        model = GPT(GPTConfig(**meta["model_config"]))
    except (KeyError, TypeError, ValueError, AssertionError) as e:
        raise CheckpointError(f"bad model_config in the checkpoint meta: {type(e).__name__}") from None
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [k for k in missing if k != "lm_head.weight"]
    if missing or unexpected:
        raise CheckpointError(f"checkpoint does not fit the model: missing {missing[:3]}, "
                              f"unexpected {unexpected[:3]}")
    return model


def load_model(directory: str | Path, device: str | torch.device = "cpu",
               dtype: torch.dtype | None = None):
    """(model in eval mode, tokenizer, meta) from a model directory, float or quantized."""
    from tokenizer import load_tokenizer  # imported here: tokenizer pulls in tiktoken

    state, meta = load_state(directory)
    if meta.get("quantization"):
        from quantization import build_quantized_model, check_device
        check_device(meta, device)  # int8-dynamic kernels are CPU-only: say so now, not mid-request
        model = build_quantized_model(state, meta)
    else:
        model = build_model(state, meta)
    # Weight-only quantized modules keep int8 weights; .to(dtype) converts only float tensors
    # (activations, scales, embeddings). torch.ao's dynamic modules stay as they are.
    if dtype is not None and (meta.get("quantization") or {}).get("mode") != "int8-dynamic":
        model = model.to(dtype=dtype)
    model = model.to(device).eval()
    return model, load_tokenizer(directory), meta


def save_resume(directory: str | Path, state: dict[str, Any]) -> None:
    """Resume state (tensors, numbers, strings, containers only) via torch.save, atomically."""
    atomic_write(Path(directory) / RESUME_FILE, lambda tmp: torch.save(state, tmp))


def load_resume(directory: str | Path, map_location: str = "cpu") -> dict[str, Any]:
    path = Path(directory) / RESUME_FILE
    if not path.exists():
        raise CheckpointError(f"init_from=resume but there is no {path}")
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # a refused pickle or a truncated file: never unpickle it further
        raise CheckpointError(f"cannot load {path}: {type(e).__name__}") from None
