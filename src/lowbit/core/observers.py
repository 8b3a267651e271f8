"""Observers: streaming calibration of clipping ranges.

Feed batches with ``update(x)``; then ``range()`` gives per-group ``(xmin, xmax)`` and, for int
specs, ``qparams()`` gives ``(scale, zero)`` from ``lowbit.core.affine.spec_qparams``.  Both
come back in ``param_shape(layout)`` (``(1,)`` per tensor, ``(rows, 1)`` per channel, ...), ready
for ``quantize_int(x, spec, xmin, xmax)``.  Groups follow the spec's granularity via
``group_view``; with ``padding='pad'`` the repeated fill elements are observed like real ones.

* ``MinMaxObserver``               running min / max.
* ``MovingAverageMinMaxObserver``  exponential moving average of per-batch min / max.
* ``PercentileObserver``           lower / upper percentiles (nearest rank) of the data seen.
* ``MSEObserver``                  shrinks the min-max range by the factor on a grid that
  minimises ``sum |x - fake_quant(x)|^norm`` per group (norm 2: the quantization MSE).
* ``HistogramObserver``            TensorRT-style entropy calibration on a histogram of ``|x|``
  (per tensor only), with ``metric`` ``kl``, ``symmetric_kl`` or ``js``.

Percentile and MSE keep the data they need: every value while fewer than ``max_samples`` have
been seen (all groups together), then a uniform reservoir sample of columns of the group view.
"""

from __future__ import annotations

import math
from typing import Any, ClassVar

import torch

from lowbit.core.affine import group_ranges, int_range, spec_qparams
from lowbit.core.granularity import GroupLayout, group_view, param_shape
from lowbit.spec import OBSERVERS, QuantSpec

__all__ = [
    "Observer",
    "MinMaxObserver",
    "MovingAverageMinMaxObserver",
    "PercentileObserver",
    "MSEObserver",
    "HistogramObserver",
    "OBSERVER_CLASSES",
    "make_observer",
    "divergence",
    "quantized_reference",
    "entropy_threshold",
]

DEFAULT_SPEC = QuantSpec(type="int", bits=8, granularity="tensor")
_ERR_CHUNK = 1 << 20  # elements per chunk when scoring candidate ranges


