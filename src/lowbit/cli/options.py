"""The option groups the commands share, each defined once, and the readers that turn parsed
options into the experiment's pieces (``lowbit.experiment``)."""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from typing import Any

from lowbit.errors import LowbitError
from lowbit.experiment import Calibration, ModelSource, load, ready_kv
from lowbit.models.aliases import DEFAULT_MODEL

KV_CACHE_HELP = "quantized KV cache: a preset (KV8, KV4, KV2, KIVI4, KIVI2, KVQUANT4, ...) or none"


def add_model_options(p: argparse.ArgumentParser) -> None:
    """The model to work on (positional, optional) and the cache its files go to."""
    p.add_argument("model", nargs="?", default=DEFAULT_MODEL,
                   help=f"alias, HF directory, .gguf file, hub id, or (eval / generate) an exported .onnx file "
                        f"(default {DEFAULT_MODEL})")
    p.add_argument("--cache", default=None, help="cache directory (default $LOWBIT_CACHE or ~/.cache/lowbit)")


def add_dtype_option(p: argparse.ArgumentParser) -> None:
    p.add_argument("--dtype", default="float32")


def add_device_option(p: argparse.ArgumentParser, help: str | None = None) -> None:
    p.add_argument("--device", default="cpu", help=help)


def add_loading_options(p: argparse.ArgumentParser) -> None:
    """How the model is loaded: ``--dtype``, ``--device``, ``--trust-remote-code``."""
    add_dtype_option(p)
    add_device_option(p)
    p.add_argument("--trust-remote-code", action="store_true", help="allow model code from the hub (off by default)")


def add_json_option(p: argparse.ArgumentParser) -> None:
    p.add_argument("--json", action="store_true", help="print JSON")


def add_overwrite_option(p: argparse.ArgumentParser) -> None:
    p.add_argument("--overwrite", action="store_true",
                   help="replace the output even when lowbit did not write it (a non-empty directory is deleted "
                        "first; the working directory, home, the input and their parents never are)")


def add_data_dir_option(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data-dir", default=None, help="local data directory (default $LOWBIT_DATA_DIR)")


def add_kv_cache_option(p: argparse.ArgumentParser, help: str = KV_CACHE_HELP) -> None:
    p.add_argument("--kv-cache", default=None, metavar="PRESET", help=help)


def add_kv_options(p: argparse.ArgumentParser) -> None:
    """A quantized KV cache for a run on a model: ``--kv-cache``, ``--pivot-model``, ``--kv-calib``."""
    add_kv_cache_option(p)
    p.add_argument("--pivot-model", default=None, help="full-precision model giving IntactKV's pivot keys and values")
    p.add_argument("--kv-calib", default="wikitext2",
                   help="data for calibrating KVQuant's level tables when the KV preset needs them (16 x 512 tokens)")


def add_calibration_options(p: argparse.ArgumentParser, nsamples: int = 128, batch_size: int | None = None) -> None:
    """The calibration windows (``--calib``, ``--nsamples``, ``--seqlen``, ``--seed``) and, with a
    ``batch_size`` default, how many go through one forward pass."""
    p.add_argument("--calib", default="wikitext2", help="wikitext2, ptb, c4, selfgen or a .txt/.jsonl file")
    p.add_argument("--nsamples", type=int, default=nsamples)
    p.add_argument("--seqlen", type=int, default=512, help="calibration window length")
    p.add_argument("--seed", type=int, default=0)
    if batch_size is not None:
        p.add_argument("--batch-size", type=int, default=batch_size, help="calibration windows per forward pass")


def add_eval_options(p: argparse.ArgumentParser, prefix: str = "--eval-", split: bool = True,
                     data_dir: bool = True, max_windows: int | None = None,
                     max_windows_help: str = "evaluate only the first N windows") -> None:
    """The evaluation windows: ``{prefix}dataset``, ``{prefix}split``, ``{prefix}seqlen``,
    ``--max-windows`` and ``--data-dir`` (``split`` and ``data_dir`` leave theirs out when False)."""
    p.add_argument(f"{prefix}dataset", default="wikitext2", help="wikitext2, ptb, c4 or a .txt/.jsonl path")
    if split:
        p.add_argument(f"{prefix}split", default="test")
    p.add_argument(f"{prefix}seqlen", type=int, default=2048)
    p.add_argument("--max-windows", type=int, default=max_windows, help=max_windows_help)
    if data_dir:
        add_data_dir_option(p)


def parse_options(pairs: Sequence[str]) -> dict[str, Any]:
    """``--option KEY=VALUE`` pairs as a dict; each VALUE is read by the bounded YAML loader."""
    from lowbit.safeio import load_yaml

    out: dict[str, Any] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        key = key.strip()
        if not sep or not key:
            raise LowbitError(f"--option expects KEY=VALUE, got {pair!r}")
        if key in out:
            raise LowbitError(f"--option {key} is given twice; give each option once")
        out[key] = load_yaml(value, f"--option {key}")
    return out


def model_source(args: argparse.Namespace, ref: Any = None) -> ModelSource:
    """The model of ``args`` (or ``ref`` loaded the same way), with the loading options it has."""
    return ModelSource(args.model if ref is None else ref, dtype=getattr(args, "dtype", "float32"),
                       device=getattr(args, "device", "cpu"), cache=getattr(args, "cache", None),
                       trust_remote_code=getattr(args, "trust_remote_code", False))


def calibration(args: argparse.Namespace) -> Calibration:
    return Calibration(args.calib, args.nsamples, args.seqlen, args.seed)


def kv_setup(args: argparse.Namespace, model: Any, tok: Any) -> tuple[Any, Any]:
    """``(KV-cache setting, pivot model)`` from ``add_kv_options``: the pivot model (IntactKV) is
    loaded on the CPU, the setting's KVQuant level tables fitted when it needs them."""
    pivot = None
    if args.pivot_model:
        pivot = load(ModelSource(args.pivot_model, dtype=args.dtype, cache=args.cache))[0]
    return ready_kv(model, tok, args.kv_cache, args.kv_calib), pivot
