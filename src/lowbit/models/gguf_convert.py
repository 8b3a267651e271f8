"""Read a GGUF file through transformers (dequantized) and turn it into a plain HF model."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from lowbit.atomic import atomic_dir
from lowbit.errors import LowbitError

GGUF_MAGIC = b"GGUF"


def check_gguf(path: Path) -> None:
    """Raise a clear LowbitError if ``path`` is not a complete, readable GGUF file."""
    try:
        with open(path, "rb") as fh:
            magic = fh.read(4)
    except OSError as exc:
        raise LowbitError(f"cannot read GGUF file {path}: {exc.strerror}") from None
    if magic != GGUF_MAGIC:
        raise LowbitError(
            f"{path} is not a GGUF file (it does not start with the GGUF magic bytes); "
            "check the path or re-download the file"
        )
    try:
        from gguf import GGUFReader

        reader = GGUFReader(str(path))
        size = path.stat().st_size
        for t in reader.tensors:
            if t.data_offset + t.n_bytes > size:
                raise ValueError(f"tensor {t.name} extends past the end of the file")
    except LowbitError:
        raise
    except Exception as exc:  # gguf raises a variety of errors on damaged files
        raise LowbitError(
            f"GGUF file {path} is truncated or corrupt ({type(exc).__name__}: {str(exc)[:160]}); "
            "re-download or re-export it"
        ) from None


def gguf_string_field(path: Path, key: str) -> str | None:
    """A string metadata field of a GGUF file, or None when absent."""
    from gguf import GGUFReader

    field = GGUFReader(str(path)).fields.get(key)
    return None if field is None else str(field.contents())


def load_gguf_plain(path: Path, dtype: torch.dtype = torch.float32) -> tuple[Any, Any]:
    """Load a GGUF file dequantized, returning a *plain* transformers model and its tokenizer.

    transformers marks GGUF-loaded models as quantized and refuses to ``save_pretrained`` them,
    so the model is rebuilt from its config (without ``quantization_config``) and the
    dequantized state dict is loaded into it.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    check_gguf(path)
    folder, name = str(path.parent), path.name
    try:
        tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
        gguf_model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    except Exception as exc:
        raise LowbitError(
            f"transformers could not load GGUF file {path} ({type(exc).__name__}: {str(exc)[:200]}); "
            "its architecture may not be supported by transformers' GGUF loader"
        ) from None
    config = gguf_model.config
    if hasattr(config, "quantization_config"):
        delattr(config, "quantization_config")
    config.dtype = dtype
    pre = gguf_string_field(path, "tokenizer.ggml.pre")
    if pre:  # llama.cpp's pre-tokenizer name, needed to write this model back as GGUF
        config.lowbit_gguf_pre = pre
    plain = AutoModelForCausalLM.from_config(config, dtype=dtype)
    result = plain.load_state_dict(gguf_model.state_dict(), strict=False)
    if getattr(config, "tie_word_embeddings", False):
        plain.tie_weights()
    missing = [k for k in result.missing_keys if not (k.endswith("lm_head.weight") and config.tie_word_embeddings)]
    if missing:
        raise LowbitError(f"GGUF file {path} lacks weights for {', '.join(missing[:3])}; it cannot be used")
    plain.generation_config = gguf_model.generation_config
    plain.eval()
    return plain, tokenizer


def convert_gguf_to_hf(path: Path, out_dir: Path, source: dict[str, Any]) -> Path:
    """Convert a GGUF file into an fp32 safetensors HF checkpoint at ``out_dir`` (atomically)."""
    model, tokenizer = load_gguf_plain(path, torch.float32)
    with atomic_dir(out_dir) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        (tmp / "lowbit_source.json").write_text(json.dumps(source, indent=2))
    return out_dir
