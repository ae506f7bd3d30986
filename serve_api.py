"""The code-completion server on our own engine (engine.py): `serving.create_app` + `EngineBackend`.

    MODEL_PATH=out-code-assistant python serve_api.py   # or: uvicorn serve_api:app --timeout-keep-alive 75
    curl -s localhost:8000/complete -H 'Content-Type: application/json' -d '{"code": "def add(a, b):"}'

All settings come from the environment (see serving.Settings); a bad value stops the start
with a one-line message naming the variable and exit code 2. The model is loaded and warmed
on a worker thread after the server starts answering: /ready says 503 until it is done.
"""
from __future__ import annotations

import asyncio
from collections import deque
import hashlib
import json
import logging
import sys
import time
from pathlib import Path
from typing import Any

from fastapi import FastAPI

from serving import (Backend, BackendUnavailable, GenerationParams, GenerationTimings, Overloaded, Settings,
                     SettingsError, Tokenizer, create_app, load_settings)

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

    # engine thread: keep these cheap and return
    def on_token(self, token_id: int) -> None:
        self._tokens.append(token_id)
        if not self.marked:
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

    def cancel(self) -> None:
        if self.request is not None:
            self.request.cancel()

    @property
    def finish_reason(self) -> str | None:
        return self.request.finish_reason if self.request is not None else None

    def timings(self) -> GenerationTimings:
        r = self.request
        if r is None:
            return GenerationTimings()
        queue = r.scheduled_time - r.arrival_time if r.scheduled_time is not None else None
        ttft = r.first_token_time - r.arrival_time if r.first_token_time is not None else None
        tpot = None
        if r.first_token_time is not None and r.finish_time is not None and len(r.tokens) > 1:
            tpot = (r.finish_time - r.first_token_time) / (len(r.tokens) - 1)
        return GenerationTimings(queue, ttft, tpot)


class EngineBackend:
    """serving.Backend over engine.Engine and a checkpoint directory (float or quantized)."""

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
        # imported here: torch takes seconds to import, and a bad setting should fail before that
        import torch

        from checkpoint import load_model, read_meta
        from engine import Engine

        s = self.settings
        device = s.device
        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        if device.startswith("cuda") and not torch.cuda.is_available():
            raise RuntimeError("DEVICE=cuda but no CUDA device is available")
        dtype = None
        if s.dtype != "auto":
            dtype = getattr(torch, s.dtype)
        elif device.startswith("cuda") and torch.cuda.is_bf16_supported():
            dtype = torch.bfloat16
        path = Path(s.model_path)
        meta = read_meta(path)
        model, tokenizer, meta = load_model(path, device, dtype)
        engine = Engine(model, max_batch=s.max_concurrent_sequences, max_queue=s.max_queue,
                        eos_id=tokenizer.eot_id, vocab_size=tokenizer.n_vocab)
        engine.warmup(engine.max_seq_len)  # on CUDA: every graph bucket before /ready says 200
        _install_test_hooks(engine, s)
        engine.on_step_end = self._after_step
        # The engine thread gives up the GIL at every device sync; with the event loop busy it
        # would wait up to Python's default 5 ms switch interval to get it back, several times
        # per decode step. 0.2 ms keeps steps near their device time under load.
        sys.setswitchinterval(2e-4)
        engine.start()
        stat = (path / "model.safetensors").stat()
        ident = json.dumps([s.model_name, str(path.resolve()), meta, stat.st_size, stat.st_mtime_ns],
                           sort_keys=True, default=str)
        self._model_id = hashlib.sha256(ident.encode("utf-8")).hexdigest()[:32]
        self._device = str(engine.device) + (f" ({torch.cuda.get_device_name(engine.device)})"
                                             if engine.device.type == "cuda" else "")
        self._tokenizer = tokenizer
        self._engine = engine
        log.info("engine started", extra={"max_batch": engine.max_batch, "max_seq_len": engine.max_seq_len,
                                          "max_queue": engine.max_queue, "kv_cache_bytes": engine.kv_bytes})

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
        if self._engine is None or self._engine.device.type != "cuda":
            return 0
        import torch
        return int(torch.cuda.memory_allocated(self._engine.device))

    # ---- requests (event loop) ------------------------------------------------------
    def build_prompt(self, prefix: str, suffix: str | None, max_prompt_tokens: int) -> list[int]:
        from engine import build_prompt
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


def _install_test_hooks(engine: Any, s: Settings) -> None:
    """FOR TESTS ONLY (CODE_ASSISTANT_FAULT_INJECT, CODE_ASSISTANT_TEST_STEP_DELAY_MS): wrap the
    engine's step to raise (once, or always, which the engine cannot recover from) or to run
    slowly, so tests can exercise failure, cancellation and drain paths on a real process."""
    mode = s.fault_inject if s.fault_inject != "off" else ""
    delay = s.test_step_delay_ms / 1000.0
    if not mode and not delay:
        return
    log.warning("TEST HOOKS ACTIVE: not for production", extra={"fault_inject": mode or None,
                                                                 "step_delay_ms": s.test_step_delay_ms})
    real_step = engine._step
    fired = False

    def step() -> None:
        nonlocal fired
        if delay:
            time.sleep(delay)
        real_step()  # first, so the requests it admitted are in slots and fail with the step
        if mode == "always" or (mode == "once" and not fired):
            fired = True
            raise RuntimeError("injected fault (CODE_ASSISTANT_FAULT_INJECT)")

    engine._step = step


def engine_backend(settings: Settings) -> Backend:
    """The backend factory create_app calls; the model loads later, in the lifespan."""
    return EngineBackend(settings)


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
    import uvicorn

    state = app.state.serving
    s = state.settings
    # Keep-alive longer than a load balancer's usual 60 s idle timeout: with uvicorn's 5 s default
    # the server may close a pooled connection just as a client sends on it (a dropped request).
    config = uvicorn.Config(app, host=s.host, port=s.port, log_config=None, access_log=False,
                            timeout_keep_alive=75,
                            timeout_graceful_shutdown=max(5, int(s.drain_timeout_s)), lifespan="on")
    uvicorn.Server(config).run()
    if state.load_failed:
        sys.exit(1)


if __name__ == "__main__":
    main()
