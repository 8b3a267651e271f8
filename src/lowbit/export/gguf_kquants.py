"""llama.cpp's K-quant super-blocks (256 weights) for GGUF export: Q4_K, Q5_K and Q6_K, encoded in torch.

* Q4_K / Q5_K: eight sub-blocks of 32 with ``w = d * sc * q - dmin * m`` (``q`` 4 / 5 bits; ``sc``, ``m``
  6-bit per sub-block; ``d``, ``dmin`` fp16 per super-block); 144 / 176 bytes.
* Q6_K: sixteen sub-blocks of 16 with ``w = d * sc * (q - 32)`` (``q`` 6 bits, ``sc`` int8, ``d`` fp16); 210 bytes.

The rounding follows llama.cpp's reference quantizer (``ggml-quants.c``): each sub-block's scale (and min) is a
weighted least-squares fit over a small grid of candidate scales (``make_qkx2_quants`` for Q4_K / Q5_K,
``make_qx_quants`` for Q6_K), then the sub-block scales are themselves quantized to 6 or 8 bits and every weight
re-rounded on the final grid.  The weights of the fit are llama.cpp's default importance ``av_x + |x|``, or,
given an importance vector per input column (an imatrix: the mean square of each column's calibration inputs),
``imatrix * sqrt(sigma2 + x^2)`` as llama.cpp's ``--imatrix`` does.  The byte layouts mirror gguf-py's
dequantizers, which the tests use as the reference.
"""

from __future__ import annotations

import torch

QK_K = 256
K_TYPES = {"Q4_K": (4, 144), "Q5_K": (5, 176), "Q6_K": (6, 210)}  # bits, bytes per super-block
K_FALLBACK = {"Q4_K": "Q5_0", "Q5_K": "Q5_1", "Q6_K": "Q8_0"}  # llama.cpp's type when a row is not 256-divisible


def _fp16(x: torch.Tensor) -> torch.Tensor:
    return x.to(torch.float16).float()


def importance(x: torch.Tensor, imatrix: torch.Tensor | None, rows: int) -> torch.Tensor:
    """llama.cpp's per-weight fit weights for the super-blocks ``x`` (nb, 256) of a ``rows``-row matrix:
    ``av_x + |x|``, or with an imatrix (one importance per input column) ``imatrix * sqrt(sigma2 + x^2)``."""
    sigma2 = 2 * x.square().mean(dim=1, keepdim=True)
    if imatrix is None:
        return sigma2.sqrt() / 2 ** 0.5 + x.abs()  # av_x = sqrt(sum x^2 / 256)
    columns = imatrix.float().reshape(1, -1).expand(rows, -1).reshape(-1, QK_K)
    return columns * (sigma2 + x.square()).sqrt()


