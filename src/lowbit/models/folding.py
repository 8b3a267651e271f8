"""Folding per-channel scales between neighbouring ops, the equivalence transform of AWQ and SmoothQuant.

``fold_scales(prev, linears, s)`` divides ``prev``'s output channels by ``s`` and multiplies the
linears' input columns by ``s``: ``linear(prev(x))`` is unchanged in exact arithmetic.
"""

from __future__ import annotations

import torch

from lowbit.arch import ScaleGroup
from lowbit.quantized_layers import is_quantized


def prev_width(prev: torch.nn.Module) -> int | None:
    """Output channels of a foldable ``prev`` op (a linear, or a norm with a 1-D weight)."""
    if isinstance(prev, torch.nn.Linear):
        return prev.out_features
    w = getattr(prev, "weight", None)
    if isinstance(w, torch.Tensor) and w.dim() == 1:
        return w.numel()
    return None


def offset_norm(prev: torch.nn.Module) -> bool:
    """Norms that multiply by ``1 + weight`` (Gemma's RMSNorm) rather than ``weight``."""
    return type(prev).__name__.startswith("Gemma") and "RMSNorm" in type(prev).__name__


@torch.no_grad()
def fold_scales(prev: torch.nn.Module, linears: list[torch.nn.Module], s: torch.Tensor) -> None:
    """Divide ``prev``'s output channels by ``s`` and multiply the linears' input columns by ``s``."""
    s = s.float()
    if isinstance(prev, torch.nn.Linear):
        w = prev.weight
        w.copy_((w.float() / s.view(-1, 1).to(w.device)).to(w.dtype))
    else:
        w = prev.weight
        if offset_norm(prev):
            w.copy_(((1.0 + w.float()) / s.to(w.device) - 1.0).to(w.dtype))
        else:
            w.copy_((w.float() / s.to(w.device)).to(w.dtype))
    bias = getattr(prev, "bias", None)
    if isinstance(bias, torch.Tensor):
        bias.copy_((bias.float() / s.to(bias.device)).to(bias.dtype))
    for lin in linears:
        lw = lin.weight
        lw.copy_((lw.float() * s.view(1, -1).to(lw.device)).to(lw.dtype))


def fold_problem(block: torch.nn.Module, g: ScaleGroup, targets: dict[str, torch.nn.Module], who: str) -> str | None:
    """Why scales cannot be folded across group ``g`` of ``block`` (None: they can).

    ``targets`` are the block's layers handled by ``who`` (relative names); every linear of the
    group must be among them, take the same input width, and ``prev`` must have one weight per
    channel of that width."""
    missing = [n for n in g.linears if n not in targets]
    if missing:
        return f"{', '.join(missing)} not quantized by {who}"
    lins = [targets[n] for n in g.linears]
    if not all(isinstance(m, torch.nn.Linear) for m in lins):
        return "not all linears are torch.nn.Linear"
    widths = {m.in_features for m in lins}
    if len(widths) != 1:
        return f"linears have different input widths {sorted(widths)}"
    prev = block.get_submodule(g.prev)
    if is_quantized(prev):
        return f"{g.prev} is already rounded: scaling it would move it off its quantization grid"
    pw = prev_width(prev)
    if pw is None:
        return f"{g.prev} ({type(prev).__name__}) has no per-channel weight to fold scales into"
    width = widths.pop()
    if pw != width:
        return f"{g.prev} outputs {pw} channels but {', '.join(g.linears)} take {width} (grouped-query attention?)"
    return None
