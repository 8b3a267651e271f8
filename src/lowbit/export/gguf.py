"""GGUF export for llama.cpp: lowbit's integer codes written onto GGUF's block grids.

Quantized linears whose codes fit the chosen type (see ``gguf_blocks.exact_fit``) are written
code for code; the others, and every unquantized matrix, are rounded by llama.cpp's reference
quantizer, and the export reports each tensor's relative error against lowbit's own weights.
Norms stay F32; the token embedding (and an untied output head) use ``embed_type``.
Llama's q/k projections are stored with llama.cpp's rotary row order, as its converter does (Qwen2 / Qwen3 use
rotate-half RoPE in llama.cpp too, so theirs stay as they are).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from lowbit.arch import head_is_tied
from lowbit.lowrank_layers import lowrank_ranks
from lowbit.atomic import atomic_file
from lowbit.errors import LowbitError
from lowbit.export.gguf_blocks import BLOCK_TYPES, decode, encode_exact, encode_imatrix, encode_requantized, exact_fit
from lowbit.export.gguf_iq4nl import encode_iq4_nl
from lowbit.export.gguf_kquants import K_FALLBACK, K_TYPES, QK_K, encode_k
from lowbit.export.gguf_meta import adjust_tensor, check_gguf_config, gguf_arch, write_hparams, write_tokenizer
from lowbit.export.gguf_mix import MIX_DEFAULT, mix_type
from lowbit.packed.intweight import IntWeight
from lowbit.packed.qlinear import int_weights

FLOAT_TYPES = ("F32", "F16")
MIXES = tuple(m for m in MIX_DEFAULT if m[-2:] in ("_S", "_M", "_L"))  # llama.cpp's K mixes (gguf_mix)
GGUF_TYPES = (*BLOCK_TYPES, *K_TYPES, "IQ4_NL", *FLOAT_TYPES)


@dataclass
class TensorRecord:
    name: str
    type: str
    exact: bool
    rel_error: float  # ||decoded - lowbit weight|| / ||lowbit weight||
    note: str = ""


@dataclass
class GGUFReport:
    path: Path
    type: str
    tensors: list[TensorRecord] = field(default_factory=list)

    @property
    def exact_count(self) -> int:
        return sum(r.exact for r in self.tensors)


def rope_permute(rows: torch.Tensor, n_head: int) -> torch.Tensor:
    """HF rotate-half row order -> llama.cpp's interleaved order (convert_hf_to_gguf's ``permute``)."""
    shape = rows.shape
    return rows.reshape(n_head, 2, shape[0] // n_head // 2, *shape[1:]).swapaxes(1, 2).reshape(shape)


def _permute_int_weight(w: IntWeight, n_head: int) -> IntWeight:
    return IntWeight(rope_permute(w.codes, n_head), rope_permute(w.scale, n_head),
                     None if w.zero is None else rope_permute(w.zero, n_head), w.bits, w.group_size, w.g_idx)


def _encode_float(t: torch.Tensor, type_name: str) -> tuple[np.ndarray, Any]:
    import gguf

    if type_name == "F16":
        return t.detach().to(torch.float16).numpy(), gguf.GGMLQuantizationType.F16
    return t.detach().float().numpy(), gguf.GGMLQuantizationType.F32


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    den = b.float().norm().item()
    return (a.float() - b.float()).norm().item() / den if den > 0 else 0.0


def _decode_k(data: torch.Tensor, type_name: str, shape: tuple[int, ...]) -> torch.Tensor:
    from gguf import GGMLQuantizationType, quants

    raw = quants.dequantize(data.numpy().reshape(shape[0], -1), GGMLQuantizationType[type_name])
    return torch.from_numpy(np.ascontiguousarray(raw, dtype=np.float32)).reshape(shape)


def _encode_k(name: str, weight: torch.Tensor, w: IntWeight | None, type_name: str,
              imatrix: torch.Tensor | None) -> tuple[np.ndarray, Any, TensorRecord]:
    """A K-quant matrix by llama.cpp's rounding (``imatrix``-weighted when given); a width that is not a multiple
    of 256 takes llama.cpp's fallback type, as its quantizer does."""
    import gguf

    if weight.shape[-1] % QK_K:
        fallback = K_FALLBACK[type_name]
        arr, raw, rec = _encode_matrix(name, weight, w, fallback, imatrix)
        rec.note = f"{type_name} -> {fallback}: width {weight.shape[-1]} is not a multiple of {QK_K} (llama.cpp's fallback)"
        return arr, raw, rec
    data = encode_k(weight, type_name, imatrix)
    err = _rel(_decode_k(data, type_name, tuple(weight.shape)), weight)
    note = "llama.cpp's K-quant rounding" + (", imatrix-weighted" if imatrix is not None else "")
    arr = data.numpy().reshape(weight.shape[0], -1)  # the writer reads the shape from bytes per row
    return arr, gguf.GGMLQuantizationType[type_name], TensorRecord(name, type_name, False, err, note)


