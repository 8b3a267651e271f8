"""Summary facts about a model without running it: architecture, sizes, bits per weight."""

from __future__ import annotations

from collections import Counter
from dataclasses import asdict, dataclass
from typing import Any

import torch

from lowbit.checkpoint import safetensors_header
from lowbit.models.loading import ModelSource, load_config, resolve_model, _check_causal_lm


@dataclass
class ModelInfo:
    ref: str
    kind: str
    path: str | None
    architecture: str
    model_type: str
    layers: int | None
    hidden_size: int | None
    attention_heads: int | None
    kv_heads: int | None
    vocab_size: int | None
    context: int | None
    parameters: int
    dtype: str
    tensor_types: dict[str, int]
    size_on_disk: int
    bits_per_weight: float | None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _count_parameters(config: Any) -> int:
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    return sum(p.numel() for p in model.parameters())  # tied weights are yielded once


def _tensor_types(source: ModelSource) -> Counter[str]:
    counts: Counter[str] = Counter()
    for f in source.files:
        if f.suffix == ".gguf":
            from gguf import GGUFReader

            counts.update(t.tensor_type.name for t in GGUFReader(str(f)).tensors)
        elif f.suffix == ".safetensors":
            counts.update(t.dtype for t in safetensors_header(f).values())
    return counts


def _architecture(config: Any) -> str:
    from transformers import MODEL_FOR_CAUSAL_LM_MAPPING

    names = getattr(config, "architectures", None)
    return names[0] if names else MODEL_FOR_CAUSAL_LM_MAPPING[type(config)].__name__


def model_info(ref: str, cache: str | None = None) -> ModelInfo:
    """Facts about a model reference (weights are not loaded; the parameter count uses a meta model)."""
    source = resolve_model(ref, cache)
    config = load_config(source)
    _check_causal_lm(config, ref)
    params = _count_parameters(config)
    types = _tensor_types(source)
    dtype = str(getattr(config, "dtype", None) or "unknown")
    if source.kind == "gguf":
        dtype = "gguf:" + "/".join(t for t, _ in types.most_common())
    size = source.size_on_disk
    return ModelInfo(
        ref=ref,
        kind=source.kind,
        path=str(source.path) if source.path else None,
        architecture=_architecture(config),
        model_type=config.model_type,
        layers=getattr(config, "num_hidden_layers", None),
        hidden_size=getattr(config, "hidden_size", None),
        attention_heads=getattr(config, "num_attention_heads", None),
        kv_heads=getattr(config, "num_key_value_heads", None),
        vocab_size=getattr(config, "vocab_size", None),
        context=getattr(config, "max_position_embeddings", None),
        parameters=params,
        dtype=dtype.replace("torch.", ""),
        tensor_types=dict(types),
        size_on_disk=size,
        bits_per_weight=size * 8 / params if size and params else None,
    )
