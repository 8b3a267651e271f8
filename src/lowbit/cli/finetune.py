"""``lowbit finetune MODEL --method peqa --data D --steps N --out DIR``: tune a quantized model on text.

PEQA: the model's integer codes stay frozen and only their scales train (next-token loss on windows of
``--data``, never a test split); DIR gets the task's scales (``peqa_task.safetensors``, a few hundred KB
that ``lowbit.qat.peqa.load_task`` swaps into the same quantized model) and ``finetune.json``.  With
``--eval-windows K``, perplexity on K windows of WikiText-2 test before and after."""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import time
from pathlib import Path
from typing import Any

from lowbit.cli.display import print_table
from lowbit.cli.options import (
    add_data_dir_option,
    add_dtype_option,
    add_json_option,
    add_model_options,
    add_overwrite_option,
    model_source,
)
from lowbit.errors import LowbitError
from lowbit.outputs import check_output

TASK_FILE = "peqa_task.safetensors"


def add_parser(sub: Any) -> None:
    p = sub.add_parser("finetune", help="tune a quantized model on text (PEQA: its scales only)")
    add_model_options(p)
    p.add_argument("--method", default="peqa", choices=["peqa"])
    p.add_argument("--data", default="wikitext2", help="training text: wikitext2 or ptb (validation), c4, or a "
                                                       ".txt/.jsonl file")
    p.add_argument("--steps", type=int, required=True)
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--batch-size", type=int, default=4, help="windows per optimizer step")
    p.add_argument("--seqlen", type=int, default=512, help="training window length")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--eval-windows", type=int, default=0, help="perplexity on this many WikiText-2 test windows "
                                                               "of 2048 before and after (0: none)")
    p.add_argument("--checkpoint", default=None, metavar="FILE",
                   help="training state written here every --save-every steps (atomic), for --resume")
    p.add_argument("--save-every", type=int, default=0, metavar="K")
    p.add_argument("--resume", action="store_true", help="continue from --checkpoint (same arguments): ends "
                                                        "bit-identical to an uninterrupted run")
    p.add_argument("--out", required=True, help="directory for the task's scales and finetune.json")
    add_overwrite_option(p)
    add_dtype_option(p)
    add_data_dir_option(p)
    add_json_option(p)
    p.set_defaults(func=run)


def _check(args: argparse.Namespace) -> Path:
    for name in ("steps", "batch_size", "seqlen"):
        if getattr(args, name) < 1:
            raise LowbitError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(args, name)}")
    if not args.lr > 0:
        raise LowbitError(f"--lr must be positive, got {args.lr}")
    if args.eval_windows < 0 or args.save_every < 0:
        raise LowbitError("--eval-windows and --save-every must be 0 or more")
    if (args.resume or args.save_every) and not args.checkpoint:
        raise LowbitError("--resume and --save-every need --checkpoint FILE (where the training state lives)")
    if args.resume and not Path(args.checkpoint).is_file():
        raise LowbitError(f"--resume: no checkpoint at {args.checkpoint}; drop --resume to start over")
    if args.checkpoint and not args.resume:
        check_output(args.checkpoint, "file", args.overwrite, [args.model], "--checkpoint")
    return check_output(args.out, "dir", args.overwrite, [args.model], "--out")


def run(args: argparse.Namespace) -> int:
    from lowbit.atomic import allow_replace, atomic_dir
    from lowbit.data import get_calibration
    from lowbit.eval.perplexity import evaluate
    from lowbit.experiment import load
    from lowbit.qat.peqa import prepare_peqa, save_task
    from lowbit.qat.train import train_next_token

    out = _check(args)
    if args.data_dir:
        os.environ["LOWBIT_DATA_DIR"] = args.data_dir
    model, tok = load(model_source(args))
    layers = prepare_peqa(model)
    windows = get_calibration(args.data, tok, nsamples=args.steps * args.batch_size, seqlen=args.seqlen,
                              seed=args.seed)

    def ppl() -> float | None:
        if not args.eval_windows:
            return None
        return evaluate(model, tok, "wikitext2", "test", 2048, args.eval_windows).perplexity

    before = ppl()
    t0 = time.perf_counter()
    result = train_next_token(model, windows, args.steps, args.lr, args.batch_size, args.seed,
                              checkpoint=args.checkpoint, every=args.save_every, resume=args.resume)
    seconds = time.perf_counter() - t0
    after = ppl()
    summary = {"method": args.method, "model": str(args.model), "data": args.data, "steps": args.steps,
               "tokens": result.tokens, "trained_params": result.trained_params, "layers": len(layers),
               "seconds": seconds, "resumed_at_step": result.resumed_at, "loss_first": result.losses[0], "loss_last": result.losses[-1],
               "perplexity_before": before, "perplexity_after": after, "eval_windows": args.eval_windows}
    with allow_replace(out) if args.overwrite else contextlib.nullcontext(), atomic_dir(out) as tmp:
        summary["task_bytes"] = save_task(model, tmp / TASK_FILE)
        (tmp / "finetune.json").write_text(json.dumps(summary, indent=2))
    if args.json:
        print(json.dumps(summary, indent=2))
    else:
        print_table([(k, v) for k, v in summary.items()])
    return 0

