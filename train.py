"""Train the code-assistant GPT: from scratch, from GPT-2 weights or resumed; 1 CPU to N GPUs.

    # CPU: a tiny model that learns the standard library in a few minutes on 2 cores
    python collect_code.py --out data/stdlib
    python train.py config/tiny.py
    python train.py config/tiny.py --max_iters=100 --out_dir=out-try   # any field as --key=value

    # one GPU: fine-tune GPT-2 124M on your code (the chapter's recipe), or from scratch
    python train.py config/train_code_assistant.py --dataset=python_code
    python train.py config/train_code_assistant_scratch.py --dataset=python_code
    # the loss and attention kernels (bench/train_bench.py compares them): --loss_impl=fused|plain,
    # --sdpa_backend=auto|cudnn|flash|efficient|math (an unavailable one is a one-line error)
    python train.py config/train_code_assistant.py --dataset=python_code --sdpa_backend=cudnn

    # one node, 4 GPUs (NCCL); gradient_accumulation_steps is GLOBAL and split over the ranks
    torchrun --standalone --nproc_per_node=4 train.py config/train_code_assistant_ddp.py
    # 2 CPU processes over gloo (what the tests run)
    torchrun --standalone --nproc_per_node=2 train.py config/tiny.py --gradient_accumulation_steps=2

    # after a stop (SIGTERM/SIGUSR1, e.g. spot preemption): go on from out_dir/resume.pt
    python train.py config/tiny.py --init_from=resume

out_dir gets the best model by val loss (model.safetensors + meta.json + tokenizer, what
sample.py / the server load), resume.pt, train_log.jsonl and loss_curve.png.
"""
from __future__ import annotations

import json
import logging
import math
import os
import random
import signal
import sys
import time
import warnings
from contextlib import AbstractContextManager, nullcontext
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

import checkpoint
from configurator import ConfigError, parse_config
from data import DataError, TrainBatches, eval_batch, check_length, open_tokens, read_data_meta
from hf_export import CONV1D_WEIGHTS
from model import FUSED_LOSS_CHUNK_ROWS, GPT, GPTConfig
from tokenizer import TokenizerError, load_tokenizer, padded_vocab_size

log = logging.getLogger("train")

GPT2_NAMES = ("gpt2", "gpt2-medium", "gpt2-large", "gpt2-xl")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")
STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)
LOSS_IMPLS = ("fused", "plain")
SDPA_BACKENDS = ("auto", "cudnn", "flash", "efficient", "math")


