"""``lowbit bench MODEL``: prefill / decode tokens per second, time to first token, memory, size on disk,
bits per weight; for lowbit's fast runtime, its eager baseline and, where installed, llama.cpp and ONNX
Runtime on the same prompt (each row in a fresh process)."""

from __future__ import annotations

import argparse
import json
from typing import Any

from lowbit.cli.display import fmt_bytes, print_table
from lowbit.cli.options import add_json_option, add_model_options
from lowbit.errors import LowbitError

DEFAULT_ENGINES = "lowbit-fast,lowbit-eager"


def add_parser(sub: Any) -> None:
    from lowbit.runtime.bench import ENGINES

    p = sub.add_parser("bench", help="prefill / decode tokens/s, time to first token, memory: lowbit's runtime, "
                                     "its eager baseline, llama.cpp, ONNX Runtime")
    add_model_options(p)
    p.add_argument("--engines", default=DEFAULT_ENGINES,
                   help=f"comma-separated rows, each in its own process: {', '.join(ENGINES)} "
                        f"(default {DEFAULT_ENGINES}; llamacpp / onnxruntime need --gguf / --onnx or such a MODEL)")
    p.add_argument("--gguf", default=None, help="the same model as a GGUF file, for the llamacpp row")
    p.add_argument("--onnx", default=None, help="the same model as an ONNX file (lowbit export --format onnx)")
    p.add_argument("--prompt-tokens", type=int, default=128)
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--engine-row", default=None, help=argparse.SUPPRESS)  # one row in this process (internal)
    add_json_option(p)
    p.set_defaults(func=run)


def _check(args: argparse.Namespace) -> list[tuple[str, str]]:
    """(engine, file) for every row asked for, checked before any work."""
    from pathlib import Path

    from lowbit.runtime.bench import ENGINES, engine_file

    for flag in ("prompt_tokens", "new_tokens", "repeats"):
        if getattr(args, flag) < 1:
            raise LowbitError(f"--{flag.replace('_', '-')} must be at least 1, got {getattr(args, flag)}")
    engines = [e.strip() for e in args.engines.split(",") if e.strip()]
    unknown = [e for e in engines if e not in ENGINES]
    if unknown or not engines:
        raise LowbitError(f"unknown engine {', '.join(unknown) or '(none)'}: choose from {', '.join(ENGINES)}")
    rows = []
    for e in engines:
        f = engine_file(e, args.model, args.gguf, args.onnx)
        if f is None:
            need = {"llamacpp": "--gguf FILE", "onnxruntime": "--onnx FILE"}.get(e, "a lowbit / HF model, not .onnx")
            raise LowbitError(f"the {e} row needs {need}; pass it or drop {e} from --engines")
        if e in ("llamacpp", "onnxruntime") and not Path(f).is_file():
            raise LowbitError(f"{f} (for the {e} row) does not exist; check the path")
        rows.append((e, f))
    return rows


def run(args: argparse.Namespace) -> int:
    from lowbit.runtime.bench import measure_row, row_in_child

    if args.engine_row:  # a child: one row, JSON on stdout
        row = measure_row(args.engine_row, args.model, args.prompt_tokens, args.new_tokens, args.repeats, args.cache)
        print(json.dumps(row.to_dict()))
        return 0
    rows_asked = _check(args)
    info = None
    if any(e.startswith("lowbit") for e, _ in rows_asked):
        from lowbit.models.info import model_info

        info = model_info(args.model, args.cache)  # a bad model reference fails here, once, before any row
    rows = [row_in_child(e, f, args.prompt_tokens, args.new_tokens, args.repeats, args.cache) for e, f in rows_asked]
    about = {"model": args.model, "size_on_disk": None if info is None else info.size_on_disk,
             "bits_per_weight": None if info is None else info.bits_per_weight}
    if args.json:
        print(json.dumps(about | {"rows": [r.to_dict() for r in rows]}, indent=2))
        return 0
    print(f"{args.model}: {rows[0].prompt_tokens}-token prompt, {rows[0].new_tokens} greedy steps, best of "
          f"{args.repeats}, {rows[0].threads} threads, a fresh process per row")
    if info is not None:
        bpw = f"{info.bits_per_weight:.3f}" if info.bits_per_weight else "n/a"
        print(f"size on disk {fmt_bytes(info.size_on_disk)}, {bpw} bits per weight")
    for r in rows:
        print()
        items = [("engine", r.engine), ("file", r.model),
                 ("decode", f"{r.decode_tokens_per_s:.1f} tokens/s"),
                 ("prefill", f"{r.prefill_tokens_per_s:.1f} tokens/s"),
                 ("time to first token", f"{r.time_to_first_token_ms:.0f} ms"),
                 ("peak RSS", f"{r.peak_rss_mb:.0f} MiB" + ("" if r.imports_rss_mb is None else
                                                           f" ({r.imports_rss_mb:.0f} MiB before loading the model)"))]
        if r.weight_bytes is not None:
            items.append(("weights in memory", fmt_bytes(r.weight_bytes)))
        if r.compile_s is not None:
            items.append(("compile (first run)", f"{r.compile_s:.1f} s"))
        if r.kernels:
            items.append(("packed kernels (decode)", ", ".join(f"{k}: {v}" for k, v in r.kernels.items())))
        if r.note:
            items.append(("note", r.note))
        print_table(items)
    return 0
