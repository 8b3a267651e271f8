"""Forward hooks that feed each layer's calibration inputs to the statistics its step asked for.

The collector knows no statistic by name: each layer comes with the accumulators its step returned
from ``WeightMethod.statistics``; the collector adds the token count and a few hundred sample rows
(for the pipeline's own output-error report)."""

from __future__ import annotations

from contextlib import contextmanager
from collections.abc import Iterator

import torch

from lowbit.methods.statistics import InputStatistic, LayerStats, SharedProducts
from lowbit.ranks import total

SAMPLE_ROWS = 512  # input rows kept per layer to measure output error cheaply


class StatsCollector:
    """Accumulates ``LayerStats`` for a set of layers while their block runs."""

    def __init__(self, layers: dict[str, torch.nn.Module], wanted: dict[str, list[InputStatistic]] | None = None):
        self.layers = layers
        self.wanted = {name: list((wanted or {}).get(name, ())) for name in layers}
        self.stats = {name: LayerStats() for name in layers}
        self._samples: dict[str, list[torch.Tensor]] = {name: [] for name in layers}
        self._shared = SharedProducts()

    def _hook(self, name: str):
        def fn(module: torch.nn.Module, args: tuple, output: torch.Tensor) -> None:
            x = args[0].detach()
            x2 = x.reshape(-1, x.shape[-1]).float()
            self.stats[name].nsamples += x2.shape[0]
            for stat in self.wanted[name]:
                stat.update(x, x2, self._shared)
            kept = sum(s.shape[0] for s in self._samples[name])
            if kept < SAMPLE_ROWS:
                step = max(1, x2.shape[0] // 64)
                self._samples[name].append(x2[::step][: SAMPLE_ROWS - kept].clone())

        return fn

    def end_batch(self) -> None:
        """Forget the shared-input products (inputs of the next batch are new tensors)."""
        self._shared.clear()

    @contextmanager
    def attached(self) -> Iterator["StatsCollector"]:
        handles = [m.register_forward_hook(self._hook(n)) for n, m in self.layers.items()]
        try:
            yield self
        finally:
            for h in handles:
                h.remove()
            self._shared.clear()

    def finalize(self, across_ranks: bool = False) -> dict[str, LayerStats]:
        """Each layer's ``LayerStats``, every accumulator's value written in; ``across_ranks``: token counts and
        accumulators first combined over all ranks (the sample rows stay each rank's own)."""
        for name, st in self.stats.items():
            if across_ranks:
                st.nsamples = total(st.nsamples)
                for stat in self.wanted[name]:
                    stat.reduce(self.layers[name].weight.shape[1])
            for stat in self.wanted[name]:
                stat.write(st)
            if self._samples[name]:
                st.sample_inputs = torch.cat(self._samples[name])
        return self.stats


def output_error(sample_inputs: torch.Tensor | None, w: torch.Tensor, wq: torch.Tensor) -> float | None:
    """Relative output error ``||X (W - Wq)^T||^2 / ||X W^T||^2`` on the kept input rows."""
    if sample_inputs is None or sample_inputs.numel() == 0:
        return None
    x = sample_inputs.to(w.device, torch.float32)
    ref = x @ w.float().T
    diff = x @ (w.float() - wq.float()).T
    denom = ref.pow(2).sum().item()
    return diff.pow(2).sum().item() / denom if denom > 0 else 0.0
