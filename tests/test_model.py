"""model.py and the GPT-2 import: init loss, overfitting, KV cache, Hugging Face equivalence."""
from __future__ import annotations

import math
import os
import subprocess
import sys

import pytest
import torch

from model import GPT, GPTConfig
from train import PretrainedError, gpt_from_hf, train

from conftest import ROOT


def tiny_gpt(vocab_size: int = 1024, block_size: int = 64, n_embd: int = 32) -> GPT:
    torch.manual_seed(0)
    return GPT(GPTConfig(block_size=block_size, vocab_size=vocab_size, n_layer=2, n_head=2,
                         n_embd=n_embd, dropout=0.0))


def test_init_loss_is_uniform():
    model = tiny_gpt(vocab_size=1024)
    x = torch.randint(0, 1024, (8, 65), generator=torch.Generator().manual_seed(1))
    _, loss = model(x[:, :-1], x[:, 1:])  # next tokens: with tied weights, x itself would be easy
    assert abs(loss.item() - math.log(1024)) < 0.3


def test_overfits_one_batch():
    model = tiny_gpt(vocab_size=256, block_size=32, n_embd=64)
    optimizer = model.configure_optimizers(0.0, 3e-3, (0.9, 0.95), "cpu")
    x = torch.randint(0, 256, (4, 33), generator=torch.Generator().manual_seed(2))
    for _ in range(200):
        _, loss = model(x[:, :-1], x[:, 1:])
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    assert loss.item() < 0.5


def greedy_no_cache(model: GPT, prompt: list[int], n: int) -> list[int]:
    ids = torch.tensor([prompt])
    for _ in range(n):
        logits, _ = model(ids)
        ids = torch.cat([ids, logits[:, -1].argmax(-1, keepdim=True)], dim=1)
    return ids[0, len(prompt):].tolist()


@torch.no_grad()
def test_kv_cache_generation_matches_no_cache():
    model = tiny_gpt(vocab_size=300, block_size=64).eval()
    cfg = model.config
    prompts = [[5, 17, 42, 9, 3], [250, 1, 2, 3, 4, 5, 6, 7, 8]]  # two rows at different positions
    n_new = 12
    expected = [greedy_no_cache(model, p, n_new) for p in prompts]

    head_dim = cfg.n_embd // cfg.n_head
    caches = [(torch.zeros(2, cfg.n_head, cfg.block_size, head_dim),
               torch.zeros(2, cfg.n_head, cfg.block_size, head_dim)) for _ in range(cfg.n_layer)]
    next_ids, pos = [], []
    for r, p in enumerate(prompts):  # prefill each row alone into its slice of the batch cache
        row_caches = [(k[r:r + 1], v[r:r + 1]) for k, v in caches]
        logits, _ = model(torch.tensor([p]), kv_caches=row_caches, input_pos=torch.tensor([0]),
                          last_only=True)
        next_ids.append(logits[0, -1].argmax().item())
        pos.append(len(p))
    got = [[t] for t in next_ids]
    input_pos = torch.tensor(pos)
    for _ in range(n_new - 1):  # decode both rows together, each at its own position
        logits, _ = model(torch.tensor(next_ids)[:, None], kv_caches=caches, input_pos=input_pos,
                          last_only=True)
        next_ids = logits[:, -1].argmax(-1).tolist()
        for r, t in enumerate(next_ids):
            got[r].append(t)
        input_pos = input_pos + 1
    assert got == expected


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    hf = GPT2LMHeadModel(GPT2Config(n_layer=2, n_head=2, n_embd=32, vocab_size=300, n_positions=64))
    with torch.no_grad():  # random biases/gains too, so a forgotten or mis-transposed one shows
        for name, p in hf.named_parameters():
            if name.endswith("bias") or ".ln_" in name:
                p.normal_(0.0, 0.1)
    path = tmp_path_factory.mktemp("hf") / "tiny-gpt2"
    hf.save_pretrained(path)
    return path


@torch.no_grad()
def test_hf_equivalence(hf_dir):
    from transformers import GPT2LMHeadModel

    hf = GPT2LMHeadModel.from_pretrained(hf_dir).eval()
    ours = gpt_from_hf(hf_dir, vocab_size=320).eval()  # 300 padded to a multiple of 64
    idx = torch.randint(0, 300, (3, 40), generator=torch.Generator().manual_seed(3))
    expected = hf(idx).logits
    logits, _ = ours(idx)
    assert logits.shape == (3, 40, 320)
    torch.testing.assert_close(logits[..., :300], expected, atol=1e-5, rtol=1e-5)
    # the added rows (FIM tokens + padding) start at the mean embedding
    wte = hf.transformer.wte.weight
    new_rows = ours.transformer.wte.weight[300:]
    torch.testing.assert_close(new_rows, wte.mean(0).expand_as(new_rows))
    assert ours.lm_head.weight is ours.transformer.wte.weight  # still tied


def test_hf_block_size_crop(hf_dir):
    model = gpt_from_hf(hf_dir, vocab_size=320, block_size=16)
    assert model.transformer.wpe.weight.shape == (16, 32)


def test_pretrained_needs_gpt2_tokenized_data(hf_dir, tiny_train_config, tmp_path):
    with pytest.raises(PretrainedError, match="gpt2 tokenizer"):
        train(tiny_train_config(tmp_path / "out", init_from=str(hf_dir)))


def test_gpt2_offline_gives_clear_message(tiny_data_dir, tmp_path):
    """init_from=gpt2 without network (forced with HF_HUB_OFFLINE, so hermetic): one line."""
    from tokenizer import CodeTokenizer, load_tokenizer

    # A data dir that claims the gpt2 tokenizer (GPT-2's real files are not downloadable here):
    # the kind check passes and the weight download is what fails.
    data = tmp_path / "gpt2data"
    data.mkdir()
    bpe = load_tokenizer(tiny_data_dir)
    CodeTokenizer("gpt2", bpe.ranks, bpe.pat_str, bpe.special_tokens).save(data)
    for name in ("train.bin", "val.bin", "meta.json"):
        (data / name).write_bytes((tiny_data_dir / name).read_bytes())
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_HOME=str(tmp_path / "hf_home"))
    proc = subprocess.run(
        [sys.executable, "train.py", "--init_from=gpt2", f"--data_dir={data}",
         f"--out_dir={tmp_path / 'out'}", "--device=cpu", "--block_size=32"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert "Traceback" not in proc.stderr
    assert "could not be downloaded" in lines[-1] and "init_from=/path/to/local/hf_dir" in lines[-1]
