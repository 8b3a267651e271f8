"""Perplexity of a model larger than memory: the evaluation windows go through the decoder one block at a time
(each block read from the checkpoint, run on every window, freed), then the final norm and the head score
them a slice of the vocabulary at a time (a running log-sum-exp), so neither the whole model nor a full logits
tensor is ever held.  The windows, the positions scored and the convention are ``lowbit.eval.perplexity``'s;
the result equals its in-memory evaluation up to the order of float sums in the softmax.

Reads full-precision and fake-quant safetensors checkpoints of architectures with a plain head
(``lm_head(norm(h))``, no soft-capping or logit scaling)."""

from __future__ import annotations

import math
import time
from typing import Any

import torch
from tqdm.auto import tqdm

from lowbit.arch import architecture_of, decoder_blocks
from lowbit.errors import LowbitError
from lowbit.eval.logits import has_plain_head
from lowbit.eval.memory import peak_rss_mb
from lowbit.eval.perplexity import EvalResult, check_seqlen
from lowbit.models.capture import capture_block_inputs
from lowbit.pipeline.sequential import propagate
from lowbit.experts import unfuse_experts
from lowbit.stream.weights import materialize, materialize_rows, meta_model, open_weights, release

VOCAB_SLICE = 8192  # head rows scored at once


def _module_name(model: torch.nn.Module, module: torch.nn.Module) -> str:
    return next(n for n, m in model.named_modules() if m is module)


@torch.no_grad()
def sliced_nll(hidden: torch.Tensor, head: torch.Tensor, targets: torch.Tensor, bias: torch.Tensor | None = None,
               rows: int = VOCAB_SLICE) -> float:
    """``sum_t -log softmax(hidden[t] @ head.T + bias)[targets[t]]`` with the head (vocab x width) taken ``rows``
    rows at a time: a running log-sum-exp, never the full (positions x vocab) logits."""
    h = hidden.float()
    lse = torch.full((h.shape[0],), float("-inf"))
    picked = torch.zeros(h.shape[0])
    for start in range(0, head.shape[0], rows):
        logits = h @ head[start:start + rows].float().T
        if bias is not None:
            logits += bias[start:start + rows].float()
        lse = torch.logaddexp(lse, torch.logsumexp(logits, dim=-1))
        inside = (targets >= start) & (targets < start + logits.shape[1])
        picked[inside] = logits[inside, targets[inside] - start]
    return float((lse - picked).sum())


def evaluate_streamed(ref: str, tokenizer: Any, dataset: str = "wikitext2", split: str = "test", seqlen: int = 2048,
                      max_windows: int | None = None, data_dir: str | None = None, progress: bool = False,
                      dtype: torch.dtype = torch.float32, cache: str | None = None) -> EvalResult:
    """Perplexity of checkpoint ``ref`` on ``dataset``/``split`` evaluated block by block (module docstring)."""
    from lowbit.data.corpora import load_text
    from lowbit.data.windows import eval_windows, tokenize_text
    from lowbit.export.compressed_tensors import is_compressed_tensors
    from lowbit.models.loading import load_config, resolve_model
    from lowbit.pipeline.memory import map_large_allocations

    source = resolve_model(ref, cache)
    if source.path is not None and source.path.is_dir() and is_compressed_tensors(source.path):
        raise LowbitError(f"{ref} is a compressed-tensors checkpoint, which streamed evaluation does not unpack yet; "
                          "evaluate it in memory (lowbit eval without --streamed) or export it as fake-quant")
    config = load_config(source)
    model = meta_model(config, dtype)
    if not has_plain_head(model):
        raise LowbitError(f"streamed evaluation scores a plain head (lm_head of the final norm); "
                          f"{config.model_type} scales or caps its logits: evaluate it without --streamed")
    check_seqlen(model, seqlen)
    try:
        windows = eval_windows(tokenize_text(tokenizer, load_text(dataset, split, data_dir)), seqlen, max_windows)
    except LowbitError as e:
        raise LowbitError(f"evaluation data {dataset} ({split}): {e}") from None
    map_large_allocations()
    reader = open_weights(source, model, "streamed evaluation")
    unfuse_experts(model)  # MoE experts read as one linear each: whichever layout the checkpoint has
    reader.follow(model)
    embed, head = model.get_input_embeddings(), model.get_output_embeddings()
    embed_name, head_name = _module_name(model, embed), _module_name(model, head)
    blocks = decoder_blocks(model)
    t0 = time.perf_counter()
    materialize_rows(embed, f"{embed_name}.weight", reader, windows, dtype)
    inputs = capture_block_inputs(model, blocks[0], windows, 1)
    release(embed)
    prefix = architecture_of(model).blocks
    for i in tqdm(range(len(blocks)), desc="eval", unit="block", disable=not progress):
        materialize(blocks[i], f"{prefix}.{i}.", reader, dtype)
        propagate(blocks[i], inputs)
        release(blocks[i])
    norm = getattr(model.base_model, "norm", None)
    if norm is None:
        raise LowbitError(f"streamed evaluation knows the final norm of Llama-style models (base_model.norm); "
                          f"{config.model_type} has none: evaluate it without --streamed")
    norm_name = _module_name(model, norm)
    materialize(norm, f"{norm_name}.", reader, dtype)
    head_key = f"{head_name}.weight" if f"{head_name}.weight" in reader else f"{embed_name}.weight"  # tied
    head_weight = reader.tensor(head_key)
    head_bias = reader.tensor(f"{head_name}.bias") if f"{head_name}.bias" in reader else None
    nll, count = 0.0, 0
    with torch.no_grad():
        for h, ids in zip(inputs.hidden, windows):
            nll += sliced_nll(norm(h)[0, :-1], head_weight, ids[1:], head_bias)
            count += ids.numel() - 1
    del head_weight
    seconds = time.perf_counter() - t0
    return EvalResult(model=str(ref), dataset=dataset, split=split, seqlen=seqlen, windows=windows.shape[0],
                      tokens=windows.numel(), perplexity=math.exp(nll / count), nll=nll / count, kl=None,
                      top1_agreement=None, reference=None, seconds=seconds, tokens_per_s=windows.numel() / seconds,
                      peak_rss_mb=peak_rss_mb(), peak_device_mb=None, device="cpu",
                      dtype=str(dtype).replace("torch.", ""))