@dataclass
class TrainConfig:
    # I/O
    out_dir: str = "out-code-assistant"
    dataset: str = "stdlib"
    data_dir: str = ""  # "" means data/{dataset}
    init_from: str = "scratch"  # scratch | resume | gpt2[-medium|-large|-xl] | /path/to/hf_dir
    always_save_checkpoint: bool = False  # True: the model dir follows every eval, not the best
    # model (ignored for pretrained inits and resume, which bring their own shape)
    n_layer: int = 12
    n_head: int = 12
    n_embd: int = 768
    block_size: int = 512
    dropout: float = 0.0
    bias: bool = True
    # batch: tokens per optimizer step = batch_size * block_size * gradient_accumulation_steps
    batch_size: int = 8  # per process, per micro-step
    gradient_accumulation_steps: int = 4  # GLOBAL micro-steps per optimizer step (divided by world size)
    # AdamW and the schedule: linear warmup, cosine decay to min_lr at lr_decay_iters
    max_iters: int = 5000
    learning_rate: float = 6e-4
    min_lr: float = 6e-5
    warmup_iters: int = 100
    lr_decay_iters: int = 0  # 0 means max_iters
    decay_lr: bool = True
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0  # 0 disables
    # eval and logging
    eval_interval: int = 500
    eval_iters: int = 100
    log_interval: int = 10
    # fill-in-the-middle (data.py)
    fim_rate: float = 0.5
    fim_spm_rate: float = 0.5
    # system
    device: str = "auto"  # cpu | cuda | cuda:N | auto
    dtype: str = "float32"  # float32 | bfloat16 | float16 (float16 uses a GradScaler)
    compile: bool = False
    compile_mode: str = "default"  # torch.compile mode, e.g. max-autotune-no-cudagraphs
    seed: int = 1337
    prefetch: int = 2  # batches a loader thread builds ahead on CUDA; 0 builds them inline
    # fused: lm_head + cross-entropy in row chunks, never the (tokens, vocab) logits (model.py);
    # plain: logits then F.cross_entropy. Same loss and gradients; fused holds no logits
    # (less memory, room for larger micro-batches); bench/train_bench.py measures both.
    loss_impl: str = "fused"
    loss_chunk_rows: int = FUSED_LOSS_CHUNK_ROWS  # rows (tokens) per chunk of the fused loss
    sdpa_backend: str = "auto"  # auto (PyTorch picks) | cudnn | flash | efficient | math

    def __post_init__(self) -> None:
        if not self.data_dir:
            self.data_dir = f"data/{self.dataset}"
        if self.lr_decay_iters == 0:
            self.lr_decay_iters = self.max_iters
        bad = self._first_problem()
        if bad:
            raise ConfigError(bad)

    def _first_problem(self) -> str | None:
        if self.init_from not in ("scratch", "resume", *GPT2_NAMES) and not Path(self.init_from).is_dir():
            return (f"init_from: {self.init_from!r} is not scratch, resume, one of {', '.join(GPT2_NAMES)} "
                    f"or an existing Hugging Face GPT-2 directory")
        if self.device not in ("cpu", "cuda", "auto") and not self.device.startswith("cuda:"):
            return f"device: {self.device!r} is not cpu, cuda, cuda:N or auto"
        if self.compile_mode not in COMPILE_MODES:
            return f"compile_mode: {self.compile_mode!r} is not one of {', '.join(COMPILE_MODES)}"
        if self.dtype not in DTYPES:
            return f"dtype: {self.dtype!r} is not one of {', '.join(DTYPES)}"
        if self.loss_impl not in LOSS_IMPLS:
            return f"loss_impl: {self.loss_impl!r} is not one of {', '.join(LOSS_IMPLS)}"
        if self.sdpa_backend not in SDPA_BACKENDS:
            return f"sdpa_backend: {self.sdpa_backend!r} is not one of {', '.join(SDPA_BACKENDS)}"
        for name in ("n_layer", "n_head", "n_embd", "block_size", "batch_size",
                     "gradient_accumulation_steps", "eval_interval", "eval_iters", "log_interval",
                     "loss_chunk_rows"):
            if getattr(self, name) < 1:
                return f"{name}: must be >= 1, got {getattr(self, name)}"
        for name in ("max_iters", "warmup_iters", "prefetch"):
            if getattr(self, name) < 0:
                return f"{name}: must be >= 0, got {getattr(self, name)}"
        if self.n_embd % self.n_head:
            return f"n_embd: {self.n_embd} is not a multiple of n_head={self.n_head}"
        for name in ("dropout", "fim_rate", "fim_spm_rate"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                return f"{name}: must be in [0, 1], got {getattr(self, name)}"
        if self.learning_rate <= 0 or self.min_lr < 0:
            return f"learning_rate/min_lr: must be positive, got {self.learning_rate}/{self.min_lr}"
        return None


class PretrainedError(RuntimeError):
    """GPT-2 weights that cannot be had (offline) or do not fit the dataset."""


# -----------------------------------------------------------------------------
# distributed setup

def dist_setup(device: str = "auto") -> tuple[int, int, int, torch.device]:
    """(rank, local_rank, world_size, device). Under torchrun (WORLD_SIZE > 1) this joins the
    process group: NCCL with one GPU per local rank, or gloo on the CPU."""
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"device: {device!r} but CUDA is not available")
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size == 1:
        return 0, 0, 1, torch.device(device)
    rank, local_rank = int(os.environ["RANK"]), int(os.environ["LOCAL_RANK"])
    if device.startswith("cuda"):
        dev = torch.device("cuda", local_rank)
        torch.cuda.set_device(dev)
        dist.init_process_group(backend="nccl", device_id=dev)
    else:
        dev = torch.device("cpu")
        dist.init_process_group(backend="gloo")
    return rank, local_rank, world_size, dev


