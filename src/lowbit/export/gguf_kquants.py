"""llama.cpp's K-quant super-blocks (256 weights) for GGUF export: Q2_K to Q6_K, encoded in torch.

* Q2_K: sixteen sub-blocks of 16 with ``w = d * sc * q - dmin * m`` (``q`` 2 bits; ``sc``, ``m`` 4 bits); 84 bytes.
* Q3_K: sixteen sub-blocks of 16 with ``w = d * (sc - 32) * (q - 4)`` (``q`` 3 bits, ``sc`` 6 bits); 110 bytes.
* Q4_K / Q5_K: eight sub-blocks of 32 with ``w = d * sc * q - dmin * m`` (``q`` 4 / 5 bits; ``sc``, ``m``
  6-bit per sub-block; ``d``, ``dmin`` fp16 per super-block); 144 / 176 bytes.
* Q6_K: sixteen sub-blocks of 16 with ``w = d * sc * (q - 32)`` (``q`` 6 bits, ``sc`` int8, ``d`` fp16); 210 bytes.

The rounding follows llama.cpp's reference quantizer (``ggml-quants.c``): each sub-block's scale (and min) is a
weighted least-squares fit over a small grid of candidate scales (``make_qkx2_quants`` for Q4_K / Q5_K,
``make_qx_quants`` for Q6_K), then the sub-block scales are themselves quantized to 6 or 8 bits and every weight
re-rounded on the final grid; Q3_K's sub-block scales come from ``make_q3_quants`` (a greedy refit of each code)
and Q2_K's from ``make_qkx2_quants`` on absolute errors.  The weights of the fit are llama.cpp's default importance ``av_x + |x|``, or,
given an importance vector per input column (an imatrix: the mean square of each column's calibration inputs),
``imatrix * sqrt(sigma2 + x^2)`` as llama.cpp's ``--imatrix`` does.  The byte layouts mirror gguf-py's
dequantizers, which the tests use as the reference.
"""

from __future__ import annotations

import torch

QK_K = 256
K_TYPES = {"Q2_K": (2, 84), "Q3_K": (3, 110), "Q4_K": (4, 144), "Q5_K": (5, 176), "Q6_K": (6, 210)}  # bits, bytes
# llama.cpp's type when a row is not 256-divisible
K_FALLBACK = {"Q2_K": "Q4_0", "Q3_K": "Q4_0", "Q4_K": "Q5_0", "Q5_K": "Q5_1", "Q6_K": "Q8_0"}


def _fp16(x: torch.Tensor) -> torch.Tensor:
    return x.to(torch.float16).float()


def _safe(t: torch.Tensor) -> torch.Tensor:
    """``t`` with zeros replaced by ones (a divisor whose result is masked out where ``t`` is 0)."""
    return t.where(t != 0, torch.ones_like(t))


def imatrix_weights(x: torch.Tensor, imatrix: torch.Tensor, rows: int, sigma_scale: float = 2.0) -> torch.Tensor:
    """llama.cpp's fit weights under an imatrix for the super-blocks ``x`` (nb, 256) of a ``rows``-row matrix:
    ``imatrix[col] * sqrt(sigma2 + x^2)`` with ``sigma2 = sigma_scale * mean(x^2)`` over the super-block."""
    sigma2 = sigma_scale * x.square().mean(dim=1, keepdim=True)
    columns = imatrix.float().reshape(1, -1).expand(rows, -1).reshape(-1, QK_K)
    return columns * (sigma2 + x.square()).sqrt()


def sub_block_av_weights(x: torch.Tensor, size: int = 32) -> torch.Tensor:
    """Q4_K / Q5_K's default fit weights: ``sqrt(mean(x^2)) + |x|`` over each sub-block of ``size``."""
    sub = x.reshape(-1, size)
    return (sub.square().mean(dim=1, keepdim=True).sqrt() + sub.abs()).reshape(x.shape)


