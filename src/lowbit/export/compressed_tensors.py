"""compressed-tensors checkpoints, as transformers and vLLM load them, written and read by lowbit.

``export_compressed_tensors`` writes each quantized linear in the format its scheme needs
(``lowbit.export.ct_schemes``: packed int, int8 W8A8, FP8, NVFP4, with input-activation
quantization where the layer has it) and ``config.json``'s ``quantization_config`` (one config
group per distinct scheme); the tensors per format are in ``lowbit.export.ct_tensors``.
``load_compressed_tensors`` reads such a checkpoint back without the compressed-tensors package.
"""

from __future__ import annotations

import contextlib
import json
import re
import warnings
from dataclasses import dataclass
from functools import cached_property
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from lowbit.activations.attach import attach_input_quantizer, input_quantizers
from lowbit.activations.quantizer import ActQuantizer
from lowbit.atomic import atomic_dir
from lowbit.checkpoint import (
    LoadReport,
    SafetensorsReader,
    compare_tensors,
    finite_state,
    meta_tensors,
    parameters_on_meta,
    quiet_loading,
    read_config_json,
    safetensors_header,
)
from lowbit.conv1d import convert_conv1d, is_conv1d
from lowbit.errors import LowbitError
from lowbit.export.ct_schemes import LayerWeight, check_schemes, config_from_schemes, layer_scheme
from lowbit.export.ct_tensors import (
    CONFIG_FORMATS,
    DENSE_WEIGHT_FORMATS,
    SUFFIXES,
    check_finite,
    layer_tensors,
    read_layer_weight,
    read_packed_int,
    require,
    split_packed,
)
from lowbit.core.floats import FloatQuantized
from lowbit.checkpoint_names import saved_layer_names
from lowbit.experts import unfuse_like
from lowbit.packed.floatweight import FloatWeight, float_weight_of
from lowbit.packed.intweight import IntWeight, int_weight_of
from lowbit.packed.qlinear import QuantLinear
from lowbit.quantized_layers import QuantizedWeight, is_quantized, quantized_linear, quantized_weight
from lowbit.rotation.online import input_rotations
from lowbit.rotation.permutation import output_permutations
from lowbit.spec import QuantSpec, SpecError

QUANTIZABLE = (torch.nn.Linear, torch.nn.Embedding)  # module classes whose weights the format stores as codes

WEIGHTS_FILE = "model.safetensors"
CT_FIX = "re-export the checkpoint (lowbit quantize --out, or lowbit export)"


def _layer_weight(name: str, layer: torch.nn.Module) -> LayerWeight:
    if isinstance(layer, QuantLinear):
        return layer.int_weight()
    qw = quantized_weight(layer)
    try:
        if qw is not None and (isinstance(qw.form, (FloatWeight, FloatQuantized))
                               or (qw.spec is not None and qw.spec.type == "float")):
            return float_weight_of(layer)
        return int_weight_of(layer)
    except LowbitError as e:
        raise LowbitError(f"{name}: {e}") from None


def export_weights(model: torch.nn.Module) -> tuple[dict[str, LayerWeight], dict[str, ActQuantizer]]:
    """Every quantized layer's weight (int or float form) and every input quantizer, by layer name."""
    weights = {n: _layer_weight(n, m) for n, m in model.named_modules()
               if isinstance(m, QuantLinear) or (isinstance(m, QUANTIZABLE) and is_quantized(m))}
    return weights, input_quantizers(model)


def dense_tensors(model: torch.nn.Module, skip: set[str]) -> dict[str, torch.Tensor]:
    """Every other tensor of the model, tied duplicates dropped (transformers re-ties them on load; a head tied
    to a quantized embedding is the quantized tensor too)."""
    out: dict[str, torch.Tensor] = {}
    state = model.state_dict()
    seen: set[int] = {t.untyped_storage().data_ptr() for k, t in state.items()
                      if k.rsplit(".", 1)[0] in skip and k.endswith(".weight") and t.numel() > 0}
    for key, t in state.items():
        layer = key.rsplit(".", 1)[0]
        if layer in skip and (key.endswith(".weight") or key.rsplit(".", 1)[-1] in SUFFIXES):
            continue
        ptr = t.untyped_storage().data_ptr()
        if ptr in seen and t.numel() > 0:
            continue
        seen.add(ptr)
        out[key] = t.detach().contiguous()
    return out


