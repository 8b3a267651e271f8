"""Packing: store low-bit integer codes densely in ``uint8`` bytes or ``int32`` words, with exact round trip.

Codes are *unsigned* integers in ``[0, 2^bits)`` for ``bits`` in 1..8.  Signed codes
``q`` in ``[-2^(bits-1), 2^(bits-1))`` are stored with the offset ``2^(bits-1)`` added:
``pack(to_unsigned(q, bits), bits)``, and ``to_signed(unpack(...), bits)`` undoes it (the same
offset compressed-tensors applies before packing).

Packing runs along the last axis; every row (all leading dimensions flattened) is packed on its
own, so a weight ``W`` (``out x in``) packs per output row as GPTQ / compressed-tensors do.
A tensor of shape ``(..., n)`` packs to ``(..., packed_cols(n, bits, container))``; ``unpack``
needs ``n`` (or the full shape) back to drop the zero padding of the last byte / word.

Bit order, ``container="uint8"`` (all bits; the densest layout):
    each row is one little-endian bit stream: element ``i`` occupies stream bits
    ``bits*i .. bits*i + bits - 1`` (its least significant bit first), and byte ``k`` holds
    stream bits ``8k .. 8k + 7`` with stream bit ``8k`` as the byte's least significant bit.
    A row of ``n`` codes takes ``ceil(bits * n / 8)`` bytes; unused high bits are zero.
    * 8-bit: a plain copy (one code per byte).
    * 4-bit: element ``2i`` in the low nibble of byte ``i``, ``2i+1`` in the high nibble.
      (GGUF/llama.cpp Q4_0 instead pairs element ``j`` with ``j + 16`` of a 32-block, and
      some kernels put the first element in the high nibble: convert before handing bytes over.)
    * 2-bit: element ``4i + j`` at bits ``2j .. 2j+1`` of byte ``i``; 1-bit: element
      ``8i + j`` at bit ``j`` (``numpy.packbits(..., bitorder="little")``).
    * 3-bit: 8 codes per 3 bytes; e.g. codes ``[0, 0, 7]`` -> bytes ``[0xC0, 0x01]``
      (the third code straddles the byte boundary).  5, 6 and 7 bits follow the same stream.

Bit order, ``container="int32"`` (compressed-tensors >= 0.20 ``pack_to_int32``, ``packed_dim=1``):
    the same little-endian bit stream cut into 32-bit words: element ``i`` of a row sits at
    stream bits ``bits*i ..``, word ``w`` holds stream bits ``32w .. 32w + 31`` (stream bit
    ``32w`` as its least significant bit), and a row of ``n`` codes takes ``ceil(bits*n/32)``
    words with no wasted bits (a 3-bit code may straddle two words).  Words are
    ``torch.int32``: a word whose bit 31 is set reads as a negative number.  E.g. 4-bit codes
    ``[1, 2, ..., 8]`` -> word ``0x87654321`` (``-2023406815`` as int32).  On a little-endian
    host the words' bytes equal the ``uint8`` packing of the row padded to a multiple of 4
    bytes.  For 1, 2, 4 and 8 bits this is also the older per-word ``32 // bits`` layout.
"""

from __future__ import annotations

import math
from typing import Literal, Sequence

import torch

Container = Literal["uint8", "int32"]
CONTAINERS: tuple[str, ...] = ("uint8", "int32")
SUPPORTED_BITS: tuple[int, ...] = (1, 2, 3, 4, 5, 6, 7, 8)
_INT_DTYPES = (torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64)


# ------------------------------------------------------------------ validation helpers
def _check_bits(bits: int) -> None:
    if not isinstance(bits, int) or isinstance(bits, bool) or bits not in SUPPORTED_BITS:
        raise ValueError(f"unsupported bits {bits!r}; packing supports integer bit widths 1..8")


def _check_container(container: str) -> None:
    if container not in CONTAINERS:
        raise ValueError(f"unknown container {container!r}; expected one of {', '.join(CONTAINERS)}")


def _check_int_tensor(x: torch.Tensor, what: str) -> None:
    if not isinstance(x, torch.Tensor):
        raise ValueError(f"{what} must be a torch.Tensor, got {type(x).__name__}")
    if x.dtype not in _INT_DTYPES:
        raise ValueError(
            f"{what} must be an integer tensor (uint8/int8/int16/int32/int64), got {x.dtype}; "
            "round and cast the codes first, e.g. q.round().to(torch.int32)"
        )


