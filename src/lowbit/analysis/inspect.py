"""Model analysis: per-channel activation magnitudes of every decoder linear's input, weight
distributions, and how a quantized model's hidden states drift from the fp model's along depth.

Model plumbing only; the math lives in ``lowbit.analysis.stats``.  ``analyze_model`` returns the
dict stored as the ``analysis`` result of a results directory.
"""

from __future__ import annotations

from typing import Any

import torch

from lowbit.analysis.results import model_identity
from lowbit.analysis.stats import (
    OUTLIER_FACTOR,
    channel_stats,
    encode_absmax,
    finish_hidden_error,
    hidden_error_terms,
    merge_error_terms,
    summarize_activations,
    summarize_weights,
    update_absmax,
    weight_summary,
)
from lowbit.arch import architecture_of, decoder_blocks
from lowbit.data.windows import check_token_windows
from lowbit.errors import LowbitError
from lowbit.models.capture import BlockInputs, _Stop, capture_block_inputs, forward_until_stop, run_block


def _is_linear(module: torch.nn.Module) -> bool:
    """``nn.Linear`` or a packed linear (lowbit's ``QuantLinear``: ``in_features`` + a dequantized weight)."""
    return isinstance(module, torch.nn.Linear) or (
        hasattr(module, "in_features") and callable(getattr(module, "dequantized_weight", None)))


def decoder_linears(model: torch.nn.Module) -> dict[str, tuple[int, torch.nn.Module]]:
    """Every linear inside the decoder blocks: full name -> (block index, module), in depth order."""
    prefix = architecture_of(model).blocks
    out: dict[str, tuple[int, torch.nn.Module]] = {}
    for i, block in enumerate(decoder_blocks(model)):
        for sub, m in block.named_modules():
            if sub and _is_linear(m):
                out[f"{prefix}.{i}.{sub}"] = (i, m)
    if not out:
        raise LowbitError(f"no linear layers found in the decoder blocks of {type(model).__name__}")
    return out


def _layer_weight(module: torch.nn.Module) -> torch.Tensor:
    if isinstance(module, torch.nn.Linear):
        return module.weight.detach()
    return module.dequantized_weight().detach()


def _check_ids(ids: torch.Tensor) -> None:
    check_token_windows(ids, "analysis")


@torch.no_grad()
def channel_absmax(model: torch.nn.Module, calib: torch.Tensor, batch_size: int = 4) -> dict[str, torch.Tensor]:
    """Running per-input-channel absmax of every decoder linear's input over ``calib`` (n, seqlen).

    Forward hooks keep one vector per layer (never whole activations); the forward pass stops after
    the last decoder block.
    """
    _check_ids(calib)
    layers = decoder_linears(model)
    acc: dict[str, torch.Tensor | None] = {name: None for name in layers}

    def grab(name: str):
        def fn(module: torch.nn.Module, args: tuple, output: Any) -> None:
            acc[name] = update_absmax(acc[name], args[0])
        return fn

    def stop(module: torch.nn.Module, args: tuple, output: Any) -> None:
        raise _Stop

    handles = [m.register_forward_hook(grab(name)) for name, (_, m) in layers.items()]
    handles.append(decoder_blocks(model)[-1].register_forward_hook(stop))
    try:
        forward_until_stop(model, calib, batch_size)
    finally:
        for h in handles:
            h.remove()
    missing = [n for n, a in acc.items() if a is None]
    if missing:
        raise LowbitError(f"{len(missing)} decoder linears never ran during the forward pass (e.g. {missing[0]}); "
                          "activation statistics need every layer to see the calibration text")
    return {n: a.cpu() for n, a in acc.items()}  # type: ignore[union-attr]


def activation_stats(model: torch.nn.Module, calib: torch.Tensor, batch_size: int = 4,
                     factor: float = OUTLIER_FACTOR) -> dict[str, dict[str, Any]]:
    """Per decoder linear: ``type``, ``block``, the ``channel_stats`` of its input (``ratio`` max/median,
    ``kurtosis``, ``outliers`` above ``factor`` x median ...) and ``absmax`` per input channel (as
    ``encode_absmax`` text; read back with ``lowbit.analysis.stats.absmax_values``)."""
    layers = decoder_linears(model)
    amax = channel_absmax(model, calib, batch_size)
    return {
        name: {"type": name.rsplit(".", 1)[-1], "block": layers[name][0], **channel_stats(a, factor),
               "absmax": encode_absmax(a)}
        for name, a in amax.items()
    }


