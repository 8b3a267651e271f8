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

import functools
import re
from contextlib import contextmanager
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any, Iterator

import torch
import yaml

from lowbit.errors import LowbitError
from lowbit.safeio import load_yaml, read_yaml
from lowbit.kvcache.config import KVCacheConfig, as_kv_config
from lowbit.methods import get_method
from lowbit.methods.base import WeightMethod
from lowbit.arch import architecture_of, head_is_tied
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

    def __post_init__(self) -> None:
        self.targets = layer_patterns(self.targets, "targets")
        self.ignore = layer_patterns(self.ignore, "ignore")

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


ENTRY_FIELDS = ("method", "spec", "targets", "ignore", "options", "activations")
TRANSFORM_FIELDS = ("transform", "options")
RECIPE_FIELDS = ("name", "transforms", "methods", "kv_cache")


@contextmanager
def _context(where: str) -> Iterator[None]:
    """Prefix the message of any LowbitError raised inside with ``where``."""
    try:
        yield
    except LowbitError as exc:
        raise LowbitError(f"{where}: {exc}") from None


@functools.lru_cache(maxsize=None)
def _regex(pattern: str) -> re.Pattern[str]:
    return re.compile(pattern[3:])


def layer_patterns(value: Any, what: str) -> list[str]:
    """``value`` (a string or a list of strings) as a list of layer patterns; every ``re:`` pattern
    must compile."""
    items = [value] if isinstance(value, str) else value
    if not isinstance(items, (list, tuple)) or not all(isinstance(v, str) for v in items):
        raise LowbitError(f"{what} must be a string or a list of strings (class names, layer names or "
                          f"'re:<regex>'), got {value!r:.60}")
    for i, pattern in enumerate(items):
        if pattern.startswith("re:"):
            try:
                _regex(pattern)
            except (re.error, OverflowError, RecursionError) as exc:
                raise LowbitError(f"{what} entry {i} {pattern!r} is not a valid regular expression ({exc}); "
                                  "fix the pattern or drop the 're:' prefix") from None
    return list(items)


def _unknown_fields(raw: dict[str, Any], known: tuple[str, ...]) -> None:
    unknown = set(raw) - set(known)
    if unknown:
        raise LowbitError(f"unknown field(s) {', '.join(sorted(map(str, unknown)))}; the fields are "
                          f"{', '.join(known)}")


def _parse_spec(value: Any) -> QuantSpec:
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
        raise LowbitError(str(exc)) from None
    raise LowbitError(f"spec must be a preset name ({', '.join(PRESETS)}) or a mapping of QuantSpec fields")


def _options(raw: dict[str, Any]) -> Any:
    """The entry's options; an empty ``options:`` is none (the registry refuses anything but a mapping)."""
    return {} if raw.get("options") is None else raw["options"]


def _method_entry(raw: Any) -> MethodEntry:
    if not isinstance(raw, dict) or "method" not in raw:
        raise LowbitError("must be a mapping with a 'method' field")
    _unknown_fields(raw, ENTRY_FIELDS)
    with _context("spec"):
        spec = _parse_spec(raw.get("spec", "W4_G128"))
    with _context("activations"):
        activations = None if raw.get("activations") is None else _parse_spec(raw["activations"])
    get_method(raw["method"], spec, _options(raw), activations)  # unknown method, bad option -> clear error now
    return MethodEntry(raw["method"], spec, raw.get("targets", ["Linear"]), raw.get("ignore", ["lm_head"]),
                       dict(_options(raw)), activations)


def _transform_entry(raw: Any) -> TransformEntry:
    if not isinstance(raw, dict) or "transform" not in raw:
        raise LowbitError("must be a mapping with a 'transform' field and optional 'options'")
    _unknown_fields(raw, TRANSFORM_FIELDS)
    get_transform(raw["transform"], _options(raw))  # unknown transform, bad option -> clear error now
    return TransformEntry(raw["transform"], dict(_options(raw)))


