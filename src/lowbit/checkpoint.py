"""The checks every load path ends with: a checkpoint's own files and tensors against the model.

``LoadReport`` collects what does not match (tensors the model needs that the checkpoint lacks,
tensors the model has no place for, other shapes, integer data where the model holds floats,
NaN / Inf values) and ``LoadReport.check`` turns it into one ``LowbitError`` naming the tensors
and the fix.  A load is accepted only when nothing was left randomly initialised: the only
tensors that may be absent are non-persistent buffers (rotary ``inv_freq``, never in a state
dict) and tied copies (an ``lm_head`` tied to the embedding).  Every load path (alias and
Hugging Face directory, GGUF file, lowbit compressed-tensors, fake-quant directory) fills one.
"""

from __future__ import annotations

import contextlib
import io
import json
import warnings
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from lowbit.errors import LowbitError
from lowbit.safeio import read_text

MAX_CONFIG_BYTES = 16 << 20  # a model config.json (real ones are a few KiB)
MAX_SAFETENSORS_HEADER = 100 << 20  # the safetensors format's own limit on its JSON header
SHOWN = 3  # tensor names quoted per problem
FLOAT_DTYPES = ("F64", "F32", "F16", "BF16", "F8_E4M3", "F8_E5M2")  # safetensors dtype names


@dataclass(frozen=True)
class TensorMeta:
    """A checkpoint tensor as its file describes it: shape and dtype name (safetensors' names)."""

    shape: tuple[int, ...]
    dtype: str


def _few(items: list[str]) -> str:
    more = f", ... {len(items) - SHOWN} more" if len(items) > SHOWN else ""
    return ", ".join(items[:SHOWN]) + more


@dataclass
class LoadReport:
    """What did not match when a checkpoint was loaded into a model; ``check`` raises on any of it."""

    where: str  # the file or directory named in the message
    fix: str  # what to do about a mismatch
    missing: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)
    mismatched: list[str] = field(default_factory=list)  # "name (file [a, b], model [c, d])"
    wrong_dtype: list[str] = field(default_factory=list)  # "name (I32)"
    nonfinite: list[str] = field(default_factory=list)

    def _mismatch_parts(self) -> list[str]:
        parts = []
        if self.missing:
            parts.append(f"{len(self.missing)} tensor(s) the model needs are missing and would be randomly "
                         f"initialised ({_few(sorted(self.missing))})")
        if self.unexpected:
            parts.append(f"{len(self.unexpected)} tensor(s) fit no part of the model ({_few(sorted(self.unexpected))})")
        if self.mismatched:
            parts.append(f"{len(self.mismatched)} tensor(s) have another shape ({_few(sorted(self.mismatched))})")
        if self.wrong_dtype:
            parts.append(f"{len(self.wrong_dtype)} tensor(s) hold integers where the model holds floats "
                         f"({_few(sorted(self.wrong_dtype))})")
        return parts

    def check(self) -> None:
        """Raise one ``LowbitError`` describing every problem found (nothing when all matched)."""
        parts = self._mismatch_parts()
        if parts:
            raise LowbitError(f"{self.where} does not match the model its config describes: {'; '.join(parts)}; "
                              f"{self.fix}")
        if self.nonfinite:
            raise LowbitError(f"{self.where}: {len(self.nonfinite)} tensor(s) hold NaN or Inf values "
                              f"({_few(sorted(self.nonfinite))}); the checkpoint is corrupt: re-quantize, "
                              "re-export or re-download it")


def tied_aliases(model: torch.nn.Module) -> dict[str, set[str]]:
    """State-dict keys sharing storage with other keys (tied weights): key -> the other keys."""
    by_ptr: dict[tuple[Any, ...], list[str]] = {}
    for key, t in model.state_dict(keep_vars=True).items():
        if t is not None and t.numel() > 0:  # meta tensors have no storage: tied ones are the same object
            where = ("meta", id(t)) if t.is_meta else (t.untyped_storage().data_ptr(),)
            by_ptr.setdefault((*where, tuple(t.shape)), []).append(key)
    return {k: set(keys) - {k} for keys in by_ptr.values() if len(keys) > 1 for k in keys}


def untied_missing(model: torch.nn.Module, missing: Iterable[str]) -> list[str]:
    """``missing`` keys less tied copies whose partner was loaded (transformers re-ties them)."""
    missing = set(missing)
    aliases = tied_aliases(model)
    return sorted(k for k in missing if not (aliases.get(k, set()) - missing))


def all_finite(t: torch.Tensor) -> bool:
    """No NaN or Inf in ``t``.  A NaN or Inf anywhere makes the fp32 sum non-finite, and the sum is a
    reduction without the element-wise mask (about 14x faster on a 135M-parameter model); only a sum
    that overflows is checked element by element."""
    if not t.is_floating_point() or t.numel() == 0:
        return True
    if t.element_size() == 1:  # float8: no reductions in that dtype
        t = t.float()
    return bool(torch.isfinite(t.sum(dtype=torch.float32))) or bool(torch.isfinite(t).all())


