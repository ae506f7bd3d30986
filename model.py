"""A plain GPT-2 (Radford et al. 2019) in one file, nanoGPT style.

Shapes in comments: B batch, T time (tokens), C channels (n_embd), H heads, D head dim.
The optional KV cache in `forward` is what generation needs; the scheduling of many
sequences over it lives in engine.py, not here.
"""
from __future__ import annotations

import functools
import inspect
import math
from dataclasses import asdict, dataclass
from typing import Any, Callable

import torch
import torch.nn as nn
from torch.nn import functional as F

import decode_kernels


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


# How a decode step attends over the cache: "matmul" (batched GEMVs) or "reduce" (elementwise
# products and sums, for torch.compile to fuse). bench/decode_variants.py measures both.
DECODE_ATTENTION = "matmul"
# Whether a decode step runs on decode_kernels.py's Triton kernels where they apply (a GPU in
# bf16/fp16 with Triton; the interpreter in the CPU tests): "triton", or "torch" for the ops
# above (the benchmarks measure both side by side).
DECODE_KERNELS = "triton"


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
                cache_pos: torch.Tensor | None = None,
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
            # cache: (S, H, Lmax, D) slot caches; cache_pos (B, T): where each token's K/V goes in
            # its row's slot; cache_rows (B,): the slot of each row; kv_len: how many leading
            # positions to attend over (default all), so short sequences read less. attn_mask:
            # (B, 1, T, L) bool. GPT.forward makes all of them once for every layer.
            cache_k, cache_v = cache
            L = kv_len or cache_k.size(2)
            # write this chunk at its positions in its slots, then gather the slots to attend over
            cache_k[cache_rows[:, None], :, cache_pos] = k.transpose(1, 2).to(cache_k.dtype)
            cache_v[cache_rows[:, None], :, cache_pos] = v.transpose(1, 2).to(cache_v.dtype)
            keys, values = cache_k[cache_rows, :, :L], cache_v[cache_rows, :, :L]
            y = F.scaled_dot_product_attention(
                q, keys.to(q.dtype), values.to(q.dtype), attn_mask=attn_mask)
        y = y.transpose(1, 2).contiguous().view(B, T, C)
        return self.resid_dropout(self.c_proj(y))

    def decode(self, x: torch.Tensor, keys: torch.Tensor, values: torch.Tensor,
               pos: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """One new token per row, without writing the cache (see GPT.decode_step).

        x (B, C); keys/values (B, H, L, D) cached positions, of which row b's first pos[b] are
        valid. Returns the output (B, C) and this token's (k, v) stacked as (2, B, H, D).
        The new token's own score joins the cached ones in one softmax, so nothing is written."""
        B, C = x.size()
        H = self.n_head
        q, k, v = self.c_attn(x).view(B, 3, H, C // H).unbind(1)  # (B, H, D) each
        scale = 1.0 / math.sqrt(C // H)
        if DECODE_ATTENTION == "reduce":
            # as elementwise products and sums: Inductor writes each as one Triton reduction
            # that reads the cache once (no batched-GEMV library call per layer)
            past = (q[:, :, None, :].float() * keys.float()).sum(-1) * scale  # (B, H, L)
        else:
            past = (q[:, :, None, :] @ keys.transpose(-1, -2).to(q.dtype)).squeeze(2).float() * scale
        valid = torch.arange(keys.size(2), device=x.device)[None, None, :] < pos[:, None, None]
        past = past.masked_fill(~valid, float("-inf"))
        own = (q.float() * k.float()).sum(-1, keepdim=True) * scale  # (B, H, 1): the token itself
        probs = torch.cat([past, own], dim=-1).softmax(dim=-1)
        if DECODE_ATTENTION == "reduce":
            y = ((probs[:, :, :-1, None] * values.float()).sum(2) + probs[:, :, -1:] * v.float()).to(q.dtype)
        else:
            y = (probs[:, :, None, :-1].to(q.dtype) @ values.to(q.dtype)).squeeze(2) + probs[:, :, -1:].to(q.dtype) * v
        return self.c_proj(y.reshape(B, C)), torch.stack([k, v])


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

    def forward(self, x: torch.Tensor, cache=None, cache_pos=None, cache_rows=None,
                kv_len=None, attn_mask=None) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x), cache, cache_pos, cache_rows, kv_len, attn_mask)
        return x + self.mlp(self.ln_2(x))

    def decode(self, x: torch.Tensor, keys: torch.Tensor, values: torch.Tensor,
               pos: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        y, kv = self.attn.decode(self.ln_1(x), keys, values, pos)
        x = x + y
        return x + self.mlp(self.ln_2(x)), kv

    def decode_fused(self, x: torch.Tensor, cache: torch.Tensor, layer: int, pos: torch.Tensor,
                     write_kv: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
        """`decode` on decode_kernels.py: five kernels for up to 16 rows (LayerNorm inside the
        matmul that follows it, bias / GELU / residual inside the one before), the attention
        one kernel at any batch. cache is the whole (n_layer, 2, S, H, Lmax, D) cache.
        write_kv: the qkv kernel also stores the new key/value into the cache at (row b,
        pos[b]) and None comes back for them (above 16 rows, on cuBLAS, they come back as usual)."""
        attn, mlp = self.attn, self.mlp
        B, C = x.shape
        if write_kv and decode_kernels.on_kernels(x, attn.c_attn):
            qkv, kv = decode_kernels.qkv_module(x, attn.c_attn, self.ln_1, cache, layer, pos, attn.n_head), None
        else:
            qkv = decode_kernels.linear_module(x, attn.c_attn, ln=self.ln_1)  # (B, 3C)
            kv = qkv.view(B, 3, attn.n_head, C // attn.n_head)[:, 1:].transpose(0, 1)  # (2, B, H, D)
        y = decode_kernels.attention_op(qkv, cache, layer, pos, attn.n_head)  # (B, C)
        x = decode_kernels.linear_module(y, attn.c_proj, residual=x)
        h = decode_kernels.linear_module(x, mlp.c_fc, ln=self.ln_2, gelu=True)
        return decode_kernels.linear_module(h, mlp.c_proj, residual=x), kv


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
        # How forward computes the training loss: "plain" (logits, then cross-entropy; returns
        # the logits too) or "fused" (see fused_linear_cross_entropy). train.py sets both.
        self.loss_impl = "plain"
        self.loss_chunk_rows = FUSED_LOSS_CHUNK_ROWS
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
        """idx (B, T) token ids. Training: targets (B, T) -> (logits, loss), or (None, loss) with
        loss_impl "fused". Generation: kv_caches, one (k, v) pair of (S, H, Lmax, D) slot caches
        per layer; input_pos (B,) the position of idx[:, 0] in each row; cache_rows (B,) the slot
        of each row (default row b -> slot b); kv_len the number of cache positions attended
        over. last_only returns logits (B, 1, V) for the last token only, and logits_index (B,)
        for one chosen position per row (rows of different lengths)."""
        B, T = idx.size()
        if input_pos is None:
            assert T <= self.config.block_size, f"sequence of {T} > block_size {self.config.block_size}"
            pos = torch.arange(T, device=idx.device)[None]  # (1, T)
        else:
            # (B, T), pad positions past the context clamped (see cache_pos below)
            pos = (input_pos[:, None] + torch.arange(T, device=idx.device)).clamp(max=self.config.block_size - 1)
        x = self.transformer.drop(self.transformer.wte(idx) + self.transformer.wpe(pos))  # (B, T, C)
        mask = cache_pos = None
        if kv_caches is not None:
            # made here once, not in each layer: in a captured prefill every small op is a kernel
            L_max = kv_caches[0][0].size(2)
            L = kv_len or L_max
            mask = (torch.arange(L, device=idx.device)[None, None, :] <= pos[:, :, None])[:, None]  # p sees <= p
            # the engine pads prefill chunks to fixed shapes: pad positions past the cache all
            # write its last position, which is never attended over
            cache_pos = pos.clamp(max=L_max - 1)
            if cache_rows is None:  # row b uses slot b
                cache_rows = torch.arange(B, device=idx.device)
        for i, block in enumerate(self.transformer.h):
            x = block(x, kv_caches[i] if kv_caches is not None else None, cache_pos, cache_rows,
                      kv_len, mask)
        x = self.transformer.ln_f(x)
        if targets is not None:
            # loss_impl "fused" (train.py's default): the chunked lm_head + cross-entropy,
            # which never holds the (B*T, V) logits and returns (None, loss).
            if self.loss_impl == "fused":
                loss = fused_linear_cross_entropy(
                    x.reshape(-1, x.size(-1)), self.lm_head.weight, targets.reshape(-1),
                    self.loss_chunk_rows)
                return None, loss
            logits = self.lm_head(x)
            loss = F.cross_entropy(logits.view(-1, logits.size(-1)).float(), targets.reshape(-1),
                                   ignore_index=-1)
            return logits, loss
        if logits_index is not None:
            x = x[torch.arange(B, device=x.device), logits_index][:, None]  # (B, 1, C)
        elif last_only:
            x = x[:, -1:, :]
        return self.lm_head(x), None

    def decode_step(self, tokens: torch.Tensor, pos: torch.Tensor, cache: torch.Tensor,
                    length: int, write_kv: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
        """One decode step for B rows.

        tokens, pos (B,): each row's newest token and its position; cache (n_layer, 2, S, H,
        Lmax, D), rows [0, B) hold these rows; length: how many leading positions to read
        (> max(pos)), so short sequences read less. Returns logits (B, V) and the new keys and
        values (B, n_layer, 2, H, D), which the caller writes at (row, pos): as a pure function
        the step gives torch.compile nothing to turn into copies of the cache. write_kv=True
        (the engine) writes them into the cache itself and returns None for them: on the
        kernels the qkv matmul stores them as it makes them, which saves a stacking copy per
        layer and the caller's scatter."""
        x = self.transformer.wte(tokens) + self.transformer.wpe(pos)  # (B, C)
        B = tokens.size(0)
        new_kv = []
        fused = DECODE_KERNELS == "triton" and decode_kernels.supports(x)
        for i, block in enumerate(self.transformer.h):
            if fused:  # the attention kernel reads each row's first pos[b] positions itself
                x, kv = block.decode_fused(x, cache, i, pos, write_kv)
            else:
                x, kv = block.decode(x, cache[i, 0, :B, :, :length], cache[i, 1, :B, :, :length], pos)
            new_kv.append(kv)
        if fused:
            logits = decode_kernels.linear_module(x, self.lm_head, ln=self.transformer.ln_f)
        else:
            logits = self.lm_head(self.transformer.ln_f(x))
        if new_kv[0] is None:  # written by the qkv kernels
            return logits, None
        new_kv = torch.stack(new_kv).permute(2, 0, 1, 3, 4)
        if not write_kv:
            return logits, new_kv
        cache[:, :, torch.arange(B, device=x.device), :, pos] = new_kv.to(cache.dtype)
        return logits, None

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


# -----------------------------------------------------------------------------
# lm_head + cross-entropy in row chunks: the (N, V) logits are never materialised

FUSED_LOSS_CHUNK_ROWS = 8192  # x 50304 vocab in bf16: ~0.8 GB of logits per chunk


def _chunk_loss_and_grad(logits: torch.Tensor, targets: torch.Tensor, ignore_index: int,
                         with_grad: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    """logits (n, V) in the compute dtype, targets (n,) -> (sum of the n losses in float32,
    d(sum)/d(logits) = softmax - onehot in the logits' dtype, zero on ignored rows)."""
    valid = (targets != ignore_index)[:, None]  # (n, 1)
    logits_f = logits.float()
    lse = torch.logsumexp(logits_f, dim=-1, keepdim=True)  # (n, 1)
    target_logit = logits.gather(1, targets.clamp(min=0)[:, None]).float()  # (n, 1)
    loss_sum = torch.where(valid, lse - target_logit, 0.0).sum()
    if not with_grad:
        return loss_sum, None
    # The one-hot as a comparison, not a scatter: one pointwise pass once compiled.
    onehot = torch.arange(logits.size(1), device=logits.device)[None, :] == targets[:, None]
    grad = torch.where(valid, torch.exp(logits_f - lse) - onehot.float(), 0.0)
    return loss_sum, grad.to(logits.dtype)


@functools.cache
def _compiled_chunk_loss_and_grad() -> Callable:
    # Eager, the chunk's float32 softmax would take several (n, V) passes through memory;
    # compiled it is one reduction and one pointwise kernel.
    return torch.compile(_chunk_loss_and_grad, dynamic=False)


def _chunk_fn(device: torch.device) -> Callable:
    # Under torch.compile of the whole model the plain function is traced into its graph;
    # a nested compile only pays off on the GPU of an eager model.
    if device.type == "cuda" and not torch.compiler.is_compiling():
        return _compiled_chunk_loss_and_grad()
    return _chunk_loss_and_grad


class FusedLinearCrossEntropy(torch.autograd.Function):
    """mean cross-entropy of (x @ weight.T) against targets, chunk by chunk over the rows.

    The forward computes each chunk's logits, its loss (float32 logsumexp) and at once the
    gradients w.r.t. x and weight; the chunk's logits are then dropped. The backward only
    scales the saved gradients by grad_output / n_valid (scaling last keeps float16 softmax
    gradients from underflowing). Use `fused_linear_cross_entropy`, which picks the dtype."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                compute_dtype: torch.dtype, chunk_rows: int, ignore_index: int) -> torch.Tensor:
        N = x.size(0)
        chunk_loss_and_grad = _chunk_fn(x.device)
        with torch.autocast(x.device.type, enabled=False):
            x_c, w_c = x.to(compute_dtype), weight.to(compute_dtype)  # (N, C), (V, C)
            grad_x = torch.empty_like(x)  # (N, C)
            grad_w = None  # (V, C) float32: the chunks' sum, rounded to weight.dtype once at the end
            loss_sum = torch.zeros((), dtype=torch.float32, device=x.device)
            for start in range(0, N, chunk_rows):
                x_chunk = x_c[start:start + chunk_rows]  # (n, C)
                logits = x_chunk @ w_c.t()  # (n, V)
                chunk_loss, grad_logits = chunk_loss_and_grad(
                    logits, targets[start:start + chunk_rows], ignore_index, True)
                loss_sum = loss_sum + chunk_loss
                grad_x[start:start + chunk_rows] = grad_logits @ w_c
                chunk_grad_w = (grad_logits.t() @ x_chunk).float()
                grad_w = chunk_grad_w if grad_w is None else grad_w.add_(chunk_grad_w)
        n_valid = (targets != ignore_index).sum()
        ctx.save_for_backward(grad_x, grad_w.to(weight.dtype), n_valid)
        return loss_sum / n_valid

    @staticmethod
    def backward(ctx: Any, grad_output: torch.Tensor):
        grad_x, grad_w, n_valid = ctx.saved_tensors
        scale = grad_output / n_valid
        return grad_x * scale.to(grad_x.dtype), grad_w * scale.to(grad_w.dtype), None, None, None, None


def fused_linear_cross_entropy(x: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                               chunk_rows: int = FUSED_LOSS_CHUNK_ROWS,
                               ignore_index: int = -1) -> torch.Tensor:
    """F.cross_entropy(x @ weight.T, targets, ignore_index=...) without the (N, V) logits.

    x (N, C) hidden states, weight (V, C) the lm_head (tied or not: its gradient goes to
    whatever parameter it is), targets (N,). Under autocast the logits are computed in the
    autocast dtype, as F.linear would; the loss is float32 either way."""
    if torch.is_autocast_enabled(x.device.type):
        compute_dtype = torch.get_autocast_dtype(x.device.type)
    else:
        compute_dtype = torch.promote_types(x.dtype, weight.dtype)
    if torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad):
        return FusedLinearCrossEntropy.apply(x, weight, targets, compute_dtype, chunk_rows, ignore_index)
    # No gradient wanted (evaluation): the same chunks, loss only.
    chunk_loss = _chunk_fn(x.device)
    with torch.autocast(x.device.type, enabled=False):
        x_c, w_c = x.to(compute_dtype), weight.to(compute_dtype)
        loss_sum = torch.zeros((), dtype=torch.float32, device=x.device)
        for start in range(0, x.size(0), chunk_rows):
            chunk, _ = chunk_loss(x_c[start:start + chunk_rows] @ w_c.t(),
                                  targets[start:start + chunk_rows], ignore_index, False)
            loss_sum = loss_sum + chunk
    return loss_sum / (targets != ignore_index).sum()
