"""Engine vs the naive loop on this CPU, and the real server's concurrency sweep.

Writes bench/results/serving_cpu.json (+ .png):
    models       per model shape: {name, naive_p50_ms, engine_p50_ms, speedup, ...} for 50 new
                 tokens after a 64-token prompt, greedy, batch 1. naive = engine.generate_without_cache
                 (re-runs the whole sequence per token), engine = Engine(...).generate (one token
                 per step over the KV cache). Both run interleaved in the same process, run for
                 run, so a noisy neighbour on the box slows both alike and the ratio stays fair.
    concurrency  benchmark_api.run_sweep against `python serve_api.py` started here on a free
                 port with a random-weight checkpoint (same per-level fields as benchmark_api.py,
                 plus engine_running/waiting sampled from /stats), for the first engine mode;
                 concurrency_by_mode: every mode swept (ENGINE_PROCESS=1 "process", 0 "thread"),
                 one server per mode, each level run on each mode in turn.
    notes/profile  if the 124M-shape speedup misses the 5x target: by how much, and where the
                 engine's time goes (torch.profiler, top ops by self CPU time).

Usage:
    python bench/serving_cpu.py                      # everything (~5-10 min on 2 cores)
    python bench/serving_cpu.py --parts models       # only the engine-vs-naive table
    python bench/serving_cpu.py --parts sweep --clients 32,64,128 --level-duration 10
    python bench/serving_cpu.py --parts sweep --engine-modes process --sweep-model tiny
    python bench/serving_cpu.py --parts sweep --engine-modes process,vllm --sweep-model tiny \\
        --out bench/results/serving_vllm_cpu.json          # ours vs vLLM (make setup-vllm)
Parts not run are kept from an existing output JSON, so the two can be refreshed separately.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import statistics
import sys
import sysconfig
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Sequence

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from model import GPT, GPTConfig  # noqa: E402

RESULTS = ROOT / "bench" / "results"
PROMPT_TOKENS = 64
NEW_TOKENS = 50
TARGET_SPEEDUP = 5.0

# The demo model (what a laptop trains in minutes) and GPT-2 small's shape, random weights:
# speed depends on the shapes, not on what the weights have learned.
MODEL_SHAPES: dict[str, GPTConfig] = {
    "tiny": GPTConfig(n_layer=4, n_head=4, n_embd=256, block_size=256, vocab_size=4096),
    "gpt2-124M-shape": GPTConfig(n_layer=12, n_head=12, n_embd=768, block_size=1024,
                                 vocab_size=50304),
}


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass  # not Linux: fall back to what platform knows
    return platform.processor() or platform.machine()


def device_string() -> str:
    return f"cpu: {cpu_name()}, {os.cpu_count()} cores"


def loadavg() -> list[float] | None:
    # other work on the box skews CPU timings: record how busy it was
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


# ---- engine vs naive ---------------------------------------------------------------------
def _timed(fn: Callable[[], list[int]]) -> tuple[float, list[int]]:
    t0 = time.perf_counter()
    out = fn()
    return (time.perf_counter() - t0) * 1000.0, out


def bench_model(name: str, cfg: GPTConfig, runs: int, naive_runs: int,
                profile: bool | None, seed: int = 0) -> dict[str, Any]:
    from engine import Engine, SamplingParams, generate_without_cache

    torch.manual_seed(seed)
    model = GPT(cfg).eval()
    g = torch.Generator().manual_seed(seed)
    prompt = torch.randint(0, cfg.vocab_size, (PROMPT_TOKENS,), generator=g).tolist()
    params = SamplingParams(max_tokens=NEW_TOKENS, temperature=0.0)
    # a cache just long enough for prompt + completion, as a server sized for the job would be
    engine = Engine(model, max_batch=1, max_seq_len=min(cfg.block_size, PROMPT_TOKENS + NEW_TOKENS + 14))

    def run_engine() -> list[int]:
        return engine.generate(prompt, params)

    def run_naive() -> list[int]:
        return generate_without_cache(model, prompt, NEW_TOKENS)

    # warm-up: first calls pay for allocator growth and oneDNN primitive creation
    engine.warmup()
    _, eng_tokens = _timed(run_engine)
    _, naive_tokens = _timed(run_naive)
    engine_ms: list[float] = []
    naive_ms: list[float] = []
    # interleaved and spread evenly over the run (E N E E N E N E for 5 and 3), so both see the
    # same background load on a shared machine and the ratio is a side-by-side one
    order = sorted([((i + 0.5) / runs, "engine") for i in range(runs)]
                   + [((j + 0.5) / naive_runs, "naive") for j in range(naive_runs)])
    for _, which in order:
        ms = _timed(run_engine if which == "engine" else run_naive)[0]
        (engine_ms if which == "engine" else naive_ms).append(ms)
        print(f"  {name}: {which} {ms:.0f} ms", file=sys.stderr, flush=True)
    e50, n50 = statistics.median(engine_ms), statistics.median(naive_ms)
    row: dict[str, Any] = {
        "name": name,
        "config": {k: v for k, v in cfg.to_dict().items() if k != "dropout"},
        "params_M": round(model.num_params(non_embedding=False) / 1e6, 1),
        "prompt_tokens": PROMPT_TOKENS,
        "new_tokens": NEW_TOKENS,
        "naive_p50_ms": round(n50, 1),
        "engine_p50_ms": round(e50, 1),
        "speedup": round(n50 / e50, 2),
        "engine_ms_per_token": round(e50 / NEW_TOKENS, 2),
        "naive_ms_per_token": round(n50 / NEW_TOKENS, 2),
        "engine_runs_ms": [round(x, 1) for x in engine_ms],
        "naive_runs_ms": [round(x, 1) for x in naive_ms],
        # same greedy tokens from both paths, or the comparison is meaningless
        "same_tokens": eng_tokens == naive_tokens,
    }
    if profile or (profile is None and name == "gpt2-124M-shape" and row["speedup"] < TARGET_SPEEDUP):
        row["profile"] = profile_engine(run_engine, run_naive)
    return row


def _top_ops(prof: Any, n: int = 12) -> list[dict[str, Any]]:
    events = [e for e in prof.key_averages() if e.self_cpu_time_total > 0]
    total = sum(e.self_cpu_time_total for e in events) or 1.0
    events.sort(key=lambda e: e.self_cpu_time_total, reverse=True)
    return [{"op": e.key, "self_cpu_ms": round(e.self_cpu_time_total / 1000.0, 1),
             "pct": round(100.0 * e.self_cpu_time_total / total, 1), "calls": e.count}
            for e in events[:n]]


def profile_engine(run_engine: Callable[[], list[int]],
                   run_naive: Callable[[], list[int]]) -> dict[str, Any]:
    """Where one 50-token generation spends its time, engine and naive, by op."""
    from torch.profiler import ProfilerActivity, profile

    out: dict[str, Any] = {}
    for label, fn in (("engine", run_engine), ("naive", run_naive)):
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            t0 = time.perf_counter()
            fn()
            wall = (time.perf_counter() - t0) * 1000.0
        out[label] = {"wall_ms_under_profiler": round(wall, 1), "top_ops": _top_ops(prof)}
    return out


def run_models(names: Sequence[str], runs: int, naive_runs_124m: int,
               profile: bool | None) -> list[dict[str, Any]]:
    rows = []
    for name in names:
        cfg = MODEL_SHAPES[name]
        naive_runs = naive_runs_124m if name == "gpt2-124M-shape" else runs
        print(f"model {name}: {runs} engine runs, {naive_runs} naive runs", file=sys.stderr)
        rows.append(bench_model(name, cfg, runs, naive_runs, profile))
        r = rows[-1]
        print(f"model {name}: naive {r['naive_p50_ms']:.0f} ms, engine {r['engine_p50_ms']:.0f} ms, "
              f"speedup {r['speedup']:.2f}x (same tokens: {r['same_tokens']})", file=sys.stderr)
    return rows


# ---- the server sweep ----------------------------------------------------------------------
def make_tiny_checkpoint(directory: Path, vocab_size: int = 4096, **shape: int) -> Path:
    """A random-weight tiny model dir (weights, meta, tokenizer) that serve_api.py can load.

    The tokenizer is a real BPE trained on a few stdlib files so prompts tokenize like code."""
    from checkpoint import save_model
    from tokenizer import padded_vocab_size, train_bpe

    lib = Path(sysconfig.get_paths()["stdlib"])
    texts = [(lib / n).read_text(encoding="utf-8") for n in
             ("textwrap.py", "shlex.py", "heapq.py", "fnmatch.py", "string.py", "tokenize.py",
              "copy.py", "queue.py", "sched.py", "bisect.py") if (lib / n).exists()]
    tok = train_bpe(texts, vocab_size)
    tok.save(directory)
    base = MODEL_SHAPES["tiny"]
    dims = {"n_layer": base.n_layer, "n_head": base.n_head, "n_embd": base.n_embd,
            "block_size": base.block_size, **shape}  # tests ask for a smaller one
    cfg = GPTConfig(**dims, vocab_size=padded_vocab_size(tok.n_vocab))
    torch.manual_seed(0)
    model = GPT(cfg)
    save_model(directory, model.state_dict(),
               {"model_config": cfg.to_dict(), "tokenizer": tok.kind, "step": 0,
                "note": "random weights, made by bench/serving_cpu.py"},
               tokenizer_dir=directory)
    return directory


def server_errors(logs: str, limit: int = 10) -> list[str]:
    """The server's logged errors, one line each: 'message: exception line' (JSON logs)."""
    out = []
    for line in logs.splitlines():
        try:
            rec = json.loads(line)
        except ValueError:
            continue  # plain-text lines (uvicorn's own) carry no error records
        if isinstance(rec, dict) and rec.get("level") == "error":
            tb = str(rec.get("traceback", "")).strip().splitlines()
            where = [t.strip() for t in tb if t.strip().startswith("File ")][-3:-1]
            out.append(f"{rec.get('message')}: {tb[-1] if tb else rec.get('exc_type')} "
                       f"(at {' <- '.join(reversed(where))})")
    return out[-limit:]


