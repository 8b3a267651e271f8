"""The safetensors tensors of one compressed-tensors layer, written from and read back into lowbit's forms.

Per layer ``NAME`` and format:

* ``pack-quantized``: ``weight_packed`` (int32 words, lowbit.core.packing's dense layout),
  ``weight_scale``, ``weight_shape``, ``weight_zero_point`` (asymmetric; packed along dim 0),
  ``weight_g_idx`` (activation-ordered groups).
* ``int-quantized``: ``weight`` (int8 codes), ``weight_scale``, ``weight_zero_point`` (int8).
* ``float-quantized``: ``weight`` (float8_e4m3fn), ``weight_scale``.
* ``nvfp4-pack-quantized``: ``weight_packed`` (uint8, two E2M1 codes a byte, the even column in
  the low nibble), ``weight_scale`` (float8_e4m3fn per 16 columns), ``weight_global_scale``
  (fp32, the reciprocal of lowbit's global factor: compressed-tensors divides by it).
* static input quantization adds ``input_scale`` (and ``input_zero_point``).

Signed int codes follow compressed-tensors: ``W = scale * (q - zero)`` with ``q, zero`` in
``[-2^(b-1), 2^(b-1))``.
"""

from __future__ import annotations

from typing import Any

import torch

from lowbit.activations.quantizer import ActQuantizer
from lowbit.checkpoint import all_finite
from lowbit.core.floats import decode, encode
from lowbit.core.packing import pack, to_signed, to_unsigned, unpack
from lowbit.errors import LowbitError
from lowbit.export.ct_schemes import LayerWeight
from lowbit.packed.floatweight import FloatWeight
from lowbit.packed.intweight import IntWeight

SUFFIXES = ("weight_packed", "weight_scale", "weight_shape", "weight_zero_point", "weight_g_idx",
            "weight_global_scale", "input_scale", "input_zero_point")
DENSE_WEIGHT_FORMATS = ("int-quantized", "float-quantized")


