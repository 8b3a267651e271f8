"""``FloatWeight``: a linear weight on a float element grid (FP8 E4M3, FP4 E2M1) with group scales.

``W[r, c] = values[r, c] * scale[r, g(c)] * global_scale``: ``values`` are the unscaled element
values of the format (exactly representable in it), ``scale`` the stored per-row (channel) or
per-group scales (float32 values, exact in their storage dtype: fp32 for FP8 channels, E4M3 for
NVFP4 blocks), ``global_scale`` NVFP4's per-tensor fp32 factor (1.0 otherwise).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from lowbit.core.floats import FloatQuantized
from lowbit.core.granularity import ungroup
from lowbit.errors import LowbitError
from lowbit.packed.intweight import expand_groups
from lowbit.quantized_layers import quantized_weight


@dataclass
class FloatWeight:
    fmt: str  # "e4m3" or "e2m1"
    values: torch.Tensor  # (out, in) float32 element values
    scale: torch.Tensor  # (out, n_groups) float32
    group_size: int | None  # None: one scale per output row
    scale_dtype: str  # storage dtype of ``scale``: float32 / float16 / bfloat16 / e4m3
    global_scale: float | None = None  # NVFP4 per-tensor factor

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.values.shape)  # type: ignore[return-value]

    @property
    def bits(self) -> int:
        return 8 if self.fmt == "e4m3" else 4

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        s = expand_groups(self.scale.float(), self.group_size, None, self.values.shape[1])
        w = self.values.float() * s
        if self.global_scale is not None:
            w = w * self.global_scale
        return w.to(dtype)


def float_weight_from(qt: FloatQuantized) -> FloatWeight:
    """The ``FloatWeight`` of a 2-D weight quantized with a float spec (channel or group granularity)."""
    lay, spec = qt.layout, qt.spec
    if len(lay.shape) != 2 or lay.kind not in ("channel", "group"):
        raise LowbitError(f"float weights with {lay.kind} granularity have no export form; use channel or group")
    if lay.kind == "group" and lay.padded_cols != lay.cols:
        raise LowbitError(f"input width {lay.cols} is not a multiple of group size {lay.group_size}")
    if spec.fmt not in ("e4m3", "e2m1"):
        raise LowbitError(f"float format {spec.fmt} has no checkpoint form; FP8 E4M3 and FP4 E2M1 (NVFP4) do")
    if spec.scale_dtype == "e8m0":
        raise LowbitError("MX (E8M0-scaled) weights are not exported yet; NVFP4 (E4M3 block scales) and FP8 are")
    values = ungroup(qt.values(), lay)
    scale = qt.scales.float().reshape(lay.rows, -1)
    g = None if qt.global_scale is None else float(qt.global_scale)
    return FloatWeight(spec.fmt, values, scale.contiguous(), lay.group_size if lay.kind == "group" else None,
                       spec.scale_dtype, g)


def float_weight_of(layer: torch.nn.Module) -> FloatWeight:
    """The ``FloatWeight`` of a layer lowbit quantized with a float spec."""
    qw = quantized_weight(layer)
    form = None if qw is None else qw.form
    if isinstance(form, FloatWeight):
        return form
    if not isinstance(form, FloatQuantized):
        raise LowbitError("this layer has no float-format codes (quantize it with a float spec: FP8_E4M3, NVFP4)")
    return float_weight_from(form)
