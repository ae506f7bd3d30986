"""Tests for tokenizer.py.

    /tmp/venvtest/bin/pytest -q tests/test_tokenizer.py
"""
from __future__ import annotations

import base64
import json
import os
import subprocess
import sys
import sysconfig
import time
import tokenize
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tokenizer import (  # noqa: E402
    SPECIAL_TOKENS, CodeTokenizer, TokenizerError, load_tokenizer,
    padded_vocab_size, train_bpe,
)

STDLIB = Path(sysconfig.get_paths()["stdlib"])


def stdlib_files() -> list[Path]:
    """Every .py file of the running Python's standard library (not site-packages)."""
    files = []
    for dirpath, dirnames, filenames in os.walk(STDLIB):
        dirnames[:] = sorted(d for d in dirnames if d not in ("site-packages", "__pycache__"))
        files += [Path(dirpath) / f for f in sorted(filenames) if f.endswith(".py")]
    return files


def read_any(path: Path) -> str:
    # a few test files are latin-1/koi8-r (declared by a coding cookie) or deliberately broken
    try:
        with tokenize.open(path) as f:
            return f.read()
    except (SyntaxError, UnicodeDecodeError, LookupError):
        return path.read_bytes().decode("latin-1")


@pytest.fixture(scope="module")
def stdlib_texts() -> list[str]:
    return [read_any(p) for p in stdlib_files()]


@pytest.fixture(scope="module")
def tok(stdlib_texts) -> CodeTokenizer:
    return train_bpe(stdlib_texts[::10], vocab_size=2000)


@pytest.mark.slow
def test_round_trip_every_stdlib_file(tok, stdlib_texts):
    assert len(stdlib_texts) > 500
    encoded = tok.encode_batch(stdlib_texts)
    bad = [i for i, (text, ids) in enumerate(zip(stdlib_texts, encoded)) if tok.decode(ids) != text]
    assert not bad, f"{len(bad)} files do not round-trip"
    # the BPE actually compresses code (bytes per token well above 1)
    n_bytes = sum(len(t.encode("utf-8")) for t in stdlib_texts)
    assert n_bytes / sum(map(len, encoded)) > 2.5
    # encode_batch is just a faster encode
    assert encoded[0] == tok.encode(stdlib_texts[0])


def test_vocab_and_special_ids(tok):
    assert tok.kind == "bpe"
    assert tok.n_vocab == 2000
    n_ranks = len(tok.ranks)
    assert tok.n_vocab == n_ranks + len(SPECIAL_TOKENS)
    assert (tok.eot_id, tok.fim_prefix_id, tok.fim_middle_id, tok.fim_suffix_id) == \
        tuple(range(n_ranks, n_ranks + 4))
    for text, i in zip(SPECIAL_TOKENS, range(n_ranks, n_ranks + 4)):
        assert tok.decode([i]) == text
    # every byte is a token by itself, so arbitrary (even invalid UTF-8) bytes round-trip
    for b in range(256):
        assert bytes([b]) in tok.ranks
    ids = [tok.ranks[bytes([b])] for b in (0xff, 0xfe, 0x00, 0x41)]
    assert tok.decode_bytes(ids) == b"\xff\xfe\x00A"
    assert tok.decode(ids[:1]) == "\ufffd"  # errors="replace"
    assert max(tok.ranks.values()) == n_ranks - 1


def test_special_text_is_ordinary_text(tok):
    specials = {tok.eot_id, tok.fim_prefix_id, tok.fim_middle_id, tok.fim_suffix_id}
    text = 'sep = "<|endoftext|>"  # <fim_prefix>a<fim_suffix>b<fim_middle>\n'
    for ids in (tok.encode(text), tok.encode_batch([text])[0]):
        assert not specials & set(ids)
        assert tok.decode(ids) == text
    for s in SPECIAL_TOKENS:
        assert tok.encode(s) != [tok.special_tokens[s]]


def test_merges_learned_in_order():
    texts = ["def frobnicate(x):\n    return frobnicate(x)\n" * 50] * 20
    tok = train_bpe(texts, vocab_size=400)
    assert len(tok.encode(" frobnicate")) == 1
    assert tok.decode(tok.encode(texts[0])) == texts[0]
    # a tiny corpus runs out of merges: n_vocab tells the truth
    assert tok.n_vocab <= 400


def test_vocab_size_too_small():
    with pytest.raises(ValueError, match="at least 260"):
        train_bpe(["x = 1\n"], vocab_size=100)


