"""QLoRA (Dettmers et al., 2023): LoRA adapters trained on a frozen 4-bit base.

The base linears are stored as NF4 codes with double-quantized block scales (lowbit's core codebook
format: blocks of 64, the fp32 absmax of each block quantized to 8 bits in blocks of 256, 4.127 bits per
weight) in ``FrozenQuantLinear``, which dequantizes on the fly and holds no full-precision weight.
Adapters come from ``peft``: ``FrozenQuantLinear`` is registered with peft's custom-module mechanism and
wrapped by peft's own LoRA linear, so ``save_pretrained`` writes a standard peft adapter that plain peft
loads on the full-precision base (same module names).  Any lowbit-quantized base (GPTQ / AWQ int4 typed
layers) works the same way with ``quantize=False``.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
import torch.nn.functional as F

from lowbit.core.codebooks import CodebookQuantized, dequantize_codebook, quantize_codebook, storage_bits_per_weight
from lowbit.errors import LowbitError
from lowbit.spec import QuantSpec, preset


class _FrozenMatmul(torch.autograd.Function):
    """``x @ W^T`` whose backward dequantizes ``W`` again instead of keeping it: only the codes stay in
    memory between forward and backward (QLoRA's memory saving; the base gets no gradient)."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, layer: "FrozenQuantLinear") -> torch.Tensor:
        ctx.layer = layer
        return F.linear(x, layer.dequantized_weight().to(x.dtype))

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        return grad @ ctx.layer.dequantized_weight().to(grad.dtype), None


class FrozenQuantLinear(torch.nn.Module):
    """A linear whose weight lives only as codebook codes (dequantized per forward); not trainable."""

    def __init__(self, qt: CodebookQuantized, bias: torch.Tensor | None) -> None:
        super().__init__()
        self.qt = qt
        self.out_features, self.in_features = qt.layout.shape
        self.register_buffer("qweight", qt.codes)  # peft reads the device from here
        self.register_buffer("bias", None if bias is None else bias.detach().clone())

    @classmethod
    def from_linear(cls, layer: torch.nn.Linear, spec: QuantSpec) -> "FrozenQuantLinear":
        return cls(quantize_codebook(layer.weight.detach().float(), spec), layer.bias)

    def dequantized_weight(self) -> torch.Tensor:
        return dequantize_codebook(self.qt)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = _FrozenMatmul.apply(x, self)
        return out if self.bias is None else out + self.bias.to(x.dtype)

    def bits_per_weight(self) -> float:
        return storage_bits_per_weight(self.qt)


def quantize_base(model: torch.nn.Module, names: Iterable[str], spec: QuantSpec | None = None) -> float:
    """Replace each named ``nn.Linear`` by a ``FrozenQuantLinear`` (NF4 + double quant by default); returns
    the base's bits per weight over those layers."""
    spec = spec or preset("NF4")
    bits = weights = 0.0
    for name in names:
        layer = model.get_submodule(name)
        if not isinstance(layer, torch.nn.Linear):
            raise LowbitError(f"{name} is a {type(layer).__name__}; QLoRA quantizes torch.nn.Linear layers")
        q = FrozenQuantLinear.from_linear(layer, spec)
        model.set_submodule(name, q)
        n = layer.weight.numel()
        bits, weights = bits + q.bits_per_weight() * n, weights + n
    return bits / max(weights, 1)


def add_lora(model: torch.nn.Module, targets: list[str], r: int = 8, alpha: int = 16, dropout: float = 0.0) -> Any:
    """Wrap ``model`` with peft LoRA adapters on the ``targets`` (module-name suffixes, e.g. ``q_proj``); the
    quantized base layers are registered with peft's custom-module mechanism."""
    try:
        from peft import LoraConfig, get_peft_model
        from peft.tuners.lora.layer import Linear as LoraLinear
    except ImportError:
        raise LowbitError("LoRA / QLoRA needs peft: pip install 'lowbit[training]'") from None
    config = LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout, target_modules=targets, bias="none")
    config._register_custom_module({FrozenQuantLinear: LoraLinear})
    return get_peft_model(model, config)
