"""lm-evaluation-harness tasks on any model lowbit loads (extra ``lmeval``).

The model is loaded by lowbit (quantized, packed, pruned, low-rank or KV-quantized checkpoints alike) and handed
to lm-eval's own Hugging Face model class, so requests are batched, truncated and scored exactly as lm-eval does
for any HF model.  A checkpoint with a KV-cache setting runs every forward pass through a fresh quantized cache
(attention reads the quantized keys and values, as ``lowbit.eval.perplexity`` does).

Tasks: ``wikitext_lastword`` (``lowbit.eval.lastword``, built from the local WikiText-2 test text), a path to an
lm-eval task YAML (its folder is added to lm-eval's task index), or the name of a task lm-eval ships (whose data
must then be reachable: the hub or the datasets cache).
"""

from __future__ import annotations

import logging
import re
from pathlib import Path
from typing import Any

from lowbit.errors import LowbitError
from lowbit.eval.lastword import TASK as LASTWORD

INSTALL = "pip install 'lowbit[lmeval]' (lm-eval 0.4)"


def _lm_eval() -> Any:
    try:
        import lm_eval
    except ImportError:
        raise LowbitError(f"--tasks runs lm-evaluation-harness, which is not installed; {INSTALL}") from None
    return lm_eval


def _yaml_task_name(path: Path) -> str:
    """The ``task:`` name at the top level of an lm-eval task YAML (read as text: such files use custom tags,
    ``!function``, that a plain YAML loader refuses)."""
    try:
        text = path.read_text()[:1_000_000]
    except (OSError, UnicodeDecodeError) as exc:
        raise LowbitError(f"task file {path} cannot be read ({exc})") from None
    match = re.search(r"^task:[ \t]*['\"]?([\w.\-]+)", text, re.M)
    if match is None:
        raise LowbitError(f"task file {path} has no top-level 'task:' name; lm-eval task YAMLs name their task")
    return match.group(1)


def resolve_tasks(tasks: list[str], data_dir: str | None = None) -> tuple[list[Any], list[str]]:
    """The task list for lm-eval (names and config dicts) and the folders of YAML tasks to index; every entry
    checked (lm-eval installed, files readable, names known) before a model is loaded."""
    _lm_eval()
    from lm_eval.tasks import TaskManager

    resolved: list[Any] = []
    folders: list[str] = []
    named = []
    for task in tasks:
        if task == LASTWORD:
            from lowbit.eval.lastword import lastword_task

            resolved.append(lastword_task(data_dir))
        elif task.endswith((".yaml", ".yml")):
            path = Path(task)
            if not path.is_file():
                raise LowbitError(f"task file {task} does not exist; pass an lm-eval task YAML or a task name")
            resolved.append(_yaml_task_name(path))
            folders.append(str(path.resolve().parent))
        else:
            resolved.append(task)
            named.append(task)
    if named:
        known = set(TaskManager().all_tasks)
        unknown = [t for t in named if t not in known]
        if unknown:
            raise LowbitError(f"unknown task {unknown[0]!r}; use {LASTWORD} (offline, built from WikiText-2), a task "
                              "YAML path, or an lm-eval task name (lm-eval --tasks list)")
    return resolved, folders


def harness_lm(model: Any, tokenizer: Any, batch_size: int = 8, max_length: int | None = None,
               kv_cache: Any | None = None) -> Any:
    """lm-eval's HF model class around a lowbit-loaded ``model``; forward passes go through a quantized KV cache
    when the model's checkpoint has a setting, or ``kv_cache`` names one (``"none"``: off)."""
    from lm_eval.models.huggingface import HFLM

    from lowbit.eval.perplexity import kv_cache_factory

    seqlen = max_length or int(getattr(model.config, "max_position_embeddings", 2048) or 2048)
    new_cache, _ = kv_cache_factory(model, kv_cache, seqlen)

    class LowbitLM(HFLM):
        """``HFLM`` whose forward passes and generations run through a fresh quantized KV cache, if any."""

        def _model_call(self, inps: Any, attn_mask: Any = None, labels: Any = None) -> Any:
            if new_cache is None:
                return super()._model_call(inps, attn_mask, labels)
            import torch

            with torch.no_grad():
                return self.model(inps, past_key_values=new_cache(inps), use_cache=True).logits

        def _model_generate(self, context: Any, max_length: int, stop: list[str], **kwargs: Any) -> Any:
            if new_cache is not None:
                kwargs["past_key_values"] = new_cache(context)
            return super()._model_generate(context, max_length, stop, **kwargs)

    device = str(next(model.parameters()).device)
    return LowbitLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size, device=device,
                    max_length=max_length)


def run_tasks(lm: Any, tasks: list[Any], folders: list[str], limit: int | float | None = None,
              num_fewshot: int | None = None) -> dict[str, dict[str, float]]:
    """Run ``tasks`` (from ``resolve_tasks``) on ``lm`` (an lm-eval LM): task -> metric -> value (the harness's
    own numbers; standard errors under ``METRIC_stderr``)."""
    lm_eval = _lm_eval()
    from lm_eval.tasks import TaskManager

    logging.getLogger("lm_eval").setLevel(logging.ERROR)
    manager = TaskManager(include_path=folders or None)
    out = lm_eval.simple_evaluate(model=lm, tasks=tasks, task_manager=manager, limit=limit, num_fewshot=num_fewshot,
                                  log_samples=False, bootstrap_iters=1000, verbosity="ERROR")
    results: dict[str, dict[str, float]] = {}
    for task, metrics in (out or {}).get("results", {}).items():
        results[task] = {k.split(",")[0]: float(v)
                         for k, v in metrics.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
    return results
