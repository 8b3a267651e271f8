"""Statistics on tensors for the analysis reports: activation outlier channels, weight distributions,
and the error between two hidden-state tensors.

Pure math, no model plumbing.  Moments are population moments (divide by n) computed in float64;
``kurtosis`` is the *excess* (Fisher) kurtosis ``E[(x-mu)^4] / sigma^4 - 3``: 0 for a Gaussian,
large when a few values dominate.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from typing import Any

import torch

OUTLIER_FACTOR = 6.0  # a channel is an outlier when its absmax exceeds this many times the median


def _flat64(x: torch.Tensor) -> torch.Tensor:
    if x.numel() == 0:
        raise ValueError(f"statistics are undefined for an empty tensor (shape {tuple(x.shape)})")
    return x.detach().reshape(-1).to("cpu", torch.float64)


def _central(v: torch.Tensor) -> tuple[torch.Tensor, float, float]:
    """Squared deviations from the mean, second and fourth central moments of a flat float64 tensor."""
    d2 = (v - v.mean()).square_()
    return d2, float(d2.mean()), float(torch.dot(d2, d2)) / d2.numel()


def _excess(m2: float, m4: float) -> float:
    return m4 / m2**2 - 3.0 if m2 > 0 else 0.0


def kurtosis(x: torch.Tensor) -> float:
    """Excess kurtosis of the values of ``x`` (0 for a Gaussian, 0.0 for constant input)."""
    _, m2, m4 = _central(_flat64(x))
    return _excess(m2, m4)


def median(x: torch.Tensor) -> float:
    """Median of the values of ``x`` (the mean of the two middle values for an even count)."""
    return float(_flat64(x).quantile(0.5))


def update_absmax(acc: torch.Tensor | None, x: torch.Tensor) -> torch.Tensor:
    """Running per-channel (last dimension) absolute maximum of ``x`` folded into ``acc`` (float32)."""
    amax = x.detach().reshape(-1, x.shape[-1]).abs().amax(0).float()
    return amax if acc is None else torch.maximum(acc, amax)


def outlier_channels(absmax: torch.Tensor, factor: float = OUTLIER_FACTOR, top_k: int | None = None) -> list[int]:
    """Channels whose absmax exceeds ``factor`` x the median absmax, largest first.

    With ``top_k``, the ``top_k`` largest channels instead (whatever their size).
    """
    a = _flat64(absmax)
    order = torch.argsort(a, descending=True, stable=True)
    if top_k is not None:
        return order[: max(0, top_k)].tolist()
    above = a[order] > factor * median(a)
    return order[above].tolist()


def channel_stats(absmax: torch.Tensor, factor: float = OUTLIER_FACTOR) -> dict[str, Any]:
    """Summary of a per-input-channel absmax vector: ``max``, ``median``, ``ratio`` (max / median,
    inf when the median is 0), ``kurtosis`` of the channel magnitudes, ``outliers`` (indices of
    channels above ``factor`` x median, largest first) and ``top`` (the 8 largest channels)."""
    a = _flat64(absmax)
    mx, med = float(a.max()), median(a)
    ratio = mx / med if med > 0 else (math.inf if mx > 0 else 1.0)
    return {
        "channels": a.numel(),
        "max": mx,
        "median": med,
        "ratio": ratio,
        "kurtosis": kurtosis(a),
        "outliers": outlier_channels(a, factor),
        "top": outlier_channels(a, top_k=8),
    }


def weight_summary(w: torch.Tensor) -> dict[str, float]:
    """Distribution of a weight matrix (out, in): ``std``, ``absmax``, ``absmax_over_std``,
    ``kurtosis`` (excess), ``beyond_3sigma`` (fraction of |w - mean| > 3 std; 0.0027 for a Gaussian)
    and the spread of the per-output-row absmax: ``row_absmax_max_over_median``,
    ``row_absmax_min_over_median`` and ``row_absmax_cv`` (std / mean of the row absmaxes)."""
    if w.dim() != 2:
        raise ValueError(f"weight_summary expects a 2-D (out, in) matrix, got shape {tuple(w.shape)}")
    if w.numel() == 0:
        raise ValueError(f"statistics are undefined for an empty tensor (shape {tuple(w.shape)})")
    v = w.detach().reshape(-1).to("cpu", torch.float64, copy=True)  # private: changed in place below
    d2, m2, m4 = _central(v)
    std = math.sqrt(m2)
    rows = v.abs_().view(w.shape).amax(1)  # v is a private float64 copy
    absmax = float(rows.max())
    rmed, rmean = median(rows), float(rows.mean())
    rstd = float(((rows - rmean) ** 2).mean().sqrt())
    return {
        "std": std,
        "absmax": absmax,
        "absmax_over_std": absmax / std if std > 0 else math.inf,
        "kurtosis": _excess(m2, m4),
        "beyond_3sigma": float((d2 > 9 * m2).sum()) / d2.numel() if std > 0 else 0.0,
        "row_absmax_max_over_median": float(rows.max()) / rmed if rmed > 0 else math.inf,
        "row_absmax_min_over_median": float(rows.min()) / rmed if rmed > 0 else math.inf,
        "row_absmax_cv": rstd / rmean if rmean > 0 else 0.0,
    }


def encode_absmax(values: torch.Tensor) -> str:
    """Per-channel values as one space-separated string at 4 significant digits: about 7 bytes a
    channel in the JSON result, against about 14 for an indented list."""
    return " ".join(f"{v:.4g}" for v in values.tolist())


def absmax_values(entry: Mapping[str, Any]) -> list[float]:
    """The per-channel absmax of an ``activation_stats`` entry (encoded string or plain list)."""
    a = entry["absmax"]
    return [float(v) for v in a.split()] if isinstance(a, str) else [float(v) for v in a]


# ------------------------------------------------------------------ hidden-state error

def hidden_error_terms(ref: torch.Tensor, approx: torch.Tensor) -> dict[str, float]:
    """Additive terms of the error between hidden states (..., hidden): summed squared error and
    squared reference norm, the sum of per-token relative errors, the sum and minimum of per-token
    cosines, and the token count.

    Terms of several batches combine with ``merge_error_terms``; ``finish_hidden_error`` turns them
    into the reported metrics.
    """
    if ref.shape != approx.shape:
        raise ValueError(f"shape mismatch: reference {tuple(ref.shape)} vs approximation {tuple(approx.shape)}")
    r = ref.detach().reshape(-1, ref.shape[-1]).to("cpu", torch.float64)
    a = approx.detach().reshape(-1, ref.shape[-1]).to("cpu", torch.float64)
    nr, na = r.norm(dim=1), a.norm(dim=1)
    denom = nr * na
    cos = torch.where(denom > 0, (r * a).sum(1) / denom.clamp_min(1e-300), (nr == na).double())
    cos = cos.clamp(-1.0, 1.0)
    ne = (r - a).norm(dim=1)
    tok_rel = torch.where(nr > 0, ne / nr.clamp_min(1e-300), torch.where(ne > 0, math.inf, 0.0))
    return {
        "sq_err": float((ne * ne).sum()),
        "sq_ref": float((nr * nr).sum()),
        "tok_rel_sum": float(tok_rel.sum()),
        "cos_sum": float(cos.sum()),
        "cos_min": float(cos.min()) if cos.numel() else 1.0,
        "tokens": int(r.shape[0]),
    }


def merge_error_terms(terms: Iterable[Mapping[str, float]]) -> dict[str, float]:
    """The terms of the concatenated batches."""
    out = {"sq_err": 0.0, "sq_ref": 0.0, "tok_rel_sum": 0.0, "cos_sum": 0.0, "cos_min": 1.0, "tokens": 0}
    for t in terms:
        for k in ("sq_err", "sq_ref", "tok_rel_sum", "cos_sum", "tokens"):
            out[k] += t[k]
        out["cos_min"] = min(out["cos_min"], t["cos_min"])
    return out


def finish_hidden_error(terms: Mapping[str, float]) -> dict[str, float]:
    """``rel_error`` = ||ref - approx||_F / ||ref||_F (dominated by the largest tokens, e.g. the
    massive activations of the first position), ``token_rel_error`` = mean over tokens of
    ||ref_t - approx_t|| / ||ref_t||, ``cosine`` = mean per-token cosine, ``cosine_min`` = the worst
    token's cosine."""
    sq_err, sq_ref = terms["sq_err"], terms["sq_ref"]
    rel = math.sqrt(sq_err / sq_ref) if sq_ref > 0 else (0.0 if sq_err == 0 else math.inf)
    n = max(int(terms["tokens"]), 1)
    return {"rel_error": rel, "token_rel_error": terms["tok_rel_sum"] / n, "cosine": terms["cos_sum"] / n,
            "cosine_min": terms["cos_min"]}


