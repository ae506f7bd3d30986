"""The inference engine against the no-cache reference, on CPU in fp32."""
from __future__ import annotations

import json
import random
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from engine import (Engine, EngineDead, QueueFull, SamplingParams, build_prompt,
                    generate_without_cache, sample_tokens)
from model import GPT, GPTConfig

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def model() -> GPT:
    torch.manual_seed(0)
    return GPT(GPTConfig(block_size=96, vocab_size=192, n_layer=2, n_head=4, n_embd=64)).eval()


def random_requests(n: int, seed: int, vocab: int = 192):
    rng = random.Random(seed)
    return [([rng.randrange(vocab) for _ in range(rng.randint(1, 50))], rng.randint(1, 30))
            for _ in range(n)]


@pytest.mark.parametrize("decode_steps", [1, 4])
def test_batched_greedy_equals_each_request_alone_without_cache(model, decode_steps):
    """Requests join mid-flight, have different lengths, leave at different steps. With
    decode_steps=4 a launch runs up to 4 steps: rows run past their max_tokens and the extra
    tokens must be dropped, and short launches must be chosen while requests wait."""
    reqs = random_requests(14, seed=1)
    reference = [generate_without_cache(model, p, n) for p, n in reqs]
    # few slots, small chunks and prefill batches: slot reuse, chunked and batched prefill
    engine = Engine(model, max_batch=4, prefill_chunk=8, prefill_batch=3, decode_steps=decode_steps)
    rng = random.Random(2)
    handles = []
    for prompt, n in reqs:
        handles.append(engine.submit(prompt, SamplingParams(max_tokens=n)))
        for _ in range(rng.randint(0, 3)):
            engine.step()
    while not all(h.finished for h in handles):
        engine.step()
    for h, ref in zip(handles, reference):
        assert h.tokens == ref
        assert h.finish_reason == "length"
    assert engine.num_running == 0 and sorted(engine._free) == list(range(4))


def test_padded_prefill_equals_each_request_alone_without_cache(model):
    """On CUDA a prefill runs at fixed (rows, chunk) shapes, its graph's bucket: pad rows
    write to the spare slot, pad positions write junk past the chunk (clamped at the end of
    the cache). Here eagerly on CPU with the same padding, chunks ending near the context's
    end included, so the padding itself is what is checked."""
    # the 90-token prompt's last chunk (18 tokens at 72) pads to 32: positions 72..103 run
    # past the 96-token context and the 97-position cache
    reqs = random_requests(10, seed=5) + [([7] * 90, 6), ([9] * 83, 13)]
    reference = [generate_without_cache(model, p, n) for p, n in reqs]
    engine = Engine(model, max_batch=4, prefill_chunk=36, prefill_batch=4)
    engine.pad_prefill = True
    assert engine.prefill_batch_buckets == [1, 2, 4] and engine.prefill_len_buckets == [16, 32, 36]
    handles = [engine.submit(p, SamplingParams(max_tokens=n)) for p, n in reqs]
    while not all(h.finished for h in handles):
        engine.step()
    for h, ref in zip(handles, reference):
        assert h.tokens == ref


def test_a_request_ended_by_its_first_token(model):
    """The first token is read back after the next decode launch. A request it ends still
    gets exactly that token and frees its slot; max_tokens=1 gets no decode launch at all."""
    prompt = [5, 6, 7]
    first = generate_without_cache(model, prompt, 1)[0]
    engine = Engine(model, max_batch=2)
    h = engine.submit(prompt, SamplingParams(max_tokens=1))
    engine.step()
    assert h.finished and h.tokens == [first] and h.finish_reason == "length"
    assert engine._launches == 0
    # a stop token is only known once read: the row was in the launch, whose token is dropped
    h = engine.submit(prompt, SamplingParams(max_tokens=20, stop_token_ids=(first,)))
    engine.step()
    assert h.finished and h.tokens == [first] and h.finish_reason == "stop"
    assert engine._launches == 1 and sorted(engine._free) == [0, 1] and not engine.has_work()


