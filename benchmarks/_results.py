"""Where benchmark scripts put their results: ``benchmarks/results/NAME.json`` and ``NAME.md``."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any, Callable

RESULTS = Path(__file__).resolve().parent / "results"


def write_results(name: str, data: Any, lines: list[str]) -> None:
    """Write ``data`` as JSON and ``lines`` (a markdown table with its caption) side by side, and print the table."""
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"{name}.json").write_text(json.dumps(data, indent=2))
    (RESULTS / f"{name}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


def in_order(rows: dict[str, dict], order: list[str]) -> list[tuple[str, dict]]:
    """``rows`` as (name, row) pairs in the order of ``order``; names not in it come last."""
    return sorted(rows.items(), key=lambda kv: order.index(kv[0]) if kv[0] in order else len(order))


def vs(value: float, ref: float | None) -> str:
    """``value`` against ``ref`` as a signed percentage (``+1.23%``), or "" without a reference."""
    return f"{100 * (value / ref - 1):+.2f}%" if ref else ""


def claim_lines(rows: dict[str, dict], fp: float, claims: list) -> list[str]:
    """``- claim: yes/NO (+x.xx%)`` for each ``(row, text, ok(relative % vs fp))`` whose row was measured."""
    out = []
    for name, text, ok in claims:
        if name in rows:
            rel = 100 * (rows[name]["perplexity"] / fp - 1)
            out.append(f"- {text}: {'yes' if ok(rel) else 'NO'} ({rel:+.2f}%)")
    return out


def table_lines(caption: list[str], header: list[str], body: list[list[str]]) -> list[str]:
    """A blank line, the caption lines, a blank line, and a markdown table (first column left-aligned)."""
    align = ["---"] + ["---:"] * (len(header) - 1)
    return ["", *caption, "", "| " + " | ".join(header) + " |", "| " + " | ".join(align) + " |",
            *("| " + " | ".join(row) + " |" for row in body)]


def run_child(script: str, args: list[str]) -> dict | None:
    """Run ``script`` with ``args`` in a fresh Python process and parse the JSON on its last stdout
    line (None when it fails; its errors go to this process's stderr): one process per measured row."""
    proc = subprocess.run([sys.executable, script, *args], stdout=subprocess.PIPE, text=True)
    if proc.returncode != 0:
        print(f"{args}: failed (exit {proc.returncode})", file=sys.stderr)
        return None
    return json.loads(proc.stdout.strip().splitlines()[-1])


def run_rows(script: str, name: str, todo: list[str], rerun: bool, child_args: list[str],
             lines: Callable[[dict], list[str]]) -> dict[str, dict]:
    """Measure each row of ``todo`` in its own process (``script --one ROW *child_args``), keeping the finished
    rows of ``results/NAME.json`` (re-measured when ``rerun``), and rewrite the JSON and table after each."""
    path = RESULTS / f"{name}.json"
    rows: dict[str, dict] = json.loads(path.read_text()) if path.exists() else {}
    for row_name in todo:
        if row_name in rows and not rerun:
            continue
        row = run_child(script, ["--one", row_name, *child_args])
        if row is None:
            continue
        rows[row_name] = row
        ppl = f"perplexity {row['perplexity']:8.2f}" if "perplexity" in row else "done"
        print(f"{row_name:28s} {ppl}", file=sys.stderr, flush=True)
        write_results(name, rows, lines(rows))
    return rows


def rows_main(script: str, doc: str | None, name: str, rows: list[str], run_one: Callable[[str, Any], dict],
              lines: Callable[[dict], list[str]], options: dict[str, tuple[type, Any]]) -> None:
    """The command line of a benchmark of rows: ``--only ROW ...``, the benchmark's ``options`` (flag -> (type,
    default)), each row measured in its own process (``run_rows``) with those options passed on."""
    import argparse

    parser = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", nargs="*", help="run only these rows (re-running them)")
    for flag, (kind, default) in options.items():
        parser.add_argument(flag, type=kind, default=default)
    parser.add_argument("--one", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        print(json.dumps(run_one(args.one, args)))
        return
    passed = [x for flag in options for x in (flag, str(getattr(args, flag.lstrip("-").replace("-", "_"))))]
    run_rows(script, name, args.only or rows, bool(args.only), passed, lines)