def _barrier(world_size: int) -> None:
    if world_size > 1:
        dist.barrier()


# -----------------------------------------------------------------------------
# pretrained GPT-2 (Hugging Face) -> our GPT

def gpt_from_hf(hf_model_or_dir: Any, vocab_size: int, block_size: int | None = None,
                dropout: float = 0.0) -> GPT:
    """Our GPT from a transformers GPT2LMHeadModel (or a local directory holding one).

    The embedding grows from the HF vocabulary to `vocab_size` (our padded vocab, which has
    the FIM tokens after <|endoftext|>); new rows start at the mean embedding, so the new
    tokens begin as an "average" token rather than a random direction the model never saw.
    block_size below the model's n_positions crops the position table.
    """
    if isinstance(hf_model_or_dir, (str, Path)):
        from transformers import GPT2LMHeadModel
        hf = GPT2LMHeadModel.from_pretrained(str(hf_model_or_dir), local_files_only=True)
    else:
        hf = hf_model_or_dir
    hc = hf.config
    block_size = block_size or hc.n_positions
    if block_size > hc.n_positions:
        raise PretrainedError(f"block_size {block_size} > the pretrained model's n_positions {hc.n_positions}")
    if vocab_size < hc.vocab_size:
        raise PretrainedError(f"vocab_size {vocab_size} < the pretrained vocabulary {hc.vocab_size}")
    config = GPTConfig(block_size=block_size, vocab_size=vocab_size, n_layer=hc.n_layer,
                       n_head=hc.n_head, n_embd=hc.n_embd, dropout=dropout, bias=True)
    model = GPT(config)
    ours = model.state_dict()
    theirs = {k: v for k, v in hf.state_dict().items()
              if not k.endswith((".attn.bias", ".attn.masked_bias"))}  # causal-mask buffers
    with torch.no_grad():
        for key, value in theirs.items():
            if key == "lm_head.weight":
                continue  # tied to wte
            if key not in ours:
                raise PretrainedError(f"unexpected tensor in the pretrained model: {key}")
            if key.endswith(CONV1D_WEIGHTS):  # HF's (in, out) layout
                value = value.t()
            if key == "transformer.wte.weight":
                wte = value.new_empty(vocab_size, hc.n_embd)
                wte[: hc.vocab_size] = value
                wte[hc.vocab_size:] = value.mean(dim=0)
                value = wte
            elif key == "transformer.wpe.weight":
                value = value[:block_size]
            if ours[key].shape != value.shape:
                raise PretrainedError(f"{key}: shape {tuple(value.shape)} != {tuple(ours[key].shape)}")
            ours[key].copy_(value)
    missing = [k for k in ours if k not in theirs and k != "lm_head.weight"]
    if missing:
        raise PretrainedError(f"the pretrained model lacks {missing[:3]}")
    return model


def _load_pretrained(init_from: str, vocab_size: int, cfg: TrainConfig) -> GPT:
    from transformers import GPT2LMHeadModel

    if init_from in GPT2_NAMES:
        try:
            hf = GPT2LMHeadModel.from_pretrained(init_from)
        except OSError:  # what transformers raises for "not cached and cannot download"
            raise PretrainedError(
                f"the {init_from} weights could not be downloaded (offline?); pass "
                f"init_from=/path/to/local/hf_dir (a directory written by save_pretrained)") from None
    else:
        try:
            hf = GPT2LMHeadModel.from_pretrained(init_from, local_files_only=True)
        except OSError as e:
            raise PretrainedError(f"init_from={init_from}: not a Hugging Face GPT-2 directory "
                                  f"({str(e).splitlines()[0]})") from None
    return gpt_from_hf(hf, vocab_size, cfg.block_size, cfg.dropout)


