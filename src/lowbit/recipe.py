"""Recipes: which method quantizes which layers with which spec, loaded from YAML or built in code.

A recipe is a list of entries, optionally after block transforms::

    name: gptq-w4g64
    transforms:                 # optional: equivalence rewrites before quantization
      - transform: smoothquant
        options: {alpha: 0.5}
    methods:
      - method: gptq
        spec: W4_G64            # a preset name, or a dict of QuantSpec fields
        targets: [Linear]       # module class names, exact or suffix names, or "re:<regex>"
        ignore: [lm_head]
        options: {damp: 0.01, act_order: true}
        activations: A8_TOKEN   # optional: quantize the layers' inputs too (W8A8, W4A8 ...)

Shipped recipes live in ``lowbit/recipes/*.yaml`` and are found by name.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import torch
import yaml

from lowbit.errors import LowbitError
from lowbit.kvcache.config import KVCacheConfig, as_kv_config
from lowbit.methods import get_method
from lowbit.methods.base import WeightMethod
from lowbit.models.arch import architecture_of
from lowbit.spec import PRESETS, QuantSpec, SpecError, preset
from lowbit.transforms import BlockTransform, get_transform


@dataclass
class MethodEntry:
    """One line of a recipe."""

    method: str
    spec: QuantSpec
    targets: list[str] = field(default_factory=lambda: ["Linear"])
    ignore: list[str] = field(default_factory=lambda: ["lm_head"])
    options: dict[str, Any] = field(default_factory=dict)
    activations: QuantSpec | None = None  # input activation spec (W8A8, W4A8 ...); None: weight-only

    def to_dict(self) -> dict[str, Any]:
        d = {"method": self.method, "spec": self.spec.to_dict(), "targets": list(self.targets),
             "ignore": list(self.ignore), "options": dict(self.options)}
        if self.activations is not None:
            d["activations"] = self.activations.to_dict()
        return d


@dataclass
class TransformEntry:
    """A block transform run before the methods (``transforms: [{transform: smoothquant, options: ...}]``)."""

    transform: str
    options: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {"transform": self.transform, "options": dict(self.options)}


@dataclass
class Recipe:
    name: str
    entries: list[MethodEntry]
    transforms: list[TransformEntry] = field(default_factory=list)
    kv_cache: KVCacheConfig | None = None  # how generation and evaluation quantize the KV cache

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {"name": self.name}
        if self.transforms:
            d["transforms"] = [t.to_dict() for t in self.transforms]
        d["methods"] = [e.to_dict() for e in self.entries]
        if self.kv_cache is not None:
            d["kv_cache"] = self.kv_cache.to_dict()
        return d

    def build_transforms(self) -> list[BlockTransform]:
        """Fresh instances of the recipe's transforms (each records what it did)."""
        return [get_transform(t.transform, t.options) for t in self.transforms]

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)

    def build(self) -> list[WeightMethod]:
        """Instantiate every entry's method (raises on unknown methods/options)."""
        return [get_method(e.method, e.spec, e.options, e.activations) for e in self.entries]


def _parse_spec(value: Any, where: str) -> QuantSpec:
    try:
        if isinstance(value, str):
            return preset(value)
        if isinstance(value, dict):
            if "preset" in value:
                base = preset(value["preset"]).to_dict()
                base.update({k: v for k, v in value.items() if k != "preset"})
                value = base
            return QuantSpec.from_dict(value)
    except SpecError as exc:
        raise LowbitError(f"{where}: {exc}") from None
    raise LowbitError(f"{where}: spec must be a preset name ({', '.join(PRESETS)}) or a mapping of QuantSpec fields")


def _as_list(value: Any, where: str) -> list[str]:
    if isinstance(value, str):
        return [value]
    if isinstance(value, (list, tuple)) and all(isinstance(v, str) for v in value):
        return list(value)
    raise LowbitError(f"{where} must be a string or a list of strings")


def recipe_from_dict(data: Any, name: str = "recipe") -> Recipe:
    """Validate a parsed recipe mapping; every error names the entry and the field."""
    if not isinstance(data, dict) or not isinstance(data.get("methods"), list) or not data["methods"]:
        raise LowbitError(f"recipe {name!r} must be a mapping with a non-empty 'methods' list")
    entries = []
    for i, raw in enumerate(data["methods"]):
        where = f"recipe {name!r} entry {i}"
        if not isinstance(raw, dict) or "method" not in raw:
            raise LowbitError(f"{where} must be a mapping with a 'method' field")
        unknown = set(raw) - {"method", "spec", "targets", "ignore", "options", "activations"}
        if unknown:
            raise LowbitError(f"{where} has unknown field(s) {', '.join(sorted(unknown))}")
        entry = MethodEntry(
            method=str(raw["method"]),
            spec=_parse_spec(raw.get("spec", "W4_G128"), where),
            targets=_as_list(raw.get("targets", ["Linear"]), f"{where} targets"),
            ignore=_as_list(raw.get("ignore", ["lm_head"]), f"{where} ignore"),
            options=dict(raw.get("options") or {}),
            activations=None if raw.get("activations") is None else _parse_spec(raw["activations"], f"{where} activations"),
        )
        get_method(entry.method, entry.spec, entry.options, entry.activations)  # unknown method / option -> clear error now
        entries.append(entry)
    transforms = []
    raw_t = data.get("transforms") or []
    if not isinstance(raw_t, list):
        raise LowbitError(f"recipe {name!r} 'transforms' must be a list of mappings")
    for i, raw in enumerate(raw_t):
        where = f"recipe {name!r} transform {i}"
        if not isinstance(raw, dict) or "transform" not in raw or set(raw) - {"transform", "options"}:
            raise LowbitError(f"{where} must be a mapping with 'transform' and optional 'options'")
        t = TransformEntry(str(raw["transform"]), dict(raw.get("options") or {}))
        get_transform(t.transform, t.options)  # unknown transform / option -> clear error now
        transforms.append(t)
    unknown = set(data) - {"name", "methods", "transforms", "kv_cache"}
    if unknown:
        raise LowbitError(f"recipe {name!r} has unknown field(s) {', '.join(sorted(unknown))}")
    kv = data.get("kv_cache")
    try:
        kv_cache = None if kv is None else as_kv_config(kv)
    except LowbitError as e:
        raise LowbitError(f"recipe {name!r} kv_cache: {e}") from None
    return Recipe(str(data.get("name", name)), entries, transforms, kv_cache)


