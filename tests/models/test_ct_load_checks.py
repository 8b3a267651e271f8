"""Damaged lowbit compressed-tensors checkpoints are refused with one ``error:`` line by every command.

A tiny Llama (or Qwen2, for biases) is RTN-quantized to 4 bits (group 32), written as
compressed-tensors, and one tensor or config entry is changed before the CLI loads it.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

pytestmark = pytest.mark.usefixtures("one_thread")

UP = "model.layers.0.mlp.up_proj"
RECIPE = {"name": "rtn-w4g32", "methods": [{"method": "rtn", "spec": {
    "type": "int", "bits": 4, "granularity": "group", "group_size": 32, "symmetric": False, "signed": False}}]}


def _write_ct(family: str, tmp_path: Path, tiny) -> Path:
    """A tiny ``family`` model quantized by RECIPE and written as compressed-tensors under ``tmp_path/ct``."""
    from lowbit.models.loading import load_model
    from lowbit.quantization import quantize, save_quantized

    model, tok = load_model(tiny.save(family, tmp_path / "fp"))
    quantize(model, RECIPE, torch.randint(0, tiny.vocab, (2, 16), generator=torch.Generator().manual_seed(0)),
             progress=False)
    out, _ = save_quantized(model, tok, None, tmp_path / "ct", "compressed-tensors")
    return out


@pytest.fixture()
def ct_dir(tmp_path, tiny) -> Path:
    """The tiny Llama as a lowbit compressed-tensors checkpoint."""
    return _write_ct("llama", tmp_path, tiny)


def _commands(folder: Path, text: Path, tmp_path: Path) -> list[tuple[str, ...]]:
    """Every command that loads a checkpoint: eval, generate, export."""
    return [("eval", str(folder), "--dataset", str(text), "--max-windows", "1", "--seqlen", "32"),
            ("generate", str(folder), "the cat", "--max-new-tokens", "2"),
            ("export", str(folder), str(tmp_path / "exported"), "--format", "fake-quant")]


def test_a_sound_checkpoint_runs_everywhere(cli, ct_dir, text_file, tmp_path):
    for command in _commands(ct_dir, text_file, tmp_path):
        code, _, err = cli(*command)
        assert code == 0, (command, err)


def test_g_idx_out_of_range(cli, one_error, ct_dir, text_file, tmp_path, tiny):
    tiny.edit_tensors(ct_dir, lambda t: t.update({f"{UP}.weight_g_idx": torch.arange(64, dtype=torch.int32) // 8}))
    for command in _commands(ct_dir, text_file, tmp_path):
        code, _, err = cli(*command)
        one_error(code, err, f"{UP}: weight_g_idx holds groups 0..7 but the layer has 2 scale groups (0..1)")


def test_missing_scale(cli, one_error, ct_dir, text_file, tiny):
    tiny.edit_tensors(ct_dir, lambda t: t.pop(f"{UP}.weight_scale"))
    code, _, err = cli(*_commands(ct_dir, text_file, ct_dir)[0])
    one_error(code, err, f"{UP}: the tensor 'weight_scale' is missing (has weight_packed, weight_shape, "
                         "weight_zero_point)")


def test_nan_scale(cli, one_error, ct_dir, text_file, tiny):
    def poison(t):
        t[f"{UP}.weight_scale"][0, 0] = float("nan")
    tiny.edit_tensors(ct_dir, poison)
    code, _, err = cli(*_commands(ct_dir, text_file, ct_dir)[0])
    one_error(code, err, f"{UP}.weight_scale holds NaN or Inf values")


def test_nan_dense_weight(cli, one_error, ct_dir, text_file, tiny):
    def poison(t):
        t["model.norm.weight"][1] = float("inf")
    tiny.edit_tensors(ct_dir, poison)
    code, _, err = cli(*_commands(ct_dir, text_file, ct_dir)[0])
    one_error(code, err, "1 tensor(s) hold NaN or Inf values (model.norm.weight)")


def test_config_narrower_than_the_packed_weights(cli, one_error, ct_dir, text_file, tiny):
    tiny.edit_config(ct_dir, lambda c: c.update(intermediate_size=96))
    code, _, err = cli(*_commands(ct_dir, text_file, ct_dir)[0])
    one_error(code, err, "mlp.down_proj: the checkpoint holds a 64x128 weight where the model of config.json "
                         "has a 64x96 one")


def test_dense_tensor_of_another_shape(cli, one_error, ct_dir, text_file, tiny):
    def cut(t):
        t["model.embed_tokens.weight"] = t["model.embed_tokens.weight"][:200].contiguous()
    tiny.edit_tensors(ct_dir, cut)
    code, _, err = cli(*_commands(ct_dir, text_file, ct_dir)[0])
    one_error(code, err, "model.embed_tokens.weight (file [200, 64], model [272, 64])")


def test_dense_tensor_of_integers(cli, one_error, ct_dir, text_file, tiny):
    def to_int(t):
        t["model.norm.weight"] = t["model.norm.weight"].to(torch.int32)
    tiny.edit_tensors(ct_dir, to_int)
    code, _, err = cli(*_commands(ct_dir, text_file, ct_dir)[0])
    one_error(code, err, "hold integers where the model holds floats (model.norm.weight (I32))")


def test_deleted_bias(cli, one_error, tmp_path, tiny, text_file):
    folder = _write_ct("qwen2", tmp_path, tiny)
    tiny.edit_tensors(folder, lambda t: t.pop("model.layers.1.self_attn.k_proj.bias"))
    code, _, err = cli(*_commands(folder, text_file, tmp_path)[0])
    one_error(code, err, "1 tensor(s) the model needs are missing", "model.layers.1.self_attn.k_proj.bias")


@pytest.mark.parametrize(("edit", "needle"), [
    (lambda g: g.pop("weights"), "quantization_config group 'group_0' has no 'weights' arguments"),
    (lambda g: g["weights"].pop("num_bits"), "the scheme argument 'num_bits' is missing"),
    (lambda g: g["weights"].update(group_size=None), "strategy is 'group' but group_size is None"),
])
def test_broken_scheme(cli, one_error, ct_dir, text_file, edit, needle, tiny):
    tiny.edit_config(ct_dir, lambda c: edit(c["quantization_config"]["config_groups"]["group_0"]))
    code, _, err = cli(*_commands(ct_dir, text_file, ct_dir)[0])
    one_error(code, err, needle)