def nonfinite(tensors: Iterable[tuple[str, torch.Tensor | None]]) -> list[str]:
    """Names of the floating tensors holding NaN or Inf."""
    return [name for name, t in tensors if t is not None and not all_finite(t)]


def _shape(t: Any) -> list[int]:
    return [int(d) for d in t]


def compare_tensors(report: LoadReport, expected: Mapping[str, torch.Tensor], found: Mapping[str, TensorMeta],
                    model: torch.nn.Module) -> LoadReport:
    """Fill ``report`` with how the checkpoint's tensors ``found`` differ from the model's ``expected``."""
    report.missing += untied_missing(model, set(expected) - set(found))
    report.unexpected += sorted(set(found) - set(expected))
    for key in sorted(set(found) & set(expected)):
        want, got = expected[key], found[key]
        if tuple(got.shape) != tuple(want.shape):
            report.mismatched.append(f"{key} (file {_shape(got.shape)}, model {_shape(want.shape)})")
        elif want.is_floating_point() and got.dtype not in FLOAT_DTYPES:
            report.wrong_dtype.append(f"{key} ({got.dtype})")
    return report


def from_loading_info(report: LoadReport, info: Mapping[str, Any], model: torch.nn.Module) -> LoadReport:
    """Fill ``report`` from transformers' ``output_loading_info`` (loaded with ``ignore_mismatched_sizes``)."""
    report.missing += untied_missing(model, info.get("missing_keys") or ())
    report.unexpected += sorted(info.get("unexpected_keys") or ())
    for key, got, want in sorted(info.get("mismatched_keys") or (), key=lambda m: m[0]):
        report.mismatched.append(f"{key} (file {_shape(got)}, model {_shape(want)})")
    report.mismatched += [str(m) for m in info.get("error_msgs") or ()]
    return report


def wrong_dtypes(report: LoadReport, model: torch.nn.Module, found: Mapping[str, TensorMeta]) -> LoadReport:
    """Integer checkpoint tensors loaded into float model tensors (matched by name or name suffix:
    transformers adds the base-model prefix to some checkpoints' keys)."""
    state = model.state_dict(keep_vars=True)
    for key, meta in found.items():
        if meta.dtype in FLOAT_DTYPES:
            continue
        target = state.get(key)
        if target is None:
            target = next((t for k, t in state.items() if k.endswith("." + key)), None)
        if target is not None and target.is_floating_point():
            report.wrong_dtype.append(f"{key} ({meta.dtype})")
    return report


def finite_state(report: LoadReport, model: torch.nn.Module) -> LoadReport:
    """Fill ``report`` with the model's floating parameters and buffers that hold NaN or Inf."""
    report.nonfinite += nonfinite(model.state_dict(keep_vars=True).items())
    return report


@contextlib.contextmanager
def quiet_loading(stderr: bool = False) -> Iterator[None]:
    """transformers' load report and progress bars and numpy's overflow warnings off while loading:
    lowbit's own report replaces them, so a refused load prints one line.  ``stderr``: drop everything
    else written to ``sys.stderr`` too (transformers' GGUF reader has a progress bar of its own)."""
    from transformers.utils import logging as hf_logging

    level, bars = hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    sink = contextlib.redirect_stderr(io.StringIO()) if stderr else contextlib.nullcontext()
    try:
        with warnings.catch_warnings(), sink:
            warnings.simplefilter("ignore", RuntimeWarning)
            yield
    finally:
        hf_logging.set_verbosity(level)
        if bars:
            hf_logging.enable_progress_bar()


# ----------------------------------------------------------------------------------- files
def read_config_json(path: Path) -> dict[str, Any]:
    """``path`` (a config.json) parsed; a ``LowbitError`` naming the file and line when it is not valid JSON."""
    try:
        data = json.loads(read_text(path, MAX_CONFIG_BYTES, "model config"))
    except json.JSONDecodeError as exc:
        raise LowbitError(f"{path} is not valid JSON (line {exc.lineno}, column {exc.colno}: {exc.msg}); fix the "
                          "file or re-save the model with save_pretrained") from None
    except RecursionError:
        raise LowbitError(f"{path} nests its JSON too deeply to be a model config; fix the file") from None
    if not isinstance(data, dict):
        raise LowbitError(f"{path} holds a JSON {type(data).__name__}, not an object of model settings; fix the file")
    return data


