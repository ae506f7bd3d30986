"""Load-test a code-assistant completion server: latency, throughput, TTFT, errors.

Works against anything that speaks this project's API: `serve_api.py` (POST /complete and
the OpenAI-style POST /v1/completions) or a vLLM-backed `serve_vllm.py` with the same routes.
Clients are closed-loop: each of N clients sends its next request as soon as its previous
one returns, so N is the number of requests in flight. One asyncio event loop, with one
aiohttp session (one keep-alive connection) per client, carries 256+ clients from one process
(threads would spend a core on context switches on a 2-core box). aiohttp, not httpx: on
this project's 2-core VM a request cost the client 0.12 ms of CPU against 1.6 ms with
httpx, and under load every client's cost lands inside the latencies measured (closed-loop
clients move in step: a level's requests end together, and one process serves all of its
clients' next requests one after another). Past a few thousand req/s one process is itself
the limit: `--processes N` splits each level's clients and `--requests` over N
spawned processes that start their clocks together (a barrier); their samples are merged, so
percentiles are over all requests, and the level's duration is the longest process's. In open
loop (`--mode rate`) each process sends Poisson arrivals at rate/N with its share of
`--max-in-flight`: independent Poisson streams add up to one at the offered rate.

Prompts are cut from real held-out code (`--prompts-from` a directory of .py files, a data
directory holding val_files.json, or a val_files.json itself): random line-aligned windows
of roughly `--prompt-tokens` tokens (by characters, ~3.5 chars per code token), seeded.
Without a source a few built-in snippets are used, and the output says so.

Every level is bounded twice: `--requests` (total per level) and `--duration` seconds after
which no new request starts; in-flight requests then get `--drain` seconds before they are
cancelled (counted as `cancelled`, not as errors, and left out of the latencies).

Usage:
    # the chapter's two modes
    python benchmark_api.py --url http://127.0.0.1:8000 --mode sequential --requests 20
    python benchmark_api.py --mode concurrent --clients 8 --requests 100

    # a concurrency sweep with prompts from held-out code, JSON + PNG out
    python benchmark_api.py --mode sweep --clients-list 1,8,32,64,128,256 \\
        --prompts-from data/stdlib/val_files.json --requests 500 --duration 30 \\
        --out bench/results/sweep.json

    # open loop: Poisson arrivals at fixed request rates, as real users come (they do not wait
    # for each other; closed-loop clients with equal requests fall into step and arrive in bursts)
    python benchmark_api.py --mode rate --rates 50,100,200 --duration 30 --requests 10000
    # past ~1000 req/s one process is the limit of the load generator: spread it over several
    python benchmark_api.py --mode rate --rates 1000,2000 --processes 4 --requests 100000

    # TTFT / time per output token through SSE on the OpenAI route
    python benchmark_api.py --mode sweep --endpoint v1 --stream --api-key KEY

    # from another script
    from benchmark_api import run_sweep
    rows = run_sweep("http://127.0.0.1:8000", [1, 8, 32], requests_per_level=100)

Per-level fields: clients, requests (finished: ok + errors), ok, errors, error_codes
({"429": n, "TimeoutError": n}), cancelled, duration_s, req_per_s and tokens_per_s (ok
requests / output tokens over the level's wall time), p50/p95/p99_ms (end-to-end latency of
ok requests), ttft_p50/p95_ms and tpot_p50_ms (streaming only; null otherwise: a
non-streamed answer shows no first token), ms_per_token_p50 (latency / tokens, any mode),
processes (load-generator processes used), cache_hits (answers the server's response cache
gave during the level, from /stats; null if the server has no /stats), server_p50/p95_ms
(/complete's own latency_ms: the time spent inside the server), and from /stats' engine
counters: engine_steps_per_s, engine_mean_batch (rows per decode step), engine_prefills_per_s
and engine_mean_prefill_rows (null for a server without them, such as vLLM). Rate mode
adds rate (the offered total), and its clients is the peak in flight (over several processes
the sum of their peaks, an upper bound). Prompts are distinct per request so a cache has
nothing to hit.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import math
import random
import shlex
import sys
import sysconfig
import time
import urllib.request
from collections import Counter
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Sequence

import aiohttp

DEFAULT_CLIENTS = (1, 8, 32, 64, 128, 256)
CHARS_PER_TOKEN = 3.5  # BPE on Python source averages ~3-4 chars/token; only a rough target
# --processes: how long spawned load processes may take to start (they re-import the caller's
# __main__ module, which may import torch)
_BARRIER_TIMEOUT_S = 300.0

# Used only when no --prompts-from is given; the output JSON then says prompts="builtin".
BUILTIN_SNIPPETS = (
    "import os\nimport sys\n\n\ndef read_lines(path):\n    \"\"\"Return the lines of a text file.\"\"\"\n"
    "    with open(path, encoding=\"utf-8\") as f:\n",
    "class Stack:\n    def __init__(self):\n        self.items = []\n\n    def push(self, item):\n"
    "        self.items.append(item)\n\n    def pop(self):\n",
    "def fibonacci(n: int) -> int:\n    if n < 2:\n        return n\n",
    "import json\n\n\ndef load_config(path: str) -> dict:\n    try:\n        with open(path) as f:\n"
    "            return json.load(f)\n    except FileNotFoundError:\n",
    "def binary_search(items, target):\n    lo, hi = 0, len(items) - 1\n    while lo <= hi:\n"
    "        mid = (lo + hi) // 2\n",
    "from dataclasses import dataclass\n\n\n@dataclass\nclass Point:\n    x: float\n    y: float\n\n"
    "    def distance(self, other: \"Point\") -> float:\n",
)


# ---- prompts ------------------------------------------------------------------------------
def _resolve(name: str, base: Path) -> Path | None:
    """A val_files.json entry may be absolute (collect_code.py), relative to the JSON's
    directory or the cwd, or a bare stdlib name (the test fixtures): try each in turn."""
    p = Path(name)
    candidates = [p] if p.is_absolute() else [base / p, Path.cwd() / p,
                                              Path(sysconfig.get_paths()["stdlib"]) / p]
    for c in candidates:
        if c.is_file():
            return c
    return None


def source_files(source: str | Path) -> list[Path]:
    """The .py files behind --prompts-from: a val_files.json, a dir holding one, or a source dir."""
    src = Path(source)
    if src.is_dir() and (src / "val_files.json").is_file():
        src = src / "val_files.json"
    if src.is_file() and src.suffix == ".json":
        names = json.loads(src.read_text(encoding="utf-8"))
        if not isinstance(names, list):
            raise ValueError(f"{src} should hold a JSON list of paths")
        files = [f for f in (_resolve(str(n), src.parent) for n in names) if f is not None]
        if not files:
            raise ValueError(f"none of the {len(names)} files listed in {src} can be read here")
        return files
    if src.is_dir():
        files = sorted(p for p in src.rglob("*.py") if p.is_file())
        if not files:
            raise ValueError(f"no .py files under {src}")
        return files
    if src.is_file():
        return [src]
    raise ValueError(f"--prompts-from {src} does not exist")


def cut_prompts(texts: Sequence[str], n: int, target_tokens: int, seed: int) -> list[str]:
    """n prompts, each a window of whole lines from a random file, ~target_tokens long.

    A window starts at a random line and grows line by line until it reaches the character
    budget, so each prompt ends at a line boundary the way an editor's cursor often does."""
    rng = random.Random(seed)
    budget = max(16, int(target_tokens * CHARS_PER_TOKEN))
    pool = [t.splitlines(keepends=True) for t in texts]
    pool = [lines for lines in pool if sum(len(x) for x in lines) >= budget // 2]
    if not pool:
        raise ValueError("source files are all too short for the prompt length")
    prompts: list[str] = []
    seen: set[str] = set()
    attempts = 0
    while len(prompts) < n:
        attempts += 1
        lines = rng.choice(pool)
        start = rng.randrange(len(lines))
        out, size = [], 0
        for line in lines[start:]:
            if size and size + len(line) > budget:
                break
            out.append(line)
            size += len(line)
        text = "".join(out)
        if not text.strip() or size < budget // 4:
            continue  # a window that ran off the end of a file
        # distinct prompts: a server with a response cache must not answer repeats from it
        # (after 20 tries per prompt the source is too small, and repeats are let through)
        if text in seen and attempts < 20 * n:
            continue
        seen.add(text)
        prompts.append(text)
    return prompts


def load_prompts(source: str | Path | None, n: int = 256, target_tokens: int = 128,
                 seed: int = 0) -> tuple[list[str], str]:
    """(prompts, description). No source: the built-in snippets, described as such."""
    if source is None:
        return list(BUILTIN_SNIPPETS), "builtin (no --prompts-from given: a few built-in snippets)"
    files = source_files(source)
    texts = []
    for f in files:
        try:
            texts.append(f.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError):
            continue  # one unreadable file should not sink the run
    prompts = cut_prompts(texts, n, target_tokens, seed)
    return prompts, f"{source} ({len(texts)} files, ~{target_tokens} tokens, seed {seed})"


# ---- one request --------------------------------------------------------------------------
@dataclass
class Sample:
    ok: bool
    latency_s: float
    tokens: int = 0
    ttft_s: float | None = None
    server_s: float | None = None  # /complete's own latency_ms: the time spent inside the server's handler
    error: str | None = None  # the HTTP status as a string, or the exception's type name
    detail: str | None = None  # the exception's message, for error_examples


@dataclass
class Target:
    url: str
    endpoint: str = "complete"  # complete | v1
    stream: bool = False
    max_tokens: int = 50
    temperature: float = 0.0
    api_key: str | None = None
    model: str | None = None
    timeout_s: float = 120.0
    headers: dict[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.endpoint not in ("complete", "v1"):
            raise ValueError(f"endpoint must be complete or v1, not {self.endpoint!r}")
        if self.stream and self.endpoint != "v1":
            raise ValueError("--stream needs --endpoint v1 (SSE is on /v1/completions)")
        self.url = self.url.rstrip("/")
        if self.api_key:
            self.headers["Authorization"] = f"Bearer {self.api_key}"

    def body(self, prompt: str, seed: int) -> tuple[str, dict[str, Any]]:
        if self.endpoint == "complete":
            return "/complete", {"code": prompt, "max_tokens": self.max_tokens,
                                 "temperature": self.temperature, "seed": seed}
        body: dict[str, Any] = {"model": self.model or "code-assistant", "prompt": prompt,
                                "max_tokens": self.max_tokens, "temperature": self.temperature,
                                "seed": seed, "stream": self.stream}
        if self.stream:
            # the server may merge several tokens into one text chunk (stop-string hold-back),
            # so chunks are not tokens: ask for the final usage chunk instead
            body["stream_options"] = {"include_usage": True}
        return "/v1/completions", body


def _count_tokens(value: Any) -> int:
    # /complete's `tokens` is a count; accept a list of ids too rather than report 0
    if isinstance(value, list):
        return len(value)
    return int(value or 0)


def _session(target: Target) -> aiohttp.ClientSession:
    """One client's session: one keep-alive connection to the target, its headers, timeouts."""
    return aiohttp.ClientSession(
        headers=target.headers,
        connector=aiohttp.TCPConnector(limit=1, force_close=False),
        timeout=aiohttp.ClientTimeout(total=target.timeout_s, sock_connect=10.0))


async def _one(client: aiohttp.ClientSession, target: Target, prompt: str, seed: int,
               t0: float | None = None) -> Sample:
    """One request. Latency and TTFT count from t0 (default: now); the open-loop mode passes the
    request's scheduled arrival, so time it waited for a free connection counts too."""
    path, body = target.body(prompt, seed)
    t0 = time.perf_counter() if t0 is None else t0
    try:
        if not target.stream:
            async with client.post(target.url + path, json=body) as r:
                raw = await r.read()
            dt = time.perf_counter() - t0
            if r.status != 200:
                return Sample(False, dt, error=str(r.status))
            data = json.loads(raw)
            server_s = None
            if target.endpoint == "complete":
                tokens = _count_tokens(data.get("tokens"))
                if isinstance(data.get("latency_ms"), (int, float)):
                    server_s = data["latency_ms"] / 1000
            else:
                tokens = _count_tokens((data.get("usage") or {}).get("completion_tokens"))
            return Sample(True, dt, tokens=tokens, server_s=server_s)
        ttft = None
        chunks = 0
        usage_tokens = None
        async with client.post(target.url + path, json=body) as r:
            if r.status != 200:
                await r.read()
                return Sample(False, time.perf_counter() - t0, error=str(r.status))
            done = False
            async for raw_line in r.content:  # one line per iteration, its newline kept
                line = raw_line.decode("utf-8").rstrip("\r\n")
                if not line.startswith("data:"):
                    continue  # blank separators, comments, event: lines
                payload = line[5:].strip()
                if payload == "[DONE]":
                    done = True
                    break
                chunk = json.loads(payload)
                if chunk.get("error"):
                    return Sample(False, time.perf_counter() - t0, error="stream_error")
                if chunk.get("usage"):
                    usage_tokens = chunk["usage"].get("completion_tokens")
                choices = chunk.get("choices") or []
                if choices and choices[0].get("text"):
                    chunks += 1
                    if ttft is None:  # TTFT = the first chunk that carries text
                        ttft = time.perf_counter() - t0
        dt = time.perf_counter() - t0
        if not done:
            return Sample(False, dt, error="stream_truncated")
        # a chunk per token is what the server sends; usage, when present, is authoritative
        tokens = _count_tokens(usage_tokens) if usage_tokens is not None else chunks
        return Sample(True, dt, tokens=tokens, ttft_s=ttft)
    except (aiohttp.ClientError, TimeoutError, json.JSONDecodeError, ValueError) as e:
        return Sample(False, time.perf_counter() - t0, error=type(e).__name__, detail=str(e)[:200])


# ---- one concurrency level ------------------------------------------------------------
def percentile(values: Sequence[float], q: float) -> float | None:
    """Linear-interpolated percentile (numpy's default), None for no data."""
    if not values:
        return None
    xs = sorted(values)
    k = (len(xs) - 1) * q / 100.0
    lo, hi = math.floor(k), math.ceil(k)
    return xs[lo] + (xs[hi] - xs[lo]) * (k - lo)


def _ms(x: float | None) -> float | None:
    return None if x is None else round(x * 1000.0, 2)


def summarize(clients: int, samples: list[Sample], elapsed: float, cancelled: int,
              stream: bool) -> dict[str, Any]:
    ok = [s for s in samples if s.ok]
    errors = Counter(s.error for s in samples if not s.ok)
    lat = [s.latency_s for s in ok]
    tokens = sum(s.tokens for s in ok)
    ttft = [s.ttft_s for s in ok if s.ttft_s is not None]
    # TPOT = (total - ttft) / (tokens - 1): the decode rate once the first token is out
    tpot = [(s.latency_s - s.ttft_s) / (s.tokens - 1) for s in ok
            if s.ttft_s is not None and s.tokens > 1]
    per_tok = [s.latency_s / s.tokens for s in ok if s.tokens > 0]
    server = [s.server_s for s in ok if s.server_s is not None]
    return {
        "clients": clients,
        "requests": len(samples),
        "ok": len(ok),
        "errors": sum(errors.values()),
        "error_codes": dict(errors),
        # one message per exception kind, so a transport error can be told apart from another
        "error_examples": {s.error: s.detail for s in samples if not s.ok and s.detail},
        "cancelled": cancelled,
        "duration_s": round(elapsed, 3),
        "req_per_s": round(len(ok) / elapsed, 3) if elapsed > 0 else 0.0,
        "tokens_per_s": round(tokens / elapsed, 2) if elapsed > 0 else 0.0,
        "output_tokens": tokens,
        "p50_ms": _ms(percentile(lat, 50)),
        "p95_ms": _ms(percentile(lat, 95)),
        "p99_ms": _ms(percentile(lat, 99)),
        "mean_ms": _ms(sum(lat) / len(lat)) if lat else None,
        # non-streamed answers show no first token: null, never an estimate
        "ttft_p50_ms": _ms(percentile(ttft, 50)) if stream else None,
        "ttft_p95_ms": _ms(percentile(ttft, 95)) if stream else None,
        "tpot_p50_ms": _ms(percentile(tpot, 50)) if stream else None,
        "ms_per_token_p50": _ms(percentile(per_tok, 50)),
        # /complete only: the server's own latency_ms (its handler, engine wait included); the
        # rest of p50_ms is HTTP parsing before the handler, the network and this client
        "server_p50_ms": _ms(percentile(server, 50)),
        "server_p95_ms": _ms(percentile(server, 95)),
    }


async def _drive(target: Target, clients: int, prompts: Sequence[str], requests: int,
                 duration_s: float, drain_s: float, seed: int, offset: int = 0, bar: Any = None,
                 barrier: Any = None) -> tuple[list[Sample], int, float]:
    """Run `clients` closed-loop clients until the bounds: (samples, issued, elapsed_s)."""
    samples: list[Sample] = []
    issued = 0
    if barrier is not None:
        # several load processes: every one starts its clock together, so their windows overlap
        # and the level's elapsed (the longest) covers them all; a sibling that fails aborts it
        barrier.wait(timeout=_BARRIER_TIMEOUT_S)
    start = time.perf_counter()
    stop_at = start + duration_s
    last_done = start

    async def client_loop(cid: int, client: aiohttp.ClientSession) -> None:
        nonlocal issued, last_done
        while issued < requests and time.perf_counter() < stop_at:
            i = issued
            issued += 1  # single-threaded event loop: no lock needed between awaits
            # offset: each level takes prompts the earlier levels did not send
            s = await _one(client, target, prompts[(offset + i) % len(prompts)], seed + offset + i)
            samples.append(s)
            last_done = time.perf_counter()
            if bar is not None:
                bar.update(1)

    # One connection per client, each in its own session: a shared pool does work per request
    # that grows with the number of connections (measured with httpx at 128+ clients).
    pools = [_session(target) for _ in range(clients)]
    try:
        tasks = [asyncio.create_task(client_loop(c, pools[c])) for c in range(clients)]
        await _wait_or_cancel(tasks, duration_s + drain_s)
    finally:
        await asyncio.gather(*(p.close() for p in pools), return_exceptions=True)
    # throughput over the span in which requests ran, not including idle drain time
    elapsed = (last_done if samples else time.perf_counter()) - start
    return samples, issued, elapsed


async def _wait_or_cancel(tasks: list[asyncio.Task], timeout_s: float) -> None:
    """The level's hard stop: after the issue window closes, in-flight requests get the drain
    time (what is left of it), then are cancelled."""
    if not tasks:
        return
    _, pending = await asyncio.wait(tasks, timeout=max(0.0, timeout_s))
    for t in pending:
        t.cancel()
    await asyncio.gather(*pending, return_exceptions=True)


async def _run_level(target: Target, clients: int, prompts: Sequence[str], requests: int,
                     duration_s: float, drain_s: float, seed: int, progress: bool,
                     offset: int = 0) -> dict:
    bar = None
    if progress:
        from tqdm import tqdm
        bar = tqdm(total=requests, desc=f"{clients:>4} clients", unit="req", leave=False,
                   file=sys.stderr, disable=None)
    samples, issued, elapsed = await _drive(target, clients, prompts, requests, duration_s,
                                            drain_s, seed, offset, bar)
    if bar is not None:
        bar.close()
    return _level_row(target, clients, requests, samples, issued, elapsed, processes=1)


async def _drive_open(target: Target, rate: float, prompts: Sequence[str], requests: int,
                      duration_s: float, drain_s: float, seed: int, offset: int,
                      max_in_flight: int, barrier: Any = None) -> tuple[list[Sample], int, float, int]:
    """Open loop: requests arrive as a Poisson process of `rate` per second (seeded), whatever
    the answers; (samples, issued, elapsed_s, peak in flight). Real users do not wait for each
    other: closed-loop clients with equal requests fall into step and arrive in bursts. At most
    max_in_flight requests are open at once (a connection each, reused); later arrivals wait
    for one, and that wait counts in their latency."""
    # seeded by offset too: load processes, each with its own run of offsets, draw different
    # arrival streams (independent streams at rate/n add up to one Poisson stream at rate)
    rng = random.Random(seed + offset)
    slots = asyncio.Semaphore(max_in_flight)
    idle: list[aiohttp.ClientSession] = []
    sessions: list[aiohttp.ClientSession] = []
    samples: list[Sample] = []
    in_flight = peak = 0
    if barrier is not None:
        barrier.wait(timeout=_BARRIER_TIMEOUT_S)  # as in _drive: the processes' clocks start together
    last_done = start = time.perf_counter()

    async def one(i: int, due: float) -> None:
        nonlocal in_flight, peak, last_done
        async with slots:
            if not idle:
                sessions.append(_session(target))
                idle.append(sessions[-1])
            client = idle.pop()
            in_flight += 1
            peak = max(peak, in_flight)
            try:
                samples.append(await _one(client, target, prompts[(offset + i) % len(prompts)], seed + offset + i,
                                          t0=due))
            finally:
                in_flight -= 1
                idle.append(client)
                last_done = time.perf_counter()

    tasks = []
    due = start
    try:
        for i in range(requests):
            due += rng.expovariate(rate)
            if due - start > duration_s:
                break
            await asyncio.sleep(max(0.0, due - time.perf_counter()))
            tasks.append(asyncio.create_task(one(i, due)))
        await _wait_or_cancel(tasks, start + duration_s + drain_s - time.perf_counter())
    finally:
        await asyncio.gather(*(s.close() for s in sessions), return_exceptions=True)
    elapsed = (last_done if samples else time.perf_counter()) - start
    return samples, len(tasks), elapsed, peak


def _run_rate_level(target: Target, rate: float, prompts: Sequence[str], requests: int, duration_s: float,
                    drain_s: float, seed: int, offset: int, max_in_flight: int) -> dict:
    samples, issued, elapsed, peak = asyncio.run(_drive_open(target, rate, prompts, requests, duration_s,
                                                             drain_s, seed, offset, max_in_flight))
    row = _level_row(target, peak, requests, samples, issued, elapsed, processes=1)
    # clients is the peak number of requests in flight; rate what was offered
    return {"rate": rate, **row}


def _level_row(target: Target, clients: int, requests: int, samples: list[Sample], issued: int,
               elapsed: float, processes: int) -> dict:
    row = summarize(clients, samples, elapsed, issued - len(samples), target.stream)
    row["stopped_by"] = "requests" if issued >= requests else "duration"
    row["processes"] = processes
    return row


# ---- one level over several processes -------------------------------------------------------
# Past ~1000 req/s one Python process (one event loop) is the limit of the load generator
# itself: with processes=N each level's clients (closed loop) or rate (open loop), and its
# request bound, are split over N processes.


def split(total: int, parts: int) -> list[int]:
    """total as evenly as possible over parts, larger shares first: split(128, 3) == [43, 43, 42]."""
    q, r = divmod(total, parts)
    return [q + (i < r) for i in range(parts)]


def _level_worker(results: Any, barrier: Any, index: int, target: Target, prompts: Sequence[str],
                  requests: int, duration_s: float, drain_s: float, seed: int, offset: int,
                  clients: int, rate: float | None, max_in_flight: int) -> None:
    """A spawned process's share of a level: `clients` closed-loop clients, or with `rate` open-loop
    arrivals at that rate (at most max_in_flight open). Puts (index, (samples, issued, elapsed,
    peak in flight), error) on results."""
    try:
        if rate is None:
            samples, issued, elapsed = asyncio.run(_drive(target, clients, prompts, requests, duration_s,
                                                          drain_s, seed, offset, barrier=barrier))
            out = (samples, issued, elapsed, clients)  # closed loop: each client has one request open
        else:
            out = asyncio.run(_drive_open(target, rate, prompts, requests, duration_s, drain_s, seed,
                                          offset, max_in_flight, barrier=barrier))
        results.put((index, out, None))
    except Exception as e:  # report, never leave the parent or the siblings at the barrier waiting
        barrier.abort()
        results.put((index, None, f"{type(e).__name__}: {e}"))
        raise  # and the traceback on stderr


def _run_level_processes(target: Target, prompts: Sequence[str], requests: int, duration_s: float,
                         drain_s: float, seed: int, offset: int, processes: int, *,
                         clients: int = 0, rate: float | None = None, max_in_flight: int = 1) -> dict:
    """One level over `processes` spawned processes: closed loop with `clients` split over them, or
    open loop (`rate` given) with each at rate / processes and its share of max_in_flight. The
    caller picks processes so that no share is empty (clients, or requests and max_in_flight)."""
    import multiprocessing
    import queue

    n = processes
    ctx = multiprocessing.get_context("spawn")  # no fork: the caller may hold threads or CUDA
    results, barrier = ctx.Queue(), ctx.Barrier(n)
    request_shares = split(requests, n)
    client_shares = split(clients, n) if rate is None else [0] * n
    slot_shares = split(max_in_flight, n) if rate is not None else [0] * n
    # a superposition of independent Poisson streams is a Poisson stream at the summed rate
    share_rate = None if rate is None else rate / n
    # each process takes its own run of prompts (and seeds, and open loop its arrival RNG's seed)
    # from the level's range
    offsets = [offset + sum(request_shares[:i]) for i in range(n)]
    procs = [ctx.Process(target=_level_worker, daemon=True,
                         args=(results, barrier, i, target, prompts, request_shares[i], duration_s,
                               drain_s, seed, offsets[i], client_shares[i], share_rate, slot_shares[i]))
             for i in range(n)]
    outs: dict[int, tuple[list[Sample], int, float, int]] = {}
    try:
        for p in procs:
            p.start()
        while len(outs) < n:  # read before join: a large result would block the child's exit
            try:
                i, out, error = results.get(timeout=1.0)
            except queue.Empty:
                if any(p.exitcode not in (None, 0) for p in procs):
                    raise RuntimeError("a load-generator process died (see its stderr)") from None
                continue
            if error is not None:
                raise RuntimeError(f"load-generator process {i} failed: {error}")
            outs[i] = out
    finally:
        barrier.abort()  # on an error: frees any process still waiting to start (no-op otherwise)
        for p in procs:
            if p.pid is not None:
                p.join(timeout=10)
                if p.is_alive():
                    p.terminate()
    samples = [s for out in outs.values() for s in out[0]]
    issued = sum(out[1] for out in outs.values())
    elapsed = max(out[2] for out in outs.values())  # they started together: the longest is the level
    # closed loop: the clients. Open loop: the sum of the processes' peaks in flight, an upper
    # bound of the level's true peak (the processes need not peak at the same moment)
    in_flight = sum(out[3] for out in outs.values())
    row = _level_row(target, in_flight, requests, samples, issued, elapsed, processes=n)
    # open loop: the same row as one process gives, its rate the total offered
    return row if rate is None else {"rate": rate, **row}


async def _warmup(target: Target, prompts: Sequence[str], n: int) -> None:
    # the first requests pay for lazy init (allocations, kernel selection): keep them out
    async with _session(target) as client:
        for i in range(n):
            await _one(client, target, prompts[i % len(prompts)], i)


def run_sweep(url: str, clients_list: Sequence[int] = DEFAULT_CLIENTS, *,
              endpoint: str = "complete", stream: bool = False, max_tokens: int = 50,
              temperature: float = 0.0, requests_per_level: int = 200,
              duration_s: float = 30.0, drain_s: float = 30.0,
              prompts: Sequence[str] | None = None, api_key: str | None = None,
              model: str | None = None, timeout_s: float = 120.0, warmup: int = 1,
              seed: int = 0, progress: bool = True, processes: int = 1,
              rates: Sequence[float] | None = None, max_in_flight: int = 1024) -> list[dict]:
    """Benchmark each concurrency in clients_list in turn; one summary dict per level.

    rates: open loop instead (Poisson arrivals at each rate in requests/s, at most max_in_flight
    open at once); clients_list is then unused and each row's `rate` is the offered rate, its
    `clients` the peak number of requests in flight (over several processes: the sum of their
    peaks, an upper bound).

    Not callable from inside a running event loop (it runs its own with asyncio.run).
    stream=True implies endpoint="v1" (SSE lives on /v1/completions).
    processes > 1: each level's clients and request bound are split over min(processes, clients)
    spawned processes; open loop, the rate, request bound and max_in_flight are split over
    min(processes, requests_per_level, max_in_flight) of them, each at its share of the rate.
    The duration bound applies to each process; no progress bar then."""
    if processes < 1:
        raise ValueError(f"processes must be >= 1, not {processes}")
    if rates is not None and (any(not r > 0 or math.isinf(r) for r in rates) or max_in_flight < 1):
        raise ValueError("open-loop rates must be finite and > 0, and max_in_flight >= 1")
    if stream:
        endpoint = "v1"
    target = Target(url, endpoint, stream, max_tokens, temperature, api_key,
                    model if model is not None else (discover_model(url, api_key)
                                                     if endpoint == "v1" else None), timeout_s)
    if not prompts:
        prompts = list(BUILTIN_SNIPPETS)
    if warmup > 0:
        asyncio.run(_warmup(target, prompts, warmup))
    rows = []
    offset = warmup
    open_loop = rates is not None
    for level in (rates if open_loop else clients_list):
        before = _server_stats(url, api_key)
        if open_loop:
            # never a process without a request to send or a slot to send it on
            n = min(processes, requests_per_level, max_in_flight)
        else:
            n = min(processes, int(level))  # never a process without clients
        if n > 1:
            row = _run_level_processes(target, prompts, requests_per_level, duration_s, drain_s, seed,
                                       offset, n, clients=0 if open_loop else int(level),
                                       rate=float(level) if open_loop else None, max_in_flight=max_in_flight)
            level_prompts = requests_per_level  # the processes' runs of prompts span the bound
        elif open_loop:
            row = _run_rate_level(target, float(level), prompts, requests_per_level, duration_s, drain_s,
                                  seed, offset, max_in_flight)
            level_prompts = row["requests"] + row["cancelled"]
        else:
            row = asyncio.run(_run_level(target, int(level), prompts, requests_per_level,
                                         duration_s, drain_s, seed, progress, offset))
            level_prompts = row["requests"] + row["cancelled"]
        after = _server_stats(url, api_key)
        # answers served from the server's response cache never touched the model: show them
        hits = [s.get("cache_hits") if s else None for s in (before, after)]
        row["cache_hits"] = hits[1] - hits[0] if all(isinstance(h, int) for h in hits) else None
        row.update(engine_work(before, after, row["duration_s"]))
        offset += level_prompts
        rows.append(row)
        if progress:
            print(_line(row), file=sys.stderr, flush=True)
    return rows


def _line(r: dict) -> str:
    def f(x: float | None) -> str:
        return "-" if x is None else f"{x:.0f}"
    rate = f"rate={r['rate']:>7.1f}/s " if "rate" in r else ""
    return (f"{rate}clients={r['clients']:>4} ok={r['ok']:>5} err={r['errors']:>3} "
            f"req/s={r['req_per_s']:>7.2f} tok/s={r['tokens_per_s']:>8.1f} "
            f"p50={f(r['p50_ms'])}ms p95={f(r['p95_ms'])}ms p99={f(r['p99_ms'])}ms "
            f"ttft50={f(r['ttft_p50_ms'])}ms tpot50={f(r['tpot_p50_ms'])}ms "
            f"server50={f(r.get('server_p50_ms'))}ms "
            f"steps/s={f(r.get('engine_steps_per_s'))} batch={r.get('engine_mean_batch') or '-'}")


# ---- server facts -------------------------------------------------------------------------
def _get_json(url: str, path: str, api_key: str | None) -> Any:
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    try:
        with urllib.request.urlopen(urllib.request.Request(url.rstrip("/") + path, headers=headers),
                                    timeout=10.0) as r:
            return json.loads(r.read())
    except (OSError, ValueError):  # URLError and HTTPError (any non-2xx) are OSErrors; bad JSON
        pass  # optional endpoints: a server without them is still benchmarkable
    return None


def _server_stats(url: str, api_key: str | None) -> dict | None:
    stats = _get_json(url, "/stats", api_key)
    return stats if isinstance(stats, dict) else None


def engine_work(before: dict | None, after: dict | None, duration_s: float) -> dict[str, float | None]:
    """What the engine did during a level, from /stats' cumulative `engine` counters read before
    and after it: decode steps per second, the mean decode batch (rows per step), and prefills
    with their mean rows. All None for a server without them (vLLM)."""
    keys = ("engine_steps_per_s", "engine_mean_batch", "engine_prefills_per_s", "engine_mean_prefill_rows")
    e0, e1 = ((s or {}).get("engine") for s in (before, after))
    if not isinstance(e0, dict) or not isinstance(e1, dict):
        return dict.fromkeys(keys)
    d = {k: e1.get(k, 0) - e0.get(k, 0) for k in ("decode_steps", "decode_row_steps", "prefills", "prefill_rows")}
    per_s = (lambda n: round(n / duration_s, 1)) if duration_s > 0 else (lambda n: None)
    return dict(zip(keys, (
        per_s(d["decode_steps"]),
        round(d["decode_row_steps"] / d["decode_steps"], 2) if d["decode_steps"] else None,
        per_s(d["prefills"]),
        round(d["prefill_rows"] / d["prefills"], 2) if d["prefills"] else None)))


def discover_model(url: str, api_key: str | None) -> str:
    """The first id /v1/models lists (vLLM insists on the exact name), else "code-assistant"."""
    data = _get_json(url, "/v1/models", api_key)
    if isinstance(data, dict) and data.get("data"):
        first = data["data"][0]
        if isinstance(first, dict) and first.get("id"):
            return str(first["id"])
    return "code-assistant"


def server_device(url: str, api_key: str | None) -> str | None:
    """What /stats says the server runs on, if it says."""
    stats = _get_json(url, "/stats", api_key)
    if not isinstance(stats, dict):
        return None
    for key in ("device", "device_name"):
        if stats.get(key):
            return str(stats[key])
    engine = stats.get("engine")
    if isinstance(engine, dict) and engine.get("device"):
        return str(engine["device"])
    return None


# ---- plot ----------------------------------------------------------------------------------
def plot(rows: list[dict], path: str | Path, title: str) -> None:
    """Latency p50/p95 and throughput against concurrency, side by side."""
    import matplotlib
    matplotlib.use("Agg")  # headless: no display on a server
    import matplotlib.pyplot as plt

    open_loop = all("rate" in r for r in rows)
    xs = [r["rate"] if open_loop else r["clients"] for r in rows]
    xlabel = "offered requests/s (Poisson arrivals)" if open_loop else "concurrent clients"
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(11, 4.2))
    for key, label in (("p50_ms", "p50"), ("p95_ms", "p95"), ("ttft_p50_ms", "TTFT p50")):
        ys = [r.get(key) for r in rows]
        if any(y is not None for y in ys):
            a1.plot(xs, [math.nan if y is None else y for y in ys], "o-", label=label)
    a1.set_xlabel(xlabel)
    a1.set_ylabel("latency (ms)")
    a1.set_title("latency")
    a1.legend()
    a2.plot(xs, [r["tokens_per_s"] for r in rows], "o-", color="tab:green", label="output tok/s")
    a2.set_xlabel(xlabel)
    a2.set_ylabel("output tokens/s", color="tab:green")
    a3 = a2.twinx()
    a3.plot(xs, [r["req_per_s"] for r in rows], "s--", color="tab:purple", label="req/s")
    a3.set_ylabel("requests/s", color="tab:purple")
    a2.set_title("throughput")
    if len(xs) > 1 and max(xs) / max(1, min(xs)) >= 8:
        for ax in (a1, a2):
            ax.set_xscale("log", base=2)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ---- CLI ------------------------------------------------------------------------------
def _int_list(text: str) -> list[int]:
    try:
        values = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if not values or any(v < 1 for v in values):
        raise argparse.ArgumentTypeError("concurrency levels must be positive integers")
    return values


def _rate_list(text: str) -> list[float]:
    try:
        values = [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from None
    if not values or any(not v > 0 or math.isinf(v) for v in values):
        raise argparse.ArgumentTypeError("rates must be positive requests per second")
    return values


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--url", default="http://127.0.0.1:8000")
    p.add_argument("--mode", choices=("sequential", "concurrent", "sweep", "rate"), default="sequential")
    p.add_argument("--clients", type=int, default=8, help="concurrent mode: number of clients")
    p.add_argument("--clients-list", type=_int_list, default=list(DEFAULT_CLIENTS),
                   help="sweep mode: comma-separated levels (default 1,8,32,64,128,256)")
    p.add_argument("--rates", type=_rate_list, default=[10.0, 50.0, 100.0],
                   help="rate mode: comma-separated offered requests/s, Poisson arrivals (open loop)")
    p.add_argument("--max-in-flight", type=int, default=1024,
                   help="rate mode: requests open at once; later arrivals wait (and their wait counts)")
    p.add_argument("--endpoint", choices=("complete", "v1"), default="complete")
    p.add_argument("--stream", action="store_true",
                   help="SSE on /v1/completions (implies --endpoint v1): measures TTFT and TPOT")
    p.add_argument("--requests", type=int, default=100, help="requests per level (upper bound)")
    p.add_argument("--duration", type=float, default=60.0,
                   help="seconds per level after which no new request starts")
    p.add_argument("--drain", type=float, default=30.0,
                   help="seconds in-flight requests get after --duration before cancellation")
    p.add_argument("--max-tokens", type=int, default=50)
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--prompts-from", default=None,
                   help="held-out code: a dir of .py files, a data dir, or val_files.json")
    p.add_argument("--prompt-tokens", type=int, default=128, help="approximate prompt length")
    p.add_argument("--num-prompts", type=int, default=None,
                   help="distinct prompts to cut (default: enough for every request)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--api-key", default=None)
    p.add_argument("--model", default=None, help="v1 model name (default: from /v1/models)")
    p.add_argument("--timeout", type=float, default=120.0, help="per-request timeout (s)")
    p.add_argument("--warmup", type=int, default=2, help="unmeasured requests before the run")
    p.add_argument("--out", default=None, help="JSON results path (a PNG goes beside it)")
    p.add_argument("--plot", default=None, help="PNG path (default: --out with .png)")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--processes", type=int, default=1,
                   help="load-generator processes per level: the clients (rate mode: the rate and "
                        "--max-in-flight) and --requests split over them")
    args = p.parse_args(argv)
    if args.stream:
        args.endpoint = "v1"
    if args.requests < 1 or args.duration <= 0 or args.processes < 1 or args.max_in_flight < 1:
        p.error("--requests, --processes and --max-in-flight must be >= 1 and --duration > 0")
    return args


