"""The engine in its own process, so the HTTP process cannot starve it (issue #5).

serve_api.py (ENGINE_PROCESS=1) starts this file as a child process and talks to it over two
socket pairs, one each way. torch is imported only here: the HTTP process keeps its GIL to itself.

    parent -> child   a list of commands per flush: ("submit", rid, prompt_ids, params),
                      ("cancel", rid); closing the socket means stop
    child -> parent   ("ready", info) or ("load_failed", message) once, then after an engine
                      step that has news for it: ("step", [(rid, [token ids])], [(rid, reason,
                      timings)], stats) with stats (running, waiting, kv usage, healthy, memory
                      bytes, a copy of Engine.counters); stats alone at most every
                      STATS_INTERVAL_S, and once more before the engine waits idle

Several HTTP workers (HTTP_WORKERS > 1, `--listen PATH`): the two inherited sockets are the
supervisor's control channel (config in, "ready" out; its closing, or the supervisor dying,
stops the engine), and each worker connects to the Unix socket PATH in the supervisor's
private 0700 directory and hands over its two socket pairs' far ends (SCM_RIGHTS). Each
connection then speaks the protocol above: request ids are per connection, a step's tokens
and finishes go to the connection that owns them, stats (running, waiting, KV usage, healthy,
memory) go to every connection. A connection that closes (its worker stopped or crashed) has
its requests cancelled; the engine serves the others on.

The child runs the scheduler inline (no thread): between steps it reads every pending
command, then steps, then sends what the step produced. It ignores SIGINT and SIGTERM (the
HTTP processes drain first, then the owner closes its socket) and exits when that socket
closes, so it never outlives the server. `load_engine` and `install_test_hooks` are shared
with the thread mode.

Not run by hand; `python engine_process.py --fd-in N --fd-out M [--listen PATH]` is how
serve_api.py starts it.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import pickle
import select
import signal
import socket
import struct
import sys
import time
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any, Callable

log = logging.getLogger("code_assistant.engine_process")

# Messages are pickled: both ends are this program, over an anonymous socketpair inherited by
# the child, or (HTTP_WORKERS > 1) handed over a Unix socket in a directory only our user can
# enter, so nothing untrusted is ever unpickled.
PICKLE = pickle.HIGHEST_PROTOCOL
GPU_PREFILL_WAIT_STEPS = 4  # PREFILL_WAIT_STEPS when unset, on a GPU
MEMORY_READ_INTERVAL_S = 1.0  # how stale the GPU memory in the stats may be
# While the engine runs, a connection with no tokens of its own in a step hears the stats at
# most this often: every step's counters and KV usage change, and with HTTP_WORKERS=4 a
# single stream otherwise cost the step 4 messages instead of 1 (host time per engine step,
# model stubbed out, 2-core CPU: 35.4 against 19.5 us, bench/results/engine_host_flush_cpu.json).
# A change of health goes out at once, and every connection hears the final stats before the
# engine waits idle.
STATS_INTERVAL_S = 0.02


def load_engine(cfg: dict[str, Any]) -> tuple[Any, Any, dict[str, Any]]:
    """(engine, tokenizer, info) for serving: model loaded on the chosen device, warmed up, test
    hooks installed. cfg holds the serving settings this needs (plain values, picklable)."""
    import torch

    from checkpoint import load_model, read_meta
    from engine import Engine

    device = cfg["device"]
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise RuntimeError("DEVICE=cuda but no CUDA device is available")
    dtype = None
    if cfg["dtype"] != "auto":
        dtype = getattr(torch, cfg["dtype"])
    elif device.startswith("cuda") and torch.cuda.is_bf16_supported():
        dtype = torch.bfloat16
    path = Path(cfg["model_path"])
    meta = read_meta(path)
    model, tokenizer, meta = load_model(path, device, dtype)
    wait = cfg.get("prefill_wait_steps")
    if wait is None:  # unset: the measured default per device (serving.Settings.prefill_wait_steps)
        wait = GPU_PREFILL_WAIT_STEPS if device.startswith("cuda") else 0
    engine = Engine(model, max_batch=cfg["max_batch"], max_queue=cfg["max_queue"],
                    eos_id=tokenizer.eot_id, vocab_size=tokenizer.n_vocab,
                    decode_steps=cfg.get("decode_steps", 1),
                    prefill_wait_steps=wait)
    engine.warmup(engine.max_seq_len)  # on CUDA: every graph bucket before /ready says 200
    install_test_hooks(engine, cfg.get("fault_inject", ""), cfg.get("test_step_delay_ms", 0.0))
    stat = (path / "model.safetensors").stat()
    ident = json.dumps([cfg["model_name"], str(path.resolve()), meta, stat.st_size, stat.st_mtime_ns],
                       sort_keys=True, default=str)
    info = {
        "model_id": hashlib.sha256(ident.encode("utf-8")).hexdigest()[:32],
        "device": str(engine.device) + (f" ({torch.cuda.get_device_name(engine.device)})"
                                        if engine.device.type == "cuda" else ""),
        "max_seq_len": engine.max_seq_len, "max_batch": engine.max_batch, "kv_cache_bytes": engine.kv_bytes,
    }
    return engine, tokenizer, info


def memory_used_bytes(engine: Any) -> int:
    if engine.device.type != "cuda":
        return 0
    import torch
    return int(torch.cuda.memory_allocated(engine.device))


def install_test_hooks(engine: Any, fault_inject: str, step_delay_ms: float) -> None:
    """FOR TESTS ONLY (CODE_ASSISTANT_FAULT_INJECT, CODE_ASSISTANT_TEST_STEP_DELAY_MS): make the
    engine's prefill raise (once, or always, which the engine cannot recover from) or its step
    run slowly, so tests can exercise failure, cancellation and drain paths on a real process."""
    mode = fault_inject if fault_inject != "off" else ""
    delay = step_delay_ms / 1000.0
    if not mode and not delay:
        return
    log.warning("TEST HOOKS ACTIVE: not for production", extra={"fault_inject": mode or None,
                                                                 "step_delay_ms": step_delay_ms})
    real_step, real_prefill = engine._step, engine._prefill
    fired = False

    def step() -> None:
        time.sleep(delay)
        real_step()

    def prefill() -> None:
        # Raised before the prefill emits anything: the admitted requests sit in their slots and
        # fail with the step. Raising after it would race a sampled end-of-text, which finishes a
        # request (200) inside the very step that was meant to fail it.
        nonlocal fired
        if mode == "always" or (mode == "once" and not fired):
            fired = True
            raise RuntimeError("injected fault (CODE_ASSISTANT_FAULT_INJECT)")
        real_prefill()

    if delay:
        engine._step = step
    if mode:
        engine._prefill = prefill


def readable_poller(conn: Connection) -> select.poll:
    """A poll object on conn's socket: `.poll(0)` says at once whether a message (or EOF) waits.

    Not Connection.poll(0): multiprocessing's wait() loops until time.monotonic() moves past
    its deadline, and where the clock ticks coarsely (4 ms on our 2-core VMs) every call spins
    for up to a tick, which took most of the engine's time and most of the HTTP loop's."""
    p = select.poll()
    p.register(conn.fileno(), select.POLLIN)
    return p


def frame(data: bytes) -> bytes:
    """multiprocessing.connection's framing (a 4-byte big-endian length): what
    Connection.recv_bytes reads, written here with plain socket writes that need not block."""
    return struct.pack("!i", len(data)) + data


def token_collector(tokens: dict[int, list[int]], rid: int) -> Callable[[int], None]:
    """A request's on_token: appends to tokens[rid], the step's new tokens that flush sends.
    Runs once per token in the engine loop (bench/engine_host.py times it with the rest)."""
    def on_token(token: int) -> None:
        got = tokens.get(rid)
        if got is None:
            tokens[rid] = [token]
        else:
            got.append(token)
    return on_token


def timings(r: Any) -> tuple[float | None, float | None, float | None]:
    """(queue_s, ttft_s, tpot_s) of a finished engine Request; None where never reached.
    Never negative: the stamps come from two threads, and a virtual machine's monotonic clock
    can step back slightly between CPUs."""
    queue = max(0.0, r.scheduled_time - r.arrival_time) if r.scheduled_time is not None else None
    ttft = max(0.0, r.first_token_time - r.arrival_time) if r.first_token_time is not None else None
    tpot = None
    if r.first_token_time is not None and r.finish_time is not None and len(r.tokens) > 1:
        tpot = max(0.0, r.finish_time - r.first_token_time) / (len(r.tokens) - 1)
    return queue, ttft, tpot


class _Client:
    """One HTTP process's connection: request ids are its own, and so are the outputs for them."""

    __slots__ = ("inbox", "outbox", "owner", "requests", "tokens", "finished", "last_stats",
                 "last_sent_at", "unsent", "stalled_since")

    def __init__(self, inbox: Connection, outbox: Connection, owner: bool) -> None:
        self.inbox = inbox
        self.outbox = outbox
        self.owner = owner  # the one parent of a single-worker server: its going away stops the engine
        self.requests: dict[int, Any] = {}  # engine Requests by this client's request id
        self.tokens: dict[int, list[int]] = {}  # this step's new tokens per request id
        self.finished: list[tuple] = []
        self.last_stats: tuple | None = None
        self.last_sent_at = 0.0  # time.monotonic() of its last message
        self.unsent = bytearray()  # framed messages its socket had no room for yet
        self.stalled_since = 0.0  # when it last took bytes while some were waiting