def shipped_recipes() -> dict[str, str]:
    """Names of the recipes shipped with lowbit -> their YAML text."""
    folder = resources.files("lowbit") / "recipes"
    return {p.name[:-5]: p.read_text() for p in folder.iterdir() if p.name.endswith(".yaml")}


def load_recipe(ref: str | Path | dict[str, Any] | Recipe) -> Recipe:
    """A Recipe from an object, a dict, a shipped recipe name, or a YAML file path."""
    if isinstance(ref, Recipe):
        return ref
    if isinstance(ref, dict):
        return recipe_from_dict(ref)
    text_ref = str(ref)
    shipped = shipped_recipes()
    if text_ref in shipped:
        return recipe_from_dict(yaml.safe_load(shipped[text_ref]), text_ref)
    path = Path(text_ref).expanduser()
    if not path.is_file():
        raise LowbitError(f"unknown recipe {text_ref!r}: not a file and not a shipped recipe ({', '.join(sorted(shipped))})")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise LowbitError(f"recipe {path} is not valid YAML: {str(exc).splitlines()[0]}") from None
    return recipe_from_dict(data, path.stem)


def _matches(pattern: str, name: str, module: torch.nn.Module) -> bool:
    if pattern.startswith("re:"):
        return re.fullmatch(pattern[3:], name) is not None
    return pattern == type(module).__name__ or name == pattern or name.endswith("." + pattern)


def resolve_targets(model: torch.nn.Module, recipe: Recipe) -> dict[str, WeightMethod]:
    """Map every targeted linear (inside the decoder blocks) to its method; validate before work."""
    blocks_prefix = architecture_of(model).blocks + "."
    linears = {n: m for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    assignments: dict[str, WeightMethod] = {}
    for entry, method in zip(recipe.entries, recipe.build()):
        chosen = {
            n: m for n, m in linears.items()
            if any(_matches(p, n, m) for p in entry.targets) and not any(_matches(p, n, m) for p in entry.ignore)
        }
        outside = sorted(n for n in chosen if not n.startswith(blocks_prefix))
        if outside and len(outside) == len(chosen):
            raise LowbitError(
                f"recipe entry {entry.method!r}: targets {entry.targets} match only layers outside the decoder "
                f"blocks ({', '.join(outside[:3])}); those are not quantized by the sequential pipeline"
            )
        chosen = {n: m for n, m in chosen.items() if n.startswith(blocks_prefix)}
        if not chosen:
            raise LowbitError(
                f"recipe entry {entry.method!r}: targets {entry.targets} (ignore {entry.ignore}) match no linear "
                f"layer of {type(model).__name__}; e.g. {', '.join(list(linears)[:3])}"
            )
        for n, m in chosen.items():
            if n in assignments:
                raise LowbitError(f"layer {n} is targeted by two recipe entries ({assignments[n].name}, {entry.method})")
            method.validate_layer(n, m)
            assignments[n] = method
    return assignments


def recipe_from_flags(method: str, bits: int, group_size: int | None, symmetric: bool,
                      options: dict[str, Any] | None = None, activations: str | None = None) -> Recipe:
    """The common case as a one-entry recipe (``--method gptq --bits 4 --group-size 128
    [--activations A8_TOKEN]``)."""
    try:
        if group_size:
            spec = QuantSpec(type="int", bits=bits, granularity="group", group_size=group_size,
                             symmetric=symmetric, signed=symmetric)
        else:
            spec = QuantSpec(type="int", bits=bits, granularity="channel", symmetric=symmetric, signed=symmetric)
    except SpecError as exc:
        raise LowbitError(str(exc)) from None
    g = f"g{group_size}" if group_size else ""
    entry: dict[str, Any] = {"method": method, "spec": spec.to_dict(), "options": options or {}}
    act = ""
    if activations:
        entry["activations"] = activations
        act = "-" + activations.lower()
    return recipe_from_dict({"name": f"{method}-w{bits}{g}{'' if symmetric else '-asym'}{act}", "methods": [entry]})