def collect_exportable(model: torch.nn.Module) -> tuple[dict[str, LayerWeight], dict[str, ActQuantizer], str | None]:
    """The quantized layers' weights and input quantizers, and why they cannot be written as compressed-tensors
    (None when they can)."""
    rotated = input_rotations(model)
    if rotated:
        return {}, {}, (f"{next(iter(rotated))} rotates its input at run time (QuaRot's online Hadamard), which lowbit "
                        "does not write as a compressed-tensors transform; write fake-quant (the rotation is kept in "
                        "lowbit_activations.json)")
    permuted = output_permutations(model)
    if permuted:
        return {}, {}, (f"{next(iter(permuted))} reorders its output channels at run time (RPTQ), which "
                        "compressed-tensors cannot express; write fake-quant (the reorder is kept in "
                        "lowbit_activations.json)")
    try:
        weights, inputs = export_weights(model)
    except LowbitError as e:
        return {}, {}, str(e)
    conv = conv1d_problem(model, weights)
    if conv is not None:
        return {}, {}, conv
    return weights, inputs, check_schemes(weights, inputs)


def conv1d_problem(model: torch.nn.Module, names: Iterable[str] | None = None) -> str | None:
    """Why compressed-tensors cannot hold the model's GPT-2 style Conv1D layers (``names``: only these), or None.

    Callable before quantizing, so ``--format compressed-tensors`` on GPT-2 can be refused up front."""
    layers = ((n, model.get_submodule(n)) for n in names) if names is not None else model.named_modules()
    conv = [n for n, m in layers if is_conv1d(m)]
    if not conv:
        return None
    return (f"{conv[0]} is a GPT-2 style Conv1D layer (weight stored transposed), which compressed-tensors loaders "
            "(transformers, vLLM) do not quantize; write fake-quant")


def check_exportable(model: torch.nn.Module) -> str | None:
    """Why ``model`` cannot be written as compressed-tensors, or None when it can."""
    return collect_exportable(model)[2]


def export_compressed_tensors(model: torch.nn.Module, tokenizer: Any, out: str | Path,
                              extra_files: dict[str, str] | None = None) -> Path:
    """Write ``model`` (quantized by lowbit, packed or not) as a compressed-tensors checkpoint."""
    weights, inputs, problem = collect_exportable(model)
    if problem is not None:
        raise LowbitError(problem)
    return write_compressed_tensors(model, tokenizer, out, weights, inputs, extra_files)


def layer_tensors_and_schemes(weights: dict[str, LayerWeight], inputs: dict[str, ActQuantizer], dtype: torch.dtype
                              ) -> tuple[dict[str, torch.Tensor], dict[str, dict[str, Any]]]:
    """The stored tensors of these quantized layers, and each layer's scheme (for ``config_from_schemes``)."""
    tensors: dict[str, torch.Tensor] = {}
    schemes = {n: layer_scheme(w, inputs.get(n)) for n, w in weights.items()}
    for name, w in weights.items():
        tensors.update(layer_tensors(name, w, inputs.get(name), schemes[name]["format"], dtype))
    return tensors, schemes


def saved_names(model: torch.nn.Module, weights: dict[str, LayerWeight], inputs: dict[str, ActQuantizer]
                ) -> tuple[dict[str, LayerWeight], dict[str, ActQuantizer]]:
    """``weights`` and ``inputs`` keyed by the names the layers are written under: a MoE expert's linears by the
    per-expert names transformers reads for ``model``'s family (``lowbit.checkpoint_names``)."""
    rename = saved_layer_names(model, list(weights))
    return ({rename.get(n, n): w for n, w in weights.items()}, {rename.get(n, n): q for n, q in inputs.items()})