def raw_safetensors_header(path: Path) -> dict[str, Any]:
    """The JSON header of a safetensors file (tensor name -> dtype, shape, data_offsets; ``__metadata__``);
    a ``LowbitError`` naming the file when the header is absurdly long, truncated or not a JSON object."""
    fix = "re-save or re-download the checkpoint"
    try:
        with open(path, "rb") as fh:
            n = int.from_bytes(fh.read(8), "little")
            if n > MAX_SAFETENSORS_HEADER or n > path.stat().st_size - 8:
                raise LowbitError(f"safetensors file {path} claims a {n}-byte header, longer than the file or the "
                                  f"{MAX_SAFETENSORS_HEADER >> 20} MiB safetensors allows; {fix}")
            header = json.loads(fh.read(n))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:
        raise LowbitError(f"safetensors file {path} has an unreadable header ({type(exc).__name__}); {fix}") from None
    if not isinstance(header, dict) or not all(isinstance(v, dict) for k, v in header.items() if k != "__metadata__"):
        raise LowbitError(f"safetensors file {path} has a header that is not a table of tensors; {fix}")
    return header


def safetensors_spans(path: Path) -> dict[str, tuple[str, list[int], int, int]]:
    """Each tensor of a safetensors file: (dtype, shape, first byte, end byte), offsets from the file's start."""
    header = raw_safetensors_header(path)
    with open(path, "rb") as fh:
        base = 8 + int.from_bytes(fh.read(8), "little")
    return {k: (v["dtype"], list(v["shape"]), base + v["data_offsets"][0], base + v["data_offsets"][1])
            for k, v in header.items() if k != "__metadata__"}


def safetensors_header(path: Path) -> dict[str, TensorMeta]:
    """The tensors a safetensors file lists (its header only; nothing else is read)."""
    return {k: TensorMeta(tuple(v["shape"]), v["dtype"])
            for k, v in raw_safetensors_header(path).items() if k != "__metadata__"}


SAFETENSORS_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
                      "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
                      "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2}


class SafetensorsReader:
    """A safetensors file read one tensor at a time into fresh memory (``keys`` / ``get_tensor``, as
    ``safetensors.safe_open``), without mapping the file: a loaded model then holds each tensor once,
    where a mapped file would also keep every page it touched resident until closed.  The header is
    checked first (bounded size, known dtypes, spans inside the file that match their shapes)."""

    def __init__(self, path: Path):
        self.path = Path(path)
        fix = "re-save or re-download the checkpoint"
        size = self.path.stat().st_size
        self._spans: dict[str, tuple[torch.dtype, list[int], int, int]] = {}
        for key, (dtype, shape, start, end) in safetensors_spans(self.path).items():
            tdtype = SAFETENSORS_DTYPES.get(dtype)
            if tdtype is None:
                raise LowbitError(f"safetensors file {self.path}: tensor {key} has dtype {dtype!r}, which lowbit does "
                                  f"not read; {fix}")
            n = 1
            for d in shape:
                n *= int(d)
            if not (0 <= start <= end <= size) or end - start != n * tdtype.itemsize:
                raise LowbitError(f"safetensors file {self.path}: tensor {key} spans bytes {start}-{end}, which do not "
                                  f"hold its shape {list(shape)} of {dtype} inside the {size}-byte file; {fix}")
            self._spans[key] = (tdtype, [int(d) for d in shape], start, end)
        self._fh = open(self.path, "rb")

    def __enter__(self) -> "SafetensorsReader":
        return self

    def __exit__(self, *exc: object) -> None:
        self._fh.close()

    def keys(self) -> list[str]:
        return list(self._spans)

    def get_tensor(self, key: str) -> torch.Tensor:
        dtype, shape, start, end = self._spans[key]
        out = torch.empty((end - start) // dtype.itemsize, dtype=dtype)
        if end > start:
            self._fh.seek(start)
            if self._fh.readinto(memoryview(out.view(torch.uint8).numpy())) != end - start:
                raise LowbitError(f"safetensors file {self.path} ended inside tensor {key}; re-save or re-download "
                                  "the checkpoint")
        return out.reshape(shape)


@contextlib.contextmanager
def parameters_on_meta() -> Iterator[None]:
    """Modules built inside get their parameters on the meta device (no memory, initialisers do nothing),
    while buffers (rotary tables and other values computed from the config) are real: what a checkpoint
    then fills is assigned in, never copied over a materialised random copy."""
    register = torch.nn.Module.register_parameter

    def on_meta(module: torch.nn.Module, name: str, param: torch.nn.Parameter | None) -> None:
        if param is not None and param.device.type != "meta":
            param = type(param)(param.to("meta"), requires_grad=param.requires_grad)
        register(module, name, param)

    torch.nn.Module.register_parameter = on_meta  # type: ignore[method-assign]
    try:
        yield
    finally:
        torch.nn.Module.register_parameter = register  # type: ignore[method-assign]


def meta_tensors(model: torch.nn.Module) -> list[str]:
    """Names of the parameters and buffers still on the meta device (never loaded)."""
    return [name for name, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
