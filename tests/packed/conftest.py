"""Shared fixtures of the packed-kernel tests."""

from __future__ import annotations

import pytest
import torch

from lowbit.packed.intweight import IntWeight


def _random_int_weight(bits: int, rows: int, cols: int, group: int | None, symmetric: bool = True, seed: int = 0,
                       g_idx: bool = False) -> IntWeight:
    """Random int codes, positive scales and (asymmetric) zeros; ``g_idx``: a random group for each column."""
    g = torch.Generator().manual_seed(seed)
    half = 1 << (bits - 1)
    codes = torch.randint(-half, half, (rows, cols), generator=g).to(torch.int8)
    ng = cols // group if group else 1
    scale = torch.rand(rows, ng, generator=g) + 0.1
    zero = None if symmetric else torch.randint(-half, half, (rows, ng), generator=g).to(torch.int8)
    gi = torch.randint(0, ng, (cols,), generator=g, dtype=torch.int32) if g_idx else None
    return IntWeight(codes, scale, zero, bits, group, gi)


@pytest.fixture()
def random_int_weight():
    """Factory: ``(bits, rows, cols, group, symmetric=True, seed=0, g_idx=False) -> IntWeight``."""
    return _random_int_weight


@pytest.fixture()
def no_native(monkeypatch):
    """lowbit's native kernels switched off: the layers choose among torch's kernels only."""
    from lowbit.packed import native

    monkeypatch.setattr(native, "available", lambda: False)
