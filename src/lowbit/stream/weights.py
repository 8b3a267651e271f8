"""Read a checkpoint's tensors one module at a time (safetensors, single file or sharded with an index), and
build the model's skeleton with every parameter on the meta device."""

from __future__ import annotations

import json
import mmap
import warnings
from pathlib import Path
from collections.abc import Callable
from typing import Any

import torch

from lowbit.checkpoint import SAFETENSORS_DTYPES as _DTYPES
from lowbit.checkpoint import parameters_on_meta, safetensors_spans
from lowbit.errors import LowbitError
from lowbit.experts import ExpertLinears

INDEX_FILE = "model.safetensors.index.json"


class WeightReader:
    """The tensors of a local checkpoint directory by name, read from the files on demand (memory-mapped: only
    what is asked for is read).  Sharded checkpoints are found through ``model.safetensors.index.json``."""

    byte_spans = True  # tensors can be copied to an output file byte for byte (``span``)

    def __init__(self, folder: Path) -> None:
        self.folder = Path(folder)
        self._other_names: Callable[[str], list[str]] | None = None
        self._spans: dict[str, tuple[str, str, list[int], Path, int, int]] = {}  # name, dtype, shape, file, bytes
        for f in self._files():
            for key, (dtype, shape, start, end) in safetensors_spans(f).items():
                self._spans[key] = (key, dtype, shape, f, start, end)

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
        return sorted({span[3] for span in self._spans.values()})

    def follow(self, model: torch.nn.Module) -> None:
        """Find ``model``'s tensors under the names another transformers layout gave them (``stream.keys``)."""
        from lowbit.checkpoint_names import checkpoint_names

        self._other_names = checkpoint_names(model)

    def _find(self, key: str) -> tuple[str, str, list[int], Path, int, int] | None:
        span = self._spans.get(key)
        if span is None and self._other_names is not None:
            span = next((self._spans[n] for n in self._other_names(key) if n in self._spans), None)
        return span

    def __contains__(self, key: str) -> bool:
        return self._find(key) is not None

    def keys(self) -> list[str]:
        """The tensor names on disk."""
        return list(self._spans)

    def span(self, key: str) -> tuple[str, str, list[int], Path, int, int]:
        """Where tensor ``key``'s bytes lie: (name on disk, safetensors dtype, shape, file, start, end)."""
        span = self._find(key)
        if span is None:
            raise LowbitError(f"{self.folder} has no tensor {key!r}; is it the checkpoint of this config?")
        return span

    def tensor(self, key: str) -> torch.Tensor:
        """One tensor, mapped from its file copy-on-write: only the pages read are loaded, writes never reach the
        file, and the mapping goes when the tensor is freed."""
        _, dtype_name, shape, f, start, end = self.span(key)
        dtype = _DTYPES.get(dtype_name)
        if dtype is None:
            raise LowbitError(f"{key} in {f.name} has dtype {dtype_name}, which lowbit does not read")
        if end == start:
            return torch.empty(shape, dtype=dtype)
        lo = start - start % mmap.ALLOCATIONGRANULARITY
        with open(f, "rb") as fh:
            mapped = mmap.mmap(fh.fileno(), end - lo, offset=lo, access=mmap.ACCESS_COPY)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # torch warns that the buffer is writable: it is a private copy
            flat = torch.frombuffer(mapped, dtype=torch.uint8, count=end - start, offset=start - lo)
        if (start - lo) % dtype.itemsize:
            flat = flat.clone()  # an unaligned tensor (another writer's layout)
        return flat.view(dtype).reshape(shape)


def open_weights(source: Any, model: torch.nn.Module, what: str) -> Any:
    """The reader of a streamed run's checkpoint ``source`` (``models.loading.ModelSource``): a safetensors
    directory (``WeightReader``) or a GGUF file (``GGUFWeights``, dequantized tensor by tensor); ``model`` is the
    config's skeleton with its experts still fused; ``what`` names the run in errors."""
    if source.kind == "gguf":
        from lowbit.stream.gguf_weights import GGUFWeights

        if any(p.dim() == 3 for p in model.parameters()):  # fused MoE experts
            raise LowbitError(f"{what} does not read MoE experts from GGUF yet; convert {source.path} once (lowbit "
                              "export --format fake-quant) and stream the directory")
        return GGUFWeights(source.path, model)
    if source.path is None or not source.path.is_dir():
        raise LowbitError(f"{what} reads a safetensors checkpoint directory or a .gguf file; {source.ref} is a "
                          f"{source.kind} (load and save it once with lowbit export --format fake-quant, then stream "
                          "that)")
    return WeightReader(source.path)


