"""Forward hooks that accumulate per-layer input statistics (Hessian, activation magnitudes, samples)."""

from __future__ import annotations

from contextlib import contextmanager
from collections.abc import Iterator

import torch

from lowbit.methods.base import LayerStats

SAMPLE_ROWS = 512  # input rows kept per layer to measure output error cheaply


class StatsCollector:
    """Accumulates ``LayerStats`` for a set of linear layers while their block runs.

    Layers fed the same input tensor (q/k/v, gate/up) share one ``X^T X`` product.
    """

    def __init__(self, layers: dict[str, torch.nn.Module], hessian: set[str], act_stats: set[str]):
        self.layers = layers
        self.want_hessian = hessian
        self.want_act = act_stats
        self.stats = {name: LayerStats() for name in layers}
        self._xtx: dict[str, torch.Tensor] = {}  # unnormalised X^T X per layer
        self._absum: dict[str, torch.Tensor] = {}
        self._samples: dict[str, list[torch.Tensor]] = {name: [] for name in layers}
        # shared-input memo: holds the input tensor itself so its memory cannot be reused
        # and keyed with its version counter so a buffer rewritten in place is not mistaken for its old content
        self._memo: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}

    def _hook(self, name: str):
        def fn(module: torch.nn.Module, args: tuple, output: torch.Tensor) -> None:
            x = args[0].detach()
            x2 = x.reshape(-1, x.shape[-1]).float()
            st = self.stats[name]
            st.nsamples += x2.shape[0]
            if name in self.want_hessian:
                key = (x.data_ptr(), tuple(x.shape), x.stride(), x._version)
                hit = self._memo.get(key)
                if hit is None:
                    hit = (x, x2.T @ x2)
                    self._memo[key] = hit
                xtx = hit[1]
                acc = self._xtx.get(name)
                self._xtx[name] = xtx.clone() if acc is None else acc.add_(xtx)
            if name in self.want_act:
                a = x2.abs()
                self._absum[name] = a.sum(0) if name not in self._absum else self._absum[name] + a.sum(0)
                amax = a.amax(0)
                st.act_absmax = amax if st.act_absmax is None else torch.maximum(st.act_absmax, amax)
            kept = sum(s.shape[0] for s in self._samples[name])
            if kept < SAMPLE_ROWS:
                step = max(1, x2.shape[0] // 64)
                self._samples[name].append(x2[::step][: SAMPLE_ROWS - kept].clone())

        return fn

    def end_batch(self) -> None:
        """Forget the shared-input memo (inputs of the next batch are new tensors)."""
        self._memo.clear()

    @contextmanager
    def attached(self) -> Iterator["StatsCollector"]:
        handles = [m.register_forward_hook(self._hook(n)) for n, m in self.layers.items()]
        try:
            yield self
        finally:
            for h in handles:
                h.remove()
            self._memo.clear()

    def finalize(self) -> dict[str, LayerStats]:
        """LayerStats with ``hessian = 2/n X^T X`` and ``act_absmean`` filled in."""
        for name, st in self.stats.items():
            n = max(st.nsamples, 1)
            if name in self._xtx:
                st.hessian = self._xtx.pop(name).mul_(2.0 / n)
            if name in self._absum:
                st.act_absmean = self._absum.pop(name) / n
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
