"""Structured pruning of a Llama-layout model in place: one calibration pass on the dense model ranks every
unit (``measure`` + ``importance``), then the cuts (``surgery``) keep the best units of each kind.  Width:
MLP channels, query heads within each key/value group, hidden channels; depth: the blocks of lowest block
influence.  ``plan_for_target`` picks sizes that leave a given fraction of the parameters."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Literal

import torch

from lowbit.errors import LowbitError
from lowbit.structured import importance as imp
from lowbit.structured.measure import activation_scores, measure
from lowbit.structured.taylor import taylor_scores
from lowbit.structured.surgery import (check_llama_layout, drop_layers, head_dim_of, keep_hidden_channels,
                                       keep_mlp_channels, keep_query_heads)


@dataclass
class StructuredPlan:
    """New sizes (None: unchanged) and how many blocks to drop."""

    intermediate_size: int | None = None
    heads_per_group: int | None = None  # query heads kept per key/value head
    hidden_size: int | None = None
    drop_layers: int = 0

    def check(self, model: torch.nn.Module) -> None:
        """Every size within the model's, before any work (LowbitError naming the fix)."""
        cfg = model.config
        group = cfg.num_attention_heads // cfg.num_key_value_heads
        bounds = [("intermediate_size", self.intermediate_size, cfg.intermediate_size),
                  ("heads_per_group", self.heads_per_group, group),
                  ("hidden_size", self.hidden_size, cfg.hidden_size)]
        for name, new, old in bounds:
            if new is not None and not 0 < new <= old:
                raise LowbitError(f"{name} must be in 1..{old} (the model's), got {new}")
        heads = cfg.num_key_value_heads * (self.heads_per_group or group)
        if self.hidden_size is not None and self.hidden_size % heads:
            raise LowbitError(f"hidden_size {self.hidden_size} is not a multiple of the {heads} attention heads, which "
                              f"transformers requires of a config; use a multiple of {heads}")
        if not 0 <= self.drop_layers < cfg.num_hidden_layers:
            raise LowbitError(f"drop_layers must be in 0..{cfg.num_hidden_layers - 1}, got {self.drop_layers}")


@dataclass
class StructuredReport:
    """What was cut: parameters before / after, the new config sizes, the dropped layers."""

    params_before: int
    params_after: int
    config: dict[str, Any]
    dropped: list[int] = field(default_factory=list)
    calib_tokens: int = 0

    @property
    def fraction(self) -> float:
        return self.params_after / self.params_before


def count_params(model: torch.nn.Module) -> int:
    """Distinct parameters (tied embeddings once)."""
    return sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())


def prune_structured(model: torch.nn.Module, calib: torch.Tensor, plan: StructuredPlan,
                     batch_size: int = 8, importance: Literal["activation", "taylor"] = "activation"
                     ) -> StructuredReport:
    """Rank on ``calib`` (activation norms and block influence, or first-order Taylor saliency) and cut
    ``model`` in place to ``plan``; the config follows."""
    check_llama_layout(model)
    plan.check(model)
    if importance not in ("activation", "taylor"):
        raise LowbitError(f"importance must be activation or taylor, got {importance!r}")
    cfg = model.config
    before = count_params(model)
    if importance == "taylor":
        scores = taylor_scores(model, calib, batch_size)
    else:
        scores = activation_scores(measure(model, calib, batch_size), cfg.num_attention_heads)
    if plan.intermediate_size is not None and plan.intermediate_size < cfg.intermediate_size:
        keep_mlp_channels(model, [imp.top_channels(s, plan.intermediate_size) for s in scores.mlp])
    group = cfg.num_attention_heads // cfg.num_key_value_heads
    if plan.heads_per_group is not None and plan.heads_per_group < group:
        keep_query_heads(model, [imp.heads_to_keep(s, cfg.num_key_value_heads, plan.heads_per_group)
                                 for s in scores.heads])
    if plan.hidden_size is not None and plan.hidden_size < cfg.hidden_size and scores.hidden is not None:
        keep_hidden_channels(model, imp.top_channels(scores.hidden, plan.hidden_size))
    dropped: list[int] = []
    if plan.drop_layers:
        dropped = imp.layers_to_drop(scores.layers, plan.drop_layers)
        drop_layers(model, dropped)
    sizes = {k: getattr(cfg, k) for k in ("hidden_size", "intermediate_size", "num_attention_heads",
                                          "num_key_value_heads", "num_hidden_layers", "head_dim")}
    return StructuredReport(before, count_params(model), sizes, dropped, scores.tokens)


def params_of(cfg: Any, hidden: int, inter: int, heads: int, layers: int, head_dim: int) -> int:
    """Parameter count of a Llama with these sizes (tied or untied head as ``cfg`` says, no biases)."""
    kv = cfg.num_key_value_heads * head_dim
    attn = hidden * heads * head_dim * 2 + hidden * kv * 2
    mlp = 3 * hidden * inter
    per_block = attn + mlp + 2 * hidden
    emb = cfg.vocab_size * hidden * (1 if getattr(cfg, "tie_word_embeddings", False) else 2)
    return layers * per_block + emb + hidden


def plan_for_target(model: torch.nn.Module, fraction: float, axis: Literal["width", "depth"] = "width",
                    multiple: int = 8) -> StructuredPlan:
    """Sizes leaving about ``fraction`` of the parameters: ``depth`` drops the fewest blocks that reach it;
    ``width`` shrinks the MLP and the hidden size by one common ratio (rounded to ``multiple``, the hidden size
    also to a multiple of the heads), Minitron's width axes; heads stay."""
    if not 0 < fraction < 1:
        raise LowbitError(f"the target fraction of parameters must be in (0, 1), got {fraction:g}")
    cfg = model.config
    hd = head_dim_of(model)
    full = params_of(cfg, cfg.hidden_size, cfg.intermediate_size, cfg.num_attention_heads, cfg.num_hidden_layers, hd)
    if axis == "depth":
        for k in range(1, cfg.num_hidden_layers):
            if params_of(cfg, cfg.hidden_size, cfg.intermediate_size, cfg.num_attention_heads,
                         cfg.num_hidden_layers - k, hd) <= fraction * full:
                return StructuredPlan(drop_layers=k)
        raise LowbitError(f"dropping layers cannot reach {fraction:g} of the parameters (embeddings remain); "
                          "use axis width or a larger fraction")

    hidden_step = math.lcm(multiple, cfg.num_attention_heads)  # transformers wants hidden % heads == 0

    def sizes(r: float) -> tuple[int, int]:
        def rnd(x: int, step: int) -> int:
            return max(step, int(round(x * r / step)) * step)
        return rnd(cfg.hidden_size, hidden_step), rnd(cfg.intermediate_size, multiple)

    lo, hi = 0.0, 1.0
    for _ in range(40):
        mid = (lo + hi) / 2
        h, i = sizes(mid)
        if params_of(cfg, h, i, cfg.num_attention_heads, cfg.num_hidden_layers, hd) > fraction * full:
            hi = mid
        else:
            lo = mid
    h, i = sizes(lo)
    return StructuredPlan(intermediate_size=i, hidden_size=h)