def _list_field(data: dict[str, Any], key: str, required: bool) -> list[Any]:
    value = data.get(key)
    if value is None and not required:
        return []
    if not isinstance(value, list) or (required and not value):
        raise LowbitError(f"'{key}' must be a {'non-empty ' if required else ''}list of mappings")
    return value


def recipe_from_dict(data: Any, name: str = "recipe") -> Recipe:
    """Validate a parsed recipe mapping; every error names the recipe, the entry and the field."""
    where = f"recipe {name!r}"
    if not isinstance(data, dict):
        raise LowbitError(f"{where} must be a mapping with a non-empty 'methods' list, got {type(data).__name__}")
    with _context(where):
        _unknown_fields(data, RECIPE_FIELDS)
        if not isinstance(data.get("name", name), str):
            raise LowbitError("name must be a string (quote it in YAML)")
        entries = []
        for i, raw in enumerate(_list_field(data, "methods", required=True)):
            with _context(f"entry {i}"):
                entries.append(_method_entry(raw))
        transforms = []
        for i, raw in enumerate(_list_field(data, "transforms", required=False)):
            with _context(f"transform {i}"):
                transforms.append(_transform_entry(raw))
        with _context("kv_cache"):
            kv_cache = None if data.get("kv_cache") is None else as_kv_config(data["kv_cache"])
    return Recipe(data.get("name", name), entries, transforms, kv_cache)


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
        return recipe_from_dict(load_yaml(shipped[text_ref], f"shipped recipe {text_ref}"), text_ref)
    path = Path(text_ref).expanduser()
    if not path.is_file():
        raise LowbitError(f"unknown recipe {text_ref!r}: not a file and not a shipped recipe ({', '.join(sorted(shipped))})")
    data = read_yaml(path, "recipe")
    try:
        return recipe_from_dict(data, path.stem)
    except LowbitError as e:
        raise LowbitError(f"{path}: {e}") from None


def _matches(pattern: str, name: str, module: torch.nn.Module) -> bool:
    if pattern.startswith("re:"):
        return _regex(pattern).fullmatch(name) is not None
    return pattern == type(module).__name__ or name == pattern or name.endswith("." + pattern)


def _unnamed_router(name: str, routers: tuple[str, ...], targets: list[str]) -> bool:
    """A router linear (MoE gate) that the entry's targets do not name explicitly: routers stay in full precision
    unless asked for, since a rounded router sends tokens to other experts."""
    return any(name.endswith("." + r) for r in routers) and not any(
        p.startswith("re:") or p != "Linear" and name.endswith(p) for p in targets)


def _names(pattern: str, name: str) -> bool:
    """Whether ``pattern`` names ``name`` (a name, a dotted suffix or ``re:``), not by class."""
    if pattern.startswith("re:"):
        return _regex(pattern).fullmatch(name) is not None
    return name == pattern or name.endswith("." + pattern)


def outer_modules(model: torch.nn.Module) -> dict[str, torch.nn.Module]:
    """The input embedding and the output head by name; a head tied to the embedding appears once, under the
    embedding's name (one tensor serves both)."""
    out: dict[str, torch.nn.Module] = {}
    embed, head = model.get_input_embeddings(), model.get_output_embeddings()
    names = {id(m): n for n, m in model.named_modules()}
    for module in (embed, head):
        if module is None or id(module) not in names or getattr(module, "weight", None) is None:
            continue
        if module is head and embed is not None and head.weight is embed.weight:
            continue  # tied: the embedding's entry is the head's too
        out[names[id(module)]] = module
    return out


def _tied_head(model: torch.nn.Module) -> str | None:
    if not head_is_tied(model):
        return None
    head = model.get_output_embeddings()
    return next(n for n, m in model.named_modules() if m is head)


