"""``lowbit finetune MODEL --method qlora|lora|peqa|qat --data D --steps N --out DIR``: tune a model on text.

A thin wrapper over ``lowbit.finetune.finetune`` (what each method writes to DIR is described there):
next-token loss on windows of ``--data`` (never a test split).  QLoRA / LoRA write a peft adapter
(``DIR/adapter``; ``--merge`` also a merged checkpoint), PEQA the task's scales, QAT a lowbit quantized
checkpoint.  A progress line (loss, tokens/s, ETA) goes to stderr on a terminal; stdout holds only the
result (``--json``: one JSON object).  With ``--eval-windows K``, perplexity on K windows of WikiText-2
test before and after."""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import TYPE_CHECKING, Any

from lowbit.cli.display import print_table
from lowbit.cli.options import (
    add_data_dir_option,
    add_dtype_option,
    add_json_option,
    add_model_options,
    add_overwrite_option,
    model_source,
)

if TYPE_CHECKING:  # torch loads when the command runs, not when the parser is built
    from lowbit.qat.tuning import TuneConfig


def add_parser(sub: Any) -> None:
    p = sub.add_parser("finetune", help="tune a model on text: QLoRA / LoRA adapters, PEQA scales or full QAT")
    add_model_options(p)
    p.add_argument("--method", default="peqa", metavar="{qlora,lora,peqa,qat}",
                   help="qlora: adapters on an NF4 base; lora: adapters on the base as loaded; peqa: the scales of "
                        "a quantized model; qat: quantization-aware training to --spec (default peqa)")
    p.add_argument("--data", default="wikitext2", help="training text: wikitext2 or ptb (validation), c4, or a "
                                                       ".txt/.jsonl file")
    p.add_argument("--steps", type=int, required=True)
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--batch-size", type=int, default=4, help="windows per optimizer step")
    p.add_argument("--seqlen", type=int, default=512, help="training window length")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--optim", default="adamw", help="adamw, adamw8bit or adamw4bit (optimizer state precision)")
    p.add_argument("--rank", type=int, default=16, help="LoRA rank (lora, qlora)")
    p.add_argument("--alpha", type=float, default=None, help="LoRA alpha (default 2 x rank)")
    p.add_argument("--targets", default=None, help="comma-separated module names that get adapters (default: every "
                                                   "q/k/v/o/gate/up/down projection)")
    p.add_argument("--spec", default="W4_G64", help="qat: the format trained to (a preset such as W4_G64, W3_G64, NF4, "
                                                    "or a YAML mapping of QuantSpec fields); --merge requantized: the "
                                                    "format the merged weights round to")
    p.add_argument("--ranges", default="auto", choices=["auto", "learned", "minmax"],
                   help="qat: train the scales and zero points (learned, LSQ) or keep min-max ranges (minmax); auto: "
                        "learned for int group/channel specs, min-max otherwise")
    p.add_argument("--merge", default=None, metavar="{dequantized,requantized}",
                   help="lora/qlora: also write DIR/merged, the adapters folded into the base (dequantized: a plain "
                        "checkpoint; requantized: rounded to --spec)")
    p.add_argument("--gradient-checkpointing", action="store_true",
                   help="recompute each block's activations in the backward pass: less memory, ~1/3 more time")
    p.add_argument("--eval-windows", type=int, default=0, help="perplexity on this many WikiText-2 test windows "
                                                               "of 2048 before and after (0: none)")
    p.add_argument("--checkpoint", default=None, metavar="FILE",
                   help="training state written here every --save-every steps (atomic), for --resume")
    p.add_argument("--save-every", type=int, default=0, metavar="K")
    p.add_argument("--resume", action="store_true", help="continue from --checkpoint (same arguments): ends "
                                                        "bit-identical to an uninterrupted run")
    p.add_argument("--out", required=True, help="output directory (adapter, task scales or quantized checkpoint, "
                                                "with finetune.json)")
    add_overwrite_option(p)
    add_dtype_option(p)
    add_data_dir_option(p)
    add_json_option(p)
    p.set_defaults(func=run)


def _config(args: argparse.Namespace) -> TuneConfig:
    from lowbit.qat.tuning import LORA_TARGETS, TuneConfig

    return TuneConfig(method=args.method, steps=args.steps, lr=args.lr, batch_size=args.batch_size, seed=args.seed,
                      rank=args.rank, alpha=args.alpha, targets=args.targets or LORA_TARGETS, spec=args.spec,
                      optimizer=args.optim, learn_range={"auto": None, "learned": True, "minmax": False}[args.ranges],
                      merge=args.merge, checkpoint=args.checkpoint, every=args.save_every, resume=args.resume,
                      gradient_checkpointing=args.gradient_checkpointing)


class ProgressLine:
    """``train_next_token``'s progress callback as one tqdm line on ``file``: step, loss, tokens/s, ETA."""

    def __init__(self, file: Any = None) -> None:
        self.file = file if file is not None else sys.stderr
        self.bar: Any = None

    def __call__(self, step: int, steps: int, loss: float, tokens: int, seconds: float) -> None:
        from tqdm import tqdm

        if self.bar is None:
            self.bar = tqdm(total=steps, initial=step - 1, file=self.file, desc="finetune", unit="step",
                            dynamic_ncols=True, leave=False)
        self.bar.update(step - self.bar.n)
        self.bar.set_postfix_str(f"loss {loss:.4f}, {tokens / max(seconds, 1e-9):,.0f} tok/s", refresh=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def run(args: argparse.Namespace) -> int:
    from lowbit.experiment import load
    from lowbit.finetune import check_job, finetune
    from lowbit.outputs import input_paths

    cfg = _config(args)
    inputs = input_paths(args.model, args.data, args.data_dir, cache=args.cache)
    check_job(cfg, args.out, args.overwrite, inputs, args.seqlen, args.eval_windows)
    if args.data_dir:
        os.environ["LOWBIT_DATA_DIR"] = args.data_dir
    model, tok = load(model_source(args))
    progress = ProgressLine() if not args.json and sys.stderr.isatty() else None
    settings = {k: v for k, v in vars(cfg).items() if k != "method"}
    try:
        summary = finetune(model, tok, args.method, args.data, out=args.out, seqlen=args.seqlen,
                           eval_windows=args.eval_windows, overwrite=args.overwrite, progress=progress,
                           inputs=inputs, model_name=str(args.model), **settings)
    finally:
        if progress is not None:
            progress.close()
    if args.json:
        print(json.dumps(summary, indent=2))
    else:
        print_table([(k, v) for k, v in summary.items()])
    return 0
