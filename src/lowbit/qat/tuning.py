"""One fine-tuning run on token windows: QLoRA, LoRA, PEQA or end-to-end QAT, chosen by a ``TuneConfig``.

``check_config`` refuses a bad configuration before any model is touched; ``tune`` prepares the model for
the method (NF4 base + adapters, adapters alone, scale-only layers, fake-quantized layers), trains it with
``lowbit.qat.train.train_next_token`` and finishes it (QAT: back to typed quantized layers).  Reading data,
evaluating and writing the results are the job's (``lowbit.finetune``).
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Any

import torch

from lowbit.arch import architecture_of
from lowbit.core.quant import CodebookQuantized, FloatQuantized, IntQuantized, storage_bits
from lowbit.errors import LowbitError
from lowbit.packed.intweight import IntWeight
from lowbit.packed.qlinear import QuantLinear
from lowbit.quantized_layers import QuantizedWeight, is_quantized, quantized_linear, quantized_weight
from lowbit.spec import QuantSpec, SpecError, preset

METHODS = ("qlora", "lora", "peqa", "qat")
LORA_METHODS = ("qlora", "lora")
MERGES = ("dequantized", "requantized")
LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@dataclass(frozen=True)
class TuneConfig:
    """What to train and how.  ``spec``: QAT's format (a preset name or a ``QuantSpec``), also the format
    ``merge="requantized"`` rounds the merged weights to; ``learn_range``: QAT trains LSQ scales and zero
    points (True) or keeps min-max ranges with a straight-through gradient (False); None picks LSQ for int
    group / channel specs and min-max for the rest (float, NF4); ``alpha`` None: ``2 * rank``;
    ``checkpoint``, ``every``, ``resume``: ``train_next_token``'s resumable training state;
    ``gradient_checkpointing``: transformers' activation recomputation per decoder block."""

    method: str = "qlora"
    steps: int = 100
    lr: float = 1e-4
    batch_size: int = 4
    seed: int = 0
    rank: int = 16
    alpha: float | None = None
    targets: tuple[str, ...] = LORA_TARGETS
    spec: str | QuantSpec = "W4_G64"
    learn_range: bool | None = None
    optimizer: str = "adamw"
    merge: str | None = None
    checkpoint: str | None = None
    every: int = 0
    resume: bool = False
    gradient_checkpointing: bool = False  # recompute each block's activations in the backward (less memory)

    def __post_init__(self) -> None:
        if isinstance(self.targets, str):  # "q_proj,v_proj"
            object.__setattr__(self, "targets", tuple(t.strip() for t in self.targets.split(",") if t.strip()))
        else:
            object.__setattr__(self, "targets", tuple(self.targets))

    @property
    def lora_alpha(self) -> float:
        alpha = 2 * self.rank if self.alpha is None else self.alpha
        return int(alpha) if float(alpha).is_integer() else alpha

    def quant_spec(self) -> QuantSpec:
        """``spec`` as a ``QuantSpec``: a preset name or a YAML mapping of its fields (LowbitError if neither)."""
        if isinstance(self.spec, QuantSpec):
            return self.spec
        try:
            if ":" not in self.spec:
                return preset(self.spec)
            from lowbit.safeio import load_yaml

            fields = load_yaml(self.spec, "--spec")
            if not isinstance(fields, dict):
                raise SpecError("give a preset name or a mapping of QuantSpec fields")
            return QuantSpec.from_dict(fields)
        except (SpecError, TypeError) as exc:
            raise LowbitError(f"--spec {self.spec}: {exc}") from None

    def learned_ranges(self) -> bool:
        """Whether QAT trains its ranges (LSQ): ``learn_range``, or by the spec when that is None."""
        if self.learn_range is not None:
            return self.learn_range
        spec = self.quant_spec()
        return spec.type == "int" and spec.granularity in ("group", "channel")


