"""Tokenize text and cut it into evaluation / calibration windows."""

from __future__ import annotations

import random
from typing import Any

import torch

from lowbit.errors import LowbitError


def tokenize_text(tokenizer: Any, text: str) -> torch.Tensor:
    """Token ids of ``text`` as a 1-D LongTensor (no special tokens added beyond the tokenizer's own)."""
    ids = tokenizer(text, return_tensors="pt", verbose=False).input_ids
    return ids.reshape(-1).to(torch.long)


def check_token_windows(ids: Any, what: str, min_tokens: int = 1) -> None:
    """LowbitError unless ``ids`` is a 2-D integer tensor of token ids ``(windows, seqlen)`` holding at
    least one window of at least ``min_tokens`` tokens; ``what`` names the step that needs them."""
    if not isinstance(ids, torch.Tensor) or ids.dim() != 2 or ids.dtype not in (torch.long, torch.int):
        got = f"shape {tuple(ids.shape)}, {ids.dtype}" if isinstance(ids, torch.Tensor) else type(ids).__name__
        raise LowbitError(f"{what} needs a 2-D tensor of token ids (windows, seqlen), got {got}; make one with "
                          "lowbit.data.get_calibration(...)")
    if ids.shape[0] < 1 or ids.shape[1] < min_tokens:
        raise LowbitError(f"{what} needs at least one window of at least {min_tokens} token(s), got "
                          f"{ids.shape[0]} x {ids.shape[1]}")


def check_batch_size(batch_size: Any, what: str = "batch_size") -> None:
    """LowbitError unless ``batch_size`` (windows per forward pass) is a positive integer; ``what`` names
    it as the user gave it (``--batch-size``)."""
    if not isinstance(batch_size, int) or isinstance(batch_size, bool) or batch_size < 1:
        raise LowbitError(f"{what} must be a positive integer (calibration windows per forward pass, e.g. 8), "
                          f"got {batch_size!r}")


def eval_windows(ids: torch.Tensor, seqlen: int, max_windows: int | None = None) -> torch.Tensor:
    """Non-overlapping windows ``(n, seqlen)`` from the start of ``ids`` (the tail that does not fill one is dropped)."""
    if seqlen < 2:
        raise LowbitError(f"seqlen must be at least 2, got {seqlen}")
    n = ids.numel() // seqlen
    if max_windows is not None:
        if max_windows < 1:
            raise LowbitError(f"max_windows (--max-windows) must be at least 1, got {max_windows}")
        n = min(n, max_windows)
    if n == 0:
        raise LowbitError(f"the text has {ids.numel()} tokens, fewer than one window of {seqlen}; use a smaller --seqlen")
    return ids[: n * seqlen].reshape(n, seqlen)


def random_windows(ids: torch.Tensor, nsamples: int, seqlen: int, seed: int = 0) -> torch.Tensor:
    """``nsamples`` windows of ``seqlen`` tokens at seeded random offsets (GPTQ-style ``random.randint``)."""
    if nsamples < 1 or seqlen < 1:
        raise LowbitError(f"need nsamples >= 1 and seqlen >= 1, got {nsamples} and {seqlen}")
    if ids.numel() <= seqlen:
        raise LowbitError(f"the text has {ids.numel()} tokens, too few for windows of {seqlen}; use a smaller --seqlen")
    rng = random.Random(seed)
    starts = [rng.randint(0, ids.numel() - seqlen - 1) for _ in range(nsamples)]
    return torch.stack([ids[s : s + seqlen] for s in starts])
