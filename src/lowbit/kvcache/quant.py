"""KV-cache quantization math: asymmetric integer codes along the token or the channel axis, packed.

A cache tensor has shape ``(batch, heads, tokens, head_dim)``.  ``axis="token"`` gives each token
its own ranges over groups of ``group`` channels (KIVI's values); ``axis="channel"`` gives each
channel its own range over groups of ``group`` tokens (KIVI's and KVQuant's keys, whose outliers
sit in fixed channels).  Codes are ``round((x - min) / scale)`` in ``[0, 2^bits)``, packed
(``lowbit.core.packing``) with an fp16 scale and minimum per group.  With ``outliers`` > 0 the
largest magnitudes of each group are kept exactly in fp16 beside the codes (KVQuant's
dense-and-sparse split) and left out of the group's range.  With ``levels`` (KVQuant's
non-uniform datatype) a code indexes a sorted table of ``2^bits`` positions in code units
``[0, 2^bits - 1]`` instead of standing for itself: ``x = min + scale * levels[code]``; the
uniform table ``0, 1, ..., 2^bits - 1`` gives back the plain codes.

Layouts keep the token axis (or the token-group axis) at dimension 2, so blocks appended over
time concatenate there: ``PackedKV`` is one growing cache tensor.
"""

from __future__ import annotations

import math

import torch

from lowbit.core.packing import pack, unpack


def check_layout(shape: tuple[int, ...], axis: str, group: int) -> None:
    """ValueError unless a ``(b, h, t, d)`` tensor splits into groups of ``group`` along ``axis``."""
    if axis not in ("token", "channel"):
        raise ValueError(f"axis must be 'token' or 'channel', got {axis!r}")
    n = shape[3] if axis == "token" else shape[2]
    if group < 1 or n % group:
        what = "head_dim" if axis == "token" else "the token count"
        raise ValueError(f"group {group} does not divide {what} {n}")


