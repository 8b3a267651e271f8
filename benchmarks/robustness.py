"""Robustness table: the fuzz corpus of ``tests/fuzz`` (bad model files, recipes, flags, data, output targets,
plus valid controls) and real interruptions (SIGINT to a sweep and to a quantization, SIGKILL during a
quantization followed by a rerun), counted per class of issue 16.

    python benchmarks/robustness.py [--src OTHER/src --label before]

``--src`` runs the same corpus against another checkout's sources (e.g. the commit before the fixes), so
the table can show both.  Writes benchmarks/results/robustness.{json,md} (the current sources) or
robustness_<label>.json (another checkout).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

from _results import RESULTS, table_lines, write_results

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests" / "fuzz"))
VERDICTS = ["clean", "traceback", "silent", "data lost", "message", "hang", "failed"]


def run_corpus(root: Path) -> list[dict]:
    """Every corpus case, run in this process, each on fresh copies of the inputs it may touch."""
    import fuzz_artifacts
    import fuzz_corpus

    art = fuzz_artifacts.build_artifacts(root / "base")
    cases = fuzz_corpus.build_cases(art, root / "cases")
    pristine = root.parent / "pristine"
    shutil.copytree(root, pristine, symlinks=True)
    rows = []
    for case in cases:
        t0 = time.perf_counter()
        o = fuzz_corpus.run_case(case, art, root / "cases")
        # a case that destroyed its inputs (older code) must not decide the next cases' fate: restore them
        for folder in (Path("base"), Path("cases") / fuzz_corpus.case_folder(case, root / "cases")):
            shutil.rmtree(root / folder, ignore_errors=True)
            shutil.copytree(pristine / folder, root / folder, symlinks=True)
        rows.append({"class": fuzz_corpus.CLASSES[case.cls], "case": case.name, "verdict": o.verdict, "exit": o.code,
                     "error": o.error_line[:300], "detail": o.detail[:300], "seconds": time.perf_counter() - t0})
        print(f"{o.verdict:>9}  {case.name}", file=sys.stderr)
    return rows


def _lowbit(*args: str) -> list[str]:
    return [sys.executable, "-m", "lowbit.cli", *args]


def _env() -> dict[str, str]:
    return os.environ | {"HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}


def _leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if ".tmp" in p.name)


def _interrupt(cmd: list[str], after_s: float, sig: int, limit_s: float = 120) -> dict:
    """Start ``cmd``, send ``sig`` after ``after_s`` seconds, and see how it ends."""
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=_env(),
                            start_new_session=True)
    time.sleep(after_s)
    if proc.poll() is None:
        os.killpg(proc.pid, sig) if sig == signal.SIGKILL else proc.send_signal(sig)
    sent = time.perf_counter()
    try:
        out, err = proc.communicate(timeout=limit_s)
        waited = time.perf_counter() - sent
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        return {"exit": None, "seconds_to_exit": None, "traceback": "Traceback" in err, "hang": True}
    return {"exit": proc.returncode, "seconds_to_exit": round(waited, 2), "traceback": "Traceback" in err,
            "hang": False, "ran_s": round(sent - t0, 2), "stderr_tail": err.strip().splitlines()[-1:] if err else []}


def run_interruptions(root: Path) -> list[dict]:
    """SIGINT a sweep and a quantization mid-run; SIGKILL quantizations at several moments, then rerun."""
    import fuzz_artifacts

    art = fuzz_artifacts.build_artifacts(root / "base")
    q = ["--calib", str(art.text), "--nsamples", "8", "--seqlen", "32"]
    cls = "5 interruption"
    rows = []
    sweep_out = root / "sweep"
    sweep = _lowbit("sweep", str(art.hf_dir), "--methods", "gptq,awq,rtn", "--bits", "4,3", "--group-sizes", "32",
                    "--calib", str(art.text), "--nsamples", "8", "--seqlen", "32", "--eval-dataset", str(art.text),
                    "--eval-seqlen", "64", "--max-windows", "2", "--out", str(sweep_out))
    r = _interrupt(sweep, 12.0, signal.SIGINT)
    ok = r["exit"] == 130 and not r["traceback"] and not r["hang"] and r["seconds_to_exit"] < 30
    rows.append({"class": cls, "case": "SIGINT to a running sweep (6 configurations)",
                 "verdict": "clean" if ok else ("hang" if r["hang"] else "traceback"), **r})
    rerun = subprocess.run(sweep, capture_output=True, text=True, env=_env())
    done = json.loads((sweep_out / "sweep.json").read_text())["rows"] if (sweep_out / "sweep.json").is_file() else []
    rows.append({"class": cls, "case": "the interrupted sweep resumes and finishes",
                 "verdict": "clean" if rerun.returncode == 0 and len(done) == 6 else "failed",
                 "exit": rerun.returncode, "rows": len(done)})
    out = root / "q"
    quant = _lowbit("quantize", str(art.hf_dir), "--method", "awq", "--group-size", "32", "--calib", str(art.text),
                    "--nsamples", "32", "--seqlen", "64", "--out", str(out))
    t0 = time.perf_counter()
    subprocess.run(quant[:-1] + [str(root / "timed")], capture_output=True, env=_env(), check=True)
    full = time.perf_counter() - t0  # an uninterrupted run: interruptions land at fractions of it
    r = _interrupt(quant, 0.5 * full, signal.SIGINT)
    ok = r["exit"] == 130 and not r["traceback"] and not out.exists() and not _leftovers(root)
    rows.append({"class": cls, "case": f"SIGINT half-way through a quantization ({full:.1f} s in all)",
                 "verdict": "clean" if ok else ("missed: it had finished" if r["exit"] == 0 else "data lost"), **r})
    for frac in (0.3, 0.6, 0.8, 0.9, 0.95, 0.98):
        r = _interrupt(quant + ["--overwrite"], frac * full, signal.SIGKILL)
        stale = _leftovers(root)
        rerun = subprocess.run(quant + ["--overwrite"], capture_output=True, text=True, env=_env())
        left = _leftovers(root)
        ok = rerun.returncode == 0 and not left and r["exit"] == -signal.SIGKILL
        rows.append({"class": cls, "case": f"SIGKILL at {100 * frac:.0f}% of a quantization, then rerun",
                     "verdict": "clean" if ok else ("missed: it had finished" if r["exit"] == 0 else "data lost"),
                     "exit_after_kill": r["exit"], "temp_left_by_kill": stale, "temp_left_after_rerun": left,
                     "rerun_exit": rerun.returncode})
    return rows


def summary_lines(rows: list[dict], label: str) -> list[str]:
    by_class: dict[str, Counter] = {}
    for r in rows:
        by_class.setdefault(r["class"], Counter())[r["verdict"]] += 1
    body = []
    for cls in sorted(by_class):
        c = by_class[cls]
        other = sum(v for k, v in c.items() if k not in ("clean", "traceback", "silent", "data lost"))
        body.append([cls, str(sum(c.values())), str(c["clean"]), str(c["traceback"]), str(c["silent"]),
                     str(c["data lost"]), str(other)])
    total = Counter(r["verdict"] for r in rows)
    body.append(["**all**", str(len(rows)), f"**{total['clean']}**", str(total["traceback"]), str(total["silent"]),
                 str(total["data lost"]), str(len(rows) - sum(total[k] for k in ("clean", "traceback", "silent",
                                                                                   "data lost")))])
    return table_lines([f"Robustness ({label}): cases per class and how they ended. 'other' counts weak messages "
                        "(exit 2 but the error line misses the file / flag / fix it must name), hangs and valid "
                        "commands that failed."],
                       ["class", "cases", "clean", "tracebacks", "silent acceptances", "data lost", "other"], body)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--src", default=None, help="run the corpus against this src/ folder (another checkout)")
    ap.add_argument("--label", default="this commit")
    ap.add_argument("--skip-interruptions", action="store_true")
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.src and not args.child:
        env = os.environ | {"PYTHONPATH": str(Path(args.src).resolve())}
        subprocess.run([sys.executable, __file__, "--child", "--label", args.label, "--skip-interruptions"], env=env,
                       check=True)
        return
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    with tempfile.TemporaryDirectory() as tmp:
        rows = run_corpus(Path(tmp) / "corpus")
        if not args.skip_interruptions:
            rows += run_interruptions(Path(tmp) / "interrupt")
    import lowbit

    data = {"label": args.label, "lowbit": str(Path(lowbit.__file__).parent), "rows": rows}
    lines = summary_lines(rows, args.label)
    if args.child:
        (RESULTS / f"robustness_{args.label.replace(' ', '_')}.json").write_text(json.dumps(data, indent=2))
        print("\n".join(lines))
        return
    before = RESULTS / "robustness_before.json"
    if before.is_file():  # the same corpus against the sources before the fixes (--src ... --label before)
        lines += summary_lines(json.loads(before.read_text())["rows"], "before: commit cad940d, the corpus only")
    lines += ["", "Notes:",
              "- Each corpus case runs in-process (`lowbit.cli.main`) on its own copies of the inputs; 'clean' means "
              "exit 2, exactly one `error:` line naming what the case needs, no traceback, no output, every input "
              "byte-identical (or, for the valid controls, exit 0 and the written model loads back).",
              "- Interruptions are real signals to `python -m lowbit.cli` processes on the tiny model. No SIGKILL "
              "landed inside the final write of these short runs (no temporary was left to clean); a writer killed "
              "mid-write and the next run's cleanup are checked by "
              "`tests/test_output_safety.py::test_stale_temporaries_of_killed_runs_are_removed`.",
              "- The AWQ W4 g64 round trip on the real model is in `awq_roundtrip.md`."]
    bad = [r for r in rows if r["verdict"] != "clean"]
    lines += ["", "Cases not clean:" if bad else "Every case ended cleanly.", ""]
    lines += [f"- {r['class']}: {r['case']}: {r['verdict']} ({r.get('detail') or r.get('error') or ''})" for r in bad]
    lines += table_lines(["Every case:"], ["class", "case", "verdict", "exit", "error line"],
                         [[r["class"], r["case"], r["verdict"], str(r.get("exit")),
                           (r.get("error") or "").replace("|", "\\|")[:160]] for r in rows])
    write_results("robustness", data, lines)


if __name__ == "__main__":
    main()
