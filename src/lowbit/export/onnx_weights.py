"""A linear layer's integer weight in ONNX's two quantized forms (pure array math, no graph).

* ``MatMulNBits`` (ONNX Runtime's ``com.microsoft`` op): unsigned codes packed little-endian
  ``bits`` to a byte (2, 4 or 8 bits; 3-bit codes travel in 4-bit slots), in blocks of
  ``block_size`` input columns, one fp32 scale per (row, block), zero points packed the same way
  (absent: ``2^(bits-1)``).  ``W[n, k] = scale[n, k // bs] * (u[n, k] - zp[n, k // bs])``.
* QDQ: signed int8 / int4 codes transposed to ``(in, out)`` for ``MatMul``, with a
  ``DequantizeLinear`` per output channel (axis 1) or per block of input rows (opset 21's
  ``block_size`` on axis 0).

Both hold lowbit's codes exactly: ``IntWeight.dequantize()`` and the runtime's dequantization
agree bit for bit (the tests check it against ONNX Runtime).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from lowbit.errors import LowbitError
from lowbit.packed.intweight import IntWeight

NBITS = (2, 4, 8)  # MatMulNBits widths ONNX Runtime's CPU kernel runs


def container_bits(bits: int) -> int:
    """The MatMulNBits width that holds ``bits``-bit codes (3-bit codes go in 4-bit slots)."""
    for b in NBITS:
        if bits <= b:
            return b
    raise LowbitError(f"{bits}-bit codes are wider than ONNX Runtime's 8-bit MatMulNBits")


def nbits_block(w: IntWeight) -> int | None:
    """The MatMulNBits block size for ``w``, or None when its groups do not map onto blocks (channel
    strategy, a group width that is not a power of two of at least 16)."""
    g = w.group_size
    if g is None or g < 16 or g & (g - 1):
        return None
    return g


def in_group_order(w: IntWeight) -> tuple[IntWeight, np.ndarray | None]:
    """``w`` with its input columns sorted by group (act-order ``g_idx``), and the column order the layer's
    input must be gathered in (None when the groups are already contiguous)."""
    if w.g_idx is None:
        return w, None
    g_idx = w.g_idx.long()
    perm = torch.argsort(g_idx, stable=True)
    cols = w.codes.shape[1]
    expected = torch.arange(cols) // w.group_size if w.group_size else torch.zeros(cols, dtype=torch.long)
    if not torch.equal(g_idx[perm], expected):
        raise LowbitError("the layer's g_idx puts an unequal number of columns in its groups; ONNX blocks hold "
                          "group_size columns each")
    moved = IntWeight(w.codes[:, perm], w.scale, w.zero, w.bits, w.group_size, None)
    return moved, perm.numpy().astype(np.int64)


def pack_bits(values: np.ndarray, bits: int) -> np.ndarray:
    """Pack unsigned ``values`` (..., n) ``bits`` to a byte, the first value in the low bits; ``n * bits`` must be a
    multiple of 8."""
    per = 8 // bits
    if values.shape[-1] % per:
        raise ValueError(f"{values.shape[-1]} values do not fill whole bytes at {bits} bits")
    v = values.astype(np.uint8).reshape(*values.shape[:-1], -1, per)
    out = np.zeros(v.shape[:-1], dtype=np.uint8)
    for i in range(per):
        out |= v[..., i] << np.uint8(bits * i)
    return out


@dataclass
class NBitsTensors:
    """The initializers and attributes of one ``MatMulNBits`` node."""

    packed: np.ndarray  # (N, n_blocks, block_size * bits / 8) uint8
    scales: np.ndarray  # (N * n_blocks,) float32
    zero_points: np.ndarray | None  # (N * ceil(n_blocks * bits / 8),) uint8; None: the midpoint
    bits: int
    block_size: int
    k: int
    n: int


def nbits_tensors(w: IntWeight, block_size: int) -> NBitsTensors:
    """``w`` (groups contiguous, ``group_size == block_size``) as MatMulNBits tensors."""
    bits = container_bits(w.bits)
    n, k = w.shape
    n_blocks = -(-k // block_size)
    half = 1 << (bits - 1)
    u = (w.codes.to(torch.int16) + half).numpy()  # signed codes -> the container's unsigned range
    zp = half if w.zero is None else (w.zero.to(torch.int16) + half).numpy()
    pad = n_blocks * block_size - k
    if pad:  # padded columns meet zero inputs; give them the block's zero point so they dequantize to 0
        fill = np.broadcast_to(np.asarray(zp if w.zero is None else zp[:, -1:]), (n, 1))
        u = np.concatenate([u, np.repeat(fill, pad, axis=1)], axis=1)
    packed = pack_bits(u.reshape(n, n_blocks, block_size), bits)
    scales = w.scale.float().numpy().reshape(n, n_blocks).reshape(-1).astype(np.float32)
    zeros = None
    if w.zero is not None:
        z = np.asarray(zp, dtype=np.uint8).reshape(n, n_blocks)
        per = 8 // bits
        z = np.concatenate([z, np.full((n, (-n_blocks) % per), half, dtype=np.uint8)], axis=1)
        zeros = pack_bits(z, bits).reshape(-1)
    return NBitsTensors(packed, scales, zeros, bits, block_size, k, n)


@dataclass
class QDQTensors:
    """Codes transposed to ``(in, out)`` with their DequantizeLinear parameters."""

    codes: np.ndarray  # (K, N) int8 values (int4 range when int4)
    scale: np.ndarray  # (N,) per channel, or (n_blocks, N) per block
    zero: np.ndarray | None  # same shape as scale, int8 values
    int4: bool
    axis: int
    block_size: int | None


def qdq_tensors(w: IntWeight, transpose: bool = True) -> QDQTensors:
    """``w`` (groups contiguous) as a DequantizeLinear input: int4 when the codes fit, else int8; ``transpose``
    lays the codes out ``(in, out)`` for ``MatMul`` (else ``(out, in)`` as stored, for an embedding table)."""
    if w.bits > 8:
        raise LowbitError(f"{w.bits}-bit codes are wider than ONNX's int8")
    codes = w.codes.to(torch.int8).numpy()
    zero = None if w.zero is None else w.zero.to(torch.int8).numpy()
    scale = w.scale.float().numpy()
    int4 = w.bits <= 4
    if w.group_size is None or scale.shape[1] == 1:  # one scale per output row
        z = None if zero is None else zero[:, 0].copy()
        return QDQTensors(codes.T.copy() if transpose else codes, scale[:, 0].copy(), z, int4, 1 if transpose else 0,
                          None)
    if transpose:
        return QDQTensors(codes.T.copy(), scale.T.copy(), None if zero is None else zero.T.copy(), int4, 0,
                          w.group_size)
    return QDQTensors(codes, scale.copy(), None if zero is None else zero.copy(), int4, 1, w.group_size)


def int4_raw(values: np.ndarray) -> bytes:
    """ONNX's INT4 raw data: signed values two to a byte, the first in the low nibble (odd counts padded)."""
    flat = values.reshape(-1).astype(np.int8)
    if flat.size % 2:
        flat = np.concatenate([flat, np.zeros(1, np.int8)])
    return pack_bits((flat & 0x0F).astype(np.uint8), 4).tobytes()
