"""``FakeQuantLinear``: the training form of an integer-quantized linear layer.

It holds the latent full-precision weight, per-group scales and (asymmetric specs) zero points as
parameters, in the signed code convention of ``IntWeight`` (codes in ``[-2^(b-1), 2^(b-1))``,
``W = s * (q - z)``); its forward uses the LSQ fake-quantized weight (``lowbit.core.lsq``), so the
weight, the scales and the zero points all train.  It starts from a round-to-nearest min-max range
or from the codes a PTQ step produced (GPTQ, AWQ: ``prepare_fake_quant`` on an already quantized
model), and ``convert`` gives back a plain linear holding the trained ``IntWeight`` as a typed
quantized layer, so every exporter takes a trained model unchanged.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
import torch.nn.functional as F

from lowbit.activations.attach import act_quantizer_of, attach_input_quantizer
from lowbit.core.lsq import fake_quant_lsq, lsq_codes, lsq_grad_factor
from lowbit.core.quant import dequantize, quantize
from lowbit.core.ste import straight_through
from lowbit.errors import LowbitError
from lowbit.packed.intweight import IntWeight, int_weight_from_quantized, int_weight_of
from lowbit.quantized_layers import QuantizedWeight, convert_modules, is_quantized, quantized_linear
from lowbit.spec import QuantSpec


_SCALE_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16}


FITTED_CODEBOOKS = ("kmeans", "bcq")  # tables fitted to each layer: no gradient reaches them


def check_trainable_spec(spec: QuantSpec, learn_range: bool = True) -> None:
    """LowbitError unless fake-quant training can hold ``spec``: learnable ranges (LSQ) take int specs with
    group or channel granularity; min-max ranges (``learn_range=False``) any int, float or fixed-table codebook."""
    if not learn_range:
        if spec.type == "codebook" and spec.fmt in FITTED_CODEBOOKS:
            raise LowbitError(f"the {spec.fmt} codebook is fitted to each layer's weights, so no gradient reaches its "
                              "table and training cannot keep it; train with nf4, an int or a float spec")
        return
    if spec.type != "int" or spec.granularity not in ("group", "channel"):
        raise LowbitError(f"learnable-range (LSQ) training takes int specs with group or channel granularity, not "
                          f"{spec.type} {spec.granularity}; use e.g. W4_G64, or min-max ranges (learn_range: false) "
                          "for float and nf4 specs")
    if spec.scale_dtype not in ("float32", *_SCALE_DTYPES):
        raise LowbitError(f"fake-quant training keeps float32, float16 or bfloat16 scales, not {spec.scale_dtype}")


class FakeQuantLinear(torch.nn.Module):
    """A linear layer whose weight is fake-quantized with learnable scales and zero points (or min-max ranges)."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, init: IntWeight | None, spec: QuantSpec,
                 grad_scaling: bool = True, learn_range: bool = True) -> None:
        super().__init__()
        check_trainable_spec(spec, learn_range)
        self.spec = spec
        self.learn_range = learn_range
        self.weight = torch.nn.Parameter(weight.detach().float().clone())
        self.bias = None if bias is None else torch.nn.Parameter(bias.detach().clone())
        self.scale = self.zero = None
        self.bits, self.group_size = spec.bits, spec.group_size
        if not learn_range:
            return
        if init is None:
            raise LowbitError("learnable ranges start from integer codes: pass init (an IntWeight)")
        if init.g_idx is not None:
            raise LowbitError("act-order codes (g_idx) cannot be trained in place; quantize with act_order: false "
                              "or static_groups: true")
        self.bits = init.bits
        self.group_size = init.group_size or weight.shape[1]
        if weight.shape[1] % self.group_size:
            raise LowbitError(f"group size {self.group_size} does not divide {weight.shape[1]} input features")
        self.scale = torch.nn.Parameter(init.scale.detach().float().clone())  # (out, n_groups)
        self.zero = None if init.zero is None else torch.nn.Parameter(init.zero.detach().float().clone())
        self.qmin, self.qmax = -(1 << (self.bits - 1)), (1 << (self.bits - 1)) - 1
        self.grad_factor = lsq_grad_factor(self.group_size, self.qmax) if grad_scaling else 1.0

    @classmethod
    def from_linear(cls, layer: torch.nn.Module, spec: QuantSpec, grad_scaling: bool = True,
                    learn_range: bool = True) -> "FakeQuantLinear":
        """Start from the layer's own codes when a step already rounded it, else from RTN min-max."""
        check_trainable_spec(spec, learn_range)
        w = layer.weight.data
        init = None
        if learn_range:
            init = int_weight_of(layer) if is_quantized(layer) else int_weight_from_quantized(quantize(w.float(), spec))
        return cls(w, layer.bias.data if layer.bias is not None else None, init, spec, grad_scaling, learn_range)

    def _stored_scale(self) -> torch.Tensor:
        """The scale as the spec stores it (fp16 / bf16 scales rounded, the gradient straight through), so
        what trains is what exports (GGUF's fp16 block scales hold the codes exactly)."""
        dtype = _SCALE_DTYPES.get(self.spec.scale_dtype)
        return self.scale if dtype is None else straight_through(self.scale, self.scale.to(dtype).float())

    def _grouped(self, t: torch.Tensor) -> torch.Tensor:
        return t.reshape(t.shape[0], -1, self.group_size)

    def fake_weight(self) -> torch.Tensor:
        """The fake-quantized weight (differentiable in weight, scale and zero)."""
        if not self.learn_range:
            w = self.weight
            return straight_through(w, dequantize(quantize(w.detach(), self.spec)).to(w.dtype))
        z = None if self.zero is None else self.zero.unsqueeze(-1)
        wq = fake_quant_lsq(self._grouped(self.weight), self._stored_scale().unsqueeze(-1), z, self.qmin, self.qmax,
                            self.grad_factor)
        return wq.reshape(self.weight.shape)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.fake_weight().to(x.dtype), None if self.bias is None else self.bias.to(x.dtype))

    def int_weight(self) -> IntWeight:
        """The trained codes, scales and zero points as an ``IntWeight`` (dequantizes to ``fake_weight``)."""
        if not self.learn_range:
            return int_weight_from_quantized(quantize(self.weight.detach(), self.spec))
        z = None if self.zero is None else self.zero.detach().unsqueeze(-1)
        scale = self._stored_scale().detach()
        q, zr = lsq_codes(self._grouped(self.weight.detach()), scale.unsqueeze(-1), z, self.qmin, self.qmax)
        codes = q.reshape(self.weight.shape).to(torch.int8)
        zero = None if zr is None else zr.squeeze(-1).clamp(self.qmin, self.qmax).to(torch.int8)
        return IntWeight(codes, scale.float().clone(), zero, self.bits,
                         self.group_size if self.spec.granularity == "group" else None)

    def convert(self, dtype: torch.dtype = torch.float32, method: str = "qat") -> torch.nn.Linear:
        """A plain linear with the trained weight on its grid, as a typed quantized layer."""
        form = self.int_weight() if self.spec.type == "int" else quantize(self.weight.detach(), self.spec)
        return quantized_linear(QuantizedWeight(form, self.spec, method), self.bias, dtype)

    def extra_repr(self) -> str:
        return (f"in={self.weight.shape[1]}, out={self.weight.shape[0]}, {self.spec.type} bits={self.bits}, "
                f"group={self.group_size}, ranges={'learned' if self.learn_range else 'min-max'}")


