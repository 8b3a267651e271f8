"""Per-layer quantization sensitivity (HAWQ-style "quantize one layer, measure the model").

For every targeted linear (default: every ``nn.Linear`` inside the decoder blocks; ``lm_head`` and
embeddings are outside them) and every candidate format, only that layer's weight is replaced by
its RTN quantize-dequantize (restored bit for bit afterwards) and the mean per-token
``KL(p_fp || p_quantized)`` of the next-token distribution is measured on a small fixed set of
token windows, with the perplexity on the same windows.  The fp probabilities are computed once.

Speed: one fp pass stores the hidden states entering every block; a layer of block ``b`` is then
measured by running the model with blocks ``0..b-1`` turned into pass-throughs and block ``b``
fed its stored fp input, so only blocks ``b..`` and the head run (on average half the model).
On smollm2-135m (210 linears, 4 windows x 128 tokens) one candidate format took 3.3 minutes on one
CPU thread of a loaded 2-core machine (0.93 s per layer); two threads on cores other jobs also use
were 4x slower there (OpenMP oversubscription), so set ``OMP_NUM_THREADS=1`` when sharing cores.

The cheap proxy needs no extra forward: ``sum_j E[x_j^2] ||dW[:, j]||^2`` with ``E[x_j^2]`` from
the same fp pass (the diagonal of GPTQ's layer-wise Hessian; see ``diag_hessian_error``).
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
from tqdm.auto import tqdm

from lowbit.analysis.candidates import Candidate
from lowbit.analysis.inspect import decoder_linears
from lowbit.analysis.results import check_same_model, model_identity
from lowbit.analysis.sensitivity_math import (
    diag_hessian_error,
    group_aggregates,
    kl_sum,
    nll_sum_shifted,
    spearman,
)
from lowbit.arch import decoder_blocks
from lowbit.core.quant import dequantize, quantize
from lowbit.data.windows import check_token_windows
from lowbit.errors import LowbitError

PROXY = "sum_j E[x_j^2] ||dW[:, j]||^2 (diagonal of GPTQ's layer Hessian 2 E[x x^T], halved; RTN dW)"


def target_linears(model: torch.nn.Module, names: Sequence[str] | None = None) -> dict[str, tuple[int, torch.nn.Linear]]:
    """Decoder-block linears (full name -> (block index, module)) in depth order; ``names`` picks some."""
    found = {n: (i, m) for n, (i, m) in decoder_linears(model).items() if isinstance(m, torch.nn.Linear)}
    if names is None:
        if not found:
            raise LowbitError(f"no nn.Linear inside the decoder blocks of {type(model).__name__}")
        return found
    missing = [n for n in names if n not in found]
    if missing:
        raise LowbitError(f"not decoder-block linears of {type(model).__name__}: {', '.join(missing[:3])}; "
                          f"e.g. {', '.join(list(found)[:2])}")
    return {n: found[n] for n in names}


def default_primary(candidates: Sequence[Candidate]) -> Candidate:
    """The candidate reported as the headline sensitivity: the fewest bits among those with at least
    3 bits (2-bit formats saturate the ranking), else the first."""
    wide = [c for c in candidates if c.bits >= 3]
    return min(wide, key=lambda c: (c.bits, c.cost_bits(1, 4096))) if wide else candidates[0]


@dataclass
class _Reference:
    """What the fp pass leaves behind, per batch of windows."""

    batches: list[torch.Tensor]
    block_inputs: list[list[torch.Tensor]]  # [block][batch] hidden states entering the block
    logp: list[torch.Tensor] = field(default_factory=list)  # fp next-token log-probabilities per batch
    sq_mean: dict[str, torch.Tensor] = field(default_factory=dict)  # E[x_j^2] of each target's input
    tuple_out: bool = False  # blocks return (hidden, ...) rather than a tensor
    nll: float = 0.0  # fp NLL summed over predicted tokens
    positions: int = 0  # positions with a next-token distribution (KL is averaged over these)
    predicted: int = 0  # positions with a next token in the window (NLL is averaged over these)


@torch.no_grad()
def _reference_pass(model: torch.nn.Module, blocks: torch.nn.ModuleList, ids: torch.Tensor, batch_size: int,
                    targets: dict[str, tuple[int, torch.nn.Linear]]) -> _Reference:
    device = next(model.parameters()).device
    ref = _Reference(batches=[b.to(device) for b in ids.split(batch_size)], block_inputs=[[] for _ in blocks])
    sq_sum: dict[str, torch.Tensor] = {}
    counts: dict[str, int] = {}
    handles = []

    def grab_input(i: int):
        def hook(_m: torch.nn.Module, args: tuple, kwargs: dict) -> None:
            h = args[0] if args else kwargs["hidden_states"]
            ref.block_inputs[i].append(h.detach().clone())
        return hook

    def grab_sq(name: str):
        def hook(_m: torch.nn.Module, args: tuple, _out: Any) -> None:
            x = args[0].detach().reshape(-1, args[0].shape[-1]).double()
            sq_sum[name] = sq_sum[name] + x.pow(2).sum(0) if name in sq_sum else x.pow(2).sum(0)
            counts[name] = counts.get(name, 0) + x.shape[0]
        return hook

    def out_type(_m: torch.nn.Module, _args: tuple, out: Any) -> None:
        ref.tuple_out = isinstance(out, (tuple, list))

    try:
        for i, block in enumerate(blocks):
            handles.append(block.register_forward_pre_hook(grab_input(i), with_kwargs=True))
        handles.append(blocks[0].register_forward_hook(out_type))
        handles += [m.register_forward_hook(grab_sq(n)) for n, (_, m) in targets.items()]
        for batch in ref.batches:
            logits = model(input_ids=batch, use_cache=False).logits
            ref.logp.append(torch.log_softmax(logits.float(), dim=-1))
            ref.nll += nll_sum_shifted(logits, batch)
            ref.positions += batch.numel()
            ref.predicted += batch.shape[0] * (batch.shape[1] - 1)
            del logits
    finally:
        for h in handles:
            h.remove()
    ref.sq_mean = {n: (sq_sum[n] / counts[n]).float() for n in sq_sum}
    return ref


@contextmanager
def _start_at(blocks: torch.nn.ModuleList, b: int, ref: _Reference, batch_index: list[int]) -> Iterator[None]:
    """Blocks before ``b`` pass their input through; block ``b`` receives its stored fp input for
    batch ``batch_index[0]``.  Everything is undone on exit."""
    if b == 0:
        yield
        return

    def passthrough(*args: Any, **kwargs: Any) -> Any:
        h = args[0] if args else kwargs["hidden_states"]
        return (h,) if ref.tuple_out else h

    def feed(_m: torch.nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        h = ref.block_inputs[b][batch_index[0]]
        if args:
            return (h, *args[1:]), kwargs
        return args, {**kwargs, "hidden_states": h}

    saved = [blk.__dict__.get("forward") for blk in blocks[:b]]  # e.g. accelerate's hooked forward
    for blk in blocks[:b]:
        blk.forward = passthrough  # instance attribute shadows the class method
    handle = blocks[b].register_forward_pre_hook(feed, with_kwargs=True)
    try:
        yield
    finally:
        handle.remove()
        for blk, fwd in zip(blocks[:b], saved):
            if fwd is None:
                del blk.forward
            else:
                blk.forward = fwd


@torch.no_grad()
def _tail_metrics(model: torch.nn.Module, blocks: torch.nn.ModuleList, b: int, ref: _Reference) -> tuple[float, float]:
    """Mean per-position KL(fp || model) and mean next-token NLL on the reference windows, running
    only blocks ``b..`` (the model's weights as they are now)."""
    kl = nll = 0.0
    index = [0]
    with _start_at(blocks, b, ref, index):
        for j, batch in enumerate(ref.batches):
            index[0] = j
            logits = model(input_ids=batch, use_cache=False).logits
            kl += kl_sum(ref.logp[j], logits)
            nll += nll_sum_shifted(logits, batch)
    return max(kl / ref.positions, 0.0), nll / ref.predicted  # rounding can leave -1e-9 where KL is ~0


@contextmanager
def quantized_weight(layer: torch.nn.Linear, candidate: Candidate) -> Iterator[torch.Tensor]:
    """Replace ``layer.weight`` by its RTN quantize-dequantize in ``candidate``'s format; yields the
    weight change ``W - Wq`` (fp32) and restores the original weight exactly on exit."""
    w = layer.weight.data
    original = w.clone()
    wq = dequantize(quantize(w.float(), candidate.spec)).to(w.dtype)
    try:
        w.copy_(wq)
        yield original.float() - wq.float()
    finally:
        w.copy_(original)


def _check_inputs(model: torch.nn.Module, ids: torch.Tensor, candidates: Sequence[Candidate],
                  targets: dict[str, tuple[int, torch.nn.Linear]]) -> None:
    check_token_windows(ids, "sensitivity", min_tokens=2)
    if not candidates:
        raise LowbitError("sensitivity needs at least one candidate format")
    for name, (_, m) in targets.items():
        for c in candidates:
            c.check_layer(name, m.in_features)


def measure_sensitivity(
    model: torch.nn.Module,
    ids: torch.Tensor,
    candidates: Sequence[Candidate],
    name: str = "model",
    layers: Sequence[str] | None = None,
    primary: Candidate | None = None,
    batch_size: int = 4,
    source: str | None = None,
    progress: bool = False,
) -> dict[str, Any]:
    """Sensitivity of each target linear at each candidate format, as a "sensitivity" result dict.

    ``ids`` (windows, seqlen) are the fixed evaluation windows (KL at every position, perplexity of
    every next token) and the proxy's statistics.  Top-level ``bits`` / ``group_size`` and each
    layer's ``kl`` / ``proxy`` / ``ppl`` are those of ``primary`` (``default_primary``); every
    candidate's values are under the layer's ``options``, keyed by label (``w4g64``).
    """
    candidates = list(candidates)
    targets = target_linears(model, layers)
    _check_inputs(model, ids, candidates, targets)
    primary = primary or default_primary(candidates)
    if primary not in candidates:
        raise LowbitError(f"primary candidate {primary.label} is not among the candidates")
    t0 = time.perf_counter()
    blocks = decoder_blocks(model)
    ref = _reference_pass(model, blocks, ids, batch_size, targets)
    fp_nll = ref.nll / ref.predicted
    rows = []
    bar = tqdm(total=len(targets) * len(candidates), desc="sensitivity", unit="run", disable=not progress)
    for lname, (b, layer) in targets.items():
        options = {}
        for c in candidates:
            with quantized_weight(layer, c) as dw:
                sq = ref.sq_mean.get(lname)  # None: no token reached the layer (an unused expert)
                proxy = diag_hessian_error(dw, sq) if sq is not None else 0.0
                kl, nll = _tail_metrics(model, blocks, b, ref)
            options[c.label] = {"kl": kl, "proxy": proxy, "ppl": math.exp(nll),
                                "cost_bits": c.cost_bits(layer.out_features, layer.in_features)}
            bar.update(1)
        main = options[primary.label]
        rows.append({"name": lname, "type": lname.rsplit(".", 1)[-1], "block": b,
                     "shape": [layer.out_features, layer.in_features],
                     "kl": main["kl"], "proxy": main["proxy"], "ppl": main["ppl"], "options": options})
    bar.close()
    del ref
    result = {
        "kind": "sensitivity",
        "model": model_identity(model, name),
        "bits": primary.bits,
        "group_size": primary.group_size,
        "symmetric": primary.symmetric,
        "quantizer": "rtn",
        "candidates": [{"label": c.label, "bits": c.bits, "group_size": c.group_size, "symmetric": c.symmetric}
                       for c in candidates],
        "eval": {"source": source, "windows": int(ids.shape[0]), "seqlen": int(ids.shape[1]),
                 "tokens": int(ids.numel()), "fp_ppl": math.exp(fp_nll),
                 "kl": "mean per-position KL(fp || one layer quantized), every position of every window",
                 "seconds": time.perf_counter() - t0},
        "proxy_definition": PROXY,
        "layers": rows,
    }
    return summarize(result)


def summarize(result: dict[str, Any]) -> dict[str, Any]:
    """Fill in the ranking, per-type and per-block aggregates and the KL-vs-proxy Spearman rho
    (headline and per candidate) of a sensitivity result (in place; also returned)."""
    layers = result["layers"]
    result["ranking"] = [l["name"] for l in sorted(layers, key=lambda l: -l["kl"])]
    result["by_type"] = group_aggregates(layers, "type")
    result["by_block"] = group_aggregates(layers, "block")
    result["spearman_proxy"] = spearman([l["kl"] for l in layers], [l["proxy"] for l in layers])
    labels = [c["label"] for c in result["candidates"]]
    result["spearman_proxy_by_option"] = {
        lab: spearman([l["options"][lab]["kl"] for l in layers], [l["options"][lab]["proxy"] for l in layers])
        for lab in labels}
    result.setdefault("spearman_seeds", None)
    return result


def seed_agreement(a: dict[str, Any], b: dict[str, Any]) -> dict[str, Any]:
    """Spearman rho between two sensitivity results of the same model, layers and candidates (other
    evaluation windows / seed): headline KL and per candidate.  Stored into ``a`` (returned)."""
    check_same_model(b, a["model"], "the second sensitivity result")
    names_a = [l["name"] for l in a["layers"]]
    if names_a != [l["name"] for l in b["layers"]] or a["candidates"] != b["candidates"]:
        raise LowbitError("the two sensitivity results cover different layers or candidates; measure both alike")
    a["spearman_seeds"] = spearman([l["kl"] for l in a["layers"]], [l["kl"] for l in b["layers"]])
    a["spearman_seeds_by_option"] = {
        c["label"]: spearman([l["options"][c["label"]]["kl"] for l in a["layers"]],
                             [l["options"][c["label"]]["kl"] for l in b["layers"]]) for c in a["candidates"]}
    a["spearman_seeds_proxy"] = spearman([l["proxy"] for l in a["layers"]], [l["proxy"] for l in b["layers"]])
    return a
