"""The inference engine every entry point uses (sample.py, evaluate.py, serve_api.py, benchmarks).

A continuous-batching generator of token ids over a KV cache allocated once:
- `max_batch` cache slots of (H, max_seq_len, D) per layer; a request owns one slot from
  prefill until it finishes, so nothing is allocated per token.
- A scheduler (`step`, run by a background thread or inline) admits waiting requests between
  decode steps, prefills them in padded batches of chunks, and runs one batched decode step
  over the slots in use. Finished or cancelled requests leave at once and free their slot.
- The decode step is `model.decode_step`, which writes each row's new K/V into its slot at
  its position. On a GPU it runs on decode_kernels.py's Triton kernels (five per layer for
  up to 16 rows, the attention one at any batch). On CUDA it is compiled with
  torch.compile (with the greedy pick, `greedy_pick`), captured as CUDA graphs, one per
  (batch bucket, length bucket, steps), and runs one launch ahead of the host: launch t+1
  is queued before the tokens of launch t are read back, so host bookkeeping overlaps GPU
  work. A greedy launch may run several decode steps in one graph (`decode_steps`, opt-in)
  while nobody waits for a slot: one launch and one read-back per k tokens instead of per
  token. On CPU the same code runs eagerly.
- On CUDA the prefill replays CUDA graphs too (the eager model captured per rows x chunk x
  attended-length bucket), and its first tokens are read back after the next decode launch.
  `prefill_wait_steps` lets prompts gather while rows decode to share one prefill (0 here;
  the server sets 4 on a GPU, where it was measured faster).
- Sampling runs on the device: temperature, top-k, top-p, with Gumbel noise from a hash of
  (request seed, position, token) so a seeded request samples the same tokens whatever
  else shares its batch.

    engine = Engine(model, max_batch=8)
    ids = engine.generate(prompt_ids, SamplingParams(max_tokens=50))      # inline
    engine.start(); handle = engine.submit(prompt_ids, params, on_token=print)  # threaded
"""
from __future__ import annotations

import array
import heapq
import itertools
import logging
import os
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.nn as nn
from torch.nn import functional as F

from tokenizer import build_prompt  # noqa: F401  (here too: sample.py, evaluate.py, tests)


log = logging.getLogger(__name__)


@dataclass(frozen=True)
class SamplingParams:
    max_tokens: int = 50
    temperature: float = 0.0  # 0 is greedy
    top_k: int = 0  # 0 is off
    top_p: float = 1.0
    seed: int | None = None  # None draws a fresh seed per request
    stop_token_ids: tuple[int, ...] = ()


class QueueFull(RuntimeError):
    """The wait queue is at max_queue: the caller should answer 429."""


class EngineDead(RuntimeError):
    """The engine failed and could not recover."""


@dataclass
class Request:
    """One generation: its prompt, params, progress and timings. Returned by `submit`."""
    id: int
    prompt: list[int]
    params: SamplingParams
    seed: int
    on_token: Callable[[int], None] | None = None
    on_finish: Callable[["Request"], None] | None = None
    slot: int = -1
    prefilled: int = 0
    tokens: list[int] = field(default_factory=list)
    finish_reason: str | None = None  # stop | length | cancelled | error
    error: str | None = None
    arrival_time: float = field(default_factory=time.perf_counter)
    scheduled_time: float | None = None
    first_token_time: float | None = None
    finish_time: float | None = None
    _cancelled: bool = False
    _launched: int = 0  # tokens made or launched on the device (ahead of `tokens` on CUDA)
    _admitted_at: int = 0  # the engine's decode-launch count when it got a slot
    _stopping: bool = False  # no further steps: its last token is in flight
    _done: threading.Event = field(default_factory=threading.Event)
    # Set by Engine.submit so that emitting a token costs one set lookup and one int compare:
    # the ids that end it (its stop tokens and the engine's eos) and the number of tokens at
    # which it ends by length (max_tokens, or the end of the cache after its prompt).
    _stop_ids: frozenset[int] = frozenset()
    _max_new: int = 0
    _on_cancel: Callable[[], None] | None = None  # tells the engine a cancellation waits

    def cancel(self) -> None:
        """Ask the engine to drop this request at its next step (thread-safe)."""
        self._cancelled = True  # before the hook: the engine clears its flag, then reads this
        if self._on_cancel is not None:
            self._on_cancel()

    def wait(self, timeout: float | None = None) -> bool:
        return self._done.wait(timeout)

    @property
    def finished(self) -> bool:
        return self._done.is_set()


def _fmix32(x: torch.Tensor) -> torch.Tensor:
    """MurmurHash3's 32-bit finalizer on int64 tensors holding 32-bit values."""
    m = 0xFFFFFFFF
    x = x ^ (x >> 16)
    x = (x * 0x85EBCA6B) & m
    x = x ^ (x >> 13)
    x = (x * 0xC2B2AE35) & m
    return x ^ (x >> 16)


