"""The contract every weight method follows, and the registry that maps names to methods.

A method is a dataclass config (its knobs) plus:

* ``statistics(name, layer)``: the accumulators (``lowbit.methods.statistics``) the step wants fed
  with each target linear's calibration inputs before ``quantize_layer`` is called (the default
  reads the two shorthand flags ``needs_hessian`` / ``needs_act_stats``); the pipeline attaches
  them and never decides what a step needs;
* ``prepare_model(model, calib, layers, batch_size)``: optional whole-model work before the first block
  (OWL measures every block's outliers on the dense model);
* ``prepare_block(ctx)``: optional whole-block work before the layers are quantized
  (e.g. AWQ's scale search and folding), given the block and its calibration inputs;
* ``finish_block(ctx)``: optional whole-block work after the layers and their inputs are
  quantized (ZeroQuant's layer-by-layer distillation);
* ``finish_model(model, calib)``: optional end-to-end work once every block is done (training
  the quantization parameters end to end);
* ``quantize_layer(name, layer, stats) -> LayerResult``: the new (fake-quant) weight, the
  exact stored bits per weight, and the stored weight's typed form (``IntWeight``, core's
  ``IntQuantized`` ...) that exporters dispatch on; the pipeline makes the layer a typed
  ``QuantizedModule`` holding it (``lowbit.quantized_layers``).

A layer may go through several steps, one recipe entry each, in recipe order (staged recipes:
AWQ's scale search then GPTQ's rounding; magnitude pruning then a quantizer).  At most one of a
layer's steps *rounds* (``rounds()`` true: ``quantize_layer`` gives the stored format), and it is
the last; the others rewrite the full-precision weight in ``prepare_layer`` (scales folded,
weights clamped or pruned) and may leave a sparsity mask that later steps keep
(``LayerStats.mask``).

Methods never load models or move data between devices: the pipeline does.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch

from lowbit.activations.quantizer import ActQuantizer, check_activation_spec
from lowbit.errors import LowbitError
from lowbit.fields import bounded, check_fields
from lowbit.methods.statistics import AbsMagnitude, Hessian, InputStatistic, LayerStats
from lowbit.quantized_layers import QuantizedWeight
from lowbit.registry import lookup, registrar
from lowbit.spec import QuantSpec

OPTIONS_ERROR = "invalid options for method {!r}: "


@dataclass
class PreparedLayer:
    """What a non-rounding step did to one layer's full-precision weight."""

    mask: torch.Tensor | None = None  # True where the weight is now pruned to zero (kept so by later steps)
    note: str | None = None  # for the report, e.g. "50.0% pruned (magnitude)"
    stored_params: int | None = None  # values the layer stores now, when not one per weight (low-rank factors)


@dataclass
class LayerResult:
    """What quantizing one layer produced."""

    weight: torch.Tensor  # fake-quant weight, same shape/dtype as the original
    bits_per_weight: float  # stored bits per weight, scales / zeros / outliers included
    form: Any = None  # the stored weight's typed form (``lowbit.quantized_layers``): IntWeight, IntQuantized, ...
    artifacts: dict[str, Any] = field(default_factory=dict)  # the step's own record, not read by exporters
    extra_params: int = 0  # full-precision values kept beside the codes (outliers), for reporting
    int_refusal: str | None = None  # why ``form`` has no integer-code form (fractional zeros, fp outliers)

    def stored(self, method: "WeightMethod") -> QuantizedWeight:
        """The ``QuantizedWeight`` the rounded layer holds."""
        return QuantizedWeight(self.form, method.spec, method.name, self.artifacts, self.int_refusal)


