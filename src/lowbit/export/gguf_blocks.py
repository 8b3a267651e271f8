"""GGUF block encodings for legacy 32-weight blocks (Q8_0, Q4_0, Q4_1, Q5_0, Q5_1), from integer codes.

Block layouts (llama.cpp ``ggml-common.h``), 32 weights each, little-endian:

* ``Q8_0``: fp16 ``d``, 32 int8 ``q``;                      ``x = d * q``
* ``Q4_0``: fp16 ``d``, 16 bytes of nibbles;                 ``x = d * (u - 8)``,  ``u`` in 0..15
* ``Q4_1``: fp16 ``d``, fp16 ``m``, 16 bytes of nibbles;      ``x = d * u + m``
* ``Q5_0``: fp16 ``d``, 4 bytes high bits, 16 bytes nibbles;  ``x = d * (u - 16)``, ``u`` in 0..31
* ``Q5_1``: fp16 ``d``, fp16 ``m``, high bits, nibbles;       ``x = d * u + m``

Nibble order: byte ``j`` of a block holds element ``j`` (low nibble) and ``j + 16`` (high nibble);
the 5th bits of all 32 elements form one little-endian uint32.

A lowbit ``IntWeight`` lands on these grids exactly (up to the fp16 rounding of ``d`` and ``m``)
when its groups are whole 32-blocks (group size a multiple of 32, no ``g_idx``), its codes fit
the block's bit width, and, for the zero-point-free types, it is symmetric.  Anything else is
re-quantized by llama.cpp's reference rules (``gguf.quants.quantize``) from the dequantized
weight, and the caller is told the error.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from lowbit.packed.intweight import IntWeight

BLOCK = 32


@dataclass(frozen=True)
class BlockType:
    name: str
    bits: int
    offset: bool  # has a float minimum m (x = d*u + m) instead of a fixed code offset
    bytes_per_block: int

    @property
    def bits_per_weight(self) -> float:
        return 8 * self.bytes_per_block / BLOCK


BLOCK_TYPES = {t.name: t for t in (BlockType("Q8_0", 8, False, 34), BlockType("Q4_0", 4, False, 18),
                                   BlockType("Q4_1", 4, True, 20), BlockType("Q5_0", 5, False, 22),
                                   BlockType("Q5_1", 5, True, 24))}


def exact_fit(w: IntWeight, t: BlockType) -> str | None:
    """None when ``w`` maps onto ``t``'s grid code for code; otherwise the reason it does not."""
    if w.g_idx is not None:
        return "activation-ordered groups (g_idx)"
    if w.group_size is not None and w.group_size % BLOCK:
        return f"group size {w.group_size} is not a multiple of {BLOCK}"
    if w.shape[1] % BLOCK:
        return f"input width {w.shape[1]} is not a multiple of {BLOCK}"
    if w.bits > t.bits:
        return f"{w.bits}-bit codes do not fit {t.name}'s {t.bits} bits"
    if not t.offset and not w.symmetric:
        return f"{t.name} has no zero point; use {t.name[:2]}_1 for asymmetric weights"
    return None