def _check_range(x: torch.Tensor, lo: int, hi: int, bits: int, hint: str) -> None:
    if x.numel() == 0:
        return
    xmin, xmax = int(x.min()), int(x.max())
    if xmin < lo:
        raise ValueError(f"code {xmin} is below the {bits}-bit minimum {lo}{hint}")
    if xmax > hi:
        raise ValueError(f"code {xmax} is above the {bits}-bit maximum {hi}")


# ------------------------------------------------------------------ sizes
def packed_cols(numel_per_row: int, bits: int, container: Container = "uint8") -> int:
    """Length of the packed last axis for rows of ``numel_per_row`` codes."""
    _check_bits(bits)
    _check_container(container)
    if numel_per_row < 0:
        raise ValueError(f"numel_per_row must be >= 0, got {numel_per_row}")
    return math.ceil(bits * numel_per_row / (8 if container == "uint8" else 32))


def packed_nbytes(numel_per_row: int, rows: int, bits: int, container: Container = "uint8") -> int:
    """Bytes taken by ``rows`` packed rows of ``numel_per_row`` codes each (padding included)."""
    if rows < 0:
        raise ValueError(f"rows must be >= 0, got {rows}")
    word = 1 if container == "uint8" else 4
    return rows * packed_cols(numel_per_row, bits, container) * word


# ------------------------------------------------------------------ signed <-> unsigned
def to_unsigned(q: torch.Tensor, bits: int) -> torch.Tensor:
    """Signed codes in ``[-2^(bits-1), 2^(bits-1))`` -> unsigned ``uint8`` codes (adds ``2^(bits-1)``)."""
    _check_bits(bits)
    _check_int_tensor(q, "signed codes")
    half = 1 << (bits - 1)
    _check_range(q, -half, half - 1, bits, " (signed range)")
    return (q.to(torch.int16) + half).to(torch.uint8)


def to_signed(u: torch.Tensor, bits: int) -> torch.Tensor:
    """Unsigned codes in ``[0, 2^bits)`` -> signed ``int8`` codes (subtracts ``2^(bits-1)``)."""
    _check_bits(bits)
    _check_int_tensor(u, "unsigned codes")
    _check_range(u, 0, (1 << bits) - 1, bits, "")
    return (u.to(torch.int16) - (1 << (bits - 1))).to(torch.int8)


# ------------------------------------------------------------------ pack
def _pad_cols(x: torch.Tensor, multiple: int) -> torch.Tensor:
    extra = (-x.shape[-1]) % multiple
    if extra == 0:
        return x
    return torch.nn.functional.pad(x, (0, extra))


