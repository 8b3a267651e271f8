"""Fine-tuning on smollm2-135m (issue 18): QLoRA against 16-bit LoRA, and PEQA's swappable task scales.

Part ``lora``: QLoRA (NF4 + double-quant base, 4.127 bits per weight) and LoRA on the fp32 base, each in its
own process, on the same data (random 512-token windows of WikiText-2 validation, batches of 4), steps,
rank (16, alpha 32, every q/k/v/o/gate/up/down projection), learning rate and seed.  Per run: perplexity on
the first 10 WikiText-2 test windows of 2048 before (the adapters off: the NF4 base for QLoRA, the fp32
model for LoRA) and after, wall time and tokens/s of the training, and its memory: the peak RSS of the
training phase (the high-water mark is reset once the model is ready), the peak while loading (the fp32
checkpoint both runs start from, and QLoRA's quantization of it), and the bytes of the base weights (as
stored: NF4 codes at 4 bits; and as held in memory here: one uint8 per code), the trainable parameters and
the optimizer states.

Part ``peqa``: a W4 g64 asymmetric round-to-nearest model (``--recipe``, or a saved quantized checkpoint
``--base``); task 1 trains its scales on WikiText-2 validation, task 2 (from the same base scales) on PTB
validation.  Held-out perplexity on WikiText-2 test and PTB test (10 windows of 2048 each) for the base,
after each task, and after swapping task 1's scales back in (``load_task``), which must give task 1's
numbers exactly; the size of each task file.

Both write ``results/finetune.json`` and ``finetune.md`` (a part run alone keeps the other's rows).
``--dry`` checks the script on a tiny random model with the real tokenizer and data, a few steps and short
windows, and writes nothing.

    python benchmarks/finetune.py --part lora --steps 40      # ~6-8 minutes a run on a 2-core CPU (estimated)
    python benchmarks/finetune.py --part peqa --steps 40
    python benchmarks/finetune.py --dry
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path
from typing import Any

from _results import RESULTS, run_child, write_results

HERE = Path(__file__).resolve()
MODEL = "smollm2-135m"
DRY = {"steps": 2, "batch_size": 2, "seqlen": 32, "eval_windows": 1, "eval_seqlen": 128}


# ------------------------------------------------------------------------------------------ child: helpers
def _load(args: argparse.Namespace, ref: str = MODEL) -> tuple[Any, Any]:
    """The model and tokenizer of ``ref`` (``--dry``: a 2-block random Llama with the model's tokenizer)."""
    import torch

    torch.manual_seed(args.seed)
    if not args.dry:
        from lowbit.experiment import ModelSource, load

        return load(ModelSource(ref))
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from lowbit.models.loading import resolve_model

    tok = AutoTokenizer.from_pretrained(resolve_model(MODEL).path)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048)
    return LlamaForCausalLM(cfg).eval(), tok


def _ppl(model: Any, tok: Any, args: argparse.Namespace, dataset: str = "wikitext2") -> float:
    from lowbit.eval.perplexity import evaluate

    return evaluate(model, tok, dataset, "test", args.eval_seqlen, args.eval_windows).perplexity


