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


def _check_scale(name: str, scale: torch.Tensor, rows: int, cols: int, gs: int | None) -> None:
    ng = 1 if not gs else -(-cols // int(gs))
    if tuple(scale.shape) != (rows, ng):
        raise LowbitError(f"{name}: weight_scale is {tuple(scale.shape)} but group size {gs} on a {rows}x{cols} "
                          f"weight needs ({rows}, {ng}): the config and the tensors disagree")


def read_int_weight(name: str, t: dict[str, torch.Tensor], args: dict[str, Any]) -> IntWeight:
    """Rebuild one ``pack-quantized`` layer's ``IntWeight``, checking the tensors against the scheme."""
    bits, gs = int(args["num_bits"]), args.get("group_size")
    if args.get("type", "int") != "int" or args.get("strategy") not in ("group", "channel"):
        raise LowbitError(f"{name}: lowbit reads int group/channel pack-quantized weights, not {args}")
    if "weight_packed" not in t or "weight_shape" not in t:
        raise LowbitError(f"{name}: has {', '.join(sorted(t))} but not weight_packed + weight_shape")
    rows, cols = (int(v) for v in t["weight_shape"].tolist())
    packed = t["weight_packed"]
    want = (rows, -(-cols * bits // 32))
    if tuple(packed.shape) != want or packed.dtype != torch.int32:
        raise LowbitError(f"{name}: weight_packed is {tuple(packed.shape)} {packed.dtype} but a {bits}-bit "
                          f"{rows}x{cols} weight packs to {want} int32: the config and the tensors disagree")
    gs = int(gs) if args["strategy"] == "group" else None
    _check_scale(name, t["weight_scale"], rows, cols, gs)
    codes = to_signed(unpack(packed, bits, cols, "int32"), bits)
    zero = None
    if not args.get("symmetric", True):
        if "weight_zero_point" not in t:
            raise LowbitError(f"{name}: the scheme is asymmetric but weight_zero_point is missing")
        zp = t["weight_zero_point"].t().contiguous()
        zero = to_signed(unpack(zp, bits, rows, "int32"), bits).t().contiguous()
    g_idx = t.get("weight_g_idx")
    return IntWeight(codes, t["weight_scale"].float(), zero, bits, gs, None if g_idx is None else g_idx.to(torch.int32))


def _read_unpacked_int(name: str, t: dict[str, torch.Tensor], args: dict[str, Any]) -> IntWeight:
    w = t.get("weight")
    if w is None or w.dtype != torch.int8:
        raise LowbitError(f"{name}: an int-quantized layer needs an int8 'weight' tensor, found "
                          f"{None if w is None else w.dtype}: the config and the tensors disagree")
    gs = int(args["group_size"]) if args.get("strategy") == "group" else None
    _check_scale(name, t["weight_scale"], *w.shape, gs)
    zero = None if args.get("symmetric", True) else t["weight_zero_point"].to(torch.int8)
    return IntWeight(w, t["weight_scale"].float(), zero, int(args["num_bits"]), gs)


def _read_float(name: str, t: dict[str, torch.Tensor], args: dict[str, Any], fmt: str) -> FloatWeight:
    if fmt == "float-quantized":
        w = t.get("weight")
        if w is None or w.dtype != torch.float8_e4m3fn:
            raise LowbitError(f"{name}: a float-quantized layer needs a float8_e4m3fn 'weight' tensor: the config and "
                              "the tensors disagree")
        gs = int(args["group_size"]) if args.get("strategy") == "group" else None
        _check_scale(name, t["weight_scale"], *w.shape, gs)
        return FloatWeight("e4m3", w.float(), t["weight_scale"].float(), gs, "float32")
    packed, scale = t.get("weight_packed"), t.get("weight_scale")
    if packed is None or packed.dtype != torch.uint8 or scale is None or "weight_global_scale" not in t:
        raise LowbitError(f"{name}: an nvfp4-pack-quantized layer needs uint8 weight_packed, weight_scale and "
                          "weight_global_scale: the config and the tensors disagree")
    rows, cols = packed.shape[0], packed.shape[1] * 2
    _check_scale(name, scale, rows, cols, 16)
    values = decode(_unpack_fp4(packed, cols), "e2m1")
    return FloatWeight("e2m1", values, scale.float(), 16, "e4m3", 1.0 / float(t["weight_global_scale"].reshape(-1)[0]))


def read_layer_weight(name: str, t: dict[str, torch.Tensor], fmt: str, args: dict[str, Any]) -> LayerWeight:
    """One layer's weight in lowbit's form, for any of the formats above."""
    if fmt == "pack-quantized":
        return read_int_weight(name, t, args)
    if fmt == "int-quantized":
        return _read_unpacked_int(name, t, args)
    if fmt in ("float-quantized", "nvfp4-pack-quantized"):
        return _read_float(name, t, args, fmt)
    raise LowbitError(f"{name}: lowbit reads pack-, int-, float- and nvfp4-pack-quantized layers, not {fmt!r}")