DTYPE_NAMES = {"float32": "F32", "bfloat16": "BF16", "float16": "F16", "float64": "F64"}


def meta_model(config: Any, dtype: torch.dtype) -> torch.nn.Module:
    """The causal LM of ``config`` with every parameter on the meta device, in eval mode."""
    from transformers import AutoModelForCausalLM

    with parameters_on_meta():
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    return model.eval()


def materialize(module: torch.nn.Module, prefix: str, reader: WeightReader, dtype: torch.dtype) -> None:
    """Read ``module``'s parameters from ``reader``, keys ``prefix + name``; floating tensors are cast to ``dtype``
    (buffers are not read: the skeleton built them, see ``lowbit.checkpoint.parameters_on_meta``).  MoE experts made
    one linear each (``lowbit.experts``) are read from the checkpoint's fused tensors."""
    experts = {}  # those the checkpoint holds fused (written by transformers 5 layouts); else one linear each
    for name, sub in module.named_modules():
        base = f"{prefix}{name}." if name else prefix
        if isinstance(sub, ExpertLinears) and all(base + k in reader for k in sub.fused_shapes()):
            experts[name] = sub
    for name, sub in experts.items():
        base = f"{prefix}{name}." if name else prefix
        fused = sub.fused_shapes()
        tensors = [reader.tensor(base + k) for k in fused]
        for key, t, shape in zip(fused, tensors, fused.values()):
            if tuple(t.shape) != shape:
                raise LowbitError(f"{base}{key}: the checkpoint holds shape {tuple(t.shape)}, the config wants "
                                  f"{shape}; the config and weights do not match")
        sub.load_fused(*(t.to(dtype) for t in tensors))
    for name, sub in module.named_modules():
        if any(name.startswith(e + ".") or not e for e in experts):
            continue
        for pname, p in list(sub._parameters.items()):
            if p is None or p.device.type != "meta":
                continue  # already given (a compressed-tensors layer built from its stored codes)
            key = f"{prefix}{name}.{pname}" if name else f"{prefix}{pname}"
            t = reader.tensor(key)
            if tuple(t.shape) != tuple(p.shape):
                raise LowbitError(f"{key}: the checkpoint holds shape {tuple(t.shape)}, the config wants "
                                  f"{tuple(p.shape)}; the config and weights do not match")
            sub._parameters[pname] = torch.nn.Parameter(t.to(dtype) if t.is_floating_point() else t,
                                                        requires_grad=False)


def materialize_rows(embedding: torch.nn.Module, key: str, reader: WeightReader, rows: torch.Tensor,
                     dtype: torch.dtype) -> None:
    """Give ``embedding`` a full-size weight of which only ``rows`` (token ids) are read from the checkpoint: the
    other rows are never touched, so memory holds just the rows a calibration set looks up.  A reader without
    byte spans (GGUF) gives the whole table."""
    if not reader.byte_spans:  # a GGUF: the rows dequantized from their blocks
        wanted = rows.unique()
        shape = reader.tensor_shape(key)
        if not bool(((wanted >= 0) & (wanted < shape[0])).all()):
            raise LowbitError(f"a token id is outside the embedding's {shape[0]} rows")
        weight = torch.empty(shape, dtype=dtype)  # pages of rows never written are never allocated
        weight[wanted] = reader.rows(key, wanted).to(dtype)
        embedding._parameters["weight"] = torch.nn.Parameter(weight, requires_grad=False)
        return
    _, dtype_name, shape, f, start, _ = reader.span(key)
    if len(shape) != 2 or dtype_name not in _DTYPES:
        raise LowbitError(f"{key} is not a 2-D float table ({dtype_name}, {shape})")
    weight = torch.empty(shape, dtype=dtype)  # pages of rows never written are never allocated
    row = torch.empty(shape[1], dtype=_DTYPES[dtype_name])
    raw = memoryview(row.view(torch.uint8).numpy())
    with open(f, "rb") as fh:
        for r in rows.unique().tolist():
            if not 0 <= r < shape[0]:
                raise LowbitError(f"token id {r} is outside the embedding's {shape[0]} rows")
            fh.seek(start + r * raw.nbytes)
            if fh.readinto(raw) != raw.nbytes:
                raise LowbitError(f"{f} ends inside {key}; the checkpoint is truncated")
            weight[r] = row.to(dtype)
    embedding._parameters["weight"] = torch.nn.Parameter(weight, requires_grad=False)


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
