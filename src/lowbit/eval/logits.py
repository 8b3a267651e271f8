"""Next-token logits one slice of positions at a time, so a 2048-token window never holds a
full (seqlen x vocab) fp32 logits tensor (400 MB for a 49k vocabulary) plus its log-softmax.

Chunking applies where the head is a plain linear map of the base model's last hidden state
(the model types below, with no logit soft-capping or scaling in their config); any other model
yields its full logits in one piece, so results never depend on this optimisation.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch

from lowbit.arch import types_with

_PLAIN_HEAD_TYPES = frozenset(types_with("plain_head"))  # lowbit.arch
_HEAD_MODIFIERS = ("final_logit_softcapping", "logit_scale", "logits_scaling", "attn_logit_softcapping")


def has_plain_head(model: Any) -> bool:
    """True when ``logits == lm_head(base_model(ids).last_hidden_state)`` holds for ``model``."""
    cfg = getattr(model, "config", None)
    if cfg is None or getattr(cfg, "model_type", None) not in _PLAIN_HEAD_TYPES:
        return False
    if any(getattr(cfg, k, None) not in (None, 1.0) for k in _HEAD_MODIFIERS):
        return False
    get_head = getattr(model, "get_output_embeddings", None)
    head = get_head() if callable(get_head) else None
    base = getattr(model, "base_model", None)
    return isinstance(head, torch.nn.Linear) and base is not None and base is not model


def logit_chunks(model: Any, ids: torch.Tensor, chunk: int = 512, cache: Any | None = None
                 ) -> Iterator[tuple[int, torch.Tensor]]:
    """Yield ``(start, logits[:, start:start + chunk])`` covering every position of ``ids``.

    With ``cache`` (an empty transformers ``Cache``, e.g. a quantized KV cache) the window is
    prefilled into it, so attention reads the keys and values the cache gives back."""
    kw = {"use_cache": False} if cache is None else {"use_cache": True, "past_key_values": cache}
    if chunk <= 0 or not has_plain_head(model):
        yield 0, model(input_ids=ids, **kw).logits
        return
    hidden = model.base_model(input_ids=ids, **kw).last_hidden_state
    head = model.get_output_embeddings()
    for start in range(0, hidden.shape[1], chunk):
        yield start, head(hidden[:, start:start + chunk])
