"""The code-completion server on our own engine (engine.py): `serving.create_app` + an engine backend.

    MODEL_PATH=out-code-assistant python serve_api.py   # or: uvicorn serve_api:app --timeout-keep-alive 75
    curl -s localhost:8000/complete -H 'Content-Type: application/json' -d '{"code": "def add(a, b):"}'

All settings come from the environment (see serving.Settings); a bad value stops the start
with a one-line message naming the variable and exit code 2. The model is loaded and warmed
after the server starts answering: /ready says 503 until it is done.

Two ways to run the engine (ENGINE_PROCESS):
    1 (default)  EngineProcessBackend: the engine runs in its own process (engine_process.py),
                 one message per engine step each way. The HTTP process never imports torch
                 and cannot starve the engine of the GIL (issue #5).
    0            EngineBackend: the engine runs on a thread of this process.
"""
from __future__ import annotations

import asyncio
import itertools
import logging
import pickle
import socket
import struct
import subprocess
import sys
import threading
from collections import deque
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

from fastapi import FastAPI

from engine_process import load_engine, memory_used_bytes, readable_poller, timings
from serving import (Backend, BackendUnavailable, GenerationParams, GenerationTimings, Overloaded, Settings,
                     SettingsError, Tokenizer, create_app, load_settings, run_server)
from tokenizer import build_prompt, load_tokenizer

log = logging.getLogger("code_assistant.engine_backend")


class EngineGeneration:
    """An engine Request seen from the event loop.

    The engine thread appends tokens to a deque; the backend wakes the event loop once per
    engine step for every generation that got tokens (not once per token), and the loop takes
    all tokens that arrived in one go."""

    def __init__(self, backend: "EngineBackend") -> None:
        self._backend = backend
        self._tokens: deque[int] = deque()
        self._finished = False
        self._event = asyncio.Event()
        self.marked = False  # queued for the next wake-up (engine thread sets, loop clears)
        self.request: Any = None  # engine.Request, set right after submit
        self.wake_on_tokens = True  # False while final_tokens waits: only the finish wakes it

    # engine thread: keep these cheap and return
    def on_token(self, token_id: int) -> None:
        self._tokens.append(token_id)
        if not self.marked and self.wake_on_tokens:
            self.marked = True
            self._backend.dirty.append(self)

    def on_finish(self, _request: Any) -> None:
        self._finished = True
        self._backend.loop.call_soon_threadsafe(self.wake)

    # event loop
    def wake(self) -> None:
        self.marked = False
        self._event.set()

    async def next_tokens(self) -> list[int] | None:
        """Every token generated since the last call (waiting for one), or None once finished."""
        while True:
            if self._tokens:
                return [self._tokens.popleft() for _ in range(len(self._tokens))]
            if self._finished:
                return None
            self._event.clear()
            if self._tokens or self._finished:  # arrived between the check and the clear
                continue
            await self._event.wait()

    async def final_tokens(self) -> list[int] | None:
        self.wake_on_tokens = False  # read by the engine thread: at worst one more wake-up
        while not self._finished:
            self._event.clear()
            if self._finished:  # finished between the check and the clear
                break
            await self._event.wait()
        return [self._tokens.popleft() for _ in range(len(self._tokens))] or None

    def cancel(self) -> None:
        if self.request is not None:
            self.request.cancel()

    @property
    def finish_reason(self) -> str | None:
        return self.request.finish_reason if self.request is not None else None

    def timings(self) -> GenerationTimings:
        if self.request is None:
            return GenerationTimings()
        return GenerationTimings(*timings(self.request))


def _engine_config(s: Settings) -> dict[str, Any]:
    """What engine_process.load_engine needs from the settings, as plain (picklable) values."""
    return {"model_path": s.model_path, "model_name": s.model_name, "device": s.device, "dtype": s.dtype,
            "max_batch": s.max_concurrent_sequences, "max_queue": s.max_queue, "log_level": s.log_level,
            "fault_inject": s.fault_inject, "test_step_delay_ms": s.test_step_delay_ms}


