"""``lowbit distill STUDENT --teacher TEACHER --steps N --out DIR``: train a student (a pruned or smaller model)
to imitate its teacher (``lowbit.distill``) on windows of ``--data`` (never a test split), then save it as a
dense checkpoint with ``distill.json``.  With ``--eval-windows K``, perplexity of the student before and after
(and of the teacher) on K windows of WikiText-2 test."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from lowbit.cli.display import print_table
from lowbit.cli.finetune import ProgressLine
from lowbit.cli.options import add_data_dir_option, add_json_option, add_model_options, add_overwrite_option
from lowbit.errors import LowbitError

SUMMARY = "distill.json"


def add_parser(sub: Any) -> None:
    p = sub.add_parser("distill", help="train a student model to imitate a teacher (logits, hidden states, attention)")
    add_model_options(p)
    p.add_argument("--teacher", required=True, help="the teacher model (e.g. the model before pruning)")
    p.add_argument("--data", default="wikitext2", help="training text: wikitext2 or ptb (validation), c4, or a file")
    p.add_argument("--steps", type=int, required=True)
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--seqlen", type=int, default=512)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--optim", default="adamw", help="adamw, adamw8bit or adamw4bit")
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--logit-weight", type=float, default=1.0)
    p.add_argument("--feature-weight", type=float, default=0.0, help="hidden-state MSE (projected when widths differ)")
    p.add_argument("--attention-weight", type=float, default=0.0, help="attention-map KL (eager attention)")
    p.add_argument("--next-token-weight", type=float, default=0.0)
    p.add_argument("--eval-windows", type=int, default=0, help="WikiText-2 test windows of 2048 evaluated")
    p.add_argument("--out", required=True, help="output directory: the trained student and distill.json")
    add_overwrite_option(p)
    add_data_dir_option(p)
    add_json_option(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import time

    from lowbit.cli.options import model_source
    from lowbit.data.training import training_windows
    from lowbit.distill import DistillConfig, distill
    from lowbit.distill.trainer import check_pair
    from lowbit.eval.perplexity import evaluate
    from lowbit.experiment import load
    from lowbit.outputs import check_output, input_paths
    from lowbit.quantization import save_model_dir

    cfg = DistillConfig(steps=args.steps, lr=args.lr, batch_size=args.batch_size, seed=args.seed,
                        temperature=args.temperature, logit_weight=args.logit_weight,
                        feature_weight=args.feature_weight, attention_weight=args.attention_weight,
                        next_token_weight=args.next_token_weight, optimizer=args.optim)
    if args.eval_windows < 0 or args.seqlen < 2:
        raise LowbitError("--eval-windows must be 0 or more and --seqlen at least 2")
    check_output(args.out, "dir", args.overwrite, input_paths(args.model, args.teacher, args.data, args.data_dir,
                                                              cache=args.cache), "--out")
    student, tok = load(model_source(args))
    teacher, _ = load(model_source(args, args.teacher), require_tokenizer=False)
    check_pair(student, teacher)
    windows = training_windows(args.data, tok, cfg.steps, cfg.batch_size, args.seqlen, cfg.seed)

    def ppl(model: Any) -> float | None:
        if not args.eval_windows:
            return None
        return evaluate(model, tok, "wikitext2", "test", 2048, args.eval_windows, data_dir=args.data_dir).perplexity

    summary: dict[str, Any] = {"student": str(args.model), "teacher": str(args.teacher), "data": args.data,
                               "settings": vars(cfg), "ppl_teacher": ppl(teacher), "ppl_before": ppl(student)}
    progress = ProgressLine() if not args.json and sys.stderr.isatty() else None
    t0 = time.perf_counter()
    try:
        result = distill(student, teacher, windows, cfg, progress)
    finally:
        if progress is not None:
            progress.close()
    summary.update(seconds=time.perf_counter() - t0, tokens=result.tokens, steps=len(result.losses),
                   loss_first=result.mean_loss(first=min(10, len(result.losses))),
                   loss_last=result.mean_loss(last=min(10, len(result.losses))), ppl_after=ppl(student))
    save_model_dir(student, tok, args.out, {SUMMARY: json.dumps(summary, indent=2)}, args.overwrite)
    if args.json:
        print(json.dumps(summary, indent=2))
    else:
        print_table([(k, v) for k, v in summary.items() if k != "settings"])
    return 0
