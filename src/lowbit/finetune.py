"""The fine-tuning job (``lowbit finetune``): check, read the training windows, train, evaluate, write.

``finetune(model, tokenizer, method=..., data=..., out=...)`` runs one ``lowbit.qat.tuning`` method and
writes what it made to ``out`` (atomically; a directory lowbit did not write is replaced only with
``overwrite``):

* ``lora`` / ``qlora``: ``adapter/``, a peft adapter that plain peft loads on the full-precision base;
  with ``merge``, also ``merged/``: the base with the adapters folded in, as a plain Hugging Face checkpoint
  (``dequantized``) or rounded again to ``spec`` by round-to-nearest (``requantized``);
* ``peqa``: ``peqa_task.safetensors``, the task's scales (``lowbit.qat.peqa.load_task``);
* ``qat``: ``out`` is a lowbit quantized checkpoint (``lowbit eval`` / ``lowbit export`` take it).

Every output directory also holds ``finetune.json``, the summary ``finetune`` returns.
"""

from __future__ import annotations

import contextlib
import json
import os
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch

from lowbit.errors import LowbitError
from lowbit.qat.tuning import TuneConfig, check_config

SUMMARY = "finetune.json"
TASK_FILE = "peqa_task.safetensors"
ADAPTER_DIR = "adapter"
MERGED_DIR = "merged"
EVAL = {"dataset": "wikitext2", "split": "test", "seqlen": 2048}  # perplexity before / after (eval_windows of them)


def check_job(cfg: TuneConfig, out: str | os.PathLike[str] | None = None, overwrite: bool = False,
              inputs: Iterable[str | os.PathLike[str]] = (), seqlen: int = 512, eval_windows: int = 0) -> None:
    """Everything a run refuses without the model (LowbitError naming the option): the configuration, the
    window length, and that ``out`` and the training checkpoint are safe to write and apart."""
    from lowbit.atomic import absolute
    from lowbit.outputs import check_output

    check_config(cfg)
    if not isinstance(eval_windows, int) or eval_windows < 0:
        raise LowbitError(f"--eval-windows must be 0 or more, got {eval_windows!r}")
    if seqlen < 2:
        raise LowbitError(f"--seqlen must be at least 2, got {seqlen}")
    if cfg.resume and not Path(cfg.checkpoint or "").is_file():
        raise LowbitError(f"--resume: no checkpoint at {cfg.checkpoint}; drop --resume to start over")
    if cfg.checkpoint and not cfg.resume:
        check_output(cfg.checkpoint, "file", overwrite, inputs, "--checkpoint")
    if out is None:
        return
    target = check_output(out, "dir", overwrite, inputs, "--out")
    if cfg.checkpoint and target in absolute(cfg.checkpoint).parents:
        raise LowbitError(f"--checkpoint {cfg.checkpoint} is inside --out {out}, which is replaced when the run "
                          "ends; keep the training state elsewhere")


def _windows(data: str | torch.Tensor, tokenizer: Any, cfg: TuneConfig, seqlen: int) -> torch.Tensor:
    from lowbit.data.training import training_windows
    from lowbit.data.windows import check_token_windows

    if isinstance(data, str):
        return training_windows(data, tokenizer, cfg.steps, cfg.batch_size, seqlen, cfg.seed)
    check_token_windows(data, "fine-tuning", min_tokens=2)
    if data.shape[0] < cfg.batch_size:
        raise LowbitError(f"the training windows hold {data.shape[0]} windows, less than one batch of "
                          f"{cfg.batch_size}; give more or lower --batch-size")
    return data


