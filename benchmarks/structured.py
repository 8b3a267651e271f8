"""Structured pruning + distillation on smollm2-135m (issue 19): cut to about 70% of the parameters along width
(MLP channels and hidden size, Minitron's activation importance) or depth (whole blocks, ShortGPT's block
influence), then recover with logit + hidden-state distillation from the dense model.

Each row runs in its own process: dense, width-70, depth-70 (pruned, not trained) and width-70-kd, depth-70-kd
(pruned, then ``--steps`` of distillation on WikiText-2 validation windows: batches of ``--batch-size`` x
``--seqlen``; logit KL + hidden-state MSE, projections where widths differ).  Per row: parameters, perplexity
on the first 10 WikiText-2 test windows of 2048, the share of the pruning gap distillation recovers, the
training tokens and wall time, prefill / decode tok/s (``lowbit.runtime.speed``, 256-token prompt, 64 greedy
tokens; the dense row of the same run is the reference), and whether the saved checkpoint loads in plain
transformers with the same logits.

    python benchmarks/structured.py [--steps 150] [--only width-70-kd]

Writes ``results/structured.json`` and ``structured.md``; finished rows are kept.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time

from _results import run_rows, table_lines

MODEL = "smollm2-135m"
ROWS = ["dense", "width-70", "depth-70", "width-70-kd", "depth-70-kd"]


def run_one(name: str, args: argparse.Namespace) -> dict:
    import torch
    from transformers import AutoModelForCausalLM

    from lowbit.data import get_calibration
    from lowbit.data.training import training_windows
    from lowbit.data.windows import tokenize_text
    from lowbit.distill import DistillConfig, distill
    from lowbit.eval.perplexity import evaluate
    from lowbit.models.loading import load_model
    from lowbit.runtime.speed import measure_speed
    from lowbit.structured import prune_structured
    from lowbit.structured.prune import count_params, plan_for_target

    model, tok = load_model(MODEL)
    row: dict = {"config": name, "params_dense": count_params(model)}
    if name != "dense":
        axis = name.split("-")[0]
        calib = get_calibration("wikitext2", tok, nsamples=args.nsamples, seqlen=512, seed=0)
        plan = plan_for_target(model, args.keep, axis)
        teacher = None
        if name.endswith("-kd"):
            teacher, _ = load_model(MODEL)
        t0 = time.perf_counter()
        rep = prune_structured(model, calib, plan)
        row.update(prune_seconds=time.perf_counter() - t0, config_sizes=rep.config, dropped=rep.dropped)
        if teacher is not None:
            cfg = DistillConfig(steps=args.steps, lr=args.lr, batch_size=args.batch_size, logit_weight=1.0,
                                feature_weight=args.feature_weight)
            windows = training_windows("wikitext2", tok, cfg.steps, cfg.batch_size, args.seqlen, 0)
            t0 = time.perf_counter()
            res = distill(model, teacher, windows, cfg)
            row.update(kd_seconds=time.perf_counter() - t0, kd_tokens=res.tokens, kd_steps=len(res.losses),
                       kd_loss_first=res.mean_loss(first=10), kd_loss_last=res.mean_loss(last=10))
            del teacher
        model.eval()
    row["params"] = count_params(model)
    row["perplexity"] = evaluate(model, tok, "wikitext2", "test", seqlen=2048, max_windows=args.windows).perplexity
    text = "The quick brown fox jumps over the lazy dog. " * 40
    ids = tokenize_text(tok, text)[:256].unsqueeze(0)
    sp = measure_speed(model, ids, 64, 3)
    row.update(prefill_tok_s=sp.prefill_tokens_per_s, decode_tok_s=sp.decode_tokens_per_s)
    with tempfile.TemporaryDirectory() as d:
        model.save_pretrained(d)
        plain = AutoModelForCausalLM.from_pretrained(d).eval()
        probe = ids[:, :64]
        with torch.no_grad():
            row["plain_transformers_max_diff"] = float((plain(probe).logits - model(probe).logits).abs().max())
    return row


def speed_pass(args: argparse.Namespace) -> dict:
    """Prefill / decode tok/s of the dense, width and depth architectures, one after another in this one quiet
    process (speed depends on the shapes only, so a -kd row runs at its pruned base's speed)."""
    from lowbit.data import get_calibration
    from lowbit.data.windows import tokenize_text
    from lowbit.models.loading import load_model
    from lowbit.runtime.speed import measure_speed
    from lowbit.structured import prune_structured
    from lowbit.structured.prune import plan_for_target

    out = {}
    for name in ("dense", "width-70", "depth-70"):
        model, tok = load_model(MODEL)
        if name != "dense":
            calib = get_calibration("wikitext2", tok, nsamples=16, seqlen=512, seed=0)
            prune_structured(model, calib, plan_for_target(model, args.keep, name.split("-")[0]))
        model.eval()
        ids = tokenize_text(tok, "The quick brown fox jumps over the lazy dog. " * 40)[:256].unsqueeze(0)
        sp = measure_speed(model, ids, 64, 5)
        out[name] = {"prefill_tok_s": sp.prefill_tokens_per_s, "decode_tok_s": sp.decode_tokens_per_s}
        print(name, out[name], flush=True)
    return out


def _speed(rows: dict, name: str) -> dict:
    """The row's speed from the quiet speed pass (its pruned base's for a -kd row), else its own measurement."""
    quiet = rows.get("_speed", {}).get(name.removesuffix("-kd"))
    return quiet or {"prefill_tok_s": rows[name]["prefill_tok_s"], "decode_tok_s": rows[name]["decode_tok_s"]}


def _lines(rows: dict) -> list[str]:
    dense = rows.get("dense")
    body = []
    for name in [n for n in ROWS if n in rows]:
        r = rows[name]
        rec = ""
        base = rows.get(name.removesuffix("-kd"))
        if name.endswith("-kd") and base and dense:
            gap = base["perplexity"] - dense["perplexity"]
            rec = f"{100 * (base['perplexity'] - r['perplexity']) / gap:.0f}%" if gap > 0 else ""
        kd = f"{r['kd_tokens']:,} / {r['kd_seconds']:.0f} s" if "kd_tokens" in r else ""
        sp, ref = _speed(rows, name), _speed(rows, "dense") if dense else None
        speed = f"{sp['prefill_tok_s']:.0f} / {sp['decode_tok_s']:.1f}"
        ratio = (f"{sp['prefill_tok_s'] / ref['prefill_tok_s']:.2f}x / {sp['decode_tok_s'] / ref['decode_tok_s']:.2f}x"
                 if ref else "")
        body.append([name, f"{r['params']:,} ({r['params'] / r['params_dense']:.2f})", f"{r['perplexity']:.2f}", rec,
                     kd, speed, ratio, f"{r['plain_transformers_max_diff']:.1e}"])
    caption = [f"# Structured pruning + distillation on {MODEL} (WikiText-2 test, first 10 x 2048 windows)", "",
               "width: MLP intermediate and hidden size shrunk by one ratio (Minitron activation importance); depth:",
               "the blocks of lowest ShortGPT block influence dropped; both to about 70% of the parameters (embeddings",
               "included). -kd: then logit KL + hidden-state MSE distillation from the dense model (every student",
               "parameter trained), on WikiText-2 validation. recovered: the share of the pruning perplexity gap won",
               "back. Speed: prefill / decode tok/s on this CPU (256-token prompt, 64 greedy tokens, best of 5), measured",
               "one after another in one quiet process (--speed; a -kd row has its pruned base's shapes, so its speed),",
               "and the ratio to dense. plain transformers: max |logit diff| of the saved checkpoint loaded by",
               "AutoModelForCausalLM against the in-memory model."]
    header = ["config", "parameters", "perplexity", "gap recovered", "KD tokens / time", "prefill / decode tok/s",
              "vs dense", "plain transformers"]
    return table_lines(caption, header, body)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", nargs="*")
    parser.add_argument("--keep", type=float, default=0.7, help="fraction of the parameters kept")
    parser.add_argument("--steps", type=int, default=150)
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument("--seqlen", type=int, default=512)
    parser.add_argument("--lr", type=float, default=1e-4)
    parser.add_argument("--feature-weight", type=float, default=1.0)
    parser.add_argument("--nsamples", type=int, default=128)
    parser.add_argument("--windows", type=int, default=10)
    parser.add_argument("--speed", action="store_true", help="only the quiet speed pass (updates the table)")
    parser.add_argument("--one", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.speed:
        from _results import RESULTS, write_results

        rows = json.loads((RESULTS / "structured.json").read_text())
        rows["_speed"] = speed_pass(args)
        write_results("structured", rows, _lines(rows))
        return
    if args.one:
        print(json.dumps(run_one(args.one, args)))
        return
    passed = ["--keep", str(args.keep), "--steps", str(args.steps), "--batch-size", str(args.batch_size), "--seqlen",
              str(args.seqlen), "--lr", str(args.lr), "--feature-weight", str(args.feature_weight), "--nsamples",
              str(args.nsamples), "--windows", str(args.windows)]
    run_rows(__file__, "structured", args.only or ROWS, bool(args.only), passed, _lines)

if __name__ == "__main__":
    main()
