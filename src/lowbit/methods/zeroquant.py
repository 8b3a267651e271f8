"""ZeroQuant (Yao et al., 2022): group-wise weights, token-wise activations, layer-by-layer distillation.

Weights are quantized per group (round to nearest), inputs per token at run time (the recipe's
activation spec, e.g. ``A8_TOKEN``).  LKD (layer-by-layer knowledge distillation) then trains each
quantized block against the full-precision block on the same inputs: the block's fp output is the
teacher, the block with fake-quantized weights (straight-through gradients) and quantized inputs
is the student, and the loss is their mean squared difference.  Only the block's linear weights
are trained; the result is re-quantized to the grid.  No labels and no original training data are
needed: the calibration windows drive it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch.func import functional_call

from lowbit.core.quant import fake_quant
from lowbit.fields import bounded
from lowbit.methods.base import register_method
from lowbit.methods.rtn import RTN
from lowbit.models.capture import block_output
from lowbit.quantized_layers import mark_quantized
from lowbit.spec import QuantSpec

W8_GROUP = QuantSpec(type="int", bits=8, granularity="group", group_size=64, scale_dtype="float16")


@register_method
@dataclass
class ZeroQuant(RTN):
    """Options: ``lkd`` (distil each block; off: group-wise RTN only), ``steps`` (optimizer steps per
    block, one calibration batch each), ``lr`` (Adam learning rate)."""

    spec: QuantSpec = field(default_factory=lambda: W8_GROUP)
    lkd: bool = True
    steps: int = bounded(32, ge=1)
    lr: float = bounded(1e-4, gt=0)
    records: list[dict[str, Any]] = field(default_factory=list, init=False, repr=False)

    name: ClassVar[str] = "zeroquant"

    def __post_init__(self) -> None:
        super().__post_init__()
        self._fp: dict[str, torch.Tensor] = {}
        self._teacher: list[torch.Tensor] = []

    @torch.no_grad()
    def prepare_block(self, ctx: Any) -> None:
        """Keep the fp weights and the fp block's outputs (the teacher) before the layers are quantized."""
        if not self.lkd:
            return
        self._fp = {n: m.weight.detach().clone() for n, m in ctx.layers.items()}
        self._teacher = [block_output(ctx.block(h, **kw)) for h, kw in zip(ctx.inputs.hidden, ctx.inputs.kwargs)]

    def _student(self, ctx: Any, masters: dict[str, torch.Tensor], j: int) -> torch.Tensor:
        params = {n[len(ctx.prefix):] + ".weight": fake_quant(w, self.spec) for n, w in masters.items()}
        return block_output(functional_call(ctx.block, params, (ctx.inputs.hidden[j],), ctx.inputs.kwargs[j]))

    def _loss(self, ctx: Any, masters: dict[str, torch.Tensor]) -> float:
        with torch.no_grad():
            return sum(torch.nn.functional.mse_loss(self._student(ctx, masters, j), t).item()
                       for j, t in enumerate(self._teacher)) / len(self._teacher)

    def finish_block(self, ctx: Any) -> None:
        """LKD: train the block's weights against the fp teacher, then re-quantize them."""
        if not self.lkd or not self._teacher:
            return
        masters = {n: w.clone().requires_grad_(True) for n, w in self._fp.items()}
        before = self._loss(ctx, masters)
        opt = torch.optim.Adam(list(masters.values()), lr=self.lr)
        with torch.enable_grad():
            for step in range(self.steps):
                j = step % len(self._teacher)
                loss = torch.nn.functional.mse_loss(self._student(ctx, masters, j), self._teacher[j])
                grads = torch.autograd.grad(loss, list(masters.values()))
                for w, g in zip(masters.values(), grads):
                    w.grad = g
                opt.step()
        after = self._loss(ctx, masters)
        with torch.no_grad():
            for n, layer in ctx.layers.items():
                layer.weight.copy_(masters[n].detach())
                res = self.quantize_layer(n, layer, None)  # type: ignore[arg-type]
                layer.weight.copy_(res.weight)
                mark_quantized(layer, res.stored(self))
        self.records.append({"block": ctx.index, "mse_before": before, "mse_after": after})
        self._fp, self._teacher = {}, []
