"""compressed-tensors schemes: the ``quantization_config`` entries for lowbit's weights and inputs.

One layer's scheme is its weight arguments, its input-activation arguments (or None) and the
compression format that stores it:

* int weights, no activation quantization         -> ``pack-quantized`` (codes packed in int32)
* int weights with quantized inputs (W8A8, W4A8)  -> ``int-quantized``  (codes as int8 tensors)
* FP8 E4M3 weights (channel / group scales)       -> ``float-quantized`` (float8_e4m3fn tensors)
* FP4 E2M1, 16-element E4M3 blocks, global scale  -> ``nvfp4-pack-quantized``
"""

from __future__ import annotations

import json
from typing import Any, Union

from lowbit.activations.quantizer import ActQuantizer
from lowbit.errors import LowbitError
from lowbit.packed.floatweight import FloatWeight
from lowbit.packed.intweight import IntWeight

LayerWeight = Union[IntWeight, FloatWeight]


def _args(num_bits: int, type_: str, symmetric: bool, strategy: str, group_size: int | None = None,
          dynamic: bool = False, **extra: Any) -> dict[str, Any]:
    return {"num_bits": num_bits, "type": type_, "symmetric": symmetric, "strategy": strategy,
            "group_size": group_size, "block_structure": None, "dynamic": dynamic, "actorder": None,
            "observer": None if dynamic else "minmax", "observer_kwargs": {}, **extra}


def weight_args(w: LayerWeight) -> dict[str, Any]:
    """The ``weights`` QuantizationArgs of one layer."""
    strategy = "group" if w.group_size else "channel"
    if isinstance(w, IntWeight):
        return _args(w.bits, "int", w.symmetric, strategy, w.group_size)
    if w.fmt == "e2m1":
        if w.group_size != 16 or w.scale_dtype != "e4m3" or w.global_scale is None:
            raise LowbitError("FP4 E2M1 weights are exported as NVFP4 (16-element groups, E4M3 scales, global scale: "
                              "the NVFP4 preset); other FP4 layouts have no compressed-tensors form")
        return _args(4, "float", True, "tensor_group", 16, scale_dtype="torch.float8_e4m3fn")
    if w.scale_dtype not in ("float32", "float16", "bfloat16"):
        raise LowbitError(f"FP8 weights with {w.scale_dtype} scales have no compressed-tensors form; use fp32/fp16/bf16 scales")
    return _args(8, "float", True, strategy, w.group_size)


def activation_args(q: ActQuantizer | None) -> dict[str, Any] | None:
    """The ``input_activations`` QuantizationArgs of one layer (None: inputs not quantized)."""
    if q is None:
        return None
    if type(q) is not ActQuantizer:
        raise LowbitError(f"inputs quantized with per-column outlier handling ({q.extra_repr()}) have no "
                          "compressed-tensors form; write fake-quant (lowbit keeps it in lowbit_activations.json)")
    if q.shift is not None:
        raise LowbitError("inputs with an Outlier Suppression+ channel shift have no compressed-tensors form (the shift "
                          "would be a bias the checkpoint's layers lack); write fake-quant")
    sp = q.spec
    if sp.type == "float" and sp.fmt != "e4m3":
        raise LowbitError(f"{sp.fmt} activations have no compressed-tensors form; FP8 E4M3 and int activations do")
    if sp.type == "int" and sp.symmetric and not sp.full_range and sp.dynamic:
        # compressed-tensors' dynamic int grid is absmax / (2^(b-1) - 0.5); lowbit's default is absmax / (2^(b-1) - 1)
        raise LowbitError("compressed-tensors quantizes dynamic symmetric int activations with scale absmax/(2^(b-1)-0.5); "
                          "set full_range: true on the activation spec (the A8_TOKEN preset does) so the "
                          "checkpoint computes what lowbit evaluated")
    type_ = "float" if sp.type == "float" else "int"
    return _args(sp.bits, type_, sp.symmetric, sp.granularity, sp.group_size, sp.dynamic)


def layer_format(w: LayerWeight, q: ActQuantizer | None) -> str:
    """The compression format that stores this layer."""
    if isinstance(w, FloatWeight):
        return "nvfp4-pack-quantized" if w.fmt == "e2m1" else "float-quantized"
    return "int-quantized" if q is not None else "pack-quantized"


def check_schemes(weights: dict[str, LayerWeight], inputs: dict[str, ActQuantizer]) -> str | None:
    """Why these layers cannot be written as compressed-tensors, or None when they can."""
    if not weights:
        return "the model has no quantized layers to export; quantize it first (lowbit quantize)"
    reordered = [n for n, w in weights.items() if isinstance(w, IntWeight) and w.g_idx is not None]
    if reordered:
        return (f"{reordered[0]} (and {len(reordered) - 1} more) has activation-ordered groups (g_idx), which "
                "compressed-tensors >= 0.20 no longer accepts; re-quantize with GPTQ's static_groups=true "
                "(the default), which keeps act-order without g_idx")
    stray = sorted(set(inputs) - set(weights))
    if stray:
        return f"{stray[0]} quantizes its inputs but not its weights; compressed-tensors schemes quantize weights too"
    try:
        for name, w in weights.items():
            weight_args(w), activation_args(inputs.get(name))
    except LowbitError as e:
        return f"{name}: {e}"
    return None


def layer_scheme(w: LayerWeight, q: ActQuantizer | None) -> dict[str, Any]:
    """One layer's scheme: weight and input arguments and the compression format."""
    return {"weights": weight_args(w), "input_activations": activation_args(q), "output_activations": None,
            "format": layer_format(w, q)}


def config_from_schemes(layer_schemes: dict[str, dict[str, Any]], linear_names: list[str]) -> dict[str, Any]:
    """The ``quantization_config`` from each quantized layer's ``layer_scheme`` (in model order)."""
    groups: dict[str, list[str]] = {}
    schemes: dict[str, dict[str, Any]] = {}
    for name, scheme in layer_schemes.items():
        key = json.dumps(scheme, sort_keys=True)
        schemes[key] = scheme
        groups.setdefault(key, []).append(name)
    config_groups = {}
    for i, (key, names) in enumerate(groups.items()):
        targets = ["Linear"] if len(groups) == 1 else sorted(names)
        targets += sorted(n for n in names if n not in linear_names and n not in targets)  # an embedding, by name
        config_groups[f"group_{i}"] = {"targets": targets, **schemes[key]}
    formats = {s["format"] for s in schemes.values()}
    ignore = sorted(n for n in linear_names if n not in layer_schemes) if len(groups) == 1 else []
    return {"quant_method": "compressed-tensors", "format": formats.pop() if len(formats) == 1 else "mixed-precision",
            "quantization_status": "compressed", "config_groups": config_groups, "ignore": ignore,
            "kv_cache_scheme": None, "global_compression_ratio": None}