def main(argv: Sequence[str] | None = None) -> dict:
    args = parse_args(argv)
    levels = {"sequential": [1], "concurrent": [args.clients], "sweep": args.clients_list,
              "rate": args.rates}[args.mode]
    n_prompts = args.num_prompts or min(20_000, args.requests * len(levels) + args.warmup)
    prompts, prompt_desc = load_prompts(args.prompts_from, n_prompts, args.prompt_tokens, args.seed)
    if args.prompts_from is None:
        print("note: no --prompts-from given, using built-in code snippets", file=sys.stderr)
    rows = run_sweep(args.url, levels, endpoint=args.endpoint, stream=args.stream,
                     max_tokens=args.max_tokens, temperature=args.temperature,
                     requests_per_level=args.requests, duration_s=args.duration,
                     drain_s=args.drain, prompts=prompts, api_key=args.api_key,
                     model=args.model, timeout_s=args.timeout, warmup=args.warmup,
                     seed=args.seed, progress=not args.no_progress, processes=args.processes,
                     rates=args.rates if args.mode == "rate" else None, max_in_flight=args.max_in_flight)
    result = {
        "url": args.url,
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "command": " ".join(shlex.quote(a) for a in [sys.argv[0], *(argv if argv is not None else sys.argv[1:])]),
        "device": server_device(args.url, args.api_key),
        "mode": args.mode,
        "endpoint": args.endpoint,
        "stream": args.stream,
        "max_tokens": args.max_tokens,
        "temperature": args.temperature,
        "prompts": prompt_desc,
        "limits": {"requests_per_level": args.requests, "duration_s": args.duration,
                   "drain_s": args.drain},
        "processes": args.processes,
        "results": rows,
    }
    for r in rows:
        print(_line(r))
    if args.out:
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
        png = Path(args.plot) if args.plot else out.with_suffix(".png")
        plot(rows, png, f"{args.mode} {args.endpoint}{' stream' if args.stream else ''} "
                        f"max_tokens={args.max_tokens} @ {args.url}")
        print(f"wrote {out} and {png}")
    elif args.plot:
        plot(rows, args.plot, f"{args.mode} @ {args.url}")
    return result


if __name__ == "__main__":
    main()
