"""What a step gathers from a layer's calibration inputs: one small accumulator per statistic.

A step declares the statistics it needs (``WeightMethod.statistics``); the pipeline attaches a
forward hook per layer that feeds each batch of inputs ``X`` (tokens x in_features, fp32) to the
layer's accumulators and finally lets each write its value into the layer's ``LayerStats``.  A new
statistic (Wanda's input norms, a teacher's outputs) is a new class here or in the step's own file,
never a pipeline edit.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from lowbit.ranks import all_reduce


@dataclass
class LayerStats:
    """Calibration statistics of one linear layer's inputs ``X`` (tokens x in_features).

    ``hessian`` is ``2/n * X^T X`` (GPTQ's H), ``act_absmean`` the mean |x| per input channel.
    """

    nsamples: int = 0
    hessian: torch.Tensor | None = None
    act_absmean: torch.Tensor | None = None
    act_absmax: torch.Tensor | None = None
    sample_inputs: torch.Tensor | None = None  # a few hundred input rows, for error measurement
    mask: torch.Tensor | None = None  # bool, same shape as the weight: True where an earlier step pruned it to 0
    extra: dict[str, torch.Tensor] = field(default_factory=dict)  # statistics of other steps, by their key


class SharedProducts:
    """``X^T X`` computed once for layers fed the same input tensor (q/k/v, gate/up) within a batch.

    Holds each input tensor itself, so its memory cannot be reused under the key, and keys by its
    version counter, so a buffer rewritten in place is not mistaken for its old content."""

    def __init__(self) -> None:
        self._memo: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}

    def xtx(self, x: torch.Tensor, x2: torch.Tensor) -> torch.Tensor:
        key = (x.data_ptr(), tuple(x.shape), x.stride(), x._version)
        hit = self._memo.get(key)
        if hit is None:
            hit = (x, x2.T @ x2)
            self._memo[key] = hit
        return hit[1]

    def clear(self) -> None:
        self._memo.clear()


class InputStatistic:
    """Accumulates one statistic of a layer's inputs over calibration batches."""

    def update(self, x: torch.Tensor, x2: torch.Tensor, shared: SharedProducts) -> None:
        """Add one batch: ``x`` the raw input, ``x2`` it as (tokens, in_features) fp32."""
        raise NotImplementedError

    def write(self, stats: LayerStats) -> None:
        """Store the final value in ``stats`` (``stats.nsamples`` is the token count)."""
        raise NotImplementedError

    def reduce(self, width: int) -> None:
        """Combine the accumulator over all ranks (``lowbit.ranks``), before ``write``; ``width`` is the layer's
        input width (a rank no calibration token reached has no accumulator yet)."""
        raise NotImplementedError(f"{type(self).__name__} cannot be combined across ranks")

    @classmethod
    def reducible(cls) -> bool:
        return cls.reduce is not InputStatistic.reduce


class Hessian(InputStatistic):
    """GPTQ's ``H = 2/n X^T X``, into ``stats.hessian``."""

    def __init__(self) -> None:
        self._acc: torch.Tensor | None = None

    def update(self, x: torch.Tensor, x2: torch.Tensor, shared: SharedProducts) -> None:
        xtx = shared.xtx(x, x2)
        self._acc = xtx.clone() if self._acc is None else self._acc.add_(xtx)

    def write(self, stats: LayerStats) -> None:
        if self._acc is not None:
            stats.hessian = self._acc.mul_(2.0 / max(stats.nsamples, 1))
            self._acc = None

    def reduce(self, width: int) -> None:
        if self._acc is None:
            self._acc = torch.zeros(width, width)
        all_reduce(self._acc)


class AbsMagnitude(InputStatistic):
    """Per input channel mean and max of ``|x|``, into ``stats.act_absmean`` / ``stats.act_absmax``."""

    def __init__(self) -> None:
        self._sum: torch.Tensor | None = None
        self._max: torch.Tensor | None = None

    def update(self, x: torch.Tensor, x2: torch.Tensor, shared: SharedProducts) -> None:
        a = x2.abs()
        s, m = a.sum(0), a.amax(0)
        self._sum = s if self._sum is None else self._sum + s
        self._max = m if self._max is None else torch.maximum(self._max, m)

    def write(self, stats: LayerStats) -> None:
        if self._sum is not None:
            stats.act_absmean = self._sum / max(stats.nsamples, 1)
            stats.act_absmax = self._max

    def reduce(self, width: int) -> None:
        self._sum = all_reduce(torch.zeros(width) if self._sum is None else self._sum)
        self._max = all_reduce(torch.zeros(width) if self._max is None else self._max, "max")  # |x| >= 0


class ChannelNorm(InputStatistic):
    """Per input channel L2 norm ``||X_j||_2`` over all calibration tokens (Wanda's input norm), into
    ``stats.extra["input_norm"]``."""

    key = "input_norm"

    def __init__(self) -> None:
        self._sq: torch.Tensor | None = None

    def update(self, x: torch.Tensor, x2: torch.Tensor, shared: SharedProducts) -> None:
        sq = x2.pow(2).sum(0)
        self._sq = sq if self._sq is None else self._sq.add_(sq)

    def write(self, stats: LayerStats) -> None:
        if self._sq is not None:
            stats.extra[self.key] = self._sq.sqrt()

    def reduce(self, width: int) -> None:
        self._sq = all_reduce(torch.zeros(width) if self._sq is None else self._sq)
