"""Perplexity in the GPTQ convention, plus KL / top-1 agreement against a reference model."""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass
from typing import Any, Callable

import torch
from tqdm.auto import tqdm

from lowbit.data.corpora import load_text
from lowbit.data.windows import eval_windows, tokenize_text
from lowbit.errors import LowbitError
from lowbit.eval.memory import device_peak_mb, peak_rss_mb, reset_device_peak
from lowbit.eval.logits import has_plain_head, logit_chunks
from lowbit.eval.nll import kl_and_top1, nll_sum


@dataclass
class EvalResult:
    """One evaluation record; ``to_dict`` gives the same fields the CLI prints with ``--json``."""

    model: str
    dataset: str
    split: str
    seqlen: int
    windows: int
    tokens: int
    perplexity: float
    nll: float
    kl: float | None
    top1_agreement: float | None
    reference: str | None
    seconds: float
    tokens_per_s: float
    peak_rss_mb: float
    peak_device_mb: float | None
    device: str
    dtype: str
    kv_cache: str | None = None  # KV-cache setting attention read through (None: full precision)
    kv_bytes_per_token: float | None = None  # bytes the quantized cache held per token (all layers)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def context_length(model: Any) -> int | None:
    """The model's maximum context, from its config (None when it does not say)."""
    cfg = model.config
    for key in ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length"):
        value = getattr(cfg, key, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def check_seqlen(model: Any, seqlen: int) -> None:
    limit = context_length(model)
    if limit is not None and seqlen > limit:
        raise LowbitError(f"seqlen {seqlen} exceeds the model's context of {limit} tokens; use --seqlen {limit} or less")


@torch.no_grad()
def window_metrics(
    model: Any, windows: torch.Tensor, reference: Any | None = None, progress: bool = False, chunk: int = 512,
    new_cache: Callable[[torch.Tensor], Any] | None = None,
) -> dict[str, float]:
    """NLL sum, token count, forward-and-score seconds and (with a reference) KL sum / top-1 count over windows.

    Logits are formed ``chunk`` positions at a time where the model allows it (see ``logit_chunks``).
    ``new_cache(ids)`` gives each window a fresh cache to read keys and values through (the reference
    keeps full precision); the bytes they held are summed in ``cache_bytes``.
    """
    device = next(model.parameters()).device
    ref_device = next(reference.parameters()).device if reference is not None else None
    nll = 0.0
    kl = 0.0
    agree = 0
    count = 0
    positions = 0
    seconds = 0.0
    cache_bytes = 0
    both_plain = has_plain_head(model) and (reference is None or has_plain_head(reference))
    step = chunk if both_plain else 0  # the two models must cut their logits the same way
    for row in tqdm(windows, desc="eval", unit="win", disable=not progress, leave=False):
        ids = row.unsqueeze(0).to(device)
        n = ids.shape[1]
        t0 = time.perf_counter()
        cache = new_cache(ids) if new_cache is not None else None
        chunks = logit_chunks(model, ids, step, cache)
        ref_chunks = logit_chunks(reference, ids.to(ref_device), step) if reference is not None else None
        for start, logits in chunks:
            stop = start + logits.shape[1]
            # positions start..stop-1 predict ids[start+1 .. stop]; the last position predicts nothing
            targets = ids[:, start + 1:stop + 1]
            nll += nll_sum(logits[:, :targets.shape[1]], targets).item()
            if ref_chunks is not None:
                _, ref_logits = next(ref_chunks)
                k, a = kl_and_top1(ref_logits.to(logits.device), logits)
                kl += k.item()
                agree += int(a.item())
            del logits
        if cache is not None:
            cache_bytes += cache.nbytes()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        seconds += time.perf_counter() - t0
        count += n - 1
        positions += n if reference is not None else 0
    return {"nll_sum": nll, "count": count, "seconds": seconds, "kl_sum": kl, "agree": agree, "positions": positions,
            "cache_bytes": cache_bytes}


def _name(model: Any) -> str:
    source = getattr(model, "lowbit_source", None)
    return source.ref if source is not None else type(model).__name__


def evaluate(
    model: Any,
    tokenizer: Any,
    dataset: str = "wikitext2",
    split: str = "test",
    seqlen: int = 2048,
    max_windows: int | None = None,
    reference: Any | None = None,
    progress: bool = False,
    data_dir: str | None = None,
    kv_cache: Any | None = None,
    pivot_model: Any | None = None,
) -> EvalResult:
    """Perplexity on ``dataset``/``split`` in the GPTQ convention.

    The split's rows are joined by the corpus convention, tokenized once and cut into
    non-overlapping ``seqlen`` windows (``max_windows`` keeps a fixed prefix of them);
    perplexity is ``exp`` of the mean next-token NLL over every predicted position.
    With ``reference`` (e.g. the fp32 model), also the mean per-token KL(reference || model)
    and the top-1 agreement of their next-token predictions.  With ``kv_cache`` (a preset such as
    ``KIVI2``, a mapping or a ``KVCacheConfig``) every window is prefilled into a fresh quantized KV
    cache and attention reads the keys and values it gives back (the KIVI / KVQuant convention);
    by default a model loaded from a checkpoint with a KV-cache setting uses it (``"none"``: off).
    ``pivot_model``: the full-precision model, for settings with IntactKV pivots.
    """
    if not hasattr(model, "config") or not callable(model):
        raise LowbitError("evaluate() needs a transformers causal LM (as returned by lowbit.load_model)")
    check_seqlen(model, seqlen)
    new_cache, kv_name = kv_cache_factory(model, kv_cache, seqlen, pivot_model)
    try:
        windows = eval_windows(tokenize_text(tokenizer, load_text(dataset, split, data_dir)), seqlen, max_windows)
    except LowbitError as e:
        raise LowbitError(f"evaluation data {dataset} ({split}): {e}") from None
    device = next(model.parameters()).device
    reset_device_peak(device)
    t0 = time.perf_counter()
    m = window_metrics(model, windows, reference, progress, new_cache=new_cache)
    total = time.perf_counter() - t0
    nll = m["nll_sum"] / m["count"]
    return EvalResult(
        model=_name(model),
        dataset=dataset,
        split=split,
        seqlen=seqlen,
        windows=windows.shape[0],
        tokens=windows.numel(),
        perplexity=math.exp(nll),
        nll=nll,
        kl=m["kl_sum"] / m["positions"] if reference is not None else None,
        top1_agreement=m["agree"] / m["positions"] if reference is not None else None,
        reference=_name(reference) if reference is not None else None,
        seconds=total,
        tokens_per_s=windows.numel() / m["seconds"] if m["seconds"] > 0 else float("nan"),
        peak_rss_mb=peak_rss_mb(),
        peak_device_mb=device_peak_mb(device),
        device=str(device),
        dtype=str(next(model.parameters()).dtype).replace("torch.", ""),
        kv_cache=kv_name,
        kv_bytes_per_token=m["cache_bytes"] / windows.numel() if new_cache is not None else None,
    )


def kv_cache_factory(model: Any, kv_cache: Any | None, seqlen: int, pivot_model: Any | None = None
                      ) -> tuple[Callable[[torch.Tensor], Any] | None, str | None]:
    """A maker of fresh quantized caches for ``kv_cache`` (checked against the model and window now).
    ``None``: the model's own setting (``lowbit_kv_cache``, from its checkpoint), if any; ``"none"``:
    full precision."""
    from lowbit.kvcache import check_kv_model, check_pivots, kv_setting, new_kv_cache

    cfg = kv_setting(model, kv_cache)
    if cfg is None:
        return None, None
    check_kv_model(model)
    if cfg.residual + cfg.fp_head >= seqlen:
        raise LowbitError(f"the KV cache keeps {cfg.residual} recent + {cfg.fp_head} first tokens in full precision, "
                          f"not fewer than the {seqlen}-token window: nothing would be quantized; use a smaller "
                          "residual or a longer seqlen")
    check_pivots(cfg, pivot_model)

    def new_cache(ids: torch.Tensor) -> Any:
        return new_kv_cache(model, cfg, ids, pivot_model)

    name = cfg.name if not cfg.intact else f"{cfg.name} + IntactKV({cfg.intact})"
    return new_cache, name
