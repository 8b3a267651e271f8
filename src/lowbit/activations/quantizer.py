"""``ActQuantizer``: fake-quantize a linear layer's input, dynamically per token or with static ranges.

Dynamic specs compute their range from each token (``granularity='token'``), each group of a
token's features (``'group'``) or the whole tensor at run time.  Static specs (``dynamic=False``,
per-tensor) take one range from calibration: feed inputs to ``observe`` with the spec's observer
(min-max, percentile, MSE, KL ...), then ``freeze``.  Int and float (FP8/FP4/MX) specs both work;
the quantizer is an identity until it is calibrated or when ``enabled`` is False.
"""

from __future__ import annotations

import torch

from lowbit.core.affine import fake_quant_affine, fake_quant_int, spec_qparams
from lowbit.core.floats import fake_quant_float
from lowbit.core.observers import Observer, make_observer
from lowbit.errors import LowbitError
from lowbit.spec import QuantSpec


def check_activation_spec(spec: QuantSpec, where: str = "activation spec") -> None:
    """Raise a LowbitError unless ``spec`` can quantize activations."""
    if spec.type == "codebook":
        raise LowbitError(f"{where}: codebook formats ({spec.fmt}) quantize weights only; use an int or float spec")
    if spec.dynamic:
        if spec.granularity not in ("token", "group", "tensor"):
            raise LowbitError(f"{where}: dynamic activations are quantized per token, per group or per tensor, "
                              f"not per {spec.granularity}")
    elif spec.granularity != "tensor":
        raise LowbitError(f"{where}: static activation ranges are per tensor (granularity 'tensor'); for per-token "
                          f"ranges set dynamic: true")
    if spec.type == "float" and spec.global_scale and not spec.dynamic:
        raise LowbitError(f"{where}: NVFP4 activations take their global scale per tensor at run time; set dynamic: true")


