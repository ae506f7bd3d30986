"""Post-training weight quantization of the GPT: quantized Linear modules, the quantized state
dict, and rebuilding a model from it (gpt-fast's two phases: quantize once into plain tensors,
then build the model from those tensors; loading never re-quantizes and never unpickles).

Modes (the `mode` of `meta["quantization"]`):
    int8-dynamic      CPU serving. Per-output-channel int8 weights run by torch.ao's dynamic
                      quantized Linear (fbgemm/oneDNN int8 GEMM; activations are quantized on
                      the fly per call). Stored as int8 weight + float64 scales + zero points.
    int8-weight-only  GPU serving. Per-output-channel symmetric int8 weights, dequantized inside
                      the matmul: for 1-16 rows on CUDA one Triton kernel (decode_kernels.py), else
                      F.linear(x, w.to(x.dtype)) * scales.
    int4-weight-only  Group-wise asymmetric 4-bit weights packed two per byte, dequantized in
                      forward. Known to cost a 124M model real perplexity: quantize_model.py
                      only writes it if it passes the quality gate.

What a quantized checkpoint holds (all in model.safetensors, see checkpoint.py):
    <linear>.qweight, <linear>.scales[, .zero_points | .zeros][, .bias]   every nn.Linear
    transformer.wpe.qweight / .scales                                     int8, per row
    LayerNorm weights and biases                                          float, as trained
There is no transformer.wte.weight: the embedding is tied to lm_head, so the file stores that
matrix once, as lm_head's int8 rows + per-row scales (int8 modes), and the float embedding is
*dequantized* from them at load. Both the head and the lookup then see the same quantized
values. (int4 stores the head as int4; the embedding is its dequantized copy, as in int8.)
"""
from __future__ import annotations

import contextlib
import copy
import logging
import math
import warnings
from typing import Any, Iterator

import numpy as np
import torch
import torch.nn as nn
from torch.nn import functional as F

import decode_kernels
from checkpoint import CheckpointError
from model import GPT, GPTConfig

log = logging.getLogger(__name__)

MODES = ("int8-dynamic", "int8-weight-only", "int4-weight-only")
DEFAULT_GROUP_SIZE = 64
# Float embeddings that the file holds as quantized rows instead (see the module docstring).
EMBEDDINGS = ("transformer.wte.weight", "transformer.wpe.weight")


class QuantizationError(ValueError):
    """A mode, group size or model shape that cannot be quantized as asked."""


@contextlib.contextmanager
def _quiet_torch_ao() -> Iterator[None]:
    # torch.ao.quantization warns on every call that it is deprecated in favour of torchao
    # (not installed here; torch 2.13 still ships and runs the eager path we use), and the
    # quantized-tensor constructors warn about quint8 on some backends. Both are noise for a
    # user of quantize_model.py; silence exactly those, nothing else.
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r"torch\.ao\.quantization is deprecated",
                                category=DeprecationWarning)
        warnings.filterwarnings("ignore", message=r"torch\.quantize_per_tensor, torch\.quantize_per_channel",
                                category=UserWarning)
        yield


# ---------------------------------------------------------------------------------------------
# quantizers: float weight -> plain integer tensors + scales