def checkpoint_config(model: torch.nn.Module, schemes: dict[str, dict[str, Any]], dtype: torch.dtype) -> dict[str, Any]:
    """``config.json`` of the compressed-tensors checkpoint of ``model`` whose quantized layers have ``schemes``."""
    linears = [n for n, m in model.named_modules() if isinstance(m, (torch.nn.Linear, QuantLinear))]
    rename = saved_layer_names(model, linears)
    linears = [rename.get(n, n) for n in linears]
    cfg = model.config.to_dict()
    cfg["architectures"] = cfg.get("architectures") or [type(model).__name__]  # vLLM picks its model class by it
    cfg["quantization_config"] = config_from_schemes(schemes, linears)
    cfg["dtype"] = str(dtype).replace("torch.", "")
    if any(s["format"] == "nvfp4-pack-quantized" for s in schemes.values()):
        cfg["dtype"] = "bfloat16"  # compressed-tensors 0.20 decompresses NVFP4 to bf16 only (fp32 models fail)
    return cfg


def write_beside_weights(tmp: Path, model: torch.nn.Module, tokenizer: Any, extra_files: dict[str, str] | None) -> None:
    """The generation config, tokenizer and extra files of a checkpoint being written in ``tmp``."""
    gen = getattr(model, "generation_config", None)
    if gen is not None:
        gen.save_pretrained(tmp)
    if tokenizer is not None:
        tokenizer.save_pretrained(tmp)
    for fname, text in (extra_files or {}).items():
        (tmp / fname).write_text(text)


def write_compressed_tensors(model: torch.nn.Module, tokenizer: Any, out: str | Path,
                             weights: dict[str, LayerWeight], inputs: dict[str, ActQuantizer],
                             extra_files: dict[str, str] | None = None) -> Path:
    """Write the checkpoint from ``collect_exportable``'s weights and inputs (already checked)."""
    dtype = next(p for p in model.parameters() if p.is_floating_point()).dtype
    embeddings = [n for n in weights if isinstance(model.get_submodule(n), torch.nn.Embedding)]
    if embeddings:
        warnings.warn(f"{embeddings[0]} is written as packed codes: lowbit and vLLM (WNA16 input embeddings) read "
                      "it; transformers' own compressed-tensors loader (5.x) does not yet", stacklevel=3)
    tensors = dense_tensors(model, set(weights))
    quantized, schemes = layer_tensors_and_schemes(*saved_names(model, weights, inputs), dtype)
    tensors.update(quantized)
    cfg = checkpoint_config(model, schemes, dtype)
    out = Path(out)
    with atomic_dir(out) as tmp:
        save_file(tensors, str(tmp / WEIGHTS_FILE), metadata={"format": "pt"})
        (tmp / "config.json").write_text(json.dumps(cfg, indent=2, default=str))
        write_beside_weights(tmp, model, tokenizer, extra_files)
    return out


# ----------------------------------------------------------------------------------- reading
def is_compressed_tensors(path: str | Path) -> bool:
    """Whether ``path/config.json`` declares a compressed-tensors checkpoint."""
    cfg = Path(path) / "config.json"
    if not cfg.is_file():
        return False
    qc = read_config_json(cfg).get("quantization_config") or {}
    return isinstance(qc, dict) and qc.get("quant_method") == "compressed-tensors"


def _scheme_for(name: str, qc: dict[str, Any], kind: str = "Linear") -> dict[str, Any] | None:
    """The config group that targets layer ``name`` of class ``kind`` (by name, ``re:`` pattern or class), or
    None."""
    for group in qc["config_groups"].values():
        targets = group.get("targets", [])
        if name in targets or kind in targets or any(
                t.startswith("re:") and re.fullmatch(t[3:], name) for t in targets if isinstance(t, str)):
            return group
    return None


