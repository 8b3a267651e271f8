"""lm-evaluation-harness on lowbit models: the offline wikitext_lastword task, the same numbers as lm-eval's own
HF model class, task YAML paths, and the CLI's refusals."""

from __future__ import annotations

import json

import pytest

from lowbit.eval.lastword import MAX_CONTEXT_WORDS, MIN_CONTEXT_WORDS, lastword_examples

lm_eval = pytest.importorskip("lm_eval")


def test_lastword_examples_cut_paragraphs_before_their_last_word():
    long = " ".join(f"w{i}" for i in range(MIN_CONTEXT_WORDS)) + " the final Word . \n"
    rows = ["", " = Heading = \n", long, " too short a paragraph ending in Word . \n",
            " ".join(["x"] * 60) + " 1999 . \n", long.replace("Word", "@-@")]
    # headings, short paragraphs and non-alphabetic last words are skipped; trailing punctuation is not a word
    assert lastword_examples(rows) == [{"context": " ".join(long.split()[:-2]), "target": "Word"}]
    longer = " ".join(f"w{i}" for i in range(MAX_CONTEXT_WORDS + 50)) + " Word ."
    assert lastword_examples([longer])[0]["context"].split() == longer.split()[-2 - MAX_CONTEXT_WORDS:-2]


def test_lastword_task_from_the_local_corpus(data_dir, tmp_path):
    from lowbit.eval.lastword import lastword_task

    task = lastword_task(str(data_dir), cache=tmp_path)
    path = task["dataset_kwargs"]["data_files"]["test"]
    lines = open(path).read().splitlines()
    assert len(lines) == task["metadata"]["examples"] == 1547  # WikiText-2 test paragraphs that qualify
    first = json.loads(lines[0])
    assert first["target"] == "Hall" and first["context"].endswith("Sophie Stanton and Dominic")


def test_lowbit_model_scores_as_lm_eval_hf_model(small_model_dir, data_dir):
    """A lowbit-loaded model through lowbit's adapter gives lm-eval's own HF class's numbers exactly."""
    from lm_eval.models.huggingface import HFLM

    from lowbit.eval.harness import harness_lm, resolve_tasks, run_tasks
    from lowbit.models.loading import load_model

    tasks, folders = resolve_tasks(["wikitext_lastword"], str(data_dir))
    model, tok = load_model(small_model_dir)
    ours = run_tasks(harness_lm(model, tok, batch_size=4), tasks, folders, limit=6)["wikitext_lastword"]
    theirs = run_tasks(HFLM(pretrained=str(small_model_dir), device="cpu", batch_size=4, dtype="float32"),
                       tasks, folders, limit=6)["wikitext_lastword"]
    assert ours["acc"] == theirs["acc"]
    assert ours["perplexity"] == pytest.approx(theirs["perplexity"], rel=1e-6)  # measured: equal


def test_cli_tasks_from_a_yaml_path_and_refusals(run_cli, small_model_dir, tmp_path, clean_error):
    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps({"q": f"one two three {i}", "a": " four"}) + "\n" for i in range(3)))
    yaml_path = tmp_path / "mytask.yaml"
    yaml_path.write_text(f"task: my_count\ndataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {data}\n"
                         "test_split: test\noutput_type: loglikelihood\ndoc_to_text: '{{q}}'\ndoc_to_target: '{{a}}'\n"
                         "metric_list:\n  - metric: acc\n    aggregation: mean\n    higher_is_better: true\n"
                         "metadata:\n  version: 1.0\n")
    code, out, err = run_cli("eval", str(small_model_dir), "--tasks", str(yaml_path), "--json")
    assert code == 0, err
    result = json.loads(out[out.index("{"):])["results"]["my_count"]
    assert 0.0 <= result["acc"] <= 1.0
    clean_error(*run_cli("eval", str(small_model_dir), "--tasks", "no_such_task_xyz")[::2], "unknown task")
    clean_error(*run_cli("eval", str(small_model_dir), "--tasks", str(tmp_path / "missing.yaml"))[::2],
                "does not exist")
    clean_error(*run_cli("eval", str(small_model_dir), "--tasks", "wikitext_lastword", "--limit", "2.5")[::2],
                "--limit")
    clean_error(*run_cli("eval", str(small_model_dir), "--tasks", "wikitext_lastword", "--streamed")[::2],
                "--streamed")
