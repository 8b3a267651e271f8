"""compressed-tensors checkpoints: ``pack-quantized`` int weights, as transformers and vLLM load them.

Per quantized linear ``NAME`` the safetensors file holds ``NAME.weight_packed`` (int32, the dense
layout of ``lowbit.core.packing``), ``NAME.weight_scale`` (out, groups), ``NAME.weight_shape``
(int64 ``[out, in]``), for asymmetric schemes ``NAME.weight_zero_point`` (int32, packed along
the output dimension) and, for activation-ordered groups, ``NAME.weight_g_idx``.  Signed codes
follow compressed-tensors: ``W = scale * (q - zero)`` with ``q, zero`` in ``[-2^(b-1), 2^(b-1))``.
``config.json`` carries the ``quantization_config`` (one config group per distinct scheme).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from lowbit.atomic import atomic_dir
from lowbit.core.packing import pack, to_signed, to_unsigned, unpack
from lowbit.errors import LowbitError
from lowbit.packed.intweight import IntWeight
from lowbit.packed.qlinear import QuantLinear, int_weights

WEIGHTS_FILE = "model.safetensors"
_SUFFIXES = ("weight_packed", "weight_scale", "weight_shape", "weight_zero_point", "weight_g_idx")


def _scheme_key(w: IntWeight) -> tuple:
    return (w.bits, w.symmetric, w.group_size, w.g_idx is not None)


def _weights_args(w: IntWeight) -> dict[str, Any]:
    return {"num_bits": w.bits, "type": "int", "symmetric": w.symmetric,
            "strategy": "group" if w.group_size else "channel", "group_size": w.group_size,
            "block_structure": None, "dynamic": False, "actorder": None,
            "observer": "minmax", "observer_kwargs": {}}


def quantization_config(weights: dict[str, IntWeight], linear_names: list[str]) -> dict[str, Any]:
    """The ``quantization_config`` for ``weights`` (layer name -> IntWeight) among ``linear_names``."""
    groups: dict[tuple, list[str]] = {}
    for name, w in weights.items():
        groups.setdefault(_scheme_key(w), []).append(name)
    config_groups = {}
    for i, (key, names) in enumerate(groups.items()):
        targets = ["Linear"] if len(groups) == 1 else sorted(names)
        config_groups[f"group_{i}"] = {"targets": targets, "weights": _weights_args(weights[names[0]]),
                                       "input_activations": None, "output_activations": None, "format": None}
    ignore = sorted(n for n in linear_names if n not in weights) if len(groups) == 1 else []
    return {"quant_method": "compressed-tensors", "format": "pack-quantized", "quantization_status": "compressed",
            "config_groups": config_groups, "ignore": ignore, "kv_cache_scheme": None,
            "global_compression_ratio": None}


def packed_tensors(name: str, w: IntWeight, scale_dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """The tensors compressed-tensors stores for one layer."""
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


def _dense_state(model: torch.nn.Module, skip: set[str]) -> dict[str, torch.Tensor]:
    """Every other tensor of the model, tied duplicates dropped (transformers re-ties them on load)."""
    out: dict[str, torch.Tensor] = {}
    seen: set[int] = set()
    for key, t in model.state_dict().items():
        layer = key.rsplit(".", 1)[0]
        if layer in skip and (key.endswith(".weight") or key.rsplit(".", 1)[-1] in _SUFFIXES):
            continue
        ptr = t.untyped_storage().data_ptr()
        if ptr in seen and t.numel() > 0:
            continue
        seen.add(ptr)
        out[key] = t.detach().contiguous()
    return out


def check_exportable(weights: dict[str, IntWeight]) -> str | None:
    """Why these layers cannot be written as compressed-tensors, or None when they can."""
    if not weights:
        return "the model has no quantized layers to export; quantize it first (lowbit quantize)"
    reordered = [n for n, w in weights.items() if w.g_idx is not None]
    if reordered:
        return (f"{reordered[0]} (and {len(reordered) - 1} more) has activation-ordered groups (g_idx), which "
                "compressed-tensors >= 0.20 no longer accepts; re-quantize with GPTQ's static_groups=true "
                "(the default), which keeps act-order without g_idx")
    return None


def export_compressed_tensors(model: torch.nn.Module, tokenizer: Any, out: str | Path,
                              extra_files: dict[str, str] | None = None) -> Path:
    """Write ``model`` (quantized by lowbit, packed or not) as a compressed-tensors checkpoint."""
    weights = int_weights(model)
    problem = check_exportable(weights)
    if problem is not None:
        raise LowbitError(problem)
    linears = [n for n, m in model.named_modules() if isinstance(m, (torch.nn.Linear, QuantLinear))]
    dtype = next(p for p in model.parameters() if p.is_floating_point()).dtype
    tensors = _dense_state(model, set(weights))
    for name, w in weights.items():
        tensors.update(packed_tensors(name, w, dtype))
    cfg = model.config.to_dict()
    cfg["quantization_config"] = quantization_config(weights, linears)
    cfg["dtype"] = str(dtype).replace("torch.", "")
    out = Path(out)
    with atomic_dir(out) as tmp:
        save_file(tensors, str(tmp / WEIGHTS_FILE), metadata={"format": "pt"})
        (tmp / "config.json").write_text(json.dumps(cfg, indent=2, default=str))
        gen = getattr(model, "generation_config", None)
        if gen is not None:
            gen.save_pretrained(tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        for fname, text in (extra_files or {}).items():
            (tmp / fname).write_text(text)
    return out


# ----------------------------------------------------------------------------------- reading
def is_compressed_tensors(path: str | Path) -> bool:
    cfg = Path(path) / "config.json"
    if not cfg.is_file():
        return False
    qc = json.loads(cfg.read_text()).get("quantization_config") or {}
    return qc.get("quant_method") == "compressed-tensors"


def split_packed(f: Any) -> tuple[dict[str, dict[str, torch.Tensor]], dict[str, torch.Tensor]]:
    """Tensors of an open safetensors file: packed buffers by layer (``{layer: {suffix: t}}``), and the rest."""
    per_layer: dict[str, dict[str, torch.Tensor]] = {}
    dense: dict[str, torch.Tensor] = {}
    for key in f.keys():
        layer, _, suffix = key.rpartition(".")
        if suffix in _SUFFIXES:
            per_layer.setdefault(layer, {})[suffix] = f.get_tensor(key)
        else:
            dense[key] = f.get_tensor(key)
    return per_layer, dense


def _scheme_for(name: str, qc: dict[str, Any]) -> dict[str, Any]:
    for group in qc["config_groups"].values():
        targets = group.get("targets", [])
        if name in targets or "Linear" in targets:
            return group["weights"]
    raise LowbitError(f"{name} has packed weights but no config group of quantization_config targets it")


def read_int_weight(name: str, t: dict[str, torch.Tensor], args: dict[str, Any]) -> IntWeight:
    """Rebuild one layer's ``IntWeight``, checking the tensors against the config's scheme."""
    bits, gs = int(args["num_bits"]), args.get("group_size")
    if args.get("type", "int") != "int" or args.get("strategy") not in ("group", "channel"):
        raise LowbitError(f"{name}: lowbit reads int group/channel pack-quantized weights, not {args}")
    rows, cols = (int(v) for v in t["weight_shape"].tolist())
    packed = t["weight_packed"]
    want = (rows, -(-cols * bits // 32))
    if tuple(packed.shape) != want or packed.dtype != torch.int32:
        raise LowbitError(f"{name}: weight_packed is {tuple(packed.shape)} {packed.dtype} but a {bits}-bit "
                          f"{rows}x{cols} weight packs to {want} int32: the config and the tensors disagree")
    ng = 1 if args["strategy"] == "channel" else -(-cols // int(gs))
    scale = t["weight_scale"]
    if tuple(scale.shape) != (rows, ng):
        raise LowbitError(f"{name}: weight_scale is {tuple(scale.shape)} but group size {gs} on a {rows}x{cols} "
                          f"weight needs ({rows}, {ng}): the config and the tensors disagree")
    codes = to_signed(unpack(packed, bits, cols, "int32"), bits)
    zero = None
    if not args.get("symmetric", True):
        if "weight_zero_point" not in t:
            raise LowbitError(f"{name}: the scheme is asymmetric but weight_zero_point is missing")
        zp = t["weight_zero_point"].t().contiguous()
        zero = to_signed(unpack(zp, bits, rows, "int32"), bits).t().contiguous()
    g_idx = t.get("weight_g_idx")
    return IntWeight(codes, scale.float(), zero, bits, int(gs) if args["strategy"] == "group" else None,
                     None if g_idx is None else g_idx.to(torch.int32))


def load_compressed_tensors(path: str | Path, dtype: torch.dtype = torch.float32) -> torch.nn.Module:
    """Build the model of a compressed-tensors checkpoint with lowbit ``QuantLinear`` layers."""
    from transformers import AutoConfig, AutoModelForCausalLM

    path = Path(path)
    raw = json.loads((path / "config.json").read_text())
    qc = raw.get("quantization_config") or {}
    if qc.get("format") not in ("pack-quantized",):
        raise LowbitError(f"{path}: lowbit reads compressed-tensors 'pack-quantized' checkpoints, not {qc.get('format')!r}")
    config = AutoConfig.from_pretrained(path)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = AutoModelForCausalLM.from_config(config, dtype=dtype)  # real buffers (rotary tables) included
    with safe_open(str(path / WEIGHTS_FILE), framework="pt") as f:
        per_layer, dense = split_packed(f)
    for name, t in per_layer.items():
        if "weight_packed" not in t or "weight_shape" not in t:
            raise LowbitError(f"{name}: has {', '.join(sorted(t))} but not weight_packed + weight_shape")
        w = read_int_weight(name, t, _scheme_for(name, qc))
        parent, _, child = name.rpartition(".")
        old = model.get_submodule(name)
        q = QuantLinear(w, None, dtype)
        if getattr(old, "bias", None) is not None:
            q.bias = torch.nn.Parameter(dense.pop(f"{name}.bias").to(dtype), requires_grad=False)
        setattr(model.get_submodule(parent) if parent else model, child, q)
    result = model.load_state_dict(dense, strict=False)
    if getattr(config, "tie_word_embeddings", False):
        model.tie_weights()
    bad = [k for k in result.missing_keys if not k.endswith(_SUFFIXES) and "rotary" not in k
           and not (getattr(config, "tie_word_embeddings", False) and k == "lm_head.weight")]
    if bad or result.unexpected_keys:
        raise LowbitError(f"{path}: tensors do not match the config (missing {bad[:5]}, unexpected "
                          f"{result.unexpected_keys[:5]})")
    return model.eval()
