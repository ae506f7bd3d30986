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

Several HTTP processes in front of one engine (HTTP_WORKERS=N > 1, ENGINE_PROCESS=1 only),
for when one process's ~1 ms of HTTP work per request is the limit, not the engine:

    MODEL_PATH=out-code-assistant HTTP_WORKERS=4 python serve_api.py

    supervisor (this file's main: Supervisor)    private 0700 temp dir: engine.sock, metrics/
      |- engine process (engine_process.py --listen engine.sock): started first; the workers
      |    start once it has loaded (a load failure: exit 1 with the reason, as with one process)
      |- worker 1..N: `python serve_api.py` again, each accepting on the one listening socket
           (inherited: CODE_ASSISTANT_LISTEN_FD), connected to the engine over engine.sock
           (CODE_ASSISTANT_ENGINE_SOCKET), metrics in PROMETHEUS_MULTIPROC_DIR

Per worker: MAX_CONCURRENT_SEQUENCES + MAX_QUEUE and RATE_LIMIT_PER_MINUTE are split evenly
(ceil(total / N): 429s come at about the same totals, exactly only if clients spread evenly),
the in-process response cache (REDIS_URL shares one), /stats request counts (it names the
worker_pid). Global: the engine's running / waiting / KV usage, and /metrics from any worker
(multiprocess mode: counters summed over workers; see serving.Metrics). A worker that dies is
restarted and its requests are cancelled in the engine; SIGTERM or SIGINT to the supervisor
drains every worker (/ready 503, in-flight requests finish within DRAIN_TIMEOUT_S), then
stops the engine and exits 0. Under `uvicorn serve_api:app` HTTP_WORKERS must be 1 (exit 2).
"""
from __future__ import annotations

import asyncio
import functools
import itertools
import logging
import os
import pickle
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections import deque
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any, Callable

from fastapi import FastAPI

from engine_process import frame, load_engine, memory_used_bytes, readable_poller, timings
from serving import (Backend, BackendUnavailable, GenerationParams, GenerationTimings, Overloaded, Settings,
                     SettingsError, Tokenizer, TokenStream, create_app, load_settings, per_worker, run_server)
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
            "decode_steps": s.decode_steps, "prefill_wait_steps": s.prefill_wait_steps,
            "unread_timeout_s": s.engine_unread_timeout_s,
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

    def engine_counters(self) -> dict[str, int] | None:
        return dict(self._engine.counters) if self._engine is not None else None

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


class ProcessGeneration(TokenStream):
    """A request running in the engine process, seen from the event loop (which alone touches it)."""

    __slots__ = ("_backend", "rid", "_cancelled", "_timings")

    def __init__(self, backend: "EngineProcessBackend", rid: int) -> None:
        super().__init__()
        self._backend = backend
        self.rid = rid
        self._cancelled = False
        self._timings = GenerationTimings()

    def finish(self, reason: str, timings: GenerationTimings) -> None:
        self._timings = timings
        self.end(reason)

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
        # the engine never holds more than this: running + its wait queue (the 429 bound), or
        # this worker's share of it when HTTP_WORKERS workers share the engine
        self._capacity = per_worker(settings.max_concurrent_sequences + settings.max_queue, settings.http_workers)
        self._ops: list[tuple] = []
        self._loop: asyncio.AbstractEventLoop | None = None
        self._loop_thread: int | None = None
        self._reading = False
        self._poller: Any = None
        # running, waiting, kv usage, healthy, memory bytes, engine counters (None until a step reports them)
        self._stats: tuple = (0, 0, 0.0, True, 0, None)
        self._dead: str | None = None
        self._stopping = False
        self.on_stats: Callable[[], None] | None = None  # called when the engine's stats change
        self._supervisor = os.getppid()  # HTTP_WORKERS > 1: the process that started us and the engine

    # ---- load / shutdown (worker threads) ---------------------------------------
    def load(self) -> None:
        """Start the engine process, or (a worker of several) connect to the supervisor's."""
        shared = self.settings.engine_socket
        if self.settings.http_workers > 1 and not shared:
            raise RuntimeError("HTTP_WORKERS > 1 needs `python serve_api.py`, which starts the shared engine "
                               "(under `uvicorn serve_api:app` set HTTP_WORKERS=1)")
        if shared:
            # the engine's ends of both pairs go over its Unix socket: from then on this worker
            # talks to it exactly as to a child of its own
            _, to_engine, self._rconn = _engine_channel(functools.partial(_hand_over, shared))
        else:
            self._proc, to_engine, self._rconn = _engine_channel(_spawn_engine)
            to_engine.sendall(frame(pickle.dumps(_engine_config(self.settings))))
        self._wsock = to_engine
        to_engine.setblocking(False)
        payload = _engine_ready(self._rconn, self._proc)
        self._tokenizer = load_tokenizer(self.settings.model_path)
        self._info = payload
        if shared:
            log.info("connected to the shared engine", extra={"engine_pid": payload.get("pid"),
                                                               "max_in_flight": self._capacity})
            threading.Thread(target=self._watch_supervisor, name="supervisor-watch", daemon=True).start()
            return
        log.info("engine started", extra={"mode": "process", "pid": self._proc.pid,
                                          "max_batch": payload["max_batch"], "max_seq_len": payload["max_seq_len"],
                                          "max_queue": self.settings.max_queue,
                                          "kv_cache_bytes": payload["kv_cache_bytes"]})

    def _watch_supervisor(self) -> None:
        """A worker of several: once the supervisor is gone (killed), so is the engine; stop too,
        drained as on SIGTERM, instead of holding the port with nothing behind it."""
        while os.getppid() == self._supervisor and not self._stopping:
            time.sleep(1.0)
        if not self._stopping:
            log.error("the supervisor is gone: stopping this HTTP worker")
            os.kill(os.getpid(), signal.SIGTERM)

    def shutdown(self) -> None:
        """Stop the engine process and wait for it (killed if it hangs): never an orphan."""
        self._stopping = True
        if self._wsock is None:
            return
        try:
            self._wsock.shutdown(socket.SHUT_WR)  # the engine reads what was sent, then EOF: it exits
        except OSError:
            pass  # already gone
        proc = self._proc
        if proc is None:
            return  # a worker of several: the shared engine drops this connection and serves on
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
        if self._rconn is None or self._stopping:
            return True
        return self._dead is None and self._stats[3] and (self._proc is None or self._proc.poll() is None)

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

    def engine_counters(self) -> dict[str, int] | None:
        counters = self._stats[5]
        return dict(counters) if counters is not None else None

    # ---- requests (event loop) ------------------------------------------------------
    def build_prompt(self, prefix: str, suffix: str | None, max_prompt_tokens: int) -> list[int]:
        return build_prompt(self._tokenizer, prefix, suffix, max_prompt_tokens)

    def submit(self, prompt_ids: list[int], params: GenerationParams) -> ProcessGeneration:
        if self._rconn is None or not self._info:
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
        framed = frame(pickle.dumps(ops, pickle.HIGHEST_PROTOCOL))
        if self._wbuf:  # still draining an earlier message: keep the order
            self._wbuf += framed
            return
        try:
            sent = self._wsock.send(framed)
        except BlockingIOError:
            sent = 0
        except OSError:
            return  # the engine process is gone; the reader sees the EOF and fails requests
        if sent < len(framed):
            self._wbuf += framed[sent:]
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

    def on_loaded(self) -> None:
        """On the event loop, once load() returned (serving._load): read the engine's messages
        from now on, requests or not."""
        if not self._reading:
            self._start_reading()

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
        if stats != self._stats:
            self._stats = stats
            if self.on_stats is not None:
                self.on_stats()

    def _on_engine_exit(self) -> None:
        self._loop.remove_reader(self._rconn.fileno())
        if self._wbuf:
            self._loop.remove_writer(self._wsock.fileno())
            self._wbuf.clear()
        reason = "cancelled" if self._stopping else "error"
        if not self._stopping:
            self._dead = "engine process exited"
            log.error("the engine process exited unexpectedly",
                      extra={"exit_code": self._proc.poll() if self._proc is not None else None,
                             "in_flight": len(self._gens)})
            if self._proc is None:
                # A worker of several: the shared engine dropped us (we stopped reading for
                # ENGINE_UNREAD_TIMEOUT_S) or is gone. Stop, drained as on SIGTERM: the
                # supervisor starts a fresh worker while the engine lives, instead of this one
                # answering 503 to its share of the port.
                os.kill(os.getpid(), signal.SIGTERM)
        gens, self._gens = self._gens, {}
        for g in gens.values():
            g.finish(reason, g.timings())


def _engine_channel(hand_over: Callable[[list[int]], Any]) -> tuple[Any, socket.socket, Connection]:
    """Two fresh socket pairs to an engine process; `hand_over(fds)` gives it their far ends
    (inherited by a new child, or sent to the shared engine) and returns what it made.
    (that, our socket to the engine, our Connection from it)."""
    to_engine, engine_in = socket.socketpair()
    engine_out, from_engine = socket.socketpair()
    try:
        made = hand_over([engine_in.fileno(), engine_out.fileno()])
    finally:
        engine_in.close()  # the engine holds its own copies now
        engine_out.close()
    return made, to_engine, Connection(from_engine.detach(), writable=False)


def _spawn_engine(fds: list[int], listen: str | None = None) -> subprocess.Popen:
    """engine_process.py as our child, on the two inherited sockets (+ the workers' socket path)."""
    argv = [sys.executable, str(Path(__file__).resolve().with_name("engine_process.py")),
            "--fd-in", str(fds[0]), "--fd-out", str(fds[1])]
    if listen:
        argv += ["--listen", listen]
    return subprocess.Popen(argv, pass_fds=fds)


def _hand_over(path: str, fds: list[int]) -> None:
    """Send the engine's ends to the shared engine listening on `path` (SCM_RIGHTS)."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as conn:
        conn.connect(path)
        socket.send_fds(conn, [b"connect"], fds)


def _engine_ready(reader: Connection, proc: subprocess.Popen | None) -> dict[str, Any]:
    """The engine's first message: its info, or a RuntimeError saying why it did not load.
    proc: the engine if it is our child (its exit code goes into the error), None if shared."""
    try:
        kind, payload = pickle.loads(reader.recv_bytes())
    except (EOFError, OSError):
        if proc is None:
            raise RuntimeError("the shared engine process closed the connection") from None
        raise RuntimeError(f"the engine process exited while loading (exit code {proc.wait()})") from None
    if kind != "ready":
        if proc is not None:
            proc.wait()
        raise RuntimeError(payload)
    return payload


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
    if settings.http_workers > 1 and not settings.engine_socket and __name__ != "__main__":
        # imported by `uvicorn serve_api:app`: nothing here would start the shared engine
        sys.stderr.write("code-assistant: invalid environment variable HTTP_WORKERS: more than 1 worker needs "
                         "`python serve_api.py`, which starts the shared engine (under uvicorn use HTTP_WORKERS=1)\n")
        raise SystemExit(2)
    return create_app(engine_backend, settings, workers=settings.http_workers)


# =============================================================================
# HTTP_WORKERS > 1: a supervisor, one shared engine process, N HTTP worker processes

class Supervisor:
    """`python serve_api.py` with HTTP_WORKERS=N > 1 runs this instead of a server.

    It makes a private (0700) directory, starts the engine process listening on a Unix socket
    there and waits for it to load; then binds HOST:PORT once and starts N workers, each
    `python serve_api.py` again with the listening socket inherited (CODE_ASSISTANT_LISTEN_FD),
    the engine's socket (CODE_ASSISTANT_ENGINE_SOCKET) and PROMETHEUS_MULTIPROC_DIR in its
    environment. A worker that dies is restarted (its live metrics marked dead) while the
    engine lives. SIGTERM or SIGINT: every worker gets SIGTERM and drains as a single server
    does; once all have exited the engine's control socket is closed (it exits), the
    directory is removed and the exit code is 0. If the supervisor itself is killed, the
    engine sees its control socket close and exits, and the workers then stop themselves."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.n = settings.http_workers
        self.dir = Path(tempfile.mkdtemp(prefix="code-assistant-"))  # mode 0700: ours alone
        self.metrics_dir = self.dir / "metrics"
        self.metrics_dir.mkdir()
        self.engine_socket = str(self.dir / "engine.sock")
        self.engine: subprocess.Popen | None = None
        self.control: socket.socket | None = None
        self.listener: socket.socket | None = None
        self.workers: list[subprocess.Popen | None] = [None] * self.n
        self.started_at = [0.0] * self.n
        self.stop_signal: int | None = None

    def run(self) -> int:
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, self._on_signal)
        try:
            try:
                self._start_engine()
                self.listener = _bind(self.settings.host, self.settings.port)
            except (RuntimeError, OSError) as e:
                log.error("cannot load the model: %s", e)
                return 1
            for i in range(self.n):
                if self.stop_signal is None:
                    self._start_worker(i)
            engine_lost = False
            while self.stop_signal is None:
                time.sleep(0.1)
                if not engine_lost and self.engine.poll() is not None:
                    engine_lost = True  # the workers turn /health 503 themselves, as a single server does
                    log.error("the engine process exited unexpectedly", extra={"exit_code": self.engine.returncode})
                for i, w in enumerate(self.workers):
                    if w is not None and w.poll() is not None and self.stop_signal is None:
                        self._reap(i)
                    # restarted while the engine lives, at most once a second per slot
                    if (self.workers[i] is None and not engine_lost and self.stop_signal is None
                            and time.monotonic() - self.started_at[i] > 1.0):
                        self._start_worker(i)
            self._stop_workers()
            return 0
        finally:
            self._stop_engine()
            if self.listener is not None:
                self.listener.close()
            shutil.rmtree(self.dir, ignore_errors=True)
            log.info("stopped", extra={"http_workers": self.n})

    def _on_signal(self, signum: int, frame: Any) -> None:
        if self.stop_signal is not None:
            return
        self.stop_signal = signum
        for w in self.workers:
            if w is not None and w.poll() is None:
                w.send_signal(signal.SIGTERM)  # SIGINT too: the workers drain either way

    def _start_engine(self) -> None:
        s = self.settings
        self.engine, self.control, reader = _engine_channel(
            functools.partial(_spawn_engine, listen=self.engine_socket))
        # the engine's own bound must hold every worker's share (each rounded up)
        cfg = {**_engine_config(s), "max_queue": self.n * per_worker(s.max_concurrent_sequences + s.max_queue, self.n)}
        self.control.sendall(frame(pickle.dumps(cfg)))
        try:
            payload = _engine_ready(reader, self.engine)
        finally:
            reader.close()
        log.info("engine started", extra={"mode": "shared", "pid": self.engine.pid, "http_workers": self.n,
                                          "max_batch": payload["max_batch"], "max_seq_len": payload["max_seq_len"],
                                          "kv_cache_bytes": payload["kv_cache_bytes"]})

    def _start_worker(self, i: int) -> None:
        fd = self.listener.fileno()
        env = {**os.environ, "CODE_ASSISTANT_ENGINE_SOCKET": self.engine_socket,
               "CODE_ASSISTANT_LISTEN_FD": str(fd), "PROMETHEUS_MULTIPROC_DIR": str(self.metrics_dir)}
        # its own process group: a Ctrl-C reaches the supervisor only, which drains the workers
        self.workers[i] = subprocess.Popen([sys.executable, str(Path(__file__).resolve())], env=env,
                                           pass_fds=(fd,), process_group=0)
        self.started_at[i] = time.monotonic()
        log.info("HTTP worker started", extra={"worker": i, "worker_pid": self.workers[i].pid})

    def _reap(self, i: int) -> None:
        from prometheus_client import multiprocess

        w = self.workers[i]
        self.workers[i] = None
        multiprocess.mark_process_dead(w.pid, str(self.metrics_dir))  # its live gauges stop counting
        if self.stop_signal is None:
            log.warning("HTTP worker exited", extra={"worker": i, "worker_pid": w.pid, "exit_code": w.returncode})

    def _stop_workers(self) -> None:
        # each drains for up to DRAIN_TIMEOUT_S, then gets 5 s to cancel and uvicorn's own shutdown
        deadline = time.monotonic() + self.settings.drain_timeout_s + 20
        for i, w in enumerate(self.workers):
            if w is None:
                continue
            try:
                w.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                log.warning("HTTP worker did not stop: killing it", extra={"worker_pid": w.pid})
                w.kill()
                w.wait(10)
            self._reap(i)

    def _stop_engine(self) -> None:
        if self.control is not None:
            self.control.close()  # the engine's control socket closes: it exits
        if self.engine is None or self.engine.poll() is not None:
            return
        try:
            self.engine.wait(10)
        except subprocess.TimeoutExpired:
            log.warning("engine process did not stop: killing it")
            self.engine.kill()
            self.engine.wait(10)


def _bind(host: str, port: int) -> socket.socket:
    """The listening socket every worker accepts on (what uvicorn would bind for HOST:PORT)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    sock.listen(2048)
    sock.set_inheritable(True)
    return sock


app = _build_app()


def main() -> None:
    settings = app.state.serving.settings
    if settings.http_workers > 1 and not settings.engine_socket:
        sys.exit(Supervisor(settings).run())
    run_server(app)  # one server, or one of the supervisor's workers


if __name__ == "__main__":
    main()
