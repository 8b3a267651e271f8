"""``lowbit eval MODEL``: perplexity (GPTQ convention), KL / top-1 agreement against a reference,
speed and memory, optionally through a quantized KV cache; or lm-evaluation-harness tasks (``--tasks``)."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from lowbit.cli.display import print_table
from lowbit.cli.options import (
    add_eval_options,
    add_json_option,
    add_kv_options,
    add_loading_options,
    add_model_options,
    kv_setup,
    model_source,
)
from lowbit.experiment import load


def add_parser(sub: Any) -> None:
    p = sub.add_parser("eval", help="perplexity (GPTQ convention), KL/top-1 vs a reference, speed, memory")
    add_model_options(p)
    add_eval_options(p, prefix="--")
    p.add_argument("--reference", default=None, help="reference model for KL divergence and top-1 agreement")
    add_loading_options(p)
    add_kv_options(p)
    p.add_argument("--streamed", action="store_true",
                   help="never hold the whole model: run the windows through one decoder block at a time (a "
                        "full-precision or fake-quant safetensors checkpoint; no --reference or KV cache)")
    p.add_argument("--tasks", default=None,
                   help="run lm-evaluation-harness tasks instead of perplexity (comma-separated): wikitext_lastword "
                        "(offline, from WikiText-2), a task YAML path, or an lm-eval task name (extra lmeval)")
    p.add_argument("--limit", type=float, default=None,
                   help="with --tasks: examples per task (an integer), or a fraction of each task below 1")
    p.add_argument("--num-fewshot", type=int, default=None, help="with --tasks: few-shot examples per prompt")
    p.add_argument("--batch-size", type=int, default=8, help="with --tasks: requests per forward pass")
    add_json_option(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from lowbit.eval.perplexity import evaluate

    from lowbit.runtime.onnxrt import is_onnx_path

    if is_onnx_path(args.model):
        return _run_onnx(args)
    if args.tasks is not None:
        return _run_tasks(args)
    if args.streamed:
        return _run_streamed(args)
    model, tok = load(model_source(args))
    reference = load(model_source(args, args.reference))[0] if args.reference else None
    kv, pivot = kv_setup(args, model, tok)
    result = evaluate(model, tok, args.dataset, args.split, args.seqlen, args.max_windows, reference,
                      progress=not args.json and sys.stderr.isatty(), data_dir=args.data_dir, kv_cache=kv,
                      pivot_model=pivot)
    if args.json:
        print(json.dumps(result.to_dict(), indent=2))
    else:
        print_table(result_rows(result))
    return 0


def _run_tasks(args: argparse.Namespace) -> int:
    from lowbit.errors import LowbitError
    from lowbit.eval.harness import harness_lm, resolve_tasks, run_tasks

    clash = [f for f, on in (("--streamed", args.streamed), ("--reference", args.reference),
                             ("--max-windows", args.max_windows is not None)) if on]
    if clash:
        raise LowbitError(f"--tasks does not take {clash[0]}: lm-eval tasks set their own data")
    names = [t.strip() for t in args.tasks.split(",") if t.strip()]
    if not names:
        raise LowbitError("--tasks is empty; name at least one task (e.g. wikitext_lastword)")
    limit = args.limit
    if limit is not None and (limit <= 0 or (limit >= 1 and limit != int(limit))):
        raise LowbitError(f"--limit {limit:g} must be a whole number of examples, or a fraction in (0, 1)")
    if args.batch_size < 1:
        raise LowbitError(f"--batch-size {args.batch_size} must be at least 1")
    tasks, folders = resolve_tasks(names, args.data_dir)  # checked before the model is loaded
    model, tok = load(model_source(args))
    kv, _ = kv_setup(args, model, tok)
    lm = harness_lm(model, tok, args.batch_size, kv_cache=kv)
    results = run_tasks(lm, tasks, folders, int(limit) if limit is not None and limit >= 1 else limit,
                        args.num_fewshot)
    if args.json:
        print(json.dumps({"model": args.model, "results": results}, indent=2))
    else:
        print_table([(f"{task} {metric}", f"{value:.4f}") for task, metrics in results.items()
                     for metric, value in metrics.items()])
    return 0


def _run_onnx(args: argparse.Namespace) -> int:
    from lowbit.errors import LowbitError
    from lowbit.runtime.onnxrt import evaluate_onnx

    clash = [f for f, on in (("--tasks", args.tasks is not None), ("--streamed", args.streamed),
                             ("--reference", args.reference), ("--kv-cache", args.kv_cache not in (None, "none")),
                             ("--device", args.device != "cpu"), ("--dtype", args.dtype != "float32")) if on]
    if clash:
        raise LowbitError(f"an .onnx model runs in ONNX Runtime on the CPU as exported; it does not take {clash[0]}")
    result = evaluate_onnx(args.model, args.dataset, args.split, args.seqlen, args.max_windows, args.data_dir,
                           progress=not args.json and sys.stderr.isatty())
    if args.json:
        print(json.dumps(result.to_dict(), indent=2))
    else:
        print_table(result_rows(result))
    return 0


def _run_streamed(args: argparse.Namespace) -> int:
    from lowbit.errors import LowbitError
    from lowbit.models.loading import load_tokenizer, parse_dtype
    from lowbit.stream.evaluate import evaluate_streamed

    clash = [f for f, on in (("--reference", args.reference), ("--kv-cache", args.kv_cache not in (None, "none")),
                             ("--device", args.device != "cpu")) if on]
    if clash:
        raise LowbitError(f"--streamed does not take {clash[0]}; evaluate without --streamed for it")
    result = evaluate_streamed(args.model, load_tokenizer(args.model, args.cache), args.dataset, args.split,
                               args.seqlen, args.max_windows, args.data_dir, progress=not args.json and sys.stderr.isatty(),
                               dtype=parse_dtype(args.dtype), cache=args.cache)
    if args.json:
        print(json.dumps(result.to_dict(), indent=2))
    else:
        print_table(result_rows(result))
    return 0


def result_rows(r: Any) -> list[tuple[str, Any]]:
    """The table of one ``EvalResult``."""
    rows: list[tuple[str, Any]] = [
        ("model", r.model),
        ("data", f"{r.dataset}/{r.split}, {r.windows} windows x {r.seqlen} = {r.tokens} tokens"),
        ("perplexity", f"{r.perplexity:.4f}"),
    ]
    if r.kl is not None:
        rows += [(f"KL vs {r.reference}", f"{r.kl:.5f} nats/token"), ("top-1 agreement", f"{100 * r.top1_agreement:.2f}%")]
    if r.kv_cache is not None:
        rows.append(("KV cache", f"{r.kv_cache}, {r.kv_bytes_per_token:,.0f} bytes per token (all layers)"))
    rows += [
        ("throughput", f"{r.tokens_per_s:.1f} tokens/s ({r.seconds:.1f} s)"),
        ("peak RSS", f"{r.peak_rss_mb:.0f} MiB"),
    ]
    if r.peak_device_mb is not None:
        rows.append(("peak device memory", f"{r.peak_device_mb:.0f} MiB"))
    rows.append(("device / dtype", f"{r.device} / {r.dtype}"))
    return rows