def _input_quantizer(name: str, args: dict[str, Any] | None, t: dict[str, torch.Tensor]) -> ActQuantizer | None:
    """The input quantizer a scheme's ``input_activations`` describe (static ranges from its tensors)."""
    if args is None:
        return None
    float_ = args.get("type") == "float"
    sym = bool(args.get("symmetric", True))
    dynamic = args.get("dynamic") in (True, "local")
    try:
        bits = int(require(args, "num_bits", name, "input_activations argument"))
        spec = QuantSpec(type="float" if float_ else "int", bits=bits, fmt="e4m3" if float_ else None,
                         symmetric=sym, signed=True, granularity=args.get("strategy") or "tensor",
                         group_size=args.get("group_size"), dynamic=dynamic, full_range=sym and not float_)
    except (SpecError, TypeError, ValueError) as e:
        raise LowbitError(f"{name}: input_activations {args} is not a scheme lowbit runs: {e}") from None
    q = ActQuantizer(spec)
    if not dynamic:
        if "input_scale" not in t:
            raise LowbitError(f"{name}: static input quantization but no input_scale tensor: the config and the "
                              "tensors disagree")
        check_finite(name, "input_scale", t["input_scale"])
        s = t["input_scale"].float().reshape(-1)[0]
        if float_:
            q.load_range(-s * 448.0, s * 448.0)
        elif sym:
            top = (1 << (spec.bits - 1)) - 0.5
            q.load_range(-s * top, s * top)
        else:
            z = t.get("input_zero_point", torch.zeros(1)).float().reshape(-1)[0]
            q.load_range((spec.qmin - z) * s, (spec.qmax - z) * s)
    return q


def _quantization_config(path: Path) -> dict[str, Any]:
    """``quantization_config`` of ``path/config.json``, its config groups checked for what lowbit reads."""
    cfg_file = path / "config.json"
    qc = read_config_json(cfg_file).get("quantization_config") or {}
    groups = qc.get("config_groups")
    if not isinstance(groups, dict) or not groups:
        raise LowbitError(f"{cfg_file}: quantization_config has no config_groups, so no layer says how it is "
                          f"quantized; {CT_FIX}")
    top = qc.get("format")
    if top is not None and top not in CONFIG_FORMATS:
        raise LowbitError(f"{cfg_file}: quantization_config format {top!r} is not a compressed-tensors format lowbit "
                          f"reads ({', '.join(CONFIG_FORMATS)}); {CT_FIX}")
    for gname, group in groups.items():
        if not isinstance(group, dict) or not isinstance(group.get("weights"), dict):
            raise LowbitError(f"{cfg_file}: quantization_config group {gname!r} has no 'weights' arguments; {CT_FIX}")
    return qc


def plain_model(path: Path, dtype: torch.dtype, empty: bool = False) -> torch.nn.Module:
    """The config's model with fresh weights (real buffers such as rotary tables), Conv1D as nn.Linear.

    ``empty``: its parameters on the meta device (no memory, no random init), to be replaced or assigned
    from the checkpoint (``lowbit.checkpoint.meta_tensors`` names any left behind)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    with quiet_loading():
        config = AutoConfig.from_pretrained(path)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    with parameters_on_meta() if empty else contextlib.nullcontext():
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    convert_conv1d(model)
    return model


def _check_layer_sets(path: Path, per_layer: dict[str, Any], schemes: dict[str, Any], linears: set[str]) -> None:
    """Every quantized tensor belongs to a targeted linear of the model, and every targeted linear has them."""
    for name in sorted(per_layer):
        if name not in linears:
            raise LowbitError(f"{path}: quantized tensors for {name}, which is not a linear layer of the model "
                              f"config.json describes: the config and the tensors disagree; {CT_FIX}")
        if name not in schemes:
            raise LowbitError(f"{path}: {name} has quantized tensors but no config group of quantization_config "
                              f"targets it; {CT_FIX}")
    missing_layers = sorted(set(schemes) - set(per_layer))
    if missing_layers:
        raise LowbitError(f"{path}: the config quantizes {missing_layers[0]} (and {len(missing_layers) - 1} more) but "
                          f"the file has no quantized tensors for it: the config and the tensors disagree; {CT_FIX}")


def _quantized_module(name: str, w: LayerWeight, old: torch.nn.Linear, dtype: torch.dtype,
                      packed: torch.Tensor | None = None) -> torch.nn.Module:
    """The module that runs layer ``name``'s weight: ``QuantLinear`` for int (``packed``: its stored words, used
    as they are), ``nn.Linear`` for float formats.

    The bias (if the layer has one) is a placeholder until the checkpoint's dense tensors are loaded."""
    if w.shape != (old.out_features, old.in_features):
        raise LowbitError(f"{name}: the checkpoint holds a {w.shape[0]}x{w.shape[1]} weight where the model of "
                          f"config.json has a {old.out_features}x{old.in_features} one: the config and the tensors "
                          f"disagree; {CT_FIX}")
    if isinstance(w, IntWeight):
        return QuantLinear(w, old.bias, dtype, packed=packed)
    return quantized_linear(QuantizedWeight(w, None, "compressed-tensors"), old.bias, dtype)


