"""Named corpora (wikitext2, ptb, c4) from a local data directory or the hub, and local text files.

Local layout (the directory named by ``LOWBIT_DATA_DIR`` or passed as ``data_dir``)::

    wikitext-2-raw/wiki.{valid,test}.raw
    ptb/ptb.{valid,test}.txt
    c4/c4-en-validation-2k.jsonl

Rows follow the Hugging Face ``datasets`` versions so results match GPTQ-style evaluation:
WikiText rows are file lines (trailing newline kept, whitespace-only lines -> ""), joined with
``"\\n\\n"``; PTB rows are stripped sentences joined with ``" "``; C4 rows are documents joined
with ``"\\n\\n"``.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

from lowbit.errors import LowbitError
from lowbit.safeio import read_text

SPLIT_ALIASES = {"valid": "validation", "val": "validation", "validation": "validation", "test": "test", "train": "train"}


@dataclass(frozen=True)
class Corpus:
    """A named corpus: local files per split, how rows are joined, and its hub location."""

    name: str
    files: dict[str, str]
    join: str
    hub: tuple[str, str | None, str]  # (dataset path, config, text field)
    row_format: str  # "wikitext" | "sentences" | "jsonl"


CORPORA: dict[str, Corpus] = {
    "wikitext2": Corpus(
        "wikitext2",
        {"test": "wikitext-2-raw/wiki.test.raw", "validation": "wikitext-2-raw/wiki.valid.raw"},
        "\n\n",
        ("wikitext", "wikitext-2-raw-v1", "text"),
        "wikitext",
    ),
    "ptb": Corpus(
        "ptb",
        {"test": "ptb/ptb.test.txt", "validation": "ptb/ptb.valid.txt"},
        " ",
        ("ptb_text_only", "penn_treebank", "sentence"),
        "sentences",
    ),
    "c4": Corpus(
        "c4",
        {"validation": "c4/c4-en-validation-2k.jsonl"},
        "\n\n",
        ("allenai/c4", "en", "text"),
        "jsonl",
    ),
}
MAX_DATA_BYTES = 256 << 20  # a data file lowbit reads whole; wikitext-2's test split is 1.3 MB
HUB_SPLITS = {"wikitext2": ("train", "validation", "test"), "ptb": ("train", "validation", "test"), "c4": ("train", "validation")}


def data_dir(override: str | os.PathLike[str] | None = None) -> Path | None:
    """The local data directory: ``override``, else ``$LOWBIT_DATA_DIR``, else None."""
    value = override or os.environ.get("LOWBIT_DATA_DIR")
    return Path(value).expanduser() if value else None


def normalize_split(split: str) -> str:
    key = split.lower()
    if key not in SPLIT_ALIASES:
        raise LowbitError(f"unknown split {split!r}; use test, validation (valid) or train")
    return SPLIT_ALIASES[key]


def _jsonl_text(line: str, path: Path, i: int) -> str:
    """The string ``text`` field of JSON line ``i`` of ``path``."""
    try:
        row = json.loads(line)
    except (ValueError, RecursionError):
        row = None
    if not isinstance(row, dict) or "text" not in row:
        raise LowbitError(f"{path} line {i} is not a JSON object with a 'text' field; each line must be "
                          '{"text": "..."}')
    if not isinstance(row["text"], str):
        raise LowbitError(f"{path} line {i}: 'text' is {json.dumps(row['text'])[:40]}, not a string; each row "
                          "needs a string \"text\" field")
    return row["text"]


def _read_rows(path: Path, row_format: str) -> list[str]:
    text = read_text(path, MAX_DATA_BYTES, "data file")
    if row_format == "wikitext":
        return ["" if not line.strip() else line for line in text.splitlines(keepends=True)]
    if row_format == "sentences":
        return [line.strip() for line in text.splitlines()]
    return [_jsonl_text(line, path, i) for i, line in enumerate(text.splitlines(), 1) if line.strip()]


def _hub_rows(corpus: Corpus, split: str) -> list[str]:
    from lowbit.hub import hub_reachable

    try:
        import datasets  # noqa: F401
    except ImportError:
        raise LowbitError("datasets is not installed") from None
    if not hub_reachable():
        raise LowbitError("the Hugging Face hub is unreachable (offline)")
    path, config, field = corpus.hub
    from datasets import load_dataset

    ds = load_dataset(path, config, split=split)
    return list(ds[field])


def load_rows(name: str, split: str = "test", data_dir_override: str | os.PathLike[str] | None = None) -> list[str]:
    """Rows of a named corpus split, or of a local ``.txt``/``.raw``/``.jsonl`` file."""
    path = Path(name).expanduser()
    if name not in CORPORA:
        if path.suffix in (".txt", ".raw", ".jsonl", ".json"):
            if not path.is_file():
                raise LowbitError(f"data file {name!r} does not exist; check the path")
            return _read_rows(path, "jsonl" if path.suffix in (".jsonl", ".json") else "wikitext")
        raise LowbitError(
            f"unknown dataset {name!r}; use one of {', '.join(CORPORA)}, selfgen, or a path to a .txt/.jsonl file"
        )
    corpus = CORPORA[name]
    split = normalize_split(split)
    if split not in HUB_SPLITS[name]:
        raise LowbitError(f"dataset {name!r} has no split {split!r}; available: {', '.join(HUB_SPLITS[name])}")
    root = data_dir(data_dir_override)
    rel = corpus.files.get(split)
    if root is not None and rel is not None and (root / rel).is_file():
        return _read_rows(root / rel, corpus.row_format)
    try:
        return _hub_rows(corpus, split)
    except LowbitError as exc:
        where = f"{root / rel}" if root is not None and rel else "no LOWBIT_DATA_DIR set"
        if root is not None and not root.is_dir():
            where = f"LOWBIT_DATA_DIR={root} does not exist"
        raise LowbitError(
            f"dataset {name!r} split {split!r} is not available locally ({where}) and not from the hub "
            f"({exc}); set LOWBIT_DATA_DIR to a folder holding {rel or 'the files'} (layout of shared/data)"
        ) from None


def load_text(name: str, split: str = "test", data_dir_override: str | os.PathLike[str] | None = None) -> str:
    """The whole split as one string, rows joined by the corpus convention."""
    rows = load_rows(name, split, data_dir_override)
    join = CORPORA[name].join if name in CORPORA else "\n\n"
    if name not in CORPORA and not Path(name).suffix.startswith(".json"):
        return "".join(rows)  # plain text files are used as they are
    return join.join(rows)