def _inner(model: torch.nn.Module) -> torch.nn.Module:
    """The transformers model (a peft model's adapters are injected into it in place)."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def finetune(model: torch.nn.Module, tokenizer: Any, method: str = "qlora", data: str | torch.Tensor = "wikitext2",
             *, out: str | os.PathLike[str] | None = None, seqlen: int = 512, eval_windows: int = 0,
             overwrite: bool = False, progress: Any = None, inputs: Iterable[str | os.PathLike[str]] = (),
             model_name: str | None = None, **settings: Any) -> dict[str, Any]:
    """Fine-tune ``model`` (in place) with ``method`` on ``data`` (a corpus name, whose validation split is
    read, a .txt/.jsonl file, or ``(n, seqlen)`` token windows) and write the result to ``out`` (module
    docstring); returns the summary.  ``settings`` are ``TuneConfig`` fields (steps, lr, batch_size, seed,
    rank, alpha, targets, spec, learn_range, optimizer, merge, checkpoint, every, resume).
    ``eval_windows``: perplexity on that many WikiText-2 test windows of 2048, as training starts (QLoRA: its
    NF4 base; QAT: the round-to-nearest start) and after (and of the merged model).  ``progress(step, steps,
    loss, tokens, seconds)`` is called after each step; ``inputs``: paths ``out`` must never replace (the
    model's); ``model_name``: recorded in the summary."""
    from lowbit.eval.memory import peak_rss_mb
    from lowbit.eval.perplexity import check_seqlen
    from lowbit.qat.tuning import prepare, train

    cfg = TuneConfig(method=method, **settings)
    check_job(cfg, out, overwrite, inputs, seqlen, eval_windows)
    windows = _windows(data, tokenizer, cfg, seqlen)
    check_seqlen(model, windows.shape[1])
    if eval_windows:
        check_seqlen(model, EVAL["seqlen"])
    trained, info = prepare(model, cfg)
    before = _perplexity(_inner(trained), tokenizer, eval_windows)
    t0 = time.perf_counter()
    summary = train(trained, windows, cfg, progress)
    seconds = time.perf_counter() - t0
    after = _perplexity(_inner(trained), tokenizer, eval_windows)
    name = data if isinstance(data, str) else f"{tuple(data.shape)} token windows"
    summary = {"model": model_name, **summary, **info, "data": name, "windows": windows.shape[0],
               "seconds": seconds, "tokens_per_s": summary["run_tokens"] / max(seconds, 1e-9),
               "perplexity_before": before, "perplexity_after": after,
               "eval": EVAL | {"windows": eval_windows} if eval_windows else None}
    summary["peak_rss_mb"] = peak_rss_mb()
    if out is not None:
        summary["out"] = str(out)
        _write(trained, tokenizer, cfg, windows, Path(out), overwrite, summary, eval_windows)
    return summary


def _perplexity(model: torch.nn.Module, tokenizer: Any, windows: int) -> float | None:
    if not windows:
        return None
    from lowbit.eval.perplexity import evaluate

    return evaluate(model, tokenizer, EVAL["dataset"], EVAL["split"], EVAL["seqlen"], windows).perplexity


def _write(trained: torch.nn.Module, tokenizer: Any, cfg: TuneConfig, windows: torch.Tensor, out: Path,
           overwrite: bool, summary: dict[str, Any], eval_windows: int) -> None:
    """Write the run's outputs to ``out`` (module docstring); the summary gains what was written."""
    from lowbit.atomic import allow_replace, atomic_dir
    from lowbit.quantization import save_quantized

    if cfg.method == "qat":
        summary["format"] = save_quantized(trained, tokenizer, None, out, extra_files={SUMMARY: _dump(summary)},
                                           overwrite=overwrite)[1]
        return
    with allow_replace(out) if overwrite else contextlib.nullcontext(), atomic_dir(out) as tmp:
        if cfg.method == "peqa":
            from lowbit.qat.peqa import save_task

            summary["task_bytes"] = save_task(trained, tmp / TASK_FILE)
        else:
            trained.save_pretrained(tmp / ADAPTER_DIR)
            summary["adapter_bytes"] = sum(f.stat().st_size for f in (tmp / ADAPTER_DIR).rglob("*") if f.is_file())
            if cfg.merge is not None:
                _write_merged(trained, tokenizer, cfg, windows, tmp / MERGED_DIR, summary, eval_windows)
        (tmp / SUMMARY).write_text(_dump(summary))


def _write_merged(trained: torch.nn.Module, tokenizer: Any, cfg: TuneConfig, windows: torch.Tensor, path: Path,
                  summary: dict[str, Any], eval_windows: int) -> None:
    """The adapters folded into the base (``trained`` is left merged), rounded to ``cfg.spec`` when asked."""
    from lowbit.qat.merge import merge_lora
    from lowbit.quantization import quantize, save_quantized

    model = merge_lora(trained)
    report = None
    if cfg.merge == "requantized":
        spec = cfg.quant_spec()
        named = isinstance(cfg.spec, str) and ":" not in cfg.spec
        recipe = {"name": f"rtn-{cfg.spec.lower() if named else 'merged'}",
                  "methods": [{"method": "rtn", "spec": spec.to_dict(), "ignore": ["lm_head"]}]}
        report = quantize(model, recipe, windows[: cfg.batch_size], batch_size=cfg.batch_size, progress=False)
        summary["merged_bits_per_weight"] = report.bits_per_weight
    fmt = "auto" if report is not None else "fake-quant"
    summary["merged_format"] = save_quantized(model, tokenizer, report, path, fmt)[1]
    summary["perplexity_merged"] = _perplexity(model, tokenizer, eval_windows)


def _dump(summary: dict[str, Any]) -> str:
    from lowbit.jsonable import to_jsonable

    return json.dumps(to_jsonable(summary), indent=2)


__all__ = ["ADAPTER_DIR", "EVAL", "MERGED_DIR", "SUMMARY", "TASK_FILE", "check_job", "finetune"]