def prepare_fake_quant(model: torch.nn.Module, names: Iterable[str], spec: QuantSpec,
                       grad_scaling: bool = True, learn_range: bool = True) -> dict[str, FakeQuantLinear]:
    """Swap each named linear for a ``FakeQuantLinear`` (in place; an input quantizer on the layer moves
    with it); returns them by name."""
    out = {}
    for name in names:
        layer = model.get_submodule(name)
        if not isinstance(layer, torch.nn.Linear):
            raise LowbitError(f"{name} is a {type(layer).__name__}; fake-quant training swaps torch.nn.Linear layers")
        out[name] = FakeQuantLinear.from_linear(layer, spec, grad_scaling, learn_range).to(layer.weight.device)
        _move_input_quantizer(layer, out[name])
        model.set_submodule(name, out[name])
    return out


def convert_fake_quant(model: torch.nn.Module, dtype: torch.dtype = torch.float32, method: str = "qat") -> list[str]:
    """Swap every ``FakeQuantLinear`` back for its typed quantized linear (input quantizers kept); returns
    their names."""
    names = [n for n, m in model.named_modules() if isinstance(m, FakeQuantLinear)]
    olds = [model.get_submodule(n) for n in names]
    convert_modules(model, FakeQuantLinear, dtype, method=method)
    for name, old in zip(names, olds):
        _move_input_quantizer(old, model.get_submodule(name))
    return names


def _move_input_quantizer(src: torch.nn.Module, dst: torch.nn.Module) -> None:
    """``dst`` quantizes its inputs as ``src`` did (activation fake quantization trains along)."""
    q = act_quantizer_of(src)
    if q is not None:
        attach_input_quantizer(dst, q)
