"""``lowbit bench MODEL``: prefill / decode tokens per second, memory, size on disk, bits per weight."""

from __future__ import annotations

import argparse
import json
from typing import Any

from lowbit.cli.display import fmt_bytes, print_table
from lowbit.cli.options import add_dtype_option, add_json_option, add_model_options, model_source
from lowbit.experiment import load


def add_parser(sub: Any) -> None:
    p = sub.add_parser("bench", help="prefill / decode tokens/s, memory, size on disk, bits per weight")
    add_model_options(p)
    p.add_argument("--prompt-tokens", type=int, default=128)
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--repeats", type=int, default=3)
    add_dtype_option(p)
    add_json_option(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from lowbit.data.windows import tokenize_text
    from lowbit.models.info import model_info
    from lowbit.runtime.speed import measure_speed

    info = model_info(args.model, args.cache)
    model, tok = load(model_source(args))
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
        ("weights in memory", fmt_bytes(res.weight_bytes)),
        ("peak RSS", f"{res.peak_rss_mb:.0f} MiB"),
        ("size on disk", fmt_bytes(info.size_on_disk)),
        ("bits per weight", f"{info.bits_per_weight:.3f}" if info.bits_per_weight else "n/a"),
        ("packed kernels (decode)", ", ".join(f"{k}: {v}" for k, v in res.kernels.items()) or "none"),
        ("threads", res.threads),
    ])
    return 0