def sample_tokens(logits: torch.Tensor, temperature: torch.Tensor, top_k: torch.Tensor,
                  top_p: torch.Tensor, seed: torch.Tensor, position: torch.Tensor,
                  k_max: int | None = None, any_top_p: bool | None = None) -> torch.Tensor:
    """Next token per row. logits (B, V) float; per-row temperature/top_k/top_p/seed/position (B,).

    Rows with temperature 0 take the argmax. Others sample from softmax(logits / T) restricted
    by top-k and top-p, by Gumbel-max with noise hashed from (seed, position, token): the draw
    depends on the request alone, never on its neighbours in the batch.

    k_max (the largest top_k of the rows that matter) and any_top_p (whether one of them has
    top_p < 1) are read from the tensors when not given: on a GPU each read waits for it, so
    the engine, which knows them on the host, passes them."""
    logits = logits.float()
    greedy = logits.argmax(dim=-1)
    B, V = logits.shape
    scaled = logits / temperature.clamp_min(1e-6)[:, None]
    if k_max is None:
        k_max = int(top_k.max())
    if any_top_p is None:
        any_top_p = bool((top_p < 1.0).any())
    if k_max > 0:
        k_max = min(k_max, V)
        kth = scaled.topk(k_max, dim=-1).values  # (B, k_max), descending
        k = top_k.clamp(1, k_max)
        threshold = kth.gather(1, (k - 1)[:, None])
        scaled = torch.where((top_k[:, None] > 0) & (scaled < threshold), float("-inf"), scaled)
    if any_top_p:
        sorted_logits, order = scaled.sort(dim=-1, descending=True)
        cum = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
        # drop a token once the mass before it already reaches top_p (the first always stays)
        drop_sorted = (cum - sorted_logits.softmax(dim=-1)) >= top_p[:, None]
        drop = torch.zeros_like(drop_sorted).scatter(1, order, drop_sorted)
        scaled = scaled.masked_fill(drop, float("-inf"))
    base = _fmix32((seed & 0xFFFFFFFF) ^ _fmix32(position & 0xFFFFFFFF))  # (B,)
    vocab = torch.arange(V, device=logits.device, dtype=torch.int64)
    bits = _fmix32(base[:, None] ^ ((vocab * 0x9E3779B1) & 0xFFFFFFFF)[None, :])  # (B, V)
    u = (bits.double() + 0.5) / 4294967296.0
    gumbel = -torch.log(-torch.log(u)).float()
    sampled = (scaled + gumbel).argmax(dim=-1)
    return torch.where(temperature > 0, sampled, greedy)


def _sampling_bounds(params: list[SamplingParams]) -> dict[str, int | bool]:
    """sample_tokens' k_max and any_top_p for these requests, known on the host (reading them
    from the device tensors would wait for the GPU)."""
    return {"k_max": max(int(x.top_k) for x in params), "any_top_p": any(x.top_p < 1.0 for x in params)}


COUNTERS = ("decode_steps", "decode_row_steps", "prefills", "prefill_rows")  # Engine.counters' keys


def _buckets(limit: int, start: int) -> list[int]:
    out, b = [], start
    while b < limit:
        out.append(b)
        b *= 2
    return out + [limit]


def _bucket(value: int, buckets: list[int]) -> int:
    for b in buckets:
        if value <= b:
            return b
    raise ValueError(f"{value} exceeds the largest bucket {buckets[-1]}")


@torch.no_grad()
def generate_without_cache(model: nn.Module, prompt: list[int], max_tokens: int,
                           stop_token_ids: tuple[int, ...] = ()) -> list[int]:
    """Greedy decoding that re-runs the whole sequence for every token (the chapter's way).
    The reference the engine is tested against, and the naive baseline in the benchmarks."""
    device = next(model.parameters()).device
    block = model.config.block_size
    ids = torch.tensor([prompt], dtype=torch.long, device=device)
    out: list[int] = []
    for _ in range(max_tokens):
        logits, _ = model(ids[:, -block:], last_only=True)
        nxt = int(logits[0, -1].argmax())
        out.append(nxt)
        if nxt in stop_token_ids:
            break
        ids = torch.cat([ids, torch.tensor([[nxt]], device=device)], dim=1)
    return out


