"""A plain GPT-2 (Radford et al. 2019) in one file, nanoGPT style.

Shapes in comments: B batch, T time (tokens), C channels (n_embd), H heads, D head dim.
The optional KV cache in `forward` is what generation needs; the scheduling of many
sequences over it lives in engine.py, not here.
"""
from __future__ import annotations

import inspect
import math
from dataclasses import asdict, dataclass

import torch
import torch.nn as nn
from torch.nn import functional as F


@dataclass
class GPTConfig:
    block_size: int = 1024
    vocab_size: int = 50304  # GPT-2's 50257 padded up to a multiple of 64
    n_layer: int = 12
    n_head: int = 12
    n_embd: int = 768
    dropout: float = 0.0
    bias: bool = True  # bias in Linear and LayerNorm, as GPT-2 has

    def to_dict(self) -> dict:
        return asdict(self)


class KVCache(nn.Module):
    """A static key/value cache for one layer, allocated once: (B, H, L, D) each."""

    def __init__(self, batch: int, n_head: int, max_len: int, head_dim: int,
                 dtype: torch.dtype, device: torch.device | str):
        super().__init__()
        shape = (batch, n_head, max_len, head_dim)
        # Buffers (not plain tensors) so torch.compile / CUDA graphs see a fixed address.
        self.register_buffer("k", torch.zeros(shape, dtype=dtype, device=device), persistent=False)
        self.register_buffer("v", torch.zeros(shape, dtype=dtype, device=device), persistent=False)


class CausalSelfAttention(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        assert config.n_embd % config.n_head == 0
        self.c_attn = nn.Linear(config.n_embd, 3 * config.n_embd, bias=config.bias)
        self.c_proj = nn.Linear(config.n_embd, config.n_embd, bias=config.bias)
        self.resid_dropout = nn.Dropout(config.dropout)
        self.n_head = config.n_head
        self.n_embd = config.n_embd
        self.dropout = config.dropout

    def forward(self, x: torch.Tensor, cache: tuple[torch.Tensor, torch.Tensor] | None = None,
                input_pos: torch.Tensor | None = None,
                cache_rows: torch.Tensor | None = None, kv_len: int | None = None,
                attn_mask: torch.Tensor | None = None) -> torch.Tensor:
        B, T, C = x.size()
        q, k, v = self.c_attn(x).split(self.n_embd, dim=2)
        q = q.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)  # (B, H, T, D)
        k = k.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)
        v = v.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)
        if cache is None:
            y = F.scaled_dot_product_attention(
                q, k, v, dropout_p=self.dropout if self.training else 0.0, is_causal=True)
        else:
            # cache: (S, H, Lmax, D) slot caches; input_pos: (B,) position of x[:, 0] in each row;
            # cache_rows: (B,) the slot of each row (default: row b uses slot b); kv_len: how many
            # leading positions to attend over (default all), so short sequences read less.
            # attn_mask: (B, 1, T, L) bool from GPT.forward, shared by every layer.
            cache_k, cache_v = cache
            L = kv_len or cache_k.size(2)
            if cache_rows is None:  # slots 0..B-1: one scatter along time, views without copies
                index = (input_pos[:, None] + torch.arange(T, device=x.device))  # (B, T)
                index = index[:, None, :, None].expand(B, self.n_head, T, C // self.n_head)
                cache_k[:B].scatter_(2, index, k.to(cache_k.dtype))
                cache_v[:B].scatter_(2, index, v.to(cache_v.dtype))
                keys, values = cache_k[:B, :, :L], cache_v[:B, :, :L]
            else:  # prefill into chosen slots; gathered after the write
                query_pos = input_pos[:, None] + torch.arange(T, device=x.device)  # (B, T)
                cache_k[cache_rows[:, None], :, query_pos] = k.transpose(1, 2).to(cache_k.dtype)
                cache_v[cache_rows[:, None], :, query_pos] = v.transpose(1, 2).to(cache_v.dtype)
                keys, values = cache_k[cache_rows, :, :L], cache_v[cache_rows, :, :L]
            y = F.scaled_dot_product_attention(
                q, keys.to(q.dtype), values.to(q.dtype), attn_mask=attn_mask)
        y = y.transpose(1, 2).contiguous().view(B, T, C)
        return self.resid_dropout(self.c_proj(y))


class MLP(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, 4 * config.n_embd, bias=config.bias)
        self.gelu = nn.GELU(approximate="tanh")  # GPT-2 used the tanh approximation
        self.c_proj = nn.Linear(4 * config.n_embd, config.n_embd, bias=config.bias)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.c_proj(self.gelu(self.c_fc(x))))


class Block(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.n_embd, bias=config.bias)
        self.attn = CausalSelfAttention(config)
        self.ln_2 = nn.LayerNorm(config.n_embd, bias=config.bias)
        self.mlp = MLP(config)

    def forward(self, x: torch.Tensor, cache=None, input_pos=None, cache_rows=None,
                kv_len=None, attn_mask=None) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x), cache, input_pos, cache_rows, kv_len, attn_mask)
        return x + self.mlp(self.ln_2(x))