def _per_block(p: torch.Tensor, w: IntWeight) -> torch.Tensor:
    """Expand per-group parameters (out, n_groups) to per-32-block (out, in/32)."""
    n_blocks = w.shape[1] // BLOCK
    if w.group_size is None:
        return p.expand(-1, n_blocks)
    return p.repeat_interleave(w.group_size // BLOCK, dim=1)[:, :n_blocks]


def _nibbles(u: np.ndarray) -> np.ndarray:
    """(n, 32) codes < 16 -> (n, 16) bytes: element j low nibble, element j+16 high nibble."""
    return (u[:, :16] & 0xF) | ((u[:, 16:] & 0xF) << 4)


def pack_blocks(t: BlockType, d: np.ndarray, u: np.ndarray, m: np.ndarray | None = None) -> np.ndarray:
    """Raw bytes (n, bytes_per_block) of ``n`` blocks from their fp32 scale ``d`` (n, 1), codes ``u`` (n, 32) (unsigned,
    int8 values for Q8_0) and, for the offset types, minimum ``m`` (n, 1)."""
    parts = [d.astype(np.float16).view(np.uint8)]
    if t.offset:
        parts.append(m.astype(np.float16).view(np.uint8))
    n = u.shape[0]
    if t.bits == 8:
        parts.append(u.astype(np.int8).view(np.uint8))
    else:
        u = u.astype(np.uint8)
        if t.bits == 5:
            high = ((u >> 4) & 1).astype(np.uint32) << np.arange(BLOCK, dtype=np.uint32)
            parts.append(high.sum(axis=1, dtype=np.uint32).astype("<u4").view(np.uint8).reshape(n, 4))
        parts.append(_nibbles(u))
    return np.concatenate(parts, axis=1)


def encode_exact(w: IntWeight, t: BlockType) -> np.ndarray:
    """Raw bytes (out, in/32 * bytes_per_block) of ``w`` on ``t``'s grid; see ``exact_fit``."""
    reason = exact_fit(w, t)
    if reason is not None:
        raise ValueError(f"{t.name} cannot hold these codes exactly: {reason}")
    rows, cols = w.shape
    n = rows * cols // BLOCK
    q = w.codes.to(torch.int32).reshape(n, BLOCK)
    s = _per_block(w.scale.float(), w).reshape(n, 1)
    half = 1 << (t.bits - 1) if t.bits < 8 else 0
    if t.offset:  # x = s*(q - z) = s*u + m with u = q + 2^(t.bits-1), m = -s*(z + 2^(t.bits-1))
        z = torch.zeros_like(s) if w.zero is None else _per_block(w.zero.to(torch.float32), w).reshape(n, 1)
        out = pack_blocks(t, s.numpy(), (q + half).numpy(), (-s * (z + half)).numpy())
    else:
        out = pack_blocks(t, s.numpy(), (q + half).numpy())
    return out.reshape(rows, -1)


def encode_imatrix(weight: torch.Tensor, t: BlockType, imatrix: torch.Tensor) -> np.ndarray:
    """llama.cpp's imatrix-weighted rounding (``quantize_row_q{4,5}_{0,1}_impl``): fit weights
    ``imatrix[col] * sqrt(sigma2 + x^2)`` (``sigma2`` the row's mean square); Q4_0 / Q5_0 take ``make_qx_quants``'s
    scale and codes, Q4_1 / Q5_1 ``make_qkx3_quants``'s.  Q8_0 ignores the imatrix, as llama.cpp does."""
    from lowbit.export.gguf_kquants import fit_scale_min, fit_symmetric

    if t.name == "Q8_0":
        return encode_requantized(weight, t)
    rows, cols = weight.shape
    x_rows = weight.detach().float()
    sigma2 = x_rows.square().mean(dim=1, keepdim=True)
    w = (imatrix.float().reshape(1, -1) * (sigma2 + x_rows.square()).sqrt()).reshape(-1, BLOCK)
    x = x_rows.reshape(-1, BLOCK)
    if t.offset:
        scale, mn, codes = fit_scale_min(x, w, (1 << t.bits) - 1, -0.9, 0.05, 36, codes=True)
        out = pack_blocks(t, scale.reshape(-1, 1).numpy(), codes.numpy(), (-mn).reshape(-1, 1).numpy())
    else:
        half = 1 << (t.bits - 1)
        scale, codes = fit_symmetric(x, w, half)
        out = pack_blocks(t, scale.reshape(-1, 1).numpy(), (codes + half).numpy())
    return out.reshape(rows, -1)


def encode_requantized(weight: torch.Tensor, t: BlockType) -> np.ndarray:
    """llama.cpp's own rounding of a float weight (out, in) to ``t`` (the reference quantizer)."""
    from gguf import GGMLQuantizationType
    from gguf.quants import quantize

    return quantize(weight.detach().float().numpy(), GGMLQuantizationType[t.name])


def decode(raw: np.ndarray, t: BlockType, shape: tuple[int, int]) -> torch.Tensor:
    """Dequantize raw blocks with the gguf package (an independent decoder)."""
    from gguf import GGMLQuantizationType
    from gguf.quants import dequantize

    return torch.from_numpy(dequantize(raw, GGMLQuantizationType[t.name]).reshape(shape).copy())
