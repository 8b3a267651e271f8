"""Sweeps: every (method, bits, group size, sparsity) configuration quantized on the same calibration windows
and evaluated on the same windows, one row each in ``sweep.json`` (and ``sweep.md``) of a results
directory.  Finished rows are kept, so a re-run does only what is missing; each configuration runs
in a worker of a pluggable executor (``lowbit.analysis.executors``)."""

from __future__ import annotations

import contextlib
import math
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

from lowbit.analysis.executors import Executor, InlineExecutor
from lowbit.analysis.results import check_same_model, model_identity, read_results, write_results
from lowbit.atomic import write_text_atomic
from lowbit.errors import LowbitError
from lowbit.experiment import Calibration, Evaluation, Job, ModelSource, run_job
from lowbit.outputs import check_output

SWEEP_METHODS = ("rtn", "gptq", "awq", "hqq", "owq", "spqr", "bcq")  # weight-only methods taking a plain int spec
PRUNERS = ("magnitude", "wanda", "sparsegpt")  # the sparsity axis' pruning steps (before the rounding step)
NO_QUANT = "none"  # the method of pruned-only configurations
TABLE_COLUMNS = ["config", "method", "bits", "group", "sparsity", "bits/weight", "size MiB", "perplexity", "KL to fp",
                 "top-1 agreement", "quant s", "peak RSS MiB"]


@dataclass(frozen=True)
class SweepConfig:
    """One point of a sweep: ``method`` at ``bits`` with groups of ``group_size`` (None: per channel), after
    ``pruner`` prunes ``sparsity`` of each layer (0: no pruning); method ``none``: pruned only."""

    method: str
    bits: int
    group_size: int | None
    sparsity: float = 0.0
    pruner: str = "sparsegpt"

    @property
    def name(self) -> str:
        pruned = f"{self.pruner}{round(100 * self.sparsity)}" if self.sparsity else ""
        if self.method == NO_QUANT:
            return pruned
        quant = f"{self.method}-w{self.bits}" + (f"g{self.group_size}" if self.group_size else "-channel")
        return f"{pruned}-{quant}" if pruned else quant

    def recipe(self) -> dict[str, Any]:
        """The recipe dict: the pruning step, then asymmetric integer weights; every decoder linear, lm_head
        left alone."""
        entries: list[dict[str, Any]] = []
        if self.sparsity:
            entries.append({"method": self.pruner, "options": {"sparsity": self.sparsity}})
        if self.method != NO_QUANT:
            spec: dict[str, Any] = {"type": "int", "bits": self.bits, "symmetric": False}
            spec |= ({"granularity": "group", "group_size": self.group_size} if self.group_size
                     else {"granularity": "channel"})
            entries.append({"method": self.method, "spec": spec})
        return {"name": self.name, "methods": entries}

    def row(self) -> dict[str, Any]:
        """The identifying fields of this configuration's sweep row."""
        return {"config": self.name, "method": self.method, "bits": self.bits, "group_size": self.group_size,
                "sparsity": self.sparsity, "pruner": self.pruner if self.sparsity else None}


@dataclass(frozen=True)
class SweepData:
    """The shared data of a sweep: calibration windows and evaluation windows."""

    calib: str = "wikitext2"
    nsamples: int = 128
    seqlen: int = 512
    seed: int = 0
    eval_dataset: str = "wikitext2"
    eval_seqlen: int = 2048
    eval_windows: int = 10


@dataclass(frozen=True)
class SweepTask:
    """Everything a worker needs to run one configuration (picklable)."""

    model: str
    config: SweepConfig
    data: SweepData
    cache: str | None = None
    threads: int = 1
    env: dict[str, str] = field(default_factory=dict)
    device: str = "cpu"

    def job(self) -> Job:
        """The experiment job of this configuration: KL and top-1 agreement against the unquantized model."""
        d = self.data
        return Job(ModelSource(self.model, device=self.device, cache=self.cache), self.config.recipe(),
                   Calibration(d.calib, d.nsamples, d.seqlen, d.seed),
                   Evaluation(d.eval_dataset, "test", d.eval_seqlen, d.eval_windows, against_fp=True))