class _Log:
    """Progress on stderr about every tenth of the run: step, loss, tokens/s, ETA."""

    def __init__(self, name: str) -> None:
        self.name = name

    def __call__(self, step: int, steps: int, loss: float, tokens: int, seconds: float) -> None:
        if step == steps or step % max(1, steps // 10) == 0:
            eta = seconds / step * (steps - step)
            print(f"{self.name}: step {step}/{steps} loss {loss:.4f} {tokens / seconds:.0f} tok/s ETA {eta:.0f} s",
                  file=sys.stderr, flush=True)


def _settle() -> float | None:
    """Free what can be freed, reset the peak-RSS high-water mark (Linux) and return the RSS now (MiB)."""
    import ctypes
    import gc

    from lowbit.eval.memory import current_rss_mb

    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
        Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS
    except OSError:
        pass
    return current_rss_mb()


def _tensor_bytes(obj: Any) -> int:
    """Bytes of every tensor in ``obj`` (a tensor, or a dataclass holding tensors, recursively)."""
    import torch

    if isinstance(obj, torch.Tensor):
        return obj.numel() * obj.element_size()
    if dataclasses.is_dataclass(obj):
        return sum(_tensor_bytes(getattr(obj, f.name)) for f in dataclasses.fields(obj))
    return 0


def _memory(model: Any, optimizer: str) -> dict[str, float]:
    """MB (10^6 bytes) of the frozen base (as stored, as held), the trainable parameters and the optimizer
    states (built over the trainable parameters and stepped once with zero gradients and lr 0)."""
    import torch

    from lowbit.qat.optim import make_optimizer, state_bytes
    from lowbit.qat.qlora import FrozenQuantLinear

    stored = held = 0.0
    seen: set[int] = set()
    for m in model.modules():
        if isinstance(m, FrozenQuantLinear):
            stored += m.bits_per_weight() * m.in_features * m.out_features / 8
            held += _tensor_bytes(m.qt)
            seen.add(m.qweight.data_ptr())
        for t in [*m.parameters(recurse=False), *m.buffers(recurse=False)]:
            if t is None or t.requires_grad or t.data_ptr() in seen:
                continue
            seen.add(t.data_ptr())
            stored += _tensor_bytes(t)
            held += _tensor_bytes(t)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = make_optimizer(optimizer, params, lr=0.0)
    for p in params:
        p.grad = torch.zeros_like(p)
    opt.step()
    for p in params:
        p.grad = None
    return {"base_mb_stored": stored / 1e6, "base_mb_held": held / 1e6,
            "trainable_mb": sum(_tensor_bytes(p) for p in params) / 1e6, "optimizer_mb": state_bytes(opt) / 1e6}


# ------------------------------------------------------------------------------------------ child: runs
def run_lora(method: str, args: argparse.Namespace) -> dict:
    """One QLoRA or LoRA run in this process."""
    from lowbit.data.training import training_windows
    from lowbit.eval.memory import peak_rss_mb
    from lowbit.qat.tuning import TuneConfig, prepare, train

    model, tok = _load(args)
    windows = training_windows("wikitext2", tok, args.steps, args.batch_size, args.seqlen, args.seed)
    cfg = TuneConfig(method=method, steps=args.steps, lr=args.lr, batch_size=args.batch_size, seed=args.seed,
                     rank=args.rank, optimizer=args.optim, gradient_checkpointing=args.gradient_checkpointing)
    trained, info = prepare(model, cfg)
    load_peak = peak_rss_mb()
    rss_start = _settle()
    t0 = time.perf_counter()
    summary = train(trained, windows, cfg, _Log(method))
    seconds = time.perf_counter() - t0
    row = {"method": method, **info, "peak_rss_load_mb": load_peak, "rss_start_mb": rss_start,
           "peak_rss_train_mb": peak_rss_mb(),
           "train_seconds": seconds, "tokens": summary["tokens"], "tokens_per_s": summary["tokens"] / seconds,
           "trained_params": summary["trained_params"], "loss_first": summary["loss_first"],
           "loss_last": summary["loss_last"]}
    inner = trained.get_base_model()  # the adapters live in it
    row["perplexity_after"] = _ppl(inner, tok, args)
    with trained.disable_adapter():
        row["perplexity_before"] = _ppl(inner, tok, args)  # the base the adapters were trained on
    row |= _memory(trained, args.optim)
    row["peak_rss_process_mb"] = max(load_peak, peak_rss_mb())  # evaluation included
    return row


def run_peqa(args: argparse.Namespace) -> dict:
    """PEQA's two tasks and the swap back, in this process."""
    import tempfile

    from lowbit.data import get_calibration
    from lowbit.data.training import training_windows
    from lowbit.qat.peqa import load_task, prepare_peqa, save_task
    from lowbit.qat.train import train_next_token
    from lowbit.quantization import quantize

    model, tok = _load(args, args.base or MODEL)
    if not args.base:
        quantize(model, args.recipe, get_calibration("wikitext2", tok, 8, min(args.seqlen, 512), args.seed),
                 progress=False)
    layers = prepare_peqa(model)
    corpora = {"wikitext2": "WikiText-2", "ptb": "PTB"}
    states: dict[str, dict] = {}

    def measure(state: str) -> None:
        states[state] = {c: _ppl(model, tok, args, c) for c in corpora}
        print(f"peqa {state}: {states[state]}", file=sys.stderr, flush=True)

    row: dict = {"method": "peqa", "base": args.base or args.recipe, "layers": len(layers), "tasks": {}}
    with tempfile.TemporaryDirectory() as tmp:
        base = Path(tmp) / "base.safetensors"
        save_task(model, base)
        measure("base")
        for i, corpus in enumerate(corpora, 1):
            load_task(model, base)  # each task starts from the quantized model's own scales
            windows = training_windows(corpus, tok, args.steps, args.batch_size, args.seqlen, args.seed)
            t0 = time.perf_counter()
            r = train_next_token(model, windows, args.steps, args.lr, args.batch_size, args.seed,
                                 optimizer=args.optim, progress=_Log(f"peqa task {i}"))
            seconds = time.perf_counter() - t0
            path = Path(tmp) / f"task{i}.safetensors"
            row["tasks"][f"task{i}"] = {"data": f"{corpus} validation", "bytes": save_task(model, path),
                                        "train_seconds": seconds, "tokens_per_s": r.tokens / seconds,
                                        "trained_params": r.trained_params, "loss_first": r.losses[0],
                                        "loss_last": r.losses[-1]}
            measure(f"task{i}")
        load_task(model, Path(tmp) / "task1.safetensors")
        measure("task1_swapped_back")
    row["perplexity"] = states
    row["swap_restores_task1_exactly"] = states["task1_swapped_back"] == states["task1"]
    return row


# ------------------------------------------------------------------------------------------ parent
def _child_args(args: argparse.Namespace) -> list[str]:
    out = ["--steps", str(args.steps), "--rank", str(args.rank), "--seed", str(args.seed),
           "--batch-size", str(args.batch_size), "--seqlen", str(args.seqlen), "--optim", args.optim,
           "--eval-windows", str(args.eval_windows), "--eval-seqlen", str(args.eval_seqlen), "--recipe", args.recipe]
    return (out + (["--base", args.base] if args.base else []) + (["--dry"] if args.dry else [])
            + (["--gradient-checkpointing"] if args.gradient_checkpointing else []))


def _mb(x: float | None) -> str:
    return "" if x is None else f"{x:.0f}"


def _lines(rows: dict) -> list[str]:
    lines = ["# Fine-tuning", ""]
    lora = [rows[m] for m in ("qlora", "lora") if m in rows]
    if lora:
        s = rows["settings_lora"]
        lines += [f"smollm2-135m; {s['steps']} steps of {s['batch_size']} x {s['seqlen']} WikiText-2 validation "
                  f"tokens, lr {s['lr']}, rank {s['rank']} (alpha {2 * s['rank']}), {s['optim']}, seed {s['seed']}"
                  f"{', gradient checkpointing' if s.get('gradient_checkpointing') else ''}; "
                  f"perplexity on the first {s['eval_windows']} WikiText-2 test windows of {s['eval_seqlen']} "
                  "(before: the adapters off). Memory in MB (RSS in MiB); the training peak RSS is the high-water "
                  "mark from the prepared model on (reset there); loading holds the fp32 checkpoint.", "",
                  "| run | base bits/weight | ppl before | ppl after | train s | tok/s | trainable params | "
                  "base MB stored / held | trainable MB | optimizer MB | peak RSS training | RSS at start | "
                  "peak RSS loading |", "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
        for r in lora:
            lines.append(f"| {r['method']} | {r['base_bits_per_weight']:.3f} | {r['perplexity_before']:.3f} | "
                         f"{r['perplexity_after']:.3f} | {r['train_seconds']:.0f} | {r['tokens_per_s']:.0f} | "
                         f"{r['trained_params']:,} | {r['base_mb_stored']:.0f} / {r['base_mb_held']:.0f} | "
                         f"{r['trainable_mb']:.1f} | {r['optimizer_mb']:.1f} | {_mb(r['peak_rss_train_mb'])} | "
                         f"{_mb(r['rss_start_mb'])} | {_mb(r['peak_rss_load_mb'])} |")
    if "peqa" in rows:
        r, s = rows["peqa"], rows["settings_peqa"]
        p = r["perplexity"]
        names = {"base": f"quantized base ({r['base']})", "task1": "after task 1 (WikiText-2)",
                 "task2": "after task 2 (PTB, from the base scales)", "task1_swapped_back": "task 1 swapped back in"}
        t1, t2 = r["tasks"]["task1"], r["tasks"]["task2"]
        lines += ([""] if lora else []) + [
                  f"PEQA: {s['steps']} steps of {s['batch_size']} x {s['seqlen']} validation tokens per task, "
                  f"lr {s['lr']}, {s['optim']}, seed {s['seed']}; held-out perplexity on the first "
                  f"{s['eval_windows']} test windows of {s['eval_seqlen']}. Task files: {t1['bytes']:,} and "
                  f"{t2['bytes']:,} bytes ({t1['trained_params']:,} scales); training {t1['tokens_per_s']:.0f} / "
                  f"{t2['tokens_per_s']:.0f} tok/s.", "",
                  "| state | WikiText-2 test | PTB test |", "|---|---:|---:|"]
        lines += [f"| {names[k]} | {v['wikitext2']:.3f} | {v['ptb']:.3f} |" for k, v in p.items()]
        lines += ["", f"- swapping task 1's scales back restores its numbers exactly: "
                      f"{'yes' if r['swap_restores_task1_exactly'] else 'NO'}"]
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--part", choices=["lora", "peqa", "all"], default="all")
    parser.add_argument("--one", choices=["qlora", "lora", "peqa"], help=argparse.SUPPRESS)  # a child process
    parser.add_argument("--steps", type=int, default=40,
                        help="optimizer steps per run (40 x 2048 tokens: ~6-8 min at 150-300 tok/s; not yet measured)")
    parser.add_argument("--lr", type=float, default=None, help="default 5e-4 (LoRA part), 1e-4 (PEQA)")
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--seqlen", type=int, default=512)
    parser.add_argument("--optim", default="adamw")
    parser.add_argument("--eval-windows", type=int, default=10)
    parser.add_argument("--eval-seqlen", type=int, default=2048)
    parser.add_argument("--recipe", default="rtn-w4g64-asym", help="PEQA's quantized base, made fresh")
    parser.add_argument("--base", default=None, help="PEQA's quantized base: a saved checkpoint instead")
    parser.add_argument("--gradient-checkpointing", action="store_true", help="both LoRA runs (the QLoRA paper's setting)")
    parser.add_argument("--dry", action="store_true", help="tiny random model, a few short steps; writes nothing")
    args = parser.parse_args()
    if args.dry:
        for k, v in DRY.items():
            setattr(args, k, v)
    if args.one:
        args.lr = args.lr if args.lr is not None else (1e-4 if args.one == "peqa" else 5e-4)
        print(json.dumps(run_peqa(args) if args.one == "peqa" else run_lora(args.one, args)))
        return
    path = RESULTS / "finetune.json"
    rows: dict = json.loads(path.read_text()) if path.exists() and not args.dry else {}
    for part, runs in (("lora", ["qlora", "lora"]), ("peqa", ["peqa"])):
        if args.part not in (part, "all"):
            continue
        lr = args.lr if args.lr is not None else (1e-4 if part == "peqa" else 5e-4)
        settings = {k: getattr(args, k) for k in ("steps", "rank", "seed", "batch_size", "seqlen", "optim",
                                                  "eval_windows", "eval_seqlen", "gradient_checkpointing")} | {"lr": lr}
        for run in runs:
            r = run_child(str(HERE), ["--one", run, *_child_args(args), "--lr", str(lr)])
            if r is not None:
                rows[run] = r
                rows[f"settings_{part}"] = settings
    lines = _lines(rows)
    if args.dry:
        print("\n".join(lines))
    else:
        write_results("finetune", rows, lines)


if __name__ == "__main__":
    main()