class _Stop(Exception):
    """The owner of the engine closed its socket: nothing left to serve."""


class _Worker:
    """The child's side: engine requests keyed by (connection, request id), outputs per step to
    the connection that owns them, stats to every connection."""

    def __init__(self, engine: Any, info: dict[str, Any], unread_timeout_s: float = 30.0) -> None:
        from engine import EngineDead, QueueFull, SamplingParams

        self.engine = engine
        self.info = info
        self._params = SamplingParams
        self._rejected = (EngineDead, QueueFull, ValueError)
        self.clients: dict[int, _Client] = {}  # by the fd of their inbox
        self._writers: dict[int, _Client] = {}  # by the fd of their outbox, while it has unsent bytes
        # Sends never block the engine: one HTTP worker that stops reading (stopped, swapped
        # out, stuck) would otherwise stall every other worker's requests once its socket buffer
        # fills. Its messages wait here instead; past this many seconds without it taking any,
        # it is disconnected (its requests cancelled), and it restarts itself.
        self.unread_timeout_s = unread_timeout_s
        self._control: Connection | None = None
        self._listener: socket.socket | None = None
        self._poller = select.poll()
        self._memory, self._memory_read_at = 0, -MEMORY_READ_INTERVAL_S
        engine.on_step_end = self.flush

    def add_client(self, inbox: Connection, outbox: Connection, owner: bool = False) -> _Client:
        c = _Client(inbox, outbox, owner)
        self.clients[inbox.fileno()] = c
        self._poller.register(inbox.fileno(), select.POLLIN)
        os.set_blocking(outbox.fileno(), False)
        return c

    def send(self, c: _Client, data: bytes) -> None:
        """One message to `c` (multiprocessing.connection's framing), without blocking."""
        framed = frame(data)
        if c.unsent:
            c.unsent += framed
            if not c.owner and time.monotonic() - c.stalled_since > self.unread_timeout_s:
                log.warning("HTTP worker stopped reading: disconnected",
                            extra={"unsent_bytes": len(c.unsent), "unread_timeout_s": self.unread_timeout_s})
                self.drop(c)
            return
        try:
            sent = os.write(c.outbox.fileno(), framed)
        except BlockingIOError:
            sent = 0
        except OSError:  # BrokenPipeError, ConnectionResetError: that HTTP process is gone
            self.drop(c)
            return
        if sent < len(framed):
            c.unsent += framed[sent:]
            c.stalled_since = time.monotonic()
            self._writers[c.outbox.fileno()] = c
            self._poller.register(c.outbox.fileno(), select.POLLOUT)

    def _write_unsent(self, c: _Client) -> None:
        try:
            sent = os.write(c.outbox.fileno(), c.unsent)
        except BlockingIOError:
            return
        except OSError:
            self.drop(c)
            return
        del c.unsent[:sent]
        c.stalled_since = time.monotonic()
        if not c.unsent:
            self._poller.unregister(c.outbox.fileno())
            del self._writers[c.outbox.fileno()]

    def listen(self, control: Connection, listener: socket.socket) -> None:
        """Several HTTP processes: each connects to `listener`; `control` closing stops the engine."""
        self._control, self._listener = control, listener
        self._poller.register(control.fileno(), select.POLLIN)
        self._poller.register(listener.fileno(), select.POLLIN)

    def _accept(self) -> None:
        """A new HTTP process: it sends the engine's ends of its two socket pairs (SCM_RIGHTS)."""
        try:
            conn, _ = self._listener.accept()
        except OSError:
            return
        fds: list[int] = []
        try:
            with conn:
                conn.settimeout(5.0)  # a connector that sends nothing must not stall the engine for long
                _, fds, _, _ = socket.recv_fds(conn, 16, 2)
        except OSError:
            pass
        if len(fds) != 2:
            for fd in fds:
                os.close(fd)
            log.warning("engine socket: a connection without its two sockets was dropped")
            return
        c = self.add_client(Connection(fds[0], writable=False), Connection(fds[1], readable=False))
        fd = c.inbox.fileno()
        self.send(c, pickle.dumps(("ready", self.info), PICKLE))
        if self.clients.get(fd) is not c:
            return  # gone already
        log.info("HTTP worker connected", extra={"connections": len(self.clients)})

    def drop(self, c: _Client) -> None:
        """A connection went away (its HTTP process stopped or crashed): cancel what it asked for."""
        if self.clients.pop(c.inbox.fileno(), None) is None:
            return
        if c.owner:
            raise _Stop
        self._poller.unregister(c.inbox.fileno())
        if self._writers.pop(c.outbox.fileno(), None) is not None:
            self._poller.unregister(c.outbox.fileno())
        for r in list(c.requests.values()):
            r.cancel()
        n = len(c.requests)
        c.inbox.close()
        c.outbox.close()
        log.info("HTTP worker disconnected", extra={"cancelled": n, "connections": len(self.clients)})

    def _on_event(self, fd: int) -> None:
        writer = self._writers.get(fd)
        if writer is not None:
            self._write_unsent(writer)
            return
        if self._control is not None and fd == self._control.fileno():
            try:
                self._control.recv_bytes()  # nothing is sent on it: only its end matters
            except (EOFError, OSError):
                raise _Stop from None
            return
        if self._listener is not None and fd == self._listener.fileno():
            self._accept()
            return
        c = self.clients.get(fd)
        if c is None:
            return
        try:
            commands = pickle.loads(c.inbox.recv_bytes())
        except (EOFError, OSError):
            self.drop(c)
            return
        self.handle(c, commands)

    def handle(self, c: _Client, commands: list[tuple]) -> None:
        for cmd in commands:
            if cmd[0] == "submit":
                self.submit(c, cmd[1], cmd[2], cmd[3])
            elif cmd[0] == "cancel":
                r = c.requests.get(cmd[1])
                if r is not None:
                    r.cancel()

    def submit(self, c: _Client, rid: int, prompt: list[int], params: tuple) -> None:
        max_tokens, temperature, top_k, top_p, seed, stop_ids = params
        sp = self._params(max_tokens=max_tokens, temperature=temperature, top_k=top_k, top_p=top_p,
                          seed=seed, stop_token_ids=tuple(stop_ids))
        requests = c.requests
        on_token = token_collector(c.tokens, rid)

        def on_finish(r: Any) -> None:
            requests.pop(rid, None)
            c.finished.append((rid, r.finish_reason, timings(r)))

        try:
            requests[rid] = self.engine.submit(prompt, sp, on_token=on_token, on_finish=on_finish)
        except self._rejected as e:
            # the parent checks prompts and the queue bound itself: this is a dead engine
            c.finished.append((rid, "error", (None, None, None)))
            log.warning("request rejected by the engine: %s", type(e).__name__)

    def stats(self) -> tuple:
        e = self.engine
        # GPU memory at most once a second: torch.cuda.memory_allocated builds the allocator's
        # whole statistics dict, and read after every step it took a fifth of the engine
        # process's busy time at 128 clients on an H100 (py-spy).
        now = time.monotonic()
        if now - self._memory_read_at >= MEMORY_READ_INTERVAL_S:
            self._memory, self._memory_read_at = memory_used_bytes(e), now
        return (e.num_running, e.num_waiting, round(e.kv_cache_usage, 6), bool(e.healthy), self._memory,
                dict(e.counters))

    def flush(self, idle: bool = False) -> None:
        """One message per connection with everything since its last one (runs after every
        engine step, and with idle=True before the engine waits for work): its tokens and
        finished requests at once, stats alone at most every STATS_INTERVAL_S while the
        engine runs (a change of health at once)."""
        stats = self.stats()
        now = time.monotonic()
        for c in list(self.clients.values()):
            if not c.tokens and not c.finished:
                if stats == c.last_stats:
                    continue
                if (not idle and c.last_stats is not None and stats[3] == c.last_stats[3]
                        and now - c.last_sent_at < STATS_INTERVAL_S):
                    continue
            msg = ("step", list(c.tokens.items()), c.finished, stats)
            c.tokens.clear()  # cleared, not replaced: the requests' on_token closures hold it
            c.finished = []
            c.last_stats, c.last_sent_at = stats, now
            self.send(c, pickle.dumps(msg, PICKLE))

    def run(self) -> None:
        engine, poller = self.engine, self._poller
        while True:
            # block while idle; between steps only take what has already arrived
            timeout = 0 if engine.has_work() else None
            if timeout is None:
                self.flush(idle=True)  # every connection hears the idle engine's stats first
            while True:
                events = poller.poll(timeout)
                if not events:
                    break
                for fd, _ in events:
                    self._on_event(fd)
                timeout = 0
            if engine.has_work():
                engine.step()  # on_step_end sends its outputs
            else:
                self.flush(idle=True)  # rejected submits


