"""GGUF export of the Qwen families (and Llama / Mistral): the file transformers' GGUF reader loads gives the
source model's logits (F32 tensors: exact), biases and q/k norms included, rotary rows in the family's order."""

from __future__ import annotations

import pytest
import torch

pytestmark = pytest.mark.usefixtures("one_thread")


def _qwen3_128(out, tiny):
    """A tiny Qwen3 with head_dim 128: transformers' GGUF reader takes Qwen3Config's default head_dim (it maps no
    key_length for qwen3), so the round trip needs the default; the file itself records key_length."""
    from transformers import AutoModelForCausalLM, Qwen3Config

    torch.manual_seed(0)
    cfg = Qwen3Config(vocab_size=tiny.vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=2, num_key_value_heads=1, head_dim=128, max_position_embeddings=128,
                      tie_word_embeddings=True)
    AutoModelForCausalLM.from_config(cfg).save_pretrained(out)
    tiny.tokenizer().save_pretrained(out)
    return out


@pytest.mark.parametrize("family", ["llama", "mistral", "qwen2", "qwen3"])
def test_gguf_of_a_family_reads_back_with_the_same_logits(family, tiny, tmp_path):
    from lowbit.export.gguf import export_gguf
    from lowbit.models.loading import load_model

    src = _qwen3_128(tmp_path / "fp", tiny) if family == "qwen3" else tiny.save(family, tmp_path / "fp")
    model, tok = load_model(src)
    ids = torch.randint(0, tiny.vocab, (1, 16), generator=torch.Generator().manual_seed(0))
    export_gguf(model, tok, tmp_path / "m.gguf", "F32", "F32")
    back, _ = load_model(tmp_path / "m.gguf")  # transformers' GGUF reader
    with torch.no_grad():
        assert (back(ids).logits - model(ids).logits).abs().max().item() <= 1e-5  # measured 0.0


@pytest.mark.parametrize("family,pairs", [
    ("phi3", {"blk.0.attn_qkv.weight": "model.layers.0.self_attn.qkv_proj.weight",
              "blk.1.ffn_up.weight": "model.layers.1.mlp.gate_up_proj.weight", "output.weight": "lm_head.weight"}),
    ("gemma", {"blk.0.attn_norm.weight": "model.layers.0.input_layernorm.weight",
               "output_norm.weight": "model.norm.weight", "blk.1.attn_q.weight": "model.layers.1.self_attn.q_proj.weight"}),
    ("gemma2", {"blk.0.post_attention_norm.weight": "model.layers.0.post_attention_layernorm.weight",
                "blk.0.ffn_norm.weight": "model.layers.0.pre_feedforward_layernorm.weight",
                "blk.1.post_ffw_norm.weight": "model.layers.1.post_feedforward_layernorm.weight"}),
])
def test_gguf_layout_of_phi3_and_gemma(family, pairs, tiny, tmp_path):
    """What llama.cpp reads (its logits agree with lowbit's, test_llama_cpp_runs_the_export, where a build is
    installed): phi3's fused qkv / gate_up as attn_qkv / ffn_up, Gemma's norms stored as 1 + w, their hyper-parameters."""
    import numpy as np
    from gguf import GGUFReader

    from lowbit.export.gguf import export_gguf
    from lowbit.models.loading import load_model

    model, tok = load_model(tiny.save(family, tmp_path / "fp"))
    export_gguf(model, tok, tmp_path / "m.gguf", "F32", "F32")
    reader = GGUFReader(str(tmp_path / "m.gguf"))
    tensors = {t.name: np.asarray(t.data) for t in reader.tensors}
    state = model.state_dict()
    for gname, key in pairs.items():
        want = state[key].float().numpy() + (1 if family != "phi3" and "norm" in key else 0)
        assert np.array_equal(tensors[gname].reshape(want.shape), want), gname
    fields = reader.fields
    assert bytes(fields["general.architecture"].parts[-1]).decode() == family
    if family != "phi3":
        assert "output.weight" not in tensors  # tied head: llama.cpp reads token_embd
        assert int(fields[f"{family}.attention.key_length"].parts[-1][0]) == model.config.head_dim
    if family == "gemma2":
        assert float(fields["gemma2.final_logit_softcapping"].parts[-1][0]) == model.config.final_logit_softcapping
        assert int(fields["gemma2.attention.sliding_window"].parts[-1][0]) == model.config.sliding_window


def test_gemma2_with_a_query_scalar_llama_cpp_does_not_use_is_refused(tiny, tmp_path):
    from lowbit.errors import LowbitError
    from lowbit.export.gguf import export_gguf
    from lowbit.models.loading import load_model

    import json

    src = tiny.save("gemma2", tmp_path / "fp")
    cfg = json.loads((src / "config.json").read_text())
    (src / "config.json").write_text(json.dumps(cfg | {"query_pre_attn_scalar": 256}))  # 27B-style scaling
    model, tok = load_model(src)
    with pytest.raises(LowbitError, match="query_pre_attn_scalar is 256, not 16"):
        export_gguf(model, tok, tmp_path / "m.gguf", "F32", "F32")
    assert not (tmp_path / "m.gguf").exists()


