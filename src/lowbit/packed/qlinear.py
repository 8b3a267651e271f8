"""``QuantLinear``: a linear layer that really stores packed integer weights.

Buffers use compressed-tensors' names and layout (``weight_packed`` int32 words,
``weight_scale``, ``weight_zero_point``, ``weight_g_idx``, ``weight_shape``), so exporting and
loading back are plain tensor copies.  ``forward`` runs the kernel picked by ``select_kernel``
at the first call (a short probe on this machine, cached per layer shape; see
``lowbit.packed.kernels``); ``reference_forward`` is dequantize + matmul, the definition every
kernel is tested against.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from lowbit.activations.attach import act_quantizer_of, attach_input_quantizer
from lowbit.activations.quantizer import ActQuantizer
from lowbit.core.packing import pack, to_unsigned
from lowbit.errors import LowbitError
from lowbit.packed import kernels
from lowbit.packed.intweight import IntWeight, int_weight_of
from lowbit.quantized_layers import is_quantized
from lowbit.rotation.online import copy_input_rotation

DECODE_TOKENS = 4  # inputs with at most this many tokens use the decode kernel


class QuantLinear(torch.nn.Module):
    """``y = x @ dequant(W)^T + b`` with ``W`` held as packed ``bits``-bit codes.

    An input quantizer attached to it (``lowbit.activations``) is applied here rather than by the
    hook, so integer kernels (W8A8 ``int8x8``) can take the raw input and quantize it themselves.
    """

    applies_input_quantizer = True

    def __init__(self, w: IntWeight, bias: torch.Tensor | None = None, dtype: torch.dtype = torch.float32,
                 packed: torch.Tensor | None = None):
        """``packed``: the codes already packed (int32 words, as a checkpoint stores them; ``w.codes`` may then be
        a meta tensor), taken as they are instead of packing ``w.codes``."""
        super().__init__()
        out_f, in_f = w.shape
        self.in_features, self.out_features = in_f, out_f
        self.bits, self.group_size, self.dtype = w.bits, w.group_size, dtype
        if packed is None:
            packed = pack(to_unsigned(w.codes, w.bits), w.bits, "int32")
        self.register_buffer("weight_packed", packed.contiguous())
        self.register_buffer("weight_scale", w.scale.clone())
        self.register_buffer("weight_zero_point", None if w.zero is None else w.zero.clone())
        self.register_buffer("weight_g_idx", None if w.g_idx is None else w.g_idx.to(torch.int32).clone())
        self.bias = None if bias is None else torch.nn.Parameter(bias.detach().to(dtype).clone(), requires_grad=False)
        self._int4: tuple[torch.Tensor, torch.Tensor] | None = None
        self._w8t: torch.Tensor | None = None  # int8 (in, out) codes for torch._int_mm
        self._w8: torch.Tensor | None = None  # int8 (out, in) codes for _weight_int8pack_mm
        self.kernel = {"decode": "dequant", "prefill": "dequant"}
        self.timings: dict[str, dict[str, float]] = {}

    # ---------------------------------------------------------------- views
    @property
    def symmetric(self) -> bool:
        return self.weight_zero_point is None

    def int_weight(self) -> IntWeight:
        codes = kernels.unpack_codes(self.weight_packed, self.bits, (self.out_features, self.in_features))
        return IntWeight(codes, self.weight_scale, self.weight_zero_point, self.bits, self.group_size,
                         self.weight_g_idx)

    def dequantized_weight(self) -> torch.Tensor:
        return kernels.dequantize_packed(self.weight_packed, self.weight_scale, self.weight_zero_point,
                                         self.group_size, self.weight_g_idx, self.bits,
                                         (self.out_features, self.in_features), self.dtype)

    def weight_bytes(self) -> int:
        """Bytes the layer holds for its weight: packed codes, scales, zeros, g_idx and kernel copies."""
        tensors = [self.weight_packed, self.weight_scale, self.weight_zero_point, self.weight_g_idx]
        if self._int4 is not None:  # tinygemm's layout, kept beside the codes the exporters read
            tensors += list(self._int4)
        tensors += [t for t in (self._w8t, self._w8) if t is not None]
        return sum(t.numel() * t.element_size() for t in tensors if t is not None)

    # ---------------------------------------------------------------- compute
    def _quantize_input(self, x: torch.Tensor) -> torch.Tensor:
        aq = act_quantizer_of(self)
        return x if aq is None else aq(x)

    def reference_forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(self._quantize_input(x), self.dequantized_weight().to(x.dtype), self.bias)

    def _meta_weight(self) -> IntWeight:
        """The layer's ``IntWeight`` without its codes (a meta tensor of the right shape): enough to
        decide which kernels apply, without unpacking anything."""
        codes = torch.empty(self.out_features, self.in_features, dtype=torch.int8, device="meta")
        return IntWeight(codes, self.weight_scale, self.weight_zero_point, self.bits, self.group_size,
                         self.weight_g_idx)

    def _plain_input_spec(self):
        aq = act_quantizer_of(self)
        return aq.spec if aq is not None and type(aq) is ActQuantizer and aq.shift is None else None

    def _kernel_names(self) -> list[str]:
        """Kernels that apply to this layer, the reference ``dequant`` first (ties keep it)."""
        w = self._meta_weight()
        names = ["dequant"]
        if self._native_applicable():
            names.append("native")
        if kernels.int8x8_applicable(w, self._plain_input_spec()):
            names.append("int8x8")
        if kernels.int4pack_applicable(w):
            names.append("int4pack")
        if kernels.int8pack_applicable(w):
            names.append("int8pack")
        return names

    def _native_applicable(self) -> bool:
        gs = self.group_size or self.in_features
        return (self.bias is None or self.bias.dtype == torch.float32) and kernels.native_layout(
            self.weight_packed, self.weight_scale, self.weight_zero_point, self.bits, gs, self.weight_g_idx,
            (self.out_features, self.in_features), self.dtype) and kernels.native.available()

    def _kernels(self, names: list[str] | None = None) -> dict[str, kernels.Kernel]:
        """The kernels ``names`` (default: every applicable one), building their weight copies if needed."""
        names = self._kernel_names() if names is None else names
        shape = (self.out_features, self.in_features)

        def dequant(x: torch.Tensor) -> torch.Tensor:
            return kernels.dequant_matmul(self._quantize_input(x), self.weight_packed, self.weight_scale,
                                          self.weight_zero_point, self.group_size, self.weight_g_idx, self.bits,
                                          shape, self.dtype, self.bias)
        out: dict[str, kernels.Kernel] = {"dequant": dequant}
        if "native" in names:
            gs = self.group_size or self.in_features

            def native(x: torch.Tensor) -> torch.Tensor:
                return kernels.native.qgemv(self._quantize_input(x), self.weight_packed, self.weight_scale,
                                            self.weight_zero_point, self.bias, self.bits, gs, self.out_features)
            out["native"] = native
        w = self.int_weight() if set(names) - {"dequant"} else None
        if "int8x8" in names:
            self._w8t = self._w8t if self._w8t is not None else w.codes.t().contiguous()
            w_t, sw, full = self._w8t, w.scale.reshape(-1).float(), self._plain_input_spec().full_range

            def int8x8(x: torch.Tensor) -> torch.Tensor:
                y = kernels.int8x8_matmul(x, w_t, sw, full).to(x.dtype)
                return y if self.bias is None else y + self.bias
            out["int8x8"] = int8x8
        if "int4pack" in names:
            self._int4 = self._int4 or kernels.int4pack_tensors(w)
            packed, sz = self._int4
            gs = self.group_size

            def int4(x: torch.Tensor) -> torch.Tensor:
                x = self._quantize_input(x)
                y = torch.ops.aten._weight_int4pack_mm_for_cpu(x.reshape(-1, x.shape[-1]).float().contiguous(),
                                                             packed, gs, sz)
                y = y.reshape(*x.shape[:-1], -1).to(x.dtype)
                return y if self.bias is None else y + self.bias
            out["int4pack"] = int4
        if "int8pack" in names:
            self._w8 = self._w8 if self._w8 is not None else w.codes.contiguous()
            q, s = self._w8, w.scale.reshape(-1).float()

            def int8(x: torch.Tensor) -> torch.Tensor:
                x = self._quantize_input(x)
                y = torch.ops.aten._weight_int8pack_mm(x.reshape(-1, x.shape[-1]).float().contiguous(), q, s)
                y = y.reshape(*x.shape[:-1], -1).to(x.dtype)
                return y if self.bias is None else y + self.bias
            out["int8pack"] = int8
        return out

    def _choice_key(self, names: list[str], prefill_tokens: int) -> tuple:
        """What the kernel timings of a layer depend on: layers that agree share one probe."""
        aq = act_quantizer_of(self)
        return (tuple(names), self.out_features, self.in_features, self.bits, self.group_size, self.symmetric,
                self.weight_g_idx is not None, self.bias is not None, self.dtype, str(self.weight_scale.device),
                torch.get_num_threads(), prefill_tokens, None if aq is None else (type(aq).__name__, repr(aq.spec)))

    @torch.no_grad()
    def select_kernel(self, prefill_tokens: int = kernels.PROBE_TOKENS["prefill"], force: bool = False
                      ) -> dict[str, str]:
        """Pick the decode and prefill kernels (``kernels.choose_kernels``): a short probe on random inputs
        (1 token and ``prefill_tokens``), shared by every layer of the same signature in this process;
        done once per layer unless ``force`` (which probes again)."""
        if getattr(self, "_fns", None) is not None and not force:
            return dict(self.kernel)
        names = self._kernel_names()
        self.kernel, self.timings = kernels.choose_kernels(
            self._choice_key(names, prefill_tokens), names, self._kernels, self.reference_forward,
            self.in_features, self.weight_scale.device, {"decode": 1, "prefill": prefill_tokens}, force)
        used = set(self.kernel.values())
        if "int4pack" not in used:
            self._int4 = None  # don't hold a second copy for a kernel that is never used
        if "int8x8" not in used:
            self._w8t = None
        if "int8pack" not in used:
            self._w8 = None
        fns = self._kernels([n for n in names if n in used])
        self._fns = {regime: fns[name] for regime, name in self.kernel.items()}
        return dict(self.kernel)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.is_grad_enabled() and x.requires_grad:  # gradients flow through the reference only
            return self.reference_forward(x)
        fns = getattr(self, "_fns", None)
        if fns is None:  # first call: pick the kernels (a short probe, shared by layers of the same shape)
            self.select_kernel()
            fns = self._fns
        tokens = x.numel() // x.shape[-1]
        return fns["decode" if tokens <= DECODE_TOKENS else "prefill"](x)

    def extra_repr(self) -> str:
        g = f"group {self.group_size}" if self.group_size else "per channel"
        kind = "sym" if self.symmetric else "asym"
        return (f"in={self.in_features}, out={self.out_features}, {self.bits}-bit {kind} {g}, "
                f"kernel decode={self.kernel['decode']} prefill={self.kernel['prefill']}")


def pack_model(model: torch.nn.Module, select: bool = False) -> dict[str, QuantLinear]:
    """Replace every lowbit-quantized ``nn.Linear`` of ``model`` by a ``QuantLinear`` (in place).

    Layers whose weights have no integer form raise a ``LowbitError`` naming the layer.  With
    ``select``, each packed layer measures its kernels (see ``QuantLinear.select_kernel``).
    """
    packed: dict[str, QuantLinear] = {}
    for name, module in list(model.named_modules()):
        if not isinstance(module, torch.nn.Linear) or not is_quantized(module):
            continue
        try:
            w = int_weight_of(module)
        except LowbitError as e:
            raise LowbitError(f"{name}: {e}") from None
        q = QuantLinear(w, module.bias, module.weight.dtype)
        copy_input_rotation(module, q)
        aq = act_quantizer_of(module)
        if aq is not None:
            attach_input_quantizer(q, aq)
        if select:
            q.select_kernel()
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, child, q)
        packed[name] = q
    return packed


def int_weights(model: torch.nn.Module, strict: bool = True) -> dict[str, Any]:
    """``IntWeight`` of every quantized layer (packed or still ``nn.Linear`` with lowbit artifacts).

    A quantized layer without an integer form raises a ``LowbitError`` naming it, or with
    ``strict=False`` is left out."""
    out: dict[str, Any] = {}
    for name, m in model.named_modules():
        if isinstance(m, QuantLinear):
            out[name] = m.int_weight()
        elif isinstance(m, (torch.nn.Linear, torch.nn.Embedding)) and is_quantized(m):  # embedding: by request
            try:
                out[name] = int_weight_of(m)
            except LowbitError as e:
                if strict:
                    raise LowbitError(f"{name}: {e}") from None
    return out
