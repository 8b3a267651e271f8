"""Typed quantized layers: what a rounding step left on a layer, as one typed value on a typed module.

When a step rounds a layer, the layer becomes a ``QuantizedModule`` (its class is swapped in place
for a subclass of its own, ``QuantizedLinear`` for ``torch.nn.Linear``: parameters, hooks, names and
``isinstance`` checks are unchanged, so every transformers / peft consumer keeps working) holding one
``QuantizedWeight``:

* ``form``: the stored weight in a typed normal form that exporters dispatch on: ``IntWeight`` /
  ``FloatWeight`` (``lowbit.packed``), or core's ``IntQuantized`` / ``FloatQuantized`` /
  ``CodebookQuantized``; None for a form only its step knows (SpQR's quantized statistics, QoQ's
  two levels), which exports as fake-quant;
* ``int_refusal``: why the weight has no integer-code form although ``form`` looks like one
  (fractional zero points, full-precision outlier columns), said by the step that made it;
* ``details``: the step's own record (AWQ scales, the damping GPTQ used): never read by exporters.

The layer's ``weight`` parameter holds the dequantized (fake-quant) weight.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from lowbit.spec import QuantSpec


@dataclass
class QuantizedWeight:
    """One layer's stored weight as a step produced it (module docstring)."""

    form: Any
    spec: QuantSpec | None
    method: str
    details: dict[str, Any] = field(default_factory=dict)
    int_refusal: str | None = None


class QuantizedModule:
    """Mixin of the typed quantized layers; ``quantized`` is the layer's ``QuantizedWeight``."""

    quantized: QuantizedWeight

    def extra_repr(self) -> str:  # type: ignore[override]
        base = super().extra_repr()  # type: ignore[misc]
        q = self.quantized
        return f"{base}, method={q.method}, form={type(q.form).__name__}"


class QuantizedLinear(QuantizedModule, torch.nn.Linear):
    """A ``torch.nn.Linear`` a step rounded."""


_CLASSES: dict[type, type] = {torch.nn.Linear: QuantizedLinear}


def quantized_class(cls: type) -> type:
    """The typed quantized subclass of a layer class (made once per class, e.g. for GPT-2's Conv1D,
    and published in this module so models holding it pickle)."""
    if issubclass(cls, QuantizedModule):
        return cls
    q = _CLASSES.get(cls)
    if q is None:
        name = f"Quantized{cls.__name__}"
        q = type(name, (QuantizedModule, cls), {"__module__": __name__, "__qualname__": name,
                                                 "__doc__": f"A ``{cls.__module__}.{cls.__name__}`` a step rounded."})
        globals()[name] = q
        _CLASSES[cls] = q
    return q


def mark_quantized(layer: torch.nn.Module, weight: QuantizedWeight) -> torch.nn.Module:
    """Make ``layer`` (in place) the typed quantized module holding ``weight``; returns it."""
    layer.__class__ = quantized_class(type(layer))
    layer.quantized = weight
    return layer


def quantized_linear(weight: QuantizedWeight, bias: torch.Tensor | None, dtype: torch.dtype = torch.float32
                     ) -> QuantizedLinear:
    """A new typed linear holding ``weight``: its ``weight`` parameter is the form dequantized (an
    ``IntWeight``, or any ``lowbit.core`` quantized tensor: int, float, codebook), its bias a copy of ``bias``."""
    form = weight.form
    if hasattr(form, "layout"):  # IntQuantized / FloatQuantized / CodebookQuantized
        from lowbit.core.quant import dequantize

        dense = dequantize(form).to(dtype)
    else:  # IntWeight
        dense = form.dequantize(dtype)
    out_f, in_f = dense.shape
    layer = torch.nn.Linear(in_f, out_f, bias=bias is not None, dtype=dtype)
    with torch.no_grad():
        layer.weight.copy_(dense)
        if bias is not None:
            layer.bias.copy_(bias.detach())
    return mark_quantized(layer, weight)


def convert_modules(model: torch.nn.Module, cls: type, dtype: torch.dtype = torch.float32, **kw: object) -> list[str]:
    """Swap every ``cls`` module of ``model`` for what its ``convert(dtype, **kw)`` returns; their names."""
    names = [n for n, m in model.named_modules() if isinstance(m, cls)]
    for name in names:
        model.set_submodule(name, model.get_submodule(name).convert(dtype, **kw))
    return names


def quantized_weight(layer: torch.nn.Module) -> QuantizedWeight | None:
    """The layer's ``QuantizedWeight``, or None when no step rounded it."""
    return layer.quantized if isinstance(layer, QuantizedModule) else None


def is_quantized(layer: torch.nn.Module) -> bool:
    """Whether a lowbit step rounded this layer (in this process, or codes read back from disk)."""
    return isinstance(layer, QuantizedModule)