# Server sweep models: "tiny" is the demo model (its engine is compute-bound on a CPU); "micro"
# is the test suite's 2-layer, 64-wide shape, whose engine steps are fast enough that the HTTP
# side decides throughput, as GPT-2 124M on an H100 does (issue #5).
SWEEP_SHAPES: dict[str, dict[str, int]] = {"tiny": {}, "micro": {"n_layer": 2, "n_head": 2, "n_embd": 64}}
# Servers swept side by side: ours with the engine in its own process or on a thread
# (ENGINE_PROCESS), and serve_vllm.py (the same API on vLLM's CPU engine, from .venv-vllm).
ENGINE_MODES = {"process": "1", "thread": "0", "vllm": None}


class _Occupancy:
    """Samples the server's /stats (engine running / waiting) every 0.25 s on a thread."""

    def __init__(self, url: str) -> None:
        import threading

        import httpx

        self.samples: list[tuple[float, int, int]] = []
        self._stop = threading.Event()

        def poll() -> None:
            with httpx.Client(timeout=5) as c:
                while not self._stop.is_set():
                    try:
                        st = c.get(url + "/stats").json()
                        self.samples.append((time.monotonic(), st["running"], st["waiting"]))
                    except (httpx.HTTPError, ValueError, KeyError):
                        pass  # a missed sample only thins the mean
                    self._stop.wait(0.25)

        self._thread = threading.Thread(target=poll, daemon=True)
        self._thread.start()

    def summary(self, t0: float, t1: float) -> dict[str, Any]:
        w = [s for s in self.samples if t0 <= s[0] <= t1]
        if not w:
            return {}
        return {"engine_running_mean": round(sum(s[1] for s in w) / len(w), 1),
                "engine_running_max": max(s[1] for s in w),
                "engine_waiting_mean": round(sum(s[2] for s in w) / len(w), 1),
                "engine_waiting_max": max(s[2] for s in w)}

    def close(self) -> None:
        self._stop.set()
        self._thread.join(5)


