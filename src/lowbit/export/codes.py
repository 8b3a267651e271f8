"""``lowbit_codes.safetensors``: the integer codes beside a fake-quant checkpoint.

A fake-quant directory holds dequantized weights that any transformers build loads; this file
keeps what produced them (packed codes, scales, zero points, per layer, in the compressed-tensors
tensor layout) so ``lowbit export`` can write any packed format later without re-quantizing.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from lowbit.errors import LowbitError
from lowbit.export.ct_schemes import weight_args
from lowbit.export.ct_tensors import packed_tensors, read_int_weight, split_packed
from lowbit.experts import unfuse_like
from lowbit.packed.intweight import IntWeight
from lowbit.quantized_layers import QuantizedWeight, mark_quantized

CODES_FILE = "lowbit_codes.safetensors"


def write_codes(weights: dict[str, IntWeight], path: Path) -> None:
    """Write every layer's codes (and its scheme, in the file's metadata) to ``path``."""
    tensors: dict[str, torch.Tensor] = {}
    schemes = {}
    for name, w in weights.items():
        tensors.update(packed_tensors(name, w, torch.float32))
        schemes[name] = weight_args(w)
    save_file(tensors, str(path), metadata={"lowbit_schemes": json.dumps(schemes)})


def read_codes(path: Path) -> dict[str, IntWeight]:
    """Inverse of ``write_codes``."""
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata() or {}
        if "lowbit_schemes" not in meta:
            raise LowbitError(f"{path} has no lowbit scheme metadata; it was not written by lowbit")
        schemes = json.loads(meta["lowbit_schemes"])
        per_layer, _ = split_packed(f)
    return {name: read_int_weight(name, per_layer.get(name, {}), args) for name, args in schemes.items()}


def attach_codes(model: torch.nn.Module, directory: Path) -> int:
    """Give each layer listed in ``directory/lowbit_codes.safetensors`` its ``IntWeight``; returns the count."""
    path = Path(directory) / CODES_FILE
    if not path.is_file():
        return 0
    weights = read_codes(path)
    unfuse_like(model, weights)  # codes of MoE experts name one linear per expert
    for name, w in weights.items():
        try:
            layer = model.get_submodule(name)
        except AttributeError:
            raise LowbitError(f"{path}: layer {name} is not in the model") from None
        if tuple(layer.weight.shape) != w.shape:
            raise LowbitError(f"{path}: {name} codes are {w.shape} but the layer weight is {tuple(layer.weight.shape)}")
        mark_quantized(layer, QuantizedWeight(w, None, "codes"))
    return len(weights)