def parse_list(text: str, what: str, cast: Callable[[str], Any] = str) -> list[Any]:
    """A comma-separated command-line list; LowbitError when it is empty or an item does not parse."""
    items = [t.strip() for t in text.split(",") if t.strip()]
    if not items:
        raise LowbitError(f"the {what} list is empty: give at least one, comma-separated")
    try:
        return [cast(t) for t in items]
    except ValueError:
        raise LowbitError(f"cannot read the {what} list {text!r}") from None


def parse_group(text: str) -> int | None:
    return None if text in ("channel", "none", "0") else int(text)


def expand(methods: list[str], bits: list[int], group_sizes: list[int | None], sparsities: Sequence[float] = (0.0,),
           pruner: str = "sparsegpt") -> list[SweepConfig]:
    """Every combination, validated before anything runs (method ``none``: pruned only, at each sparsity > 0)."""
    if not methods:
        raise LowbitError("the method list is empty: give at least one method (e.g. --methods rtn,gptq)")
    if not bits or not group_sizes:
        raise LowbitError("give at least one bit width and one group size")
    unknown = [m for m in methods if m not in (*SWEEP_METHODS, NO_QUANT)]
    if unknown:
        raise LowbitError(f"cannot sweep method(s) {', '.join(unknown)}: sweepable weight-only methods are "
                          f"{', '.join(SWEEP_METHODS)} (and {NO_QUANT}: pruning only)")
    if pruner not in PRUNERS:
        raise LowbitError(f"unknown pruner {pruner!r}; the sparsity axis prunes with one of {', '.join(PRUNERS)}")
    bad_s = [x for x in sparsities if not 0 <= x < 1]
    if bad_s or not sparsities:
        raise LowbitError(f"sparsities must lie in [0, 1) (the fraction of each layer's weights pruned), got "
                          f"{bad_s or sparsities}")
    bad = [b for b in bits if not 1 <= b <= 8]
    if bad:
        raise LowbitError(f"bit widths must lie in 1..8, got {bad}")
    if any(g is not None and g < 1 for g in group_sizes):
        raise LowbitError(f"group sizes must be positive (or 'channel'), got {group_sizes}")
    combos = [SweepConfig(m, b, g, sp, pruner) if m != NO_QUANT else SweepConfig(m, 0, None, sp, pruner)
              for sp in sparsities for m in methods for b in bits for g in group_sizes if m != NO_QUANT or sp > 0]
    if not combos:
        raise LowbitError(f"method {NO_QUANT} (pruning only) needs a sparsity above 0 in --sparsities")
    return list(dict.fromkeys(combos))  # a repeated item runs once


def run_task(task: SweepTask) -> dict[str, Any]:
    """Quantize and evaluate one configuration in this process: the sweep row (status "failed" with
    the error's message when lowbit refuses the configuration)."""
    os.environ.update(task.env)  # before the imports below read their settings (HF_*, LOWBIT_*)
    import torch

    from lowbit.eval.memory import peak_rss_mb

    torch.set_num_threads(task.threads)
    c = task.config
    row = c.row()
    try:
        result = run_job(task.job())
    except LowbitError as exc:
        return row | {"status": "failed", "error": str(exc)}
    report, res = result.report, result.after
    size_mb = report.model_bits_per_weight * report.model_params / 8 / 2**20
    row |= {"status": "ok", "bits_per_weight": report.bits_per_weight,
            "model_bits_per_weight": report.model_bits_per_weight, "size_mb": size_mb,
            "perplexity": res.perplexity, "kl": res.kl, "top1": res.top1_agreement,
            "eval_windows": res.windows, "quant_seconds": result.quant_seconds, "peak_rss_mb": peak_rss_mb(),
            "threads": task.threads, "device": str(result.device)}
    if result.peak_device_mb is not None:
        row["peak_device_mb"] = result.peak_device_mb
    return row


