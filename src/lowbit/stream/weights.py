"""Read a checkpoint's tensors one module at a time (safetensors, single file or sharded with an index), and
build the model's skeleton with every parameter on the meta device."""

from __future__ import annotations

import contextlib
import json
from pathlib import Path
from typing import Any, Iterator

import torch
from safetensors import safe_open

from lowbit.errors import LowbitError

INDEX_FILE = "model.safetensors.index.json"


class WeightReader:
    """The tensors of a local checkpoint directory by name, read from the files on demand (memory-mapped: only
    what is asked for is read).  Sharded checkpoints are found through ``model.safetensors.index.json``."""

    def __init__(self, folder: Path) -> None:
        self.folder = Path(folder)
        files = self._files()
        self._where: dict[str, Path] = {}
        for f in files:
            with safe_open(str(f), framework="pt") as h:
                for key in h.keys():
                    self._where[key] = f
        self._open: dict[Path, Any] = {}

    def _files(self) -> list[Path]:
        index = self.folder / INDEX_FILE
        if index.is_file():
            try:
                shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
            except (ValueError, KeyError, TypeError, AttributeError):
                raise LowbitError(f"{index} is not a safetensors index (no weight_map); re-save the model") from None
            files = [self.folder / s for s in shards]
            missing = [f.name for f in files if not f.is_file()]
            if missing:
                raise LowbitError(f"{index} names shards that are missing: {', '.join(missing[:3])}")
            return files
        files = sorted(self.folder.glob("*.safetensors"))
        if not files:
            raise LowbitError(f"{self.folder} has no .safetensors weights; streaming reads safetensors only "
                              "(convert .bin weights with save_pretrained first)")
        return files

    def files(self) -> list[Path]:
        """The safetensors files read."""
        return sorted(set(self._where.values()))

    def __contains__(self, key: str) -> bool:
        return key in self._where

    def keys(self) -> list[str]:
        return list(self._where)

    def tensor(self, key: str) -> torch.Tensor:
        """One tensor, read now."""
        f = self._where.get(key)
        if f is None:
            raise LowbitError(f"{self.folder} has no tensor {key!r}; is it the checkpoint of this config?")
        if f not in self._open:
            self._open[f] = safe_open(str(f), framework="pt")
        return self._open[f].get_tensor(key)

    def nbytes(self) -> int:
        """Bytes of every tensor in the checkpoint (from the headers)."""
        total = 0
        for f in {p for p in self._where.values()}:
            with safe_open(str(f), framework="pt") as h:
                for key in h.keys():
                    sl = h.get_slice(key)
                    n = 1
                    for d in sl.get_shape():
                        n *= d
                    total += n * _dtype_bytes(sl.get_dtype())
        return total


def _dtype_bytes(name: str) -> int:
    return {"F64": 8, "I64": 8, "U64": 8, "F32": 4, "I32": 4, "U32": 4, "F16": 2, "BF16": 2, "I16": 2, "U16": 2,
            "F8_E4M3": 1, "F8_E5M2": 1, "I8": 1, "U8": 1, "BOOL": 1}.get(name, 4)


@contextlib.contextmanager
def params_on_meta() -> Iterator[None]:
    """Modules built inside get their parameters on the meta device (no memory, no initialisation cost); buffers
    (rotary frequencies) are built for real, since checkpoints do not hold the non-persistent ones."""
    original = torch.nn.Module.register_parameter

    def register(module: torch.nn.Module, name: str, param: torch.nn.Parameter | None) -> None:
        if param is not None and param.device.type != "meta":
            param = torch.nn.Parameter(param.to("meta"), requires_grad=param.requires_grad)
        original(module, name, param)

    torch.nn.Module.register_parameter = register  # type: ignore[method-assign]
    try:
        yield
    finally:
        torch.nn.Module.register_parameter = original  # type: ignore[method-assign]


def meta_model(config: Any, dtype: torch.dtype) -> torch.nn.Module:
    """The causal LM of ``config`` with every parameter on the meta device, in eval mode."""
    from transformers import AutoModelForCausalLM

    with params_on_meta():
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    return model.eval()


def materialize(module: torch.nn.Module, prefix: str, reader: WeightReader, dtype: torch.dtype) -> None:
    """Read ``module``'s parameters (and persistent buffers) from ``reader``, keys ``prefix + name``; floating
    tensors are cast to ``dtype``."""
    for name, sub in module.named_modules():
        for pname, p in list(sub._parameters.items()):
            if p is None:
                continue
            key = f"{prefix}{name}.{pname}" if name else f"{prefix}{pname}"
            t = reader.tensor(key)
            if tuple(t.shape) != tuple(p.shape):
                raise LowbitError(f"{key}: the checkpoint holds shape {tuple(t.shape)}, the config wants "
                                  f"{tuple(p.shape)}; the config and weights do not match")
            sub._parameters[pname] = torch.nn.Parameter(t.to(dtype) if t.is_floating_point() else t,
                                                        requires_grad=False)


def release(module: torch.nn.Module) -> None:
    """Free ``module``'s tensors: parameters back to the meta device, and what steps left on its layers (codes,
    records) dropped."""
    for sub in module.modules():
        for pname, p in list(sub._parameters.items()):
            if p is not None:
                sub._parameters[pname] = torch.nn.Parameter(torch.empty_like(p, device="meta"), requires_grad=False)
        if hasattr(sub, "quantized"):
            sub.quantized.form = None
            sub.quantized.details = {}
