"""The ``lowbit`` command line: ``lowbit info|eval|quantize ...``."""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from lowbit.cli_common import add_model_options as _add_model_options
from lowbit.cli_common import parse_options as _parse_options
from lowbit.cli_common import print_table
from lowbit.errors import LowbitError
from lowbit.export import FORMATS
from lowbit.outputs import check_output, input_paths


def _fmt_bytes(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{n} B"
        n /= 1024  # type: ignore[assignment]
    return f"{n} B"


def _add_overwrite_option(p: argparse.ArgumentParser) -> None:
    p.add_argument("--overwrite", action="store_true",
                   help="replace the output even when lowbit did not write it (a non-empty directory is deleted "
                        "first; the working directory, home, the input and their parents never are)")


def cmd_info(args: argparse.Namespace) -> int:
    from lowbit.models.info import model_info

    info = model_info(args.model, args.cache)
    if args.json:
        print(json.dumps(info.to_dict(), indent=2))
        return 0
    print_table([
        ("model", info.ref),
        ("source", f"{info.kind} {info.path or ''}".strip()),
        ("architecture", f"{info.architecture} ({info.model_type})"),
        ("layers", info.layers),
        ("hidden size", info.hidden_size),
        ("heads (kv)", f"{info.attention_heads} ({info.kv_heads})"),
        ("vocab", info.vocab_size),
        ("context", info.context),
        ("parameters", f"{info.parameters:,}"),
        ("dtype", info.dtype),
        ("tensor types", ", ".join(f"{k}: {v}" for k, v in info.tensor_types.items())),
        ("size on disk", _fmt_bytes(info.size_on_disk)),
        ("bits per weight", f"{info.bits_per_weight:.3f}" if info.bits_per_weight else "n/a"),
    ])
    return 0


def _eval_rows(r: Any) -> list[tuple[str, Any]]:
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


def _pivot_model(args: argparse.Namespace) -> Any:
    """The full-precision model named by ``--pivot-model`` (IntactKV), or None."""
    if not args.pivot_model:
        return None
    from lowbit.models.loading import load_model

    return load_model(args.pivot_model, dtype=args.dtype, cache=args.cache)[0]


def _ready_kv(model: Any, tok: Any, setting: Any, source: str, windows: Any = None) -> Any:
    """The KV-cache setting to use, KVQuant's level tables fitted now when it needs them (told on stderr)."""
    from lowbit.kvcache.calibrate import ready_kv_setting

    return ready_kv_setting(model, tok, setting, source, windows, log=lambda m: print(m, file=sys.stderr))


def cmd_eval(args: argparse.Namespace) -> int:
    from lowbit.eval.perplexity import evaluate
    from lowbit.models.loading import load_model

    model, tok = load_model(args.model, dtype=args.dtype, device=args.device, cache=args.cache,
                            trust_remote_code=args.trust_remote_code)
    reference = None
    if args.reference:
        reference, _ = load_model(args.reference, dtype=args.dtype, device=args.device, cache=args.cache,
                                  trust_remote_code=args.trust_remote_code)
    pivot = _pivot_model(args)
    kv = _ready_kv(model, tok, args.kv_cache, args.kv_calib)
    result = evaluate(model, tok, args.dataset, args.split, args.seqlen, args.max_windows, reference,
                      progress=not args.json and sys.stderr.isatty(), data_dir=args.data_dir, kv_cache=kv,
                      pivot_model=pivot)
    if args.json:
        print(json.dumps(result.to_dict(), indent=2))
    else:
        print_table(_eval_rows(result))
    return 0


def _recipe_from_args(args: argparse.Namespace) -> Any:
    from lowbit.recipe import load_recipe, recipe_from_flags

    if args.recipe and args.method:
        raise LowbitError("pass either --recipe or --method/--bits/--group-size, not both")
    if args.recipe:
        if args.activations:
            raise LowbitError("--activations goes with --method; a recipe names its activation spec per entry")
        recipe = load_recipe(args.recipe)
    else:
        recipe = recipe_from_flags(args.method or "rtn", args.bits, args.group_size, not args.asym,
                                   _parse_options(args.option), args.activations)
    if args.kv_cache:
        from lowbit.kvcache import kv_setting

        recipe.kv_cache = kv_setting(None, args.kv_cache)
    return recipe


def _quant_rows(report: Any, before: Any, after: Any, out: str | None) -> list[tuple[str, Any]]:
    rows: list[tuple[str, Any]] = [
        ("recipe", report.recipe["name"]),
        ("layers quantized", f"{len(report.layers)} ({report.quantized_params:,} weights)"),
        ("bits per weight", f"{report.bits_per_weight:.3f} (quantized linears, scales/zeros/outliers included)"),
        ("model bits per weight", f"{report.model_bits_per_weight:.3f} (all parameters)"),
        ("calibration", f"{report.calib_tokens:,} tokens"),
        ("mean output error", f"{report.mean_output_error():.3e}" if report.mean_output_error() is not None else "n/a"),
        ("quantization time", f"{report.seconds:.1f} s"),
        ("peak RSS", f"{report.peak_rss_mb:.0f} MiB"),
    ]
    if before is not None and after is not None:
        delta = 100 * (after.perplexity / before.perplexity - 1)
        rows += [
            ("eval data", f"{after.dataset}/{after.split}, {after.windows} windows x {after.seqlen}"),
            ("perplexity before", f"{before.perplexity:.4f}"),
            ("perplexity after", f"{after.perplexity:.4f} ({delta:+.2f}%)"),
        ]
    if out:
        rows.append(("written to", out))
    return rows


def _check_quantize_outputs(args: argparse.Namespace) -> None:
    """``--out`` and ``--sensitivity`` are safe to write (nothing of the user's is lost), before any work."""
    if args.out is not None:
        inputs = input_paths(args.model, args.recipe, args.calib, args.eval_dataset, args.data_dir, cache=args.cache)
        check_output(args.out, "dir", args.overwrite, inputs, "--out")
    if args.sensitivity is not None:
        check_output(args.sensitivity, "results", option="--sensitivity")
        if args.out is not None:
            out, sens = Path(args.out).resolve(), Path(args.sensitivity).resolve()
            if out == sens or out in sens.parents or sens in out.parents:
                raise LowbitError(f"--sensitivity {args.sensitivity} and --out {args.out} overlap: the checkpoint "
                                  "would replace the sensitivity results (or the reverse); give them separate folders")


def cmd_quantize(args: argparse.Namespace) -> int:
    from lowbit.data import get_calibration
    from lowbit.data.windows import check_batch_size
    from lowbit.eval.perplexity import check_seqlen, evaluate
    from lowbit.models.loading import load_model
    from lowbit.quantization import quantize, save_quantized
    from lowbit.recipe import resolve_targets

    check_batch_size(args.batch_size, "--batch-size")
    mixed = args.target_bpw is not None or args.target_mb is not None  # per-layer formats by sensitivity
    _check_quantize_outputs(args)
    if mixed:
        from lowbit.analysis.mixed import check_cli_args, recipe_for_cli, summary_rows

        check_cli_args(args)
    recipe = None if mixed else _recipe_from_args(args)
    model, tok = load_model(args.model, dtype=args.dtype, device=args.device, cache=args.cache,
                            trust_remote_code=args.trust_remote_code)
    if recipe is not None:
        targets = resolve_targets(model, recipe)  # every recipe error surfaces before any work
        if args.out and args.format == "compressed-tensors":
            from lowbit.export.compressed_tensors import conv1d_problem

            problem = conv1d_problem(model, targets)
            if problem is not None:
                raise LowbitError(f"cannot write compressed-tensors: {problem} (--format fake-quant)")
    check_seqlen(model, args.seqlen)
    if args.eval:
        check_seqlen(model, args.eval_seqlen)
    calib = get_calibration(args.calib, tok, args.nsamples, args.seqlen, args.seed, model=model)
    progress = not args.json and sys.stderr.isatty()
    allocation = None
    if mixed:  # validates the target and candidates first, then measures sensitivity and allocates
        recipe, allocation = recipe_for_cli(args, model, tok, calib, progress)
    ev = dict(dataset=args.eval_dataset, split=args.eval_split, seqlen=args.eval_seqlen,
              max_windows=args.max_windows, progress=progress, data_dir=args.data_dir)
    before = evaluate(model, tok, kv_cache="none", **ev) if args.eval else None
    report = quantize(model, recipe, calib, batch_size=args.batch_size, progress=progress)
    if allocation is not None:
        report.extra["mixed_precision"] = allocation
    if recipe.kv_cache is not None and not recipe.kv_cache.calibrated:  # KVQuant levels, on the quantized model
        recipe.kv_cache = _ready_kv(model, tok, recipe.kv_cache, args.calib, calib)
        report.recipe["kv_cache"] = recipe.kv_cache.to_dict()
    model.lowbit_kv_cache = recipe.kv_cache  # evaluation after quantization reads the recipe's KV cache
    after = evaluate(model, tok, **ev) if args.eval else None
    if after is not None and before is not None:
        report.extra["eval"] = {"before": before.to_dict(), "after": after.to_dict()}
    if args.out is not None:
        _, written = save_quantized(model, tok, report, args.out, args.format, overwrite=args.overwrite)
        report.extra["format"] = written
    if args.json:
        print(json.dumps({k: v for k, v in report.to_dict().items() if k != "layers"} | {"out": args.out}, indent=2))
    else:
        print_table(_quant_rows(report, before, after, args.out) + (summary_rows(allocation) if allocation else []))
    return 0


def cmd_sweep(args: argparse.Namespace) -> int:
    from lowbit.analysis.executors import make_executor
    from lowbit.analysis.sweep import SweepData, expand, parse_group, parse_list, run_sweep

    configs = expand(parse_list(args.methods, "method"), parse_list(args.bits, "bits", int),
                     parse_list(args.group_sizes, "group size", parse_group))
    check_output(args.out, "results", option="--out")
    data = SweepData(args.calib, args.nsamples, args.seqlen, args.seed, args.eval_dataset, args.eval_seqlen,
                     args.max_windows)
    threads = args.threads or max(1, (os.cpu_count() or 1) // max(args.workers, 1))
    executor = make_executor(args.executor, args.workers, args.ray_address, threads)
    redo = tuple(parse_list(args.redo, "redo")) if args.redo else ()
    sweep = run_sweep(args.model, configs, args.out, executor, data, args.cache, threads, device=args.device,
                      redo=redo)
    failed = [r["config"] for r in sweep["rows"] if r.get("status") != "ok"]
    print(f"wrote {args.out}/sweep.json and sweep.md ({len(sweep['rows'])} configurations"
          + (f"; failed: {', '.join(failed)}" if failed else "") + ")")
    return 0


def cmd_generate(args: argparse.Namespace) -> int:
    from lowbit.models.loading import load_model
    from lowbit.runtime.speed import generate_text

    model, tok = load_model(args.model, dtype=args.dtype, cache=args.cache)
    kv = _ready_kv(model, tok, args.kv_cache, args.kv_calib)
    print(args.prompt + generate_text(model, tok, args.prompt, args.max_new_tokens, kv, _pivot_model(args),
                                             prefill_chunk=args.prefill_chunk))
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    from lowbit.data.windows import tokenize_text
    from lowbit.models.info import model_info
    from lowbit.models.loading import load_model
    from lowbit.runtime.speed import measure_speed

    info = model_info(args.model, args.cache)
    model, tok = load_model(args.model, dtype=args.dtype, cache=args.cache)
    text = "The quick brown fox jumps over the lazy dog. " * (1 + args.prompt_tokens // 8)
    ids = tokenize_text(tok, text)[: args.prompt_tokens].unsqueeze(0)
    res = measure_speed(model, ids, args.new_tokens, args.repeats)
    row = res.to_dict() | {"model": args.model, "size_on_disk": info.size_on_disk,
                           "bits_per_weight": info.bits_per_weight}
    if args.json:
        print(json.dumps(row, indent=2))
        return 0
    print_table([
        ("model", args.model),
        ("prefill", f"{res.prefill_tokens_per_s:.1f} tokens/s ({res.prompt_tokens}-token prompt)"),
        ("decode", f"{res.decode_tokens_per_s:.1f} tokens/s ({res.new_tokens} greedy steps, KV cache)"),
        ("weights in memory", _fmt_bytes(res.weight_bytes)),
        ("peak RSS", f"{res.peak_rss_mb:.0f} MiB"),
        ("size on disk", _fmt_bytes(info.size_on_disk)),
        ("bits per weight", f"{info.bits_per_weight:.3f}" if info.bits_per_weight else "n/a"),
        ("packed kernels (decode)", ", ".join(f"{k}: {v}" for k, v in res.kernels.items()) or "none"),
        ("threads", res.threads),
    ])
    return 0


def _export_gguf(model: Any, tok: Any, args: argparse.Namespace) -> int:
    from lowbit.export.gguf import export_gguf

    report = export_gguf(model, tok, args.output, args.type, args.embed_type)
    worst = max(report.tensors, key=lambda r: r.rel_error)
    requant = [r for r in report.tensors if not r.exact and r.type == args.type]
    rows = [("format", f"gguf {args.type} (embeddings {args.embed_type})"), ("written to", str(report.path)),
            ("size on disk", _fmt_bytes(report.path.stat().st_size)),
            ("tensors kept code for code", f"{report.exact_count} of {len(report.tensors)}"),
            ("re-quantized by llama.cpp rules", str(len(requant))),
            ("largest relative error", f"{worst.rel_error:.2e} ({worst.name}{': ' + worst.note if worst.note else ''})")]
    print_table(rows)
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from lowbit.export.codes import attach_codes
    from lowbit.models.loading import load_model
    from lowbit.quantization import SUMMARY_FILE, save_quantized

    src = Path(args.input)
    if not src.is_dir():
        raise LowbitError(f"{src} is not a directory; give the --out directory of 'lowbit quantize'")
    check_output(args.output, "file" if args.format == "gguf" else "dir", args.overwrite, [src], "OUTPUT")
    model, tok = load_model(src, dtype=args.dtype, require_tokenizer=False)
    attach_codes(model, src)
    if args.format == "gguf":
        return _export_gguf(model, tok, args)
    extra = {n: (src / n).read_text() for n in ("recipe.yaml", SUMMARY_FILE) if (src / n).is_file()}
    out, written = save_quantized(model, tok, None, args.output, args.format, extra, overwrite=args.overwrite)
    size = sum(f.stat().st_size for f in Path(out).rglob("*") if f.is_file())
    print_table([("format", written), ("written to", str(out)), ("size on disk", _fmt_bytes(size))])
    return 0


def _add_compress_options(p: argparse.ArgumentParser) -> None:
    """The options of ``quantize`` and ``compress`` (one recipe run: calibrate, compress, evaluate, save)."""
    _add_model_options(p)
    p.add_argument("--recipe", default=None, help="shipped recipe name (e.g. gptq-w4g64) or a YAML file")
    p.add_argument("--method", default=None, help="method for a one-entry recipe (rtn, gptq, ...)")
    p.add_argument("--bits", type=int, default=4)
    p.add_argument("--group-size", type=int, default=None, help="group size (default: per channel)")
    p.add_argument("--asym", action="store_true", help="asymmetric (zero point) instead of symmetric")
    p.add_argument("--option", action="append", default=[], metavar="KEY=VALUE", help="method option, repeatable")
    p.add_argument("--activations", default=None, metavar="PRESET",
                   help="also quantize the layers' inputs (A8_TOKEN, A4_TOKEN, A8_TENSOR, FP8_E4M3_TOKEN ...)")
    target = p.add_mutually_exclusive_group()
    target.add_argument("--target-bpw", type=float, default=None, metavar="BPW",
                        help="mixed precision: pick each layer's format from --candidates by measured sensitivity so the "
                             "quantized linears average at most BPW bits per weight (scales/zeros included); "
                             "--method quantizes them (default gptq), --bits/--group-size are not used")
    target.add_argument("--target-mb", type=float, default=None, metavar="MB",
                        help="mixed precision with a size budget: MB (10^6 bytes) of the quantized linears")
    p.add_argument("--candidates", default="2:64,3:64,4:64,8", metavar="BITS[:GROUP],...",
                   help="formats --target-bpw/--target-mb choose from (no group: per channel; --asym applies)")
    p.add_argument("--sensitivity", default=None, metavar="DIR",
                   help="results directory: reuse its sensitivity.json (same model and candidates), else write it there")
    p.add_argument("--kv-cache", default=None, metavar="PRESET",
                   help="KV-cache setting saved with the model and used by --eval after quantization (overrides the recipe's)")
    p.add_argument("--calib", default="wikitext2", help="wikitext2, ptb, c4, selfgen or a .txt/.jsonl file")
    p.add_argument("--nsamples", type=int, default=128)
    p.add_argument("--seqlen", type=int, default=512, help="calibration window length")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch-size", type=int, default=8, help="calibration windows per forward pass")
    p.add_argument("--eval", action="store_true", help="perplexity before and after")
    p.add_argument("--eval-dataset", default="wikitext2")
    p.add_argument("--eval-split", default="test")
    p.add_argument("--eval-seqlen", type=int, default=2048)
    p.add_argument("--max-windows", type=int, default=None, help="evaluate only the first N windows")
    p.add_argument("--data-dir", default=None, help="local data directory (default $LOWBIT_DATA_DIR)")
    p.add_argument("--out", default=None, help="write the quantized model + summary here (a new directory, or one "
                                               "lowbit wrote, which is replaced)")
    _add_overwrite_option(p)
    p.add_argument("--format", default="auto", choices=["auto", *FORMATS],
                   help="checkpoint format for --out (auto: compressed-tensors when every layer fits, else fake-quant)")
    p.add_argument("--dtype", default="float32")
    p.add_argument("--device", default="cpu")
    p.add_argument("--trust-remote-code", action="store_true")
    p.add_argument("--json", action="store_true", help="print JSON")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lowbit", description="Compress LLMs and measure what it costs.")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("info", help="architecture, parameter count, size on disk and bits per weight")
    _add_model_options(p)
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(func=cmd_info)

    p = sub.add_parser("eval", help="perplexity (GPTQ convention), KL/top-1 vs a reference, speed, memory")
    _add_model_options(p)
    p.add_argument("--dataset", default="wikitext2", help="wikitext2, ptb, c4 or a .txt/.jsonl path")
    p.add_argument("--split", default="test")
    p.add_argument("--seqlen", type=int, default=2048)
    p.add_argument("--max-windows", type=int, default=None, help="evaluate only the first N windows")
    p.add_argument("--reference", default=None, help="reference model for KL divergence and top-1 agreement")
    p.add_argument("--data-dir", default=None, help="local data directory (default $LOWBIT_DATA_DIR)")
    p.add_argument("--dtype", default="float32")
    p.add_argument("--device", default="cpu")
    p.add_argument("--trust-remote-code", action="store_true", help="allow model code from the hub (off by default)")
    p.add_argument("--kv-cache", default=None, metavar="PRESET", help="quantized KV cache: a preset (KV8, KV4, KV2, KIVI4, KIVI2, KVQUANT4, ...) or none")
    p.add_argument("--pivot-model", default=None, help="full-precision model giving IntactKV's pivot keys and values")
    p.add_argument("--kv-calib", default="wikitext2",
                   help="data for calibrating KVQuant's level tables when the KV preset needs them (16 x 512 tokens)")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(func=cmd_eval)

    for command, text in (("quantize", "quantize a model with a recipe (or --method/--bits/--group-size)"),
                          ("compress", "run any recipe of compression steps (staged: pruning, scaling, rounding ...); "
                                       "the same options as quantize")):
        p = sub.add_parser(command, help=text)
        _add_compress_options(p)
        p.set_defaults(func=cmd_quantize)

    p = sub.add_parser("generate", help="greedy text continuation (also for exported checkpoints)")
    _add_model_options(p)
    p.add_argument("prompt")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--dtype", default="float32")
    p.add_argument("--kv-cache", default=None, metavar="PRESET", help="quantized KV cache: a preset (KV8, KV4, KV2, KIVI4, KIVI2, KVQUANT4, ...) or none")
    p.add_argument("--pivot-model", default=None, help="full-precision model giving IntactKV's pivot keys and values")
    p.add_argument("--kv-calib", default="wikitext2",
                   help="data for calibrating KVQuant's level tables when the KV preset needs them (16 x 512 tokens)")
    p.add_argument("--prefill-chunk", type=int, default=None, metavar="N",
                   help="prefill the prompt N tokens at a time (bounds activation memory for long prompts)")
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser("bench", help="prefill / decode tokens/s, memory, size on disk, bits per weight")
    _add_model_options(p)
    p.add_argument("--prompt-tokens", type=int, default=128)
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--dtype", default="float32")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(func=cmd_bench)

    p = sub.add_parser("sweep", help="quantize + evaluate every method x bits x group size on the same data; resumable")
    _add_model_options(p)
    p.add_argument("--methods", required=True, help="comma-separated weight methods, e.g. rtn,gptq,awq,hqq")
    p.add_argument("--bits", default="8,4,3,2", help="comma-separated bit widths (default 8,4,3,2)")
    p.add_argument("--group-sizes", default="64", help="comma-separated group sizes, 'channel' for per channel (default 64)")
    p.add_argument("--out", required=True, help="results directory (sweep.json, sweep.md); re-running resumes")
    p.add_argument("--calib", default="wikitext2")
    p.add_argument("--nsamples", type=int, default=128)
    p.add_argument("--seqlen", type=int, default=512)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--eval-dataset", default="wikitext2")
    p.add_argument("--eval-seqlen", type=int, default=2048)
    p.add_argument("--max-windows", type=int, default=10, help="evaluation windows (a fixed prefix of the test split)")
    p.add_argument("--executor", choices=["local", "ray"], default="local",
                   help="local worker processes, or Ray tasks (extra 'ray')")
    p.add_argument("--ray-address", default=None, help="Ray cluster to join (default: start a local Ray instance)")
    p.add_argument("--workers", type=int, default=1, help="configurations run at once on this machine")
    p.add_argument("--threads", type=int, default=None, help="torch threads per configuration (default: cores / workers)")
    p.add_argument("--device", default="cpu", help="where each configuration quantizes and evaluates (cpu, cuda, cuda:N)")
    p.add_argument("--redo", default=None, metavar="NAMES",
                   help="comma-separated configurations (e.g. awq-w4g64) or methods (awq) to run again though finished")
    p.set_defaults(func=cmd_sweep)

    p = sub.add_parser("export", help="rewrite a quantized checkpoint in another format")
    p.add_argument("input", help="a directory written by 'lowbit quantize --out' or 'lowbit export'")
    p.add_argument("output", metavar="OUTPUT", help="directory (a .gguf file for --format gguf) to write; an output "
                                                    "lowbit wrote before is replaced atomically")
    _add_overwrite_option(p)
    p.add_argument("--format", default="compressed-tensors", choices=[*FORMATS, "gguf"])
    p.add_argument("--type", default="Q4_0", help="GGUF type of the linear weights (Q8_0, Q4_0, Q4_1, Q5_0, Q5_1, F16, F32)")
    p.add_argument("--embed-type", default="Q8_0", help="GGUF type of the token embedding / untied output head")
    p.add_argument("--dtype", default="float32")
    p.set_defaults(func=cmd_export)
    from lowbit.analysis.cli_analysis import add_analyze_parser, add_report_parser

    add_analyze_parser(sub)
    add_report_parser(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point: user errors print one line and exit 2, never a traceback."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except LowbitError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