def run_server_sweep(clients: Sequence[int], max_concurrent: int, level_requests: int,
                     level_duration: float, prompts_from: str | None, endpoint: str,
                     server_threads: int, stream: bool, shape: str = "tiny",
                     modes: Sequence[str] = ("process",)) -> dict[str, Any]:
    """The concurrency sweep against one server per engine mode, started side by side: each
    level runs on every mode in turn, so a busy neighbour on the box slows them alike."""
    import benchmark_api

    sys.path.insert(0, str(ROOT / "tests"))
    from server_utils import VLLM_PYTHON, ServerProcess, VLLMServer  # scrubbed env, free port

    if "vllm" in modes and not VLLM_PYTHON.exists():
        raise SystemExit(f"--engine-modes vllm needs {VLLM_PYTHON}: run `make setup-vllm`")

    env = {"DEVICE": "cpu", "MAX_CONCURRENT_SEQUENCES": str(max_concurrent), "MAX_QUEUE": "1024",
           # every request must reach the engine: no answers from the response cache
           "CACHE_SIZE": "0", "LOG_LEVEL": "warning", "MODEL_NAME": "tiny",
           "OMP_NUM_THREADS": str(server_threads)}
    rows: dict[str, list[dict[str, Any]]] = {m: [] for m in modes}
    logs: dict[str, str] = {}
    with tempfile.TemporaryDirectory(prefix="serving_cpu_") as tmp:
        ckpt = make_tiny_checkpoint(Path(tmp) / shape, **SWEEP_SHAPES[shape])
        servers = {m: VLLMServer(ckpt, env) if m == "vllm" else
                   ServerProcess(ckpt, {**env, "ENGINE_PROCESS": ENGINE_MODES[m]}, ready_timeout=180.0)
                   for m in modes}
        occupancy: dict[str, _Occupancy] = {}
        try:
            for srv in servers.values():
                srv.start()
            source = prompts_from
            if source is None:
                # held-out-style real code: the stdlib files the tokenizer did NOT see
                lib = Path(sysconfig.get_paths()["stdlib"])
                held = [str(lib / n) for n in ("glob.py", "linecache.py", "stat.py", "colorsys.py",
                                               "keyword.py", "token.py") if (lib / n).exists()]
                src_file = Path(tmp) / "val_files.json"
                src_file.write_text(json.dumps(held))
                source = str(src_file)
            n = level_requests * len(clients) + 3
            prompts, desc = benchmark_api.load_prompts(source, n, PROMPT_TOKENS, seed=0)
            occupancy = {m: _Occupancy(srv.url) for m, srv in servers.items()}
            for i, c in enumerate(clients):
                for m, srv in servers.items():
                    t0 = time.monotonic()
                    row = benchmark_api.run_sweep(srv.url, [c], endpoint=endpoint, stream=stream,
                                                  max_tokens=NEW_TOKENS, temperature=0.0,
                                                  requests_per_level=level_requests,
                                                  duration_s=level_duration, drain_s=level_duration,
                                                  prompts=prompts, warmup=3 if i == 0 else 0,
                                                  progress=False)[0]
                    # the first second is the ramp-up: leave it out of the occupancy means
                    row.update(occupancy[m].summary(t0 + 1.0, time.monotonic()), loadavg=loadavg())
                    rows[m].append(row)
                    print(f"[{m}] {benchmark_api._line(row)} running~{row.get('engine_running_mean')}",
                          file=sys.stderr, flush=True)
            device = benchmark_api.server_device(next(iter(servers.values())).url, None)
        finally:
            for o in occupancy.values():
                o.close()
            for m, srv in servers.items():
                code = srv.terminate()
                logs[m] = srv.logs()
                srv.close()
                if code not in (0, -15):
                    print(f"serve_api.py ({m}) exited {code}; log tail:\n{logs[m][-2000:]}", file=sys.stderr)
    errors = {m: sum(r["errors"] for r in rs) for m, rs in rows.items()}
    return {"rows": rows, "server_log_errors": {m: server_errors(logs[m]) for m in modes if errors[m]},
            "server": {"command": "python serve_api.py",
                       "env": {k: v for k, v in env.items() if k != "LOG_LEVEL"},
                       "engine_modes": {m: "python serve_vllm.py (.venv-vllm, ENFORCE_EAGER=1, KV_CACHE_GIB=1)"
                                        if m == "vllm" else f"ENGINE_PROCESS={ENGINE_MODES[m]}" for m in modes},
                       "model": f"{shape} (random weights, 4096-token BPE)",
                       "device_from_stats": device},
            "prompts": desc, "endpoint": endpoint, "stream": stream,
            "limits": {"requests_per_level": level_requests, "duration_s": level_duration}}