class ActQuantizer(torch.nn.Module):
    """Quantize-dequantize the tensors passing through it according to an activation ``spec``."""

    def __init__(self, spec: QuantSpec) -> None:
        super().__init__()
        check_activation_spec(spec)
        self.spec = spec
        self.enabled = True
        self.observer: Observer | None = None
        # static range (per tensor): filled by freeze() or load_range()
        self.register_buffer("xmin", None)
        self.register_buffer("xmax", None)
        # Outlier Suppression+: a per-channel shift taken off before quantizing and added back after
        # (deployed as the next layer's bias, ``W @ shift``)
        self.register_buffer("shift", None)

    @property
    def calibrated(self) -> bool:
        return self.spec.dynamic or self.xmax is not None

    def observe(self, x: torch.Tensor) -> None:
        """Feed one batch of calibration inputs (static specs)."""
        if self.spec.dynamic:
            return
        if self.observer is None:
            self.observer = make_observer(self.spec)
        self.observer.update(self.observed_rows(x))

    def observed_rows(self, x: torch.Tensor) -> torch.Tensor:
        """A calibration batch as the quantizer sees it: ``(tokens, features)`` fp32, OS+ shift taken off."""
        x2 = x.detach().reshape(-1, x.shape[-1]).float()
        return x2 if self.shift is None else x2 - self.shift.to(x2.device)

    def freeze(self) -> None:
        """Fix the static range from what ``observe`` saw; the observer's memory is released."""
        if self.spec.dynamic:
            return
        if self.observer is None:
            raise LowbitError("a static activation quantizer saw no calibration inputs: the layer was never reached "
                              "by the calibration windows; use a dynamic spec or more calibration data")
        lo, hi = self.observer.range()
        self.load_range(lo, hi)
        self.observer = None

    def load_range(self, xmin: torch.Tensor, xmax: torch.Tensor) -> None:
        self.xmin = torch.as_tensor(xmin, dtype=torch.float32).reshape(1).clone()
        self.xmax = torch.as_tensor(xmax, dtype=torch.float32).reshape(1).clone()

    def qparams(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Static int ``(scale, zero)`` (per tensor)."""
        if self.spec.type != "int" or self.xmax is None:
            raise LowbitError("qparams exist for calibrated static int activation quantizers only")
        return spec_qparams(self.xmin, self.xmax, self.spec)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.enabled or not self.calibrated or x.numel() == 0:
            return x
        shape = x.shape
        x2 = x.reshape(-1, shape[-1])
        shift = None if self.shift is None else self.shift.to(device=x.device, dtype=x.dtype)
        if shift is not None:
            x2 = x2 - shift
        out = self.quantize_rows(x2)
        if shift is not None:
            out = out + shift
        return out.reshape(shape)

    def quantize_rows(self, x2: torch.Tensor) -> torch.Tensor:
        """Fake-quantize a ``(tokens, features)`` view; subclasses change only this."""
        sp = self.spec
        if sp.type == "int":
            if sp.dynamic:
                return fake_quant_int(x2, sp)
            return fake_quant_int(x2, sp, self.xmin.to(x2.device), self.xmax.to(x2.device))
        if sp.dynamic:
            return fake_quant_float(x2, sp)
        return fake_quant_float(x2, sp, torch.maximum(self.xmin.abs(), self.xmax.abs()).to(x2.device))

    def extra_repr(self) -> str:
        kind = "dynamic" if self.spec.dynamic else "static"
        return f"{self.spec.type}{self.spec.bits} {self.spec.fmt or ''} {kind} per-{self.spec.granularity}"


class OutlierActQuantizer(ActQuantizer):
    """LLM.int8()'s mixed-precision decomposition on the input side.

    Feature columns where any value of the current input reaches ``threshold`` in magnitude stay in
    full precision; the other columns are quantized per token (int8 absmax over those columns only).
    With int8 row-wise weights this equals ``X_O W_O^T + Q(X_~O) Q(W_~O)^T`` where ``W_O`` are the
    dequantized int8 columns, as bitsandbytes computes it.
    """

    def __init__(self, spec: QuantSpec, threshold: float = 6.0) -> None:
        if not (spec.type == "int" and spec.dynamic and spec.granularity == "token"):
            raise LowbitError("the outlier decomposition quantizes the regular columns per token (dynamic int spec)")
        super().__init__(spec)
        self.threshold = float(threshold)
        self.outlier_columns = 0  # total over forwards, for reporting

    def quantize_rows(self, x2: torch.Tensor) -> torch.Tensor:
        outliers = (x2.abs() >= self.threshold).any(dim=0)
        self.outlier_columns += int(outliers.sum())
        return torch.where(outliers, x2, fake_quant_int(x2.masked_fill(outliers, 0.0), self.spec))

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, fp outlier columns >= {self.threshold}"


class SplitActQuantizer(ActQuantizer):
    """Atom's activation layout: a fixed set of outlier feature columns (chosen from calibration) is
    quantized with ``outlier_spec`` (int8 per token), the other columns, taken in their original order
    as if reordered to the front, with ``spec`` (e.g. int4 per token in groups of 64)."""

    def __init__(self, spec: QuantSpec, outlier_spec: QuantSpec, outliers: torch.Tensor, width: int) -> None:
        for sp in (spec, outlier_spec):
            if not sp.dynamic:
                raise LowbitError("the split quantizer computes both parts' ranges at run time (dynamic specs)")
        super().__init__(spec)
        check_activation_spec(outlier_spec)
        self.outlier_spec = outlier_spec
        mask = torch.zeros(width, dtype=torch.bool)
        mask[outliers.long()] = True
        self.outlier_mask = mask

    def quantize_rows(self, x2: torch.Tensor) -> torch.Tensor:
        mask = self.outlier_mask.to(x2.device)
        out = torch.empty_like(x2)
        out[:, ~mask] = fake_quant_int(x2[:, ~mask], self.spec)
        out[:, mask] = fake_quant_int(x2[:, mask], self.outlier_spec)
        return out

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, {int(self.outlier_mask.sum())} outlier columns at {self.outlier_spec.bits} bits"


class ClusterActQuantizer(ActQuantizer):
    """RPTQ's activation layout: the input channels are partitioned into clusters (``clusters[j]`` is
    channel ``j``'s cluster) and each cluster gets its own static range, calibrated like a per-tensor
    range but over its channels only.  After RPTQ's reorder the clusters are contiguous, so a kernel
    sees ``K`` per-tensor-quantized slices; the arithmetic does not depend on the order."""

    def __init__(self, spec: QuantSpec, clusters: torch.Tensor) -> None:
        if spec.dynamic or spec.type != "int":
            raise LowbitError("cluster-wise activation ranges are static int ranges (RPTQ): use a static int spec")
        super().__init__(spec)
        self.clusters = clusters.detach().long().cpu().clone()
        self.num_clusters = int(self.clusters.max()) + 1
        self._cmin: torch.Tensor | None = None  # per-channel running range during calibration
        self._cmax: torch.Tensor | None = None

    def observe(self, x: torch.Tensor) -> None:
        x2 = self.observed_rows(x)
        if x2.shape[1] != self.clusters.numel():
            raise LowbitError(f"input has {x2.shape[1]} channels but the clusters cover {self.clusters.numel()}")
        lo, hi = x2.amin(0).cpu(), x2.amax(0).cpu()
        self._cmin = lo if self._cmin is None else torch.minimum(self._cmin, lo)
        self._cmax = hi if self._cmax is None else torch.maximum(self._cmax, hi)

    def freeze(self) -> None:
        if self._cmin is None:
            raise LowbitError("a cluster-wise activation quantizer saw no calibration inputs; use more calibration data")
        k = self.num_clusters
        lo = torch.full((k,), float("inf")).scatter_reduce(0, self.clusters, self._cmin, "amin")
        hi = torch.full((k,), float("-inf")).scatter_reduce(0, self.clusters, self._cmax, "amax")
        self.load_range(lo, hi)
        self._cmin = self._cmax = None

    def load_range(self, xmin: torch.Tensor, xmax: torch.Tensor) -> None:
        self.xmin = torch.as_tensor(xmin, dtype=torch.float32).reshape(-1).clone()
        self.xmax = torch.as_tensor(xmax, dtype=torch.float32).reshape(-1).clone()
        if self.xmin.numel() != self.num_clusters or self.xmax.numel() != self.num_clusters:
            raise LowbitError(f"cluster ranges need {self.num_clusters} values, got {self.xmin.numel()}")
        scale, zero = spec_qparams(self.xmin, self.xmax, self.spec)
        self._channel_qparams = (scale[self.clusters].view(1, -1), zero[self.clusters].view(1, -1))

    def quantize_rows(self, x2: torch.Tensor) -> torch.Tensor:
        sc, zc = (t.to(x2.device) for t in self._channel_qparams)
        return fake_quant_affine(x2, sc, zc, self.spec.qmin, self.spec.qmax)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, {self.num_clusters} channel clusters"


class PairActQuantizer(ActQuantizer):
    """OliVe's outlier-victim pairs on the input side: one static scale per tensor, chosen on
    calibration rows by the pair encoding's own squared error (``lowbit.core.olive``)."""

    MAX_ROWS = 4096  # calibration rows kept for the scale search

    def __init__(self, spec: QuantSpec) -> None:
        if spec.dynamic or spec.type != "int" or spec.bits not in (4, 8) or not spec.symmetric:
            raise LowbitError("outlier-victim pairs take a static symmetric int4 or int8 spec per tensor")
        super().__init__(spec)
        self._rows: list[torch.Tensor] = []

    def observe(self, x: torch.Tensor) -> None:
        x2 = self.observed_rows(x)
        kept = sum(r.shape[0] for r in self._rows)
        if kept < self.MAX_ROWS:
            step = max(1, x2.shape[0] // 256)
            self._rows.append(x2[::step][: self.MAX_ROWS - kept].cpu())

    def freeze(self) -> None:
        from lowbit.core.olive import normal_max, search_ovp_scale

        if not self._rows:
            raise LowbitError("an outlier-victim pair quantizer saw no calibration inputs; use more calibration data")
        s = search_ovp_scale(torch.cat(self._rows), self.spec.bits, per_row=False)
        top = s * normal_max(self.spec.bits)
        self.load_range(-top, top)
        self._rows = []

    def quantize_rows(self, x2: torch.Tensor) -> torch.Tensor:
        from lowbit.core.olive import normal_max, ovp_fake_quant

        scale = self.xmax.to(x2.device) / normal_max(self.spec.bits)
        return ovp_fake_quant(x2, scale, self.spec.bits)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, outlier-victim pairs"
