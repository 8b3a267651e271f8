"""Tiny, valid inputs the robustness corpus mutates: a byte-level BPE tokenizer, a 2-block Llama saved as a
Hugging Face directory, its compressed-tensors quantization, a GGUF of it, and a little text."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

TEXT = ("The quick brown fox jumps over the lazy dog. A stitch in time saves nine. "
        "Quantization maps real numbers to a small set of levels. ") * 40


@dataclass(frozen=True)
class Artifacts:
    """Paths of the valid inputs (never mutated in place: cases copy what they change)."""

    hf_dir: Path
    ct_dir: Path
    gguf: Path
    text: Path


def tiny_tokenizer(text: str, vocab: int = 300):
    """A byte-level BPE tokenizer trained on ``text`` (gpt2-style, so GGUF export can carry it)."""
    from tokenizers import ByteLevelBPETokenizer
    from transformers import PreTrainedTokenizerFast

    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator([text], vocab_size=vocab, min_frequency=1, special_tokens=["<|endoftext|>"],
                            show_progress=False)
    return PreTrainedTokenizerFast(tokenizer_object=bpe._tokenizer, eos_token="<|endoftext|>",
                                   bos_token="<|endoftext|>", unk_token="<|endoftext|>")


def tiny_model(vocab: int) -> torch.nn.Module:
    """2 blocks, hidden 64 (groups of 32 and 64 divide every linear), untied head."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                      tie_word_embeddings=False)
    return LlamaForCausalLM(cfg).eval()


def build_artifacts(root: Path) -> Artifacts:
    """Write the valid inputs under ``root`` (about 1 MB in all)."""
    from lowbit.export.gguf import export_gguf
    from lowbit.quantization import quantize, save_quantized

    root.mkdir(parents=True, exist_ok=True)
    text = root / "text.txt"
    text.write_text(TEXT)
    tok = tiny_tokenizer(TEXT)
    model = tiny_model(len(tok))
    hf_dir = root / "tiny-llama"
    model.save_pretrained(hf_dir)
    tok.save_pretrained(hf_dir)
    calib = torch.randint(0, len(tok), (8, 32), generator=torch.Generator().manual_seed(0))
    report = quantize(model, {"name": "rtn-w4g32", "methods": [{"method": "rtn", "spec": {
        "type": "int", "bits": 4, "granularity": "group", "group_size": 32, "symmetric": False}}]}, calib,
        progress=False)
    ct_dir, _ = save_quantized(model, tok, report, root / "tiny-rtn-w4g32", "compressed-tensors")
    gguf = root / "tiny.gguf"
    export_gguf(tiny_model(len(tok)), tok, gguf, "Q8_0", "Q8_0")
    return Artifacts(hf_dir, ct_dir, gguf, text)