def fp_row(model: Any, tok: Any, data: SweepData) -> dict[str, Any]:
    """The unquantized model's perplexity and size on the sweep's evaluation windows."""
    from lowbit.eval.perplexity import evaluate

    res = evaluate(model, tok, data.eval_dataset, "test", seqlen=data.eval_seqlen, max_windows=data.eval_windows)
    params = sum(p.numel() for p in model.parameters())
    bits = 8 * sum(p.numel() * p.element_size() for p in model.parameters())
    return {"perplexity": res.perplexity, "eval_windows": res.windows, "bits_per_weight": bits / params,
            "size_mb": bits / 8 / 2**20}


def run_sweep(model_ref: str, configs: list[SweepConfig], out: str | Path, executor: Executor | None = None,
              data: SweepData = SweepData(), cache: str | None = None, threads: int = 1,
              runner: Callable[[SweepTask], dict[str, Any]] = run_task,
              log: Callable[[str], None] = print, device: str = "cpu", redo: tuple[str, ...] = ()
              ) -> dict[str, Any]:
    """Run the configurations of ``configs`` not yet finished in ``out`` and return the sweep results.

    ``out`` must be new, empty or a results directory (``lowbit.outputs.check_output``).  The fp model
    is loaded here once: its identity guards the directory (results of another model are refused)
    and its perplexity is the reference row.  A directory swept with other data is refused too, and
    so is one swept on another kind of device (its timings would not compare).
    ``sweep.json`` and ``sweep.md`` are rewritten after every finished configuration.  Configurations
    named in ``redo`` (or whose method is named there) run again even when finished.
    """
    from lowbit.models.loading import check_device, load_model

    check_device(device)
    if not configs:
        raise LowbitError("nothing to sweep: the configuration list is empty")
    out = check_output(out, "results")
    model, tok = load_model(model_ref, device=device, cache=cache)
    identity = model_identity(model, model_ref)
    stored = read_results(out, "sweep")
    if stored is not None:
        check_same_model(stored, identity, out)
        if stored.get("data") != asdict(data):
            raise LowbitError(f"{out} holds a sweep with other data settings ({stored.get('data')}); use another "
                              "results directory or the same settings")
        if _stored_device(stored) != _device_kind(device):
            raise LowbitError(f"{out} holds a sweep run on {_stored_device(stored)}, not {_device_kind(device)}: use "
                              "another results directory (its timings would not compare)")
    sweep = stored or {"kind": "sweep", "model": identity, "data": asdict(data), "device": _device_kind(device),
                       "rows": []}
    if "fp" not in sweep:
        sweep["fp"] = fp_row(model, tok, data)
    del model
    done = {r["config"] for r in sweep["rows"] if r.get("status") == "ok" and not {r["config"], r["method"]} & set(redo)}
    todo = [c for c in configs if c.name not in done]
    log(f"sweep: {len(configs) - len(todo)} of {len(configs)} configurations already done, {len(todo)} to run "
        f"on the {(executor or InlineExecutor()).name} executor")
    _save(out, sweep)
    env = {k: v for k, v in os.environ.items() if k.startswith(("LOWBIT_", "HF_", "XDG_CACHE_HOME"))}
    tasks = [SweepTask(model_ref, c, data, cache, threads, env, device) for c in todo]
    # closed however the loop ends (an interrupt too), so the executor stops its workers at once
    with contextlib.closing((executor or InlineExecutor()).run(runner, tasks)) as finished:
        for task, row in finished:
            if isinstance(row, BaseException):
                row = task.config.row() | {"status": "failed", "error": f"{type(row).__name__}: {row}"}
            sweep["rows"] = [r for r in sweep["rows"] if r["config"] != row["config"]] + [row]
            _save(out, sweep)
            log(_row_line(row))
    return sweep


def _device_kind(device: str) -> str:
    """"cpu" or "cuda" (any CUDA index): what decides whether two sweeps' timings compare."""
    return str(device).split(":")[0]


def _stored_device(sweep: dict[str, Any]) -> str:
    """The device kind a stored sweep ran on (from its rows when it predates the ``device`` entry)."""
    if "device" in sweep:
        return sweep["device"]
    return next((_device_kind(r["device"]) for r in sweep["rows"] if "device" in r), "cpu")


