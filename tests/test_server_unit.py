"""In-process tests of serving.py's pure parts: post-processing, rate limiting, settings."""
from __future__ import annotations

import asyncio
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from serving import (MemoryCache, RateLimiter, SettingsError, TextAssembler, _non_utf8_field,  # noqa: E402
                     load_settings)


class CharTokens:
    """One token per byte (ids 0..255) plus 256 = end of text: full control over the stream."""
    EOT = 256

    @staticmethod
    def encode(text: str) -> list[int]:
        return list(text.encode("utf-8"))

    @staticmethod
    def decode(ids: list[int]) -> str:
        return bytes(i for i in ids if i < 256).decode("utf-8", errors="replace")


def run(text: str, stop=(), suffix=None, eot_at: int | None = None) -> tuple[list[str], str, bool]:
    asm = TextAssembler(CharTokens.decode, (CharTokens.EOT,), list(stop), suffix)
    ids = CharTokens.encode(text)
    if eot_at is not None:
        ids.insert(eot_at, CharTokens.EOT)
    deltas = []
    for tok in ids:
        deltas.append(asm.feed(tok))
        if asm.stopped:
            break
    deltas.append(asm.finish())
    return deltas, "".join(deltas), asm.stopped


def test_stop_string_is_removed_and_never_streamed() -> None:
    deltas, text, stopped = run("x = 1\ny = 2\n\n\nz = 3", stop=["\n\n\n"])
    assert text == "x = 1\ny = 2" and stopped
    assert "\n\n" not in "".join(deltas[:-1]) + deltas[-1][-2:]


def test_stop_string_split_over_tokens_and_partial_prefix_released() -> None:
    _, text, stopped = run("abc END def", stop=["END"])
    assert text == "abc" and stopped
    _, text, stopped = run("abc EN", stop=["END"])  # only a prefix: it is text after all
    assert text == "abc EN" and not stopped


def test_earliest_of_several_stop_strings_wins() -> None:
    _, text, _ = run("one;two#three", stop=["#", ";"])
    assert text == "one"


def test_special_tokens_never_reach_the_text() -> None:
    _, text, _ = run("print(1)", eot_at=3)
    assert text == "print(1)"


def test_suffix_repetition_is_cut() -> None:
    suffix = "\n\n    return total\n"
    _, text, stopped = run("    total = sum(xs)\n    return total\n\nprint(1)", suffix=suffix)
    assert text == "    total = sum(xs)\n" and stopped
    # only a whole line that equals the suffix's first non-empty line counts
    _, text, stopped = run("    return totals\n", suffix=suffix)
    assert text == "    return totals\n" and not stopped
    # at the very end, a last line without newline counts too
    _, text, _ = run("x = 1\n    return total", suffix=suffix)
    assert text == "x = 1\n"


def test_trailing_spaces_trimmed_and_streaming_equals_final() -> None:
    deltas, text, _ = run("def f():   \n    pass   \t ")
    assert text == "def f():   \n    pass"
    assert all(not d.endswith(" ") for d in deltas[:-1] if d)


def test_incomplete_utf8_is_held_back_until_complete() -> None:
    asm = TextAssembler(CharTokens.decode, (), [], None)
    out = [asm.feed(b) for b in "é!".encode("utf-8")]
    assert out == ["", "é", "!"] and "\ufffd" not in "".join(out)
    # invalid bytes do not hold the stream back forever
    asm = TextAssembler(CharTokens.decode, (), [], None)
    out = [asm.feed(b) for b in b"\xff\xfe\xfdab"]
    assert "".join(out) + asm.finish() == "\ufffd\ufffd\ufffdab" and out[2] != ""


def test_rate_limiter_token_bucket() -> None:
    rl = RateLimiter(3)
    assert [rl.acquire("a") for _ in range(3)] == [0.0, 0.0, 0.0]
    wait = rl.acquire("a")
    assert 0 < wait <= 20.0
    assert rl.acquire("b") == 0.0  # per key
    assert RateLimiter(0).acquire("a") == 0.0  # off