class GPT(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.config = config
        self.transformer = nn.ModuleDict(dict(
            wte=nn.Embedding(config.vocab_size, config.n_embd),
            wpe=nn.Embedding(config.block_size, config.n_embd),
            drop=nn.Dropout(config.dropout),
            h=nn.ModuleList([Block(config) for _ in range(config.n_layer)]),
            ln_f=nn.LayerNorm(config.n_embd, bias=config.bias),
        ))
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        self.transformer.wte.weight = self.lm_head.weight  # weight tying (Press & Wolf 2017)
        self.apply(self._init_weights)
        # GPT-2: residual projections scaled by 1/sqrt(2 * n_layer)
        for name, p in self.named_parameters():
            if name.endswith("c_proj.weight"):
                torch.nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * config.n_layer))

    def _init_weights(self, module: nn.Module) -> None:
        if isinstance(module, nn.Linear):
            torch.nn.init.normal_(module.weight, mean=0.0, std=0.02)
            if module.bias is not None:
                torch.nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            torch.nn.init.normal_(module.weight, mean=0.0, std=0.02)

    def num_params(self, non_embedding: bool = True) -> int:
        n = sum(p.numel() for p in self.parameters())
        if non_embedding:
            n -= self.transformer.wpe.weight.numel()
        return n

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None,
                kv_caches: list[tuple[torch.Tensor, torch.Tensor]] | None = None,
                input_pos: torch.Tensor | None = None, last_only: bool = False,
                cache_rows: torch.Tensor | None = None, logits_index: torch.Tensor | None = None,
                kv_len: int | None = None):
        """idx (B, T) token ids. Training: targets (B, T) -> (logits, loss).
        Generation: kv_caches, one (k, v) pair of (S, H, Lmax, D) slot caches per layer; input_pos
        (B,) the position of idx[:, 0] in each row; cache_rows (B,) the slot of each row (default
        row b -> slot b); kv_len the number of cache positions attended over. last_only returns logits (B, 1, V) for the last token only, and
        logits_index (B,) for one chosen position per row (rows of different lengths)."""
        B, T = idx.size()
        if input_pos is None:
            assert T <= self.config.block_size, f"sequence of {T} > block_size {self.config.block_size}"
            pos = torch.arange(T, device=idx.device)[None]  # (1, T)
        else:
            pos = input_pos[:, None] + torch.arange(T, device=idx.device)  # (B, T)
        x = self.transformer.drop(self.transformer.wte(idx) + self.transformer.wpe(pos))  # (B, T, C)
        mask = None
        if kv_caches is not None:  # query at position p sees cache positions <= p
            L = kv_len or kv_caches[0][0].size(2)
            mask = (torch.arange(L, device=idx.device)[None, None, :] <= pos[:, :, None])[:, None]
        for i, block in enumerate(self.transformer.h):
            x = block(x, kv_caches[i] if kv_caches is not None else None, input_pos, cache_rows,
                      kv_len, mask)
        x = self.transformer.ln_f(x)
        if targets is not None:
            logits = self.lm_head(x)
            loss = F.cross_entropy(logits.view(-1, logits.size(-1)).float(), targets.reshape(-1),
                                   ignore_index=-1)
            return logits, loss
        if logits_index is not None:
            x = x[torch.arange(B, device=x.device), logits_index][:, None]  # (B, 1, C)
        elif last_only:
            x = x[:, -1:, :]
        return self.lm_head(x), None

    def configure_optimizers(self, weight_decay: float, learning_rate: float,
                             betas: tuple[float, float], device_type: str) -> torch.optim.AdamW:
        params = [p for p in self.parameters() if p.requires_grad]
        # Matrices (and embeddings) decay; biases and LayerNorm gains don't.
        decay = [p for p in params if p.dim() >= 2]
        no_decay = [p for p in params if p.dim() < 2]
        groups = [{"params": decay, "weight_decay": weight_decay},
                  {"params": no_decay, "weight_decay": 0.0}]
        fused = device_type == "cuda" and "fused" in inspect.signature(torch.optim.AdamW).parameters
        return torch.optim.AdamW(groups, lr=learning_rate, betas=betas, fused=fused)

    def flops_per_token(self, seq_len: int) -> int:
        """Training FLOPs per token, PaLM appendix B: 6N + 12 * L * H * Q * T."""
        cfg = self.config
        return 6 * self.num_params() + 12 * cfg.n_layer * cfg.n_head * (cfg.n_embd // cfg.n_head) * seq_len

    def estimate_mfu(self, tokens_per_s: float, seq_len: int, peak_flops: float = 989e12) -> float:
        """Model FLOPs utilisation against H100 SXM bf16 dense peak by default."""
        return self.flops_per_token(seq_len) * tokens_per_s / peak_flops
