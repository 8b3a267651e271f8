"""Importance matrices for GGUF K-quant rounding: what llama.cpp's ``llama-imatrix`` measures.

For every linear layer, the mean over calibration tokens of each input column's square, ``E[x_j^2]``: the
weight of column ``j`` in the output error a rounding of that layer causes (``E||X (W - Wq)^T||^2`` is
``sum_j E[x_j^2] ||W_j - Wq_j||^2`` when the columns are uncorrelated).  ``lowbit.export.gguf_kquants`` weights
its scale fits by it as llama.cpp's quantizer does with ``--imatrix``.
"""

from __future__ import annotations

from typing import Any

import torch


@torch.no_grad()
def collect_imatrix(model: torch.nn.Module, windows: torch.Tensor, batch_size: int = 4) -> dict[str, torch.Tensor]:
    """Layer name -> mean square of each input column over every token of ``windows`` (n, seqlen), for each
    module with ``in_features`` (linears, packed or not) that the forward passes reach."""
    sums: dict[str, torch.Tensor] = {}
    counts: dict[str, int] = {}

    def hook(name: str) -> Any:
        def fn(module: torch.nn.Module, args: tuple) -> None:
            x = args[0].detach().reshape(-1, args[0].shape[-1]).float()
            sums[name] = x.square().sum(0) + sums.get(name, 0)
            counts[name] = counts.get(name, 0) + x.shape[0]
        return fn

    handles = [m.register_forward_pre_hook(hook(n)) for n, m in model.named_modules()
               if isinstance(getattr(m, "in_features", None), int) and n]
    try:
        device = next(model.parameters()).device
        for start in range(0, windows.shape[0], batch_size):
            model(windows[start:start + batch_size].to(device))
    finally:
        for h in handles:
            h.remove()
    return {n: sums[n] / counts[n] for n in sums}
