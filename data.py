"""Training data: memory-mapped token files, random windows, and fill-in-the-middle (FIM).

A dataset directory (made by `python collect_code.py --out data/NAME`) holds train.bin and
val.bin (flat token ids, documents separated by the eot id, dtype from meta.json) and the
tokenizer. The trainer reads random windows of block_size + 1 tokens from the memmap.

Determinism is by construction: micro-batch k of global step s is drawn from its own RNG
seeded with (seed, s, k). A run with world_size ranks and G global micro-steps per step
gives rank r the micro-batches k = r*G/W ... (r+1)*G/W - 1, so every rank reads its own
stream, the global batch does not depend on the number of processes, and the loader's
whole state is its position (step, micro) -- which is what resume.pt stores.

FIM (Bavarian et al. 2022, "Efficient Training of Language Models to Fill in the Middle"):
each document inside a window is, with probability fim_rate, cut at two uniformly random
character positions into prefix / middle / suffix and re-encoded as

    PSM:  <fim_prefix> prefix <fim_suffix> suffix <fim_middle> middle
    SPM:  <fim_prefix> <fim_suffix> suffix <fim_middle> prefix middle   (prob. fim_spm_rate)

The SPM layout is the variant of the paper's appendix that StarCoder trains on: the
prefix sits right before the middle, so prefix + middle is one uninterrupted text.
The parts are encoded with `tok.encode`, which encodes special-token text as plain text,
so a document that literally contains "<fim_prefix>" can never forge a sentinel.
"""
from __future__ import annotations

import json
import logging
import queue
import threading
from pathlib import Path
from typing import Any

import numpy as np
import torch

from tokenizer import TokenizerLike

log = logging.getLogger(__name__)

DTYPES = {"uint16": np.uint16, "uint32": np.uint32}


class DataError(RuntimeError):
    """A dataset directory that is missing, incomplete or too small."""




def read_data_meta(data_dir: str | Path) -> dict[str, Any]:
    path = Path(data_dir) / "meta.json"
    if not path.exists():
        raise DataError(f"no dataset at {data_dir} (missing meta.json): "
                        f"run python collect_code.py --out {data_dir}")
    return json.loads(path.read_text(encoding="utf-8"))


def open_tokens(data_dir: str | Path, split: str, meta: dict[str, Any]) -> np.memmap:
    """The token ids of `split` ('train' or 'val'), memory-mapped read-only."""
    path = Path(data_dir) / f"{split}.bin"
    if not path.exists():
        raise DataError(f"no {path}: run python collect_code.py --out {data_dir}")
    dtype = meta.get("dtype", "uint16")
    if dtype not in DTYPES:
        raise DataError(f"{data_dir}/meta.json: unknown dtype {dtype!r}")
    return np.memmap(path, dtype=DTYPES[dtype], mode="r")


def check_length(tokens: np.ndarray, block_size: int, name: str) -> None:
    if len(tokens) <= block_size + 1:
        raise DataError(f"{name} has {len(tokens)} tokens, fewer than block_size + 2 = "
                        f"{block_size + 2}: lower block_size or collect more code")


def sample_windows(tokens: np.ndarray, rng: np.random.Generator, batch_size: int,
                   length: int) -> tuple[np.ndarray, np.ndarray]:
    """(rows (B, length) int64, start offsets (B,)) of random windows of `tokens`."""
    starts = rng.integers(0, len(tokens) - length, size=batch_size)
    rows = tokens[starts[:, None] + np.arange(length)].astype(np.int64)  # fancy index copies
    return rows, starts


