"""``lowbit generate MODEL PROMPT``: greedy text continuation (also for exported checkpoints)."""

from __future__ import annotations

import argparse
from typing import Any

from lowbit.cli.options import add_dtype_option, add_kv_options, add_model_options, kv_setup, model_source
from lowbit.experiment import load


def add_parser(sub: Any) -> None:
    p = sub.add_parser("generate", help="greedy text continuation (also for exported checkpoints)")
    add_model_options(p)
    p.add_argument("prompt")
    p.add_argument("--max-new-tokens", type=int, default=64)
    add_dtype_option(p)
    add_kv_options(p)
    p.add_argument("--prefill-chunk", type=int, default=None, metavar="N",
                   help="prefill the prompt N tokens at a time (bounds activation memory for long prompts)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from lowbit.runtime.onnxrt import is_onnx_path
    from lowbit.runtime.speed import generate_text

    if is_onnx_path(args.model):
        return _run_onnx(args)
    model, tok = load(model_source(args))
    kv, pivot = kv_setup(args, model, tok)
    print(args.prompt + generate_text(model, tok, args.prompt, args.max_new_tokens, kv, pivot,
                                      prefill_chunk=args.prefill_chunk))
    return 0


def _run_onnx(args: argparse.Namespace) -> int:
    from lowbit.errors import LowbitError
    from lowbit.runtime.onnxrt import OnnxDecoder, onnx_generate

    clash = [f for f, on in (("--kv-cache", args.kv_cache not in (None, "none")), ("--dtype", args.dtype != "float32"),
                             ("--prefill-chunk", args.prefill_chunk is not None)) if on]
    if clash:
        raise LowbitError(f"an .onnx model runs in ONNX Runtime as exported; it does not take {clash[0]}")
    decoder = OnnxDecoder(args.model)
    tok = decoder.tokenizer()
    ids = tok(args.prompt)["input_ids"]
    if not ids:
        raise LowbitError("the prompt is empty after tokenization; give some text")
    print(args.prompt + tok.decode(onnx_generate(decoder, ids, args.max_new_tokens, tok.eos_token_id), skip_special_tokens=True))
    return 0
