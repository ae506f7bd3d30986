"""data.py: FIM round trips, plain windows, special-token text, loader state and rank split."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from data import TrainBatches, fim_inverse, fim_transform, fim_window, open_tokens, read_data_meta
from tokenizer import load_tokenizer

from conftest import stdlib_texts


@pytest.fixture(scope="module")
def tok(tiny_data_dir):
    return load_tokenizer(tiny_data_dir)


@pytest.fixture(scope="module")
def train_tokens(tiny_data_dir):
    return open_tokens(tiny_data_dir, "train", read_data_meta(tiny_data_dir))


def random_documents(n: int, seed: int) -> list[str]:
    """Slices of real code plus unicode, empty and sentinel-looking text."""
    rng = np.random.default_rng(seed)
    corpus = "\n".join(stdlib_texts())
    extras = ["", "x", "é", "naïve ünïcödé → λ 🐍\n", "<fim_prefix>", "<|endoftext|>def f(): pass",
              "a<fim_suffix>b<fim_middle>c"]
    docs = list(extras)
    while len(docs) < n:
        start = int(rng.integers(0, len(corpus) - 1))
        docs.append(corpus[start:start + int(rng.integers(1, 400))] + str(rng.choice(extras)))
    return docs


@pytest.mark.parametrize("spm_rate", [0.0, 0.5, 1.0])
def test_fim_inverse_restores_document(tok, spm_rate):
    for seed, doc in enumerate(random_documents(300, seed=int(spm_rate * 10))):
        rng = np.random.default_rng(seed)
        ids = fim_transform(doc, rng, tok, spm_rate)
        assert ids[0] == tok.fim_prefix_id
        assert fim_inverse(ids, tok) == doc, (seed, doc)


def test_fim_layouts(tok):
    doc = "def add(a, b):\n    return a + b\n"
    psm = fim_transform(doc, np.random.default_rng(0), tok, spm_rate=0.0)
    spm = fim_transform(doc, np.random.default_rng(0), tok, spm_rate=1.0)
    # PSM: <pre> prefix <suf> suffix <mid> middle ; SPM: <pre> <suf> suffix <mid> prefix middle
    assert psm.index(tok.fim_prefix_id) < psm.index(tok.fim_suffix_id) < psm.index(tok.fim_middle_id)
    assert spm[:2] == [tok.fim_prefix_id, tok.fim_suffix_id]
    assert len(psm) == len(spm)  # the same three parts, in another order


def test_special_token_text_stays_plain(tok):
    doc = 'SPECIAL = "<|endoftext|><fim_prefix><fim_middle><fim_suffix>"\n'
    specials = {tok.eot_id, tok.fim_prefix_id, tok.fim_middle_id, tok.fim_suffix_id}
    for seed in range(50):
        ids = fim_transform(doc, np.random.default_rng(seed), tok, spm_rate=0.5)
        # exactly the three sentinels the transform inserts: the literal text never became one
        assert sorted(i for i in ids if i in specials) == sorted(
            [tok.fim_prefix_id, tok.fim_middle_id, tok.fim_suffix_id])
        assert fim_inverse(ids, tok) == doc


def test_fim_window_keeps_documents_and_separators(tok):
    docs = random_documents(6, seed=3)[1:]
    docs = [d for d in docs if d]
    window = []
    for d in docs:
        window += tok.encode(d) + [tok.eot_id]
    out = fim_window(np.array(window[:-1]), np.random.default_rng(0), tok, fim_rate=1.0, spm_rate=0.5)
    pieces, cur = [], []
    for i in out:
        if i == tok.eot_id:
            pieces.append(cur)
            cur = []
        else:
            cur.append(i)
    pieces.append(cur)
    assert [fim_inverse(p, tok) for p in pieces] == docs


def _is_window_of(row: np.ndarray, tokens: np.ndarray) -> bool:
    windows = np.lib.stride_tricks.sliding_window_view(np.asarray(tokens), len(row))
    return bool((windows == row).all(axis=1).any())


def test_fim_rate_zero_gives_plain_windows(train_tokens, tok):
    loader = TrainBatches(train_tokens, block_size=32, batch_size=4, seed=0, grad_accum=1,
                          tok=tok, fim_rate=0.0, prefetch=0)
    for _ in range(3):
        x, y = loader.next()
        assert x.shape == y.shape == (4, 32) and x.dtype == torch.int64
        assert torch.equal(x[:, 1:], y[:, :-1])
        for row in torch.cat([x, y[:, -1:]], dim=1).numpy():
            assert _is_window_of(row, train_tokens)


def test_fim_rate_one_inserts_sentinels(train_tokens, tok):
    loader = TrainBatches(train_tokens, block_size=64, batch_size=8, seed=0, grad_accum=1,
                          tok=tok, fim_rate=1.0, prefetch=0)
    x, y = loader.next()
    assert x.shape == (8, 64)
    assert (x == tok.fim_prefix_id).any(dim=1).all()  # every window holds at least one document


@pytest.mark.parametrize("prefetch", [0, 2])
def test_loader_state_restores_the_same_batches(train_tokens, tok, prefetch):
    def make():
        return TrainBatches(train_tokens, block_size=32, batch_size=2, seed=7, grad_accum=3,
                            tok=tok, fim_rate=0.5, prefetch=prefetch)

    a = make()
    for _ in range(4):
        a.next()
    state = a.state_dict()
    expected = [a.next() for _ in range(5)]
    b = make()
    b.load_state_dict(state)
    got = [b.next() for _ in range(5)]
    a.close()
    b.close()
    assert state == {"step": 1, "micro": 1, "seed": 7}
    for (xe, ye), (xg, yg) in zip(expected, got):
        assert torch.equal(xe, xg) and torch.equal(ye, yg)


def test_ranks_split_the_global_batch(train_tokens, tok):
    """Two ranks with 1 micro-step each read exactly what one process reads with 2."""
    kw = dict(block_size=32, batch_size=2, seed=5, grad_accum=2, tok=tok, fim_rate=0.5, prefetch=0)
    single = TrainBatches(train_tokens, **kw)
    ranks = [TrainBatches(train_tokens, rank=r, world_size=2, **kw) for r in range(2)]
    for _ in range(3):  # optimizer steps
        for r in range(2):
            xs, _ = single.next()
            xr, _ = ranks[r].next()
            assert torch.equal(xs, xr)