def test_save_load_identical(tok, stdlib_texts, tmp_path):
    tok.save(tmp_path / "tk")
    meta = json.loads((tmp_path / "tk" / "tokenizer.json").read_text())
    assert meta["kind"] == "bpe"
    assert meta["ranks_file"] == "tokenizer.tiktoken"
    assert meta["n_vocab"] == tok.n_vocab
    assert meta["special_tokens"] == dict(zip(SPECIAL_TOKENS, range(tok.eot_id, tok.eot_id + 4)))
    assert meta["pat_str"] == tok.pat_str
    assert sorted(os.listdir(tmp_path / "tk")) == ["tokenizer.json", "tokenizer.tiktoken"]  # no tmp
    loaded = load_tokenizer(tmp_path / "tk")
    assert (loaded.kind, loaded.n_vocab, loaded.eot_id) == (tok.kind, tok.n_vocab, tok.eot_id)
    sample = stdlib_texts[::37]
    assert loaded.encode_batch(sample) == tok.encode_batch(sample)
    # saving again over an existing directory is fine
    loaded.save(tmp_path / "tk")
    assert load_tokenizer(str(tmp_path / "tk")).ranks == tok.ranks


def test_load_errors_name_the_path(tok, tmp_path):
    with pytest.raises(TokenizerError, match=str(tmp_path / "nope")):
        load_tokenizer(tmp_path / "nope")
    d = tmp_path / "bad"
    d.mkdir()
    (d / "tokenizer.json").write_text("{not json")
    with pytest.raises(TokenizerError, match="corrupt"):
        load_tokenizer(d)
    tok.save(d)
    (d / "tokenizer.tiktoken").write_text("this is not base64!! x\n")
    with pytest.raises(TokenizerError, match="tokenizer.tiktoken"):
        load_tokenizer(d)
    (d / "tokenizer.tiktoken").unlink()
    with pytest.raises(TokenizerError, match="missing"):
        load_tokenizer(d)


def test_padded_vocab_size():
    assert padded_vocab_size(50260) == 50304
    assert padded_vocab_size(50257) == 50304
    assert padded_vocab_size(4096) == 4096
    assert padded_vocab_size(4097) == 4160
    assert padded_vocab_size(1) == 64
    assert padded_vocab_size(100, multiple=128) == 128


def test_gpt2_offline_fails_fast_and_clearly(tmp_path):
    # a fresh interpreter so no in-process tiktoken cache can answer; no network here
    env = {**os.environ, "TIKTOKEN_CACHE_DIR": str(tmp_path / "empty-cache")}
    code = "import tokenizer; tokenizer.gpt2_tokenizer(); print('LOADED')"
    t0 = time.time()
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True,
                       text=True, timeout=60)
    elapsed = time.time() - t0
    if r.returncode == 0 and "LOADED" in r.stdout:
        pytest.skip("this machine can download the gpt2 files")
    assert "TokenizerUnavailable" in r.stderr
    last = r.stderr.strip().splitlines()[-1]
    assert "gpt2" in last and "offline" in last and "TIKTOKEN_CACHE_DIR" in last and "bpe" in last
    assert elapsed < 20


def test_gpt2_kind_loads_offline_from_its_files(tmp_path, monkeypatch):
    # a stand-in for GPT-2's ranks: 256 bytes + a few merges, with kind="gpt2" metadata
    ranks = {bytes([b]): b for b in range(256)}
    for piece in (b"de", b"def", b" f", b"in", b" in"):
        ranks[piece] = len(ranks)
    n = len(ranks)
    d = tmp_path / "gpt2tok"
    d.mkdir()
    (d / "tokenizer.tiktoken").write_text(
        "".join(f"{base64.b64encode(t).decode()} {r}\n" for t, r in ranks.items()))
    (d / "tokenizer.json").write_text(json.dumps({
        "kind": "gpt2",
        "pat_str": r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+""",
        "special_tokens": {s: n + i for i, s in enumerate(SPECIAL_TOKENS)},
        "ranks_file": "tokenizer.tiktoken",
        "n_vocab": n + 4,
    }))
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", str(tmp_path / "empty-cache"))
    tok = load_tokenizer(d)
    assert tok.kind == "gpt2"
    assert tok.eot_id == n and tok.fim_suffix_id == n + 3 and tok.n_vocab == n + 4
    assert tok.encode("def") == [ranks[b"def"]]
    text = "def f(x): return x in y  # <|endoftext|>"
    assert tok.decode(tok.encode(text)) == text
    # save/load of a gpt2-kind tokenizer keeps its kind and ranks
    tok.save(tmp_path / "again")
    again = load_tokenizer(tmp_path / "again")
    assert again.kind == "gpt2" and again.ranks == tok.ranks
    assert json.loads((tmp_path / "again" / "tokenizer.json").read_text())["kind"] == "gpt2"