def packed_tensors(name: str, w: IntWeight, scale_dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """``pack-quantized`` tensors of one int layer."""
    out = {
        f"{name}.weight_packed": pack(to_unsigned(w.codes, w.bits), w.bits, "int32"),
        f"{name}.weight_scale": w.scale.to(scale_dtype).contiguous(),
        f"{name}.weight_shape": torch.tensor(list(w.shape), dtype=torch.int64),
    }
    if w.zero is not None:  # packed along the output dimension
        out[f"{name}.weight_zero_point"] = pack(to_unsigned(w.zero.t().contiguous(), w.bits), w.bits, "int32").t().contiguous()
    if w.g_idx is not None:
        out[f"{name}.weight_g_idx"] = w.g_idx.to(torch.int32).contiguous()
    return out


def _pack_fp4(codes: torch.Tensor) -> torch.Tensor:
    c = codes.to(torch.uint8)
    return (c[:, 0::2] | (c[:, 1::2] << 4)).contiguous()


def _unpack_fp4(packed: torch.Tensor, cols: int) -> torch.Tensor:
    out = torch.empty(packed.shape[0], packed.shape[1] * 2, dtype=torch.uint8)
    out[:, 0::2] = packed & 0xF
    out[:, 1::2] = packed >> 4
    return out[:, :cols]


def float_tensors(name: str, w: FloatWeight) -> dict[str, torch.Tensor]:
    """``float-quantized`` (FP8) or ``nvfp4-pack-quantized`` tensors of one float layer."""
    if w.fmt == "e4m3":
        return {f"{name}.weight": w.values.to(torch.float8_e4m3fn),
                f"{name}.weight_scale": w.scale.to(torch.float32).contiguous()}
    if w.shape[1] % 2:
        raise LowbitError(f"{name}: NVFP4 packs two columns a byte; {w.shape[1]} input features is odd")
    return {f"{name}.weight_packed": _pack_fp4(encode(w.values, "e2m1")),
            f"{name}.weight_scale": w.scale.to(torch.float8_e4m3fn),
            f"{name}.weight_global_scale": torch.tensor([1.0 / (w.global_scale or 1.0)], dtype=torch.float32)}


def input_tensors(name: str, q: ActQuantizer | None) -> dict[str, torch.Tensor]:
    """Static input scales (nothing for dynamic or absent input quantization)."""
    if q is None or q.spec.dynamic:
        return {}
    if q.spec.type == "int":
        scale, zero = q.qparams()
        out = {f"{name}.input_scale": scale.reshape(1).float()}
        if not q.spec.symmetric:
            shift = 0 if q.spec.signed else 1 << (q.spec.bits - 1)
            out[f"{name}.input_zero_point"] = (zero.reshape(1) - shift).to(torch.int8)
        return out
    absmax = torch.maximum(q.xmin.abs(), q.xmax.abs())
    return {f"{name}.input_scale": (absmax / 448.0).reshape(1).float()}


def layer_tensors(name: str, w: LayerWeight, q: ActQuantizer | None, fmt: str,
                  scale_dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """Every tensor compressed-tensors stores for one quantized layer in format ``fmt``."""
    if isinstance(w, FloatWeight):
        out = float_tensors(name, w)
    elif fmt == "int-quantized":
        out = {f"{name}.weight": w.codes.to(torch.int8), f"{name}.weight_scale": w.scale.to(scale_dtype).contiguous()}
        if w.zero is not None:
            out[f"{name}.weight_zero_point"] = w.zero.to(torch.int8).contiguous()
    else:
        out = packed_tensors(name, w, scale_dtype)
    out.update(input_tensors(name, q))
    return out


# ----------------------------------------------------------------------------------- reading
def split_packed(f: Any, dense_weight_layers: set[str] = frozenset()) -> tuple[dict[str, dict[str, torch.Tensor]], dict[str, torch.Tensor]]:
    """Tensors of an open safetensors file: quantized buffers by layer (``{layer: {suffix: t}}``), and
    the rest.  ``dense_weight_layers`` store their codes under plain ``weight`` (int-/float-quantized)."""
    per_layer: dict[str, dict[str, torch.Tensor]] = {}
    dense: dict[str, torch.Tensor] = {}
    for key in f.keys():
        layer, _, suffix = key.rpartition(".")
        if suffix in SUFFIXES or (suffix == "weight" and layer in dense_weight_layers):
            per_layer.setdefault(layer, {})[suffix] = f.get_tensor(key)
        else:
            dense[key] = f.get_tensor(key)
    return per_layer, dense


def require(t: dict[str, Any], key: str, name: str, what: str = "tensor") -> Any:
    """``t[key]``; a LowbitError naming the layer when the checkpoint or its scheme lacks it."""
    if key not in t:
        have = ", ".join(sorted(t)) or "nothing"
        raise LowbitError(f"{name}: the {what} {key!r} is missing (has {have}): the config and the tensors disagree; "
                          "re-export the checkpoint")
    return t[key]


def check_finite(name: str, key: str, t: torch.Tensor) -> None:
    """A LowbitError naming ``name.key`` when ``t`` holds NaN or Inf."""
    if not all_finite(t):
        raise LowbitError(f"{name}.{key} holds NaN or Inf values; the checkpoint is corrupt: re-quantize or re-export it")


def _scale(name: str, t: dict[str, torch.Tensor], rows: int, cols: int, gs: int | None) -> torch.Tensor:
    """The layer's ``weight_scale``, checked: shape (rows, groups) and finite."""
    scale = require(t, "weight_scale", name)
    ng = 1 if not gs else -(-cols // int(gs))
    if tuple(scale.shape) != (rows, ng):
        raise LowbitError(f"{name}: weight_scale is {tuple(scale.shape)} but group size {gs} on a {rows}x{cols} "
                          f"weight needs ({rows}, {ng}): the config and the tensors disagree")
    check_finite(name, "weight_scale", scale)
    return scale.float()


def _group_size(name: str, args: dict[str, Any]) -> int | None:
    """The scheme's group size (None for one scale per row), checked to be a positive integer."""
    if args.get("strategy") != "group":
        return None
    gs = args.get("group_size")
    if not isinstance(gs, int) or isinstance(gs, bool) or gs <= 0:
        raise LowbitError(f"{name}: the scheme's strategy is 'group' but group_size is {gs!r}; re-export the checkpoint")
    return gs


def _num_bits(name: str, args: dict[str, Any]) -> int:
    """The scheme's ``num_bits``, checked to be a width lowbit packs."""
    bits = require(args, "num_bits", name, "scheme argument")
    if not isinstance(bits, int) or isinstance(bits, bool) or not 1 <= bits <= 8:
        raise LowbitError(f"{name}: num_bits {bits!r} is not a width lowbit reads (1 to 8); re-export the checkpoint")
    return bits


def _g_idx(name: str, t: dict[str, torch.Tensor], cols: int, groups: int) -> torch.Tensor | None:
    """``weight_g_idx``, checked: one integer group per input column, each below the number of groups."""
    g = t.get("weight_g_idx")
    if g is None:
        return None
    if g.is_floating_point() or tuple(g.shape) != (cols,):
        raise LowbitError(f"{name}: weight_g_idx is {tuple(g.shape)} {g.dtype} but needs one integer group per input "
                          f"column ({cols},): the config and the tensors disagree")
    if cols and (int(g.min()) < 0 or int(g.max()) >= groups):
        raise LowbitError(f"{name}: weight_g_idx holds groups {int(g.min())}..{int(g.max())} but the layer has "
                          f"{groups} scale groups (0..{groups - 1}): the checkpoint is corrupt; re-export it")
    return g.to(torch.int32)


def _zero_point(name: str, t: dict[str, torch.Tensor], bits: int, rows: int, groups: int) -> torch.Tensor:
    """Signed zero points (rows, groups) from ``weight_zero_point`` packed along the output dimension."""
    zp = require(t, "weight_zero_point", name)
    want = (-(-rows * bits // 32), groups)
    if tuple(zp.shape) != want or zp.dtype != torch.int32:
        raise LowbitError(f"{name}: weight_zero_point is {tuple(zp.shape)} {zp.dtype} but {bits}-bit zero points of "
                          f"{rows} rows x {groups} groups pack to {want} int32: the config and the tensors disagree")
    return to_signed(unpack(zp.t().contiguous(), bits, rows, "int32"), bits).t().contiguous()


def _weight_shape(name: str, t: dict[str, torch.Tensor]) -> tuple[int, int]:
    """``weight_shape`` as (rows, columns), checked to be two positive integers."""
    shape = require(t, "weight_shape", name)
    if shape.numel() != 2 or shape.is_floating_point() or bool((shape <= 0).any()):
        raise LowbitError(f"{name}: weight_shape {shape.tolist()} is not the (rows, columns) of a linear weight; "
                          "re-export the checkpoint")
    rows, cols = (int(v) for v in shape.tolist())
    return rows, cols


def read_packed_int(name: str, t: dict[str, torch.Tensor], args: dict[str, Any]) -> tuple[torch.Tensor, IntWeight]:
    """One ``pack-quantized`` layer checked against the scheme, its codes left packed: ``(weight_packed, w)``
    with ``w`` an ``IntWeight`` whose codes are a meta tensor of the weight's shape (no memory)."""
    if args.get("type", "int") != "int" or args.get("strategy") not in ("group", "channel"):
        raise LowbitError(f"{name}: lowbit reads int group/channel pack-quantized weights, not {args}")
    bits, gs = _num_bits(name, args), _group_size(name, args)
    packed = require(t, "weight_packed", name)
    rows, cols = _weight_shape(name, t)
    want = (rows, -(-cols * bits // 32))
    if tuple(packed.shape) != want or packed.dtype != torch.int32:
        raise LowbitError(f"{name}: weight_packed is {tuple(packed.shape)} {packed.dtype} but a {bits}-bit "
                          f"{rows}x{cols} weight packs to {want} int32: the config and the tensors disagree")
    scale = _scale(name, t, rows, cols, gs)
    zero = None if args.get("symmetric", True) else _zero_point(name, t, bits, rows, scale.shape[1])
    codes = torch.empty(rows, cols, dtype=torch.int8, device="meta")
    return packed, IntWeight(codes, scale, zero, bits, gs, _g_idx(name, t, cols, scale.shape[1]))


def read_int_weight(name: str, t: dict[str, torch.Tensor], args: dict[str, Any]) -> IntWeight:
    """Rebuild one ``pack-quantized`` layer's ``IntWeight``, checking the tensors against the scheme."""
    packed, w = read_packed_int(name, t, args)
    w.codes = to_signed(unpack(packed, w.bits, w.shape[1], "int32"), w.bits)
    return w


def _read_unpacked_int(name: str, t: dict[str, torch.Tensor], args: dict[str, Any]) -> IntWeight:
    w = t.get("weight")
    if w is None or w.dtype != torch.int8 or w.dim() != 2:
        raise LowbitError(f"{name}: an int-quantized layer needs an int8 'weight' matrix, found "
                          f"{None if w is None else w.dtype}: the config and the tensors disagree")
    gs = _group_size(name, args)
    scale = _scale(name, t, *w.shape, gs)
    zero = None
    if not args.get("symmetric", True):
        zero = require(t, "weight_zero_point", name)
        if tuple(zero.shape) != tuple(scale.shape):
            raise LowbitError(f"{name}: weight_zero_point is {tuple(zero.shape)} but the scales are "
                              f"{tuple(scale.shape)}: the config and the tensors disagree")
        zero = zero.to(torch.int8)
    return IntWeight(w, scale, zero, _num_bits(name, args), gs)


def _read_float(name: str, t: dict[str, torch.Tensor], args: dict[str, Any], fmt: str) -> FloatWeight:
    if fmt == "float-quantized":
        w = t.get("weight")
        if w is None or w.dtype != torch.float8_e4m3fn or w.dim() != 2:
            raise LowbitError(f"{name}: a float-quantized layer needs a float8_e4m3fn 'weight' matrix: the config "
                              "and the tensors disagree")
        gs = _group_size(name, args)
        return FloatWeight("e4m3", w.float(), _scale(name, t, *w.shape, gs), gs, "float32")
    packed = t.get("weight_packed")
    if packed is None or packed.dtype != torch.uint8 or packed.dim() != 2:
        raise LowbitError(f"{name}: an nvfp4-pack-quantized layer needs a uint8 weight_packed matrix: the config and "
                          "the tensors disagree")
    rows, cols = packed.shape[0], packed.shape[1] * 2
    scale = _scale(name, t, rows, cols, 16)
    glob = require(t, "weight_global_scale", name)
    check_finite(name, "weight_global_scale", glob)
    g = float(glob.reshape(-1)[0]) if glob.numel() else 0.0
    if g == 0.0:
        raise LowbitError(f"{name}: weight_global_scale is {glob.tolist()}, not a nonzero number; re-export it")
    values = decode(_unpack_fp4(packed, cols), "e2m1")
    return FloatWeight("e2m1", values, scale, 16, "e4m3", 1.0 / g)


READ_FORMATS = ("pack-quantized", "int-quantized", "float-quantized", "nvfp4-pack-quantized")
CONFIG_FORMATS = (*READ_FORMATS, "mixed-precision", "dense")  # what a quantization_config's top-level format may say


def read_layer_weight(name: str, t: dict[str, torch.Tensor], fmt: str, args: dict[str, Any]) -> LayerWeight:
    """One layer's weight in lowbit's form, for any of the formats above."""
    if fmt == "pack-quantized":
        return read_int_weight(name, t, args)
    if fmt == "int-quantized":
        return _read_unpacked_int(name, t, args)
    if fmt in ("float-quantized", "nvfp4-pack-quantized"):
        return _read_float(name, t, args, fmt)
    raise LowbitError(f"{name}: lowbit reads pack-, int-, float- and nvfp4-pack-quantized layers, not {fmt!r}")
