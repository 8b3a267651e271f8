"""Read a GGUF file through transformers (dequantized) and turn it into a plain HF model."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from lowbit.atomic import atomic_dir
from lowbit.checkpoint import LoadReport, TensorMeta, compare_tensors, finite_state, quiet_loading
from lowbit.errors import LowbitError

GGUF_MAGIC = b"GGUF"
GGUF_FIX = "re-download or re-export the GGUF file"


def _padded(n: int, alignment: int) -> int:
    return -(-n // alignment) * alignment


def _check_tensor_layout(reader: Any, size: int) -> None:
    """Tensor data must follow each other in header order, each padded to the alignment (llama.cpp's
    rule), and end the file (writers pad only up to the alignment): a tensor whose header type or shape
    disagrees with its bytes breaks the chain, a header listing fewer tensors leaves bytes over."""
    expected, previous = 0, None
    for t in reader.tensors:
        offset = int(t.data_offset) - int(reader.data_offset)
        if offset != expected:
            after = "" if previous is None else (f" after {previous.name} ({previous.tensor_type.name} "
                                                 f"{[int(d) for d in previous.shape]})")
            raise ValueError(f"tensor {t.name} starts at data byte {offset} but the header's types and shapes place "
                             f"it at {expected}{after}: a tensor type or shape in the header does not match the data")
        if int(t.data_offset) + int(t.n_bytes) > size:
            raise ValueError(f"tensor {t.name} extends past the end of the file")
        expected += _padded(int(t.n_bytes), int(reader.alignment))
        previous = t
    if previous is not None:
        left = size - int(previous.data_offset) - int(previous.n_bytes)
        if left >= int(reader.alignment):
            raise ValueError(f"{left} bytes follow the last tensor the header lists ({previous.name}): the header "
                             "lists fewer or smaller tensors than the file holds")


def check_gguf(path: Path) -> None:
    """Raise a clear LowbitError if ``path`` is not a complete, consistent GGUF file."""
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

        _check_tensor_layout(GGUFReader(str(path)), path.stat().st_size)
    except Exception as exc:  # gguf raises a variety of errors on damaged files
        raise LowbitError(
            f"GGUF file {path} is truncated or corrupt ({type(exc).__name__}: {str(exc)[:300]}); {GGUF_FIX}"
        ) from None


def gguf_string_field(path: Path, key: str) -> str | None:
    """A string metadata field of a GGUF file, or None when absent."""
    from gguf import GGUFReader

    field = GGUFReader(str(path)).fields.get(key)
    return None if field is None else str(field.contents())


def _gguf_error(path: Path, exc: Exception, what: str) -> LowbitError:
    """transformers' failure to read ``what`` (the model, its config) from a GGUF file, as one line."""
    arch = gguf_string_field(path, "general.architecture")
    if "not supported" in str(exc):
        return LowbitError(f"GGUF file {path} holds architecture {arch!r}, which transformers' GGUF loader cannot "
                           "read; use the model's Hugging Face checkpoint, or a GGUF of an architecture transformers "
                           "reads (llama, mistral, qwen2, qwen3, phi3, gemma, gpt2, ...)")
    return LowbitError(f"transformers could not read the {what} of GGUF file {path} (architecture {arch!r}; "
                       f"{type(exc).__name__}: {str(exc)[:200]}); {GGUF_FIX}, or use the model's Hugging Face checkpoint")


def gguf_config(path: Path) -> Any:
    """The transformers config of a GGUF file (a LowbitError where transformers cannot read it)."""
    from transformers import AutoConfig

    try:
        with quiet_loading():
            return AutoConfig.from_pretrained(str(path.parent), gguf_file=path.name)
    except Exception as exc:
        raise _gguf_error(path, exc, "config") from None


def _load_gguf_model(path: Path) -> tuple[Any, dict[str, Any]]:
    """transformers' dequantized model of a GGUF file and its loading info (what it could not fill)."""
    from transformers import AutoModelForCausalLM

    try:
        with quiet_loading(stderr=True):
            return AutoModelForCausalLM.from_pretrained(
                str(path.parent), gguf_file=path.name, dtype=torch.float32, output_loading_info=True,
                ignore_mismatched_sizes=True)
    except Exception as exc:
        raise _gguf_error(path, exc, "weights") from None


def _check_gguf_model(path: Path, gguf_model: Any, info: dict[str, Any], plain: Any) -> None:
    """The loader report of a GGUF load: every tensor of the config's model came from the file, with the
    config's shape (transformers' GGUF reader takes any shape), all finite."""
    report = LoadReport(f"GGUF file {path}", GGUF_FIX, unexpected=sorted(info.get("unexpected_keys") or ()))
    missing = set(info.get("missing_keys") or ())
    found = {k: TensorMeta(tuple(t.shape), "F32") for k, t in gguf_model.state_dict().items() if k not in missing}
    compare_tensors(report, plain.state_dict(), found, plain)
    finite_state(report, gguf_model).check()


def load_gguf_tokenizer(path: Path) -> Any:
    """The tokenizer a GGUF file carries (a LowbitError naming the file when transformers cannot build it)."""
    from transformers import AutoTokenizer

    try:
        with quiet_loading():
            return AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    except Exception as exc:
        raise LowbitError(f"could not read the tokenizer stored in GGUF file {path} (its tokenizer.ggml.* metadata; "
                          f"{type(exc).__name__}: {str(exc)[:200]}); {GGUF_FIX}") from None


def load_gguf_plain(path: Path, dtype: torch.dtype = torch.float32) -> tuple[Any, Any]:
    """Load a GGUF file dequantized, returning a *plain* transformers model and its tokenizer.

    transformers marks GGUF-loaded models as quantized and refuses to ``save_pretrained`` them,
    so the model is rebuilt from its config (without ``quantization_config``) and the
    dequantized state dict is loaded into it.  The config names its architecture (vLLM reads it).
    """
    from transformers import AutoModelForCausalLM

    check_gguf(path)
    gguf_model, info = _load_gguf_model(path)
    tokenizer = load_gguf_tokenizer(path)
    config = gguf_model.config
    if hasattr(config, "quantization_config"):
        delattr(config, "quantization_config")
    config.dtype = dtype
    pre = gguf_string_field(path, "tokenizer.ggml.pre")
    if pre:  # llama.cpp's pre-tokenizer name, needed to write this model back as GGUF
        config.lowbit_gguf_pre = pre
    plain = AutoModelForCausalLM.from_config(config, dtype=dtype)
    _check_gguf_model(path, gguf_model, info, plain)
    plain.load_state_dict(gguf_model.state_dict())  # checked: every key and shape matches
    if getattr(config, "tie_word_embeddings", False):
        plain.tie_weights()
    if not getattr(config, "architectures", None):
        config.architectures = [type(plain).__name__]
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