def fit_scale_min(x: torch.Tensor, w: torch.Tensor, nmax: int, rmin: float = -1.0, rdelta: float = 0.1,
                  nstep: int = 20, mad: bool = False, codes: bool = False) -> tuple[torch.Tensor, ...]:
    """``make_qkx2_quants`` / ``make_qkx3_quants`` on every row of ``x`` (n, k) with fit weights ``w``: (scale, min)
    per row, the min as the positive offset (``w ~ scale * q - min``), ``q`` in ``[0, nmax]``; ``mad`` scores
    absolute errors; ``codes`` also returns the winning grid's codes."""
    lo = x.amin(dim=1, keepdim=True).clamp(max=0.0)
    hi = x.amax(dim=1, keepdim=True)
    rng = (hi - lo).clamp_min(1e-30)
    sum_w, sum_x = w.sum(1, keepdim=True), (w * x).sum(1, keepdim=True)

    def err(scale: torch.Tensor, mn: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
        diff = scale * q + mn - x
        return (w * (diff.abs() if mad else diff.square())).sum(1, keepdim=True)

    q = torch.round((x - lo) * (nmax / rng)).clamp(0, nmax)
    best_scale, best_min = rng / nmax, lo
    best = err(best_scale, best_min, q)
    best_q = q
    for step in range(nstep + 1):
        # as llama.cpp does, each candidate grid starts from the best offset found so far, not the minimum
        iscale = (rmin + rdelta * step + nmax) / (hi - best_min).clamp_min(1e-30)
        q = torch.round((x - best_min) * iscale).clamp(0, nmax)
        sum_l, sum_l2, sum_xl = (w * q).sum(1, keepdim=True), (w * q * q).sum(1, keepdim=True), (w * q * x).sum(1, keepdim=True)
        det = sum_w * sum_l2 - sum_l * sum_l
        ok = det > 0
        scale = (sum_w * sum_xl - sum_x * sum_l) / det.where(ok, torch.ones_like(det))
        mn = (sum_l2 * sum_x - sum_l * sum_xl) / det.where(ok, torch.ones_like(det))
        positive = mn > 0  # the offset may not exceed the minimum: refit the scale alone
        scale = torch.where(positive, sum_xl / sum_l2.clamp_min(1e-30), scale)
        mn = torch.where(positive, torch.zeros_like(mn), mn)
        e = err(scale, mn, q)
        better = ok & (e < best)
        best = torch.where(better, e, best)
        best_scale, best_min = torch.where(better, scale, best_scale), torch.where(better, mn, best_min)
        best_q = torch.where(better, q, best_q)
    flat = hi == lo
    best_scale = torch.where(flat, torch.zeros_like(best_scale), best_scale)
    if codes:
        return best_scale.squeeze(1), (-best_min).squeeze(1), best_q.where(~flat, torch.zeros_like(best_q))
    return best_scale.squeeze(1), (-best_min).squeeze(1)


def fit_symmetric(x: torch.Tensor, w: torch.Tensor, nmax: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``make_qx_quants`` (rmse_type 1) on every row of ``x`` (n, k) with fit weights ``w``: (scale, codes in
    ``[-nmax, nmax - 1]``).  The largest magnitude's sign maps to ``-nmax``; of the grids ``-(nmax + 0.1 s) / peak``
    (s = 0, then -9..9) the one with the largest ``(sum w x q)^2 / sum w q^2`` wins, its scale fitted by least squares."""
    amax_idx = x.abs().argmax(dim=1, keepdim=True)
    peak = x.gather(1, amax_idx)  # signed value of the largest magnitude
    live = peak.abs() >= 1e-15  # GROUP_MAX_EPS
    safe = peak.where(live, torch.ones_like(peak))
    best_scale, best, best_q = None, None, None
    for step in (0, *range(-9, 0), *range(1, 10)):
        q = torch.round(-(nmax + 0.1 * step) / safe * x).clamp(-nmax, nmax - 1)
        sum_xl, sum_l2 = (w * x * q).sum(1, keepdim=True), (w * q * q).sum(1, keepdim=True)
        if best is None:
            best_scale = (sum_xl / sum_l2.where(sum_l2 > 0, torch.ones_like(sum_l2))).where(sum_l2 > 0, torch.zeros_like(sum_l2))
            best, best_q = best_scale * sum_xl, q
            continue
        better = (sum_l2 > 0) & (sum_xl * sum_xl > best * sum_l2)
        scale = sum_xl / sum_l2.where(sum_l2 > 0, torch.ones_like(sum_l2))
        best_scale = torch.where(better, scale, best_scale)
        best = torch.where(better, scale * sum_xl, best)
        best_q = torch.where(better, q, best_q)
    scale = best_scale.where(live, torch.zeros_like(best_scale)).squeeze(1)
    return scale, best_q.where(live, torch.zeros_like(best_q))


def fit_positive(x: torch.Tensor, w: torch.Tensor, nmax: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``make_qp_quants`` on every row of non-negative ``x`` (n, k): (scale, codes in ``[0, nmax]``) for the
    sub-block scales under an imatrix: the best of nine grids ``(nmax + 0.1 s) / max``, then a greedy refit."""
    mx = x.amax(dim=1, keepdim=True)
    live = mx >= 1e-15
    safe = mx.where(live, torch.ones_like(mx))

    def mse(iscale: torch.Tensor, first: bool) -> torch.Tensor:
        q = torch.round(iscale * x)
        q = q if first else q.clamp(max=nmax)  # llama.cpp's first grid is not clamped
        return (w * (x - (1 / iscale) * q).square()).sum(1, keepdim=True)

    iscale = nmax / safe
    best = mse(iscale, True)
    for step in (-4, -3, -2, -1, 1, 2, 3, 4):
        cand = (0.1 * step + nmax) / safe
        e = mse(cand, False)
        better = e < best
        best, iscale = torch.where(better, e, best), torch.where(better, cand, iscale)
    q = torch.round(iscale * x).clamp(max=nmax)
    q, scale = _refit(x, w, q, None, nmax, both_positive=True)
    return scale.where(live.squeeze(1), torch.zeros_like(scale)), q.where(live, torch.zeros_like(q))


def _refit(x: torch.Tensor, w: torch.Tensor, q: torch.Tensor, lo: int | None, hi: int, both_positive: bool,
           tries: int = 5) -> tuple[torch.Tensor, torch.Tensor]:
    """llama.cpp's greedy refit (``make_q3_quants`` / ``make_qp_quants``): each code in turn moves to
    ``round(x * sum w q^2 / sum w x q)`` of the others when that raises ``(sum w x q)^2 / sum w q^2``; up to ``tries``
    passes.  Returns (codes, least-squares scale)."""
    q = q.clone()
    sumlx, suml2 = (w * x * q).sum(1), (w * q * q).sum(1)
    for _ in range(tries):
        changed = torch.zeros(x.shape[0], dtype=torch.bool)
        for i in range(x.shape[1]):
            xi, wi, li = x[:, i], w[:, i], q[:, i]
            slx, sl2 = sumlx - wi * xi * li, suml2 - wi * li * li
            usable = (slx > 0) & (sl2 > 0) if both_positive else slx > 0
            new = torch.round(xi * sl2 / slx.where(slx > 0, torch.ones_like(slx))).clamp(lo, hi)
            slx2, sl22 = slx + wi * xi * new, sl2 + wi * new * new
            take = usable & (new != li) & (both_positive | (sl22 > 0)) & (slx2 * slx2 * suml2 > sumlx * sumlx * sl22)
            q[:, i] = torch.where(take, new, li)
            sumlx, suml2 = torch.where(take, slx2, sumlx), torch.where(take, sl22, suml2)
            changed |= take
        if not bool(changed.any()):
            break
    scale = sumlx / suml2.where(suml2 > 0, torch.ones_like(suml2))
    return q, scale.where(suml2 > 0, torch.zeros_like(scale))


def fit_q3(x: torch.Tensor, nmax: int = 4) -> torch.Tensor:
    """``make_q3_quants`` (with its refit, weights ``x^2``) on every row of ``x`` (n, k): the scale."""
    amax_idx = x.abs().argmax(dim=1, keepdim=True)
    peak = x.gather(1, amax_idx)
    live = (peak.abs() >= 1e-15).squeeze(1)  # GROUP_MAX_EPS
    q = torch.round(-nmax / peak.where(live.unsqueeze(1), torch.ones_like(peak)) * x).clamp(-nmax, nmax - 1)
    _, scale = _refit(x, x * x, q, -nmax, nmax - 1, both_positive=False)
    return scale.where(live, torch.zeros_like(scale))


def _requantize(x: torch.Tensor, step: torch.Tensor, offset: torch.Tensor | None, lo: int, hi: int) -> torch.Tensor:
    """Codes of ``x`` (nb, n_sub, size) on the final grid ``step * q - offset`` per sub-block (where ``step`` is 0,
    llama.cpp keeps the fit's codes; they dequantize to the same value, so the lowest code is written)."""
    shifted = x if offset is None else x + offset
    q = torch.round(shifted / _safe(step)).clamp(lo, hi)
    return q.where(step != 0, torch.full_like(q, lo))


def encode_q3_k(weight: torch.Tensor, imatrix: torch.Tensor | None = None) -> torch.Tensor:
    """Q3_K bytes of ``weight`` (rows, cols): ``make_q3_quants`` per sub-block and 6-bit scales from the largest one
    (``quantize_row_q3_K_ref``), or with an imatrix weighted ``make_qx_quants`` for the sub-blocks and for their
    scales (``quantize_row_q3_K_impl``)."""
    x = _super_blocks(weight)
    nb = x.shape[0]
    sub = x.reshape(nb * 16, 16)
    if imatrix is None:
        scale = fit_q3(sub).reshape(nb, 16)
        peak = scale.gather(1, scale.abs().argmax(dim=1, keepdim=True))
        iscale = -32 / _safe(peak)
        sc = torch.round(iscale * scale).clamp(-32, 31).where(peak != 0, torch.zeros_like(scale))
        d = _fp16(1 / iscale).where(peak != 0, torch.zeros_like(peak))
    else:
        w = imatrix_weights(x, imatrix, weight.shape[0]).reshape(nb * 16, 16)
        scale, _ = fit_symmetric(sub, w, 4)
        d_block, sc = fit_symmetric(scale.reshape(nb, 16), w.reshape(nb, 16, 16).sum(2), 32)
        d = _fp16(d_block).reshape(nb, 1)
    q = _requantize(x.reshape(nb, 16, 16), (d * sc).reshape(nb, 16, 1), None, -4, 3) + 4
    return pack_q3_k(d.squeeze(1), sc + 32, q.reshape(nb, QK_K))


def pack_q3_k(d: torch.Tensor, sc: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """Q3_K super-blocks from their parts: ``d`` (nb,) fp16 values, ``sc`` (nb, 16) in [0, 64), codes ``q`` (nb, 256)
    in [0, 8); weight ``i`` is ``d * (sc[i // 16] - 32) * (q[i] - 4)``."""
    nb = q.shape[0]
    q = q.to(torch.uint8)
    hmask = ((q >> 2) & 1).reshape(nb, 8, 32)  # bit k of byte j: weight 32 k + j
    hmask = (hmask.to(torch.int32) << torch.arange(8).reshape(1, 8, 1)).sum(1).to(torch.uint8)
    low = (q & 3).reshape(nb, 2, 4, 32)  # weights 128 h + 32 s + l -> byte 32 h + l, bits 2 s
    qs = (low.to(torch.int32) << (2 * torch.arange(4)).reshape(1, 1, 4, 1)).sum(2).to(torch.uint8).reshape(nb, 64)
    sc = sc.to(torch.uint8)
    lo = (sc[:, :8] & 15) | ((sc[:, 8:] & 15) << 4)
    hi = (sc >> 4).reshape(nb, 4, 4)  # scale j: bits 2 (j // 4) of byte 8 + j % 4
    hi = (hi.to(torch.int32) << (2 * torch.arange(4)).reshape(1, 4, 1)).sum(1).to(torch.uint8)
    return torch.cat([hmask, qs, lo, hi, d.reshape(nb, 1).to(torch.float16).view(torch.uint8)], dim=1)


def _max_scaled(values: torch.Tensor, levels: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Non-negative per-sub-block ``values`` (nb, n) as codes ``round(levels * v / max)`` (at most ``levels``) and the
    fp16 super-block factor ``max / levels`` (0 where the maximum is 0)."""
    mx = values.amax(1, keepdim=True)
    codes = torch.round(values * (levels / _safe(mx))).clamp(max=levels).where(mx > 0, torch.zeros_like(values))
    return codes, _fp16(mx / levels).where(mx > 0, torch.zeros_like(mx))


def encode_q2_k(weight: torch.Tensor, imatrix: torch.Tensor | None = None) -> torch.Tensor:
    """Q2_K bytes of ``weight`` (rows, cols): ``make_qkx2_quants`` on absolute errors per sub-block (weights ``|x|``)
    with 4-bit scales and mins from the largest (``quantize_row_q2_K_ref``); with an imatrix ``make_qkx3_quants``
    and ``make_qp_quants`` for the scales (``quantize_row_q2_K_impl``)."""
    x = _super_blocks(weight)
    nb = x.shape[0]
    sub = x.reshape(nb * 16, 16)
    if imatrix is None:
        scale, mn = fit_scale_min(sub, sub.abs(), 3, -0.5, 0.1, 15, mad=True)
        sc, d = _max_scaled(scale.reshape(nb, 16), 15)
        m, dmin = _max_scaled(mn.reshape(nb, 16), 15)
    else:
        w = imatrix_weights(x, imatrix, weight.shape[0], sigma_scale=1.0).reshape(nb * 16, 16)
        scale, mn = fit_scale_min(sub, w, 3, -0.9, 0.05, 36)
        sw = w.reshape(nb, 16, 16).sum(2)
        d, sc = fit_positive(scale.reshape(nb, 16), sw, 15)
        dmin, m = fit_positive(mn.reshape(nb, 16), sw, 15)
        d, dmin = _fp16(d).reshape(nb, 1), _fp16(dmin).reshape(nb, 1)
    q = _requantize(x.reshape(nb, 16, 16), (d * sc).reshape(nb, 16, 1), (dmin * m).reshape(nb, 16, 1), 0, 3)
    return pack_q2_k(d.squeeze(1), dmin.squeeze(1), sc, m, q.reshape(nb, QK_K))


def pack_q2_k(d: torch.Tensor, dmin: torch.Tensor, sc: torch.Tensor, m: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """Q2_K super-blocks from their parts: ``d``, ``dmin`` (nb,) fp16 values, ``sc``, ``m`` (nb, 16) in [0, 16), codes
    ``q`` (nb, 256) in [0, 4); weight ``i`` is ``d * sc[i // 16] * q[i] - dmin * m[i // 16]``."""
    nb = q.shape[0]
    scales = (sc.to(torch.uint8) & 15) | (m.to(torch.uint8) << 4)
    low = q.to(torch.uint8).reshape(nb, 2, 4, 32)
    qs = (low.to(torch.int32) << (2 * torch.arange(4)).reshape(1, 1, 4, 1)).sum(2).to(torch.uint8).reshape(nb, 64)
    head = torch.stack([d, dmin], dim=1).to(torch.float16).view(torch.uint8)
    return torch.cat([scales, qs, head], dim=1)


def _pack_scales_k(sc: torch.Tensor, mn: torch.Tensor) -> torch.Tensor:
    """The 12 bytes holding eight 6-bit scales and mins (gguf-py ``Q4_K.get_scale_min``'s inverse)."""
    sc, mn = sc.to(torch.uint8), mn.to(torch.uint8)
    first = (sc[:, :4] & 63) | ((sc[:, 4:] >> 4) << 6)
    second = (mn[:, :4] & 63) | ((mn[:, 4:] >> 4) << 6)
    third = (sc[:, 4:] & 15) | ((mn[:, 4:] & 15) << 4)
    return torch.cat([first, second, third], dim=1)


def _super_blocks(weight: torch.Tensor) -> torch.Tensor:
    rows, cols = weight.shape
    if cols % QK_K:
        raise ValueError(f"K-quants need rows of a multiple of {QK_K} weights, got {cols}")
    return weight.detach().float().reshape(-1, QK_K)


def encode_qk_asym(weight: torch.Tensor, bits: int, imatrix: torch.Tensor | None = None) -> torch.Tensor:
    """Q4_K (``bits`` 4) or Q5_K (5) bytes of ``weight`` (rows, cols): ``make_qkx2_quants`` per sub-block of 32 with
    weights ``sqrt(mean x^2) + |x|`` and 6-bit scales / mins from the largest (``quantize_row_q{4,5}_K_ref``); with an
    imatrix ``make_qkx3_quants`` and ``make_qp_quants`` for the scales (``quantize_row_q{4,5}_K_impl``)."""
    x = _super_blocks(weight)
    nb = x.shape[0]
    nmax = (1 << bits) - 1
    sub = x.reshape(nb * 8, 32)
    if imatrix is None:
        rmin, nstep = (-1.0, 20) if bits == 4 else (-0.5, 15)
        scale, mn = fit_scale_min(sub, sub_block_av_weights(sub), nmax, rmin, 0.1, nstep)
        sc, d = _max_scaled(scale.reshape(nb, 8), 63)
        m, dmin = _max_scaled(mn.reshape(nb, 8), 63)
    else:
        w = imatrix_weights(x, imatrix, weight.shape[0]).reshape(nb * 8, 32)
        scale, mn = fit_scale_min(sub, w, nmax, -0.9, 0.05, 36)
        sw = w.reshape(nb, 8, 32).sum(2)
        d, sc = fit_positive(scale.reshape(nb, 8), sw, 63)
        dmin, m = fit_positive(mn.reshape(nb, 8), sw, 63)
        d, dmin = _fp16(d).reshape(nb, 1), _fp16(dmin).reshape(nb, 1)
    q = _requantize(x.reshape(nb, 8, 32), (d * sc).reshape(nb, 8, 1), (dmin * m).reshape(nb, 8, 1), 0, nmax)
    return pack_qk_asym(d.squeeze(1), dmin.squeeze(1), sc, m, q.reshape(nb, QK_K), bits)


def pack_qk_asym(d: torch.Tensor, dmin: torch.Tensor, sc: torch.Tensor, m: torch.Tensor, q: torch.Tensor,
                 bits: int) -> torch.Tensor:
    """Q4_K / Q5_K super-blocks from their parts: ``d``, ``dmin`` (nb,) fp16 values, ``sc``, ``m`` (nb, 8) in
    [0, 63], codes ``q`` (nb, 256) in [0, 2^bits); weight ``i`` is ``d * sc[i // 32] * q[i] - dmin * m[i // 32]``."""
    nb = q.shape[0]
    q = q.to(torch.uint8).reshape(nb, 4, 2, 32)
    qs = (q[:, :, 0] & 15) | ((q[:, :, 1] & 15) << 4)  # 64 weights a 32-byte row: low then high nibbles
    head = torch.stack([d, dmin], dim=1).to(torch.float16).view(torch.uint8)  # (nb, 4)
    parts = [head, _pack_scales_k(sc, m)]
    if bits == 5:
        high = (q.reshape(nb, 8, 32) >> 4) & 1  # bit 4 of sub-block j lands in bit j of qh
        parts.append((high.to(torch.int32) << torch.arange(8).reshape(1, 8, 1)).sum(1).to(torch.uint8))
    parts.append(qs.reshape(nb, 128))
    return torch.cat(parts, dim=1)


def encode_q6_k(weight: torch.Tensor, imatrix: torch.Tensor | None = None) -> torch.Tensor:
    """Q6_K bytes of ``weight`` (rows, cols): ``make_qx_quants`` per sub-block of 16 (weights ``x^2``, or the imatrix
    column values themselves) and int8 scales from the largest (``quantize_row_q6_K_ref`` / ``_impl``)."""
    x = _super_blocks(weight)
    nb = x.shape[0]
    sub = x.reshape(nb * 16, 16)
    if imatrix is None:
        w = sub * sub
    else:
        w = imatrix.float().reshape(1, -1).expand(weight.shape[0], -1).reshape(nb * 16, 16)
    scale, _ = fit_symmetric(sub, w, 32)
    scale = scale.reshape(nb, 16)
    peak = scale.gather(1, scale.abs().argmax(dim=1, keepdim=True))
    live = peak.abs() >= 1e-15
    iscale = -128 / peak.where(live, torch.ones_like(peak))
    d = _fp16(1 / iscale).where(live, torch.zeros_like(peak))
    sc = torch.round(iscale * scale).clamp(max=127).where(live, torch.zeros_like(scale))
    q = _requantize(x.reshape(nb, 16, 16), (d * sc).reshape(nb, 16, 1), None, -32, 31) + 32
    q = q.where(live.reshape(nb, 1, 1), torch.zeros_like(q))  # an all-zero super-block is written as zero bytes
    return pack_q6_k(d.squeeze(1), sc, q.reshape(nb, QK_K))


def pack_q6_k(d: torch.Tensor, sc: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """Q6_K super-blocks from their parts: ``d`` (nb,) fp16 values, ``sc`` (nb, 16) in [-128, 127], codes ``q``
    (nb, 256) in [0, 64); weight ``i`` is ``d * sc[i // 16] * (q[i] - 32)``."""
    nb = q.shape[0]
    q = q.to(torch.uint8).reshape(nb, 2, 4, 32)
    ql = torch.cat([(q[:, :, 0] & 15) | ((q[:, :, 2] & 15) << 4),  # bytes 0-31: weights 0-31 and 64-95
                    (q[:, :, 1] & 15) | ((q[:, :, 3] & 15) << 4)], dim=2)  # bytes 32-63: 32-63 and 96-127
    qh = (q[:, :, 0] >> 4) | ((q[:, :, 1] >> 4) << 2) | ((q[:, :, 2] >> 4) << 4) | ((q[:, :, 3] >> 4) << 6)
    scales = sc.to(torch.int8).view(torch.uint8)
    return torch.cat([ql.reshape(nb, 128), qh.reshape(nb, 64), scales,
                      d.reshape(nb, 1).to(torch.float16).view(torch.uint8)], dim=1)


def encode_k(weight: torch.Tensor, type_name: str, imatrix: torch.Tensor | None = None) -> torch.Tensor:
    """``weight`` as K-quant ``type_name`` bytes (rows * cols / 256, bytes per super-block)."""
    bits, _ = K_TYPES[type_name]
    encoders = {2: encode_q2_k, 3: encode_q3_k, 6: encode_q6_k}
    if bits in encoders:
        return encoders[bits](weight, imatrix)
    return encode_qk_asym(weight, bits, imatrix)
