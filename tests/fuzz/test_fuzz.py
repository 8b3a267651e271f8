"""Robustness: a fixed corpus of bad inputs (mutated GGUF / safetensors / compressed-tensors / config / YAML /
data files and command lines, made from a tiny model) must each end in exactly one clean ``error:`` line,
exit 2, no traceback, no output and every input untouched; the valid controls must succeed."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
import fuzz_artifacts as artifacts  # noqa: E402
import fuzz_corpus as corpus  # noqa: E402


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    root = tmp_path_factory.mktemp("fuzz")
    art = artifacts.build_artifacts(root / "base")
    cases_root = root / "cases"
    return art, cases_root, corpus.build_cases(art, cases_root)


@pytest.mark.parametrize("cls", sorted(corpus.CLASSES))
def test_every_case_of_the_class_ends_cleanly(cls, built):
    art, cases_root, cases = built
    mine = [c for c in cases if c.cls == cls]
    assert mine, cls
    bad = []
    for case in mine:
        o = corpus.run_case(case, art, cases_root)
        if o.verdict != "clean":
            bad.append(f"{case.name}: {o.verdict} (exit {o.code}) {o.error_line!r} {o.detail}")
    assert not bad, f"{len(bad)} of {len(mine)} cases not clean:\n" + "\n".join(bad)
