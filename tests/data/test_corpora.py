"""Corpus rows follow the Hugging Face datasets conventions; windows are cut as GPTQ does."""

from __future__ import annotations

import pytest
import torch

from lowbit.data.corpora import load_rows, load_text
from lowbit.data.windows import eval_windows, random_windows
from lowbit.errors import LowbitError


def test_wikitext_rows_match_hf_datasets(data_dir):
    rows = load_rows("wikitext2", "test")
    assert len(rows) == 4358  # data README: 4,358 test rows
    assert rows[0] == ""  # the first line holds a single space -> ""
    assert rows[1] == " = Robert Boulter = \n"
    assert len(load_rows("wikitext2", "valid")) == 3760


def test_ptb_rows_are_stripped_sentences(data_dir):
    rows = load_rows("ptb", "test")
    assert len(rows) == 3761
    assert all(r == r.strip() for r in rows[:50])
    assert load_text("ptb", "test") == " ".join(rows)


def test_c4_jsonl_rows(data_dir):
    rows = load_rows("c4", "validation")
    assert len(rows) == 2000 and all(isinstance(r, str) and r for r in rows[:20])


def test_wikitext_join_convention(data_dir):
    assert load_text("wikitext2", "test") == "\n\n".join(load_rows("wikitext2", "test"))


def test_local_files(tmp_path):
    txt = tmp_path / "a.txt"
    txt.write_text("hello\nworld\n")
    assert load_text(str(txt)) == "hello\nworld\n"
    js = tmp_path / "b.jsonl"
    js.write_text('{"text": "one"}\n{"text": "two"}\n')
    assert load_text(str(js)) == "one\n\ntwo"
    (tmp_path / "bad.jsonl").write_text("not json\n")
    with pytest.raises(LowbitError, match="line 1 is not a JSON object"):
        load_rows(str(tmp_path / "bad.jsonl"))


@pytest.mark.parametrize(
    ("name", "split", "message"),
    [
        ("wikitext3", "test", "unknown dataset 'wikitext3'"),
        ("wikitext2", "dev", "unknown split 'dev'"),
        ("c4", "test", "has no split 'test'"),
        ("missing.txt", "test", "does not exist"),
    ],
)
def test_bad_dataset_names(name, split, message):
    with pytest.raises(LowbitError, match=message):
        load_rows(name, split)


def test_missing_data_dir_offline(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(LowbitError, match="does not exist.*LOWBIT_DATA_DIR"):
        load_rows("wikitext2", "test", data_dir_override=tmp_path / "nope")


def test_eval_windows_are_non_overlapping_prefix():
    ids = torch.arange(10)
    w = eval_windows(ids, 3)
    assert torch.equal(w, torch.tensor([[0, 1, 2], [3, 4, 5], [6, 7, 8]]))  # tail token 9 dropped
    assert torch.equal(eval_windows(ids, 3, max_windows=2), w[:2])
    with pytest.raises(LowbitError, match="fewer than one window"):
        eval_windows(ids, 11)


def test_random_windows_seeded_and_in_range():
    ids = torch.arange(1000)
    a = random_windows(ids, 8, 50, seed=0)
    b = random_windows(ids, 8, 50, seed=0)
    c = random_windows(ids, 8, 50, seed=1)
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert a.shape == (8, 50)
    # each window is a contiguous slice of the stream
    assert torch.equal(a[:, 1:] - a[:, :-1], torch.ones(8, 49, dtype=torch.long))
    assert int(a.max()) < 1000
