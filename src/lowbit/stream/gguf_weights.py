"""A GGUF file read tensor by tensor, for a streamed run: the same lookups as ``WeightReader`` by transformers
parameter name, each tensor dequantized from the memory-mapped file only when it is asked for (one block's at a
time), with transformers' own GGUF name map and tensor fix-ups (Llama's q/k row order)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from lowbit.errors import LowbitError


ROWS = 4096  # rows dequantized at once


class GGUFWeights:
    """The tensors of ``path`` under ``model``'s parameter names (``model``: the config's skeleton, experts fused)."""

    byte_spans = False  # tensors are dequantized, never copied as bytes

    def __init__(self, path: Path, model: torch.nn.Module) -> None:
        from gguf import GGUFReader
        from transformers.modeling_gguf_pytorch_utils import (TENSOR_PROCESSORS, TensorProcessor,
                                                              get_gguf_hf_weights_map)

        self.path = Path(path)
        try:
            self._reader = GGUFReader(str(self.path))  # memory-mapped: tensor data is read on access
        except Exception as exc:  # noqa: BLE001 - gguf raises many kinds on a damaged file
            raise LowbitError(f"{self.path} is not a readable GGUF file ({type(exc).__name__}: {exc})") from None
        self._tensors = {t.name: t for t in self._reader.tensors}
        field = self._reader.fields.get("general.architecture")
        arch = bytes(field.parts[field.data[0]]).decode() if field is not None else ""
        self._config = model.config.to_dict()
        self._processor = TENSOR_PROCESSORS.get(arch, TensorProcessor)(config=self._config)
        try:
            to_hf = get_gguf_hf_weights_map(model, self._processor)
        except (NotImplementedError, ImportError) as exc:
            raise LowbitError(f"{self.path}: transformers has no GGUF name map for {arch!r} ({exc}); convert it once "
                              "(lowbit export --format fake-quant) and stream the directory") from None
        self._names = {hf: g for g, hf in to_hf.items() if g in self._tensors}
        missing = [k for k in model.state_dict() if k not in self._names and not _tied(model, k)]
        if missing:
            raise LowbitError(f"{self.path}: no GGUF tensor for {missing[0]} (and {len(missing) - 1} more); this "
                              f"{arch} layout is not streamed from GGUF: convert it once (lowbit export --format "
                              "fake-quant) and stream the directory")

    def follow(self, model: torch.nn.Module) -> None:
        """Names are transformers' GGUF map already (nothing to follow)."""

    def files(self) -> list[Path]:
        return [self.path]

    def __contains__(self, key: str) -> bool:
        return key in self._names

    def span(self, key: str) -> Any:
        raise LowbitError(f"{key}: a GGUF tensor has no safetensors bytes to copy")

    def _gguf(self, key: str) -> Any:
        name = self._names.get(key)
        if name is None:
            raise LowbitError(f"{self.path} has no tensor for {key!r}; is it the GGUF of this config?")
        return self._tensors[name]

    def tensor(self, key: str) -> torch.Tensor:
        """Tensor ``key`` as float32 (dequantized from its GGUF type, ``ROWS`` rows at a time so the
        dequantizer's temporaries stay small; transformers' fix-ups applied)."""
        t = self._gguf(key)
        data = t.data  # memory-mapped: (rows, bytes of a row) for block types, the values for float ones
        if data.ndim > 1:
            out = np.empty(tuple(int(x) for x in reversed(t.shape)), dtype=np.float32)
            for start in range(0, data.shape[0], ROWS):
                out[start:start + ROWS] = self._dequantize(t, data[start:start + ROWS])
        else:
            out = self._dequantize(t, data).astype(np.float32)
        result = self._processor.process(weights=out, name=t.name, tensor_key_mapping={},
                                         parsed_parameters={"config": self._config, "tensors": {}})
        return torch.from_numpy(np.ascontiguousarray(result.weights, dtype=np.float32))

    def tensor_shape(self, key: str) -> tuple[int, ...]:
        """Tensor ``key``'s shape in transformers' order (GGUF lists dimensions innermost first)."""
        return tuple(int(x) for x in reversed(self._gguf(key).shape))

    def rows(self, key: str, index: torch.Tensor) -> torch.Tensor:
        """Rows ``index`` of 2-D tensor ``key`` (an embedding's looked-up tokens) without the others."""
        t = self._gguf(key)
        return torch.from_numpy(np.ascontiguousarray(self._dequantize(t, t.data[index.numpy()]), dtype=np.float32))

    @staticmethod
    def _dequantize(t: Any, data: Any) -> np.ndarray:
        from gguf import dequantize

        return dequantize(np.asarray(data), t.tensor_type)


def _tied(model: torch.nn.Module, key: str) -> bool:
    """Whether ``key`` is the output head tied to the input embedding (GGUF stores it once)."""
    head = model.get_output_embeddings()
    return (head is not None and getattr(model.config, "tie_word_embeddings", False)
            and key == next(n for n, m in model.named_modules() if m is head) + ".weight")