def _encode_iq4_nl(name: str, weight: torch.Tensor, imatrix: torch.Tensor | None) -> tuple[np.ndarray, Any, TensorRecord]:
    import gguf

    if weight.shape[-1] % 32:
        arr, raw = _encode_float(weight, "F16")
        return arr, raw, TensorRecord(name, "F16", False, _rel(torch.from_numpy(arr.astype(np.float32)), weight),
                                      f"width {weight.shape[-1]} is not a multiple of 32")
    data = encode_iq4_nl(weight, imatrix)
    err = _rel(_decode_k(data, "IQ4_NL", tuple(weight.shape)), weight)
    note = "llama.cpp's IQ4_NL rounding" + (", imatrix-weighted" if imatrix is not None else "")
    return data.numpy().reshape(weight.shape[0], -1), gguf.GGMLQuantizationType.IQ4_NL, TensorRecord(
        name, "IQ4_NL", False, err, note)


def _encode_matrix(name: str, weight: torch.Tensor, w: IntWeight | None, type_name: str,
                   imatrix: torch.Tensor | None = None) -> tuple[np.ndarray, Any, TensorRecord]:
    """Bytes of one 2-D matrix in ``type_name``, with how faithfully they hold lowbit's weight."""
    import gguf

    if type_name in K_TYPES:
        return _encode_k(name, weight, w, type_name, imatrix)
    if type_name == "IQ4_NL":
        return _encode_iq4_nl(name, weight, imatrix)
    if type_name in FLOAT_TYPES:
        arr, raw = _encode_float(weight, type_name)
        err = _rel(torch.from_numpy(arr.astype(np.float32)), weight)
        return arr, raw, TensorRecord(name, type_name, err == 0.0, err)
    bt = BLOCK_TYPES[type_name]
    raw_type = gguf.GGMLQuantizationType[type_name]
    reason = "not quantized by lowbit" if w is None else exact_fit(w, bt)
    if reason is None:
        data = encode_exact(w, bt)
        err = _rel(decode(data, bt, w.shape), weight)
        return data, raw_type, TensorRecord(name, type_name, True, err, "codes kept (fp16 block scales)")
    if weight.shape[-1] % 32:
        arr, raw = _encode_float(weight, "F16")
        return arr, raw, TensorRecord(name, "F16", False, _rel(torch.from_numpy(arr.astype(np.float32)), weight),
                                      f"width {weight.shape[-1]} is not a multiple of 32")
    data = encode_requantized(weight, bt) if imatrix is None else encode_imatrix(weight, bt, imatrix)
    err = _rel(decode(data, bt, tuple(weight.shape)), weight)
    how = "re-quantized" + (" (imatrix-weighted)" if imatrix is not None and type_name != "Q8_0" else "")
    return data, raw_type, TensorRecord(name, type_name, False, err, f"{how}: {reason}")


