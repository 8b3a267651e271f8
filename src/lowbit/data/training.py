"""Training windows: seeded random windows of a corpus or a file, as many as the steps use and the text holds."""

from __future__ import annotations

from typing import Any

import torch

from lowbit.data.calibration import CALIB_SPLITS
from lowbit.data.corpora import CORPORA, load_text
from lowbit.data.windows import random_windows, tokenize_text
from lowbit.errors import LowbitError


def training_windows(source: str, tokenizer: Any, steps: int, batch_size: int, seqlen: int, seed: int = 0,
                     split: str | None = None) -> torch.Tensor:
    """``(n, seqlen)`` token windows of ``source`` (a corpus' validation split by default, or a .txt/.jsonl
    file): ``n = min(steps * batch_size, tokens // seqlen)``, so a long run cycles over the text instead
    of drawing more windows than it holds.  LowbitError when the text holds less than one batch."""
    if source not in CORPORA and not source.endswith((".txt", ".raw", ".jsonl", ".json")):
        raise LowbitError(f"unknown training data {source!r}; use wikitext2, ptb, c4 or a .txt/.jsonl file")
    ids = tokenize_text(tokenizer, load_text(source, split or CALIB_SPLITS.get(source, "test")))
    held = ids.numel() // seqlen if ids.numel() > seqlen else 0
    if held < batch_size:
        raise LowbitError(f"training text {source!r} has {ids.numel()} tokens, less than one batch of {batch_size} x "
                          f"{seqlen} = {batch_size * seqlen}; use more text or lower --batch-size / --seqlen")
    return random_windows(ids, min(steps * batch_size, held), seqlen, seed)
