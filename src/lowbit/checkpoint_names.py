"""Where a model's tensor lies in a checkpoint written by another transformers layout.

transformers 5 renames some families' tensors when it loads them (Mixtral's ``block_sparse_moe`` is ``mlp``) and
merges per-expert MoE weights into 3-D parameters; ``save_pretrained`` writes the original names back.  A streamed
run reads tensors by name without loading the model, so it asks this module for the names a model key may have on
disk: transformers' renamings undone, and, for a per-expert linear (``lowbit.experts``), the per-expert
name that transformers' converter would merge (only converters that merely stack experts are followed).
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

import torch

_PER_EXPERT = re.compile(r"^(?P<parent>.*\.experts)\.(?P<e>\d+)\.(?P<proj>gate_proj|up_proj|down_proj)\.weight$")
_FUSED_OF = {"gate_proj": ("gate_up_proj", 0), "up_proj": ("gate_up_proj", 1), "down_proj": ("down_proj", 0)}
_STACKING = ({"MergeModulelist"}, {"MergeModulelist", "Concatenate"})


def _conversions(model: Any) -> list[Any]:
    try:
        from transformers.conversion_mapping import get_model_conversion_mapping
    except ImportError:  # a transformers without conversion mappings keeps checkpoint names
        return []
    try:
        return list(get_model_conversion_mapping(model, add_legacy=True) or [])
    except Exception:  # noqa: BLE001 - an unknown model type: names as they are
        return []


def _patterns(value: Any) -> list[str]:
    return [value] if isinstance(value, str) else list(value or [])


def _literal(pattern: str) -> str:
    """A converter's pattern as the text it matches (they are written as dotted names, ``*`` for an index)."""
    return pattern.replace("\\.", ".")


def checkpoint_names(model: Any) -> Callable[[str], list[str]]:
    """A function giving the other names (besides itself) that tensor ``key`` of ``model`` may have on disk."""
    renamings, converters = [], []
    for c in _conversions(model):
        kind = type(c).__name__
        if kind in ("WeightRenaming", "PrefixChange", "GroupWeightRename"):
            renamings.append(c)
        elif kind == "WeightConverter" and {type(op).__name__ for op in c.operations} in _STACKING:
            converters.append(c)

    def undo_renamings(key: str) -> str:
        for r in reversed(renamings):
            try:
                key, _ = r.reverse_transform().rename_source_key(key)
            except Exception:  # noqa: BLE001 - a renaming this version cannot reverse: keep the name
                continue
        return key

    def names(key: str) -> list[str]:
        derived = []
        m = _PER_EXPERT.match(key)
        if m:
            fused, slot = _FUSED_OF[m["proj"]]
            target = f"{m['parent']}.{fused}"
            for c in converters:
                targets, sources = [_literal(t) for t in _patterns(c.target_patterns)], _patterns(c.source_patterns)
                hit = next((t for t in targets if target.endswith(t)), None)
                if hit is not None and slot < len(sources):
                    derived.append(target[: len(target) - len(hit)] + _literal(sources[slot]).replace("*", m["e"]))
        candidates = [undo_renamings(n) for n in derived] + derived + [undo_renamings(key)]
        return [n for n in dict.fromkeys(candidates) if n != key]

    return names


def as_saved(model: Any, state: dict[str, Any]) -> dict[str, Any]:
    """``state`` (full model keys, a part of ``model``'s state) under the names and layout ``save_pretrained``
    writes for ``model`` (transformers' conversions reverted), each tensor its own copy."""
    if not _conversions(model):
        return state
    from transformers.core_model_loading import revert_weight_conversion

    saved = revert_weight_conversion(model, state)
    return {k: v.clone(memory_format=torch.contiguous_format) for k, v in saved.items()}


def saved_layer_names(model: Any, layers: list[str]) -> dict[str, str]:
    """``model``'s per-expert linears among ``layers`` whose weights another layout names on disk (Mixtral's
    ``block_sparse_moe.experts.E.w1``): layer name -> the name to write, so that transformers finds them."""
    other = checkpoint_names(model)
    out = {}
    for name in layers:
        if _PER_EXPERT.match(name + ".weight"):
            alternatives = other(name + ".weight")
            if alternatives:
                out[name] = alternatives[0].removesuffix(".weight")
    return out