def hidden_error(ref: torch.Tensor, approx: torch.Tensor) -> dict[str, float]:
    """Relative error and per-token cosine between two hidden-state tensors (..., hidden)."""
    return finish_hidden_error(hidden_error_terms(ref, approx))


# ------------------------------------------------------------------ summaries of per-layer results

def _mean(xs: list[float]) -> float:
    finite = [x for x in xs if math.isfinite(x)]
    return sum(finite) / len(finite) if finite else math.nan


def summarize_activations(layers: Mapping[str, Mapping[str, Any]], recurring: int = 5) -> dict[str, dict[str, Any]]:
    """Per layer type (``q_proj``, ``down_proj`` ...): layer count, mean / max max-to-median ratio,
    mean kurtosis, mean outlier count and the ``recurring`` channels that are outliers in the most
    layers, as ``[channel, layers]`` pairs (the residual stream's fixed outlier channels show up
    here)."""
    by_type: dict[str, list[Mapping[str, Any]]] = {}
    for st in layers.values():
        by_type.setdefault(st["type"], []).append(st)
    out: dict[str, dict[str, Any]] = {}
    for kind, items in by_type.items():
        counts: dict[int, int] = {}
        for st in items:
            for c in st["outliers"]:
                counts[c] = counts.get(c, 0) + 1
        common = sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))[:recurring]
        ratios = [float(st["ratio"]) for st in items]
        out[kind] = {
            "layers": len(items),
            "mean_ratio": _mean(ratios),
            "max_ratio": max(ratios),
            "mean_kurtosis": _mean([float(st["kurtosis"]) for st in items]),
            "mean_outliers": _mean([float(len(st["outliers"])) for st in items]),
            "recurring_outliers": [[c, n] for c, n in common],
        }
    return out


def summarize_weights(layers: Mapping[str, Mapping[str, Any]]) -> dict[str, dict[str, float]]:
    """Per layer type: layer count, mean and max excess kurtosis, max absmax/std, mean fraction beyond
    3 sigma and mean row-absmax spread (max / median)."""
    by_type: dict[str, list[Mapping[str, Any]]] = {}
    for st in layers.values():
        by_type.setdefault(st["type"], []).append(st)
    return {
        kind: {
            "layers": len(items),
            "mean_kurtosis": _mean([st["kurtosis"] for st in items]),
            "max_kurtosis": max(st["kurtosis"] for st in items),
            "max_absmax_over_std": max(st["absmax_over_std"] for st in items),
            "mean_beyond_3sigma": _mean([st["beyond_3sigma"] for st in items]),
            "mean_row_spread": _mean([st["row_absmax_max_over_median"] for st in items]),
        }
        for kind, items in by_type.items()
    }