def test_prefill_wait_steps_gathers_prompts_while_rows_decode(model):
    """prefill_wait_steps=3: with a row decoding, prompts admitted one step apart wait until
    the oldest has waited three launches, then share one prefill; nobody's tokens change."""
    reqs = [([1, 2, 3, 4], 12), ([9] * 7, 5), ([4, 3] * 5, 6)]
    reference = [generate_without_cache(model, p, n) for p, n in reqs]
    engine = Engine(model, max_batch=4, prefill_wait_steps=3)
    prefills: list[int] = []
    real_prefill = engine._prefill

    def counting_prefill() -> None:
        prefills.append(len(engine._prefilling))
        real_prefill()

    engine._prefill = counting_prefill
    handles = [engine.submit(reqs[0][0], SamplingParams(max_tokens=reqs[0][1]))]
    engine.step()  # nothing decodes yet: prefilled at once
    assert prefills == [1]
    for p, n in reqs[1:]:
        handles.append(engine.submit(p, SamplingParams(max_tokens=n)))
        engine.step()
    engine.step()
    assert prefills == [1]  # the oldest of the two has waited 2 launches
    engine.step()
    assert prefills == [1, 2]
    while not all(h.finished for h in handles):
        engine.step()
    assert [h.tokens for h in handles] == reference


@pytest.mark.parametrize("decode_steps", [1, 4])
def test_generation_stops_at_the_end_of_the_context(model, decode_steps):
    prompt = [3] * 90
    out = Engine(model, max_batch=2, decode_steps=decode_steps).generate(prompt, SamplingParams(max_tokens=50))
    assert len(out) == 96 - 90
    assert out == generate_without_cache(model, prompt, len(out))


@pytest.mark.parametrize("decode_steps", [1, 4])
def test_stop_tokens_end_a_request(model, decode_steps):
    prompt = [5, 6, 7]
    ref = generate_without_cache(model, prompt, 20)
    stop = ref[4]
    engine = Engine(model, max_batch=2, decode_steps=decode_steps)
    out = engine.generate(prompt, SamplingParams(max_tokens=20, stop_token_ids=(stop,)))
    assert out == ref[: ref.index(stop) + 1]


def test_seeded_sampling_is_reproducible_whatever_shares_the_batch(model):
    params = SamplingParams(max_tokens=25, temperature=0.9, top_k=40, top_p=0.95, seed=1234)
    prompt = [11, 12, 13, 14]
    alone = Engine(model, max_batch=1).generate(prompt, params)
    engine = Engine(model, max_batch=6)
    noise = [engine.submit(p, SamplingParams(max_tokens=n, temperature=1.0, seed=i))
             for i, (p, n) in enumerate(random_requests(5, seed=3))]
    mine = engine.submit(prompt, params)
    while not mine.finished or not all(h.finished for h in noise):
        engine.step()
    assert mine.tokens == alone
    other_seed = Engine(model, max_batch=1).generate(prompt, SamplingParams(
        max_tokens=25, temperature=0.9, top_k=40, top_p=0.95, seed=99))
    assert other_seed != alone  # the seed matters


def test_sampler_respects_top_k_and_top_p():
    torch.manual_seed(0)
    logits = torch.randn(64, 50)
    B = logits.size(0)
    one = lambda v, dt=torch.float32: torch.full((B,), v, dtype=dt)  # noqa: E731
    seeds, pos = torch.arange(B), torch.zeros(B, dtype=torch.long)
    top3 = logits.topk(3, dim=-1).indices
    out = sample_tokens(logits, one(1.0), one(3, torch.long), one(1.0), seeds, pos)
    assert all(out[i] in top3[i] for i in range(B))
    # top_p tiny keeps only the most likely token
    out = sample_tokens(logits, one(1.0), one(0, torch.long), one(1e-6), seeds, pos)
    assert torch.equal(out, logits.argmax(-1))
    # temperature 0 is greedy
    out = sample_tokens(logits, one(0.0), one(0, torch.long), one(1.0), seeds, pos)
    assert torch.equal(out, logits.argmax(-1))
    # unrestricted sampling follows the distribution: the frequency of the argmax token over
    # many seeds is near its probability
    probs = logits[0].softmax(-1)
    rows = logits[:1].expand(4000, -1)
    n = rows.size(0)
    draws = sample_tokens(rows, torch.ones(n), torch.zeros(n, dtype=torch.long), torch.ones(n),
                          torch.arange(n), torch.zeros(n, dtype=torch.long))
    top = int(probs.argmax())
    assert abs((draws == top).float().mean().item() - probs[top].item()) < 0.03


