"""hf_export.py: our checkpoint as a Hugging Face GPT-2 directory gives the same logits.

The reference is transformers' GPT2LMHeadModel loading the exported directory, the same files
vLLM loads in serve_vllm.py (tests/test_vllm.py checks vLLM itself)."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from checkpoint import load_state, save_model
from hf_export import HFExportError, export_hf_gpt2, main
from model import GPT, GPTConfig
from tokenizer import load_tokenizer


def _checkpoint(directory: Path, tokenizer_dir: Path, bias: bool, extra_vocab: int, **meta) -> Path:
    tok = load_tokenizer(tokenizer_dir)
    torch.manual_seed(0)
    cfg = GPTConfig(block_size=48, vocab_size=tok.n_vocab + extra_vocab, n_layer=2, n_head=2, n_embd=32,
                    dropout=0.0, bias=bias)
    model = GPT(cfg)
    with torch.no_grad():  # random biases and LayerNorm gains, so a wrong mapping cannot hide
        for name, p in model.named_parameters():
            if name.endswith(("bias", "ln_1.weight", "ln_2.weight", "ln_f.weight")):
                p.normal_(1.0 if name.endswith("weight") else 0.0, 0.1)
    save_model(directory, model.state_dict(), {"model_config": cfg.to_dict(), **meta}, tokenizer_dir)
    return directory


@pytest.mark.parametrize("bias,extra_vocab", [(True, 37), (False, 0)])
def test_export_matches_hf_gpt2_logits(tmp_path: Path, tiny_data_dir: Path, bias: bool, extra_vocab: int) -> None:
    from transformers import GPT2LMHeadModel

    from checkpoint import load_model

    ckpt = _checkpoint(tmp_path / "ckpt", tiny_data_dir, bias, extra_vocab)
    out = export_hf_gpt2(ckpt, tmp_path / "hf")
    config = json.loads((out / "config.json").read_text())
    ours, tok, _ = load_model(ckpt)
    assert config["vocab_size"] == tok.n_vocab  # the padding rows are dropped
    assert config["n_positions"] == ours.config.block_size
    hf = GPT2LMHeadModel.from_pretrained(str(out), local_files_only=True).eval()
    ids = torch.tensor([tok.encode("def add(a, b):\n    return a + b\n\nclass Stack:\n    pass\n")[:48]])
    with torch.no_grad():
        want = ours(ids)[0][..., : tok.n_vocab]
        got = hf(ids).logits
    assert got.shape == want.shape
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert torch.equal(got.argmax(-1), want.argmax(-1))


def test_quantized_checkpoint_is_refused_naming_its_source(tmp_path: Path, tiny_data_dir: Path, capsys) -> None:
    float_ckpt = _checkpoint(tmp_path / "float", tiny_data_dir, True, 0)
    state, meta = load_state(float_ckpt)
    quant = {"mode": "int8-dynamic", "group_size": None, "source": str(float_ckpt)}
    save_model(tmp_path / "int8", state, {**meta, "quantization": quant}, tiny_data_dir)
    with pytest.raises(HFExportError, match="int8-dynamic.*float"):
        export_hf_gpt2(tmp_path / "int8", tmp_path / "hf")
    assert main(["--ckpt", str(tmp_path / "int8"), "--out", str(tmp_path / "hf")]) == 1
    err = capsys.readouterr().err
    assert str(float_ckpt) in err and err.count("\n") == 1 and "Traceback" not in err
    assert main(["--ckpt", str(float_ckpt), "--out", str(tmp_path / "hf")]) == 0


def test_untied_lm_head_is_refused(tmp_path: Path, tiny_data_dir: Path) -> None:
    from safetensors.torch import save_file

    ckpt = _checkpoint(tmp_path / "ckpt", tiny_data_dir, True, 0)
    state, meta = load_state(ckpt)
    state["lm_head.weight"] = torch.randn_like(state["transformer.wte.weight"])
    save_file(state, str(ckpt / "model.safetensors"), metadata={"meta": json.dumps(meta)})
    with pytest.raises(HFExportError, match="not tied"):
        export_hf_gpt2(ckpt, tmp_path / "hf")
