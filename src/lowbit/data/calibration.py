"""Calibration batches: seeded random windows of a corpus, a local file, or self-generated text."""

from __future__ import annotations

from typing import Any

import torch

from lowbit.data.corpora import CORPORA, load_text
from lowbit.data.windows import random_windows, tokenize_text
from lowbit.errors import LowbitError

CALIB_SPLITS = {"wikitext2": "validation", "ptb": "validation", "c4": "validation"}


def calibration_windows(
    source: str, tokenizer: Any, nsamples: int = 128, seqlen: int = 512, seed: int = 0, split: str | None = None
) -> torch.Tensor:
    """``(nsamples, seqlen)`` token windows from a named corpus (its validation split by default) or a file."""
    text = load_text(source, split or CALIB_SPLITS.get(source, "test"))
    ids = tokenize_text(tokenizer, text)
    if ids.numel() < nsamples * seqlen:
        raise LowbitError(
            f"calibration text {source!r} has {ids.numel()} tokens, fewer than the {nsamples} x {seqlen} = "
            f"{nsamples * seqlen} requested; lower --nsamples / --seqlen or use a larger corpus"
        )
    return random_windows(ids, nsamples, seqlen, seed)


@torch.no_grad()
def selfgen_windows(
    model: Any,
    tokenizer: Any,
    nsamples: int = 128,
    seqlen: int = 512,
    seed: int = 0,
    greedy_prefix: int = 3,
    batch_size: int = 64,
) -> torch.Tensor:
    """Data-free calibration text sampled from the model itself (LLM-QAT's generation scheme).

    Each sequence starts from a uniformly random vocabulary token; the next ``greedy_prefix``
    tokens are the model's top-1 choices and the rest are sampled from its full next-token
    distribution, so the set is diverse but stays on the model's own distribution.
    """
    if nsamples < 1 or seqlen < 2:
        raise LowbitError(f"selfgen needs nsamples >= 1 and seqlen >= 2, got {nsamples} and {seqlen}")
    gen = torch.Generator().manual_seed(seed)
    device = next(model.parameters()).device
    vocab = model.get_output_embeddings().weight.shape[0]
    special = set(getattr(tokenizer, "all_special_ids", []) or [])
    out = []
    for start in range(0, nsamples, batch_size):
        b = min(batch_size, nsamples - start)
        first = torch.randint(0, vocab, (b * 2,), generator=gen)
        first = torch.tensor([t for t in first.tolist() if t not in special][:b] or [0] * b)
        ids = first.reshape(b, 1).to(device)
        past = None
        tokens = [ids]
        for step in range(seqlen - 1):
            res = model(input_ids=tokens[-1], past_key_values=past, use_cache=True)
            past = res.past_key_values
            logits = res.logits[:, -1, :].float().cpu()
            if step < greedy_prefix:
                nxt = logits.argmax(-1, keepdim=True)
            else:
                nxt = torch.multinomial(torch.softmax(logits, -1), 1, generator=gen)
            tokens.append(nxt.to(device))
        out.append(torch.cat(tokens, dim=1).cpu())
    return torch.cat(out)


def get_calibration(
    source: str,
    tokenizer: Any,
    nsamples: int = 128,
    seqlen: int = 512,
    seed: int = 0,
    model: Any = None,
) -> torch.Tensor:
    """Calibration windows from ``wikitext2``/``ptb``/``c4``, a ``.txt``/``.jsonl`` path, or ``selfgen``."""
    if source == "selfgen":
        if model is None:
            raise LowbitError("calibration source 'selfgen' samples from the model: pass model=")
        return selfgen_windows(model, tokenizer, nsamples, seqlen, seed)
    if source not in CORPORA and not source.endswith((".txt", ".raw", ".jsonl", ".json")):
        raise LowbitError(f"unknown calibration source {source!r}; use wikitext2, ptb, c4, selfgen or a file path")
    return calibration_windows(source, tokenizer, nsamples, seqlen, seed)