def eval_batch(tokens: np.ndarray, block_size: int, batch_size: int, seed: int,
               index: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Plain (no FIM) batch number `index` of a fixed evaluation set: the same windows at
    every eval, so successive val losses differ by the model only, not by the sample."""
    rng = np.random.default_rng([seed, 1, index])  # tag 1: never collides with training streams
    rows, _ = sample_windows(tokens, rng, batch_size, block_size + 1)
    return torch.from_numpy(rows[:, :-1]), torch.from_numpy(rows[:, 1:])


def fim_transform(text: str, rng: np.random.Generator, tok: TokenizerLike,
                  spm_rate: float) -> list[int]:
    """One document as a PSM or SPM sequence; cut points are uniform over characters."""
    lo, hi = sorted(rng.integers(0, len(text) + 1, size=2).tolist())
    prefix = tok.encode(text[:lo])
    middle = tok.encode(text[lo:hi])
    suffix = tok.encode(text[hi:])
    if rng.random() < spm_rate:
        return [tok.fim_prefix_id, tok.fim_suffix_id, *suffix, tok.fim_middle_id, *prefix, *middle]
    return [tok.fim_prefix_id, *prefix, tok.fim_suffix_id, *suffix, tok.fim_middle_id, *middle]


def fim_inverse(ids: list[int], tok: TokenizerLike) -> str:
    """The original document of a PSM, SPM or plain sequence made by fim_transform."""
    ids = list(ids)
    if not ids or ids[0] != tok.fim_prefix_id:
        return tok.decode(ids)
    mid = ids.index(tok.fim_middle_id)
    if ids[1] == tok.fim_suffix_id:
        # SPM; a PSM with an empty prefix looks the same and decodes to the same text.
        return tok.decode(ids[mid + 1:]) + tok.decode(ids[2:mid])
    suf = ids.index(tok.fim_suffix_id)
    return tok.decode(ids[1:suf]) + tok.decode(ids[mid + 1:]) + tok.decode(ids[suf + 1:mid])


def fim_window(window: np.ndarray, rng: np.random.Generator, tok: TokenizerLike,
               fim_rate: float, spm_rate: float) -> list[int]:
    """Apply FIM to each (whole or cut-off) document of a window; eot ids stay in place.
    The result is usually a few tokens longer than the window; the caller re-cuts it."""
    out: list[int] = []
    ends = np.flatnonzero(window == tok.eot_id).tolist() + [len(window)]
    start = 0
    for end in ends:
        doc = window[start:end].tolist()
        if doc and rng.random() < fim_rate:
            text = tok.decode(doc)
            # A window edge can cut a multi-byte character; re-encoding the replacement
            # character would teach a corrupted text, so such a piece stays plain.
            out.extend(doc if "\ufffd" in text else fim_transform(text, rng, tok, spm_rate))
        else:
            out.extend(doc)
        if end < len(window):
            out.append(tok.eot_id)
        start = end + 1
    return out


class TrainBatches:
    """Training micro-batches (x, y) of shape (B, T) int64 for one rank, in a fixed order.

    `next()` returns the batch at the current position and advances it; `state_dict()` /
    `load_state_dict()` save and restore that position. With prefetch > 0 a background
    thread builds the next batches (numpy windows, FIM through tiktoken, which releases
    the GIL) while the model steps; on CUDA it pins them so the copy is asynchronous.
    """

    def __init__(self, tokens: np.ndarray, *, block_size: int, batch_size: int, seed: int,
                 grad_accum: int, rank: int = 0, world_size: int = 1,
                 device: torch.device | str = "cpu", tok: TokenizerLike | None = None,
                 fim_rate: float = 0.0, fim_spm_rate: float = 0.5, prefetch: int = 2):
        if grad_accum % world_size:
            raise ValueError(f"gradient_accumulation_steps={grad_accum} is not a multiple "
                             f"of world_size={world_size}")
        if fim_rate > 0 and tok is None:
            raise ValueError("fim_rate > 0 needs the tokenizer")
        check_length(tokens, block_size, "the training split")
        self.tokens, self.block_size, self.batch_size, self.seed = tokens, block_size, batch_size, seed
        self.local_accum = grad_accum // world_size
        self.first_micro = rank * self.local_accum  # global index of this rank's micro-batch 0
        self.device = torch.device(device)
        self.tok, self.fim_rate, self.fim_spm_rate = tok, fim_rate, fim_spm_rate
        self.prefetch = prefetch
        self.step, self.micro = 0, 0  # position of the next batch next() returns
        self._queue: queue.Queue | None = None
        self._stop: threading.Event | None = None
        self._thread: threading.Thread | None = None

    def batch_at(self, step: int, micro: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Host tensors of this rank's micro-batch `micro` of global step `step`."""
        k = self.first_micro + micro
        rng = np.random.default_rng([self.seed, 0, step, k])
        n = self.block_size + 1
        rows, starts = sample_windows(self.tokens, rng, self.batch_size, n)
        if self.fim_rate > 0:
            for r in range(self.batch_size):
                seq = fim_window(rows[r], rng, self.tok, self.fim_rate, self.fim_spm_rate)
                if len(seq) < n:  # re-encoding came out shorter: top up with the text after it
                    follow = self.tokens[starts[r] + n: starts[r] + n + (n - len(seq))].tolist()
                    seq += follow + [self.tok.eot_id] * (n - len(seq) - len(follow))
                rows[r] = seq[:n]
        x = torch.from_numpy(rows[:, :-1].copy())  # (B, T)
        y = torch.from_numpy(rows[:, 1:].copy())  # (B, T)
        if self.device.type == "cuda":
            x, y = x.pin_memory(), y.pin_memory()
        return x, y

    def _positions(self, step: int, micro: int):
        while True:
            yield step, micro
            micro += 1
            if micro == self.local_accum:
                step, micro = step + 1, 0

    def _produce(self, q: queue.Queue, stop: threading.Event, step: int, micro: int) -> None:
        for pos in self._positions(step, micro):
            item = (pos, self.batch_at(*pos))
            while not stop.is_set():
                try:
                    q.put(item, timeout=0.1)
                    break
                except queue.Full:
                    continue
            if stop.is_set():
                return

    def next(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The next (x, y) on the device; never waits for the device (non_blocking copy)."""
        pos = (self.step, self.micro)
        if self.prefetch <= 0:
            x, y = self.batch_at(*pos)
        else:
            if self._thread is None:
                self._queue = queue.Queue(maxsize=self.prefetch)
                self._stop = threading.Event()
                self._thread = threading.Thread(target=self._produce, daemon=True,
                                                args=(self._queue, self._stop, *pos))
                self._thread.start()
            got, (x, y) = self._queue.get()
            assert got == pos, f"prefetch out of order: {got} != {pos}"
        self.micro += 1
        if self.micro == self.local_accum:
            self.step, self.micro = self.step + 1, 0
        non_blocking = self.device.type == "cuda"
        return x.to(self.device, non_blocking=non_blocking), y.to(self.device, non_blocking=non_blocking)

    def state_dict(self) -> dict[str, int]:
        return {"step": self.step, "micro": self.micro, "seed": self.seed}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.close()
        self.step, self.micro = int(state["step"]), int(state["micro"])
        if int(state.get("seed", self.seed)) != self.seed:
            log.warning("resuming the data order of seed %s with seed %s", state["seed"], self.seed)

    def close(self) -> None:
        """Stop the prefetch thread (it restarts from the current position on next())."""
        if self._thread is not None:
            self._stop.set()
            self._thread.join()
            self._thread, self._queue, self._stop = None, None, None
