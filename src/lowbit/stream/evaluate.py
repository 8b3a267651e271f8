"""Perplexity of a model larger than memory: the evaluation windows go through the decoder one block at a time
(each block read from the checkpoint, run on every window, freed), then the final norm and the head score
them a slice of the vocabulary at a time (a running log-sum-exp), so neither the whole model nor a full logits
tensor is ever held.  The windows, the positions scored and the convention are ``lowbit.eval.perplexity``'s;
the result equals its in-memory evaluation up to the order of float sums in the softmax.

Reads full-precision, fake-quant (with their activation quantizers) and compressed-tensors safetensors
checkpoints (each quantized linear built from its stored codes while its block runs) and GGUF files, of
architectures with a plain head (``lm_head(norm(h))``, no soft-capping or logit scaling)."""

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
from lowbit.activations.io import attach_activations
from lowbit.experts import unfuse_experts
from lowbit.export.compressed_tensors import ct_layout, is_compressed_tensors, read_ct_config, replace_module
from lowbit.export.ct_tensors import SUFFIXES
from lowbit.kvcache.config import KV_CACHE_FILE
from lowbit.packed.qlinear import QuantLinear
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


def _stored_module(name: str, skeleton: torch.nn.Module, reader: Any, layout: Any, dtype: torch.dtype
                   ) -> torch.nn.Module:
    """Quantized linear ``name`` (full name) built from its compressed-tensors tensors, as the in-memory loader
    builds it (``QuantLinear`` with lowbit's kernels for int codes)."""
    stored = layout.stored_name(name)
    wanted = [*SUFFIXES, *(("weight",) if stored in layout.dense_weight else ())]
    t = {sfx: reader.tensor(f"{stored}.{sfx}") for sfx in wanted if f"{stored}.{sfx}" in reader}
    return layout.quantized_module(name, t, skeleton, dtype)


def _stored_layers(block: torch.nn.Module, prefix: str, reader: Any, layout: Any, dtype: torch.dtype
                   ) -> dict[str, torch.nn.Module]:
    """Put each compressed-tensors layer of ``block`` in place from its stored codes; returns the skeleton
    modules they replaced (block-relative names), to be put back once the block has run."""
    if layout is None:
        return {}
    swapped = {}
    for rel, module in list(block.named_modules()):
        if prefix + rel in layout.schemes:
            swapped[rel] = replace_module(block, rel, _stored_module(prefix + rel, module, reader, layout, dtype))
    return swapped


def evaluate_streamed(ref: str, tokenizer: Any, dataset: str = "wikitext2", split: str = "test", seqlen: int = 2048,
                      max_windows: int | None = None, data_dir: str | None = None, progress: bool = False,
                      dtype: torch.dtype = torch.float32, cache: str | None = None) -> EvalResult:
    """Perplexity of checkpoint ``ref`` on ``dataset``/``split`` evaluated block by block (module docstring)."""
    from lowbit.data.corpora import load_text
    from lowbit.data.windows import eval_windows, tokenize_text
    from lowbit.models.loading import load_config, resolve_model
    from lowbit.pipeline.memory import map_large_allocations

    source = resolve_model(ref, cache)
    folder = source.path if source.path is not None and source.path.is_dir() else None
    if folder is not None and (folder / KV_CACHE_FILE).is_file():
        raise LowbitError(f"{ref} runs with a quantized KV cache ({KV_CACHE_FILE}), which streamed evaluation does not "
                          "apply; evaluate it without --streamed")
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
    layout = None
    if folder is not None and is_compressed_tensors(folder):
        layout = ct_layout(model, read_ct_config(folder), reader.keys())
    unfuse_experts(model)  # MoE experts read as one linear each: whichever layout the checkpoint has
    reader.follow(model)
    if folder is not None:
        attach_activations(model, folder)  # a fake-quant W8A8 ... checkpoint's input quantizers
    embed, head = model.get_input_embeddings(), model.get_output_embeddings()
    embed_name, head_name = _module_name(model, embed), _module_name(model, head)
    blocks = decoder_blocks(model)
    t0 = time.perf_counter()
    materialize_rows(embed, f"{embed_name}.weight", reader, windows, dtype)
    inputs = capture_block_inputs(model, blocks[0], windows, 1)
    release(embed)
    prefix = architecture_of(model).blocks
    for i in tqdm(range(len(blocks)), desc="eval", unit="block", disable=not progress):
        swapped = _stored_layers(blocks[i], f"{prefix}.{i}.", reader, layout, dtype)
        materialize(blocks[i], f"{prefix}.{i}.", reader, dtype)
        propagate(blocks[i], inputs)
        for name, skeleton in swapped.items():
            replace_module(blocks[i], name, skeleton)
        release(blocks[i])
    norm = getattr(model.base_model, "norm", None)
    if norm is None:
        raise LowbitError(f"streamed evaluation knows the final norm of Llama-style models (base_model.norm); "
                          f"{config.model_type} has none: evaluate it without --streamed")
    norm_name = _module_name(model, norm)
    materialize(norm, f"{norm_name}.", reader, dtype)
    if layout is not None and head_name in layout.schemes:  # a quantized head: its stored codes, dequantized
        stored = _stored_module(head_name, head, reader, layout, dtype)
        head_weight = stored.dequantized_weight() if isinstance(stored, QuantLinear) else stored.weight.detach()
    else:
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
