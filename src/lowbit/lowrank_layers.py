"""Low-rank layers: a linear stored and run as two factors, ``y = up(down(x))`` with ``down`` (rank x in) and
``up`` (out x rank, the bias), so a rank-r layer holds and multiplies ``r (in + out)`` values instead of
``in x out``.

The ``lowrank`` step leaves its factors on the layer (``FACTORS``); ``factorize_modules`` then swaps those
layers for ``LowRankLinear``.  A checkpoint of such a model holds the factors (``NAME.down.weight``,
``NAME.up.weight``) and ``LOWRANK_FILE`` (each layer's rank), which lowbit's loader reads back
(``restore_lowrank`` before loading); ``dense_weight`` gives the product for exports any transformers loads.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

LOWRANK_FILE = "lowbit_lowrank.json"
FACTORS = "lowbit_factors"  # attribute a factorized nn.Linear carries until it is swapped: (A, B)


class LowRankLinear(torch.nn.Module):
    """``up(down(x))``: a linear layer of rank ``rank`` (module docstring)."""

    def __init__(self, in_features: int, out_features: int, rank: int, bias: bool = True,
                 device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> None:
        super().__init__()
        self.in_features, self.out_features, self.rank = in_features, out_features, rank
        self.down = torch.nn.Linear(in_features, rank, bias=False, device=device, dtype=dtype)
        self.up = torch.nn.Linear(rank, out_features, bias=bias, device=device, dtype=dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.up(self.down(x))

    def dense_weight(self) -> torch.Tensor:
        """The (out, in) product ``up.weight @ down.weight``."""
        return self.up.weight @ self.down.weight

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, rank={self.rank}"


def _set(model: torch.nn.Module, name: str, module: torch.nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, module)


@torch.no_grad()
def factorize_modules(model: torch.nn.Module) -> dict[str, int]:
    """Swap every linear carrying ``FACTORS`` for a ``LowRankLinear`` holding them; the ranks, by layer name."""
    ranks = {}
    for name, m in list(model.named_modules()):
        factors = getattr(m, FACTORS, None)
        if not isinstance(m, torch.nn.Linear) or factors is None:
            continue
        a, b = factors
        new = LowRankLinear(m.in_features, m.out_features, a.shape[1], m.bias is not None, m.weight.device,
                            m.weight.dtype)
        new.down.weight.copy_(b)
        new.up.weight.copy_(a)
        if m.bias is not None:
            new.up.bias.copy_(m.bias)
        _set(model, name, new)
        ranks[name] = int(a.shape[1])
    return ranks


def lowrank_ranks(model: torch.nn.Module) -> dict[str, int]:
    """Every ``LowRankLinear`` of ``model`` and its rank."""
    return {n: m.rank for n, m in model.named_modules() if isinstance(m, LowRankLinear)}


def restore_lowrank(model: torch.nn.Module, ranks: dict[str, int]) -> None:
    """Swap the linears named in ``ranks`` for empty ``LowRankLinear`` of those ranks (before loading weights)."""
    modules = dict(model.named_modules())
    for name, rank in ranks.items():
        old = modules.get(name)
        if not isinstance(old, torch.nn.Linear) or not 0 < rank <= min(old.in_features, old.out_features):
            raise ValueError(f"{name}: not a linear layer of this model, or rank {rank} does not fit it")
        _set(model, name, LowRankLinear(old.in_features, old.out_features, rank, old.bias is not None,
                                        old.weight.device, old.weight.dtype))


def write_ranks(model: torch.nn.Module, directory: Path) -> None:
    """``LOWRANK_FILE`` in ``directory`` when the model has low-rank layers."""
    ranks = lowrank_ranks(model)
    if ranks:
        (directory / LOWRANK_FILE).write_text(json.dumps(ranks, indent=1))


def dense_lowrank_state(model: torch.nn.Module, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``state`` with each ``LowRankLinear``'s factors replaced by its dense ``weight`` (and ``bias``)."""
    for name, m in model.named_modules():
        if isinstance(m, LowRankLinear):
            prefix = f"{name}." if name else ""
            for key in ("down.weight", "up.weight", "up.bias"):
                state.pop(prefix + key, None)
            state[prefix + "weight"] = m.dense_weight().detach().contiguous()
            if m.up.bias is not None:
                state[prefix + "bias"] = m.up.bias.detach()
    return state