def test_sampler_given_k_max_and_top_p_flag_matches_reading_them():
    """The engine passes k_max and any_top_p from the host (reading them would wait for the
    GPU): the draws must be the ones sample_tokens makes when it reads them itself."""
    torch.manual_seed(1)
    B = 16
    logits = torch.randn(B, 40)
    temperature = torch.rand(B) + 0.2
    top_k = torch.tensor([0, 5, 12, 3] * 4)
    top_p = torch.tensor([1.0, 0.9, 1.0, 0.5] * 4)
    seeds, pos = torch.arange(B) * 7, torch.arange(B)
    read = sample_tokens(logits, temperature, top_k, top_p, seeds, pos)
    given = sample_tokens(logits, temperature, top_k, top_p, seeds, pos, k_max=12, any_top_p=True)
    assert torch.equal(read, given)


def test_device_active_flags_follow_the_requests(model):
    """The host mirrors each slot's active flag so that a finished row costs one batched
    device write: after every step the device flags equal the mirror, and a slot is active
    exactly when a live request decodes in it. Stops, max_tokens=1, cancellations included."""
    engine = Engine(model, max_batch=4, prefill_chunk=8, prefill_batch=2, eos_id=7)
    rng = random.Random(3)
    handles = []
    for i, (prompt, n) in enumerate(random_requests(16, seed=4)):
        handles.append(engine.submit(prompt, SamplingParams(max_tokens=1 if i % 5 == 0 else n,
                                                            temperature=0.8 if i % 3 == 0 else 0.0,
                                                            seed=i, stop_token_ids=(11,))))
        if i % 7 == 3:
            handles[rng.randrange(len(handles))].cancel()
        for _ in range(rng.randint(0, 2)):
            engine.step()
            decoding = [int(r is not None and r._launched > 0 and not r._stopping and r.finish_reason is None)
                        for r in engine.slots]
            assert engine.active_buf.tolist() == [int(a) for a in engine._active_host] == decoding
    while not all(h.finished for h in handles):
        engine.step()
    assert engine.active_buf.tolist() == [0] * 4 and not any(engine._active_host)
    assert {h.finish_reason for h in handles} <= {"length", "stop", "cancelled"}


def test_full_queue_raises_and_full_cache_waits(model):
    engine = Engine(model, max_batch=2, max_queue=3)
    reqs = [engine.submit([1, 2, 3], SamplingParams(max_tokens=5)) for _ in range(3)]
    with pytest.raises(QueueFull):
        engine.submit([1, 2, 3], SamplingParams(max_tokens=5))
    engine.step()  # two admitted into the two slots, one waits for a free slot
    assert engine.num_running == 2 and engine.num_waiting == 1
    while not all(r.finished for r in reqs):
        engine.step()
    assert [r.finish_reason for r in reqs] == ["length"] * 3


def test_bad_prompts_are_refused(model):
    engine = Engine(model, max_batch=1)
    with pytest.raises(ValueError):
        engine.submit([], SamplingParams())
    with pytest.raises(ValueError):
        engine.submit([1] * 96, SamplingParams())


