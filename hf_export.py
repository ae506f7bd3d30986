"""Our checkpoint -> a Hugging Face GPT-2 directory (config.json + model.safetensors) that
transformers' GPT2LMHeadModel and vLLM load. serve_vllm.py calls it at start; by hand:

    python hf_export.py --ckpt out-code-assistant --out out-code-assistant-hf

What maps and how:
- names are nanoGPT's, which follow HF's; the four Conv1D weights (c_attn, attn.c_proj, c_fc,
  mlp.c_proj) are stored (in, out) by HF, so they are transposed;
- lm_head is tied to wte in both (HF's tie_word_embeddings), so only wte is written;
- the embedding keeps the tokenizer's n_vocab rows: our padding rows (vocab_size is rounded up
  to a multiple of 64) are never fed in and our engine never samples them, while vLLM would
  sample over every row of lm_head; dropping them keeps greedy decoding identical;
- bias=False is written as zero biases, which computes the same (HF GPT-2 always has biases);
- block_size -> n_positions; GELU tanh -> "gelu_new"; LayerNorm eps 1e-5 as nn.LayerNorm's.
Quantized checkpoints (quantize_model.py) are refused: export the float checkpoint instead.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
from safetensors.torch import save_file

from checkpoint import CheckpointError, atomic_write, atomic_write_text, load_state
from model import GPTConfig

# HF GPT-2 keeps these as Conv1D, whose weight is (in, out): the transpose of nn.Linear's.
CONV1D_WEIGHTS = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")
# Per block, in HF's order; "weight"/"bias" of each.
_BLOCK_PARAMS = ("ln_1", "attn.c_attn", "attn.c_proj", "ln_2", "mlp.c_fc", "mlp.c_proj")
LAYER_NORM_EPS = 1e-5  # nn.LayerNorm's default, which model.py uses


class HFExportError(CheckpointError):
    """A checkpoint that has no exact Hugging Face GPT-2 equivalent; the message says why."""


def hf_gpt2_config(cfg: GPTConfig, n_vocab: int, eot_id: int, dtype: torch.dtype) -> dict:
    """config.json of the GPT2LMHeadModel equivalent to `cfg`, with the tokenizer's n_vocab rows."""
    return {
        "architectures": ["GPT2LMHeadModel"],
        "model_type": "gpt2",
        "vocab_size": n_vocab,
        "n_positions": cfg.block_size,
        "n_ctx": cfg.block_size,
        "n_embd": cfg.n_embd,
        "n_layer": cfg.n_layer,
        "n_head": cfg.n_head,
        "n_inner": None,  # 4 * n_embd, as model.py's MLP
        "activation_function": "gelu_new",  # GELU, tanh approximation
        "layer_norm_epsilon": LAYER_NORM_EPS,
        "resid_pdrop": 0.0, "embd_pdrop": 0.0, "attn_pdrop": 0.0,
        "scale_attn_weights": True,  # 1/sqrt(head_dim), as scaled_dot_product_attention
        "scale_attn_by_inverse_layer_idx": False,
        "reorder_and_upcast_attn": False,
        "tie_word_embeddings": True,
        "bos_token_id": eot_id,
        "eos_token_id": eot_id,
        "initializer_range": 0.02,
        "use_cache": True,
        "torch_dtype": str(dtype).removeprefix("torch."),
    }


def hf_gpt2_state(state: dict[str, torch.Tensor], cfg: GPTConfig, n_vocab: int) -> dict[str, torch.Tensor]:
    """Our (tied-free) state dict -> GPT2LMHeadModel's names and layouts (lm_head left to the tie)."""
    state = dict(state)
    wte = state.pop("transformer.wte.weight", None)
    if wte is None:
        raise HFExportError("the checkpoint has no transformer.wte.weight")
    lm_head = state.pop("lm_head.weight", None)
    if lm_head is not None and not torch.equal(lm_head, wte):
        raise HFExportError("lm_head is not tied to wte: HF GPT-2 (and vLLM's) ties them")
    dtype = wte.dtype
    out = {"transformer.wte.weight": wte[:n_vocab].contiguous(),
           "transformer.wpe.weight": state.pop("transformer.wpe.weight")}
    blocks = [f"transformer.h.{i}.{p}" for i in range(cfg.n_layer) for p in _BLOCK_PARAMS] + ["transformer.ln_f"]
    for prefix in blocks:
        weight = state.pop(prefix + ".weight")
        bias = state.pop(prefix + ".bias", None)
        if bias is None:
            if cfg.bias:
                raise HFExportError(f"the checkpoint lacks {prefix}.bias")
            # bias=False: a zero bias computes the same; the Linear's output size is weight.shape[0]
            bias = torch.zeros(weight.shape[0], dtype=dtype)
        if (prefix + ".weight").endswith(CONV1D_WEIGHTS):
            weight = weight.t()
        out[prefix + ".weight"] = weight.contiguous()
        out[prefix + ".bias"] = bias.contiguous()
    if state:
        raise HFExportError(f"tensors with no HF GPT-2 counterpart: {sorted(state)[:3]}")
    return out


def export_hf_gpt2(ckpt_dir: str | Path, out_dir: str | Path) -> Path:
    """Write `out_dir`/config.json and model.safetensors for the float checkpoint in `ckpt_dir`.

    Raises HFExportError (one line) for a checkpoint HF GPT-2 cannot express exactly."""
    from tokenizer import load_tokenizer

    state, meta = load_state(ckpt_dir)
    quant = meta.get("quantization")
    if quant:
        source = quant.get("source") or "the float checkpoint it was made from"
        raise HFExportError(f"{ckpt_dir} is quantized ({quant.get('mode')}); vLLM serves float weights: "
                            f"use {source} (quantize for vLLM with its own methods, e.g. fp8)")
    try:
        cfg = GPTConfig(**meta["model_config"])
    except (KeyError, TypeError) as e:
        raise HFExportError(f"model_config has fields HF GPT-2 cannot express ({type(e).__name__}: {e})") from None
    if cfg.n_embd % cfg.n_head:
        raise HFExportError(f"n_embd {cfg.n_embd} is not a multiple of n_head {cfg.n_head}")
    tok = load_tokenizer(ckpt_dir)
    if tok.n_vocab > cfg.vocab_size:
        raise HFExportError(f"the tokenizer has {tok.n_vocab} tokens but the model only {cfg.vocab_size}")
    tensors = hf_gpt2_state(state, cfg, tok.n_vocab)
    config = hf_gpt2_config(cfg, tok.n_vocab, tok.eot_id, tensors["transformer.wte.weight"].dtype)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    # "format": "pt" is what transformers checks for in a safetensors header
    atomic_write(out / "model.safetensors", lambda tmp: save_file(tensors, tmp, metadata={"format": "pt"}))
    atomic_write_text(out / "config.json", json.dumps(config, indent=2) + "\n")
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="export a code-assistant checkpoint as a HF GPT-2 directory")
    parser.add_argument("--ckpt", required=True, help="our model directory (model.safetensors + meta.json)")
    parser.add_argument("--out", required=True, help="directory for config.json + model.safetensors")
    args = parser.parse_args(argv)
    try:
        out = export_hf_gpt2(args.ckpt, args.out)
    except CheckpointError as e:
        sys.stderr.write(f"hf_export: {e}\n")
        return 1
    sys.stdout.write(f"wrote {out}/config.json and {out}/model.safetensors\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