class Observer:
    """Base class: group the input like the spec, accumulate statistics, report ranges."""

    name: ClassVar[str] = ""

    def __init__(self, spec: QuantSpec | None = None) -> None:
        self.spec = DEFAULT_SPEC if spec is None else spec
        self.reset()

    def reset(self) -> None:
        """Forget everything seen so far."""
        self.layout: GroupLayout | None = None
        self.num_batches = 0
        self._cached: tuple[torch.Tensor, torch.Tensor] | None = None
        self._reset()

    def _reset(self) -> None:
        raise NotImplementedError

    def _observe(self, xg: torch.Tensor) -> None:
        raise NotImplementedError

    def _range(self) -> tuple[torch.Tensor, torch.Tensor]:
        raise NotImplementedError

    # ------------------------------------------------------------------ public API
    def update(self, x: torch.Tensor) -> None:
        """Observe one batch."""
        if x.numel() == 0:
            raise ValueError(f"{type(self).__name__}.update got an empty tensor of shape {tuple(x.shape)}")
        sp = self.spec
        kind, pad = sp.granularity, sp.padding
        xg, layout = group_view(x.detach(), kind, sp.group_size, sp.block, pad)  # type: ignore[arg-type]
        if self.layout is not None and sp.granularity != "tensor" and layout.shape != self.layout.shape:
            raise ValueError(
                f"{type(self).__name__} with granularity {sp.granularity!r} saw shape {self.layout.shape} "
                f"and now {layout.shape}; per-group observers need the same shape every batch "
                "(use granularity 'tensor' for inputs whose shape varies)"
            )
        if not bool(torch.isfinite(xg).all()):
            raise ValueError(f"{type(self).__name__}.update got NaN or inf values")
        with torch.no_grad():
            self._observe(xg)
        self.layout = layout
        self.num_batches += 1
        self._cached = None

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """``update(x)`` and return ``x`` unchanged (handy in forward hooks)."""
        self.update(x)
        return x

    def range(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-group ``(xmin, xmax)`` (float32, ``param_shape(layout)``)."""
        if self.layout is None:
            raise ValueError(f"{type(self).__name__} has seen no data; call update(x) before range() or qparams()")
        if self._cached is None:
            with torch.no_grad():
                self._cached = self._range()
        lo, hi = self._cached
        shape = param_shape(self.layout)
        return lo.reshape(shape), hi.reshape(shape)

    def qparams(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(scale, zero)`` for the spec's bits and symmetry (int specs only)."""
        sp = self.spec
        if sp.type != "int":
            raise ValueError(f"qparams() needs an int spec; for {sp.type} specs use range() (e.g. its absmax)")
        lo, hi = self.range()
        return spec_qparams(lo, hi, sp)


# ---------------------------------------------------------------------------------- min / max
class _RunningMinMax:
    """Exact per-group min / max over every batch."""

    def __init__(self) -> None:
        self.min_val: torch.Tensor | None = None
        self.max_val: torch.Tensor | None = None

    def update(self, xg: torch.Tensor) -> None:
        lo, hi = group_ranges(xg)
        if self.min_val is None or self.max_val is None:
            self.min_val, self.max_val = lo, hi
        else:
            self.min_val, self.max_val = torch.minimum(self.min_val, lo), torch.maximum(self.max_val, hi)

    def get(self) -> tuple[torch.Tensor, torch.Tensor]:
        assert self.min_val is not None and self.max_val is not None
        return self.min_val, self.max_val


class MinMaxObserver(Observer):
    """Running per-group minimum and maximum."""

    name = "minmax"

    def _reset(self) -> None:
        self.stats = _RunningMinMax()

    def _observe(self, xg: torch.Tensor) -> None:
        self.stats.update(xg)

    def _range(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.stats.get()


class MovingAverageMinMaxObserver(MinMaxObserver):
    """Exponential moving average: ``m <- m + momentum * (batch_m - m)``; the first batch sets ``m``."""

    name = "moving_minmax"

    def __init__(self, spec: QuantSpec | None = None, momentum: float = 0.01) -> None:
        if not 0.0 < momentum <= 1.0:
            raise ValueError(f"momentum must be in (0, 1], got {momentum}")
        self.momentum = float(momentum)
        super().__init__(spec)

    def _observe(self, xg: torch.Tensor) -> None:
        st = self.stats
        lo, hi = group_ranges(xg)
        if st.min_val is None or st.max_val is None:
            st.min_val, st.max_val = lo, hi
        else:
            st.min_val = st.min_val + self.momentum * (lo - st.min_val)
            st.max_val = st.max_val + self.momentum * (hi - st.max_val)


# ---------------------------------------------------------------------------------- sampling
class _Reservoir:
    """Columns of a ``(G, E)`` stream: all of them up to a capacity, then Algorithm R."""

    def __init__(self, max_samples: int | None, seed: int) -> None:
        if max_samples is not None and max_samples < 1:
            raise ValueError(f"max_samples must be a positive integer or None, got {max_samples}")
        self.max_samples = max_samples
        self.gen = torch.Generator().manual_seed(seed)
        self.parts: list[torch.Tensor] = []
        self.buf: torch.Tensor | None = None
        self.filled = 0
        self.seen = 0
        self.cap: int | None = None

    def add(self, xg: torch.Tensor) -> None:
        g, e = xg.shape
        if self.seen == 0:
            self.cap = None if self.max_samples is None else max(1, self.max_samples // g)
        if self.buf is None and (self.cap is None or self.seen + e <= self.cap):
            self.parts.append(xg.float().clone() if xg.dtype == torch.float32 else xg.float())
            self.seen += e
            return
        assert self.cap is not None
        if self.buf is None:
            self.buf = torch.empty(g, self.cap, device=xg.device)
            if self.parts:
                old = torch.cat(self.parts, dim=1)
                self.buf[:, : old.shape[1]] = old
            self.filled, self.parts = self.seen, []
        take = min(self.cap - self.filled, e)
        self.buf[:, self.filled : self.filled + take] = xg[:, :take]
        self.filled += take
        self.seen += take
        rest = xg[:, take:]
        m = rest.shape[1]
        if m == 0:
            return
        t = torch.arange(self.seen + 1, self.seen + m + 1, dtype=torch.float64)
        r = (torch.rand(m, generator=self.gen, dtype=torch.float64) * t).long()  # uniform in [0, t)
        cols = torch.nonzero(r < self.cap).reshape(-1)
        slots = r[cols]
        if slots.numel():
            uniq, inv = torch.unique(slots, return_inverse=True)
            last = torch.zeros(len(uniq), dtype=torch.long)
            last.scatter_reduce_(0, inv, torch.arange(len(slots)), "amax", include_self=False)
            src = cols[last].to(xg.device)
            self.buf[:, uniq.to(xg.device)] = rest[:, src].float()  # later columns win, as in Algorithm R
        self.seen += m

    def data(self) -> torch.Tensor:
        if self.buf is not None:
            return self.buf[:, : self.filled]
        if len(self.parts) > 1:
            self.parts = [torch.cat(self.parts, dim=1)]
        return self.parts[0]


class _SampleObserver(Observer):
    """Keeps (a sample of) the data plus the exact running min / max."""

    def __init__(self, spec: QuantSpec | None = None, max_samples: int | None = 1 << 24, seed: int = 0) -> None:
        self.max_samples = max_samples
        self.seed = seed
        super().__init__(spec)

    def _reset(self) -> None:
        self.samples = _Reservoir(self.max_samples, self.seed)
        self.stats = _RunningMinMax()

    def _observe(self, xg: torch.Tensor) -> None:
        self.stats.update(xg)
        self.samples.add(xg)


class PercentileObserver(_SampleObserver):
    """Per-group lower / upper percentiles (nearest rank, via ``torch.kthvalue``).

    ``percentile=p`` gives ``(x_(N+1-k), x_(k))`` with ``k = ceil(p / 100 * N)`` over the ``N``
    values kept for each group; ``p = 100`` is min / max.
    """

    name = "percentile"

    def __init__(
        self,
        spec: QuantSpec | None = None,
        percentile: float = 99.99,
        max_samples: int | None = 1 << 24,
        seed: int = 0,
    ) -> None:
        if not (isinstance(percentile, (int, float)) and 50.0 < percentile <= 100.0):
            raise ValueError(f"percentile must be a number in (50, 100], e.g. 99.99; got {percentile!r}")
        self.percentile = float(percentile)
        super().__init__(spec, max_samples, seed)

    def _range(self) -> tuple[torch.Tensor, torch.Tensor]:
        data = self.samples.data()
        n = data.shape[1]
        k = min(n, max(1, math.ceil(self.percentile / 100.0 * n - 1e-9)))
        lo = torch.kthvalue(data, n + 1 - k, dim=1).values
        hi = torch.kthvalue(data, k, dim=1).values
        return lo, hi


class MSEObserver(_SampleObserver):
    """Grid search of a shrink factor ``p`` in ``[alpha, beta]`` applied to the min-max range.

    For each group picks the ``p`` (first of ``linspace(beta, alpha, steps)`` on ties) that
    minimises ``sum |x - fake_quant(x)|^norm`` under the spec's int format (default grid: 1.0 down
    to 0.2 in steps of 0.01, as in GPTQ / llm-compressor).
    """

    name = "mse"

    def __init__(
        self,
        spec: QuantSpec | None = None,
        alpha: float = 0.2,
        beta: float = 1.0,
        steps: int = 81,
        norm: float = 2.0,
        max_samples: int | None = 1 << 24,
        seed: int = 0,
    ) -> None:
        if not 0.0 < alpha <= beta:
            raise ValueError(f"need 0 < alpha <= beta for the shrink grid, got alpha={alpha}, beta={beta}")
        if steps < 1:
            raise ValueError(f"steps must be >= 1, got {steps}")
        if norm <= 0:
            raise ValueError(f"norm must be positive, got {norm}")
        self.alpha, self.beta, self.steps, self.norm = float(alpha), float(beta), int(steps), float(norm)
        super().__init__(spec, max_samples, seed)
        if self.spec.type != "int":
            raise ValueError("MSEObserver scores candidate ranges with int quantization; it needs an int spec")

    def _errors(self, data: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor) -> torch.Tensor:
        sp = self.spec
        s, z = spec_qparams(lo, hi, sp)
        qmin, qmax = int_range(sp.bits, sp.signed)
        out = torch.empty(data.shape[0], device=data.device)
        step = max(1, _ERR_CHUNK // max(1, data.shape[1]))
        for a in range(0, data.shape[0], step):
            xs, ss, zs = data[a : a + step], s[a : a + step, None], z[a : a + step, None]
            t = torch.div(xs, ss).round_().add_(zs).clamp_(qmin, qmax).sub_(zs).mul_(ss).sub_(xs).abs_()
            out[a : a + step] = (t.square_() if self.norm == 2.0 else t.pow_(self.norm)).sum(dim=1)
        return out

    def _range(self) -> tuple[torch.Tensor, torch.Tensor]:
        data = self.samples.data()
        lo0, hi0 = self.stats.get()
        best_p = torch.ones_like(lo0)
        best_err = torch.full_like(lo0, math.inf)
        for p in torch.linspace(self.beta, self.alpha, self.steps).tolist():
            err = self._errors(data, lo0 * p, hi0 * p)
            better = err < best_err
            best_err = torch.where(better, err, best_err)
            best_p = torch.where(better, torch.full_like(best_p, p), best_p)
        self.best_shrink = best_p
        return lo0 * best_p, hi0 * best_p


# ---------------------------------------------------------------------------------- histogram
_SERIAL_GRAIN = 32768  # at::internal::GRAIN_SIZE
_SMOOTH_EPS = 1e-4  # count given to empty bins (real bins hold >= 1 sample)


def _kl_rows(p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """Row-wise ``sum p log(p / q)`` (0 where p is 0)."""
    safe = p > 0
    ratio = torch.where(safe, p, 1.0) / torch.where(safe, q, 1.0)
    return (p * torch.log(ratio)).sum(-1)


def _smooth_rows(counts: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """Give the empty bins among ``valid`` a tiny count, zero the rest, normalise each row."""
    c = torch.where(counts > 0, counts, _SMOOTH_EPS) * valid
    return c / c.sum(-1, keepdim=True)


def _divergence_rows(p: torch.Tensor, q: torch.Tensor, valid: torch.Tensor, metric: str) -> torch.Tensor:
    p, q = _smooth_rows(p, valid), _smooth_rows(q, valid)
    if metric == "kl":
        return _kl_rows(p, q)
    if metric == "symmetric_kl":  # KL(P||Q) + KL(Q||P) = sum (p - q) log(p / q); smoothed p, q > 0
        ratio = torch.where(valid, p, 1.0) / torch.where(valid, q, 1.0)
        return ((p - q) * torch.log(ratio)).sum(-1)
    if metric == "js":
        m = (p + q) / 2
        return 0.5 * _kl_rows(p, m) + 0.5 * _kl_rows(q, m)
    raise ValueError(f"unknown divergence metric {metric!r}; expected kl, symmetric_kl or js")


def divergence(p_counts: torch.Tensor, q_counts: torch.Tensor, metric: str) -> float:
    """Divergence of two count histograms after smoothing empty bins: kl, symmetric_kl or js."""
    p, q = p_counts.double(), q_counts.double()
    return float(_divergence_rows(p, q, torch.ones_like(p, dtype=torch.bool), metric))


def quantized_reference(hist: torch.Tensor, levels: int) -> torch.Tensor:
    """TensorRT's Q: merge ``hist`` into ``levels`` chunks, spread each back over its non-empty bins."""
    i = hist.shape[0]
    chunk = torch.arange(i) * levels // i
    nonzero = (hist > 0).to(hist.dtype)
    sums = torch.zeros(levels, dtype=hist.dtype).index_add_(0, chunk, hist)
    counts = torch.zeros(levels, dtype=hist.dtype).index_add_(0, chunk, nonzero)
    return nonzero * sums[chunk] / counts[chunk].clamp(min=1)


def _candidate_divergences(hist: torch.Tensor, tail: torch.Tensor, sizes: torch.Tensor, levels: int, metric: str):
    """Divergences for a block of candidate sizes at once (rows padded to the largest size)."""
    n = int(sizes.max())
    cols = torch.arange(n)
    valid = cols < sizes[:, None]
    h = hist[:n].expand(len(sizes), n) * valid
    p = h.clone()
    p.scatter_add_(1, (sizes - 1)[:, None], tail[sizes][:, None])  # clipped tail into the last bin
    chunk = torch.where(valid, cols * levels // sizes[:, None], levels)  # padding -> dump slot
    nonzero = (h > 0).to(h.dtype)
    sums = h.new_zeros(len(sizes), levels + 1).scatter_add_(1, chunk, h)
    counts = h.new_zeros(len(sizes), levels + 1).scatter_add_(1, chunk, nonzero)
    q = nonzero * sums.gather(1, chunk) / counts.gather(1, chunk).clamp(min=1)
    d = _divergence_rows(p, q, valid, metric)
    return torch.where(q.sum(1) > 0, d, math.inf)


def entropy_threshold(
    hist: torch.Tensor, levels: int, start_bin: int, metric: str, block: int | None = None
) -> tuple[int, torch.Tensor]:
    """Index ``i`` (threshold = upper edge of bin ``i - 1``) minimising the divergence.

    For each ``i`` from ``start_bin`` to the last non-empty bin: ``P = hist[:i]`` with the clipped
    tail added to its last bin, ``Q = quantized_reference(hist[:i], levels)``; empty bins are
    smoothed.  Ties go to the larger ``i``.  Returns ``(i, divergences)``.
    """
    hist = hist.double()
    nonempty = torch.nonzero(hist).reshape(-1)
    stop = max(start_bin, int(nonempty[-1]) + 1) if nonempty.numel() else start_bin
    stop = min(stop, hist.shape[0])
    tail = torch.cat([hist.flip(0).cumsum(0).flip(0), hist.new_zeros(1)])  # tail[i] = hist[i:].sum()
    sizes = torch.arange(start_bin, stop + 1)
    if block is None:  # keep each op under torch's parallel grain: small ops run faster serially
        block = max(1, _SERIAL_GRAIN // max(1, stop))
    d = torch.cat([_candidate_divergences(hist, tail, b, levels, metric) for b in sizes.split(block)])
    best = len(d) - 1 - int(torch.argmin(d.flip(0)))
    return start_bin + best, d


class HistogramObserver(Observer):
    """Entropy calibration (TensorRT): the threshold on ``|x|`` whose int grid best keeps the distribution.

    A ``bins``-bin histogram of ``|x|`` over ``[0, edge]``; ``edge`` starts at the first non-zero
    batch's ``max|x|`` and doubles (``k`` doublings merge groups of ``2^k`` bins, no re-splitting)
    until it covers a larger batch; values on an old top edge stay in the bin below it.
    Candidate thresholds run from bin ``start_bin`` up; the distribution is quantized to
    ``2^(bits-1)`` levels.  Per tensor only.  ``range()`` is ``(max(min, -t), min(max, t))``.
    """

    METRICS: ClassVar[tuple[str, ...]] = ("kl", "symmetric_kl", "js")

    def __init__(
        self, spec: QuantSpec | None = None, metric: str = "kl", bins: int = 2048, start_bin: int = 128
    ) -> None:
        if metric not in self.METRICS:
            raise ValueError(f"unknown metric {metric!r}; expected one of {', '.join(self.METRICS)}")
        if bins < 2 or bins & (bins - 1):
            raise ValueError(f"bins must be a power of two >= 2 (so the range can double exactly), got {bins}")
        if not 1 <= start_bin <= bins:
            raise ValueError(f"start_bin must be in 1..bins ({bins}), got {start_bin}")
        spec = DEFAULT_SPEC if spec is None else spec
        if spec.granularity != "tensor":
            raise ValueError(
                f"{metric} calibration builds one histogram per tensor; use granularity 'tensor', "
                f"not {spec.granularity!r} (or observer 'mse' / 'percentile' for per-group ranges)"
            )
        self.metric, self.bins, self.start_bin = metric, bins, start_bin
        super().__init__(spec)

    @property
    def name(self) -> str:  # type: ignore[override]
        return self.metric

    def _reset(self) -> None:
        self.hist = torch.zeros(self.bins, dtype=torch.float64)
        self.edge = 0.0
        self.stats = _RunningMinMax()
        self.threshold: float | None = None

    def _grow(self, amax: float) -> None:
        if self.edge == 0.0:
            self.edge = amax  # everything seen so far is 0 and sits in bin 0
            return
        factor = 1 << max(0, math.ceil(math.log2(amax / self.edge)))
        while self.edge * factor < amax:  # guard against log2 rounding
            factor *= 2
        if factor >= self.bins:
            merged = self.hist.new_zeros(self.bins)
            merged[0] = self.hist.sum()
        else:
            coarse = self.hist.reshape(-1, factor).sum(1)
            merged = torch.cat([coarse, self.hist.new_zeros(self.bins - coarse.numel())])
        self.hist, self.edge = merged, self.edge * factor

    def _observe(self, xg: torch.Tensor) -> None:
        self.stats.update(xg)
        lo, hi = self.stats.get()
        amax = max(-float(lo.min()), float(hi.max()))
        if amax > self.edge:
            self._grow(amax)
        if self.edge == 0.0:
            self.hist[0] += xg.numel()
        else:
            self.hist += torch.histc(xg.abs().float(), self.bins, 0.0, self.edge).double().cpu()
        self.threshold = None

    def compute_threshold(self) -> float:
        """The calibrated clipping threshold on ``|x|``."""
        if self.layout is None:
            raise ValueError(f"{type(self).__name__} has seen no data; call update(x) first")
        if self.threshold is None:
            if self.edge == 0.0:
                self.threshold = 0.0
            else:
                levels = 1 << (self.spec.bits - 1)
                i, self.divergences = entropy_threshold(self.hist, levels, min(self.start_bin, self.bins), self.metric)
                self.threshold = i * self.edge / self.bins
        return self.threshold

    def _range(self) -> tuple[torch.Tensor, torch.Tensor]:
        t = self.compute_threshold()
        lo, hi = self.stats.get()
        return lo.clamp(min=-t), hi.clamp(max=t)


# ---------------------------------------------------------------------------------- factory
OBSERVER_CLASSES: dict[str, type[Observer]] = {
    "minmax": MinMaxObserver,
    "moving_minmax": MovingAverageMinMaxObserver,
    "percentile": PercentileObserver,
    "mse": MSEObserver,
    "kl": HistogramObserver,
    "symmetric_kl": HistogramObserver,
    "js": HistogramObserver,
}
assert set(OBSERVER_CLASSES) == set(OBSERVERS)


def make_observer(spec_or_name: QuantSpec | str, spec: QuantSpec | None = None, **kw: Any) -> Observer:
    """Observer for a spec (its ``observer`` field) or a name; ``kw`` go to the class."""
    if isinstance(spec_or_name, QuantSpec):
        if spec is not None:
            raise ValueError("pass the spec once: make_observer(spec, **kw)")
        name, spec = spec_or_name.observer, spec_or_name
    else:
        name = spec_or_name
    if name not in OBSERVER_CLASSES:
        raise ValueError(f"unknown observer {name!r}; expected one of {', '.join(OBSERVER_CLASSES)}")
    cls = OBSERVER_CLASSES[name]
    if cls is HistogramObserver:
        kw.setdefault("metric", name)
    return cls(spec, **kw)
