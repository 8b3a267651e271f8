"""What every pruning step shares (magnitude, Wanda, SparseGPT): the sparsity or N:M pattern, the mask an
earlier step left, and OWL's non-uniform layer sparsity.

OWL (Yin et al., 2023, "Outlier Weighed Layerwise sparsity"): layers holding more outliers are pruned less.
Before any pruning, one pass of the calibration text through the dense model gives every decoder block's
outlier ratio: the fraction of its Wanda scores ``|W_ij| ||X_j||`` above ``owl_m`` times their mean over the
block.  The ratios are rescaled to ``[0, 2 owl_lambda]`` and centred on the target density, so block
sparsities lie within ``sparsity +- owl_lambda`` and average to ``sparsity`` (the paper's M = 5,
lambda = 0.08 on LLaMA).  Unstructured only.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import ClassVar

import torch

from lowbit.core.sparsity import lowest_n_of_m, lowest_overall, lowest_per_row, owl_sparsities, parse_pattern
from lowbit.errors import LowbitError
from lowbit.fields import bounded
from lowbit.methods.base import WeightMethod
from lowbit.methods.statistics import ChannelNorm, LayerStats, SharedProducts

_BLOCK = re.compile(r"^(.*?\.\d+)\.")  # "model.layers.3.mlp.up_proj" -> "model.layers.3"


def block_of(name: str) -> str:
    """The decoder block a layer name belongs to (its path up to the first numeric component)."""
    m = _BLOCK.match(name)
    return m.group(1) if m else name


@dataclass
class Pruner(WeightMethod):
    """Base of the pruning steps: a non-rounding step leaving a mask the steps after it keep."""

    sparsity: float = bounded(0.5, ge=0.0, lt=1.0)
    pattern: str | None = None  # "N:M" semi-structured: N of every M consecutive input weights of a row
    owl: bool = False  # OWL: per-block sparsity from outlier ratios (module docstring)
    owl_lambda: float = bounded(0.08, ge=0.0, lt=0.5)
    owl_m: float = bounded(5.0, gt=0.0)

    accepts_activations: ClassVar[bool] = False
    prunes: ClassVar[bool] = True

    def __post_init__(self) -> None:
        super().__post_init__()
        self._block_sparsity: dict[str, float] = {}
        if self.pattern is not None:
            parse_pattern(self.pattern)
            if self.owl:
                raise LowbitError(f"{self.name}: owl sets an unstructured sparsity per block; drop pattern or owl")
        if self.owl and self.owl_lambda > min(self.sparsity, 1 - self.sparsity):
            raise LowbitError(f"{self.name}: owl_lambda {self.owl_lambda:g} would take some block's sparsity outside "
                              f"[0, 1) around {self.sparsity:g}; use owl_lambda <= {min(self.sparsity, 1 - self.sparsity):g}")

    def rounds(self) -> bool:
        return False

    def keeps_mask(self) -> bool:
        return True  # an earlier mask is merged into this one

    def n_of_m(self) -> tuple[int, int] | None:
        return None if self.pattern is None else parse_pattern(self.pattern)

    def validate_layer(self, name: str, layer: torch.nn.Module) -> None:
        cols = self.linear_weight(name, layer).shape[1]
        if self.pattern is not None and cols % parse_pattern(self.pattern)[1]:
            raise LowbitError(f"{name} has {cols} input features, not a multiple of {self.pattern}'s M; "
                              "use another pattern or unstructured sparsity")

    def layer_sparsity(self, name: str) -> float:
        """The unstructured sparsity of layer ``name``: its block's OWL share, else ``sparsity``."""
        return self._block_sparsity.get(block_of(name), self.sparsity)

    def select(self, name: str, score: torch.Tensor, per_row: bool, prior: torch.Tensor | None) -> torch.Tensor:
        """The mask of the lowest scores (N:M, per row or over the layer), merged with an earlier ``prior``."""
        if prior is not None:
            score = score.masked_fill(prior.to(score.device), float("-inf"))  # already pruned: counted first
        nm = self.n_of_m()
        if nm is not None:
            mask = lowest_n_of_m(score, *nm)
        elif per_row:
            mask = lowest_per_row(score, self.layer_sparsity(name))
        else:
            mask = lowest_overall(score, self.layer_sparsity(name))
        return mask if prior is None else mask | prior.to(mask.device)

    def note(self, mask: torch.Tensor, how: str) -> str:
        return f"{100 * mask.float().mean().item():.1f}% pruned ({self.name}, {how})"

    def needs_whole_model(self) -> str | None:
        return "OWL's outlier pass over the whole dense model" if self.owl else None

    @torch.no_grad()
    def prepare_model(self, model: torch.nn.Module, calib: torch.Tensor, layers: dict[str, torch.nn.Module],
                      batch_size: int) -> None:
        """OWL: measure every block's outlier ratio on the dense model and set the blocks' sparsities."""
        if not self.owl:
            return
        norms = _input_norms(model, calib, layers, batch_size)
        above: dict[str, float] = {}
        counts: dict[str, int] = {}
        for block in dict.fromkeys(block_of(n) for n in norms):
            flat = torch.cat([wanda_scores(layers[n].weight, norms[n]).flatten() for n in norms if block_of(n) == block])
            above[block] = (flat > self.owl_m * flat.mean()).float().sum().item()
            counts[block] = flat.numel()
        blocks = list(above)
        ratios = torch.tensor([above[b] / counts[b] for b in blocks], dtype=torch.float64)
        self._block_sparsity = dict(zip(blocks, owl_sparsities(ratios, self.sparsity, self.owl_lambda).tolist()))


def wanda_scores(w: torch.Tensor, input_norm: torch.Tensor) -> torch.Tensor:
    """``|W_ij| * ||X_j||_2`` (fp32): Wanda's pruning score, OWL's outlier score."""
    return w.detach().abs().float() * input_norm.float().to(w.device).unsqueeze(0)


@torch.no_grad()
def _input_norms(model: torch.nn.Module, calib: torch.Tensor, layers: dict[str, torch.nn.Module],
                 batch_size: int) -> dict[str, torch.Tensor]:
    """Each layer's input-channel L2 norms over ``calib`` run through ``model`` as it is (layers no token reached
    are left out)."""
    norms = {name: ChannelNorm() for name in layers}
    shared = SharedProducts()

    def hook(name: str):
        def fn(module: torch.nn.Module, args: tuple, output: torch.Tensor) -> None:
            x = args[0].detach()
            norms[name].update(x, x.reshape(-1, x.shape[-1]).float(), shared)
        return fn

    handles = [m.register_forward_hook(hook(n)) for n, m in layers.items()]
    try:
        device = next(model.parameters()).device
        for i in range(0, calib.shape[0], batch_size):
            model(calib[i : i + batch_size].to(device), use_cache=False)
            shared.clear()
    finally:
        for h in handles:
            h.remove()
    out = {}
    for name, norm in norms.items():
        st = LayerStats()
        norm.write(st)
        if ChannelNorm.key in st.extra:
            out[name] = st.extra[ChannelNorm.key]
    return out