def fit_scale_min(x: torch.Tensor, w: torch.Tensor, nmax: int, rmin: float = -1.0, rdelta: float = 0.1,
                  nstep: int = 20) -> tuple[torch.Tensor, torch.Tensor]:
    """``make_qkx2_quants`` on every row of ``x`` (n, k) with fit weights ``w``: (scale, min) per row, the min
    as the positive offset (``w ~ scale * q - min``), ``q`` in ``[0, nmax]``."""
    lo = x.amin(dim=1, keepdim=True).clamp(max=0.0)
    hi = x.amax(dim=1, keepdim=True)
    rng = (hi - lo).clamp_min(1e-30)
    sum_w, sum_x = w.sum(1, keepdim=True), (w * x).sum(1, keepdim=True)

    def err(scale: torch.Tensor, mn: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
        return (w * (scale * q + mn - x).square()).sum(1, keepdim=True)

    q = torch.round((x - lo) * (nmax / rng)).clamp(0, nmax)
    best_scale, best_min = rng / nmax, lo
    best = err(best_scale, best_min, q)
    for step in range(nstep + 1):
        iscale = (rmin + rdelta * step + nmax) / rng
        q = torch.round((x - lo) * iscale).clamp(0, nmax)
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
    flat = hi == lo
    best_scale = torch.where(flat, torch.zeros_like(best_scale), best_scale)
    return best_scale.squeeze(1), (-best_min).squeeze(1)


def fit_symmetric(x: torch.Tensor, w: torch.Tensor, nmax: int) -> torch.Tensor:
    """``make_qx_quants`` (rmse_type 1) on every row of ``x`` (n, k): the scale of ``q`` in ``[-nmax, nmax - 1]``
    (the largest magnitude's sign maps to ``-nmax``) that minimises the weighted error over 19 candidates."""
    amax_idx = x.abs().argmax(dim=1, keepdim=True)
    peak = x.gather(1, amax_idx)  # signed value of the largest magnitude
    safe = peak.where(peak != 0, torch.ones_like(peak))
    best_scale = torch.zeros_like(peak)
    best = torch.full_like(peak, float("inf"))
    for step in range(-9, 10):
        iscale = -(nmax + 0.1 * step) / safe
        q = torch.round(iscale * x).clamp(-nmax, nmax - 1)
        sum_xl, sum_l2 = (w * x * q).sum(1, keepdim=True), (w * q * q).sum(1, keepdim=True)
        scale = sum_xl / sum_l2.clamp_min(1e-30)
        e = (w * (scale * q - x).square()).sum(1, keepdim=True)
        better = (sum_l2 > 0) & (e < best)
        best, best_scale = torch.where(better, e, best), torch.where(better, scale, best_scale)
    return torch.where(peak == 0, torch.zeros_like(best_scale), best_scale).squeeze(1)


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
    """Q4_K (``bits`` 4) or Q5_K (5) bytes of ``weight`` (rows, cols), one row of blocks per super-block."""
    x = _super_blocks(weight)
    nb = x.shape[0]
    imp = importance(x, imatrix, weight.shape[0])
    nmax = (1 << bits) - 1
    sub = x.reshape(nb * 8, 32)
    scale, mn = fit_scale_min(sub, imp.reshape(nb * 8, 32), nmax)
    scale, mn = scale.reshape(nb, 8), mn.reshape(nb, 8)
    max_scale, max_min = scale.amax(1, keepdim=True), mn.amax(1, keepdim=True)
    d = _fp16(max_scale / 63)
    dmin = _fp16(max_min / 63)
    sc = torch.round(scale * (63 / max_scale.where(max_scale > 0, torch.ones_like(max_scale)))).clamp(0, 63)
    m = torch.round(mn * (63 / max_min.where(max_min > 0, torch.ones_like(max_min)))).clamp(0, 63)
    step = (d * sc).reshape(nb, 8, 1)
    offset = (dmin * m).reshape(nb, 8, 1)
    q = torch.round((x.reshape(nb, 8, 32) + offset) / step.where(step > 0, torch.ones_like(step)))
    q = q.where(step > 0, torch.zeros_like(q)).clamp(0, nmax)
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
    """Q6_K bytes of ``weight`` (rows, cols)."""
    x = _super_blocks(weight)
    nb = x.shape[0]
    imp = importance(x, imatrix, weight.shape[0])
    scale = fit_symmetric(x.reshape(nb * 16, 16), imp.reshape(nb * 16, 16), 32).reshape(nb, 16)
    amax_idx = scale.abs().argmax(dim=1, keepdim=True)
    peak = scale.gather(1, amax_idx)
    iscale = -128 / peak.where(peak != 0, torch.ones_like(peak))
    d = _fp16(1 / iscale).where(peak != 0, torch.zeros_like(peak))
    sc = torch.round(iscale * scale).clamp(max=127).where(peak != 0, torch.zeros_like(scale))
    step = (d * sc).reshape(nb, 16, 1)
    q = torch.round(x.reshape(nb, 16, 16) / step.where(step != 0, torch.ones_like(step)))
    q = q.where(step != 0, torch.zeros_like(q)).clamp(-32, 31) + 32
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
    return encode_q6_k(weight, imatrix) if bits == 6 else encode_qk_asym(weight, bits, imatrix)