@dataclass
class WeightMethod:
    """Base class of weight-quantization methods (see module docstring)."""

    spec: QuantSpec = field(default_factory=lambda: QuantSpec(type="int", bits=4, granularity="group", group_size=128))
    activations: QuantSpec | None = None  # input activation spec of the layers (W8A8 ...), None: weight-only
    lorc_rank: int = bounded(0, ge=0)  # rounding steps: rank of a LoRC correction of the error (methods/lorc.py)

    name: ClassVar[str] = ""
    needs_hessian: ClassVar[bool] = False
    needs_act_stats: ClassVar[bool] = False
    accepts_activations: ClassVar[bool] = True  # False where the method quantizes its inputs its own way
    # True for a step that trains what an earlier step rounded (qat-e2e): it follows the rounding step, does no
    # per-layer work in the block pass and works in ``finish_model``
    after_rounding: ClassVar[bool] = False

    def __post_init__(self) -> None:
        """Check each option against its field's type and bounds (``lowbit.fields``); subclasses call
        this first, then check what spans several fields."""
        check_fields(self, OPTIONS_ERROR.format(self.name))

    def linear_weight(self, name: str, layer: torch.nn.Module) -> torch.Tensor:
        """The layer's 2-D weight, or a LowbitError saying this method quantizes linear layers only."""
        weight = getattr(layer, "weight", None)
        if weight is None or weight.dim() != 2:
            raise LowbitError(f"{name} has no 2-D weight; {self.name} quantizes linear layers only")
        return weight

    def require_hessian(self, name: str, stats: LayerStats) -> torch.Tensor:
        """The layer's Hessian, or a LowbitError when no calibration input reached the layer."""
        if stats.hessian is None:
            raise LowbitError(f"{self.name} needs calibration inputs for {name}, but none reached it")
        return stats.hessian

    def validate_layer(self, name: str, layer: torch.nn.Module) -> None:
        """Raise a LowbitError before any work if this layer cannot take the spec."""
        cols = self.linear_weight(name, layer).shape[1]
        gs = self.spec.group_size
        if self.spec.granularity == "group" and gs and cols % gs and self.spec.padding != "pad":
            divisors = [g for g in (32, 64, 128, 256) if cols % g == 0]
            raise LowbitError(
                f"group size {gs} does not divide {name}'s {cols} input features; use a group size that "
                f"does ({', '.join(map(str, divisors)) or 'none of 32/64/128/256'}) or padding: pad"
            )

    def input_quantizer(self, name: str) -> "ActQuantizer | None":
        """The quantizer put on the inputs of layer ``name`` (None: its inputs stay in full precision);
        called after the layer was quantized."""
        return None if self.activations is None else ActQuantizer(self.activations)

    def statistics(self, name: str, layer: torch.nn.Module) -> list[InputStatistic]:
        """Accumulators to feed with ``layer``'s calibration inputs (default: from the two flags)."""
        wanted: list[InputStatistic] = []
        if self.needs_hessian:
            wanted.append(Hessian())
        if self.needs_act_stats:
            wanted.append(AbsMagnitude())
        return wanted

    def fallback(self, name: str, layer: torch.nn.Module, stats: LayerStats) -> "WeightMethod | None":
        """The step to round ``layer`` with instead, when this one cannot: RTN with the same spec for a
        data-driven step's layer that no calibration token reached (an expert the router never chose)."""
        if stats.nsamples > 0 or not self.statistics(name, layer):
            return None
        return get_method("rtn", self.spec, activations=self.activations)

    def prepare_model(self, model: torch.nn.Module, calib: torch.Tensor, layers: dict[str, torch.nn.Module],
                      batch_size: int) -> None:  # noqa: D401 - optional hook
        """Whole-model work before the first block, given the layers this step is assigned (OWL's outlier
        pass over the dense model); default: nothing."""

    def prepare_block(self, ctx: "Any") -> None:  # noqa: D401 - optional hook
        """Whole-block work before layers are quantized (default: nothing)."""

    def finish_block(self, ctx: "Any") -> None:  # noqa: D401 - optional hook
        """Whole-block work after its layers and their inputs are quantized, before the block's outputs
        feed the next one (ZeroQuant's distillation); default: nothing."""

    def finish_model(self, model: torch.nn.Module, calib: torch.Tensor) -> None:  # noqa: D401 - optional hook
        """End-to-end work after every block is done (default: nothing)."""

    def overrides(self, hook: str) -> bool:
        """Whether this step implements the optional hook ``hook`` (``prepare_block``, ``finish_model`` ...)."""
        return getattr(type(self), hook) is not getattr(WeightMethod, hook)

    def needs_whole_model(self) -> str | None:
        """Why this step cannot run one block at a time (``lowbit.stream``), or None when it can."""
        if self.after_rounding or self.overrides("finish_model"):
            return "it trains or rewrites the whole model after the blocks"
        if self.overrides("prepare_model"):
            return "a pass over the whole model before the blocks"
        if self.factorizes:
            return "its layers become two linears once the whole model is done"
        return None

    prunes: ClassVar[bool] = False  # leaves a sparsity mask that later steps must keep
    factorizes: ClassVar[bool] = False  # stores the layer as low-rank factors: a final step, nothing rounds after it

    def keeps_mask(self) -> bool:
        """Whether this step leaves an earlier step's pruned weights exactly 0 (checked before work)."""
        return False

    def rounds(self) -> bool:
        """Whether ``quantize_layer`` gives the layer's stored format (True for quantizers); a step that only
        rewrites the full-precision weight for a later step to round answers False and implements
        ``prepare_layer``."""
        return True

    def quantize_layer(self, name: str, layer: torch.nn.Module, stats: LayerStats) -> LayerResult:
        raise NotImplementedError

    def prepare_layer(self, name: str, layer: torch.nn.Module, stats: LayerStats) -> PreparedLayer:
        """Rewrite the layer's weight in place in full precision (non-rounding steps only)."""
        raise NotImplementedError(f"{self.name} rounds its layers; it has no prepare_layer")

    @classmethod
    def options(cls) -> list[str]:
        return [f.name for f in dataclasses.fields(cls) if f.init and f.name not in ("spec", "activations")]


METHODS: dict[str, type[WeightMethod]] = {}


register_method = registrar(METHODS)  # class decorator: make a method available by its ``name``


def get_method(name: str, spec: QuantSpec, options: dict[str, Any] | None = None,
               activations: QuantSpec | None = None) -> WeightMethod:
    """Instantiate a registered method with its spec, options and input activation spec; clear errors
    for bad input."""
    cls = lookup(METHODS, "method", name, {} if options is None else options)
    if activations is not None:
        if not cls.accepts_activations:
            raise LowbitError(f"method {name!r} quantizes its layer inputs its own way and takes no activation spec; "
                              "drop 'activations' from this entry")
        check_activation_spec(activations, f"method {name!r} activations")
    try:
        return cls(spec=spec, activations=activations, **(options or {}))
    except (TypeError, ValueError) as exc:
        raise LowbitError(f"{OPTIONS_ERROR.format(name)}{exc}") from None
