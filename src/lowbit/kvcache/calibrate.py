"""Offline calibration of KVQuant's non-uniform level tables (one for keys, one for values, per layer).

The model runs on calibration windows with a cache that records every layer's keys and values as
they reach the cache; the loss gradient with respect to them gives each value's Fisher information
(``grad^2``, KVQuant's sensitivity).  Keys are taken before RoPE when the setting quantizes them
there (the gradient is rotated back the same way: RoPE is orthogonal).  Values are grouped and
mapped to code units exactly as the cache will (``code_units``), the tokens the cache keeps in full
precision and the dense-and-sparse outliers are left out, and ``fit_levels`` fits each table.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import torch
from transformers.cache_utils import Cache, DynamicLayer

from lowbit.data.windows import check_token_windows
from lowbit.errors import LowbitError
from lowbit.kvcache.cache import check_kv_model, head_dim_of, kv_rotation, rope_fn, rope_undo
from lowbit.kvcache.config import KVCacheConfig, as_kv_config
from lowbit.kvcache.nuq import fit_levels
from lowbit.kvcache.quant import code_units, grouped_kv

MAX_VALUES = 1 << 16  # code-unit values sampled per table for the k-means fit
CALIB_WINDOWS, CALIB_SEQLEN = 16, 512  # KVQuant calibrates its level tables on 16 windows


class _RecordingLayer(DynamicLayer):
    """A full-precision cache layer that also keeps the key / value tensors it was given."""

    def __init__(self) -> None:
        super().__init__()
        self.seen: list[tuple[torch.Tensor, torch.Tensor]] = []

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any, **kwargs: Any
               ) -> tuple[torch.Tensor, torch.Tensor]:
        self.seen.append((key_states, value_states))
        return super().update(key_states, value_states, *args, **kwargs)


def _window_states(model: Any, ids: torch.Tensor, fisher: bool) -> list[tuple[torch.Tensor, ...]]:
    """Per layer ``(keys, values, key grads, value grads)`` of one window (grads None without Fisher)."""
    layers = [_RecordingLayer() for _ in range(model.config.num_hidden_layers)]
    cache = Cache(layers=layers)
    if not fisher:
        with torch.no_grad():
            model(input_ids=ids, past_key_values=cache, use_cache=True)
        return [(*layer.seen[0], None, None) for layer in layers]
    embed = model.get_input_embeddings()
    handle = embed.register_forward_hook(lambda m, a, out: out.detach().requires_grad_())
    try:
        with torch.enable_grad():
            out = model(input_ids=ids, labels=ids, past_key_values=cache, use_cache=True)
            tensors = [t for layer in layers for t in layer.seen[0]]
            grads = torch.autograd.grad(out.loss, tensors, allow_unused=True)
    finally:
        handle.remove()
    rows = []
    for i, layer in enumerate(layers):
        k, v = layer.seen[0]
        gk, gv = grads[2 * i], grads[2 * i + 1]
        rows.append((k.detach(), v.detach(), torch.zeros_like(k) if gk is None else gk,
                     torch.zeros_like(v) if gv is None else gv))
    return rows


def _table_values(x: torch.Tensor, g: torch.Tensor | None, cfg: KVCacheConfig, which: str
                  ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Code-unit values and their Fisher weights of one cache tensor, as the cache would quantize it."""
    axis = cfg.key_axis if which == "key" else cfg.value_axis
    group = cfg.group(which, x.shape[-1])
    x = x[:, :, cfg.fp_head:]
    keep = x.shape[2] // cfg.flush_multiple * cfg.flush_multiple
    if keep == 0:
        raise LowbitError(f"calibration windows are too short for the KV-cache setting: need more than "
                          f"{cfg.fp_head + cfg.flush_multiple} tokens each")
    x = x[:, :, :keep]
    u, _, _, mask = code_units(x, cfg.bits, axis, group, cfg.outliers)
    w = None
    if g is not None:
        w = grouped_kv(g[:, :, cfg.fp_head:][:, :, :keep].float().pow(2), axis, group)
    if mask is not None:
        return u[~mask], None if w is None else w[~mask]
    return u.reshape(-1), None if w is None else w.reshape(-1)


def _sample(u: torch.Tensor, w: torch.Tensor | None, n: int, gen: torch.Generator
            ) -> tuple[torch.Tensor, torch.Tensor | None]:
    if u.numel() <= n:
        return u, w
    idx = torch.randperm(u.numel(), generator=gen)[:n]
    return u[idx], None if w is None else w[idx]


