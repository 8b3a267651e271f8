"""Low-bit optimizer states on smollm2-135m (issue 18, item 6): AdamW with fp32, 8-bit and 4-bit states.

Each optimizer trains the same parameters (every linear weight of the last ``--blocks`` decoder blocks;
``--blocks 0``: every parameter, a full fine-tune) for the same ``--steps`` on the same WikiText-2
validation windows (``--nsamples`` x ``--seqlen``, seed 0, batches of ``--batch-size``; cosine schedule)
through ``lowbit.qat.train.train_next_token(..., optimizer=NAME)``, each in its own process.  Recorded:
the bytes of the optimizer's state tensors (``lowbit.qat.optim.state_bytes``, measured on the same
parameters), the per-step losses (compared with the fp32 AdamW run), wall seconds of the training call,
tokens and steps.  Results: ``results/optim_states.json`` and ``.md`` (``--tiny``: a short smoke
run written to ``optim_states_tiny.*``).

The defaults (30 steps of 2 x 256 tokens, the last 4 blocks: 14.2M parameters) are sized for a few
minutes per row on a 2-core CPU; the full fine-tune (``--blocks 0``) costs far more per step.

    python benchmarks/optim_states.py [--steps 30] [--blocks 4] [--only adamw4bit]
    python benchmarks/optim_states.py --tiny
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import time
from typing import Any

from _results import RESULTS, run_child, table_lines, write_results

OPTIMIZERS = ("adamw", "adamw8bit", "adamw4bit")  # lowbit.qat.optim.OPTIMIZERS (checked in one())
SETTINGS = ("steps", "blocks", "nsamples", "seqlen", "batch_size", "lr")
TINY = {"steps": 3, "blocks": 1, "nsamples": 4, "seqlen": 32, "batch_size": 2}


def _trainable(model: Any, blocks: int) -> list[str]:
    """Freeze ``model`` except the linear weights of its last ``blocks`` decoder blocks (0: nothing frozen)."""
    import torch

    from lowbit.arch import decoder_blocks

    if blocks == 0:
        for p in model.parameters():
            p.requires_grad_(True)
        return [n for n, _ in model.named_parameters()]
    for p in model.parameters():
        p.requires_grad_(False)
    for block in list(decoder_blocks(model))[-blocks:]:
        for m in block.modules():
            if isinstance(m, torch.nn.Linear):
                m.weight.requires_grad_(True)
    return [n for n, p in model.named_parameters() if p.requires_grad]


def _state_bytes(name: str, params: list, lr: float) -> int:
    """State bytes of optimizer ``name`` over ``params``: one step on zero gradients (which moves nothing)."""
    import torch

    from lowbit.qat.optim import make_optimizer, state_bytes

    opt = make_optimizer(name, params, lr=lr)
    for p in params:
        p.grad = torch.zeros_like(p)
    before = [p.detach().clone() for p in params[:1]]
    opt.step()
    if not torch.equal(before[0], params[0]):
        raise RuntimeError("a zero-gradient step moved a parameter: state bytes must be measured another way")
    n = state_bytes(opt)
    for p in params:
        p.grad = None
    return n


def one(name: str, cfg: dict) -> dict:
    """Train with optimizer ``name``; the last stdout line is the row's JSON."""
    import torch

    from lowbit.data import get_calibration
    from lowbit.experiment import ModelSource, load
    from lowbit.qat.optim import OPTIMIZERS as KNOWN
    from lowbit.qat.train import train_next_token

    assert tuple(KNOWN) == OPTIMIZERS, KNOWN
    torch.manual_seed(0)
    model, tok = load(ModelSource("smollm2-135m"))
    windows = get_calibration("wikitext2", tok, cfg["nsamples"], cfg["seqlen"], 0)
    names = _trainable(model, cfg["blocks"])
    params = [p for p in model.parameters() if p.requires_grad]
    sbytes = _state_bytes(name, params, cfg["lr"])
    t0 = time.perf_counter()
    r = train_next_token(model, windows, steps=cfg["steps"], lr=cfg["lr"], batch_size=cfg["batch_size"], seed=0,
                         optimizer=name)
    wall = time.perf_counter() - t0
    return {"optimizer": name, "state_bytes": sbytes, "trained_params": r.trained_params,
            "trained_tensors": len(names), "losses": r.losses, "tokens": r.tokens, "steps": len(r.losses),
            "wall_seconds": wall, "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def _compare(rows: dict) -> None:
    """Add to every row its comparison with the fp32 AdamW row (state ratio, loss differences, time ratio)."""
    ref = rows.get("adamw")
    for r in rows.values():
        r["loss_first"], r["loss_last"] = r["losses"][0], r["losses"][-1]
        if ref is None:
            continue
        diffs = [abs(a - b) for a, b in zip(r["losses"], ref["losses"])]
        r["fp32_state_ratio"] = ref["state_bytes"] / r["state_bytes"]
        r["loss_mean_abs_diff_vs_adamw"] = sum(diffs) / len(diffs)
        r["loss_max_abs_diff_vs_adamw"] = max(diffs)
        r["loss_last_diff_vs_adamw"] = r["losses"][-1] - ref["losses"][-1]
        r["wall_ratio_vs_adamw"] = r["wall_seconds"] / ref["wall_seconds"]


def table(data: dict) -> list[str]:
    cfg, rows = data["settings"], data["rows"]
    what = ("every parameter" if cfg["blocks"] == 0
            else f"the linear weights of the last {cfg['blocks']} decoder block(s)")
    body = []
    for name in OPTIMIZERS:
        r = rows.get(name)
        if r is None:
            continue
        mib = r["state_bytes"] / 2 ** 20
        body.append([name, f"{mib:.1f}", f"{r.get('fp32_state_ratio', float('nan')):.2f}x",
                     f"{r['loss_first']:.4f}", f"{r['loss_last']:.4f}",
                     f"{r.get('loss_mean_abs_diff_vs_adamw', float('nan')):.4f}",
                     f"{r.get('loss_max_abs_diff_vs_adamw', float('nan')):.4f}",
                     f"{r['wall_seconds']:.1f}", f"{r.get('wall_ratio_vs_adamw', float('nan')):.2f}",
                     str(r["steps"]), str(r["tokens"])])
    trained = next(iter(rows.values()))["trained_params"] if rows else 0
    caption = ["# Low-bit optimizer states: AdamW with fp32, 8-bit and 4-bit moments", "",
               f"smollm2-135m, training {what} ({trained:,} parameters) for {cfg['steps']} steps of "
               f"{cfg['batch_size']} x {cfg['seqlen']} tokens drawn from {cfg['nsamples']} WikiText-2 validation "
               f"windows (seed 0), lr {cfg['lr']:g} with cosine decay, no weight decay. State: bytes of the "
               "optimizer's state tensors (moments or codes + block scales + step counters). Loss differences "
               "are per step against the adamw run (same batches). Wall: the training call only (forward, "
               "backward, optimizer), one process per row on this 2-core CPU."]
    return table_lines(caption, ["optimizer", "state MiB", "fp32 / this", "loss first", "loss last",
                                 "mean abs diff", "max abs diff", "wall s", "wall / adamw", "steps", "tokens"], body)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", nargs="*", choices=list(OPTIMIZERS))
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--blocks", type=int, default=4, help="last N decoder blocks' linear weights; 0: all")
    parser.add_argument("--nsamples", type=int, default=64)
    parser.add_argument("--seqlen", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument("--lr", type=float, default=1e-4)
    parser.add_argument("--tiny", action="store_true", help="a seconds-long smoke run (optim_states_tiny.*)")
    parser.add_argument("--one", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.tiny:
        for k, v in TINY.items():
            setattr(args, k, v)
    cfg = {k: getattr(args, k) for k in SETTINGS}
    if args.one:
        print(json.dumps(one(args.one, cfg)))
        return
    out = "optim_states_tiny" if args.tiny else "optim_states"
    path = RESULTS / f"{out}.json"
    old = json.loads(path.read_text()) if path.exists() else {}
    rows: dict = old.get("rows", {}) if old.get("settings") == cfg and args.only else {}
    argv = [f"--{k.replace('_', '-')}={v}" for k, v in cfg.items()]
    for name in args.only or OPTIMIZERS:
        r = run_child(__file__, ["--one", name, *argv])
        if r is not None:
            rows[name] = r
            print(f"{name}: loss {r['losses'][0]:.4f} -> {r['losses'][-1]:.4f}, state {r['state_bytes']:,} B, "
                  f"{r['wall_seconds']:.1f} s", file=sys.stderr, flush=True)
    _compare(rows)
    data = {"settings": cfg, "rows": rows}
    write_results(out, data, table(data))


if __name__ == "__main__":
    main()
