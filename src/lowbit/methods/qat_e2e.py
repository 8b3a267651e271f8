"""E2E-QP (EfficientQAT's second phase, Chen et al., 2024) as a recipe stage that follows a rounding step.

Once every block is rounded (by ``qat-block``, GPTQ, AWQ, RTN: any step giving integer codes), the step
sizes (scales) of this entry's layers train end to end with the next-token loss on the calibration
windows while their integer codes and zero points stay frozen (PEQA's form, ``lowbit.qat.peqa``); the
layers are then typed quantized layers with the trained scales, so every exporter takes them.  The
step does no per-layer work: it runs in ``finish_model``::

    methods:
      - {method: qat-block, spec: W3_G64, ignore: [lm_head]}
      - {method: qat-e2e, ignore: [lm_head], options: {steps: 60, lr: 2.0e-5}}
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch

from lowbit.fields import bounded
from lowbit.methods.base import WeightMethod, register_method
from lowbit.qat.optim import check_optimizer
from lowbit.qat.peqa import convert_peqa, prepare_peqa
from lowbit.qat.train import grad_flags_restored, train_next_token


@register_method
@dataclass
class QATE2E(WeightMethod):
    """Options: ``steps``, ``lr``, ``batch`` (calibration windows a step), ``optimizer``, ``seed``."""

    steps: int = bounded(60, ge=1, le=10_000_000)
    lr: float = bounded(2e-5, gt=0, le=1)
    batch: int = bounded(4, ge=1, le=4096)
    optimizer: str = "adamw"
    seed: int = bounded(0, ge=0, le=2**63 - 1)
    records: list[dict[str, Any]] = field(default_factory=list, init=False, repr=False)

    name: ClassVar[str] = "qat-e2e"
    after_rounding: ClassVar[bool] = True

    def __post_init__(self) -> None:
        super().__post_init__()
        check_optimizer(self.optimizer, "qat-e2e optimizer")
        self._layers: list[str] = []

    def rounds(self) -> bool:
        return False

    def validate_layer(self, name: str, layer: torch.nn.Module) -> None:
        """No format of its own to check; the layer is one this step trains."""
        self._layers.append(name)

    def finish_model(self, model: torch.nn.Module, calib: torch.Tensor) -> None:
        """Train the scales of this entry's layers end to end; codes and zero points stay."""
        if not self._layers:
            return
        dtype = model.get_submodule(self._layers[0]).weight.dtype
        with grad_flags_restored(model):
            prepare_peqa(model, self._layers)
            try:
                result = train_next_token(model, calib, self.steps, self.lr, min(self.batch, calib.shape[0]),
                                          self.seed, optimizer=self.optimizer)
            finally:
                convert_peqa(model, dtype, method=self.name)
        self.records.append({"steps": self.steps, "tokens": result.tokens, "layers": len(self._layers),
                             "loss_first": result.losses[0], "loss_last": result.losses[-1],
                             "loss_first10": result.mean_loss(first=10), "loss_last10": result.mean_loss(last=10)})