def check_config(cfg: TuneConfig) -> None:
    """LowbitError (naming the option) for anything the run would refuse, before any work."""
    from lowbit.qat.fake_linear import check_trainable_spec
    from lowbit.qat.optim import check_optimizer

    if cfg.method not in METHODS:
        raise LowbitError(f"unknown method {cfg.method!r}; choose one of {', '.join(METHODS)}")
    for name in ("steps", "batch_size"):
        value = getattr(cfg, name)
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise LowbitError(f"--{name.replace('_', '-')} must be at least 1, got {value!r}")
    if not cfg.lr > 0:
        raise LowbitError(f"--lr must be positive, got {cfg.lr}")
    check_optimizer(cfg.optimizer)
    if cfg.every < 0:
        raise LowbitError(f"--save-every must be 0 or more, got {cfg.every}")
    if (cfg.resume or cfg.every) and not cfg.checkpoint:
        raise LowbitError("--resume and --save-every need --checkpoint FILE (where the training state lives)")
    if cfg.method in LORA_METHODS:
        if cfg.rank < 1:
            raise LowbitError(f"--rank must be at least 1, got {cfg.rank}")
        if not cfg.lora_alpha > 0:
            raise LowbitError(f"--alpha must be positive, got {cfg.alpha}")
        if not cfg.targets:
            raise LowbitError("--targets names no layer; give module names such as q_proj,v_proj")
    if cfg.merge is not None:
        if cfg.method not in LORA_METHODS:
            raise LowbitError(f"--merge folds LoRA adapters into the base; --method {cfg.method} trains none "
                              "(use --method lora or qlora)")
        if cfg.merge not in MERGES:
            raise LowbitError(f"unknown --merge {cfg.merge!r}; choose one of {', '.join(MERGES)}")
    if cfg.method == "qat":
        spec = cfg.quant_spec()
        try:
            check_trainable_spec(spec, cfg.learned_ranges())
        except LowbitError as exc:
            why = str(exc).replace("(learn_range: false)", "(--ranges minmax)")
            raise LowbitError(f"--method qat cannot train spec {cfg.spec}: {why}") from None
    elif cfg.merge == "requantized":
        cfg.quant_spec()


def block_linears(model: torch.nn.Module) -> list[str]:
    """Names of the linear layers (full-precision, typed quantized or packed) inside the decoder blocks."""
    prefix = architecture_of(model).blocks + "."
    kinds = (torch.nn.Linear, QuantLinear)
    return [n for n, m in model.named_modules() if n.startswith(prefix) and isinstance(m, kinds)]


def unpack(model: torch.nn.Module, names: list[str]) -> None:
    """Swap each packed ``QuantLinear`` of ``names`` (a checkpoint read back) for the typed quantized linear
    holding the same codes, which peft and fake-quant training take as an ``nn.Linear``."""
    for name in names:
        layer = model.get_submodule(name)
        if isinstance(layer, QuantLinear):
            typed = quantized_linear(QuantizedWeight(layer.int_weight(), None, "compressed-tensors"), layer.bias)
            model.set_submodule(name, typed.to(layer.weight_scale.device))


def _check_targets(names: list[str], targets: tuple[str, ...]) -> None:
    missing = [t for t in targets if not any(n == t or n.endswith("." + t) for n in names)]
    if missing:
        known = sorted({n.rsplit(".", 1)[-1] for n in names})
        raise LowbitError(f"--targets {', '.join(missing)} match no linear layer of the decoder blocks; this model "
                          f"has {', '.join(known)}")


def layer_bits(layer: torch.nn.Module) -> float:
    """Storage bits per weight of one base linear: its quantized form, else its dtype width."""
    from lowbit.qat.qlora import FrozenQuantLinear

    if isinstance(layer, FrozenQuantLinear):
        return layer.bits_per_weight()
    if isinstance(layer, QuantLinear):
        iw = layer.int_weight()
        return iw.storage_bits() / iw.codes.numel()
    qw = quantized_weight(layer)
    if qw is not None:
        if isinstance(qw.form, IntWeight):
            return qw.form.storage_bits() / qw.form.codes.numel()
        if isinstance(qw.form, (IntQuantized, FloatQuantized, CodebookQuantized)):
            return storage_bits(qw.form, qw.spec.scale_dtype if qw.spec is not None else "float32")
        if qw.spec is not None:
            return float(qw.spec.bits)
    return layer.weight.element_size() * 8.0


def _is_int(layer: torch.nn.Module) -> bool:
    return isinstance(layer, QuantLinear) or is_quantized(layer)


def _mean_bits(model: torch.nn.Module, names: list[str]) -> float:
    sizes = {n: model.get_submodule(n) for n in names}
    numel = {n: m.in_features * m.out_features for n, m in sizes.items()}
    return sum(layer_bits(m) * numel[n] for n, m in sizes.items()) / max(sum(numel.values()), 1)