# ---- output ------------------------------------------------------------------------------
def plot(result: dict[str, Any], path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models, rows = result.get("models") or [], result.get("concurrency") or []
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    a0, a1, a2 = axes
    if models:
        names = [m["name"] for m in models]
        x = range(len(names))
        a0.bar([i - 0.2 for i in x], [m["naive_p50_ms"] for m in models], 0.4, label="naive loop")
        a0.bar([i + 0.2 for i in x], [m["engine_p50_ms"] for m in models], 0.4, label="engine")
        for i, m in enumerate(models):
            a0.text(i, max(m["naive_p50_ms"], m["engine_p50_ms"]), f"{m['speedup']:.1f}x",
                    ha="center", va="bottom")
        a0.set_xticks(list(x), names)
        a0.set_yscale("log")
        a0.set_ylabel(f"ms for {NEW_TOKENS} tokens (p50)")
        a0.set_title(f"batch 1, {PROMPT_TOKENS}-token prompt, greedy")
        a0.legend()
    by_mode = result.get("concurrency_by_mode") or ({"server": rows} if rows else {})
    if rows:
        xs = [r["clients"] for r in rows]
        for mode, mrows in by_mode.items():
            mx = [r["clients"] for r in mrows]
            a1.plot(mx, [r["p50_ms"] for r in mrows], "o-", label=f"{mode} p50")
            a1.plot(mx, [r["p95_ms"] for r in mrows], "s--", label=f"{mode} p95")
            a2.plot(mx, [r["req_per_s"] for r in mrows], "o-", label=mode)
        a1.set_xlabel("concurrent clients")
        a1.set_ylabel("latency (ms)")
        a1.set_title("serve_api.py: latency by engine mode")
        a1.legend()
        a2.set_xlabel("concurrent clients")
        a2.set_ylabel("requests/s")
        a2.set_title("throughput")
        a2.legend()
        for ax in (a1, a2):
            ax.set_xscale("log", base=2)
            ax.set_xticks(xs, [str(x) for x in xs])
    fig.suptitle(result.get("device", ""), fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x.strip()]


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--parts", default="models,sweep", help="models, sweep, or both")
    p.add_argument("--models", default=",".join(MODEL_SHAPES))
    p.add_argument("--runs", type=int, default=5, help="timed runs per path (median reported)")
    p.add_argument("--naive-runs-124m", type=int, default=3,
                   help="timed naive runs on the 124M shape (slow on CPU; >= 3)")
    p.add_argument("--profile", choices=("auto", "always", "never"), default="auto",
                   help="auto: profile the engine when the 124M target is missed")
    p.add_argument("--threads", type=int, default=None,
                   help="torch intra-op threads (default: torch's choice, one per core)")
    p.add_argument("--clients", type=_ints, default=[1, 32, 64, 128])
    p.add_argument("--max-concurrent", type=int, default=128)
    p.add_argument("--sweep-model", choices=list(SWEEP_SHAPES), default="micro",
                   help="micro: engine steps cheap enough that HTTP decides throughput (as on a GPU)")
    p.add_argument("--engine-modes", default="process,thread",
                   help="servers to sweep side by side (process, thread: ENGINE_PROCESS; vllm: serve_vllm.py); the first is `concurrency`")
    p.add_argument("--level-requests", type=int, default=5000)
    p.add_argument("--level-duration", type=float, default=10.0)
    p.add_argument("--endpoint", choices=("complete", "v1"), default="complete",
                   help="complete: non-streamed, as bench/serving_gpu.py and issue #5")
    p.add_argument("--no-stream", action="store_true",
                   help="sweep without SSE (then TTFT/TPOT are null: not observable)")
    p.add_argument("--prompts-from", default=None)
    p.add_argument("--server-threads", type=int, default=1,
                   help="OMP_NUM_THREADS of the server: 1 leaves the other core to HTTP + tokenizing")
    p.add_argument("--out", type=Path, default=RESULTS / "serving_cpu.json")
    p.add_argument("--replot", action="store_true", help="only redraw the PNG from --out")
    args = p.parse_args(argv)
    if args.replot:
        plot(json.loads(args.out.read_text()), args.out.with_suffix(".png"))
        return {}
    if args.runs < 5 or args.naive_runs_124m < 3:
        p.error("--runs must be >= 5 and --naive-runs-124m >= 3")
    if args.threads:
        torch.set_num_threads(args.threads)
    parts = set(args.parts.split(","))

    result: dict[str, Any] = {}
    if args.out.exists():
        result = json.loads(args.out.read_text())  # keep the part not re-run
    result.update({
        "device": device_string(),
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "command": " ".join(shlex.quote(a) for a in
                            ["python", "bench/serving_cpu.py", *(argv if argv is not None else sys.argv[1:])]),
        "torch": torch.__version__,
    })
    # notes of the parts re-run now are rewritten; the others' stay with their numbers
    notes: list[str] = [n for n in result.get("notes", [])
                        if not n.startswith(tuple(f"{x}:" for x in ("models", "sweep") if x in parts))]
    if "models" in parts:
        load_before = loadavg()
        profile = {"auto": None, "always": True, "never": False}[args.profile]
        models = run_models(args.models.split(","), args.runs, args.naive_runs_124m, profile)
        # --threads N is a side experiment: kept beside the default-threads table, not over it
        key = f"models_threads_{args.threads}" if args.threads else "models"
        result[key] = models
        result[key + "_meta"] = {"prompt_tokens": PROMPT_TOKENS, "new_tokens": NEW_TOKENS,
                                 "batch": 1, "greedy": True, "dtype": "float32",
                                 "weights": "random", "loadavg_before": load_before,
                                 "loadavg_after": loadavg(), "torch_threads": torch.get_num_threads(),
                                 "method": "warm-up, then engine and naive runs interleaved; "
                                           "median of each"}
        for m in models if key == "models" else []:
            if m["name"] == "gpt2-124M-shape":
                if m["speedup"] >= TARGET_SPEEDUP:
                    notes.append(f"models: 124M-shape target met: {m['speedup']:.2f}x >= {TARGET_SPEEDUP}x")
                else:
                    notes.append(f"models: 124M-shape target MISSED: {m['speedup']:.2f}x < {TARGET_SPEEDUP}x "
                                 f"(short by {TARGET_SPEEDUP / m['speedup']:.2f}x); see models[].profile")
    if "sweep" in parts:
        modes = [m for m in args.engine_modes.split(",") if m]
        if not modes or set(modes) - set(ENGINE_MODES):
            p.error(f"--engine-modes takes a comma list of {sorted(ENGINE_MODES)}")
        sweep = run_server_sweep(args.clients, args.max_concurrent, args.level_requests,
                                 args.level_duration, args.prompts_from, args.endpoint,
                                 args.server_threads,
                                 stream=not args.no_stream and args.endpoint == "v1",
                                 shape=args.sweep_model, modes=modes)
        by_mode = sweep.pop("rows")
        result["concurrency"] = by_mode[modes[0]]
        result["concurrency_by_mode"] = by_mode
        result["concurrency_meta"] = sweep
        errs = {m: sum(r["errors"] for r in rs) for m, rs in by_mode.items()}
        notes.append(f"sweep: clients {args.clients} against serve_api.py ({args.sweep_model} model, "
                     f"{args.endpoint}, MAX_CONCURRENT_SEQUENCES={args.max_concurrent}), engine modes "
                     f"{modes} run level by level side by side; errors {errs}. The load generator "
                     "shares the 2 cores with the server")
    result["notes"] = notes
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    plot(result, args.out.with_suffix(".png"))
    print(f"wrote {args.out} and {args.out.with_suffix('.png')}", file=sys.stderr)
    return result


if __name__ == "__main__":
    main()
