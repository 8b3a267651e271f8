"""RPTQ (Yuan et al., 2023): reorder-based post-training quantization of activations.

Channels with similar calibration ranges are clustered (k-means on each channel's ``(min, max)``)
and every cluster gets its own static activation range, so a few wide outlier channels no longer
stretch the range of all the others.  The channels are reordered so each cluster is contiguous;
the reorder is folded into neighbours: into the rows of a feeding linear (``up_proj`` with its gate
partner, for ``down_proj``) or, for a norm, fused into its output as a run-time gather (the paper's
LayerNorm fusion).  Inputs whose producer cannot be reordered (``o_proj`` under grouped-query
attention, whose heads pin channel positions) keep their order and are quantized cluster-wise by
channel index.  The layers' activation spec must be a static int spec: it gives bits and grid, the
clusters give the ranges.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch

from lowbit.activations.quantizer import ActQuantizer, ClusterActQuantizer
from lowbit.arch import scale_groups
from lowbit.core.kmeans import kmeans
from lowbit.errors import LowbitError
from lowbit.fields import bounded
from lowbit.models.folding import fold_problem
from lowbit.rotation.permutation import attach_output_permutation, permute_inputs, permute_outputs
from lowbit.transforms.base import BlockTransform, register_transform
from lowbit.transforms.smoothquant import GroupInputs


def channel_clusters(cmin: torch.Tensor, cmax: torch.Tensor, k: int, seed: int = 0) -> torch.Tensor:
    """Cluster id of each channel from its calibration range (k-means on ``(min, max)``)."""
    labels, _ = kmeans(torch.stack([cmin.float(), cmax.float()], 1), k, seed=seed)
    return labels


def cluster_order(labels: torch.Tensor) -> torch.Tensor:
    """The permutation that makes each cluster contiguous (clusters in id order, channels stable)."""
    return torch.sort(labels, stable=True).indices


@register_transform
@dataclass
class RPTQ(BlockTransform):
    """Options: ``clusters`` per input (k-means k), ``reorder`` (fold the permutation; the quantized
    arithmetic is the same without it, only the kernel layout differs), ``seed``."""

    name: ClassVar[str] = "rptq"
    clusters: int = bounded(32, ge=1)
    reorder: bool = True
    seed: int = bounded(0, ge=0, le=2**32 - 1)
    _clusters: dict[str, torch.Tensor] = field(default_factory=dict, init=False, repr=False)  # by full layer name

    def input_quantizer(self, name: str, quantizer: Any) -> Any:
        """A static per-tensor quantizer becomes one range per channel cluster."""
        labels = self._clusters.get(name)
        if labels is None or quantizer is None:
            return quantizer
        if type(quantizer) is not ActQuantizer:
            raise LowbitError(f"{name}: its step quantizes its inputs its own way ({type(quantizer).__name__}); "
                              "it cannot take RPTQ's channel clusters")
        return ClusterActQuantizer(quantizer.spec, labels)

    def _input_sets(self, ctx: Any) -> list[tuple[Any, list[str]]]:
        """Targets grouped by shared input: ``(scale group or None, relative linear names)``."""
        targets = {n[len(ctx.prefix):]: m for n, m in ctx.layers.items()}
        sets, covered = [], set()
        for g in scale_groups(ctx.model):
            if all(n in targets for n in g.linears) and not covered & set(g.linears):
                foldable = fold_problem(ctx.block, g, targets, "rptq") is None
                sets.append((g if foldable else None, list(g.linears)))
                covered |= set(g.linears)
        sets += [(None, [n]) for n in targets if n not in covered]
        return sets

    def _check_specs(self, ctx: Any) -> None:
        for name, method in ctx.methods.items():
            sp = method.activations
            if sp is None or sp.dynamic or sp.type != "int":
                raise LowbitError(f"rptq gives each channel cluster a static range, but {name}'s activation spec is "
                                  f"{'missing' if sp is None else 'dynamic or not int'}; use a static int spec such as "
                                  "A8_TENSOR")

    @torch.no_grad()
    def apply_block(self, ctx: Any) -> None:
        self._check_specs(ctx)
        sets = self._input_sets(ctx)
        cap = GroupInputs({ctx.prefix + names[0]: ctx.block.get_submodule(names[0]) for _, names in sets}, rows=0)
        cap.run(ctx.block, ctx.inputs)
        for g, names in sets:
            key = ctx.prefix + names[0]
            if key not in cap.cmin:
                raise LowbitError(f"rptq: no calibration input reached {key}")
            labels = channel_clusters(cap.cmin[key], cap.cmax[key], self.clusters, self.seed)
            lins = [ctx.block.get_submodule(n) for n in names]
            reordered = self.reorder and g is not None
            if reordered:
                perm = cluster_order(labels)
                self._fold(ctx.block, g, lins, perm)
                labels = labels[perm]
            for n in names:
                self._clusters[ctx.prefix + n] = labels
            self.records.append({"block": ctx.index, "linears": names, "clusters": int(labels.max()) + 1,
                                 "reordered": reordered, "prev": None if g is None else g.prev})

    @staticmethod
    def _fold(block: torch.nn.Module, g: Any, lins: list[torch.nn.Module], perm: torch.Tensor) -> None:
        prev = block.get_submodule(g.prev)
        if isinstance(prev, torch.nn.Linear):
            for name in (g.prev, *g.partners):
                permute_outputs(block.get_submodule(name), perm)
        else:
            attach_output_permutation(prev, perm, perm.numel())
        for lin in lins:
            permute_inputs(lin, perm)