def test_cancel_frees_the_slot_at_the_next_step(model):
    engine = Engine(model, max_batch=1)
    engine.start()
    try:
        first = engine.submit([1, 2], SamplingParams(max_tokens=10_000 // 100))
        got_token = []
        second = engine.submit([3, 4], SamplingParams(max_tokens=3), on_token=got_token.append)
        deadline = time.time() + 5
        while not first.tokens and time.time() < deadline:
            time.sleep(0.001)
        first.cancel()
        assert second.wait(5)
        assert first.finish_reason in ("cancelled", "length")
        assert second.finish_reason == "length" and got_token == second.tokens
    finally:
        engine.stop()


def test_a_failing_step_fails_its_requests_and_repeated_failures_kill_the_engine(model):
    engine = Engine(model, max_batch=2, max_consecutive_errors=2)
    real = engine._launch_decode
    engine._launch_decode = lambda: (_ for _ in ()).throw(RuntimeError("injected"))
    r = engine.submit([1, 2, 3], SamplingParams(max_tokens=5))
    engine.step()
    assert r.finish_reason == "error" and engine.healthy
    engine._launch_decode = real
    assert len(engine.generate([1, 2, 3], SamplingParams(max_tokens=5))) == 5  # recovered
    engine._launch_decode = lambda: (_ for _ in ()).throw(RuntimeError("injected"))
    for _ in range(2):
        engine.submit([1, 2, 3], SamplingParams(max_tokens=5))
        engine.step()
    assert not engine.healthy
    with pytest.raises(EngineDead):
        engine.submit([1], SamplingParams())


class _Tok:
    fim_prefix_id, fim_suffix_id, fim_middle_id = 900, 901, 902

    def encode(self, text: str) -> list[int]:
        return [ord(c) for c in text]


def test_build_prompt_keeps_the_text_nearest_the_cursor():
    tok = _Tok()
    assert build_prompt(tok, "abcdef", None, 3) == [ord(c) for c in "def"]
    ids = build_prompt(tok, "a" * 50 + "XY", "PQ" + "b" * 50, 23)
    assert len(ids) == 23
    assert ids[0] == 900 and ids[-1] == 902
    s = ids.index(901)
    assert ids[1:s][-2:] == [ord("X"), ord("Y")]  # end of the prefix kept
    assert ids[s + 1: s + 3] == [ord("P"), ord("Q")]  # start of the suffix kept


def test_sample_and_evaluate_run_on_a_trained_checkpoint(tiny_ckpt_dir, tiny_data_dir, tmp_path):
    out = subprocess.run([sys.executable, "sample.py", "--ckpt", str(tiny_ckpt_dir), "--prompt",
                          "def f(x):", "--max-tokens", "8"], cwd=ROOT, capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("----- 'def f(x):'") and "def f(x):" in out.stdout
    src = tmp_path / "held_out"
    src.mkdir()
    (src / "m.py").write_text("import os\n\n\ndef join(a, b):\n    return os.path.join(a, b)\n" * 5)
    result = tmp_path / "eval.json"
    out = subprocess.run([sys.executable, "evaluate.py", "--ckpt", str(tiny_ckpt_dir), "--src", str(src),
                          "--lines", "8", "--out", str(result)], cwd=ROOT, capture_output=True,
                         text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    metrics = json.loads(result.read_text())
    assert 0 < metrics["bits_per_byte"] < 20
    assert 0 <= metrics["next_line_exact_match"] <= 1 and metrics["lines"] == 8
    missing = subprocess.run([sys.executable, "evaluate.py", "--ckpt", str(tmp_path / "nope")],
                             cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert missing.returncode == 2 and "Traceback" not in missing.stderr


def test_integer_sampling_params_are_accepted(model):
    """temperature=0 and top_p=1 as ints (a direct caller's natural spelling) decode like floats."""
    engine = Engine(model, max_batch=2)
    as_ints = engine.generate([3, 4, 5], SamplingParams(max_tokens=6, temperature=0, top_p=1))
    assert as_ints == generate_without_cache(model, [3, 4, 5], 6)


def test_greedy_launches_run_several_steps_when_nobody_waits(model):
    """decode_steps=4: a lone 17-token request takes the prefill launch plus four launches of
    four steps (and a trailing read-back), not 17 scheduler steps, with the same tokens."""
    prompt = [7, 8, 9, 10]
    ref = generate_without_cache(model, prompt, 17)
    engine = Engine(model, max_batch=2, decode_steps=4)
    req = engine.submit(prompt, SamplingParams(max_tokens=17))
    steps = 0
    while not req.finished:
        engine.step()
        steps += 1
    assert req.tokens == ref
    assert steps <= 6
    # while a request waits for a slot, launches fall back to one step each
    engine = Engine(model, max_batch=1, decode_steps=4)
    first = engine.submit(prompt, SamplingParams(max_tokens=17))
    engine.step()
    assert engine._steps_per_launch([first], 1) == 4
    second = engine.submit([1, 2], SamplingParams(max_tokens=3))
    assert engine._steps_per_launch([first], 1) == 4  # no free slot: the waiting request can't join
    while not first.finished:
        engine.step()
    engine.step()  # prefill gives its first token; it wants 2 more, fewer than 4: a 1-step launch
    assert second._launched == 2
    while not second.finished:
        engine.step()
    assert first.tokens == ref and second.tokens == generate_without_cache(model, [1, 2], 3)


@pytest.mark.parametrize("decode_steps", [1, 4])
def test_host_bookkeeping_matches_the_requests(model, decode_steps):
    """The scheduler keeps host-side summaries instead of scanning the slots every step (the
    decoding rows and their requests, how many of them sample, running count, KV usage, a
    cancellation flag, each request's stop ids and length limit). After every step they must
    equal what the slots say, and every request must end exactly where its own checks put it."""
    engine = Engine(model, max_batch=5, prefill_chunk=16, prefill_batch=3, eos_id=9, decode_steps=decode_steps)
    rng = random.Random(decode_steps)
    handles = []
    for i, (prompt, n) in enumerate(random_requests(24, seed=6) + [([4] * 92, 20), ([5] * 94, 1)]):
        params = SamplingParams(max_tokens=n, temperature=0.9 if i % 4 == 1 else 0.0, seed=i,
                                stop_token_ids=(13, 21) if i % 3 == 0 else ())
        handles.append((prompt, params, engine.submit(prompt, params)))
        if i % 6 == 5:
            rng.choice(handles)[2].cancel()
        for _ in range(rng.randint(0, 3)):
            engine.step()
            decoding = [s for s, r in enumerate(engine.slots)
                        if r is not None and r.finish_reason is None and r._launched > 0 and not r._stopping]
            assert engine._decoding_rows() == (decoding, [engine.slots[s] for s in decoding])
            assert engine._n_sampling == sum(engine.slots[s].params.temperature > 0 for s in decoding)
            assert engine.num_running == sum(r is not None for r in engine.slots)
            used = sum(engine.pos_host[s] for s, r in enumerate(engine.slots) if r is not None)
            assert engine.kv_cache_usage == used / (engine.max_batch * engine.max_seq_len)
    while not all(h.finished for _, _, h in handles):
        engine.step()
    assert engine.num_running == 0 and not engine.has_work() and engine._decoding_rows() == ([], [])
    reasons = set()
    for prompt, params, h in handles:
        reasons.add(h.finish_reason)
        stops = set(params.stop_token_ids) | {9}
        assert not stops & set(h.tokens[:-1])  # nothing after a stop token
        limit = min(params.max_tokens, engine.max_seq_len - len(prompt))
        if h.finish_reason == "stop":
            assert h.tokens[-1] in stops and len(h.tokens) <= limit
        elif h.finish_reason == "length":
            assert len(h.tokens) == limit
        else:
            assert h.finish_reason == "cancelled" and len(h.tokens) < limit
    assert {"length", "cancelled"} <= reasons


def test_a_failing_on_token_callback_cancels_only_its_request(model):
    """A consumer whose callback raises loses its request at the next step; the others, in
    the same decode batch, go on to their full length."""
    engine = Engine(model, max_batch=3)

    def broken(token: int) -> None:
        raise ValueError("consumer gone")

    good = [engine.submit([1, 2, 3], SamplingParams(max_tokens=8)) for _ in range(2)]
    bad = engine.submit([4, 5, 6], SamplingParams(max_tokens=8), on_token=broken)
    while not all(r.finished for r in good + [bad]):
        engine.step()
    assert bad.finish_reason == "cancelled" and len(bad.tokens) < 8
    assert [r.finish_reason for r in good] == ["length"] * 2 and all(len(r.tokens) == 8 for r in good)
    assert engine.num_running == 0 and sorted(engine._free) == [0, 1, 2]


def test_greedy_pick_is_argmax_with_its_ties() -> None:
    """The two-stage pick equals argmax, first index on ties, at vocabularies that split into
    64 pieces evenly or not, in float32 and bf16 (where ties are common)."""
    from engine import greedy_pick
    torch.manual_seed(0)
    for V in (5, 64, 100, 50257, 50304):
        for dtype in (torch.float32, torch.bfloat16):
            logits = torch.randn(6, V).to(dtype)
            logits[1] = 0.0  # all tied: index 0
            logits[2, V // 2:] = logits[2].max() + 1  # a tie between many: the first of them
            logits[3, -1] = float("inf")  # the very last column
            logits[4] = logits[4].round()  # many small ties
            assert torch.equal(greedy_pick(logits), logits.argmax(dim=-1)), (V, dtype)
