"""Side-by-side generation speed on one GPU: naive loop, Hugging Face generate, our engine,
and our server over HTTP, on the same GPT-2 124M-shape weights.

    python bench/serving_gpu.py --out bench/results/serving_h100.json
    python bench/serving_gpu.py --device cpu --shape tiny --runs 2 --skip-server   # smoke test

64-token prompt, 50 new tokens, greedy. Writes one JSON with the device name, date and the
exact command. The server part starts serve_api.py on a free port with a checkpoint of the
same weights and runs benchmark_api's concurrency sweep against it.
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from engine import Engine, SamplingParams, generate_without_cache  # noqa: E402
from model import GPT, GPTConfig  # noqa: E402

SHAPES = {
    "124M": dict(n_layer=12, n_head=12, n_embd=768, block_size=1024, vocab_size=50304),
    "tiny": dict(n_layer=2, n_head=4, n_embd=128, block_size=256, vocab_size=4096),
}


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def timed(fn, device: str, runs: int) -> list[float]:
    out = []
    for _ in range(runs):
        sync(device)
        t0 = time.perf_counter()
        fn()
        sync(device)
        out.append((time.perf_counter() - t0) * 1000)
    return out


def hf_model_from(model: GPT, dtype: torch.dtype):
    """The same weights as a transformers GPT2LMHeadModel (Conv1D weights are transposed)."""
    from transformers import GPT2Config, GPT2LMHeadModel
    c = model.config
    hf = GPT2LMHeadModel(GPT2Config(n_layer=c.n_layer, n_head=c.n_head, n_embd=c.n_embd,
                                    n_positions=c.block_size, vocab_size=c.vocab_size))
    sd = model.state_dict()
    transposed = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")
    hf_sd = {}
    for k, v in sd.items():
        if k == "lm_head.weight":
            continue
        hf_sd[k] = v.t() if k.endswith(transposed) else v
    hf.transformer.load_state_dict(
        {k.removeprefix("transformer."): v for k, v in hf_sd.items()}, strict=False)
    hf.tie_weights()
    return hf.to(device=sd["transformer.wte.weight"].device, dtype=dtype).eval()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--shape", default="124M", choices=SHAPES)
    ap.add_argument("--runs", type=int, default=20)
    ap.add_argument("--prompt-len", type=int, default=64)
    ap.add_argument("--new-tokens", type=int, default=50)
    ap.add_argument("--batches", default="1,8,32,64,128,256")
    ap.add_argument("--skip-hf", action="store_true")
    ap.add_argument("--skip-server", action="store_true")
    # defaults: what serving_h100_server.json measured best with on the H100 machine's 16 cores
    ap.add_argument("--http-workers", type=int, default=4,
                    help="the server's HTTP_WORKERS (HTTP processes in front of one engine)")
    ap.add_argument("--load-processes", type=int, default=8,
                    help="load-generator processes per sweep level (benchmark_api run_sweep processes=)")
    ap.add_argument("--clients", default="1,8,32,64,128,256", help="server sweep: concurrent clients per level")
    ap.add_argument("--decode-steps", type=int, default=1,
                    help="engine decode_steps, for the engine measured here and the server")
    ap.add_argument("--prefill-wait-steps", type=int, default=4,
                    help="the server's PREFILL_WAIT_STEPS (prompts gather for a shared prefill)")
    ap.add_argument("--requests-per-level", type=int, default=3000,
                    help="server sweep: each level stops after this many requests or --level-seconds")
    ap.add_argument("--level-seconds", type=float, default=12.0)
    ap.add_argument("--steady-clients", type=int, default=0,
                    help="server: after the sweep, one long level at this many clients (--steady-requests), "
                         "so ramp-up and drain weigh less than in a 3,000-request level")
    ap.add_argument("--steady-requests", type=int, default=20_000)
    ap.add_argument("--rates", default="",
                    help="server: open-loop levels after the sweep, offered req/s (Poisson), e.g. 500,1000,2000")
    ap.add_argument("--server-only", action="store_true",
                    help="only the server sweep (no naive, HF or direct engine runs)")
    ap.add_argument("--out", default="bench/results/serving_h100.json")
    args = ap.parse_args()
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    device = args.device
    torch.manual_seed(0)
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    cfg = GPTConfig(**SHAPES[args.shape])
    model = GPT(cfg).to(device=device, dtype=dtype).eval()
    g = torch.Generator().manual_seed(1)
    prompt = torch.randint(0, cfg.vocab_size - 64, (args.prompt_len,), generator=g).tolist()
    n = args.new_tokens
    result: dict = {
        "device": torch.cuda.get_device_name() if device == "cuda" else "cpu",
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "command": "python " + " ".join(sys.argv),
        "torch": torch.__version__, "shape": args.shape, "dtype": str(dtype),
        "prompt_tokens": args.prompt_len, "new_tokens": n, "single_stream_p50_ms": {},
    }
    print(f"device {result['device']}  shape {args.shape}  dtype {dtype}", flush=True)

    if not args.server_only:
        measure_direct(model, prompt, g, args, dtype, result)  # its engine is gone when it returns
        if device == "cuda":
            torch.cuda.empty_cache()  # the server's engine process needs the GPU memory
        out.write_text(json.dumps(result, indent=2) + "\n")  # kept if the server part fails
    if not args.skip_server:
        result.update(run_server_bench(model, args, device))
        result["single_stream_p50_ms"]["server"] = result["single_stream_p50_ms_server"]
    result["targets"] = check_targets(result)
    out.write_text(json.dumps(result, indent=2) + "\n")
    out.with_suffix(".partial.json").unlink(missing_ok=True)
    print(json.dumps({k: v for k, v in result.items() if not k.startswith("profile")}, indent=2))


def measure_direct(model: GPT, prompt: list[int], g: torch.Generator, args: argparse.Namespace,
                   dtype: torch.dtype, result: dict) -> None:
    """Naive loop, HF generate and our engine called directly (no HTTP), into result."""
    device, cfg, n = args.device, model.config, args.new_tokens
    naive_runs = max(3, args.runs // 4)
    with torch.no_grad():
        generate_without_cache(model, prompt, 5)
        t = timed(lambda: generate_without_cache(model, prompt, n), device, naive_runs)
    result["single_stream_p50_ms"]["naive"] = statistics.median(t)
    print(f"naive   p50 {statistics.median(t):8.2f} ms", flush=True)

    if not args.skip_hf:
        hf = hf_model_from(model, dtype)
        ids = torch.tensor([prompt], device=device)
        kw = dict(max_new_tokens=n, min_new_tokens=n, do_sample=False, pad_token_id=0)
        with torch.no_grad():
            hf.generate(ids, **kw)
            t = timed(lambda: hf.generate(ids, **kw), device, max(3, args.runs // 4))
        result["single_stream_p50_ms"]["hf"] = statistics.median(t)
        print(f"hf      p50 {statistics.median(t):8.2f} ms", flush=True)
        del hf

    batches = [int(b) for b in args.batches.split(",")]
    max_batch = max(batches)
    t0 = time.perf_counter()
    engine = Engine(model, max_batch=max_batch, max_seq_len=min(cfg.block_size, 256),
                    max_queue=4 * max_batch, prefill_batch=max_batch, decode_steps=args.decode_steps)
    engine.warmup(args.prompt_len + n)
    result["engine_warmup_s"] = time.perf_counter() - t0
    result["engine_graphs_captured"] = len(engine._graphs)
    if device == "cuda":
        result["engine_memory_reserved_gb"] = round(torch.cuda.memory_reserved() / 1e9, 2)
    print(f"engine warmup {result['engine_warmup_s']:.1f} s", flush=True)
    params = SamplingParams(max_tokens=n)
    engine.generate(prompt, params)
    t = timed(lambda: engine.generate(prompt, params), device, args.runs)
    result["single_stream_p50_ms"]["engine"] = statistics.median(t)
    print(f"engine  p50 {statistics.median(t):8.2f} ms", flush=True)
    # correctness on the GPU: the engine's greedy tokens against the naive loop's
    with torch.no_grad():
        ref = generate_without_cache(model, prompt, n)
    got = engine.generate(prompt, params)
    agree = next((i for i, (a, b) in enumerate(zip(ref, got)) if a != b), len(ref))
    result["engine_vs_naive_agreeing_prefix_tokens"] = agree
    result["engine_batch"] = []
    for b in batches:
        prompts = [torch.randint(0, cfg.vocab_size - 64, (args.prompt_len,), generator=g).tolist()
                   for _ in range(b)]
        engine.generate_batch(prompts, params)
        t = timed(lambda: engine.generate_batch(prompts, params), device, 3)
        ms = statistics.median(t)
        row = {"batch": b, "ms": ms, "tokens_per_s": b * n / (ms / 1000)}
        result["engine_batch"].append(row)
        print(f"engine batch {b:4d}: {ms:8.2f} ms  {row['tokens_per_s']:10.0f} tok/s", flush=True)

    if device == "cuda":
        from torch.profiler import ProfilerActivity, profile
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            engine.generate(prompt, params)
        result["profile_single_stream_top_cpu"] = prof.key_averages().table(
            sort_by="self_cpu_time_total", row_limit=12)
        table = prof.key_averages().table(sort_by="self_cuda_time_total", row_limit=25)
        result["profile_single_stream_top_cuda"] = table
        print(table)
        # one batch-256 generation: where the large-batch step goes
        big = [torch.randint(0, cfg.vocab_size - 64, (args.prompt_len,), generator=g).tolist()
               for _ in range(max_batch)]
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            engine.generate_batch(big, params)
        result[f"profile_batch{max_batch}_top_cuda"] = prof.key_averages().table(
            sort_by="self_cuda_time_total", row_limit=20)


TARGETS = {"server_single_stream_p50_ms_max": 10.0, "req_per_s_at_128_min": 2000.0,
           "p95_ms_at_128_max": 100.0, "engine_tokens_per_s_at_256_min": 150_000.0}


def check_targets(result: dict) -> dict:
    """Each issue #5 target next to what this run measured, and whether it was met."""
    out: dict = {}
    server = result["single_stream_p50_ms"].get("server")
    if server is not None:
        out["server_single_stream_p50_ms"] = {"target_max": TARGETS["server_single_stream_p50_ms_max"],
                                              "measured": server, "met": server <= TARGETS["server_single_stream_p50_ms_max"]}

    def meets_128(row: dict) -> bool:
        return (row["req_per_s"] >= TARGETS["req_per_s_at_128_min"] and row["p95_ms"] <= TARGETS["p95_ms_at_128_max"]
                and row["errors"] == 0)

    row = next((r for r in result.get("concurrency", []) if r["clients"] == 128), None)
    if row is not None:
        out["clients_128"] = {"target_req_per_s_min": TARGETS["req_per_s_at_128_min"],
                              "target_p95_ms_max": TARGETS["p95_ms_at_128_max"],
                              "req_per_s": row["req_per_s"], "p95_ms": row["p95_ms"], "errors": row["errors"],
                              "met": meets_128(row)}
    steady = next(iter(result.get("steady", [])), None)
    if steady is not None and steady["clients"] == 128:  # the same target over a longer level, for reference
        out["clients_128_steady"] = {"requests": steady["requests"], "duration_s": steady["duration_s"],
                                     "req_per_s": steady["req_per_s"], "p95_ms": steady["p95_ms"],
                                     "errors": steady["errors"], "met": meets_128(steady)}
    big = next((r for r in result.get("engine_batch", []) if r["batch"] == 256), None)
    if big is not None:
        out["engine_batch_256_tokens_per_s"] = {"target_min": TARGETS["engine_tokens_per_s_at_256_min"],
                                                "measured": big["tokens_per_s"],
                                                "met": big["tokens_per_s"] >= TARGETS["engine_tokens_per_s_at_256_min"]}
    return out