def export_gguf(model: torch.nn.Module, tokenizer: Any, out: str | Path, type_name: str = "Q4_0",
                embed_type: str = "Q8_0", imatrix: dict[str, torch.Tensor] | None = None) -> GGUFReport:
    """Write ``model`` as a GGUF file at ``out`` (atomically) with linears in ``type_name`` (a GGUF type, or a
    llama.cpp mix such as ``Q4_K_M`` / ``Q3_K_M``, whose embedding and head follow the mix too).  ``imatrix`` (layer name ->
    mean square of each input column over calibration tokens, ``collect_imatrix``) weights K-quant rounding."""
    import gguf

    for t, what in ((type_name, "--type"), (embed_type, "--embed-type")):
        if t not in GGUF_TYPES and not (what == "--type" and t in MIXES):
            choices = [*GGUF_TYPES, *MIXES] if what == "--type" else GGUF_TYPES
            raise LowbitError(f"unsupported GGUF type {t!r} for {what}; choose one of {', '.join(choices)}")
    if tokenizer is None:
        raise LowbitError("GGUF files carry the tokenizer; the checkpoint has none (save it with its tokenizer)")
    if lowrank_ranks(model):
        raise LowbitError("GGUF has no low-rank layers; export fake-quant (dense products) first and convert that")
    config = model.config
    arch = gguf_arch(config)
    check_gguf_config(config, arch)
    n_layers = config.num_hidden_layers
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH[arch.upper()], n_layers)
    weights = int_weights(model, strict=False)  # layers without integer codes are re-rounded below
    heads = {}  # llama.cpp's llama graph rotates interleaved pairs; qwen's (NEOX) rotates halves as HF does
    if arch == "llama":
        heads = {"q_proj": config.num_attention_heads,
                 "k_proj": getattr(config, "num_key_value_heads", None) or config.num_attention_heads}
    out = Path(out)
    report = GGUFReport(out, type_name)
    with atomic_file(out) as tmp:
        writer = gguf.GGUFWriter(str(tmp), arch)
        writer.add_name(getattr(config, "_name_or_path", "") or "lowbit export")
        write_hparams(writer, config, arch)
        file_type = {"Q3_K": "Q3_K_S", "Q4_K": "Q4_K_S", "Q5_K": "Q5_K_S"}.get(type_name, type_name)
        writer.add_file_type(getattr(gguf.LlamaFileType, f"MOSTLY_{file_type}", gguf.LlamaFileType.ALL_F32))
        writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
        write_tokenizer(writer, tokenizer, config)
        seen: set[int] = set()
        has_output = model.get_output_embeddings() is not None and not head_is_tied(model)
        n_gqa = config.num_attention_heads // (getattr(config, "num_key_value_heads", None) or config.num_attention_heads)
        for key, tensor in model.state_dict().items():
            layer, _, suffix = key.rpartition(".")
            if suffix.startswith("weight_") and suffix != "weight_packed":
                continue  # the other packed QuantLinear buffers travel with weight_packed
            ptr = tensor.untyped_storage().data_ptr()
            if ptr in seen:  # tied output head: llama.cpp falls back to token_embd
                continue
            seen.add(ptr)
            if suffix == "weight_packed":
                key, tensor = f"{layer}.weight", weights[layer].dequantize()
            gname = names.get_name(key, try_suffixes=(".weight", ".bias"))
            if gname is None:
                raise LowbitError(f"no GGUF name for tensor {key}; the model layout is not {arch}'s")
            w = weights.get(layer)
            short = layer.rsplit(".", 1)[-1]
            tensor = adjust_tensor(arch, key, tensor)
            if short in heads:
                tensor = rope_permute(tensor, heads[short])
                w = _permute_int_weight(w, heads[short]) if w is not None else None
            if tensor.dim() == 1:
                arr, raw = _encode_float(tensor, "F32")
                rec = TensorRecord(gname, "F32", True, 0.0)
            else:
                is_embedding = "embed" in key or "lm_head" in key
                kind = embed_type if is_embedding else type_name  # lowbit's codes kept where embed_type holds them
                if type_name in MIXES:
                    kind = mix_type(gname, type_name, n_layers, tensor.shape[-1], has_output, n_gqa)
                arr, raw, rec = _encode_matrix(gname, tensor, w, kind, (imatrix or {}).get(layer))
            writer.add_tensor(gname, arr, raw_dtype=raw)
            report.tensors.append(rec)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
    return report
