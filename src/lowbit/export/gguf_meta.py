"""GGUF metadata for the transformers families llama.cpp runs that lowbit exports (llama, mistral, qwen2, qwen3,
phi3, gemma, gemma2): hyper-parameters, each family's tensor fix-ups, and a GPT-2 style BPE vocabulary.

llama.cpp reads the tokenizer from the file itself, so it is rebuilt here from the HF fast
tokenizer: tokens in id order, their types (control for special added tokens), BPE merges,
special ids and the chat template.  ``tokenizer.ggml.pre`` names llama.cpp's pre-tokenizer;
it is taken from the source GGUF when the model came from one (``config.lowbit_gguf_pre``),
else ``default``.
"""

from __future__ import annotations

import json
from typing import Any

from lowbit.arch import ARCHITECTURES
from lowbit.errors import LowbitError

DEFAULT_PRE = {"qwen2": "qwen2", "qwen3": "qwen2"}  # llama.cpp's pre-tokenizer of each family's BPE
GGUF_ARCH = {t: a.gguf for t, a in ARCHITECTURES.items() if a.gguf}  # HF model_type -> GGUF architecture (lowbit.arch)


def gguf_arch(config: Any) -> str:
    arch = GGUF_ARCH.get(getattr(config, "model_type", ""))
    if arch is None:
        raise LowbitError(f"GGUF export supports model types {', '.join(sorted(GGUF_ARCH))}, not "
                          f"{getattr(config, 'model_type', '?')!r}; use --format compressed-tensors")
    return arch


def check_gguf_config(config: Any, arch: str) -> None:
    """Refuse settings of a family that llama.cpp's graph for ``arch`` would not reproduce."""
    rope = getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {}
    kind = rope.get("rope_type", rope.get("type", "default")) if isinstance(rope, dict) else "default"
    if kind not in ("default", None):
        raise LowbitError(f"GGUF export writes unscaled RoPE; this {arch} model uses {kind!r} RoPE scaling "
                          f"(convert it with llama.cpp's convert_hf_to_gguf.py)")
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    if arch == "gemma2" and getattr(config, "query_pre_attn_scalar", head_dim) != head_dim:
        raise LowbitError("llama.cpp scales gemma2 attention by 1/sqrt(head_dim); this model's query_pre_attn_scalar "
                          f"is {config.query_pre_attn_scalar}, not {head_dim}")
    if arch == "phi3" and getattr(config, "partial_rotary_factor", 1.0) not in (None, 1.0):
        raise LowbitError("GGUF export of phi3 writes full-width RoPE; this model rotates part of each head")


def adjust_tensor(arch: str, key: str, tensor: Any) -> Any:
    """A state-dict tensor as llama.cpp's ``arch`` reads it: Gemma's RMSNorms scale by ``1 + w``, so their weights
    are stored plus one (as convert_hf_to_gguf does)."""
    if arch in ("gemma", "gemma2") and key.endswith("norm.weight"):
        return tensor.float() + 1
    return tensor


def write_hparams(writer: Any, config: Any, arch: str = "llama") -> None:
    """Model hyper-parameters (llama architecture keys, and each family's own)."""
    check_gguf_config(config, arch)
    heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(heads)
    writer.add_head_count_kv(getattr(config, "num_key_value_heads", None) or heads)
    writer.add_rope_freq_base(float(getattr(config, "rope_theta", None) or
                                    (getattr(config, "rope_parameters", None) or {}).get("rope_theta", 10000.0)))
    writer.add_layer_norm_rms_eps(float(config.rms_norm_eps))
    writer.add_rope_dimension_count(head_dim)
    if head_dim != config.hidden_size // heads or arch in ("gemma", "gemma2"):  # heads wider than hidden / heads
        writer.add_key_length(head_dim)
        writer.add_value_length(head_dim)
    writer.add_vocab_size(config.vocab_size)
    if arch == "gemma2":
        for value, add in ((config.attn_logit_softcapping, writer.add_attn_logit_softcapping),
                           (config.final_logit_softcapping, writer.add_final_logit_softcapping),
                           (config.sliding_window, writer.add_sliding_window)):
            if value is not None:
                add(value)
    if arch == "phi3":
        original = getattr(config, "original_max_position_embeddings", None)
        if original:
            writer.add_rope_scaling_orig_ctx_len(int(original))
        if getattr(config, "sliding_window", None):
            writer.add_sliding_window(int(config.sliding_window))


def _merges(model: dict[str, Any]) -> list[str]:
    merges = model.get("merges") or []
    return [m if isinstance(m, str) else " ".join(m) for m in merges]


def write_tokenizer(writer: Any, tokenizer: Any, config: Any) -> None:
    """The BPE vocabulary, merges, special ids and chat template."""
    import gguf

    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        raise LowbitError("GGUF export needs a fast (tokenizers) tokenizer to write the vocabulary")
    spec = json.loads(backend.to_str())
    model = spec.get("model", {})
    if model.get("type") != "BPE":
        raise LowbitError(f"GGUF export writes BPE vocabularies; this tokenizer is {model.get('type')!r}")
    vocab: dict[str, int] = dict(model["vocab"])
    special = {t["content"]: t["id"] for t in spec.get("added_tokens", []) if t.get("special")}
    added = {t["content"]: t["id"] for t in spec.get("added_tokens", [])}
    vocab.update(added)
    size = max(config.vocab_size, max(vocab.values()) + 1)
    tokens = [f"[PAD{i}]" for i in range(size)]
    types = [gguf.TokenType.UNUSED] * size
    for text, i in vocab.items():
        tokens[i] = text
        types[i] = (gguf.TokenType.CONTROL if text in special else
                    gguf.TokenType.USER_DEFINED if text in added else gguf.TokenType.NORMAL)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(getattr(config, "lowbit_gguf_pre", None) or DEFAULT_PRE.get(config.model_type, "default"))
    writer.add_token_list(tokens)
    writer.add_token_types([int(t) for t in types])
    writer.add_token_merges(_merges(model))
    for attr, add in (("bos_token_id", writer.add_bos_token_id), ("eos_token_id", writer.add_eos_token_id),
                      ("unk_token_id", writer.add_unk_token_id), ("pad_token_id", writer.add_pad_token_id)):
        value = getattr(tokenizer, attr, None)
        if value is not None:
            add(int(value))
    writer.add_add_bos_token(bool(getattr(tokenizer, "add_bos_token", False)))
    template = getattr(tokenizer, "chat_template", None)
    if isinstance(template, str):
        writer.add_chat_template(template)