def prepare(model: torch.nn.Module, cfg: TuneConfig) -> tuple[torch.nn.Module, dict[str, Any]]:
    """The module to train for ``cfg.method`` (a peft model for LoRA / QLoRA, else ``model`` itself, changed
    in place) and what it is: layers, base bits per weight."""
    if cfg.gradient_checkpointing:
        if not getattr(model, "supports_gradient_checkpointing", False):
            raise LowbitError(f"{type(model).__name__} does not support gradient checkpointing; drop "
                              "--gradient-checkpointing")
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    names = block_linears(model)
    if not names:
        raise LowbitError(f"{type(model).__name__} has no linear layers in its decoder blocks to fine-tune")
    if cfg.method == "peqa":
        from lowbit.qat.peqa import prepare_peqa

        bits = _mean_bits(model, [n for n in names if _is_int(model.get_submodule(n))])
        layers = prepare_peqa(model)
        return model, {"layers": len(layers), "base_bits_per_weight": bits}
    unpack(model, names)
    for p in model.parameters():
        p.requires_grad_(False)
    if cfg.method == "qat":
        from lowbit.qat.fake_linear import prepare_fake_quant

        layers = prepare_fake_quant(model, names, cfg.quant_spec(), learn_range=cfg.learned_ranges())
        return model, {"layers": len(layers), "base_bits_per_weight": None}
    from lowbit.qat.qlora import add_lora, quantize_base

    _check_targets(names, cfg.targets)
    if cfg.method == "qlora":
        already = [n for n in names if is_quantized(model.get_submodule(n))]
        if already:
            raise LowbitError(f"--method qlora quantizes a full-precision base to NF4, and {len(already)} layers of "
                              f"this model are already quantized (e.g. {already[0]}); use --method lora on it")
        bits = quantize_base(model, names)
    else:
        bits = _mean_bits(model, names)
    with warnings.catch_warnings(), torch.random.fork_rng(devices=[]):  # the adapters' init is seeded too
        warnings.filterwarnings("ignore", message="Unsupported layer type", category=UserWarning)
        torch.manual_seed(cfg.seed)
        peft_model = add_lora(model, list(cfg.targets), r=cfg.rank, alpha=cfg.lora_alpha)
    wrapped = sum(1 for n, _ in peft_model.named_modules() if n.endswith(".base_layer"))
    return peft_model, {"layers": wrapped, "base_bits_per_weight": bits}


def train(trained: torch.nn.Module, windows: torch.Tensor, cfg: TuneConfig, progress: Any = None) -> dict[str, Any]:
    """Train the module ``prepare`` gave on ``windows`` and finish it (QAT: typed quantized layers again);
    returns the run's numbers.  ``progress`` is ``train_next_token``'s per-step callback."""
    from lowbit.qat.train import train_next_token

    result = train_next_token(trained, windows, cfg.steps, cfg.lr, cfg.batch_size, cfg.seed,
                              checkpoint=cfg.checkpoint, every=cfg.every, resume=cfg.resume,
                              optimizer=cfg.optimizer, progress=progress)
    if cfg.method == "qat":
        from lowbit.qat.fake_linear import convert_fake_quant

        convert_fake_quant(trained, dtype=getattr(trained, "dtype", torch.float32))
    summary: dict[str, Any] = {
        "method": cfg.method, "steps": cfg.steps, "lr": cfg.lr, "batch_size": cfg.batch_size,
        "seqlen": windows.shape[1], "seed": cfg.seed, "optimizer": cfg.optimizer, "tokens": result.tokens,
        "run_tokens": result.tokens - result.resumed_at * cfg.batch_size * windows.shape[1],
        "trained_params": result.trained_params, "resumed_at_step": result.resumed_at,
        "loss_first": result.losses[0], "loss_last": result.losses[-1]}
    if cfg.method in LORA_METHODS:
        summary |= {"rank": cfg.rank, "alpha": cfg.lora_alpha, "targets": list(cfg.targets), "merge": cfg.merge}
    if cfg.method == "qat":
        summary |= {"spec": cfg.quant_spec().to_dict(), "learned_ranges": cfg.learned_ranges(),
                    "bits_per_weight": _mean_bits(trained, block_linears(trained))}
    return summary


def tune(model: torch.nn.Module, windows: torch.Tensor, cfg: TuneConfig, progress: Any = None
         ) -> tuple[torch.nn.Module, dict[str, Any]]:
    """``prepare`` then ``train``: the trained module (a peft model for LoRA / QLoRA, else ``model``) and
    the run's numbers."""
    check_config(cfg)
    trained, info = prepare(model, cfg)
    return trained, train(trained, windows, cfg, progress) | info
