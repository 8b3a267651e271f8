"""compressed-tensors' ``sparse-bitmask`` layout for pruned full-precision models: each pruned linear's weight
is stored as its nonzero values (row by row), a bitmask of where they sit (one bit per weight, each row packed
little-endian into ``ceil(in / 8)`` bytes), the offset of each row's first value, and the dense shape
(tensors ``NAME.weight.compressed``, ``.bitmask``, ``.row_offsets``, ``.shape``).  ``config.json`` carries
``quantization_config.sparsity_config`` (format, targets, ignore, global sparsity, structure).

The compressed-tensors library dropped its sparse compressors after 0.14 (0.19 and 0.20 cannot read this
layout); lowbit writes it as 0.14 reads it and reads it back itself.  Sizes: 1 bit per weight plus the kept
values, so 50% sparsity at fp32 stores 17 bits per weight (16 for 2:4 at fp16 would be 9)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from lowbit.atomic import atomic_dir
from lowbit.checkpoint import read_config_json
from lowbit.errors import LowbitError

FORMAT = "sparse-bitmask"
WEIGHTS_FILE = "model.safetensors"
PARTS = ("compressed", "bitmask", "row_offsets", "shape")
_SAFETENSORS_DTYPES = {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16", torch.float64: "F64"}


def pack_mask(mask: torch.Tensor) -> torch.Tensor:
    """(rows, cols) bool -> (rows, ceil(cols / 8)) uint8, bit ``j % 8`` of byte ``j // 8`` for column ``j``."""
    rows, cols = mask.shape
    pad = (-cols) % 8
    m = torch.nn.functional.pad(mask.to(torch.uint8), (0, pad)).reshape(rows, -1, 8)
    weights = (2 ** torch.arange(8, dtype=torch.int32)).reshape(1, 1, 8)
    return (m.to(torch.int32) * weights).sum(-1).to(torch.uint8)


def unpack_mask(packed: torch.Tensor, cols: int) -> torch.Tensor:
    """Inverse of ``pack_mask``."""
    bits = (packed.to(torch.int32).unsqueeze(-1) >> torch.arange(8, dtype=torch.int32)) & 1
    return bits.reshape(packed.shape[0], -1)[:, :cols].bool()


def compress(weight: torch.Tensor) -> dict[str, torch.Tensor]:
    """The four tensors of one weight (see the module docstring)."""
    mask = weight != 0
    counts = mask.sum(1)
    return {"compressed": weight[mask].contiguous(), "bitmask": pack_mask(mask),
            "row_offsets": (torch.cumsum(counts, 0) - counts).to(torch.int64),
            "shape": torch.tensor(list(weight.shape), dtype=torch.int64)}