# -----------------------------------------------------------------------------
# pieces of the loop

def get_lr(it: int, cfg: TrainConfig) -> float:
    """Linear warmup to learning_rate, cosine decay to min_lr at lr_decay_iters, then flat."""
    if not cfg.decay_lr:
        return cfg.learning_rate
    if it < cfg.warmup_iters:
        return cfg.learning_rate * (it + 1) / (cfg.warmup_iters + 1)
    if it > cfg.lr_decay_iters:
        return cfg.min_lr
    ratio = (it - cfg.warmup_iters) / max(1, cfg.lr_decay_iters - cfg.warmup_iters)
    return cfg.min_lr + 0.5 * (1.0 + math.cos(math.pi * ratio)) * (cfg.learning_rate - cfg.min_lr)


@torch.no_grad()
def estimate_loss(model: torch.nn.Module, splits: dict[str, np.ndarray], cfg: TrainConfig,
                  device: torch.device, autocast: Any,
                  attention: Callable[[], AbstractContextManager] = nullcontext) -> dict[str, float]:
    """Mean plain (no FIM) loss over eval_iters fixed batches of each split."""
    model.eval()
    out = {}
    for name, tokens in splits.items():
        losses = torch.zeros(cfg.eval_iters, device=device)
        for i in range(cfg.eval_iters):
            x, y = eval_batch(tokens, cfg.block_size, cfg.batch_size, cfg.seed, i)
            with autocast, attention():
                _, loss = model(x.to(device), y.to(device))
            losses[i] = loss
        out[name] = losses.mean().item()
    model.train()
    return out


def rng_state(device: torch.device) -> dict[str, Any]:
    """Every RNG as tensors / numbers / containers, so resume.pt loads with weights_only."""
    np_state = np.random.get_state()
    py_version, py_internal, py_gauss = random.getstate()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state(device) if device.type == "cuda" else None,
        "numpy": {"keys": torch.from_numpy(np_state[1].astype(np.int64)), "pos": int(np_state[2]),
                  "has_gauss": int(np_state[3]), "gauss": float(np_state[4])},
        "python": {"version": py_version, "internal": list(py_internal), "gauss": py_gauss},
    }


def set_rng_state(state: dict[str, Any], device: torch.device) -> None:
    torch.set_rng_state(state["torch"])
    if device.type == "cuda" and state.get("cuda") is not None:
        torch.cuda.set_rng_state(state["cuda"], device)
    n = state["numpy"]
    np.random.set_state(("MT19937", n["keys"].numpy().astype(np.uint32), n["pos"],
                         n["has_gauss"], n["gauss"]))
    p = state["python"]
    random.setstate((p["version"], tuple(p["internal"]), p["gauss"]))


def plot_losses(history: list[dict[str, Any]], path: Path) -> None:
    """Train (every log line) and val (every eval) loss against iteration, as a PNG."""
    try:
        import matplotlib
    except ImportError:  # a bare GPU image: the JSON log still has every number
        log.warning("matplotlib is not installed: no %s", path.name)
        return
    matplotlib.use("Agg")  # no display on training machines
    import matplotlib.pyplot as plt

    train = [(h["iter"], h["loss"]) for h in history if h["kind"] == "train"]
    val = [(h["iter"], h["val_loss"]) for h in history if h["kind"] == "eval"]
    fig, ax = plt.subplots(figsize=(7, 4))
    if train:
        ax.plot(*zip(*train), label="train loss", lw=1)
    if val:
        ax.plot(*zip(*val), "o-", label="val loss")
    ax.set_xlabel("iter")
    ax.set_ylabel("loss")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    checkpoint.atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=100))
    plt.close(fig)


