"""Damaged or mismatched checkpoints are refused with one ``error:`` line (exit 2, no traceback).

Each test builds a tiny safetensors checkpoint or GGUF file, damages one thing (a deleted,
re-typed, reshaped or NaN tensor; config.json; the tokenizer; a GGUF header, tensor type or
hyper-parameter) and runs the CLI in-process on it (compressed-tensors: test_ct_load_checks.py).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

pytestmark = pytest.mark.usefixtures("one_thread")

UP = "model.layers.0.mlp.up_proj"


def _eval(cli, model: Path, text: Path, *extra: str) -> tuple[int, str, str]:
    """``lowbit eval`` of ``model`` on one 32-token window of ``text``."""
    return cli("eval", str(model), "--dataset", str(text), "--max-windows", "1", "--seqlen", "32", *extra)


# ------------------------------------------------------------------------ safetensors directories
def test_a_sound_checkpoint_loads(cli, tiny_dir, text_file):
    code, out, err = _eval(cli, tiny_dir, text_file)
    assert code == 0, err


def test_deleted_tensor(cli, one_error, tiny_dir, text_file, tiny):
    tiny.edit_tensors(tiny_dir, lambda t: t.pop(f"{UP}.weight"))
    code, _, err = _eval(cli, tiny_dir, text_file)
    one_error(code, err, "1 tensor(s) the model needs are missing and would be randomly initialised",
                f"{UP}.weight", "config.json (model_type 'llama')")


def test_integer_dtype_for_a_float_weight(cli, one_error, tiny_dir, text_file, tiny):
    def to_int(t):
        t[f"{UP}.weight"] = (t[f"{UP}.weight"] * 100).to(torch.int32)
    tiny.edit_tensors(tiny_dir, to_int)
    code, _, err = _eval(cli, tiny_dir, text_file)
    one_error(code, err, "hold integers where the model holds floats", f"{UP}.weight (I32)")


def test_reshaped_tensor(cli, one_error, tiny_dir, text_file, tiny):
    def cut(t):
        t[f"{UP}.weight"] = t[f"{UP}.weight"][:, :32].contiguous()
    tiny.edit_tensors(tiny_dir, cut)
    code, _, err = _eval(cli, tiny_dir, text_file)
    one_error(code, err, "another shape", f"{UP}.weight (file [128, 32], model [128, 64])")


def test_unexpected_tensor(cli, one_error, tiny_dir, text_file, tiny):
    tiny.edit_tensors(tiny_dir, lambda t: t.update({"model.layers.0.mlp.extra.weight": torch.zeros(3)}))
    code, _, err = _eval(cli, tiny_dir, text_file)
    one_error(code, err, "fit no part of the model", "model.layers.0.mlp.extra.weight")


def test_nan_weight(cli, one_error, tiny_dir, text_file, tiny):
    def poison(t):
        t[f"{UP}.weight"][3, 5] = float("nan")
    tiny.edit_tensors(tiny_dir, poison)
    code, _, err = _eval(cli, tiny_dir, text_file)
    one_error(code, err, "1 tensor(s) hold NaN or Inf values", f"{UP}.weight")


def test_model_type_disagrees_with_the_weights(cli, one_error, tiny_dir, text_file, tiny):
    def to_gpt2(cfg):
        cfg.update(model_type="gpt2", architectures=["GPT2LMHeadModel"])
    tiny.edit_config(tiny_dir, to_gpt2)
    code, _, err = _eval(cli, tiny_dir, text_file)
    one_error(code, err, "are missing and would be randomly initialised", "fit no part of the model",
                "config.json (model_type 'gpt2') belongs to these weights")


def test_model_type_transformers_does_not_know(cli, one_error, tiny_dir, text_file, tiny):
    tiny.edit_config(tiny_dir, lambda cfg: cfg.update(model_type="zzunknown"))
    code, _, err = _eval(cli, tiny_dir, text_file)
    one_error(code, err, "config.json has model_type 'zzunknown', which transformers", "upgrade transformers")


def test_invalid_json_config(cli, one_error, tiny_dir, text_file):
    text = (tiny_dir / "config.json").read_text()
    (tiny_dir / "config.json").write_text(text.replace('"hidden_size"', "hidden_size", 1))
    code, _, err = _eval(cli, tiny_dir, text_file)
    one_error(code, err, f"{tiny_dir / 'config.json'} is not valid JSON (line ", "column")


def test_unreadable_tokenizer(cli, one_error, tiny_dir, text_file):
    (tiny_dir / "tokenizer.json").write_text("{not json")
    code, _, err = _eval(cli, tiny_dir, text_file)
    one_error(code, err, "could not load the tokenizer from tokenizer.json, tokenizer_config.json",
                "tokenizer.save_pretrained")


def test_missing_tokenizer(cli, one_error, tiny_dir, text_file):
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (tiny_dir / name).unlink()
    code, _, err = _eval(cli, tiny_dir, text_file)
    one_error(code, err, "has no tokenizer files", "copy them from the original model")


def test_remote_code_is_refused_by_default(cli, one_error, tiny_dir, text_file, tiny):
    def custom(cfg):
        cfg.update(model_type="zzcustom", architectures=["ZZForCausalLM"],
                   auto_map={"AutoConfig": "configuration_zz.ZZConfig", "AutoModelForCausalLM": "modeling_zz.ZZModel"})
    tiny.edit_config(tiny_dir, custom)
    code, _, err = _eval(cli, tiny_dir, text_file)
    one_error(code, err, "needs its own model code", "pass --trust-remote-code if you trust it")


class _Payload:
    def __reduce__(self):
        return (print, ("this must never run",))


def test_pickled_bin_is_refused(cli, one_error, tiny_dir, text_file):
    tensors = load_file(tiny_dir / "model.safetensors")
    (tiny_dir / "model.safetensors").unlink()
    torch.save({**tensors, "payload": _Payload()}, tiny_dir / "pytorch_model.bin")
    code, out, err = _eval(cli, tiny_dir, text_file)
    assert "this must never run" not in out
    one_error(code, err, f"{tiny_dir / 'pytorch_model.bin'} holds pickled Python objects beyond tensors",
                "weights_only=True", "convert it to safetensors")


# ------------------------------------------------------------------------ GGUF files
@pytest.fixture()
def tiny_gguf(tmp_path, tiny) -> Path:
    """The tiny Llama (untied head: 21 tensors) written by lowbit's GGUF exporter, Q8_0."""
    from lowbit.export.gguf import export_gguf
    from lowbit.models.loading import load_model

    model, tok = load_model(tiny.save("llama", tmp_path / "hf"))
    export_gguf(model, tok, tmp_path / "tiny.gguf", "Q8_0", "Q8_0")
    return tmp_path / "tiny.gguf"