def _listener(path: str) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.bind(path)
    sock.listen(64)
    return sock


def serve(inbox: Connection, outbox: Connection, listen: str | None = None) -> int:
    """The child's main: load, report, then serve commands until the server closes the inbox.

    listen: a Unix socket path (in the supervisor's private directory) on which every HTTP
    worker connects; inbox/outbox are then the supervisor's control channel."""
    # The HTTP process owns shutdown: a signal to the whole process group must not kill the
    # engine under requests that are still draining.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    cfg = pickle.loads(inbox.recv_bytes())
    from serving import configure_logging  # the server's JSON log lines, on the same stderr

    configure_logging(cfg["log_level"])
    # The parent bounds the queue (429) before anything reaches us; a request it cancelled is
    # still counted there until we confirm it, so our own bound must never be the tighter one.
    cfg = {**cfg, "max_queue": cfg["max_queue"] + cfg["max_batch"]}
    try:
        engine, _, info = load_engine(cfg)
        listener = _listener(listen) if listen else None
    except Exception as e:  # reported by the parent in one line, as in the thread mode
        outbox.send_bytes(pickle.dumps(("load_failed", f"{type(e).__name__}: {e}"), PICKLE))
        return 1
    info["pid"] = os.getpid()
    log.info("engine process started", extra=info)
    worker = _Worker(engine, info, cfg.get("unread_timeout_s", 30.0))
    if listener is not None:
        worker.listen(inbox, listener)
        outbox.send_bytes(pickle.dumps(("ready", info), PICKLE))
    else:
        worker.send(worker.add_client(inbox, outbox, owner=True), pickle.dumps(("ready", info), PICKLE))
    try:
        worker.run()
    except (_Stop, EOFError, BrokenPipeError, ConnectionResetError):
        pass  # the server stopped us, or went away: nothing left to serve
    return 0


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description="the engine process serve_api.py starts (not run by hand)")
    p.add_argument("--fd-in", type=int, required=True, help="inherited socket: commands from the server")
    p.add_argument("--fd-out", type=int, required=True, help="inherited socket: outputs to the server")
    p.add_argument("--listen", default=None,
                   help="Unix socket path HTTP workers connect to (HTTP_WORKERS > 1); fd-in/out: the supervisor")
    args = p.parse_args(argv)
    sys.exit(serve(Connection(args.fd_in, writable=False), Connection(args.fd_out, readable=False), args.listen))


if __name__ == "__main__":
    main()
