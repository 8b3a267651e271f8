"""LLM-QAT (Liu et al., 2023): data-free quantization-aware training by logit distillation.

The model is trained end to end with weights, activations and the KV cache all fake-quantized, to
match the full-precision model's next-token distributions (``lowbit.qat.distill``).  Data-free: the
training windows are text the full-precision model generated itself (``--calib selfgen``: a random
first token, a few greedy tokens, then sampling, the paper's scheme); any corpus works the same way
(``--calib wikitext2``), which is the comparison the paper makes.

As in the paper: symmetric min-max weight ranges recomputed from the latent weights every step
(``learn_range: false``; ``true`` trains LSQ scales instead), the straight-through gradient, AdamW
without weight decay and a cosine schedule; activations take the recipe entry's ``activations`` spec
(per token) and the KV cache the recipe's ``kv_cache`` (per token), both through straight-through
fake quantizers.  Differences: only the decoder linears' weights train (norms and embeddings stay),
and the training set is the pipeline's calibration windows, cycled for ``steps`` steps, where the paper
generates 100k sequences.  The pipeline rounds each layer to nearest first (its per-layer error report
is of that start); the training runs once every block is done (``finish_model``)::

    kv_cache: KV4
    methods:
      - {method: llm-qat, spec: {type: int, bits: 4, granularity: channel}, activations: A8_TOKEN,
         options: {steps: 100, lr: 1e-4}}
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch

from lowbit.activations.attach import input_quantizers
from lowbit.core.quant import dequantize, quantize, storage_bits
from lowbit.fields import bounded
from lowbit.kvcache.config import kv_setting
from lowbit.kvcache.fake import check_trainable_kv
from lowbit.methods.base import LayerResult, LayerStats, WeightMethod, register_method
from lowbit.qat.distill import LogitDistillation
from lowbit.qat.fake_linear import check_trainable_spec, convert_fake_quant, prepare_fake_quant
from lowbit.qat.optim import check_optimizer
from lowbit.qat.train import grad_flags_restored, train_next_token


@register_method
@dataclass
class LLMQAT(WeightMethod):
    """Options: ``steps``, ``lr``, ``batch`` (windows a step), ``learn_range`` (LSQ scales instead of min-max),
    ``temperature``, ``optimizer`` (adamw | adamw8bit | adamw4bit), ``seed``."""

    steps: int = bounded(100, ge=1, le=10_000_000)
    lr: float = bounded(1e-4, gt=0, le=1)
    batch: int = bounded(4, ge=1, le=4096)
    learn_range: bool = False
    temperature: float = bounded(1.0, gt=0, le=100)
    optimizer: str = "adamw"
    seed: int = bounded(0, ge=0, le=2**63 - 1)
    records: list[dict[str, Any]] = field(default_factory=list, init=False, repr=False)

    name: ClassVar[str] = "llm-qat"

    def __post_init__(self) -> None:
        super().__post_init__()
        check_trainable_spec(self.spec, self.learn_range)
        check_optimizer(self.optimizer, "llm-qat optimizer")
        self._fp: dict[str, torch.Tensor] = {}  # the full-precision weights: the teacher's and the start

    def quantize_layer(self, name: str, layer: torch.nn.Module, stats: LayerStats) -> LayerResult:
        """Round to nearest (the start); ``finish_model`` trains from the full-precision weight."""
        w = self.linear_weight(name, layer).data
        self._fp[name] = w.detach().clone()
        qt = quantize(w.float(), self.spec)
        return LayerResult(weight=dequantize(qt).to(w.dtype), bits_per_weight=storage_bits(qt, self.spec.scale_dtype),
                           form=qt)

    def finish_model(self, model: torch.nn.Module, calib: torch.Tensor) -> None:
        """Distill the full-precision model into the fake-quantized one, then store the trained codes."""
        if not self._fp:
            return
        kv = kv_setting(model)
        if kv is not None:
            check_trainable_kv(kv)
        with torch.no_grad():
            for name, w in self._fp.items():
                model.get_submodule(name).weight.copy_(w)
        teacher = copy.deepcopy(model)
        for q in input_quantizers(teacher).values():
            q.enabled = False
        dtype = next(iter(self._fp.values())).dtype
        with grad_flags_restored(model):
            for p in model.parameters():
                p.requires_grad_(False)
            prepare_fake_quant(model, list(self._fp), self.spec, learn_range=self.learn_range)
            self._fp.clear()
            try:
                result = train_next_token(model, calib, self.steps, self.lr, min(self.batch, calib.shape[0]),
                                          self.seed, optimizer=self.optimizer,
                                          loss_fn=LogitDistillation(teacher, kv, self.temperature))
            finally:
                convert_fake_quant(model, dtype, method=self.name)
        self.records.append({"steps": self.steps, "tokens": result.tokens, "kv_cache": None if kv is None else kv.name,
                             "kl_first": result.losses[0], "kl_last": result.losses[-1],
                             "kl_first10": result.mean_loss(first=10), "kl_last10": result.mean_loss(last=10)})
