"""``wikitext_lastword``: a LAMBADA-style task built from the local WikiText-2 test text (no hub access).

Each example is one paragraph of WikiText-2 test cut before its last word: the model reads the context and is
scored on that word (LAMBADA's convention: accuracy when the word is the greedy continuation, and the perplexity
of the word).  Paragraphs qualify when the word is alphabetic (two letters or more) and at least
``MIN_CONTEXT_WORDS`` words precede it; the context keeps the last ``MAX_CONTEXT_WORDS`` of them.  Headings
(``= ... =``) are skipped, WikiText's tokenisation (``@-@``, spaced punctuation) is kept as it is.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

TASK = "wikitext_lastword"
MIN_CONTEXT_WORDS = 40
MAX_CONTEXT_WORDS = 160
_TRAILING = {".", ",", ";", ":", "!", "?", '"', "'", ")", "]"}


def lastword_examples(rows: list[str]) -> list[dict[str, str]]:
    """``{"context", "target"}`` for every qualifying paragraph of ``rows`` (WikiText-2 lines), in order."""
    out = []
    for row in rows:
        text = row.strip()
        if not text or text.startswith("="):
            continue
        words = text.split()
        while words and words[-1] in _TRAILING:
            words.pop()
        if len(words) < MIN_CONTEXT_WORDS + 1:
            continue
        target = words[-1]
        if len(target) < 2 or not target.isalpha():
            continue
        out.append({"context": " ".join(words[-1 - MAX_CONTEXT_WORDS:-1]), "target": target})
    return out


def lastword_task(data_dir: str | None = None, cache: Path | None = None) -> dict[str, Any]:
    """The lm-eval task config of ``wikitext_lastword``; its examples written once (by content) to a JSON-lines
    file under ``cache`` (lowbit's cache by default)."""
    from lowbit.data.corpora import load_rows
    from lowbit.cache import cache_dir

    examples = lastword_examples(load_rows("wikitext2", "test", data_dir))
    body = "".join(json.dumps(e) + "\n" for e in examples)
    folder = (cache or cache_dir()) / "tasks"
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{TASK}-{hashlib.sha256(body.encode()).hexdigest()[:12]}.jsonl"
    if not path.is_file():
        tmp = path.with_suffix(".tmp")
        tmp.write_text(body)
        tmp.replace(path)
    return {
        "task": TASK,
        "dataset_path": "json",
        "dataset_kwargs": {"data_files": {"test": str(path)}},
        "test_split": "test",
        "output_type": "loglikelihood",
        "doc_to_text": "{{context}}",
        "doc_to_target": "{{' ' + target}}",
        "metric_list": [{"metric": "acc", "aggregation": "mean", "higher_is_better": True},
                        {"metric": "perplexity", "aggregation": "perplexity", "higher_is_better": False}],
        "metadata": {"version": 1.0, "examples": len(examples)},
    }
