"""Channel permutations folded into neighbouring ops (RPTQ's reorder).

``permute_outputs(linear, perm)`` reorders a linear's output rows, ``permute_inputs(linear, perm)``
its input columns: ``permute_inputs(next, p)`` after ``permute_outputs(prev, p)`` computes the same
function.  A norm cannot reorder its output through its weights alone (it normalises over all
channels, then scales elementwise), so ``attach_output_permutation`` gathers its output at run time,
which is RPTQ's reorder fused into the LayerNorm kernel.
"""

from __future__ import annotations

from typing import Any

import torch

_ATTR = "lowbit_output_permutation"


def check_permutation(perm: torch.Tensor, width: int) -> torch.Tensor:
    """``perm`` as a long tensor, or a ValueError unless it is a permutation of ``range(width)``."""
    p = torch.as_tensor(perm).long().reshape(-1)
    if p.numel() != width or not torch.equal(torch.sort(p).values, torch.arange(width)):
        raise ValueError(f"not a permutation of {width} channels")
    return p


@torch.no_grad()
def permute_outputs(linear: torch.nn.Linear, perm: torch.Tensor) -> None:
    """Reorder ``linear``'s output channels (weight rows and bias) by ``perm``."""
    p = check_permutation(perm, linear.weight.shape[0]).to(linear.weight.device)
    linear.weight.copy_(linear.weight[p])
    if linear.bias is not None:
        linear.bias.copy_(linear.bias[p])


@torch.no_grad()
def permute_inputs(linear: torch.nn.Linear, perm: torch.Tensor) -> None:
    """Reorder ``linear``'s input columns by ``perm``."""
    p = check_permutation(perm, linear.weight.shape[1]).to(linear.weight.device)
    linear.weight.copy_(linear.weight[:, p])


def _hook(module: torch.nn.Module, args: tuple[Any, ...], output: torch.Tensor) -> torch.Tensor:
    perm = module.__dict__[_ATTR]
    if perm.device != output.device:
        perm = module.__dict__[_ATTR] = perm.to(output.device)
    return output.index_select(-1, perm)


def attach_output_permutation(module: torch.nn.Module, perm: torch.Tensor, width: int) -> None:
    """Gather ``module``'s output channels by ``perm`` on every call (composed with one already there)."""
    p = check_permutation(perm, width)
    old = module.__dict__.get(_ATTR)
    if old is not None:
        module.__dict__[_ATTR] = old.cpu()[p]
        return
    module.__dict__[_ATTR] = p
    module.register_forward_hook(_hook)


def output_permutations(model: torch.nn.Module) -> dict[str, list[int]]:
    """``{module name: permutation}`` of every run-time output permutation in ``model``."""
    return {n: m.__dict__[_ATTR].tolist() for n, m in model.named_modules() if _ATTR in m.__dict__}