def _quantized_embedding(name: str, w: LayerWeight, old: torch.nn.Embedding, dtype: torch.dtype
                         ) -> torch.nn.Embedding:
    """``old`` holding the dequantized rows of its stored codes (a tied head is re-tied to them on load)."""
    if w.shape != tuple(old.weight.shape):
        raise LowbitError(f"{name}: the checkpoint holds a {w.shape[0]}x{w.shape[1]} embedding where config.json "
                          f"has {old.weight.shape[0]}x{old.weight.shape[1]}: the config and the tensors disagree; "
                          f"{CT_FIX}")
    old.weight = torch.nn.Parameter(w.dequantize().to(dtype), requires_grad=False)
    return old


def _load_dense(path: Path, model: torch.nn.Module, dense: dict[str, torch.Tensor], quantized: set[str]) -> None:
    """Check the non-quantized tensors against the model (the loader report), then load them."""
    report = LoadReport(str(path), f"check that config.json belongs to these weights, or {CT_FIX}")
    expected = {k: t for k, t in model.state_dict().items()
                if not (k.rpartition(".")[0] in quantized and not k.endswith(".bias"))}
    header = safetensors_header(path / WEIGHTS_FILE)
    compare_tensors(report, expected, {k: header[k] for k in dense}, model).check()
    state = model.state_dict(keep_vars=True)
    dense = {k: v.to(state[k].dtype) if k in state and state[k].is_floating_point() and v.dtype != state[k].dtype
             else v for k, v in dense.items()}  # assigned, not copied: take the model's dtype first
    model.load_state_dict(dense, strict=False, assign=True)
    if getattr(model.config, "tie_word_embeddings", False):
        model.tie_weights()
    left = meta_tensors(model)
    if left:
        raise LowbitError(f"{path}: {len(left)} tensor(s) the model needs are not in the checkpoint ({', '.join(left[:3])}"
                          f"); check that config.json belongs to these weights, or {CT_FIX}")
    finite_state(report, model).check()


