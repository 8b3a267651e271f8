"""``export_onnx``: a lowbit model as one self-contained ONNX file that ONNX Runtime runs.

The file holds the decoder graph (``onnx_decoder``), its weights, and in its metadata the model
config and tokenizer files, so ``lowbit eval`` / ``lowbit generate`` need nothing beside it.
Models over 2 GB (protobuf's limit) keep their tensors in ``OUT.data`` next to the file.
Written to temporary paths and renamed, after ``onnx.checker`` has passed.
"""

from __future__ import annotations

import base64
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from lowbit.atomic import atomic_file
from lowbit.errors import LowbitError
from lowbit.export.onnx_decoder import build_decoder, check_exportable
from lowbit.export.onnx_linear import OPS, LinearRecord, check_layers
from lowbit.lowrank_layers import lowrank_ranks
from lowbit.packed.qlinear import int_weights
from lowbit.export.onnx_meta import ACCURACY_KEY, CONFIG_KEY, TOKENIZER_PREFIX

PROTOBUF_LIMIT = 2_000_000_000  # bytes a single ONNX protobuf may hold
ACCURACY_LEVELS = (0, 1, 2, 3, 4)  # MatMulNBits: 0 = fp32 compute ... 4 = int8 activations


@dataclass
class OnnxReport:
    path: Path
    ops: str
    records: list[LinearRecord] = field(default_factory=list)
    external_data: Path | None = None

    def size(self) -> int:
        files = [self.path] + ([self.external_data] if self.external_data else [])
        return sum(f.stat().st_size for f in files)


def check_accuracy_level(level: int) -> None:
    if level not in ACCURACY_LEVELS:
        raise LowbitError(f"--accuracy-level {level}: MatMulNBits takes 0 (fp32), 1 (fp32), 2 (fp16), 3 (bf16) or "
                          f"4 (int8 activations)")


def check_onnx_export(model: torch.nn.Module, ops: str, accuracy_level: int) -> None:
    """Refuse, before any work, what the ONNX exporter cannot write."""
    try:
        import onnx  # noqa: F401
        import onnxruntime  # noqa: F401
    except ImportError:
        raise LowbitError("ONNX export needs the onnx and onnxruntime packages: pip install 'lowbit[onnx]'") from None
    if ops not in OPS:
        raise LowbitError(f"unknown ONNX weight ops {ops!r}; choose one of {', '.join(OPS)}")
    check_accuracy_level(accuracy_level)
    if lowrank_ranks(model):
        raise LowbitError("ONNX export has no low-rank layers; export fake-quant (dense products) first")
    if getattr(model, "lowbit_kv_cache", None):
        raise LowbitError("the checkpoint quantizes its KV cache; the ONNX decoder keeps fp32 keys and values "
                          "(export the weights of a checkpoint without a KV-cache setting)")
    check_exportable(model)


def _tokenizer_files(tokenizer: Any) -> dict[str, str]:
    """The tokenizer's saved files, base64-encoded, keyed for the model metadata."""
    out = {}
    with tempfile.TemporaryDirectory() as d:
        tokenizer.save_pretrained(d)
        for f in sorted(Path(d).iterdir()):
            if f.is_file():
                out[TOKENIZER_PREFIX + f.name] = base64.b64encode(f.read_bytes()).decode("ascii")
    return out


def _save(proto: Any, out: Path, external: bool) -> Path | None:
    import onnx

    if not external:
        onnx.checker.check_model(proto)
        with atomic_file(out) as tmp:
            onnx.save_model(proto, str(tmp))
        return None
    data = out.with_name(out.name + ".data")
    with tempfile.TemporaryDirectory(dir=out.parent, prefix=f".{out.name}.") as d:
        staged = Path(d) / out.name
        onnx.save_model(proto, str(staged), save_as_external_data=True, all_tensors_to_one_file=True,
                        location=data.name, size_threshold=1024)
        onnx.checker.check_model(str(staged))
        os.replace(Path(d) / data.name, data)
        os.replace(staged, out)
    return data


def export_onnx(model: torch.nn.Module, tokenizer: Any, out: str | Path, ops: str = "matmulnbits",
                accuracy_level: int = 0) -> OnnxReport:
    """Write ``model`` as an ONNX decoder with a KV cache at ``out``."""
    check_onnx_export(model, ops, accuracy_level)
    if tokenizer is None:
        raise LowbitError("the ONNX file carries the tokenizer; the checkpoint has none (save it with its tokenizer)")
    out = Path(out)
    weights = int_weights(model, strict=False)
    check_layers(model, weights)
    graph = build_decoder(model, weights, ops, accuracy_level)
    metadata = {CONFIG_KEY: model.config.to_json_string(use_diff=False), ACCURACY_KEY: str(accuracy_level),
                **_tokenizer_files(tokenizer)}
    proto = graph.builder.model("lowbit_decoder", metadata)
    external = graph.builder.initializer_bytes > PROTOBUF_LIMIT * 0.9
    report = OnnxReport(out, ops, graph.records)
    report.external_data = _save(proto, out, external)
    return report
