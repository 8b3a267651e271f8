"""PEQA (Kim et al., 2023): parameter-efficient tuning of a quantized model by its scales alone.

Every integer-quantized linear keeps its codes and zero points frozen; only its per-group (or
per-channel) scales train, ``W = s * (q - z)``, so ``dW/ds = q - z`` (no rounding in the path).  A task is
the set of trained scales: a small safetensors file (``save_task``), and switching tasks copies another
file's scales in place (``load_task``); the codes are shared by every task.  ``convert_peqa`` gives back
typed quantized layers holding the tuned scales, which every exporter takes.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import save_file

from lowbit.atomic import atomic_file
from lowbit.errors import LowbitError
from lowbit.packed.intweight import IntWeight, expand_groups, int_weight_of
from lowbit.packed.qlinear import QuantLinear
from lowbit.quantized_layers import QuantizedWeight, convert_modules, is_quantized, quantized_linear, quantized_weight

TASK_FORMAT = "lowbit-peqa-scales"


class ScaleTunedLinear(torch.nn.Module):
    """An integer-quantized linear whose scales are the only trainable parameter."""

    def __init__(self, w: IntWeight, bias: torch.Tensor | None, spec: object = None) -> None:
        super().__init__()
        if w.g_idx is not None:
            raise LowbitError("act-order codes (g_idx) are not supported by PEQA; quantize with static groups")
        self.bits, self.group_size, self.spec = w.bits, w.group_size, spec
        self.register_buffer("codes", w.codes.clone())
        self.register_buffer("zero", None if w.zero is None else w.zero.clone())
        self.register_buffer("bias", None if bias is None else bias.detach().clone())
        self.scale = torch.nn.Parameter(w.scale.detach().float().clone())

    def _integers(self) -> torch.Tensor:
        q = self.codes.float()
        if self.zero is not None:
            q = q - expand_groups(self.zero.float(), self.group_size, None, q.shape[1])
        return q

    def weight_value(self) -> torch.Tensor:
        """``s * (q - z)``, differentiable in ``s``."""
        return self._integers() * expand_groups(self.scale, self.group_size, None, self.codes.shape[1])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight_value().to(x.dtype), None if self.bias is None else self.bias.to(x.dtype))

    def int_weight(self) -> IntWeight:
        return IntWeight(self.codes.clone(), self.scale.detach().clone(), None if self.zero is None else
                         self.zero.clone(), self.bits, self.group_size)

    def convert(self, dtype: torch.dtype = torch.float32, method: str = "peqa") -> torch.nn.Linear:
        """A plain linear holding the codes with the current scales, as a typed quantized layer."""
        return quantized_linear(QuantizedWeight(self.int_weight(), self.spec, method), self.bias, dtype)


def _int_layer(m: torch.nn.Module) -> bool:
    """A layer lowbit quantized (in memory) or a packed one read back from a checkpoint."""
    return isinstance(m, QuantLinear) or (isinstance(m, torch.nn.Linear) and is_quantized(m))


def prepare_peqa(model: torch.nn.Module, names: Iterable[str] | None = None) -> dict[str, ScaleTunedLinear]:
    """Swap every integer-quantized linear (or those of ``names``) for a ``ScaleTunedLinear`` and freeze
    everything else."""
    for p in model.parameters():
        p.requires_grad_(False)
    wanted = None if names is None else set(names)
    layers = {n: m for n, m in model.named_modules() if _int_layer(m) and (wanted is None or n in wanted)}
    if not layers:
        raise LowbitError("PEQA tunes the scales of integer-quantized layers, and this model has none; quantize it "
                          "first (e.g. lowbit quantize --recipe gptq-w4g64)")
    out = {}
    for name, layer in layers.items():
        try:
            iw = layer.int_weight() if isinstance(layer, QuantLinear) else int_weight_of(layer)
        except LowbitError as e:
            raise LowbitError(f"{name}: {e}; PEQA needs integer codes") from None
        qw = quantized_weight(layer)
        device = iw.codes.device
        out[name] = ScaleTunedLinear(iw, layer.bias, None if qw is None else qw.spec).to(device)
        model.set_submodule(name, out[name])
    return out


def task_scales(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The trained scales of every ``ScaleTunedLinear``, by layer name."""
    return {n: m.scale.detach().clone() for n, m in model.named_modules() if isinstance(m, ScaleTunedLinear)}


def save_task(model: torch.nn.Module, path: str | Path) -> int:
    """Write the model's scales as one task file (atomic); returns its size in bytes."""
    scales = task_scales(model)
    if not scales:
        raise LowbitError("no PEQA layers in this model; call prepare_peqa first")
    with atomic_file(path) as tmp:
        save_file({f"{n}.scale": s.contiguous() for n, s in scales.items()}, str(tmp),
                  metadata={"format": TASK_FORMAT})
    return Path(path).stat().st_size


@torch.no_grad()
def load_task(model: torch.nn.Module, path: str | Path) -> None:
    """Copy a task file's scales into the model's ``ScaleTunedLinear`` layers (in place)."""
    layers = {n: m for n, m in model.named_modules() if isinstance(m, ScaleTunedLinear)}
    with safe_open(str(path), framework="pt") as f:
        if (f.metadata() or {}).get("format") != TASK_FORMAT:
            raise LowbitError(f"{path} is not a PEQA task file (no '{TASK_FORMAT}' format tag)")
        names = {k[: -len(".scale")] for k in f.keys() if k.endswith(".scale")}
        if names != set(layers):
            missing, extra = sorted(set(layers) - names)[:3], sorted(names - set(layers))[:3]
            raise LowbitError(f"{path} holds scales for other layers (missing {missing}, unexpected {extra}): it was "
                              "trained on another model or quantization")
        for n, m in layers.items():
            s = f.get_tensor(f"{n}.scale")
            if s.shape != m.scale.shape:
                raise LowbitError(f"{path}: {n}.scale is {tuple(s.shape)}, the model's is {tuple(m.scale.shape)}")
            m.scale.copy_(s)


def convert_peqa(model: torch.nn.Module, dtype: torch.dtype = torch.float32, method: str = "peqa") -> list[str]:
    """Swap every ``ScaleTunedLinear`` back for a typed quantized linear with its current scales, recorded as
    made by ``method``."""
    return convert_modules(model, ScaleTunedLinear, dtype, method=method)