def _format_eta(seconds: float) -> str:
    seconds = int(seconds)
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m" if seconds >= 3600 else f"{seconds // 60}m{seconds % 60:02d}s"


class StopFlag:
    """Set by SIGTERM/SIGUSR1; the loop checks it at step boundaries only."""

    def __init__(self) -> None:
        self.requested = False
        self._previous: dict[int, Any] = {}

    def _handle(self, signum: int, frame: Any) -> None:
        self.requested = True

    def install(self) -> None:
        for sig in STOP_SIGNALS:
            self._previous[sig] = signal.signal(sig, self._handle)

    def restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


def precision(device: torch.device, dtype: str) -> tuple[Any, torch.amp.GradScaler]:
    """(autocast context, GradScaler): fp32 runs plain; float16 needs loss scaling, bf16 not."""
    if device.type == "cuda":
        # TF32 matmuls for whatever runs outside autocast; free on Ampere+, no effect on bf16.
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    autocast = (nullcontext() if dtype == "float32"
                else torch.autocast(device_type=device.type, dtype=DTYPES[dtype]))
    return autocast, torch.amp.GradScaler(device.type, enabled=dtype == "float16")


def attention_backend(backend: str, device: torch.device, dtype: str,
                      head_dim: int) -> Callable[[], AbstractContextManager]:
    """A factory of contexts that pin scaled_dot_product_attention to `backend` ("auto": nothing
    pinned, PyTorch picks). Under torch.compile the kernel is chosen when the graph is traced,
    so the context must be around the first forward too. A backend that cannot run a causal
    attention of this dtype and head size on `device` is a ConfigError now (a tiny probe),
    not a "No available kernel" traceback at the first step."""
    if backend == "auto":
        return nullcontext
    from torch.nn.attention import SDPBackend, sdpa_kernel

    kernel = {"cudnn": SDPBackend.CUDNN_ATTENTION, "flash": SDPBackend.FLASH_ATTENTION,
              "efficient": SDPBackend.EFFICIENT_ATTENTION, "math": SDPBackend.MATH}[backend]
    # ones, not randn: the probe must not move the RNG streams a resumed run replays
    q = torch.ones(1, 2, 16, head_dim, device=device, dtype=DTYPES[dtype], requires_grad=True)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            with sdpa_kernel(kernel):
                torch.nn.functional.scaled_dot_product_attention(q, q, q, is_causal=True).sum().backward()
        except RuntimeError:
            why = next((str(w.message).splitlines()[0] for w in caught if "because" in str(w.message)), "")
            raise ConfigError(f"sdpa_backend: {backend!r} is not available for causal attention on "
                              f"{device} in {dtype} with head dim {head_dim}{': ' + why if why else ''} "
                              f"(sdpa_backend=auto lets PyTorch pick)") from None
    return lambda: sdpa_kernel(kernel)


def wrap_model(model: GPT, cfg: TrainConfig, device: torch.device,
               world_size: int) -> tuple[torch.nn.Module, torch.nn.Module]:
    """(model to train: compiled and DDP-wrapped as configured, model to evaluate: no DDP).
    With loss_impl "fused" both return (None, loss) for targets: no logits."""
    model.loss_impl = cfg.loss_impl  # read by GPT.forward; set before compiling, which guards on it
    model.loss_chunk_rows = cfg.loss_chunk_rows
    if cfg.compile:
        log.info("compiling the model (mode %s; takes a minute)", cfg.compile_mode)
        model = torch.compile(model, mode=None if cfg.compile_mode == "default" else cfg.compile_mode)
    if world_size == 1:
        return model, model
    return DDP(model, device_ids=[device.index] if device.type == "cuda" else None), model


def train_step(model: torch.nn.Module, optimizer: torch.optim.Optimizer, scaler: torch.amp.GradScaler,
               loader: TrainBatches, autocast: Any, grad_clip: float, lr: float,
               attention: Callable[[], AbstractContextManager] = nullcontext) -> torch.Tensor:
    """One optimizer step over the loader's micro-batches for this rank. Returns the step's
    mean loss as a device tensor: reading it is the caller's choice (a host sync).
    `attention` makes the SDPA backend context (see attention_backend)."""
    for group in optimizer.param_groups:
        group["lr"] = lr
    ddp = isinstance(model, DDP)
    loss_sum = None
    for micro in range(loader.local_accum):
        x, y = loader.next()
        # Gradients are all-reduced once per step, on the last micro-step only.
        sync = model.no_sync() if ddp and micro < loader.local_accum - 1 else nullcontext()
        with sync, attention():
            with autocast:
                _, loss = model(x, y)
                loss = loss / loader.local_accum
            scaler.scale(loss).backward()
        loss_sum = loss.detach() if loss_sum is None else loss_sum + loss.detach()
    if grad_clip > 0:
        scaler.unscale_(optimizer)
        params = [p for group in optimizer.param_groups for p in group["params"]]
        torch.nn.utils.clip_grad_norm_(params, grad_clip)
    scaler.step(optimizer)
    scaler.update()
    optimizer.zero_grad(set_to_none=True)
    return loss_sum


# -----------------------------------------------------------------------------
# the training run

def train(cfg: TrainConfig) -> dict[str, Any]:
    """Run training as configured; returns {'step', 'best_val_loss', 'stopped', 'history'}."""
    rank, local_rank, world_size, device = dist_setup(cfg.device)
    try:
        return _train(cfg, rank, world_size, device)
    finally:
        if world_size > 1:
            dist.destroy_process_group()


def _train(cfg: TrainConfig, rank: int, world_size: int, device: torch.device) -> dict[str, Any]:
    master = rank == 0
    info: Callable[..., None] = log.info if master else (lambda *a, **k: None)
    if cfg.gradient_accumulation_steps % world_size:
        raise ConfigError(f"gradient_accumulation_steps: {cfg.gradient_accumulation_steps} is not "
                          f"a multiple of the {world_size} processes")
    # ---- data
    meta = read_data_meta(cfg.data_dir)
    tok = load_tokenizer(cfg.data_dir)
    vocab_size = padded_vocab_size(int(meta["vocab_size"]), 64)
    train_tokens = open_tokens(cfg.data_dir, "train", meta)
    val_tokens = open_tokens(cfg.data_dir, "val", meta)
    check_length(val_tokens, cfg.block_size, "the val split")
    out_dir = Path(cfg.out_dir)
    if master:
        out_dir.mkdir(parents=True, exist_ok=True)

    # ---- model
    torch.manual_seed(cfg.seed)  # the same init on every rank (DDP also broadcasts rank 0's)
    resume = None
    step, best_val_loss = 0, float("inf")
    if cfg.init_from == "resume":
        resume = checkpoint.load_resume(cfg.out_dir)
        model_config = GPTConfig(**resume["model_config"])
        if model_config.vocab_size != vocab_size:
            raise checkpoint.CheckpointError(
                f"resume.pt has vocab_size {model_config.vocab_size}, the dataset {vocab_size}")
        if resume.get("data_hash") != meta.get("data_hash"):
            log.warning("resuming on a different dataset (data_hash changed): the data order differs")
        model_config.dropout = cfg.dropout
        model = GPT(model_config)
        model.load_state_dict(resume["model"])
        step, best_val_loss = int(resume["step"]), float(resume["best_val_loss"])
        info("resuming from %s/resume.pt at iter %d (best val loss %.4f)", cfg.out_dir, step, best_val_loss)
    elif cfg.init_from == "scratch":
        model = GPT(GPTConfig(block_size=cfg.block_size, vocab_size=vocab_size, n_layer=cfg.n_layer,
                              n_head=cfg.n_head, n_embd=cfg.n_embd, dropout=cfg.dropout, bias=cfg.bias))
    else:
        if tok.kind != "gpt2":
            raise PretrainedError(
                f"init_from={cfg.init_from} needs a dataset tokenized with the gpt2 tokenizer, but "
                f"{cfg.data_dir} uses {tok.kind!r}: collect it again with the gpt2 tokenizer")
        model = _load_pretrained(cfg.init_from, vocab_size, cfg)
        info("initialised from %s: %d layers, %d heads, %d dims", cfg.init_from,
             model.config.n_layer, model.config.n_head, model.config.n_embd)
    block_size = model.config.block_size
    if block_size != cfg.block_size:
        raise ConfigError(f"block_size: {cfg.block_size} but the resumed model has {block_size}")
    model.to(device)
    info("model: %.2fM parameters, vocab %d, device %s, dtype %s, loss %s, sdpa %s, %d process(es)",
         model.num_params() / 1e6, vocab_size, device, cfg.dtype, cfg.loss_impl, cfg.sdpa_backend,
         world_size)

    optimizer = model.configure_optimizers(cfg.weight_decay, cfg.learning_rate,
                                           (cfg.beta1, cfg.beta2), device.type)
    autocast, scaler = precision(device, cfg.dtype)
    attention = attention_backend(cfg.sdpa_backend, device, cfg.dtype,
                                  model.config.n_embd // model.config.n_head)
    if resume is not None:
        optimizer.load_state_dict(resume["optimizer"])
        if resume.get("scaler"):
            scaler.load_state_dict(resume["scaler"])
        set_rng_state(resume["rng"], device)
    if world_size > 1:
        # Distinct dropout masks per rank; rank 0 keeps the exact single-process stream.
        torch.manual_seed(cfg.seed + rank * 1_000_003 + step)
    raw_model = model  # what gets saved: never the compiled or DDP wrapper
    model, eval_model = wrap_model(model, cfg, device, world_size)

    loader = TrainBatches(train_tokens, block_size=block_size, batch_size=cfg.batch_size,
                          seed=cfg.seed, grad_accum=cfg.gradient_accumulation_steps, rank=rank,
                          world_size=world_size, device=device, tok=tok, fim_rate=cfg.fim_rate,
                          fim_spm_rate=cfg.fim_spm_rate,
                          # A loader thread only pays off beside a GPU: on the CPU the model's
                          # OpenMP threads already spin on every core and starve it.
                          prefetch=cfg.prefetch if device.type == "cuda" else 0)
    if resume is not None:
        loader.load_state_dict(resume["data"])
    assert (loader.step, loader.micro) == (step, 0), "data position and step disagree"

    # ---- bookkeeping
    log_path = out_dir / "train_log.jsonl"
    history: list[dict[str, Any]] = []
    if master and resume is not None and log_path.exists():
        history = [json.loads(line) for line in log_path.read_text().splitlines() if line.strip()]
        history = [h for h in history if h["iter"] <= step]  # drop what came after the resume point
        checkpoint.atomic_write_text(log_path, "".join(json.dumps(h) + "\n" for h in history))
    elif master:
        log_path.write_text("")
    log_file = open(log_path, "a", encoding="utf-8") if master else None
    tokens_per_step = cfg.batch_size * block_size * cfg.gradient_accumulation_steps
    last_train_loss = float("nan")

    def record(entry: dict[str, Any]) -> None:
        history.append(entry)
        log_file.write(json.dumps(entry) + "\n")
        log_file.flush()

    def resume_state() -> dict[str, Any]:
        return {"model": raw_model.state_dict(), "optimizer": optimizer.state_dict(),
                "scaler": scaler.state_dict() if scaler.is_enabled() else {},
                "model_config": raw_model.config.to_dict(), "step": step,
                "best_val_loss": best_val_loss, "rng": rng_state(device),
                "data": loader.state_dict(), "data_hash": meta.get("data_hash"),
                "config": asdict(cfg)}

    def evaluate_and_save() -> None:
        nonlocal best_val_loss
        losses = estimate_loss(eval_model, {"train": train_tokens, "val": val_tokens}, cfg, device,
                               autocast, attention)
        info("iter %d: train loss %.4f, val loss %.4f", step, losses["train"], losses["val"])
        record({"kind": "eval", "iter": step, "train_loss": losses["train"], "val_loss": losses["val"],
                "time": time.time()})
        if losses["val"] < best_val_loss or cfg.always_save_checkpoint:
            best_val_loss = min(best_val_loss, losses["val"])
            model_meta = {"model_config": raw_model.config.to_dict(), "tokenizer": tok.kind,
                          "step": step, "val_loss": losses["val"], "train_loss": losses["train"],
                          "data_hash": meta.get("data_hash"), "config": asdict(cfg)}
            checkpoint.save_model(out_dir, raw_model.state_dict(), model_meta, tokenizer_dir=cfg.data_dir)
            info("saved the model (val loss %.4f) to %s", losses["val"], out_dir)
        checkpoint.save_resume(out_dir, resume_state())
        plot_losses(history, out_dir / "loss_curve.png")

    stop = StopFlag()
    stop.install()
    stopped = False
    t_last, steps_since_log, dt_avg = time.perf_counter(), 0, None
    loss_sum = torch.zeros((), device=device)
    start_step = step
    try:
        while True:
            # ---- eval + checkpoint at step boundaries (not again at the step we resumed at)
            if (step % cfg.eval_interval == 0 or step == cfg.max_iters) and not (resume and step == start_step):
                if master:
                    evaluate_and_save()
                _barrier(world_size)  # nobody trains on while rank 0 writes the checkpoint
                t_last, steps_since_log = time.perf_counter(), 0  # eval time is not training time
            if step >= cfg.max_iters:
                break
            # ---- stop request (SIGTERM): every rank must agree, or one would wait forever
            if world_size == 1:
                stop_now = stop.requested
            elif step % cfg.log_interval == 0:  # only every log_interval steps: each check syncs
                flag = torch.tensor([float(stop.requested)], device=device)
                dist.all_reduce(flag)
                stop_now = flag.item() > 0
            else:
                stop_now = False
            if stop_now:
                stopped = True
                if master:
                    checkpoint.save_resume(out_dir, resume_state())
                    info("stopped by signal at iter %d; resume.pt saved, go on with --init_from=resume", step)
                _barrier(world_size)
                break

            # ---- one optimizer step over local_accum micro-batches
            lr = get_lr(step, cfg)
            loss_sum += train_step(model, optimizer, scaler, loader, autocast, cfg.grad_clip, lr,
                                   attention)
            step += 1
            steps_since_log += 1

            # ---- log (the only host sync of the loop)
            if step % cfg.log_interval == 0 or step == cfg.max_iters:
                mean_loss = loss_sum / steps_since_log
                if world_size > 1:
                    dist.all_reduce(mean_loss)
                    mean_loss = mean_loss / world_size
                last_train_loss = mean_loss.item()
                loss_sum.zero_()
                now = time.perf_counter()
                dt = max(now - t_last, 1e-9) / steps_since_log  # a coarse clock can read 0
                t_last, steps_since_log = now, 0
                dt_avg = dt if dt_avg is None else 0.9 * dt_avg + 0.1 * dt
                tokens_per_s = tokens_per_step / dt
                mfu = raw_model.estimate_mfu(tokens_per_s / world_size, block_size)
                eta = _format_eta((cfg.max_iters - step) * dt_avg)
                info("iter %d | loss %.4f | lr %.2e | %.0f tok/s | mfu %.2f%% | eta %s",
                     step, last_train_loss, lr, tokens_per_s, 100 * mfu, eta)
                if master:
                    record({"kind": "train", "iter": step, "loss": last_train_loss, "lr": lr,
                            "tokens_per_s": tokens_per_s, "mfu": mfu, "time": now})
    finally:
        stop.restore()
        loader.close()
        if log_file is not None:
            log_file.close()
    if master and history:
        plot_losses(history, out_dir / "loss_curve.png")
    info("done at iter %d, best val loss %.4f", step, best_val_loss)
    return {"step": step, "best_val_loss": best_val_loss, "train_loss": last_train_loss,
            "stopped": stopped, "history": history}


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        cfg = parse_config(TrainConfig, sys.argv[1:] if argv is None else argv)
        train(cfg)
    except (ConfigError, DataError, PretrainedError, TokenizerError, checkpoint.CheckpointError) as e:
        log.error("train.py: error: %s", e)  # one line, no traceback: these are user errors
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