def test_memory_cache_is_a_bounded_lru() -> None:
    async def scenario() -> None:
        cache = MemoryCache(2)
        await cache.set("a", {"v": 1})
        await cache.set("b", {"v": 2})
        assert await cache.get("a") == {"v": 1}
        await cache.set("c", {"v": 3})  # evicts b, the least recently used
        assert await cache.get("b") is None and await cache.get("a") == {"v": 1}

    asyncio.run(scenario())


def test_non_utf8_field_is_named() -> None:
    assert _non_utf8_field(b'{"code": "ok"}') is None
    assert _non_utf8_field(b'{"code": "a\xffb", "max_tokens": 3}') == "code"
    assert _non_utf8_field(b'{"stop": ["x", "\xfe"]}') == "stop.1"
    assert _non_utf8_field(b'\xff{') == "body"


@pytest.mark.parametrize("env, name", [
    ({"MAX_QUEUE": "-1"}, "MAX_QUEUE"), ({"REQUEST_TIMEOUT_S": "0"}, "REQUEST_TIMEOUT_S"),
    ({"DTYPE": "int4"}, "DTYPE"), ({"CODE_ASSISTANT_FAULT_INJECT": "sometimes"}, "CODE_ASSISTANT_FAULT_INJECT"),
])
def test_settings_errors_name_the_variable(monkeypatch: pytest.MonkeyPatch, env: dict, name: str) -> None:
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    with pytest.raises(SettingsError, match=name):
        load_settings()


def test_engine_settings_reach_the_engine(monkeypatch: pytest.MonkeyPatch, ckpt: Path) -> None:
    """DECODE_STEPS and PREFILL_WAIT_STEPS go from the environment to the Engine the server builds."""
    from engine_process import load_engine
    from serve_api import _engine_config
    for k, v in {"MODEL_PATH": str(ckpt), "DEVICE": "cpu", "DECODE_STEPS": "4",
                 "PREFILL_WAIT_STEPS": "3", "MAX_CONCURRENT_SEQUENCES": "5"}.items():
        monkeypatch.setenv(k, v)
    engine, _, _ = load_engine(_engine_config(load_settings()))
    assert (engine.step_buckets, engine.prefill_wait_steps, engine.max_batch) == ([1, 4], 3, 5)
    monkeypatch.setenv("PREFILL_WAIT_STEPS", "")  # unset: the device's default, 0 on a CPU
    engine, _, _ = load_engine(_engine_config(load_settings()))
    assert engine.prefill_wait_steps == 0
    monkeypatch.setenv("PREFILL_WAIT_STEPS", "-1")
    with pytest.raises(SettingsError, match="PREFILL_WAIT_STEPS"):
        load_settings()


def test_api_keys_from_env_and_file(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    keys = tmp_path / "keys"
    keys.write_text("# team keys\nfile-key-1\n\nfile-key-2\n")
    monkeypatch.setenv("API_KEYS", " env-key , ")
    monkeypatch.setenv("API_KEYS_FILE", str(keys))
    s = load_settings()
    assert len(s.api_key_hashes()) == 3
    assert "env-key" not in repr(s.api_key_hashes())


def test_latencies_are_never_negative_when_the_clock_steps_back(monkeypatch: pytest.MonkeyPatch) -> None:
    """CI once answered latency_ms=-1.64: a VM's monotonic clock stepped back between CPUs."""
    import time

    from engine_process import timings
    from serving import elapsed_since

    monkeypatch.setattr(time, "perf_counter", lambda: 99.998)
    assert elapsed_since(100.0) == 0.0
    monkeypatch.undo()
    assert elapsed_since(time.perf_counter() - 0.5) >= 0.5

    class Stamped:  # an engine Request whose stamps came from two threads
        arrival_time, scheduled_time, first_token_time, finish_time = 10.0, 9.999, 9.998, 9.9
        tokens = [1, 2, 3]

    assert timings(Stamped()) == (0.0, 0.0, 0.0)
