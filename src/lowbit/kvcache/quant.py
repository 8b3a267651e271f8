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
from lowbit.core.ste import straight_through


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
    """Quantize-dequantize, outliers restored, with the straight-through gradient (KV-cache QAT)."""
    with torch.no_grad():
        codes, scale, minimum, mask = quantize_kv(x.detach(), bits, axis, group, outliers, levels)
        out = dequantize_kv(codes, scale, minimum, bits, axis, group, levels=levels)
        if mask is not None:
            out = torch.where(mask, x.detach().float().half().float(), out)
    return straight_through(x, out.to(x.dtype))


class GrowingTensor:
    """A tensor that grows along ``dim`` into spare capacity (a quarter more each time it is full),
    so appending a few tokens does not reallocate and copy everything held."""

    def __init__(self, dim: int) -> None:
        self.dim = dim
        self.data: torch.Tensor | None = None
        self.size = 0

    def append(self, x: torch.Tensor) -> None:
        n = x.shape[self.dim]
        if self.data is None or self.size + n > self.data.shape[self.dim]:
            held = 0 if self.data is None else self.data.shape[self.dim]
            shape = list(x.shape)
            shape[self.dim] = max(self.size + n, held + held // 4)
            grown = torch.empty(shape, dtype=x.dtype, device=x.device)
            if self.size:
                grown.narrow(self.dim, 0, self.size).copy_(self.view())
            self.data = grown
        self.data.narrow(self.dim, self.size, n).copy_(x)
        self.size += n

    def view(self) -> torch.Tensor | None:
        """The appended part (None before the first append)."""
        return None if self.data is None else self.data.narrow(self.dim, 0, self.size)

    def nbytes(self) -> int:
        """Bytes of the appended part (the spare capacity is at most a quarter more)."""
        if self.data is None:
            return 0
        per_step = math.prod(n for i, n in enumerate(self.data.shape) if i != self.dim)
        return self.size * per_step * self.data.element_size()

    def allocated_nbytes(self) -> int:
        """Bytes allocated, the spare capacity included."""
        return 0 if self.data is None else self.data.numel() * self.data.element_size()


class PackedKV:
    """One growing quantized cache tensor (keys or values of one layer): packed codes, fp16 scales
    and minima, and the fp16 outliers as flat positions in ``(token, batch, head, channel)`` order
    (stable while tokens are appended)."""

    def __init__(self, bits: int, axis: str, group: int, outliers: float = 0.0,
                 levels: torch.Tensor | None = None) -> None:
        self.bits, self.axis, self.group, self.outliers, self.levels = bits, axis, group, outliers, levels
        self.codes, self.scale, self.minimum = GrowingTensor(2), GrowingTensor(2), GrowingTensor(2)
        self.sparse_index, self.sparse_value = GrowingTensor(0), GrowingTensor(0)
        self.tokens = 0

    def append(self, x: torch.Tensor) -> None:
        """Quantize ``x`` ``(b, h, t, d)`` and append it after the tokens held."""
        codes, scale, minimum, mask = quantize_kv(x, self.bits, self.axis, self.group, self.outliers,
                                                  self.levels)
        if mask is not None:
            tbhd = mask.permute(2, 0, 1, 3)
            local = torch.nonzero(tbhd.reshape(-1)).reshape(-1)
            index = local + self.tokens * tbhd[0].numel()
            if index.numel() and int(index[-1]) >= 2**31:
                raise ValueError("KV outlier positions past 2^31 (batch x heads x tokens x head_dim): use a smaller "
                                 "batch or no outliers")
            self.sparse_index.append(index.to(torch.int32))
            self.sparse_value.append(x.permute(2, 0, 1, 3).reshape(-1)[local].half())
        self.codes.append(codes)
        self.scale.append(scale)
        self.minimum.append(minimum)
        self.tokens += x.shape[2]

    def dequantize(self, dtype: torch.dtype) -> torch.Tensor:
        """The ``(b, h, tokens, d)`` tensor held, outliers restored."""
        codes = self.codes.view()
        b, h = codes.shape[:2]
        d = self.scale.view().shape[3] if self.axis == "channel" else self.scale.view().shape[3] * self.group
        out = torch.empty(b, h, self.tokens, d, dtype=dtype, device=codes.device)
        self.dequantize_into(out)
        return out

    def dequantize_into(self, out: torch.Tensor, chunk_tokens: int = 256) -> None:
        """Write the tensor held into ``out`` ``(b, h, tokens, d)`` (a view is fine), ``chunk_tokens``
        at a time so the float temporaries stay small, then put the outliers back."""
        step = self.group * max(1, chunk_tokens // self.group) if self.axis == "channel" else chunk_tokens
        per_block = self.group if self.axis == "channel" else 1  # tokens per entry of the codes' dim 2
        codes, scale, minimum = self.codes.view(), self.scale.view(), self.minimum.view()
        for a in range(0, self.tokens, step):
            n = min(step, self.tokens - a)
            i, m = a // per_block, n // per_block
            out[:, :, a:a + n] = dequantize_kv(codes[:, :, i:i + m], scale[:, :, i:i + m], minimum[:, :, i:i + m],
                                               self.bits, self.axis, self.group, torch.float32, self.levels)
        index = self.sparse_index.view()
        if index is not None and index.numel():
            b, h, _, d = out.shape
            index = index.long()
            t, rest = index // (b * h * d), index % (b * h * d)
            out[rest // (h * d), rest // d % h, t, rest % d] = self.sparse_value.view().to(out.dtype)

    def nbytes(self) -> int:
        """Stored bytes: codes, scales, minima, and each outlier's fp16 value plus its int32 position
        (a non-uniform level table is per layer, not per token: not counted)."""
        n = self.codes.nbytes() + self.scale.nbytes() + self.minimum.nbytes()
        return n + self.sparse_value.size * (2 + 4)

    def allocated_nbytes(self) -> int:
        """Bytes allocated for what ``nbytes`` counts, the spare capacity of each part included."""
        parts = (self.codes, self.scale, self.minimum, self.sparse_index, self.sparse_value)
        return sum(p.allocated_nbytes() for p in parts)
