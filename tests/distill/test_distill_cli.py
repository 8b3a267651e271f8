"""`lowbit prune --structured` then `lowbit distill` on a small saved model: the student comes out smaller, trained,
loadable by plain transformers; a teacher with another vocabulary is refused before work."""

from __future__ import annotations

import json

from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM


def test_structured_prune_then_distill(run_cli, small_model_dir, data_dir, tmp_path):
    student = tmp_path / "student"
    code, stdout, err = run_cli("prune", str(small_model_dir), "--structured", "width", "--intermediate-size", "64",
                                "--hidden-size", "48", "--nsamples", "4", "--seqlen", "64", "--out", str(student),
                                "--json")
    assert code == 0, err
    assert json.loads(stdout)["config"]["hidden_size"] == 48
    out = tmp_path / "distilled"
    code, stdout, err = run_cli("distill", str(student), "--teacher", str(small_model_dir), "--steps", "4",
                                "--batch-size", "2", "--seqlen", "64", "--lr", "1e-3", "--feature-weight", "1",
                                "--out", str(out), "--json")
    assert code == 0, err
    summary = json.loads(stdout)
    assert summary["steps"] == 4 and summary["tokens"] == 4 * 2 * 64
    loaded = AutoModelForCausalLM.from_pretrained(out)
    assert loaded.config.hidden_size == 48 and not any("lowbit_kd" in n for n, _ in loaded.named_parameters())
    assert json.loads((out / "distill.json").read_text())["settings"]["feature_weight"] == 1.0


def test_teacher_with_another_vocabulary_is_refused(run_cli, clean_error, small_model_dir, tmp_path):
    other = tmp_path / "other"
    LlamaForCausalLM(LlamaConfig(vocab_size=300, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                 num_attention_heads=2, num_key_value_heads=1)).save_pretrained(other)
    out = tmp_path / "out"
    code, _, err = run_cli("distill", str(small_model_dir), "--teacher", str(other), "--steps", "2", "--out", str(out))
    clean_error(code, err, "vocabulary", "same tokenizer")
    assert not out.exists()