def resolve_outer_targets(model: torch.nn.Module, recipe: Recipe) -> dict[str, WeightMethod]:
    """The input embedding and output head that recipe entries name (by name or ``re:``, never by class, so
    ``Linear`` keeps meaning the blocks' linears): each with its step, which must round without calibration data
    (rtn, hqq ...), since these tensors sit outside the block pipeline.  A tied head is named through its
    embedding: both names reach the one tensor."""
    outer = outer_modules(model)
    tied = _tied_head(model)
    chosen: dict[str, WeightMethod] = {}
    for entry, method in zip(recipe.entries, recipe.build()):
        for name, module in outer.items():
            aliases = [name] + ([tied] if tied and module is model.get_input_embeddings() else [])
            ignore = [p for p in entry.ignore if p not in entry.targets]  # named in both (lm_head): named wins
            if not any(_names(p, a) and not any(_names(i, a) for i in ignore) for p in entry.targets for a in aliases):
                continue
            if name in chosen:
                raise LowbitError(f"{name}{' (tied to ' + tied + ')' if tied and name != tied else ''} is named by "
                                  f"two recipe entries ({chosen[name].name!r}, {entry.method!r}); one tensor takes "
                                  "one step")
            if not method.rounds() or method.statistics(name, module) or method.after_rounding:
                raise LowbitError(f"recipe entry {entry.method!r} names {name}, which sits outside the decoder "
                                  "blocks: only a rounding step that needs no calibration data quantizes it (rtn, "
                                  "hqq ...); quantize it with one of those in its own entry")
            method.validate_layer(name, module)
            chosen[name] = method
    return chosen