def grouped_kv(x: torch.Tensor, axis: str, group: int) -> torch.Tensor:
    """``(b, h, T, C, group)``: per token ``C = d / group`` channel groups, or per token group
    (``T = t / group``) ``C = d`` channels each holding ``group`` tokens."""
    b, h, t, d = x.shape
    if axis == "token":
        return x.reshape(b, h, t, d // group, group)
    return x.reshape(b, h, t // group, group, d).transpose(3, 4)


def ungrouped_kv(g: torch.Tensor, axis: str) -> torch.Tensor:
    b, h, t_, c, e = g.shape
    if axis == "token":
        return g.reshape(b, h, t_, c * e)
    return g.transpose(3, 4).reshape(b, h, t_ * e, c)


def _outlier_mask(g: torch.Tensor, fraction: float) -> torch.Tensor:
    k = max(1, math.ceil(fraction * g.shape[-1]))
    idx = g.abs().topk(k, dim=-1).indices
    return torch.zeros_like(g, dtype=torch.bool).scatter_(-1, idx, True)


def check_levels(levels: torch.Tensor, bits: int) -> None:
    """ValueError unless ``levels`` is a sorted table of ``2^bits`` positions in ``[0, 2^bits - 1]``."""
    top = (1 << bits) - 1
    if levels.dim() != 1 or levels.numel() != top + 1:
        raise ValueError(f"a {bits}-bit level table holds {top + 1} values, got shape {tuple(levels.shape)}")
    if bool((levels[1:] < levels[:-1]).any()) or levels.min() < 0 or levels.max() > top:
        raise ValueError(f"levels must be sorted and lie in [0, {top}], got {levels.tolist()}")


def group_ranges_kv(g: torch.Tensor, outliers: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """``(min, max, outlier mask)`` of each group (last dim) of a grouped tensor, outliers left out."""
    if outliers <= 0:
        return g.amin(-1, keepdim=True), g.amax(-1, keepdim=True), None
    m = _outlier_mask(g, outliers)
    lo = g.masked_fill(m, float("inf")).amin(-1, keepdim=True)
    hi = g.masked_fill(m, float("-inf")).amax(-1, keepdim=True)
    lo = torch.where(torch.isfinite(lo), lo, torch.zeros_like(lo))
    hi = torch.where(torch.isfinite(hi), hi, lo)
    return lo, hi, m


def code_units(x: torch.Tensor, bits: int, axis: str, group: int, outliers: float = 0.0
               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """``(u, scale, minimum, mask)``: ``x`` grouped ``(b, h, T, C, group)`` and mapped to code units
    ``u = (x - min) / scale`` (0 at the group's minimum, ``2^bits - 1`` at its maximum), with the
    fp16 scale and minimum ``(b, h, T, C, 1)`` and the grouped outlier mask (or None)."""
    check_layout(tuple(x.shape), axis, group)
    g = grouped_kv(x.float(), axis, group)
    lo, hi, mask = group_ranges_kv(g, outliers)
    scale = ((hi - lo) / ((1 << bits) - 1)).half()
    lo16 = lo.half()
    s = scale.float()
    return (g - lo16.float()) / torch.where(s > 0, s, torch.ones_like(s)), scale, lo16, mask


def nearest_level(u: torch.Tensor, levels: torch.Tensor) -> torch.Tensor:
    """Index of the nearest entry of the sorted table ``levels`` for every value of ``u``."""
    mid = (levels[1:] + levels[:-1]) / 2
    return torch.bucketize(u.contiguous(), mid.to(u.device, u.dtype))


def quantize_kv(x: torch.Tensor, bits: int, axis: str, group: int, outliers: float = 0.0,
                levels: torch.Tensor | None = None
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """``(codes, scale, minimum, outlier mask)`` of a ``(b, h, t, d)`` tensor: packed uint8 codes
    ``(b, h, T, C, packed)``, fp16 scale and minimum ``(b, h, T, C)``, and (with ``outliers``) the
    bool mask of the values kept exactly, in the input's layout.  ``levels``: a non-uniform table
    (see the module docstring)."""
    u, scale, lo16, m = code_units(x, bits, axis, group, outliers)
    top = (1 << bits) - 1
    if levels is None:
        q = u.round().clamp(0, top).to(torch.uint8)
    else:
        check_levels(levels, bits)
        q = nearest_level(u, levels).to(torch.uint8)
    mask = None if m is None else ungrouped_kv(m, axis)
    return pack(q, bits), scale.squeeze(-1), lo16.squeeze(-1), mask


def dequantize_kv(codes: torch.Tensor, scale: torch.Tensor, minimum: torch.Tensor, bits: int, axis: str,
                  group: int, dtype: torch.dtype = torch.float32, levels: torch.Tensor | None = None) -> torch.Tensor:
    """The ``(b, h, t, d)`` tensor of ``quantize_kv``'s codes (outliers not restored)."""
    q = unpack(codes, bits, group)
    q = q.float() if levels is None else levels.to(scale.device, torch.float32)[q.long()]
    g = q * scale.float().unsqueeze(-1) + minimum.float().unsqueeze(-1)
    return ungrouped_kv(g, axis).to(dtype)


def fake_quant_kv(x: torch.Tensor, bits: int, axis: str, group: int, outliers: float = 0.0,
                  levels: torch.Tensor | None = None) -> torch.Tensor:
    """Quantize-dequantize, outliers restored (for tests and analysis)."""
    codes, scale, minimum, mask = quantize_kv(x, bits, axis, group, outliers, levels)
    out = dequantize_kv(codes, scale, minimum, bits, axis, group, levels=levels)
    if mask is not None:
        out = torch.where(mask, x.float().half().float(), out)
    return out.to(x.dtype)


class PackedKV:
    """One growing quantized cache tensor (keys or values of one layer): packed codes, fp16 scales
    and minima, and the fp16 outliers as flat positions in ``(token, batch, head, channel)`` order
    (stable while tokens are appended)."""

    def __init__(self, bits: int, axis: str, group: int, outliers: float = 0.0,
                 levels: torch.Tensor | None = None) -> None:
        self.bits, self.axis, self.group, self.outliers, self.levels = bits, axis, group, outliers, levels
        self.codes: torch.Tensor | None = None
        self.scale: torch.Tensor | None = None
        self.minimum: torch.Tensor | None = None
        self.sparse_index: torch.Tensor | None = None
        self.sparse_value: torch.Tensor | None = None
        self.tokens = 0

    def append(self, x: torch.Tensor) -> None:
        """Quantize ``x`` ``(b, h, t, d)`` and append it after the tokens held."""
        codes, scale, minimum, mask = quantize_kv(x, self.bits, self.axis, self.group, self.outliers,
                                                  self.levels)
        if mask is not None:
            tbhd = mask.permute(2, 0, 1, 3)
            local = torch.nonzero(tbhd.reshape(-1)).reshape(-1)
            index = local + self.tokens * tbhd[0].numel()
            value = x.permute(2, 0, 1, 3).reshape(-1)[local].half()
            self.sparse_index = index if self.sparse_index is None else torch.cat([self.sparse_index, index])
            self.sparse_value = value if self.sparse_value is None else torch.cat([self.sparse_value, value])
        cat = (lambda a, b: b if a is None else torch.cat([a, b], dim=2))
        self.codes, self.scale, self.minimum = cat(self.codes, codes), cat(self.scale, scale), cat(self.minimum, minimum)
        self.tokens += x.shape[2]

    def dequantize(self, dtype: torch.dtype) -> torch.Tensor:
        out = dequantize_kv(self.codes, self.scale, self.minimum, self.bits, self.axis, self.group, torch.float32,
                            self.levels)
        if self.sparse_index is not None:
            tbhd = out.permute(2, 0, 1, 3).contiguous()
            tbhd.view(-1)[self.sparse_index] = self.sparse_value.float()
            out = tbhd.permute(1, 2, 0, 3)
        return out.to(dtype)

    def nbytes(self) -> int:
        """Stored bytes: codes, scales, minima, and each outlier's fp16 value plus its int32 position
        (a non-uniform level table is per layer, not per token: not counted)."""
        if self.codes is None:
            return 0
        n = sum(t.numel() * t.element_size() for t in (self.codes, self.scale, self.minimum))
        if self.sparse_index is not None:
            n += self.sparse_value.numel() * (2 + 4)
        return n