def _pack_fields(x: torch.Tensor, bits: int, per: int, acc_dtype: torch.dtype) -> torch.Tensor:
    """Pack ``per`` consecutive codes into one ``acc_dtype`` value, first code in the low bits."""
    padded = _pad_cols(x.to(acc_dtype), per)
    groups = padded.reshape(*x.shape[:-1], padded.shape[-1] // per, per)
    out = torch.zeros(groups.shape[:-1], dtype=acc_dtype, device=x.device)
    for j in range(per):  # loop over field positions (<= 32), not over elements
        out |= groups[..., j] << (bits * j)
    return out


def _pack_uint8_stream(x: torch.Tensor, bits: int) -> torch.Tensor:
    """Generic little-endian bit stream: 8 codes -> ``bits`` bytes via an int64 accumulator."""
    n = x.shape[-1]
    acc = _pack_fields(x, bits, 8, torch.int64)  # (..., n_groups), 8*bits <= 64 bits each
    shifts = torch.arange(0, 8 * bits, 8, dtype=torch.int64, device=x.device)
    out = ((acc.unsqueeze(-1) >> shifts) & 0xFF).to(torch.uint8)
    out = out.reshape(*x.shape[:-1], acc.shape[-1] * bits)
    return out[..., : packed_cols(n, bits, "uint8")]


def _pack_int32(x: torch.Tensor, bits: int) -> torch.Tensor:
    """The uint8 bit stream, 4 bytes per little-endian word (endian-independent arithmetic)."""
    n_words = packed_cols(x.shape[-1], bits, "int32")
    stream = _pad_cols(pack(x, bits, "uint8"), 4)[..., : 4 * n_words]
    acc = _pack_fields(stream, 8, 4, torch.int64)  # < 2^32, exact in int64
    acc = torch.where(acc >= 2**31, acc - 2**32, acc)  # reinterpret as two's complement
    return acc.to(torch.int32)


def pack(codes: torch.Tensor, bits: int, container: Container = "uint8") -> torch.Tensor:
    """Pack unsigned codes ``(..., n)`` in ``[0, 2^bits)`` along the last axis (layout: module docstring).

    Returns ``uint8`` of shape ``(..., ceil(bits*n/8))`` or ``int32`` of shape
    ``(..., ceil(bits*n/32))``.  Signed codes: pack ``to_unsigned(q, bits)``.
    """
    _check_bits(bits)
    _check_container(container)
    _check_int_tensor(codes, "codes")
    if codes.dim() == 0:
        raise ValueError("pack needs a tensor with at least one dimension, got a 0-d scalar")
    _check_range(codes, 0, (1 << bits) - 1, bits, "; signed codes need to_unsigned(q, bits) first")
    if container == "int32":
        return _pack_int32(codes, bits)
    if bits == 8:
        return codes.to(torch.uint8, copy=True)
    if 8 % bits == 0:
        return _pack_fields(codes, bits, 8 // bits, torch.uint8)
    return _pack_uint8_stream(codes, bits)


# ------------------------------------------------------------------ unpack
def _unpack_fields(p: torch.Tensor, bits: int, per: int) -> torch.Tensor:
    """Split each value of ``p`` into ``per`` fields of ``bits`` bits, low bits first."""
    shifts = torch.arange(per, dtype=p.dtype, device=p.device) * bits
    fields = (p.unsqueeze(-1) >> shifts) & ((1 << bits) - 1)  # arithmetic shift is fine: masked
    return fields.reshape(*p.shape[:-1], p.shape[-1] * per)


def _unpack_uint8_stream(p: torch.Tensor, bits: int) -> torch.Tensor:
    padded = _pad_cols(p.to(torch.int64), bits)
    groups = padded.reshape(*p.shape[:-1], padded.shape[-1] // bits, bits)
    shifts = torch.arange(0, 8 * bits, 8, dtype=torch.int64, device=p.device)
    acc = (groups << shifts).sum(dim=-1)  # fields are disjoint: sum == OR
    return _unpack_fields(acc, bits, 8)


def _resolve_shape(packed: torch.Tensor, numel_or_shape: int | Sequence[int]) -> tuple[int, ...]:
    if isinstance(numel_or_shape, int) and not isinstance(numel_or_shape, bool):
        return (*packed.shape[:-1], numel_or_shape)
    shape = tuple(int(s) for s in numel_or_shape)
    if len(shape) == 0:
        raise ValueError("unpack needs the number of codes per row or a shape with at least one dimension")
    if math.prod(shape[:-1]) != math.prod(packed.shape[:-1]):
        raise ValueError(
            f"shape {shape} has {math.prod(shape[:-1])} rows but the packed tensor {tuple(packed.shape)} "
            f"has {math.prod(packed.shape[:-1])}"
        )
    return shape


def unpack(
    packed: torch.Tensor,
    bits: int,
    numel_or_shape: int | Sequence[int],
    container: Container | None = None,
) -> torch.Tensor:
    """Inverse of ``pack``: ``uint8`` codes of shape ``(..., n)`` (``n`` an int) or of the given shape.

    ``container`` defaults to the one implied by ``packed.dtype`` (``uint8`` or ``int32``).
    """
    _check_bits(bits)
    if not isinstance(packed, torch.Tensor):
        raise ValueError(f"packed must be a torch.Tensor, got {type(packed).__name__}")
    if container is None:
        container = {torch.uint8: "uint8", torch.int32: "int32"}.get(packed.dtype)  # type: ignore[assignment]
        if container is None:
            raise ValueError(f"packed tensors are uint8 or int32, got {packed.dtype}")
    _check_container(container)
    want = torch.uint8 if container == "uint8" else torch.int32
    if packed.dtype != want:
        raise ValueError(f"container {container!r} needs a {want} packed tensor, got {packed.dtype}")
    if packed.dim() == 0:
        raise ValueError("unpack needs a packed tensor with at least one dimension, got a 0-d scalar")
    shape = _resolve_shape(packed, numel_or_shape)
    n = shape[-1]
    expected = packed_cols(n, bits, container)
    if packed.shape[-1] != expected:
        raise ValueError(
            f"{n} {bits}-bit codes per row pack into {expected} {container} values, but the packed "
            f"tensor's last axis has {packed.shape[-1]}"
        )
    if container == "int32":
        stream = _unpack_fields(packed.to(torch.int64), 8, 4).to(torch.uint8)  # little-endian bytes
        return unpack(stream[..., : packed_cols(n, bits, "uint8")], bits, shape, "uint8")
    if bits == 8:
        codes = packed.clone()
    elif 8 % bits == 0:
        codes = _unpack_fields(packed, bits, 8 // bits)
    else:
        codes = _unpack_uint8_stream(packed, bits)
    return codes[..., :n].to(torch.uint8).reshape(shape)