def collect_code_values(model: Any, cfg: KVCacheConfig, windows: torch.Tensor, fisher: bool = True
                        ) -> list[dict[str, tuple[torch.Tensor, torch.Tensor | None]]]:
    """Per layer, ``{"key": (u, w), "value": (u, w)}``: the code-unit values the cache quantizes on
    ``windows`` (token ids ``(n, seqlen)``) and their Fisher weights (None without ``fisher``)."""
    check_kv_model(model)
    check_token_windows(windows, "KV-cache calibration")
    device = next(model.parameters()).device
    rope = rope_fn(model) if cfg.pre_rope else None
    rotation = kv_rotation(head_dim_of(model)) if cfg.rotate else None  # as the cache rotates
    parts: list[dict[str, list]] = [{"key": [], "value": [], "key_w": [], "value_w": []}
                                    for _ in range(model.config.num_hidden_layers)]
    for row in windows:
        ids = row.unsqueeze(0).to(device)
        for i, (k, v, gk, gv) in enumerate(_window_states(model, ids, fisher)):
            if rope is not None:  # the cache quantizes keys before RoPE: un-rotate keys and their gradients
                cos, sin = rope(0, k.shape[2], k)
                k = rope_undo(k.float(), cos, sin)
                gk = None if gk is None else rope_undo(gk.float(), cos, sin)
            if rotation is not None:  # orthogonal: gradients rotate with the values
                k, v = k.float() @ rotation, v.float() @ rotation
                gk, gv = (None if g is None else g.float() @ rotation for g in (gk, gv))
            for which, x, g in (("key", k, gk), ("value", v, gv)):
                u, w = _table_values(x, g, cfg, which)
                parts[i][which].append(u.cpu())
                parts[i][which + "_w"].append(None if w is None else w.cpu())
    return [{which: (torch.cat(p[which]), torch.cat(p[which + "_w"]) if fisher else None)
             for which in ("key", "value")} for p in parts]


def calibrate_kv_levels(model: Any, config: "KVCacheConfig | str | dict[str, Any]", windows: torch.Tensor,
                        fisher: bool = True, max_values: int = MAX_VALUES, seed: int = 0) -> KVCacheConfig:
    """``config`` with ``nuq`` on and one fitted level table per layer for keys and for values.

    ``windows``: token ids ``(n, seqlen)`` (KVQuant: 16 windows, e.g. ``get_calibration("wikitext2",
    tok, 16, 512)``).  ``fisher``: weight each value by its squared loss gradient (KVQuant); False
    fits plain MSE."""
    cfg = dataclasses.replace(as_kv_config(config), nuq=True, key_levels=None, value_levels=None)
    gen = torch.Generator().manual_seed(seed)
    tables: dict[str, list[tuple[float, ...]]] = {"key": [], "value": []}
    for layer in collect_code_values(model, cfg, windows, fisher):
        for which in ("key", "value"):
            u, w = _sample(*layer[which], max_values, gen)
            if w is not None and not bool(w.sum() > 0):
                w = None  # no gradient reached this layer's tensor: fall back to plain MSE
            tables[which].append(tuple(fit_levels(u, w, cfg.bits).tolist()))
    return dataclasses.replace(cfg, key_levels=tuple(tables["key"]), value_levels=tuple(tables["value"]))


def ready_kv_setting(model: Any, tokenizer: Any, setting: Any = None, source: str = "wikitext2",
                     windows: torch.Tensor | None = None, log: Callable[[str], None] | None = None) -> Any:
    """The KV-cache setting to use (``setting``, else the model's own), with KVQuant's level tables
    fitted now when it needs them: on the first 16 of ``windows``, else on 16 windows of 512 tokens
    of ``source``.  A setting that turns the cache off comes back as given."""
    from lowbit.kvcache.config import kv_setting

    cfg = kv_setting(model, setting)
    if cfg is None or cfg.calibrated:
        return setting if cfg is None else cfg
    if windows is None:
        from lowbit.data import get_calibration

        windows = get_calibration(source, tokenizer, CALIB_WINDOWS, CALIB_SEQLEN, 0)
    windows = windows[:CALIB_WINDOWS]
    if log is not None:
        log(f"calibrating {cfg.name} level tables on {windows.shape[0]} x {windows.shape[1]} tokens of {source}")
    return calibrate_kv_levels(model, cfg, windows)
