"""Tiny checkpoints for the loader tests: a byte-level BPE tokenizer and one small model per family.

Every model is built from a config (hidden 64, 2 blocks, vocab 272) with random weights; nothing
is downloaded.  The tokenizer has 256 byte tokens, 15 merges and ``<|endoftext|>``: 272 ids, so
its vocabulary matches the models' and transformers' GGUF reader accepts it.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch

VOCAB = 272
EOS = VOCAB - 1
_MERGES = [("t", "h"), ("Ġ", "t"), ("e", "r"), ("i", "n"), ("a", "n"), ("Ġ", "a"), ("o", "n"), ("r", "e"),
           ("e", "s"), ("o", "r"), ("Ġ", "s"), ("a", "t"), ("e", "n"), ("Ġ", "o"), ("e", "d")]


def tiny_tokenizer() -> Any:
    """A fast byte-level BPE tokenizer of ``VOCAB`` ids (no download)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {c: i for i, c in enumerate(sorted(pre_tokenizers.ByteLevel.alphabet()))}
    for a, b in _MERGES:
        vocab[a + b] = len(vocab)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=_MERGES))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(["<|endoftext|>"])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|endoftext|>", eos_token="<|endoftext|>")


def family_config(family: str) -> Any:
    """A tiny config of ``family`` (a key of ``lowbit.arch.ARCHITECTURES``, or one of the families only the
    architecture matrix covers: gemma2, gemma3, mixtral, qwen2_moe, qwen3_moe)."""
    import transformers as T

    ids = dict(bos_token_id=EOS, eos_token_id=EOS, pad_token_id=None)
    base = dict(vocab_size=VOCAB, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                max_position_embeddings=256, **ids)
    llama_like = dict(intermediate_size=128, num_key_value_heads=2, **base)
    configs = {
        "llama": lambda: T.LlamaConfig(tie_word_embeddings=False, **llama_like),
        "mistral": lambda: T.MistralConfig(**llama_like),
        "qwen2": lambda: T.Qwen2Config(tie_word_embeddings=True, **llama_like),  # q/k/v biases, tied head
        "qwen3": lambda: T.Qwen3Config(head_dim=16, **llama_like),  # q/k norms
        "gemma": lambda: T.GemmaConfig(head_dim=16, **llama_like),  # tied head, scaled embedding
        "phi3": lambda: T.Phi3Config(**llama_like),  # fused qkv and gate_up
        "phi": lambda: T.PhiConfig(intermediate_size=128, **base),  # biases everywhere, partial rotary
        "opt": lambda: T.OPTConfig(ffn_dim=128, word_embed_proj_dim=64, **base),
        "gpt2": lambda: T.GPT2Config(vocab_size=VOCAB, n_embd=64, n_layer=2, n_head=4, n_positions=256,
                                     **ids),  # Conv1D layers
        "gemma2": lambda: T.Gemma2Config(head_dim=16, sliding_window=16, query_pre_attn_scalar=16,  # as 2B / 9B
                                         **llama_like),  # soft-capping, 4 norms
        "gemma3": lambda: T.Gemma3TextConfig(head_dim=16, sliding_window=16, **llama_like),  # q/k norms, local RoPE
        "gemma3_text": lambda: T.Gemma3TextConfig(head_dim=16, sliding_window=16, **llama_like),  # its model_type
        "mixtral": lambda: T.MixtralConfig(num_local_experts=4, num_experts_per_tok=2, **llama_like),
        "qwen2_moe": lambda: T.Qwen2MoeConfig(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32,
                                              shared_expert_intermediate_size=64, **llama_like),
        "qwen3_moe": lambda: T.Qwen3MoeConfig(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32,
                                              head_dim=16, **llama_like),
    }
    return configs[family]()


def save_tiny(family: str, out: Path, seed: int = 0) -> Path:
    """Save a randomly initialised tiny ``family`` model and the tiny tokenizer to ``out``."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(family_config(family))
    model.save_pretrained(out)
    tiny_tokenizer().save_pretrained(out)
    return out


def edit_tensors(folder: Path, edit: Callable[[dict[str, torch.Tensor]], Any]) -> Path:
    """Rewrite ``folder/model.safetensors`` with ``edit(tensors)`` applied in place."""
    from safetensors.torch import load_file, save_file

    path = folder / "model.safetensors"
    tensors = load_file(path)
    edit(tensors)
    save_file(tensors, path, metadata={"format": "pt"})
    return folder


def edit_config(folder: Path, edit: Callable[[dict[str, Any]], Any]) -> Path:
    """Rewrite ``folder/config.json`` with ``edit(config dict)`` applied in place."""
    cfg = json.loads((folder / "config.json").read_text())
    edit(cfg)
    (folder / "config.json").write_text(json.dumps(cfg, indent=2))
    return folder


class Tiny:
    """What the tests use: ``save(family, out)``, ``vocab``, ``tokenizer()``, ``edit_tensors`` / ``edit_config``."""

    vocab = VOCAB
    save = staticmethod(save_tiny)
    tokenizer = staticmethod(tiny_tokenizer)
    edit_tensors = staticmethod(edit_tensors)
    edit_config = staticmethod(edit_config)


@pytest.fixture()
def tiny() -> type[Tiny]:
    """Builders of the tiny checkpoints (test modules cannot import conftest under importlib mode)."""
    return Tiny


@pytest.fixture()
def tiny_dir(tmp_path: Path) -> Path:
    """A saved tiny Llama (untied head) with its tokenizer."""
    return save_tiny("llama", tmp_path / "llama")


@pytest.fixture()
def text_file(tmp_path: Path) -> Path:
    """A small evaluation text (a few hundred tokens for the tiny tokenizer)."""
    path = tmp_path / "text.txt"
    path.write_text(" ".join(f"the cat sat on the mat number {i} and then it ran." for i in range(40)))
    return path


@pytest.fixture()
def cli(run_cli, capsys):
    """``run_cli`` with what the test's set-up printed (checkpoints being written) dropped first."""
    def run(*argv: str) -> tuple[int, str, str]:
        capsys.readouterr()
        return run_cli(*argv)
    return run


@pytest.fixture()
def one_error(clean_error):
    """``clean_error`` and nothing else on stderr: exactly one line."""
    def check(code: int, err: str, *needles: str) -> None:
        clean_error(code, err, *needles)
        assert len(err.splitlines()) == 1, err
    return check


@pytest.fixture()
def one_thread():
    """torch on one thread for the tiny models: threads only add start-up and, on a busy 2-core machine,
    oversubscription (the family round trips took 20 s with 2 threads under load, 4.7 s with one)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