def _gguf_edit(path: Path, edit) -> Path:
    """Apply ``edit(reader)`` to a GGUF file in place (a read-write memory map of its bytes)."""
    from gguf import GGUFReader

    reader = GGUFReader(str(path), "r+")
    edit(reader)
    reader.data.flush()
    del reader
    return path


def test_a_sound_gguf_loads(cli, tiny_gguf, text_file):
    code, _, err = _eval(cli, tiny_gguf, text_file)
    assert code == 0, err


def test_gguf_header_with_fewer_tensors(cli, one_error, tiny_gguf, text_file):
    def fewer(r):
        r.fields["GGUF.tensor_count"].parts[0][0] -= 3
    _gguf_edit(tiny_gguf, fewer)
    code, _, err = _eval(cli, tiny_gguf, text_file)
    one_error(code, err, f"GGUF file {tiny_gguf} is truncated or corrupt", "bytes follow the last tensor the header "
              "lists (blk.1.attn_norm.weight): the header lists fewer or smaller tensors than the file holds")


def test_gguf_without_some_weights(cli, one_error, tmp_path, tiny):
    """A well-formed GGUF that lacks tensors the config's model needs: refused, not randomly initialised."""
    import gguf

    from lowbit.export.gguf import export_gguf
    from lowbit.models.loading import load_model

    model, tok = load_model(tiny.save("llama", tmp_path / "hf"))
    full = tmp_path / "full.gguf"
    export_gguf(model, tok, full, "F32", "F32")
    reader = gguf.GGUFReader(str(full))
    writer = gguf.GGUFWriter(str(tmp_path / "part.gguf"), "llama")
    for field in reader.fields.values():
        if not field.name.startswith("GGUF.") and field.name != "general.architecture":
            writer.add_key_value(field.name, field.contents(), field.types[0],
                                 field.types[-1] if field.types[0] == gguf.GGUFValueType.ARRAY else None)
    for t in reader.tensors:
        if t.name != "blk.1.ffn_norm.weight":
            writer.add_tensor(t.name, t.data, raw_dtype=t.tensor_type)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    code, _, err = cli("eval", str(tmp_path / "part.gguf"), "--max-windows", "1")
    one_error(code, err, "1 tensor(s) the model needs are missing and would be randomly initialised "
              "(model.layers.1.post_attention_layernorm.weight)", "re-download or re-export the GGUF file")


def test_gguf_tensor_type_changed(cli, one_error, tiny_gguf, text_file):
    def retype(r):
        r.tensors[1].field.parts[4][0] = 0  # blk.0.attn_q.weight: Q8_0 -> F32
    _gguf_edit(tiny_gguf, retype)
    code, _, err = _eval(cli, tiny_gguf, text_file)
    one_error(code, err, "truncated or corrupt", "after blk.0.attn_q.weight (F32 [64, 64])",
                "type or shape in the header does not match the data")


def test_gguf_shapes_disagree_with_its_config(cli, one_error, tiny_gguf, text_file):
    def narrower(r):
        field = r.fields["llama.feed_forward_length"]
        field.parts[field.data[0]][0] = 96  # the tensors stay 128 wide
    _gguf_edit(tiny_gguf, narrower)
    code, _, err = _eval(cli, tiny_gguf, text_file)
    one_error(code, err, "another shape", "mlp.up_proj.weight (file [128, 64], model [96, 64])")


def test_gguf_architecture_transformers_cannot_read(cli, one_error, tiny_gguf, text_file):
    data = tiny_gguf.read_bytes()
    at = data.index(b"llama", data.index(b"general.architecture"))
    tiny_gguf.write_bytes(data[:at] + b"zzzzz" + data[at + 5:])
    for command in (("info", str(tiny_gguf)), ("eval", str(tiny_gguf), "--dataset", str(text_file))):
        code, _, err = cli(*command)
        one_error(code, err, "architecture 'zzzzz'", "transformers' GGUF loader cannot read")


def test_gguf_loaded_model_names_its_architecture(tiny_gguf, tmp_path, tiny):
    from lowbit.models.loading import load_model
    from lowbit.quantization import quantize, save_quantized

    model, tok = load_model(tiny_gguf)
    assert model.config.architectures == ["LlamaForCausalLM"]
    recipe = {"name": "rtn", "methods": [{"method": "rtn", "spec": {"type": "int", "bits": 8,
                                                                    "granularity": "channel"}}]}
    quantize(model, recipe, torch.randint(0, tiny.vocab, (2, 16)), progress=False)
    for fmt in ("compressed-tensors", "fake-quant"):
        save_quantized(model, tok, None, tmp_path / fmt, fmt)
        assert json.loads((tmp_path / fmt / "config.json").read_text())["architectures"] == ["LlamaForCausalLM"]
