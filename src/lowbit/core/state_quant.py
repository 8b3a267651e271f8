"""Block-wise quantization of optimizer states (8-bit and 4-bit Adam moments).

A state tensor is flattened, zero-padded to a whole number of blocks, and each block is divided by its
absmax (an fp32 ``scale`` per block); every normalized value is stored as the index of the nearest
level of a fixed, sorted code map (``uint8``; two 4-bit codes per byte, element ``2i`` in the low
nibble).  Dequantization is ``qmap[code] * scale``.

Code maps (all fp32, sorted, ``2^bits`` distinct levels in ``[-1, 1]`` or ``[0, 1]``):

* :func:`dynamic_map` - Dettmers et al.'s dynamic (tree) code, "8-bit Optimizers via Block-wise
  Quantization" (2022): after the sign bit, ``e`` leading zero bits give the decade ``10^-e``, a one
  bit ends them and the remaining bits cut ``(0.1, 1] * 10^-e`` into equal cells, each represented by
  its midpoint; ``0`` and ``1`` are added.  Signed ``bits``: decades ``0 .. bits-2`` with ``bits-2-e``
  fraction bits (for 4 bits these are Li et al.'s 3 exponent bits); unsigned: the same decades with
  one more fraction bit each (the sign bit reused).  ``+1`` is a level but ``-1`` is not: a block
  whose absmax element is negative stores it as the largest negative midpoint.
* :func:`linear_map` - ``k / 2^bits`` for ``k = 1 .. 2^bits``: the "linear, zero excluded" map Li et
  al. ("Memory Efficient Optimizers with 4-bit States", 2023) use for the 4-bit second moment, so
  that no ``v`` is ever stored as 0 (an update ``m / (sqrt(0) + eps)`` would explode).
"""

from __future__ import annotations

import functools

import torch

from lowbit.core.packing import pack, unpack

__all__ = ["dequantize_blockwise", "dynamic_map", "linear_map", "map_bits", "quantize_blockwise"]


def _tree_levels(decades: int, top_fraction_bits: int) -> list[float]:
    """Cell midpoints of the tree code: decade ``10^-e`` cut into ``2^(top_fraction_bits - e)`` cells."""
    out = []
    for e in range(decades):
        cells = 2 ** (top_fraction_bits - e)
        out += [10.0 ** -e * (0.1 + 0.9 * (k + 0.5) / cells) for k in range(cells)]
    return out


@functools.lru_cache(maxsize=None)
def _dynamic_levels(bits: int, signed: bool) -> tuple[float, ...]:
    pos = _tree_levels(bits - 1, bits - 2 if signed else bits - 1)
    neg = [-x for x in pos] if signed else []
    return tuple(sorted(neg + [0.0] + pos + [1.0]))


def dynamic_map(bits: int, signed: bool) -> torch.Tensor:
    """The ``2^bits`` levels of the dynamic exponent code (module docstring), sorted, fp32."""
    if bits not in range(2, 9):
        raise ValueError(f"dynamic_map needs 2..8 bits, got {bits}")
    return torch.tensor(_dynamic_levels(bits, signed), dtype=torch.float32)


def linear_map(bits: int) -> torch.Tensor:
    """``k / 2^bits`` for ``k = 1 .. 2^bits``: unsigned, linear, zero excluded, fp32."""
    if bits not in range(1, 9):
        raise ValueError(f"linear_map needs 1..8 bits, got {bits}")
    n = 2 ** bits
    return torch.arange(1, n + 1, dtype=torch.float32) / n


def map_bits(qmap: torch.Tensor) -> int:
    """Bits per code of a map of ``2^bits`` levels (4 or 8: the sizes this module stores)."""
    bits = {16: 4, 256: 8}.get(qmap.numel())
    if bits is None:
        raise ValueError(f"a state code map has 16 or 256 levels, got {qmap.numel()}")
    return bits


def quantize_blockwise(x: torch.Tensor, qmap: torch.Tensor, block: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``x`` (any shape) -> ``(codes, scales)``: per-block absmax scales (fp32, one per ``block``
    elements of the flattened, zero-padded ``x``) and nearest-level codes (``uint8``; 4-bit packed)."""
    bits = map_bits(qmap)
    if block < 2 or block % 2:
        raise ValueError(f"block must be an even number >= 2, got {block}")
    flat = x.detach().reshape(-1).float()
    pad = -flat.numel() % block
    if pad:
        flat = torch.nn.functional.pad(flat, (0, pad))
    rows = flat.view(-1, block)
    scales = rows.abs().amax(dim=1)
    normed = rows / torch.where(scales > 0, scales, torch.ones_like(scales)).unsqueeze(1)
    qmap = qmap.to(device=flat.device, dtype=torch.float32)
    codes = torch.bucketize(normed.reshape(-1), (qmap[1:] + qmap[:-1]) / 2, out_int32=True).to(torch.uint8)
    return (codes if bits == 8 else pack(codes, 4)), scales


def dequantize_blockwise(codes: torch.Tensor, scales: torch.Tensor, qmap: torch.Tensor, block: int,
                         shape: torch.Size | tuple[int, ...]) -> torch.Tensor:
    """Inverse of :func:`quantize_blockwise`: an fp32 tensor of ``shape``."""
    bits = map_bits(qmap)
    n = scales.numel() * block
    idx = codes if bits == 8 else unpack(codes, 4, n)
    if idx.numel() != n:
        raise ValueError(f"{idx.numel()} codes do not fill {scales.numel()} blocks of {block}")
    qmap = qmap.to(device=codes.device, dtype=torch.float32)
    vals = qmap[idx.long()].view(-1, block) * scales.unsqueeze(1)
    numel = 1
    for s in shape:
        numel *= int(s)
    return vals.reshape(-1)[:numel].reshape(shape)