def quantize_int8_per_channel(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric per-output-row int8: (q int8 (out, in), scales float32 (out,)); w ~ q * scale."""
    w = weight.detach().float()
    # clamp: an all-zero row would give scale 0 and 0/0 below
    scales = w.abs().amax(dim=1).clamp_min(1e-12) / 127.0
    q = torch.round(w / scales[:, None]).clamp(-127, 127).to(torch.int8)
    return q, scales


def quantize_int4_grouped(weight: torch.Tensor, group_size: int
                          ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Asymmetric int4 per group of `group_size` input columns.

    Returns (packed uint8 (out, in // 2), scales (out, in // group), mins (out, in // group))
    with w ~ q * scale + min, q in [0, 15]; column 2j is the low nibble of byte j, 2j+1 the high.
    """
    out_f, in_f = weight.shape
    if group_size < 2 or group_size % 2 or in_f % group_size:
        raise QuantizationError(f"group size {group_size} must be even and divide the input "
                                f"width {in_f}")
    w = weight.detach().float().reshape(out_f, in_f // group_size, group_size)
    lo, hi = w.amin(dim=2), w.amax(dim=2)
    scales = (hi - lo).clamp_min(1e-12) / 15.0
    q = torch.round((w - lo[..., None]) / scales[..., None]).clamp(0, 15).to(torch.uint8)
    q = q.reshape(out_f, in_f)
    packed = q[:, 0::2] | (q[:, 1::2] << 4)
    return packed, scales, lo


def unpack_int4(packed: torch.Tensor) -> torch.Tensor:
    """(out, in // 2) uint8 -> (out, in) uint8 values in [0, 15]."""
    return torch.stack((packed & 0x0F, packed >> 4), dim=-1).reshape(packed.shape[0], -1)


# ---------------------------------------------------------------------------------------------
# quantized Linear modules (all built from plain tensors, never from pickles)

def int8_linear(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor,
                bias: torch.Tensor | None) -> torch.Tensor:
    """x @ (int8 weight * per-row scale).T (+ bias), the weight dequantised inside the matmul."""
    y = F.linear(x, qweight.to(x.dtype)) * scales.to(x.dtype)
    return y if bias is None else y + bias.to(x.dtype)


class WeightOnlyInt8Linear(nn.Module):
    """y = (x @ q.T) * scales + bias with q int8 (out, in): gpt-fast's WeightOnlyInt8Linear.

    Weight bytes are a quarter of fp32 (half of bf16); where decode is memory-bound, reading
    int8 and converting in registers is the speed-up (see forward). Scales and bias follow the
    model's float dtype (`model.to(torch.bfloat16)` casts them; the int8 stays int8)."""

    def __init__(self, qweight: torch.Tensor, scales: torch.Tensor, bias: torch.Tensor | None):
        super().__init__()
        self.out_features, self.in_features = qweight.shape
        self.register_buffer("qweight", qweight)
        self.register_buffer("scales", scales)
        self.register_buffer("bias", bias)
        # the Triton kernel for 1-16 rows on CUDA where Triton is installed; the benchmarks
        # switch it off to measure the plain formula side by side (set_int8_kernel)
        self.triton = decode_kernels.available()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.numel() // self.in_features
        x2d = x.reshape(rows, self.in_features)  # a view: activations are contiguous
        if decode_kernels.on_kernels(x2d, self):
            # Decode-sized inputs: one Triton kernel reads the int8 rows and scales in registers
            # (decode_kernels.py says why Inductor's own code for the formula below was slower than
            # bf16). Under torch.compile the row limit (decode_kernels.INT8_KERNEL_ROWS) is a
            # guard on the batch size: larger batches get their own compiled graph, which takes
            # the plain path.
            y = decode_kernels.linear_op(x2d, self.qweight, self.bias, self.scales, None, None, 1e-5, False, None)
            return y.view(*x.shape[:-1], self.out_features)
        # Everything else (CPU, long prefills, large batches): the plain formula. Eager prefill is
        # captured as CUDA graphs; a separately compiled int8_linear called eagerly there cost
        # ~0.9 ms of host time per call on an H100 (batch-16 int8 was 8-16x slower than bf16).
        return int8_linear(x, self.qweight, self.scales, self.bias)

    def dequantized_weight(self) -> torch.Tensor:
        return self.qweight.float() * self.scales.float()[:, None]

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, int8"


def set_int8_kernel(model: nn.Module, enabled: bool) -> int:
    """Switch the Triton int8 kernel of every WeightOnlyInt8Linear on or off (off: the plain
    formula everywhere, for side-by-side measurements); returns how many modules it set."""
    modules = [m for m in model.modules() if isinstance(m, WeightOnlyInt8Linear)]
    for m in modules:
        m.triton = enabled and decode_kernels.available()
    return len(modules)


class WeightOnlyInt4Linear(nn.Module):
    """Group-wise int4 weights (two per byte), dequantized to x's dtype in every forward."""

    def __init__(self, qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor,
                 bias: torch.Tensor | None):
        super().__init__()
        self.out_features = qweight.shape[0]
        self.in_features = qweight.shape[1] * 2
        self.group_size = self.in_features // scales.shape[1]
        self.register_buffer("qweight", qweight)
        self.register_buffer("scales", scales)
        self.register_buffer("zeros", zeros)  # the group minimum: w = q * scale + zero
        self.register_buffer("bias", bias)

    def dequantized_weight(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        q = unpack_int4(self.qweight).to(dtype).view(self.out_features, -1, self.group_size)
        w = q * self.scales.to(dtype)[..., None] + self.zeros.to(dtype)[..., None]
        return w.view(self.out_features, self.in_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bias = None if self.bias is None else self.bias.to(x.dtype)
        return F.linear(x, self.dequantized_weight(x.dtype), bias)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"int4, group_size={self.group_size}")


def dynamic_int8_linear(qweight: torch.Tensor, scales: torch.Tensor, zero_points: torch.Tensor,
                        bias: torch.Tensor | None) -> nn.Module:
    """A torch.ao dynamic quantized Linear holding exactly these int8 values (no re-quantizing).

    `_make_per_channel_quantized_tensor` wraps the stored ints as a quantized tensor as they
    are; it is underscored but public in torch's API listing and stable across 1.x-2.13 (torch
    is pinned in requirements.txt)."""
    from torch.ao.nn.quantized.dynamic import Linear as DynamicLinear

    out_f, in_f = qweight.shape
    with _quiet_torch_ao():
        module = DynamicLinear(in_f, out_f, bias_=bias is not None, dtype=torch.qint8)
        qw = torch._make_per_channel_quantized_tensor(qweight, scales.double(),
                                                      zero_points.long(), 0)
        module.set_weight_bias(qw, None if bias is None else bias.float())
    return module


# ---------------------------------------------------------------------------------------------
# phase 1: float model -> quantized state dict (plain tensors)

def _linear_names(model: nn.Module) -> list[str]:
    return [name for name, m in model.named_modules() if isinstance(m, nn.Linear)]


def _dynamic_quantize(model: GPT) -> dict[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """int8 (weight, scales, zero points) of every Linear as torch.ao's quantize_dynamic makes
    them (per-channel qconfig: a per-tensor scale costs accuracy and buys no speed here)."""
    from torch.ao.quantization import per_channel_dynamic_qconfig, quantize_dynamic

    with _quiet_torch_ao():
        qmodel = quantize_dynamic(copy.deepcopy(model).float(), {nn.Linear: per_channel_dynamic_qconfig},
                                  dtype=torch.qint8)
    out = {}
    for name in _linear_names(model):
        w = qmodel.get_submodule(name).weight()  # a per-channel quantized tensor, axis 0
        out[name] = (w.int_repr().contiguous(), w.q_per_channel_scales().float(),
                     # int8: qint8 zero points lie in [-128, 127]; wider would only pad the file
                     w.q_per_channel_zero_points().to(torch.int8))
    return out


def quantized_state_dict(model: GPT, mode: str, group_size: int = DEFAULT_GROUP_SIZE
                         ) -> dict[str, torch.Tensor]:
    """The tensors a quantized checkpoint stores for `model` (see the module docstring)."""
    if mode not in MODES:
        raise QuantizationError(f"unknown mode {mode!r} (choose from {', '.join(MODES)})")
    dynamic = _dynamic_quantize(model) if mode == "int8-dynamic" else {}
    state: dict[str, torch.Tensor] = {}
    linear_names = _linear_names(model)
    for name in linear_names:
        linear = model.get_submodule(name)
        if mode == "int8-dynamic":
            q, scales, zero_points = dynamic[name]
            state[f"{name}.zero_points"] = zero_points
        elif mode == "int8-weight-only":
            q, scales = quantize_int8_per_channel(linear.weight)
        else:
            q, scales, zeros = quantize_int4_grouped(linear.weight, group_size)
            state[f"{name}.zeros"] = zeros
        state[f"{name}.qweight"] = q
        state[f"{name}.scales"] = scales
        if linear.bias is not None:
            state[f"{name}.bias"] = linear.bias.detach().float()
    # wpe as int8 rows too: weights are what the size target counts. (wte lives in lm_head.)
    state["transformer.wpe.qweight"], state["transformer.wpe.scales"] = \
        quantize_int8_per_channel(model.transformer.wpe.weight)
    skip = {f"{n}.{p}" for n in linear_names for p in ("weight", "bias")} | set(EMBEDDINGS)
    for key, value in model.state_dict().items():
        if key not in skip:  # LayerNorm gains and biases stay float
            state[key] = value.detach().float()
    return {k: v.detach().contiguous().cpu() for k, v in state.items()}


def quantization_meta(mode: str, group_size: int, source: str) -> dict[str, Any]:
    return {"mode": mode, "group_size": group_size if mode == "int4-weight-only" else None,
            "source": source,
            "embeddings": "wte = lm_head's quantized rows, wpe = int8 rows; dequantized to float at load"}


def quantize_model(model: GPT, mode: str, group_size: int = DEFAULT_GROUP_SIZE,
                   source: str = "") -> tuple[GPT, dict[str, torch.Tensor]]:
    """(quantized model, its state dict). The model is built from the state dict exactly as
    loading a saved checkpoint builds it, so what you measure here is what you'll serve."""
    state = quantized_state_dict(model, mode, group_size)
    meta = {"model_config": model.config.to_dict(),
            "quantization": quantization_meta(mode, group_size, source)}
    return build_quantized_model(state, meta), state


# ---------------------------------------------------------------------------------------------
# phase 2: quantized state dict -> model

def _take(state: dict[str, torch.Tensor], key: str, dtype: torch.dtype | tuple[torch.dtype, ...],
          shape: tuple[int, ...]) -> torch.Tensor:
    if key not in state:
        raise CheckpointError(f"quantized checkpoint lacks {key}")
    t = state.pop(key)
    dtypes = dtype if isinstance(dtype, tuple) else (dtype,)
    if t.dtype not in dtypes or tuple(t.shape) != shape:
        raise CheckpointError(f"quantized checkpoint: {key} is {t.dtype} {tuple(t.shape)}, "
                              f"expected {dtypes[0]} {shape}")
    return t


_FLOATS = (torch.float32, torch.bfloat16, torch.float16)


def _build_linear(state: dict[str, torch.Tensor], name: str, linear: nn.Linear, mode: str
                  ) -> nn.Module:
    """The quantized module for `name`, from (and consuming) its entries in `state`."""
    out_f, in_f = linear.out_features, linear.in_features
    bias = _take(state, f"{name}.bias", _FLOATS, (out_f,)) if linear.bias is not None else None
    if mode == "int4-weight-only":
        qweight = _take(state, f"{name}.qweight", torch.uint8, (out_f, in_f // 2))
        scales = state.get(f"{name}.scales")
        groups = scales.shape[-1] if scales is not None and scales.dim() == 2 else 0
        if groups < 1 or in_f % groups or (in_f // groups) % 2:
            raise CheckpointError(f"quantized checkpoint: bad {name}.scales")
        scales = _take(state, f"{name}.scales", _FLOATS, (out_f, groups))
        zeros = _take(state, f"{name}.zeros", _FLOATS, (out_f, groups))
        return WeightOnlyInt4Linear(qweight, scales, zeros, bias)
    qweight = _take(state, f"{name}.qweight", torch.int8, (out_f, in_f))
    scales = _take(state, f"{name}.scales", _FLOATS, (out_f,))
    if mode == "int8-weight-only":
        return WeightOnlyInt8Linear(qweight, scales, bias)
    zero_points = _take(state, f"{name}.zero_points", torch.int8, (out_f,))
    return dynamic_int8_linear(qweight, scales, zero_points, bias)


def dequantized_weight(module: nn.Module) -> torch.Tensor:
    """The float32 (out, in) weight a quantized Linear computes with."""
    if isinstance(module, (WeightOnlyInt8Linear, WeightOnlyInt4Linear)):
        return module.dequantized_weight()
    return module.weight().dequantize().float()  # torch.ao dynamic Linear


def build_quantized_model(state: dict[str, torch.Tensor], meta: dict[str, Any]) -> GPT:
    """A model.GPT whose nn.Linear layers are quantized modules holding the stored integers.

    The embeddings are float (the engine reads wte's device and dtype), dequantized from their
    stored int8 rows. Raises CheckpointError for an unknown mode or tensors that don't fit."""
    info = meta.get("quantization") or {}
    mode = info.get("mode")
    if mode not in MODES:
        raise CheckpointError(f"unknown quantization mode {mode!r} in checkpoint meta")
    try:
        config = GPTConfig(**meta["model_config"])
    except (KeyError, TypeError) as e:
        raise CheckpointError(f"bad model_config in checkpoint meta: {type(e).__name__}") from None
    state = dict(state)  # popped as consumed: what is left over is an unexpected tensor
    # Build the skeleton on the meta device: no 124M random init that we'd throw away.
    with torch.device("meta"):
        model = GPT(config)
    for name in _linear_names(model):
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, _build_linear(state, name, model.get_submodule(name), mode))
    wpe_q = _take(state, "transformer.wpe.qweight", torch.int8, (config.block_size, config.n_embd))
    wpe_s = _take(state, "transformer.wpe.scales", _FLOATS, (config.block_size,))
    state["transformer.wpe.weight"] = wpe_q.float() * wpe_s.float()[:, None]
    state["transformer.wte.weight"] = dequantized_weight(model.lm_head)
    # What is left as parameters are the embeddings and LayerNorms: all float, all required.
    for key, param in list(model.named_parameters()):
        value = _take(state, key, _FLOATS, tuple(param.shape))
        module_name, _, attr = key.rpartition(".")
        setattr(model.get_submodule(module_name), attr, nn.Parameter(value.float(), requires_grad=False))
    if state:
        raise CheckpointError(f"quantized checkpoint holds unexpected tensors {sorted(state)[:3]}")
    return model.eval()


def check_device(meta: dict[str, Any], device: str | torch.device) -> None:
    """CheckpointError if the checkpoint's mode cannot run on `device`: torch.ao's dynamic int8
    kernels (fbgemm/oneDNN) are CPU-only, so an int8-dynamic model on CUDA would fail at its
    first forward, far from the cause. For load_model to call before moving the model."""
    mode = (meta.get("quantization") or {}).get("mode")
    if mode == "int8-dynamic" and torch.device(device).type != "cpu":
        raise CheckpointError(f"an int8-dynamic checkpoint runs on the CPU only, not {device}: "
                              f"quantize with --mode int8-weight-only for a GPU")


# ---------------------------------------------------------------------------------------------
# accounting and quality

def weight_bytes(model: nn.Module) -> int:
    """Bytes of weights resident in memory (parameters + buffers + torch.ao packed weights;
    a tied tensor counted once)."""
    seen: set[int] = set()
    total = 0
    for t in [*model.parameters(), *model.buffers()]:
        if t.data_ptr() not in seen:
            seen.add(t.data_ptr())
            total += t.numel() * t.element_size()
    from torch.ao.nn.quantized.dynamic import Linear as DynamicLinear

    for m in model.modules():
        if isinstance(m, DynamicLinear):
            w, b = m.weight(), m.bias()  # the int8 weight and float bias behind the packing
            total += w.numel() + (b.numel() * b.element_size() if b is not None else 0)
    return total


@torch.no_grad()
def perplexity(model: nn.Module, tokens: np.ndarray, block_size: int, n_windows: int = 16,
               batch_size: int = 4, seed: int = 1234) -> float:
    """exp(mean cross-entropy) over the same `n_windows` windows of `tokens` every call."""
    from data import check_length, eval_batch

    check_length(tokens, block_size, "val.bin")
    device = model.transformer.wte.weight.device
    losses = []
    for index in range(math.ceil(n_windows / batch_size)):
        x, y = eval_batch(tokens, block_size, batch_size, seed, index)
        _, loss = model(x.to(device), targets=y.to(device))
        losses.append(float(loss))
    return math.exp(sum(losses) / len(losses))