def resolve_targets(model: torch.nn.Module, recipe: Recipe) -> dict[str, list[WeightMethod]]:
    """Map every targeted linear (inside the decoder blocks) to its steps, in recipe order; validate before work.

    A layer may be targeted by several entries (staged recipes): at most one of its steps rounds, and it
    comes last."""
    arch = architecture_of(model)
    blocks_prefix = arch.blocks + "."
    linears = {n: m for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    outer_names = [*outer_modules(model), *filter(None, [_tied_head(model)])]  # quantized by resolve_outer_targets
    assignments: dict[str, list[WeightMethod]] = {}
    for entry, method in zip(recipe.entries, recipe.build()):
        chosen = {
            n: m for n, m in linears.items()
            if any(_matches(p, n, m) for p in entry.targets) and not any(_matches(p, n, m) for p in entry.ignore)
            and not _unnamed_router(n, arch.routers, entry.targets)
        }
        outside = sorted(n for n in chosen if not n.startswith(blocks_prefix))
        named_outer = any(_names(p, n) for p in entry.targets for n in outer_names)
        if outside and len(outside) == len(chosen) and not named_outer:
            raise LowbitError(
                f"recipe entry {entry.method!r}: targets {entry.targets} match only layers outside the decoder "
                f"blocks ({', '.join(outside[:3])}); those are not quantized by the sequential pipeline"
            )
        chosen = {n: m for n, m in chosen.items() if n.startswith(blocks_prefix)}
        if not chosen and not named_outer:
            raise LowbitError(
                f"recipe entry {entry.method!r}: targets {entry.targets} (ignore {entry.ignore}) match no linear "
                f"layer of {type(model).__name__}; e.g. {', '.join(list(linears)[:3])}"
            )
        for n, m in chosen.items():
            steps = assignments.setdefault(n, [])
            rounded_by = next((s.name for s in steps if s.rounds()), None)
            if method.after_rounding and rounded_by is None:
                raise LowbitError(f"layer {n}: {entry.method!r} trains what a rounding step made, and no earlier entry "
                                  "rounds this layer; put it after the rounding step (e.g. qat-block, gptq)")
            if rounded_by is not None and not method.after_rounding:
                raise LowbitError(f"layer {n}: recipe entry {entry.method!r} comes after {rounded_by!r}, which "
                                  "already rounded it; put the rounding step last (only steps that train the "
                                  "rounded layers, such as qat-e2e, may follow it)")
            method.validate_layer(n, m)
            if method.lorc_rank > min(m.weight.shape):
                raise LowbitError(f"{entry.method!r} lorc_rank {method.lorc_rank} is above min(out, in) = "
                                  f"{min(m.weight.shape)} of {n}; use a rank of at most {min(m.weight.shape)}")
            steps.append(method)
    for n, steps in assignments.items():
        _check_steps(n, steps)
    return assignments


def _check_steps(layer: str, steps: list[WeightMethod]) -> None:
    """The rules of a layer's chain of steps, checked before any work."""
    for i, step in enumerate(steps):
        pruned_by = next((s.name for s in steps[:i] if s.prunes), None)
        if pruned_by is not None and not step.keeps_mask():
            raise LowbitError(f"layer {layer}: {step.name!r} after {pruned_by!r} would move the pruned weights off 0 "
                              "(it does not keep a pruning mask); round with gptq, or rtn with an int or float spec")
        factorized_by = next((s.name for s in steps[:i] if s.factorizes), None)
        if factorized_by is not None:
            raise LowbitError(f"layer {layer}: {step.name!r} after {factorized_by!r}, which stores the layer as two "
                              "low-rank factors; rounding their product would lose the savings: put it last")
        if step.lorc_rank and not step.rounds():
            raise LowbitError(f"layer {layer}: lorc_rank corrects a rounding error, and {step.name!r} does not round "
                              "here; give lorc_rank to the rounding step")
        if step.lorc_rank and pruned_by is not None:
            raise LowbitError(f"layer {layer}: a LoRC correction (lorc_rank) is dense and would refill the weights "
                              f"{pruned_by!r} pruned; drop lorc_rank or the pruning step")
        if step.after_rounding and any(s.lorc_rank for s in steps[:i]):
            raise LowbitError(f"layer {layer}: {step.name!r} trains the codes, and the LoRC correction of the "
                              "rounding step would be stale after it; drop lorc_rank")
        if step.activations is not None and not step.rounds():
            raise LowbitError(f"layer {layer}: {step.name!r} does not round the layer here, so its 'activations' would "
                              "never apply; give the activation spec to the rounding step")
    last = [s for s in steps if not s.after_rounding][-1]
    if not last.rounds() and not last.prunes and not last.factorizes:
        raise LowbitError(f"layer {layer}: its last step {last.name!r} only prepares the weight (e.g. awq with round: "
                          "false); add a rounding step after it (gptq, rtn ...) or drop round: false")


def recipe_from_flags(method: str, bits: int, group_size: int | None, symmetric: bool,
                      options: dict[str, Any] | None = None, activations: str | None = None) -> Recipe:
    """The common case as a one-entry recipe (``--method gptq --bits 4 --group-size 128
    [--activations A8_TOKEN]``); ``group_size`` None: one scale per output channel."""
    if group_size is not None and (not isinstance(group_size, int) or isinstance(group_size, bool) or group_size <= 0):
        raise LowbitError(f"--group-size must be a positive integer (e.g. 64 or 128), got {group_size!r}; "
                          "leave --group-size out for one scale per output channel")
    try:
        if group_size is not None:
            spec = QuantSpec(type="int", bits=bits, granularity="group", group_size=group_size,
                             symmetric=symmetric, signed=symmetric)
        else:
            spec = QuantSpec(type="int", bits=bits, granularity="channel", symmetric=symmetric, signed=symmetric)
    except SpecError as exc:
        raise LowbitError(str(exc)) from None
    g = f"g{group_size}" if group_size is not None else ""
    entry: dict[str, Any] = {"method": method, "spec": spec.to_dict(), "options": options or {}}
    act = ""
    if activations:
        entry["activations"] = activations
        act = "-" + activations.lower()
    name = f"{method}-w{bits}{g}{'' if symmetric else '-asym'}{act}"
    return recipe_from_dict({"name": name, "methods": [entry]}, name)