def _row_line(row: dict[str, Any]) -> str:
    if row.get("status") != "ok":
        return f"{row['config']}: failed: {row.get('error')}"
    return (f"{row['config']}: {row['bits_per_weight']:.3f} bits/weight, perplexity {row['perplexity']:.3f}, "
            f"KL {row['kl']:.4f}, {row['quant_seconds']:.0f} s")


def table_rows(sweep: dict[str, Any], pareto: set[str] | None = None, failed: bool = True) -> list[list[str]]:
    """The sweep's table (fp first, then by method and bits per weight), ``TABLE_COLUMNS`` wide; with
    ``pareto`` (config names) one more column marks them; ``failed=False`` leaves failed rows out."""
    fp = sweep.get("fp")
    mark = (lambda name: ["yes" if name in pareto else ""]) if pareto is not None else (lambda name: [])
    rows = []
    if fp:
        rows.append(["fp", "-", "-", "-", "0", f"{fp['bits_per_weight']:.3f}", f"{fp['size_mb']:.1f}",
                     f"{fp['perplexity']:.3f}", "0", "100.0%", "0", "-"] + mark("fp"))
    ok = sorted((r for r in sweep["rows"] if r.get("status") == "ok"),
                key=lambda r: (r["method"], r.get("sparsity", 0.0), r["bits_per_weight"]))
    for r in ok:
        rows.append([r["config"], r["method"], str(r["bits"]), str(r["group_size"] or "channel"), _sparsity(r),
                     f"{r['bits_per_weight']:.3f}", f"{r['size_mb']:.1f}", _num(r["perplexity"]), f"{r['kl']:.4f}",
                     f"{100 * r['top1']:.1f}%", f"{r['quant_seconds']:.0f}", f"{r['peak_rss_mb']:.0f}"] + mark(r["config"]))
    for r in sweep["rows"] if failed else ():
        if r.get("status") != "ok":
            rows.append([r["config"], r["method"], str(r["bits"]), str(r["group_size"] or "channel"), _sparsity(r),
                         "failed: " + str(r.get("error", ""))[:80]] + [""] * 6 + mark(""))
    return rows


def _sparsity(row: dict[str, Any]) -> str:
    """The row's sparsity and pruner (rows of sweeps before the sparsity axis: 0)."""
    s = row.get("sparsity") or 0.0
    return f"{s:g} ({row.get('pruner')})" if s else "0"


def _num(x: float) -> str:
    return f"{x:.3f}" if math.isfinite(x) and x < 1e6 else f"{x:.3g}"


def data_line(d: dict[str, Any]) -> str:
    """What a sweep measured on, from its ``data`` entry (the ``SweepData`` fields)."""
    if not all(k in d for k in SweepData.__dataclass_fields__):
        return "Data: " + (", ".join(f"{k} {v}" for k, v in d.items()) or "not recorded") + "."
    return (f"Calibration: {d['nsamples']} x {d['seqlen']} tokens of {d['calib']} (seed {d['seed']}); evaluation: "
            f"first {d['eval_windows']} windows of {d['eval_seqlen']} tokens of {d['eval_dataset']} test. KL and "
            "top-1 agreement against the unquantized model; bits/weight over the quantized linears (scales and "
            "zeros included); size: the whole model's weights at their storage width.")


def sweep_markdown(sweep: dict[str, Any]) -> str:
    head = [f"# Sweep of {sweep['model']['name']}", "", data_line(sweep["data"]), "",
            "| " + " | ".join(TABLE_COLUMNS) + " |", "| " + " | ".join(["---"] * len(TABLE_COLUMNS)) + " |"]
    return "\n".join(head + ["| " + " | ".join(r) + " |" for r in table_rows(sweep)]) + "\n"


def _save(out: Path, sweep: dict[str, Any]) -> None:
    write_results(out, "sweep", sweep)
    write_text_atomic(out / "sweep.md", sweep_markdown(sweep))
