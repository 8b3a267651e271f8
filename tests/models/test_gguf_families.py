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