def decompress(parts: dict[str, torch.Tensor]) -> torch.Tensor:
    """The dense weight of ``compress``'s tensors (checked: shape, mask and value count agree)."""
    shape = [int(x) for x in parts["shape"].tolist()]
    if len(shape) != 2 or parts["bitmask"].shape != (shape[0], -(-shape[1] // 8)):
        raise LowbitError(f"sparse-bitmask tensors disagree with their shape {shape}")
    mask = unpack_mask(parts["bitmask"], shape[1])
    values = parts["compressed"]
    if int(mask.sum()) != values.numel():
        raise LowbitError(f"sparse-bitmask mask marks {int(mask.sum())} values but {values.numel()} are stored")
    out = torch.zeros(shape, dtype=values.dtype)
    out[mask] = values
    return out


def pruned_linears(model: torch.nn.Module) -> dict[str, torch.nn.Linear]:
    """The model's full-precision linears holding exact zeros (the lm_head and quantized layers left out)."""
    from lowbit.quantized_layers import QuantizedModule

    return {n: m for n, m in model.named_modules() if type(m) is torch.nn.Linear and not isinstance(m, QuantizedModule)
            and "lm_head" not in n and bool((m.weight == 0).any())}


def write_sparse_bitmask(model: torch.nn.Module, tokenizer: Any, out: str | Path,
                         extra_files: dict[str, str] | None = None) -> Path:
    """Write a pruned full-precision ``model`` with its pruned linears in the sparse-bitmask layout."""
    layers = pruned_linears(model)
    if not layers:
        raise LowbitError("no linear layer of this model has zero weights: nothing for sparse-bitmask to compress; "
                          "prune it first (lowbit prune) or write fake-quant")
    state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    zeros = total = 0
    for name, layer in layers.items():
        w = state.pop(f"{name}.weight")
        zeros += int((w == 0).sum())
        total += w.numel()
        state.update({f"{name}.weight.{k}": v for k, v in compress(w.cpu()).items()})
    if getattr(model.config, "tie_word_embeddings", False):
        state.pop("lm_head.weight", None)
    cfg = model.config.to_dict()
    cfg["architectures"] = cfg.get("architectures") or [type(model).__name__]
    cfg["quantization_config"] = {"quant_method": "compressed-tensors", "format": "dense", "config_groups": {},
                                  "sparsity_config": {"format": FORMAT, "targets": sorted(layers), "ignore": [],
                                                      "global_sparsity": zeros / total,
                                                      "sparsity_structure": "unstructured"}}
    with atomic_dir(Path(out)) as tmp:
        save_file(state, str(tmp / WEIGHTS_FILE), metadata={"format": "pt"})
        (tmp / "config.json").write_text(json.dumps(cfg, indent=2, default=str))
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        for fname, text in (extra_files or {}).items():
            (tmp / fname).write_text(text)
    return Path(out)


def is_sparse_bitmask(path: str | Path) -> bool:
    """Whether ``path/config.json`` declares a sparse-bitmask checkpoint without quantized groups."""
    cfg = Path(path) / "config.json"
    if not cfg.is_file():
        return False
    qc = read_config_json(cfg).get("quantization_config") or {}
    sc = qc.get("sparsity_config") if isinstance(qc, dict) else None
    return isinstance(sc, dict) and sc.get("format") == FORMAT and not qc.get("config_groups")


def load_sparse_bitmask(path: str | Path, dtype: torch.dtype = torch.float32) -> torch.nn.Module:
    """The dense model of a sparse-bitmask checkpoint; every tensor checked against the config's model."""
    from lowbit.checkpoint import LoadReport, TensorMeta, compare_tensors, finite_state
    from lowbit.export.compressed_tensors import plain_model
    from lowbit.experts import unfuse_like

    path = Path(path)
    model = plain_model(path, dtype)
    dense: dict[str, torch.Tensor] = {}
    parts: dict[str, dict[str, torch.Tensor]] = {}
    with safe_open(str(path / WEIGHTS_FILE), framework="pt") as f:
        unfuse_like(model, f.keys())  # pruned MoE experts, one linear each
        expected = model.state_dict()
        for key in f.keys():
            base, _, part = key.rpartition(".")
            if part in PARTS and key not in expected:  # NAME.weight.compressed ...
                parts.setdefault(base, {})[part] = f.get_tensor(key)
            else:
                dense[key] = f.get_tensor(key)
    for base, p in parts.items():
        if base not in expected or set(p) != set(PARTS):
            raise LowbitError(f"{path}: sparse-bitmask tensors of {base} are incomplete or belong to no weight of the "
                              "model config.json describes; re-export the checkpoint")
        dense[base] = decompress(p).to(dtype)
    report = LoadReport(str(path), "check that config.json belongs to these weights, or re-export the checkpoint")
    found = {k: TensorMeta(tuple(v.shape), _SAFETENSORS_DTYPES.get(v.dtype, str(v.dtype))) for k, v in dense.items()}
    compare_tensors(report, expected, found, model).check()
    model.load_state_dict(dense, strict=False)
    if getattr(model.config, "tie_word_embeddings", False):
        model.tie_weights()
    finite_state(report, model).check()
    return model.eval()