class EngineBackend:
    """serving.Backend over engine.Engine on a thread of this process (ENGINE_PROCESS=0)."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.model_name = settings.model_name
        self._engine: Any = None
        self._tokenizer: Any = None
        self._device = "unloaded"
        self._model_id = ""
        self.loop: asyncio.AbstractEventLoop | None = None
        self.dirty: list[EngineGeneration] = []  # got tokens this engine step (engine thread)

    # ---- load / shutdown (worker threads) ---------------------------------------
    def load(self) -> None:
        engine, tokenizer, info = load_engine(_engine_config(self.settings))
        engine.on_step_end = self._after_step
        # The engine thread gives up the GIL at every device sync; with the event loop busy it
        # would wait up to Python's default 5 ms switch interval to get it back, several times
        # per decode step. 0.2 ms keeps steps near their device time under load.
        sys.setswitchinterval(2e-4)
        engine.start()
        self._model_id = info["model_id"]
        self._device = info["device"]
        self._tokenizer = tokenizer
        self._engine = engine
        log.info("engine started", extra={"mode": "thread", "max_batch": engine.max_batch,
                                          "max_seq_len": engine.max_seq_len, "max_queue": engine.max_queue,
                                          "kv_cache_bytes": engine.kv_bytes})

    def shutdown(self) -> None:
        if self._engine is not None:
            self._engine.stop()

    # ---- properties -------------------------------------------------------------
    @property
    def model_id(self) -> str:
        return self._model_id

    @property
    def device(self) -> str:
        return self._device

    @property
    def max_seq_len(self) -> int:
        return self._engine.max_seq_len

    @property
    def tokenizer(self) -> Tokenizer:
        return self._tokenizer

    @property
    def healthy(self) -> bool:
        return self._engine is None or bool(self._engine.healthy)

    @property
    def num_running(self) -> int:
        return self._engine.num_running if self._engine is not None else 0

    @property
    def num_waiting(self) -> int:
        return self._engine.num_waiting if self._engine is not None else 0

    @property
    def kv_cache_usage(self) -> float:
        return self._engine.kv_cache_usage if self._engine is not None else 0.0

    def memory_used_bytes(self) -> int:
        if self._engine is None:
            return 0
        return memory_used_bytes(self._engine)

    # ---- requests (event loop) ------------------------------------------------------
    def build_prompt(self, prefix: str, suffix: str | None, max_prompt_tokens: int) -> list[int]:
        return build_prompt(self._tokenizer, prefix, suffix, max_prompt_tokens)

    def submit(self, prompt_ids: list[int], params: GenerationParams) -> EngineGeneration:
        from engine import EngineDead, QueueFull, SamplingParams

        if self._engine is None:
            raise BackendUnavailable("not loaded")
        self.loop = asyncio.get_running_loop()
        gen = EngineGeneration(self)
        sp = SamplingParams(max_tokens=params.max_tokens, temperature=params.temperature, top_k=params.top_k,
                            top_p=params.top_p, seed=params.seed, stop_token_ids=params.stop_token_ids)
        try:
            gen.request = self._engine.submit(prompt_ids, sp, on_token=gen.on_token, on_finish=gen.on_finish)
        except QueueFull:
            raise Overloaded("queue full") from None
        except EngineDead:
            raise BackendUnavailable("engine dead") from None
        return gen


    def _after_step(self) -> None:
        """Engine thread, after each step: one event-loop wake-up for all that got tokens."""
        if self.dirty and self.loop is not None:
            dirty, self.dirty = self.dirty, []
            self.loop.call_soon_threadsafe(_wake_all, dirty)


def _wake_all(generations: list[EngineGeneration]) -> None:
    for g in generations:
        g.wake()


class ProcessGeneration:
    """A request running in the engine process, seen from the event loop (which alone touches it)."""

    __slots__ = ("_backend", "rid", "_tokens", "_event", "_finished", "_cancelled", "finish_reason", "_timings",
                 "_wake_on_tokens")

    def __init__(self, backend: "EngineProcessBackend", rid: int) -> None:
        self._backend = backend
        self.rid = rid
        self._tokens: list[int] = []
        self._event = asyncio.Event()
        self._finished = False
        self._cancelled = False
        self.finish_reason: str | None = None
        self._timings = GenerationTimings()
        self._wake_on_tokens = True  # False while final_tokens waits: only the finish wakes it

    def push(self, tokens: list[int]) -> None:
        self._tokens.extend(tokens)
        if self._wake_on_tokens:
            self._event.set()

    def finish(self, reason: str, timings: GenerationTimings) -> None:
        self.finish_reason = reason
        self._timings = timings
        self._finished = True
        self._event.set()

    async def next_tokens(self) -> list[int] | None:
        while True:
            if self._tokens:
                tokens, self._tokens = self._tokens, []
                return tokens
            if self._finished:
                return None
            self._event.clear()
            await self._event.wait()

    async def final_tokens(self) -> list[int] | None:
        self._wake_on_tokens = False
        while not self._finished:
            self._event.clear()
            await self._event.wait()
        tokens, self._tokens = self._tokens, []
        return tokens or None

    def cancel(self) -> None:
        if not self._finished and not self._cancelled:
            self._cancelled = True
            self._backend.send(("cancel", self.rid))

    def timings(self) -> GenerationTimings:
        return self._timings


class EngineProcessBackend:
    """serving.Backend over the engine in a child process (engine_process.py; ENGINE_PROCESS=1).

    Everything runs on the event loop, with no thread to contend for the GIL. Submits and
    cancels made during one loop iteration go to the engine as one message on a non-blocking
    socket (what does not fit waits for add_writer, so the loop never blocks on the engine).
    The engine's per-step messages are read with add_reader: when the loop is busy they pile
    up and are taken together, so the HTTP side's work per request shrinks as load grows
    while the engine keeps stepping on its own core."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.model_name = settings.model_name
        self._info: dict[str, Any] = {}
        self._tokenizer: Any = None
        self._proc: subprocess.Popen | None = None
        self._rconn: Connection | None = None  # engine -> us: blocking, read when readable
        self._wsock: socket.socket | None = None  # us -> engine: non-blocking
        self._wbuf = bytearray()  # what the engine's socket did not take yet
        self._gens: dict[int, ProcessGeneration] = {}
        self._ids = itertools.count()
        # the engine never holds more than this: running + its wait queue (the 429 bound)
        self._capacity = settings.max_concurrent_sequences + settings.max_queue
        self._ops: list[tuple] = []
        self._loop: asyncio.AbstractEventLoop | None = None
        self._loop_thread: int | None = None
        self._reading = False
        self._poller: Any = None
        self._stats: tuple = (0, 0, 0.0, True, 0)  # running, waiting, kv usage, healthy, memory bytes
        self._dead: str | None = None
        self._stopping = False

    # ---- load / shutdown (worker threads) ---------------------------------------
    def load(self) -> None:
        to_engine, engine_in = socket.socketpair()
        engine_out, from_engine = socket.socketpair()
        script = Path(__file__).resolve().with_name("engine_process.py")
        fds = (engine_in.fileno(), engine_out.fileno())
        try:
            self._proc = subprocess.Popen([sys.executable, str(script), "--fd-in", str(fds[0]),
                                           "--fd-out", str(fds[1])], pass_fds=fds)
        finally:
            engine_in.close()
            engine_out.close()
        self._rconn = Connection(from_engine.detach(), writable=False)
        self._wsock = to_engine
        to_engine.sendall(_frame(pickle.dumps(_engine_config(self.settings))))
        to_engine.setblocking(False)
        try:
            kind, payload = pickle.loads(self._rconn.recv_bytes())
        except (EOFError, OSError):
            code = self._proc.wait()
            raise RuntimeError(f"the engine process exited while loading (exit code {code})") from None
        if kind != "ready":
            self._proc.wait()
            raise RuntimeError(payload)
        self._tokenizer = load_tokenizer(self.settings.model_path)
        self._info = payload
        log.info("engine started", extra={"mode": "process", "pid": self._proc.pid,
                                          "max_batch": payload["max_batch"], "max_seq_len": payload["max_seq_len"],
                                          "max_queue": self.settings.max_queue,
                                          "kv_cache_bytes": payload["kv_cache_bytes"]})

    def shutdown(self) -> None:
        """Stop the engine process and wait for it (killed if it hangs): never an orphan."""
        self._stopping = True
        proc = self._proc
        if proc is None:
            return
        try:
            self._wsock.shutdown(socket.SHUT_WR)  # the engine reads what was sent, then EOF: it exits
        except OSError:
            pass  # already gone
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            log.warning("engine process did not stop: killing it")
            proc.kill()
            proc.wait(10)

    # ---- properties -------------------------------------------------------------
    @property
    def model_id(self) -> str:
        return self._info.get("model_id", "")

    @property
    def device(self) -> str:
        return self._info.get("device", "unloaded")

    @property
    def max_seq_len(self) -> int:
        return self._info["max_seq_len"]

    @property
    def tokenizer(self) -> Tokenizer:
        return self._tokenizer

    @property
    def healthy(self) -> bool:
        if self._proc is None or self._stopping:
            return True
        return self._dead is None and self._stats[3] and self._proc.poll() is None

    @property
    def num_running(self) -> int:
        return self._stats[0]

    @property
    def num_waiting(self) -> int:
        return self._stats[1]

    @property
    def kv_cache_usage(self) -> float:
        return self._stats[2]

    def memory_used_bytes(self) -> int:
        return self._stats[4]

    # ---- requests (event loop) ------------------------------------------------------
    def build_prompt(self, prefix: str, suffix: str | None, max_prompt_tokens: int) -> list[int]:
        return build_prompt(self._tokenizer, prefix, suffix, max_prompt_tokens)

    def submit(self, prompt_ids: list[int], params: GenerationParams) -> ProcessGeneration:
        if self._proc is None or not self._info:
            raise BackendUnavailable("not loaded")
        if not self.healthy:
            raise BackendUnavailable("engine dead")
        # the engine's own checks, made here so a bad request is refused synchronously
        if not prompt_ids:
            raise ValueError("empty prompt")
        if len(prompt_ids) >= self._info["max_seq_len"]:
            raise ValueError("prompt does not fit max_seq_len")
        if params.max_tokens < 1:
            raise ValueError("max_tokens must be >= 1")
        if len(self._gens) >= self._capacity:
            raise Overloaded("queue full")
        if not self._reading:
            self._start_reading()
        gen = ProcessGeneration(self, next(self._ids))
        self._gens[gen.rid] = gen
        self.send(("submit", gen.rid, list(prompt_ids),
                   (params.max_tokens, params.temperature, params.top_k, params.top_p, params.seed,
                    params.stop_token_ids)))
        return gen

    def send(self, op: tuple) -> None:
        """Queue a command for the engine: one message per event-loop iteration (thread-safe)."""
        loop = self._loop
        if loop is None:
            return  # nothing was ever submitted, so there is nothing to cancel
        if threading.get_ident() != self._loop_thread:
            loop.call_soon_threadsafe(self.send, op)
            return
        if not self._ops:
            loop.call_soon(self._flush)
        self._ops.append(op)

    def _flush(self) -> None:
        ops, self._ops = self._ops, []
        if not ops:
            return
        frame = _frame(pickle.dumps(ops, pickle.HIGHEST_PROTOCOL))
        if self._wbuf:  # still draining an earlier message: keep the order
            self._wbuf += frame
            return
        try:
            sent = self._wsock.send(frame)
        except BlockingIOError:
            sent = 0
        except OSError:
            return  # the engine process is gone; the reader sees the EOF and fails requests
        if sent < len(frame):
            self._wbuf += frame[sent:]
            self._loop.add_writer(self._wsock.fileno(), self._drain)

    def _drain(self) -> None:
        try:
            sent = self._wsock.send(self._wbuf)
        except BlockingIOError:
            return
        except OSError:
            sent = len(self._wbuf)  # gone: drop it, the reader handles the exit
        del self._wbuf[:sent]
        if not self._wbuf:
            self._loop.remove_writer(self._wsock.fileno())

    def _start_reading(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._loop_thread = threading.get_ident()
        self._poller = readable_poller(self._rconn)
        self._loop.add_reader(self._rconn.fileno(), self._on_readable)
        self._reading = True

    def _on_readable(self) -> None:
        """Every message the engine has sent so far, applied in order."""
        conn, gone = self._rconn, False
        try:
            while True:
                self._apply(pickle.loads(conn.recv_bytes()))
                if not self._poller.poll(0):
                    break
        except (EOFError, OSError):
            gone = True
        if gone:
            self._on_engine_exit()

    def _apply(self, msg: tuple) -> None:
        _, tokens, finished, stats = msg
        gens = self._gens
        for rid, new in tokens:
            g = gens.get(rid)
            if g is not None:
                g.push(new)
        for rid, reason, (queue_s, ttft_s, tpot_s) in finished:
            g = gens.pop(rid, None)
            if g is not None:
                g.finish(reason, GenerationTimings(queue_s, ttft_s, tpot_s))
        self._stats = stats

    def _on_engine_exit(self) -> None:
        self._loop.remove_reader(self._rconn.fileno())
        if self._wbuf:
            self._loop.remove_writer(self._wsock.fileno())
            self._wbuf.clear()
        reason = "cancelled" if self._stopping else "error"
        if not self._stopping:
            self._dead = "engine process exited"
            log.error("the engine process exited unexpectedly", extra={"exit_code": self._proc.poll(),
                                                                       "in_flight": len(self._gens)})
        gens, self._gens = self._gens, {}
        for g in gens.values():
            g.finish(reason, g.timings())


def _frame(data: bytes) -> bytes:
    """multiprocessing.connection's framing (a 4-byte big-endian length), which the engine reads."""
    return struct.pack("!i", len(data)) + data


def engine_backend(settings: Settings) -> Backend:
    """The backend factory create_app calls; the model loads later, in the lifespan."""
    return EngineProcessBackend(settings) if settings.engine_process else EngineBackend(settings)


def _build_app() -> FastAPI:
    try:
        settings = load_settings()
    except SettingsError as e:
        # an entry point, not library code: one line on stderr and exit code 2, no traceback
        sys.stderr.write(f"code-assistant: {e}\n")
        raise SystemExit(2) from None
    return create_app(engine_backend, settings)


app = _build_app()


def main() -> None:
    run_server(app)


if __name__ == "__main__":
    main()