def test_qwen3_gguf_records_its_head_width(tiny, tmp_path):
    """Qwen3's heads are wider than hidden / heads: llama.cpp reads the width from attention.key_length."""
    from gguf import GGUFReader

    from lowbit.export.gguf import export_gguf
    from lowbit.models.loading import load_model

    model, tok = load_model(_qwen3_128(tmp_path / "fp", tiny))
    export_gguf(model, tok, tmp_path / "m.gguf", "Q8_0")
    fields = GGUFReader(str(tmp_path / "m.gguf")).fields
    assert bytes(fields["general.architecture"].parts[-1]).decode() == "qwen3"
    assert int(fields["qwen3.attention.key_length"].parts[-1][0]) == 128
    assert bytes(fields["tokenizer.ggml.pre"].parts[-1]).decode() == "qwen2"


def _llama_256(out, tiny):
    """A tiny Llama whose rows are whole 256-weight super-blocks (hidden 256, MLP 512)."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=tiny.vocab, hidden_size=256, intermediate_size=512, num_hidden_layers=8,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)
    AutoModelForCausalLM.from_config(cfg).save_pretrained(out)
    tiny.tokenizer().save_pretrained(out)
    return out


def test_q4_k_m_mix_with_an_imatrix_reads_back_close(tiny, tmp_path):
    """llama.cpp's Q4_K_M mix (Q6_K for the head and for attn_v / ffn_down in the layers use_more_bits picks),
    K-quants weighted by an imatrix, read back by transformers' GGUF reader (gguf-py's dequantizers)."""
    from collections import Counter

    from lowbit.export.gguf import export_gguf
    from lowbit.export.gguf_mix import mix_type
    from lowbit.export.imatrix import collect_imatrix
    from lowbit.models.loading import load_model

    model, tok = load_model(_llama_256(tmp_path / "fp", tiny))
    ids = torch.randint(0, tiny.vocab, (2, 32), generator=torch.Generator().manual_seed(0))
    imatrix = collect_imatrix(model, ids)
    assert imatrix["model.layers.0.mlp.down_proj"].shape == (512,)
    report = export_gguf(model, tok, tmp_path / "m.gguf", "Q4_K_M", "Q8_0", imatrix)
    types = {r.name: r.type for r in report.tensors}
    assert types["output.weight"] == "Q6_K" and types["blk.0.attn_v.weight"] == "Q6_K"
    assert types["blk.2.ffn_down.weight"] == "Q4_K" and types["blk.3.ffn_down.weight"] == "Q6_K"  # (3-1) % 3 == 2
    assert Counter(types.values())["Q4_K"] >= 30
    assert [mix_type(f"blk.{i}.attn_v.weight", "Q4_K_M", 8) for i in range(8)].count("Q6_K") == 4
    back, _ = load_model(tmp_path / "m.gguf")
    with torch.no_grad():
        ref, got = model(ids).logits, back(ids).logits
    assert ((got - ref).norm() / ref.norm()).item() < 0.3  # measured 0.18 (0.20 without the imatrix)


def test_k_types_fall_back_on_narrow_rows_as_llama_cpp(tiny, tmp_path):
    from lowbit.export.gguf import export_gguf
    from lowbit.models.loading import load_model

    model, tok = load_model(tiny.save("llama", tmp_path / "fp"))  # 64-wide rows: no 256-weight super-blocks
    report = export_gguf(model, tok, tmp_path / "m.gguf", "Q6_K")
    q = next(r for r in report.tensors if r.name == "blk.0.attn_q.weight")
    assert q.type == "Q8_0" and "not a multiple of 256" in q.note
    load_model(tmp_path / "m.gguf")  # a valid file


def test_cli_export_q4_k_m_with_an_imatrix(run_cli, tiny, tmp_path, text_file, clean_error):
    src = _llama_256(tmp_path / "fp", tiny)
    code, out, err = run_cli("export", str(src), str(tmp_path / "m.gguf"), "--format", "gguf", "--type", "Q4_K_M",
                             "--imatrix", str(text_file), "--nsamples", "2", "--seqlen", "32")
    assert code == 0, err
    assert (tmp_path / "m.gguf").stat().st_size > 0 and "re-quantized" in out
    clean_error(*run_cli("export", str(src), str(tmp_path / "d"), "--imatrix", str(text_file))[::2],
                "--imatrix", "--format gguf")


@pytest.mark.parametrize("family", ["qwen2", "llama", "phi3", "gemma", "gemma2"])
def test_llama_cpp_runs_the_export(family, tiny, tmp_path):
    """llama.cpp itself (when a build is installed) reads lowbit's GGUF of a tiny random model and gives its logits
    (its kernels round activations to 8 bits, so a small difference remains)."""
    from lowbit.export.gguf import export_gguf
    from lowbit.models.loading import load_model
    from lowbit.runtime import llamacpp

    if not llamacpp.available():
        pytest.skip("no llama.cpp build (llama-cpp-python or llama-cpp-py-sync) in this environment")
    model, tok = load_model(tiny.save(family, tmp_path / "fp"))
    export_gguf(model, tok, tmp_path / "m.gguf", "F32", "F32")
    ids = torch.randint(0, tiny.vocab, (2, 32), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ours = model(ids).logits
    theirs = torch.from_numpy(llamacpp.logits(tmp_path / "m.gguf", ids))
    rel = ((theirs - ours).norm() / ours.norm()).item()
    assert rel < 1e-2, rel  # measured 3e-5 (gemma) to 8.2e-4 (gemma2); a wrong layout is O(1)
