"""Where benchmark scripts put their results: ``benchmarks/results/NAME.json`` and ``NAME.md``."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

RESULTS = Path(__file__).resolve().parent / "results"


def write_results(name: str, data: Any, lines: list[str]) -> None:
    """Write ``data`` as JSON and ``lines`` (a markdown table with its caption) side by side, and print the table."""
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"{name}.json").write_text(json.dumps(data, indent=2))
    (RESULTS / f"{name}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