class Engine:
    """Continuous batching over a static KV cache. Thread-safe `submit`; one scheduler."""

    def __init__(self, model: nn.Module, *, max_batch: int = 16, max_seq_len: int | None = None,
                 max_queue: int = 256, prefill_chunk: int = 256, prefill_batch: int = 32,
                 eos_id: int | None = None, vocab_size: int | None = None,
                 cuda_graphs: bool | None = None, compile: bool | None = None,
                 decode_steps: int = 1, prefill_wait_steps: int = 0, max_consecutive_errors: int = 3):
        self.model = model.eval()
        cfg = model.config
        self.device = model.transformer.wte.weight.device
        self.dtype = model.transformer.wte.weight.dtype
        self.max_batch = max_batch
        self.max_seq_len = min(max_seq_len or cfg.block_size, cfg.block_size)
        self.max_queue = max_queue
        self.prefill_chunk = prefill_chunk
        self.prefill_batch = prefill_batch
        self.eos_id = eos_id
        # The model's vocabulary is padded to a multiple of 64; ids past the tokenizer's are
        # never sampled (they would not decode).
        self.vocab_size = min(vocab_size or cfg.vocab_size, cfg.vocab_size)
        self.max_consecutive_errors = max_consecutive_errors
        on_cuda = self.device.type == "cuda"
        self.cuda_graphs = on_cuda if cuda_graphs is None else (cuda_graphs and on_cuda)
        head_dim = cfg.n_embd // cfg.n_head
        cache_dtype = self.dtype if self.dtype.is_floating_point else torch.float32
        # One cache for every layer, (n_layer, 2, slots, H, max_seq_len + 1, D), allocated once:
        # a decode step writes all layers' new keys and values with one indexed copy. The spare
        # position is never used: it keeps every length bucket a strict slice of the cache, so
        # the compiled step is not specialised (recompiled) for the full length.
        # One spare slot past max_batch: the rows that pad a prefill to its graph's batch
        # bucket write there, and nothing reads it.
        self.cache = torch.zeros((cfg.n_layer, 2, max_batch + 1, cfg.n_head, self.max_seq_len + 1, head_dim),
                                 dtype=cache_dtype, device=self.device)
        self.kv = [(self.cache[i, 0], self.cache[i, 1]) for i in range(cfg.n_layer)]  # views, for prefill
        self.kv_bytes = self.cache.numel() * self.cache.element_size()
        # Per-slot decode state on the device; the host mirrors positions exactly. CUDA graphs
        # read and write these fixed addresses, which the scheduler fills in between steps.
        z = lambda dt: torch.zeros(max_batch, dtype=dt, device=self.device)  # noqa: E731
        self.tokens_buf, self.pos_buf, self.active_buf = z(torch.long), z(torch.long), z(torch.long)
        self.temp_buf, self.topp_buf = z(torch.float32), z(torch.float32) + 1.0
        self.topk_buf, self.seed_buf = z(torch.long), z(torch.long)
        self.pos_host = [0] * max_batch
        self._active_host = [False] * max_batch  # mirrors active_buf: a device write only when it changes
        # The decoding rows (the slots active_buf marks, ascending) and their requests, rebuilt
        # only when a row starts or stops rather than scanned from the slots every launch; and
        # how many of them sample, so a launch knows it is greedy without looking at each row.
        self._sampling_host = [False] * max_batch
        self._n_sampling = 0
        self._decoding: tuple[list[int], list[Request]] | None = None  # None: to rebuild
        self.slots: list[Request | None] = [None] * max_batch
        self._free = list(range(max_batch))  # a heap: the lowest free slot first keeps batches dense
        self.batch_buckets = _buckets(max_batch, 1)
        self.len_buckets = _buckets(self.max_seq_len, min(64, self.max_seq_len))
        self.compile = self.cuda_graphs if compile is None else compile
        # Greedy decode steps per launch: 1 or this. Per step, a launch costs the host a graph
        # launch, a read-back and its bookkeeping, about as long as the GPU's step at batch 1;
        # k steps per launch pay that once. Opt-in (default 1): on an H100, 8 took 50 tokens at
        # batch 1 from 45.6 to 40.0 ms and batch 256 from 101k to 118k tokens/s, but warming
        # up every bucket's 8-step graph took 200+ s instead of ~45 s and 14 GB of graph memory
        # (bench/results/decode_variants_h100.json, serving_h100.json's notes).
        if decode_steps < 1:
            raise ValueError("decode_steps must be >= 1")
        self.step_buckets = sorted({1, decode_steps})
        # While rows decode, admitted prompts may wait up to this many decode launches so that
        # several share one prefill (0: prefill at once). A prefill's cost on a GPU hardly
        # depends on how many prompts it carries, and under steady load one arrives about
        # every step: prefilling each alone adds a prefill to nearly every step. TGI's
        # max_waiting_tokens is the same idea. 0 by default here; the server passes 4 on a GPU
        # (engine_process.GPU_PREFILL_WAIT_STEPS, measured in serving_h100_prefill_wait.json).
        if prefill_wait_steps < 0:
            raise ValueError("prefill_wait_steps must be >= 0")
        self.prefill_wait_steps = prefill_wait_steps
        self._launches = 0
        # Cumulative work, for /stats and the benchmarks: decode steps run, rows x steps in them
        # (mean batch = decode_row_steps / decode_steps), prefills and the prompt rows in them.
        self.counters = dict.fromkeys(COUNTERS, 0)
        # Where a launch's tokens are read back: pinned host buffers reused in turn (a fresh
        # pinned tensor per launch cost the host ~4% of its step time under load on an H100),
        # each with its event. Three: one is read while the next launch's is being written.
        self._readback = [(torch.empty((max(self.step_buckets), max_batch), dtype=torch.long, pin_memory=True),
                           torch.cuda.Event()) for _ in range(3)] if on_cuda else []
        # On CUDA the decode step (model.decode_step plus the greedy pick) is compiled whole,
        # then captured per bucket in CUDA graphs. Dynamic shapes: three compiles (batch 1 at
        # the first length, batch 1 at any length, batch >= 2) instead of one per bucket.
        # Compiling one shared layer instead (a third of the compile time) measured 51 ms
        # against 38-40 ms for 50 tokens at batch 1 on an H100: fusion across layers matters.
        self._decode_fn, self._advance_fn = _decode_and_pick, _advance_rows
        if self.compile:
            # several engines in one process (the benchmarks) each add guards on their model
            torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 64)
            self._decode_fn = torch.compile(_decode_and_pick, dynamic=True, fullgraph=True)
            # one fused kernel instead of four (where, copy, add, and a copy of the bools)
            self._advance_fn = torch.compile(_advance_rows, dynamic=True, fullgraph=True)
        self._graphs: dict[tuple[int, int, int], tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}
        # Prefill on CUDA also replays graphs, one per (rows, chunk length, attended length)
        # bucket, captured from the eager model: an eager prefill launches ~20 ops per layer,
        # several ms of host time in which the engine makes no step. The prompt chunks are
        # padded to the bucket (pad rows write to the spare slot, pad positions past the
        # chunk write junk that decode overwrites before anyone reads it). The CPU runs the
        # exact shapes; tests set pad_prefill there to check the padding.
        self.pad_prefill = self.cuda_graphs
        self.prefill_batch_buckets = _buckets(prefill_batch, 1)
        self.prefill_len_buckets = _buckets(min(prefill_chunk, self.max_seq_len), min(16, prefill_chunk))
        # the prefill's inputs, one host-to-device copy per prefill: ids (rows, T), then the
        # rows' start positions, slots, last-token indices and new positions (4, rows), then the
        # finished rows' settings (5, rows); from pinned host memory on CUDA (_prefill)
        self._prefill_in = torch.zeros(prefill_batch * (prefill_chunk + 9), dtype=torch.long, device=self.device)
        self._pinned = on_cuda
        self._prefill_graphs: dict[tuple[int, int, int], tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}
        self._graph_pool = None
        self._warm_stream = None
        self._waiting: deque[Request] = deque()
        self._prefilling: list[Request] = []
        self._ids = itertools.count()
        self._cv = threading.Condition()
        # Set by Request.cancel: the scheduler looks for cancelled requests only after one,
        # not through every slot at every step.
        self._cancel_pending = False
        self._thread: threading.Thread | None = None
        self._running = False
        self._pending: tuple | None = None  # a launched decode step whose tokens are unread
        self._first_tokens: tuple | None = None  # this step's prefill's first tokens, unread
        self.healthy = True
        self.dead_reason: str | None = None
        # Called on the scheduler thread after every step: a server hands tokens over per step.
        self.on_step_end: Callable[[], None] | None = None
        self._consecutive_errors = 0

    # ---- public API -------------------------------------------------------------------
    def submit(self, prompt: list[int], params: SamplingParams,
               on_token: Callable[[int], None] | None = None,
               on_finish: Callable[[Request], None] | None = None) -> Request:
        """Queue a request. Raises QueueFull, EngineDead, or ValueError for a bad prompt."""
        if not prompt:
            raise ValueError("empty prompt")
        if len(prompt) >= self.max_seq_len:
            raise ValueError(f"prompt of {len(prompt)} tokens does not fit max_seq_len {self.max_seq_len}")
        if params.max_tokens < 1:
            raise ValueError("max_tokens must be >= 1")
        seed = params.seed if params.seed is not None else int.from_bytes(os.urandom(4), "little")
        req = Request(next(self._ids), list(prompt), params, seed & 0x7FFFFFFF, on_token, on_finish)
        req._stop_ids = frozenset(params.stop_token_ids) | ({self.eos_id} if self.eos_id is not None else set())
        req._max_new = min(params.max_tokens, self.max_seq_len - len(req.prompt))
        req._on_cancel = self._note_cancel
        with self._cv:
            if not self.healthy:
                raise EngineDead(self.dead_reason or "engine is not running")
            if len(self._waiting) >= self.max_queue:
                raise QueueFull(f"{len(self._waiting)} requests waiting")
            self._waiting.append(req)
            self._cv.notify()
        return req

    def generate(self, prompt: list[int], params: SamplingParams = SamplingParams()) -> list[int]:
        """Blocking convenience: the generated token ids (runs the scheduler inline if no thread)."""
        req = self.submit(prompt, params)
        if self._thread is None:
            while not req.finished:
                self.step()
        else:
            req.wait()
        if req.finish_reason == "error":
            raise RuntimeError(req.error or "generation failed")
        return req.tokens

    def generate_batch(self, prompts: list[list[int]], params: SamplingParams) -> list[list[int]]:
        reqs = [self.submit(p, params) for p in prompts]
        while not all(r.finished for r in reqs):
            if self._thread is None:
                self.step()
            else:
                reqs[-1].wait(0.01)
        return [r.tokens for r in reqs]

    def start(self) -> None:
        """Run the scheduler on a background thread."""
        if self._thread is not None:
            return
        self._running = True
        self._thread = threading.Thread(target=self._loop, name="engine", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        with self._cv:
            self._running = False
            self._cv.notify_all()
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None

    @property
    def num_running(self) -> int:
        return self.max_batch - len(self._free)  # every slot not free holds a request

    @property
    def num_waiting(self) -> int:
        return len(self._waiting)

    @property
    def kv_cache_usage(self) -> float:
        """Fraction of the cache's token positions held by live requests."""
        used = sum(self.pos_host)  # a free slot's position is 0 (_release, _reset_slots)
        return used / (self.max_batch * self.max_seq_len)

    def has_work(self) -> bool:
        return bool(self._waiting or self._prefilling or self._pending or self.num_running)

    @torch.no_grad()
    def warmup(self, max_len: int | None = None) -> None:
        """Compile and capture the decode step for every batch bucket up to length max_len, and
        run one prefill, so first requests don't pay for it."""
        length = min(max_len or self.len_buckets[0], self.max_seq_len)
        start = time.perf_counter()
        if self.cuda_graphs:
            for lb in self.len_buckets:
                for b in self.batch_buckets:
                    for steps in (0, *self.step_buckets):  # 0: a sampling step (logits out)
                        self._graph(b, lb, steps)
                for rows in self.prefill_batch_buckets:  # idle: the junk K/V land in free slots
                    for T in self.prefill_len_buckets:
                        if T <= lb:
                            self._prefill_graph(rows, T, lb)
                if lb >= length:
                    break
        self.generate([0] * min(8, self.max_seq_len - 1), SamplingParams(max_tokens=2))
        self._reset_slots()
        if self.device.type == "cuda":
            log.info("engine warm: %d decode and %d prefill CUDA graphs in %.1f s, %.2f GB of GPU "
                     "memory reserved", len(self._graphs), len(self._prefill_graphs), time.perf_counter() - start,
                     torch.cuda.memory_reserved(self.device) / 1e9)

    # ---- the scheduler -----------------------------------------------------------------
    def _loop(self) -> None:
        while True:
            with self._cv:
                while self._running and not self.has_work():
                    self._cv.wait(0.1)
                if not self._running:
                    break
            self.step()
        self._fail_all("engine stopped")

    def step(self) -> None:
        """One scheduler iteration: drop cancelled, prefill admitted requests, decode a step."""
        try:
            self._step()
            self._consecutive_errors = 0
        except Exception as e:  # a failed step must not take the process down
            self._consecutive_errors += 1
            log.error("engine step failed (%d in a row): %s", self._consecutive_errors,
                      type(e).__name__, exc_info=log.isEnabledFor(logging.DEBUG))
            self._pending = None
            self._fail_running(f"engine error: {type(e).__name__}")
            if self._consecutive_errors >= self.max_consecutive_errors or _is_fatal(e):
                with self._cv:
                    self.healthy = False
                    self.dead_reason = f"engine failed: {type(e).__name__}"
                    self._running = False
                self._fail_all(self.dead_reason)
        finally:
            if self.on_step_end is not None:
                self.on_step_end()

    @torch.no_grad()
    def _step(self) -> None:
        self._drop_cancelled()
        self._admit()
        if self._prefilling and self._prefill_due():
            self._prefill()
        launched = self._launch_decode()
        if self._pending is not None:
            self._finish_decode(*self._pending)
            self._pending = None
        # after the previous launch's tokens (which these rows were not in) and before this
        # launch's (which they are): each request's tokens reach it in order
        self._emit_first_tokens()
        if launched is not None:
            if self.device.type == "cuda":
                self._pending = launched  # read back next iteration, after the next launch
            else:
                self._finish_decode(*launched)

    def _note_cancel(self) -> None:
        self._cancel_pending = True

    def _drop_cancelled(self) -> None:
        if not self._cancel_pending:
            return
        self._cancel_pending = False  # cleared before the scan: a cancel during it sets it again
        with self._cv:
            cancelled = [r for r in self._waiting if r._cancelled]
            for r in cancelled:
                self._waiting.remove(r)
        for r in cancelled:
            self._finish(r, "cancelled")
        for r in list(self._prefilling):
            if r._cancelled:
                self._prefilling.remove(r)
                self._release(r, "cancelled")
        for r in self.slots:
            if r is not None and r._cancelled and r not in self._prefilling and r.finish_reason is None:
                self._release(r, "cancelled")

    def _admit(self) -> None:
        with self._cv:
            while self._waiting and self._free and len(self._prefilling) < self.prefill_batch:
                req = self._waiting.popleft()
                req.slot = heapq.heappop(self._free)
                req.scheduled_time = time.perf_counter()
                req._admitted_at = self._launches
                self.slots[req.slot] = req
                self._prefilling.append(req)

    def _prefill_due(self) -> bool:
        """Prefill now, or let admitted prompts gather (prefill_wait_steps) while rows decode."""
        if self.prefill_wait_steps == 0 or len(self._prefilling) >= self.prefill_batch:
            return True
        if not self._decoding_rows()[0]:
            return True
        oldest = min(r._admitted_at for r in self._prefilling)
        return self._launches - oldest >= self.prefill_wait_steps

    def _prefill(self) -> None:
        """One padded batch of prompt chunks; rows whose prompt ends here get their first token."""
        batch: list[Request] = []
        T = start = 0  # the longest chunk and the furthest start in the batch
        for r in self._prefilling[: self.prefill_batch]:
            n = min(len(r.prompt) - r.prefilled, self.prefill_chunk)
            # padded to the longest chunk, every row must still end inside the cache
            if max(start, r.prefilled) + max(T, n) <= self.max_seq_len:
                batch.append(r)
                T, start = max(T, n), max(start, r.prefilled)
        chunks = [r.prompt[r.prefilled: r.prefilled + T] for r in batch]
        n = len(batch)
        if self.pad_prefill:
            rows_p, T_p = _bucket(n, self.prefill_batch_buckets), _bucket(T, self.prefill_len_buckets)
        else:
            rows_p, T_p = n, T
        done = [i for i, (r, c) in enumerate(zip(batch, chunks)) if r.prefilled + len(c) == len(r.prompt)]
        reqs = [batch[i] for i in done]
        p = [r.params for r in reqs]
        # Every input in one host buffer, copied over without waiting for the GPU (a plain copy
        # from pageable memory would wait for the decode launch in flight, and the host would
        # prepare the next launch only once the GPU is idle): the chunks (rows, T), then
        # (4, rows) of start positions, slots, last-token indices and positions after the
        # chunk, then (5, finished) of row index, slot, top_k, seed and prompt length. Built as
        # one Python list and converted once, through an array: a torch.tensor per chunk and per
        # meta row cost the host ~5 us each, and torch.tensor of the whole list 40 us at 700 ids.
        flat: list[int] = []
        for c in chunks:
            flat += c
            flat += [0] * (T_p - len(c))
        pad = [0] * (rows_p - n)
        flat += [0] * (T_p * (rows_p - n))
        starts, lasts = [r.prefilled for r in batch], [len(c) - 1 for c in chunks]
        flat += starts + pad
        flat += [r.slot for r in batch] + [self.max_batch] * (rows_p - n)  # pad rows: the spare slot
        flat += lasts + pad
        flat += [a + b + 1 for a, b in zip(starts, lasts)] + pad
        if reqs:
            flat += done + [r.slot for r in reqs] + [int(x.top_k) for x in p] + [r.seed for r in reqs]
            flat += [len(r.prompt) for r in reqs]
        host = torch.frombuffer(array.array("q", flat), dtype=torch.long)  # shares the array's memory
        if self._pinned:
            host = host.pin_memory()
        device_in = self._prefill_in[: host.numel()]
        device_in.copy_(host, non_blocking=True)
        meta = device_in[rows_p * T_p: rows_p * (T_p + 4)].view(4, rows_p)
        slots_in, new_pos = meta[1, :n], meta[3, :n]
        # Pad positions past the end write junk K/V beyond the prompt: decode overwrites each
        # position before any query may attend to it, so the junk is never read.
        length = _bucket(max(r.prefilled + T for r in batch), self.len_buckets)
        logits = self._run_prefill(rows_p, T_p, length)[:n]
        self.counters["prefills"] += 1
        self.counters["prefill_rows"] += n
        for r, c in zip(batch, chunks):
            r.prefilled += len(c)
            self.pos_host[r.slot] = r.prefilled
        # A slot still mid-prompt sits inside the decode batch as an idle row that writes junk
        # at its position: point that at the next prompt position, which the next chunk rewrites.
        self.pos_buf[slots_in] = new_pos
        if not reqs:
            return
        idx, slots, top_k, seed, pos = device_in[rows_p * (T_p + 4):].view(5, len(reqs)).unbind()
        floats = torch.tensor([[float(x.temperature) for x in p], [float(x.top_p) for x in p]],
                              pin_memory=self._pinned)
        temperature, top_p = floats.to(self.device, non_blocking=True).unbind()
        self.temp_buf[slots] = temperature
        self.topk_buf[slots] = top_k
        self.topp_buf[slots] = top_p
        self.seed_buf[slots] = seed
        last_logits = logits[idx, -1, : self.vocab_size]
        if all(x.temperature <= 0 for x in p):
            first = last_logits.argmax(dim=-1)
        else:
            first = sample_tokens(last_logits, temperature, top_k, top_p, seed, pos - 1, **_sampling_bounds(p))
        self.tokens_buf[slots] = first
        self.pos_buf[slots] = pos
        self.active_buf[slots] = 1
        ended = []
        self._decoding = None
        for r in reqs:
            self._prefilling.remove(r)
            r._launched = 1  # decodes from the next launch on
            self._active_host[r.slot] = True
            self._sampling_host[r.slot] = sampling = not r.params.temperature <= 0  # the greedy test's negation
            self._n_sampling += sampling
            if r.params.max_tokens <= 1 or len(r.prompt) + 1 >= self.max_seq_len:
                r._stopping = True  # its first token ends it: no launch for it (_emit releases it)
                ended.append(r.slot)
        self._deactivate(ended)
        # The first tokens are read back after the next decode launch (_emit_first_tokens):
        # the host does not wait for the GPU before giving it that launch.
        out, event = first, None
        if self.device.type == "cuda":
            out = first.to("cpu", non_blocking=True)
            event = torch.cuda.Event()
            event.record()
        self._first_tokens = (reqs, out, event)

    def _emit_first_tokens(self) -> None:
        if self._first_tokens is None:
            return
        reqs, out, event = self._first_tokens
        self._first_tokens = None
        if event is not None:
            event.synchronize()  # the prefill's, recorded before the decode launched after it
        now = time.perf_counter()
        for r in reqs:
            r.first_token_time = now
        self._emit(reqs, out.tolist(), range(len(reqs)))

    def _decoding_rows(self) -> tuple[list[int], list[Request]]:
        """The decoding slots, ascending, and their requests: a live request's whose first token
        is made and whose last is not launched yet. Exactly the slots _active_host marks (tests
        check it). Both lists are rebuilt, never changed in place, when a row starts or stops:
        a launch keeps them until its tokens are read back, the next step on CUDA."""
        if self._decoding is None:
            rows = [s for s, active in enumerate(self._active_host) if active]
            self._decoding = rows, [self.slots[s] for s in rows]
        return self._decoding

    def _launch_decode(self):
        rows, reqs = self._decoding_rows()
        if not rows:
            return None
        B = _bucket(rows[-1] + 1, self.batch_buckets)
        greedy = self._n_sampling == 0
        k = self._steps_per_launch(reqs, B) if greedy else 1
        # every row in [0, B) writes at its positions this launch, live or not: stay in bounds
        length = _bucket(max(self.pos_host[:B]) + k, self.len_buckets)
        if greedy:
            nxt = self._run_decode(B, length, k)  # (k, B)
        else:  # sampling has data-dependent shapes (top-k, top-p): eager, after the graph
            logits = self._run_decode(B, length, 0)
            nxt = sample_tokens(logits, self.temp_buf[:B], self.topk_buf[:B], self.topp_buf[:B], self.seed_buf[:B],
                                self.pos_buf[:B], **_sampling_bounds([r.params for r in reqs]))
            self._advance(B, nxt)
            nxt = nxt[None]
        self._launches += 1
        self.counters["decode_steps"] += k
        self.counters["decode_row_steps"] += k * len(rows)
        out, event = nxt, None
        if self._readback:
            buf, event = self._readback[self._launches % len(self._readback)]
            out = buf[: nxt.shape[0], :B]
            out.copy_(nxt, non_blocking=True)
            event.record()
        # Requests that reach max_tokens or the end of the cache with this launch get no
        # further one; their idle row writes junk at position 0 of their own slot, which is
        # harmless. A launch of k steps may run a row past its max_tokens: the extra tokens
        # are dropped on read-back and their K/V land in positions nobody reads.
        pos_host, max_seq_len = self.pos_host, self.max_seq_len
        ending = []
        for s, r in zip(rows, reqs):  # one pass per row: this runs every launch
            pos = pos_host[s] + k
            r._launched += k
            if r._launched >= r.params.max_tokens or pos >= max_seq_len:
                r._stopping = True
                pos = 0
                ending.append(r)
            pos_host[s] = pos
        if ending:
            self._deactivate([r.slot for r in ending])
        return rows, reqs, out, event, ending

    def _steps_per_launch(self, reqs: list[Request], B: int) -> int:
        """Greedy steps for this launch: the most (a step bucket) that the rows still want,
        1 while a request waits for a free slot or is mid-prefill (it joins at the next
        launch, so long launches would hold up its first token), and never past the cache."""
        if len(self.step_buckets) == 1 or self._prefilling or (self._waiting and self._free):
            return 1
        want = max(r.params.max_tokens - r._launched for r in reqs)
        room = self.max_seq_len - max(self.pos_host[:B])
        return max(k for k in self.step_buckets if k <= min(want, room) or k == 1)

    def _finish_decode(self, rows: list[int], reqs: list[Request], out: torch.Tensor,
                       event: torch.cuda.Event | None, ending: list[Request]) -> None:
        if event is not None:
            event.synchronize()
        for step_tokens in out.tolist():  # (k, B): one list of row tokens per step
            self._emit(reqs, step_tokens, rows)
        for r in ending:  # in row order, as they were launched
            if r.finish_reason is None:
                self._release(r, "length")

    def _emit(self, reqs: list[Request], tokens: list[int], cols: list[int] | range) -> None:
        """Each request of reqs still live gets its token, tokens[col]: appended, streamed,
        then checked against its stop ids and length. Runs once per row and step, the engine's
        hottest host code: one loop over the rows, no method call per token, and each check
        one lookup in what submit precomputed (Request._stop_ids, _max_new)."""
        release = self._release
        for r, c in zip(reqs, cols):
            if r.finish_reason is not None:  # finished (stop, cancel, length) meanwhile
                continue
            token = tokens[c]
            got = r.tokens
            got.append(token)
            on_token = r.on_token
            if on_token is not None:
                try:
                    on_token(token)
                except Exception:  # a broken consumer loses its request, not the engine
                    log.warning("on_token callback failed for request %d", r.id)
                    r.cancel()
            if token in r._stop_ids:
                release(r, "stop")
            elif len(got) >= r._max_new:
                release(r, "length")

    def _release(self, r: Request, reason: str, error: str | None = None) -> None:
        if r.slot >= 0 and self.slots[r.slot] is r:
            s = r.slot
            self._deactivate([s])
            self.pos_host[s] = 0
            self.slots[s] = None
            heapq.heappush(self._free, s)
        self._finish(r, reason, error)

    def _finish(self, r: Request, reason: str, error: str | None = None) -> None:
        if r.finish_reason is not None:
            return
        r.finish_reason = reason
        r.error = error
        r.finish_time = time.perf_counter()
        r._done.set()
        if r.on_finish is not None:
            try:
                r.on_finish(r)
            except Exception:
                log.warning("on_finish callback failed for request %d", r.id)

    def _fail_running(self, message: str) -> None:
        for r in list(self.slots):
            if r is not None:
                self._release(r, "error", message)
        self._prefilling.clear()
        self._reset_slots()

    def _fail_all(self, message: str) -> None:
        self._fail_running(message)
        with self._cv:
            waiting, self._waiting = list(self._waiting), deque()
        for r in waiting:
            self._finish(r, "error", message)

    def _deactivate(self, slots: list[int]) -> None:
        """Stop the rows' decoding on the device (active flag and position to 0), in one
        host-to-device copy and two kernels for all of them; rows already stopped are skipped.
        Per-row scalar writes cost the host ~15 us each, several per finished request."""
        slots = [s for s in slots if self._active_host[s]]
        if not slots:
            return
        self._decoding = None
        for s in slots:
            self._active_host[s] = False
            self._n_sampling -= self._sampling_host[s]
        idx = torch.tensor(slots, pin_memory=self._pinned).to(self.device, non_blocking=True)
        self.active_buf.index_fill_(0, idx, 0)
        self.pos_buf.index_fill_(0, idx, 0)

    def _reset_slots(self) -> None:
        self.active_buf.zero_()
        self.pos_buf.zero_()
        self._active_host = [False] * self.max_batch
        self._sampling_host = [False] * self.max_batch
        self._n_sampling = 0
        self._decoding = None
        self.pos_host = [0] * self.max_batch
        self.slots = [None] * self.max_batch
        self._free = list(range(self.max_batch))
        self._pending = None
        self._first_tokens = None

    # ---- the decode step -----------------------------------------------------------------
    def _decode(self, B: int, length: int, greedy: bool) -> torch.Tensor:
        """Rows [0, B): run the model on each row's token, write the new K/V at (row, pos).
        Greedy: pick the tokens and advance, returning them (B,); else return logits (B, V)."""
        logits, nxt = self._decode_fn(self.model, self.tokens_buf[:B], self.pos_buf[:B], self.cache, length,
                                      self.vocab_size)
        if not greedy:
            return logits
        self._advance(B, nxt)
        return nxt

    def _decode_steps(self, B: int, length: int, steps: int) -> torch.Tensor:
        """`steps` greedy steps, each feeding the next: their tokens (steps, B). steps == 0 is
        one step returning logits, for sampling."""
        if steps == 0:
            return self._decode(B, length, greedy=False)
        if steps == 1:
            return self._decode(B, length, greedy=True)[None]  # a view: no copy kernel per step
        return torch.stack([self._decode(B, length, greedy=True) for _ in range(steps)])

    def _advance(self, B: int, nxt: torch.Tensor) -> None:
        self._advance_fn(self.tokens_buf[:B], self.pos_buf[:B], self.active_buf[:B], nxt)

    def _run_decode(self, B: int, length: int, steps: int) -> torch.Tensor:
        if not self.cuda_graphs:
            return self._decode_steps(B, length, steps)
        graph, out = self._graph(B, length, steps)
        graph.replay()
        return out

    def _graph(self, B: int, length: int, steps: int) -> tuple[torch.cuda.CUDAGraph, torch.Tensor]:
        """The CUDA graph of this bucket's launch and its output, captured on first use."""
        key = (B, length, steps)
        if key not in self._graphs:
            def warm() -> None:  # a launch advances the tokens and positions: put them back
                tokens, pos = self.tokens_buf.clone(), self.pos_buf.clone()
                self._decode_steps(B, length, steps)
                self.tokens_buf.copy_(tokens)
                self.pos_buf.copy_(pos)
            self._graphs[key] = self._capture(lambda: self._decode_steps(B, length, steps), warm)
        return self._graphs[key]

    # ---- the prefill ------------------------------------------------------------------------
    def _prefill_forward(self, rows: int, T: int, length: int) -> torch.Tensor:
        """The model over the prompt chunks in _prefill_in (rows, T): writes their K/V, returns
        the logits at each row's last chunk position (rows, 1, V)."""
        ids = self._prefill_in[: rows * T].view(rows, T)
        start, slots, last = self._prefill_in[rows * T: rows * (T + 3)].view(3, rows)  # meta[:3] of _prefill
        logits, _ = self.model(ids, kv_caches=self.kv, input_pos=start, cache_rows=slots,
                               logits_index=last, kv_len=length)
        return logits

    def _run_prefill(self, rows: int, T: int, length: int) -> torch.Tensor:
        if not self.cuda_graphs:
            return self._prefill_forward(rows, T, length)
        graph, out = self._prefill_graph(rows, T, length)
        graph.replay()
        return out

    def _prefill_graph(self, rows: int, T: int, length: int) -> tuple[torch.cuda.CUDAGraph, torch.Tensor]:
        key = (rows, T, length)
        if key not in self._prefill_graphs:
            # a warm-up prefill writes what the real one will (same inputs): nothing to undo
            run = lambda: self._prefill_forward(rows, T, length)  # noqa: E731
            self._prefill_graphs[key] = self._capture(run, run)
        return self._prefill_graphs[key]

    @torch.no_grad()
    def _capture(self, run: Callable[[], torch.Tensor], warm: Callable[[], None]
                 ) -> tuple[torch.cuda.CUDAGraph, torch.Tensor]:
        """Record run() as a CUDA graph (its output lives in the graph's memory). Warm up
        first on a side stream (compilation, cuBLAS handles, allocations): warm() runs the
        same work and must leave the engine's state as it found it."""
        if self._warm_stream is None:  # one stream: its cached blocks serve every capture
            self._warm_stream = torch.cuda.Stream()
        s = self._warm_stream
        s.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(s):
            for _ in range(2):
                warm()
        torch.cuda.current_stream().wait_stream(s)
        graph = torch.cuda.CUDAGraph()
        if self._graph_pool is None:
            self._graph_pool = torch.cuda.graph_pool_handle()
        with torch.cuda.graph(graph, pool=self._graph_pool):
            out = run()
        return graph, out


def _advance_rows(tokens: torch.Tensor, pos: torch.Tensor, active: torch.Tensor, nxt: torch.Tensor) -> None:
    """The active rows (active 1) take their next token and move one position on, in place."""
    tokens.copy_(torch.where(active.bool(), nxt, tokens))
    pos.add_(active)


def greedy_pick(logits: torch.Tensor, chunks: int = 64) -> torch.Tensor:
    """logits.argmax(-1) for (B, V), ties to the first index as argmax, in two short
    reductions: compiled, a one-row argmax over 50k logits is one program walking the row
    (~10 us on an H200, the batch-1 step's third-largest kernel); the maxima of `chunks`
    pieces, then the first piece holding the largest, spread the work over `chunks` programs."""
    B, V = logits.shape
    pad = -V % chunks
    if pad:
        logits = F.pad(logits, (0, pad), value=float("-inf"))
    values, index = logits.view(B, chunks, -1).max(dim=-1)  # (B, chunks): first maximum in each
    best = values.argmax(dim=-1, keepdim=True)  # the first piece holding the row's maximum
    return best.squeeze(1) * ((V + pad) // chunks) + index.gather(1, best).squeeze(1)


def _decode_and_pick(model: nn.Module, tokens: torch.Tensor, pos: torch.Tensor, cache: torch.Tensor,
                     length: int, vocab_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """model.decode_step (writing the new K/V into the cache at each row's position) plus the
    greedy pick, so the argmax over the vocabulary is compiled into the same graph. Returns
    the logits over the tokenizer's ids (B, vocab_size) in the model's dtype (sample_tokens
    casts them; no float copy is written for greedy steps) and their argmax (B,)."""
    logits, _ = model.decode_step(tokens, pos, cache, length, write_kv=True)
    logits = logits[:, :vocab_size]
    return logits, greedy_pick(logits)


def _is_fatal(e: Exception) -> bool:
    """CUDA errors leave the context unusable: no retry will help."""
    text = f"{type(e).__name__} {e}"
    return "CUDA error" in text or "AcceleratorError" in text
