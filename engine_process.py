"""The engine in its own process, so the HTTP process cannot starve it (issue #5).

serve_api.py (ENGINE_PROCESS=1) starts this file as a child process and talks to it over two
socket pairs, one each way. torch is imported only here: the HTTP process keeps its GIL to itself.

    parent -> child   a list of commands per flush: ("submit", rid, prompt_ids, params),
                      ("cancel", rid); closing the socket means stop
    child -> parent   ("ready", info) or ("load_failed", message) once, then one message per
                      engine step: ("step", [(rid, [token ids])], [(rid, reason, timings)], stats)

The child runs the scheduler inline (no thread): between steps it reads every pending
command, then steps, then sends what the step produced. It ignores SIGINT and SIGTERM (the
HTTP process drains first, then closes the command socket) and exits when its command socket closes, so it
never outlives the server. `load_engine` and `install_test_hooks` are shared with the thread mode.

Not run by hand; `python engine_process.py --fd-in N --fd-out M` is how serve_api.py starts it.
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
import sys
import time
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

log = logging.getLogger("code_assistant.engine_process")

# Messages are pickled: both ends are this program, over an anonymous socketpair inherited by
# the child (no address anyone else can connect to), so nothing untrusted is ever unpickled.
PICKLE = pickle.HIGHEST_PROTOCOL


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
    engine = Engine(model, max_batch=cfg["max_batch"], max_queue=cfg["max_queue"],
                    eos_id=tokenizer.eot_id, vocab_size=tokenizer.n_vocab)
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


def timings(r: Any) -> tuple[float | None, float | None, float | None]:
    """(queue_s, ttft_s, tpot_s) of a finished engine Request; None where never reached."""
    queue = r.scheduled_time - r.arrival_time if r.scheduled_time is not None else None
    ttft = r.first_token_time - r.arrival_time if r.first_token_time is not None else None
    tpot = None
    if r.first_token_time is not None and r.finish_time is not None and len(r.tokens) > 1:
        tpot = (r.finish_time - r.first_token_time) / (len(r.tokens) - 1)
    return queue, ttft, tpot


class _Worker:
    """The child's side: engine requests keyed by the parent's request ids, outputs per step."""

    def __init__(self, inbox: Connection, outbox: Connection, engine: Any) -> None:
        from engine import EngineDead, QueueFull, SamplingParams

        self.inbox = inbox
        self.outbox = outbox
        self.engine = engine
        self._params = SamplingParams
        self._rejected = (EngineDead, QueueFull, ValueError)
        self.requests: dict[int, Any] = {}
        self.tokens: dict[int, list[int]] = {}  # this step's new tokens per request id
        self.finished: list[tuple] = []
        self._last_stats: tuple | None = None
        self._poller = readable_poller(inbox)
        engine.on_step_end = self.flush

    def handle(self, commands: list[tuple]) -> None:
        for cmd in commands:
            if cmd[0] == "submit":
                self.submit(cmd[1], cmd[2], cmd[3])
            elif cmd[0] == "cancel":
                r = self.requests.get(cmd[1])
                if r is not None:
                    r.cancel()

    def submit(self, rid: int, prompt: list[int], params: tuple) -> None:
        max_tokens, temperature, top_k, top_p, seed, stop_ids = params
        sp = self._params(max_tokens=max_tokens, temperature=temperature, top_k=top_k, top_p=top_p,
                          seed=seed, stop_token_ids=tuple(stop_ids))
        tokens = self.tokens

        def on_token(token: int) -> None:
            got = tokens.get(rid)
            if got is None:
                tokens[rid] = [token]
            else:
                got.append(token)

        def on_finish(r: Any) -> None:
            self.requests.pop(rid, None)
            self.finished.append((rid, r.finish_reason, timings(r)))

        try:
            self.requests[rid] = self.engine.submit(prompt, sp, on_token=on_token, on_finish=on_finish)
        except self._rejected as e:
            # the parent checks prompts and the queue bound itself: this is a dead engine
            self.finished.append((rid, "error", (None, None, None)))
            log.warning("request rejected by the engine: %s", type(e).__name__)

    def stats(self) -> tuple:
        e = self.engine
        return (e.num_running, e.num_waiting, round(e.kv_cache_usage, 6), bool(e.healthy),
                memory_used_bytes(e))

    def flush(self) -> None:
        """One message with everything since the last one (runs after every engine step)."""
        stats = self.stats()
        if not self.tokens and not self.finished and stats == self._last_stats:
            return
        msg = ("step", list(self.tokens.items()), self.finished, stats)
        self.tokens.clear()  # cleared, not replaced: the requests' on_token closures hold it
        self.finished = []
        self._last_stats = stats
        self.outbox.send_bytes(pickle.dumps(msg, PICKLE))

    def run(self) -> None:
        inbox, engine = self.inbox, self.engine
        while True:
            # block while idle; between steps only take what has already arrived
            timeout = 0 if engine.has_work() else None
            while self._poller.poll(timeout):
                self.handle(pickle.loads(inbox.recv_bytes()))  # EOFError once the server is gone
                timeout = 0
            if engine.has_work():
                engine.step()  # on_step_end sends its outputs
            else:
                self.flush()  # rejected submits; stats once the engine goes idle


def serve(inbox: Connection, outbox: Connection) -> int:
    """The child's main: load, report, then serve commands until the server closes the inbox."""
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
    except Exception as e:  # reported by the parent in one line, as in the thread mode
        outbox.send_bytes(pickle.dumps(("load_failed", f"{type(e).__name__}: {e}"), PICKLE))
        return 1
    log.info("engine process started", extra={"pid": os.getpid(), **info})
    outbox.send_bytes(pickle.dumps(("ready", info), PICKLE))
    try:
        _Worker(inbox, outbox, engine).run()
    except (EOFError, BrokenPipeError, ConnectionResetError):
        pass  # the server stopped us, or went away: nothing left to serve
    return 0


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description="the engine process serve_api.py starts (not run by hand)")
    p.add_argument("--fd-in", type=int, required=True, help="inherited socket: commands from the server")
    p.add_argument("--fd-out", type=int, required=True, help="inherited socket: outputs to the server")
    args = p.parse_args(argv)
    sys.exit(serve(Connection(args.fd_in, writable=False), Connection(args.fd_out, readable=False)))


if __name__ == "__main__":
    main()