def run_server_bench(model: GPT, args, device: str) -> dict:
    """Serve the same weights with serve_api.py and sweep concurrency with benchmark_api."""
    import benchmark_api
    from checkpoint import save_model
    from tokenizer import train_bpe
    ckpt = Path(tempfile.mkdtemp(prefix="bench-ckpt-"))
    # A byte-level BPE of the model's size so text prompts map into the vocabulary.
    texts = [p.read_text(errors="ignore") for p in sorted(Path(__file__).parent.parent.glob("*.py"))]
    tok = train_bpe(texts * 4, 512)
    tok.save(ckpt)
    meta = {"model_config": model.config.to_dict(), "tokenizer": tok.kind, "step": 0}
    save_model(ckpt, {k: v.float() for k, v in model.state_dict().items()}, meta)
    import socket
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    # Real code as prompts: ~64-token slices of this repository's own Python files.
    rng = random.Random(0)
    sources = [t for t in texts if len(t) > 2000]
    prompts = []
    for _ in range(512):
        t = rng.choice(sources)
        i = rng.randrange(0, len(t) - 400)
        prompts.append(tok.decode(tok.encode(t[i:i + 400])[: args.prompt_len]))
    env = dict(os.environ, MODEL_PATH=str(ckpt), DEVICE=device, PORT=str(port), CACHE_SIZE="0",
               MAX_CONCURRENT_SEQUENCES="256", MAX_QUEUE="1024", LOG_LEVEL="warning",
               DTYPE="bfloat16" if device == "cuda" else "float32", HTTP_WORKERS=str(args.http_workers),
               DECODE_STEPS=str(args.decode_steps), PREFILL_WAIT_STEPS=str(args.prefill_wait_steps))
    proc = subprocess.Popen([sys.executable, "serve_api.py"], env=env,
                            cwd=Path(__file__).resolve().parent.parent)
    url = f"http://127.0.0.1:{port}"
    try:
        import requests
        deadline = time.time() + 600
        while time.time() < deadline:
            try:
                if requests.get(url + "/ready", timeout=1).status_code == 200:
                    break
            except requests.RequestException:
                pass
            if proc.poll() is not None:
                raise RuntimeError("server exited during start")
            time.sleep(1)
        # each level's row carries the engine's step rate and mean batch (from /stats' counters)
        single = benchmark_api.run_sweep(url, [1], max_tokens=args.new_tokens,
                                         requests_per_level=100, duration_s=20, progress=False,
                                         prompts=prompts)
        sweep = []
        for clients in (int(c) for c in args.clients.split(",") if c.strip()):
            row = benchmark_api.run_sweep(url, [clients], max_tokens=args.new_tokens,
                                          requests_per_level=args.requests_per_level,
                                          duration_s=args.level_seconds, progress=False,
                                          prompts=prompts, processes=args.load_processes)[0]
            sweep.append(row)
            # each level as it ends: a run stopped at a time limit still leaves what it measured
            Path(args.out).with_suffix(".partial.json").write_text(json.dumps(sweep, indent=2) + "\n")
        steady = benchmark_api.run_sweep(url, [args.steady_clients], max_tokens=args.new_tokens,
                                         requests_per_level=args.steady_requests, duration_s=60, progress=False,
                                         prompts=prompts, processes=args.load_processes) if args.steady_clients else []
        # open loop (Poisson arrivals): the latency at a given request rate, without the bursts
        # of closed-loop clients that fall into step; over the load processes, as one process
        # falls behind its own schedule past ~1,000 req/s
        rates = [float(r) for r in args.rates.split(",") if r.strip()]
        open_loop = benchmark_api.run_sweep(url, rates=rates, max_tokens=args.new_tokens,
                                            requests_per_level=40_000, duration_s=10, progress=False,
                                            prompts=prompts, processes=args.load_processes) if rates else []
        return {"server_single": single, "concurrency": sweep, "steady": steady, "open_loop": open_loop,
                "single_stream_p50_ms_server": single[0]["p50_ms"],
                "server_http_workers": args.http_workers, "load_processes": args.load_processes,
                "server_decode_steps": args.decode_steps, "server_prefill_wait_steps": args.prefill_wait_steps}
    finally:
        proc.terminate()
        proc.wait(60)


if __name__ == "__main__":
    main()