@torch.no_grad()
def weight_stats(model: torch.nn.Module) -> dict[str, dict[str, Any]]:
    """Per decoder linear: ``type``, ``block``, ``shape`` and ``weight_summary`` of its (dequantized) weight."""
    out: dict[str, dict[str, Any]] = {}
    for name, (block, m) in decoder_linears(model).items():
        w = _layer_weight(m)
        out[name] = {"type": name.rsplit(".", 1)[-1], "block": block, "shape": list(w.shape), **weight_summary(w)}
    return out


def _batch_terms(ref: BlockInputs, approx: BlockInputs) -> dict[str, float]:
    return merge_error_terms(hidden_error_terms(r, a) for r, a in zip(ref.hidden, approx.hidden))


@torch.no_grad()
def error_along_depth(fp_model: torch.nn.Module, q_model: torch.nn.Module, ids: torch.Tensor,
                      batch_size: int = 4) -> list[dict[str, float]]:
    """Per decoder block, how far the quantized model's block output is from the fp model's.

    Both models run block by block on their own hidden states (as in inference), so ``rel_error``
    (||fp - q||_F / ||fp||_F), ``token_rel_error`` (mean per-token relative error), ``cosine`` (mean
    per-token) and ``cosine_min`` measure the error accumulated up to that block; the ``local_*``
    entries feed the quantized block the fp model's inputs, isolating that block's own contribution.
    """
    _check_ids(ids)
    fp_blocks, q_blocks = decoder_blocks(fp_model), decoder_blocks(q_model)
    if len(fp_blocks) != len(q_blocks):
        raise LowbitError(f"the models differ in depth ({len(fp_blocks)} vs {len(q_blocks)} decoder blocks); "
                          "compare a quantized model with the fp model it came from")
    fp_in = capture_block_inputs(fp_model, fp_blocks[0], ids.to(next(fp_model.parameters()).device), batch_size)
    q_in = capture_block_inputs(q_model, q_blocks[0], ids.to(next(q_model.parameters()).device), batch_size)
    if fp_in.hidden[0].shape != q_in.hidden[0].shape:
        raise LowbitError(f"hidden states differ in shape ({tuple(fp_in.hidden[0].shape)} vs "
                          f"{tuple(q_in.hidden[0].shape)}): the models are not the same architecture")
    rows: list[dict[str, float]] = []
    for i, (fb, qb) in enumerate(zip(fp_blocks, q_blocks)):
        fp_out, q_out = run_block(fb, fp_in), run_block(qb, q_in)
        local = run_block(qb, fp_in)
        acc = finish_hidden_error(_batch_terms(fp_out, q_out))
        loc = finish_hidden_error(_batch_terms(fp_out, local))
        rows.append({"block": i, **acc, "local_rel_error": loc["rel_error"],
                     "local_token_rel_error": loc["token_rel_error"], "local_cosine": loc["cosine"]})
        fp_in, q_in = fp_out, q_out
    return rows


def analyze_model(model: torch.nn.Module, calib: torch.Tensor, name: str,
                  quantized: torch.nn.Module | None = None, quantized_name: str | None = None,
                  batch_size: int = 4, factor: float = OUTLIER_FACTOR,
                  data: dict[str, Any] | None = None) -> dict[str, Any]:
    """The ``analysis`` result of ``model``: identity, activation and weight statistics per decoder
    linear with per-type summaries, and (when ``quantized`` is given) the error along depth of the
    quantized model against ``model``."""
    _check_ids(calib)
    acts = activation_stats(model, calib, batch_size, factor)
    weights = weight_stats(model)
    result: dict[str, Any] = {
        "kind": "analysis",
        "model": model_identity(model, name),
        "data": {"nsamples": int(calib.shape[0]), "seqlen": int(calib.shape[1]), "tokens": int(calib.numel()),
                 **(data or {})},
        "outlier_factor": factor,
        "activations": acts,
        "activation_summary": summarize_activations(acts),
        "weights": weights,
        "weight_summary": summarize_weights(weights),
        "error_along_depth": None,
    }
    if quantized is not None:
        result["error_along_depth"] = {"quantized": quantized_name or "quantized",
                                       "blocks": error_along_depth(model, quantized, calib, batch_size)}
    return result