@dataclass
class CTLayout:
    """How a compressed-tensors checkpoint quantizes a model's linears: each one's config group, the names they
    are stored under, and the checkpoint's default format."""

    schemes: dict[str, dict[str, Any]]  # model layer name -> its config group
    saved: dict[str, str]  # model layer name -> name on disk, where they differ (MoE experts)
    default: str | None

    @cached_property
    def dense_weight(self) -> set[str]:
        """Stored names of the layers whose codes sit under a plain ``weight`` (int- / float-quantized)."""
        return {self.saved.get(n, n) for n, g in self.schemes.items()
                if (g.get("format") or self.default) in DENSE_WEIGHT_FORMATS}

    def stored_name(self, name: str) -> str:
        return self.saved.get(name, name)

    def quantized_module(self, name: str, t: dict[str, torch.Tensor], old: torch.nn.Linear, dtype: torch.dtype
                         ) -> torch.nn.Module:
        """Layer ``name``'s module from its stored tensors ``t`` (suffix -> tensor), its input quantizer on."""
        group = self.schemes[name]
        fmt = group.get("format") or self.default
        if fmt == "pack-quantized" and isinstance(old, torch.nn.Linear):  # codes stay packed: no unpacked copy
            packed, w = read_packed_int(name, t, group["weights"])
        else:
            packed, w = None, read_layer_weight(name, t, fmt, group["weights"])
        if isinstance(old, torch.nn.Embedding):
            return _quantized_embedding(name, w, old, dtype)
        new = _quantized_module(name, w, old, dtype, packed)
        q = _input_quantizer(name, group.get("input_activations"), t)
        if q is not None:
            attach_input_quantizer(new, q)
        return new


def ct_layout(model: torch.nn.Module, qc: dict[str, Any], keys: Iterable[str]) -> CTLayout:
    """The layout of a checkpoint with ``quantization_config`` ``qc`` and tensor names ``keys`` over ``model``
    (a fresh model of its config, whose MoE experts are made one linear each when the checkpoint stores them so)."""
    keys = list(keys)
    unfuse_like(model, keys)
    layers = {n: "Linear" if isinstance(m, torch.nn.Linear) else "Embedding" for n, m in model.named_modules()
              if isinstance(m, QUANTIZABLE)}
    linears = [n for n, kind in layers.items() if kind == "Linear"]
    saved = saved_layer_names(model, linears)
    ignored = set(qc.get("ignore") or [])
    schemes = {n: g for n, kind in layers.items() if saved.get(n, n) not in ignored
               and (g := _scheme_for(saved.get(n, n), qc, kind)) is not None}
    return CTLayout(schemes, saved, qc.get("format"))


def read_ct_config(path: str | Path) -> dict[str, Any]:
    """The checked ``quantization_config`` of compressed-tensors checkpoint ``path``."""
    return _quantization_config(Path(path))


def replace_module(model: torch.nn.Module, name: str, new: torch.nn.Module) -> torch.nn.Module:
    """Put ``new`` at ``name`` in ``model``; returns the module it replaced."""
    old = model.get_submodule(name)
    model.set_submodule(name, new)
    return old


def load_compressed_tensors(path: str | Path, dtype: torch.dtype = torch.float32) -> torch.nn.Module:
    """Build the model of a compressed-tensors checkpoint with lowbit modules: ``QuantLinear`` for int
    weights, ``nn.Linear`` holding the dequantized values for FP8 / NVFP4 (no packed float kernel on CPU),
    and input quantizers where the scheme quantizes activations.  Every tensor is checked against the
    model (``lowbit.checkpoint``): nothing is left randomly initialised, nothing is NaN."""
    path = Path(path)
    qc = _quantization_config(path)
    if not (path / WEIGHTS_FILE).is_file():
        raise LowbitError(f"{path} has a compressed-tensors config but no {WEIGHTS_FILE}; {CT_FIX}")
    model = plain_model(path, dtype, empty=True)
    with SafetensorsReader(path / WEIGHTS_FILE) as f:
        layout = ct_layout(model, qc, f.keys())
        per_layer, dense = split_packed(f, layout.dense_weight)
    by_stored = {s: n for n, s in layout.saved.items()}
    per_layer = {by_stored.get(n, n): t for n, t in per_layer.items()}
    linears = {n: m for n, m in model.named_modules() if isinstance(m, QUANTIZABLE)}
    _check_layer_sets(path, per_layer, layout.schemes, set(linears))
    for name, t in per_layer.items():
        replace_module(model, name, layout.quantized_module(name, t, linears[name], dtype))
    if getattr(model.config, "tie_word_embeddings", False):
        model.tie_weights()  # a head tied to a quantized embedding reads its dequantized rows
    _load_dense(path, model, dense, set(per_layer))
    return model.eval()
