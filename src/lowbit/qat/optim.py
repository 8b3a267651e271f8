"""AdamW with 8-bit or 4-bit states, and the optimizer names the training loop accepts.

:class:`QuantizedAdamW` keeps both Adam moments block-wise quantized (:mod:`lowbit.core.state_quant`);
each step dequantizes a parameter's moments, updates them and the parameter in fp32 exactly as
``torch.optim.AdamW`` does (decoupled weight decay, bias correction), and requantizes them.

====  ===============================================  ======================================  =====
bits  first moment ``m``                               second moment ``v``                     block
====  ===============================================  ======================================  =====
8     signed dynamic map (Dettmers et al.)             unsigned dynamic map (Dettmers et al.)  256
4     signed dynamic map, 3 exponent bits (Li et al.)  linear map without zero (Li et al.)     128
====  ===============================================  ======================================  =====

Where this differs from the papers: the 4-bit second moment is normalized per block of 128 (as
torchao does), not with Li et al.'s rank-1 (row and column max) normalization.  Rounding is to
nearest, never stochastic (Li et al.'s code also offers stochastic rounding), so a resumed run is
bit-identical to an uninterrupted one.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch

from lowbit.core.state_quant import dequantize_blockwise, dynamic_map, linear_map, quantize_blockwise
from lowbit.errors import LowbitError

__all__ = ["OPTIMIZERS", "QuantizedAdamW", "check_optimizer", "make_optimizer", "state_bytes"]

OPTIMIZERS = ("adamw", "adamw8bit", "adamw4bit")
MIN_QUANT_NUMEL = 4096  # smaller tensors (norms, biases) keep fp32 moments, as bitsandbytes and torchao do
_BLOCK = {8: 256, 4: 128}
_MOMENTS = ("exp_avg", "exp_avg_sq")


def _maps(bits: int) -> dict[str, torch.Tensor]:
    second = dynamic_map(8, signed=False) if bits == 8 else linear_map(4)
    return {"exp_avg": dynamic_map(bits, signed=True), "exp_avg_sq": second}


class QuantizedAdamW(torch.optim.Optimizer):
    """AdamW whose moments are stored in ``bits`` (8 or 4) per element plus an fp32 scale per block.

    State per parameter of at least ``min_quant_numel`` elements: ``step`` (fp32 scalar),
    ``exp_avg_codes`` / ``exp_avg_sq_codes`` (``uint8``) and ``exp_avg_scales`` / ``exp_avg_sq_scales``
    (fp32); smaller parameters keep fp32 ``exp_avg`` / ``exp_avg_sq``.  All are plain tensors, so
    ``state_dict()`` saves and loads with ``torch.load(weights_only=True)``.  Any parameter dtype:
    the update runs in fp32 and is cast back.
    """

    def __init__(self, params: Iterable[Any], lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-8, weight_decay: float = 1e-2, bits: int = 8,
                 min_quant_numel: int = MIN_QUANT_NUMEL) -> None:
        if bits not in _BLOCK:
            raise LowbitError(f"QuantizedAdamW stores 8-bit or 4-bit states, got bits={bits}; use 8 or 4")
        if lr < 0 or eps < 0 or weight_decay < 0 or not all(0 <= b < 1 for b in betas):
            raise LowbitError(f"invalid AdamW settings lr={lr}, betas={betas}, eps={eps}, "
                              f"weight_decay={weight_decay}: need lr, eps, weight_decay >= 0 and 0 <= betas < 1")
        defaults = {"lr": lr, "betas": tuple(betas), "eps": eps, "weight_decay": weight_decay, "bits": bits,
                    "min_quant_numel": min_quant_numel}
        super().__init__(params, defaults)

    def _quantized(self, p: torch.Tensor, group: dict[str, Any]) -> bool:
        return p.numel() >= group["min_quant_numel"]

    def moments(self, p: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(m, v)`` of parameter ``p`` in fp32, dequantized (copies; zeros before its first step)."""
        state = self.state.get(p)
        if not state:
            return torch.zeros_like(p, dtype=torch.float32), torch.zeros_like(p, dtype=torch.float32)
        group = self._group_of(p)
        if not self._quantized(p, group):
            return state["exp_avg"].clone(), state["exp_avg_sq"].clone()
        return self._dequantized(p, state, group)

    def _group_of(self, p: torch.Tensor) -> dict[str, Any]:
        for g in self.param_groups:
            if any(q is p for q in g["params"]):
                return g
        raise LowbitError("this tensor is not a parameter of the optimizer; pass one of its parameters")

    def _dequantized(self, p: torch.Tensor, state: dict[str, Any],
                     group: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
        maps, block = _maps(group["bits"]), _BLOCK[group["bits"]]
        return tuple(dequantize_blockwise(state[f"{k}_codes"], state[f"{k}_scales"], maps[k], block, p.shape)
                     for k in _MOMENTS)  # type: ignore[return-value]

    def _init_state(self, p: torch.Tensor, group: dict[str, Any]) -> dict[str, Any]:
        state: dict[str, Any] = {"step": torch.tensor(0.0)}
        zero = torch.zeros_like(p, dtype=torch.float32, memory_format=torch.preserve_format)
        if self._quantized(p, group):
            maps, block = _maps(group["bits"]), _BLOCK[group["bits"]]
            for k in _MOMENTS:
                state[f"{k}_codes"], state[f"{k}_scales"] = quantize_blockwise(zero, maps[k], block)
        else:
            state["exp_avg"], state["exp_avg_sq"] = zero, zero.clone()
        return state

    @torch.no_grad()
    def step(self, closure: Any = None) -> Any:
        """One AdamW step for every parameter with a gradient."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                if p.grad.is_sparse:
                    raise LowbitError("QuantizedAdamW does not take sparse gradients; use dense embeddings")
                if not self.state[p]:
                    self.state[p] = self._init_state(p, group)
                self._update(p, self.state[p], group)
        return loss

    def _update(self, p: torch.Tensor, state: dict[str, Any], group: dict[str, Any]) -> None:
        """The single-tensor ``torch.optim.AdamW`` update, on fp32 copies of quantized states."""
        quantized = self._quantized(p, group)
        m, v = self._dequantized(p, state, group) if quantized else (state["exp_avg"], state["exp_avg_sq"])
        lr, (beta1, beta2), eps, wd = group["lr"], group["betas"], group["eps"], group["weight_decay"]
        grad = p.grad.float()
        state["step"] += 1
        t = state["step"].item()
        w = p if p.dtype == torch.float32 else p.float()
        w.mul_(1 - lr * wd)
        m.lerp_(grad, 1 - beta1)
        v.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
        denom = (v.sqrt() / (1 - beta2 ** t) ** 0.5).add_(eps)
        w.addcdiv_(m, denom, value=-lr / (1 - beta1 ** t))
        if w is not p:
            p.copy_(w)
        if quantized:
            maps, block = _maps(group["bits"]), _BLOCK[group["bits"]]
            for k, x in zip(_MOMENTS, (m, v)):
                state[f"{k}_codes"], state[f"{k}_scales"] = quantize_blockwise(x, maps[k], block)

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load ``state_dict`` keeping every state tensor's dtype (the base class would cast codes and
        scales to the parameter's dtype) as a private copy on the parameter's device."""
        saved = state_dict["state"]
        ids = [i for g in state_dict["param_groups"] for i in g["params"]]
        super().load_state_dict(state_dict)
        for i, p in zip(ids, (p for g in self.param_groups for p in g["params"])):
            if i in saved:
                self.state[p] = {k: v.detach().clone().to(p.device) if torch.is_tensor(v) else v
                                 for k, v in saved[i].items()}
                self._check_state(p)

    def _check_state(self, p: torch.Tensor) -> None:
        group = self._group_of(p)
        if self._quantized(p, group):
            block, bits = _BLOCK[group["bits"]], group["bits"]
            blocks = -(-p.numel() // block)
            want = {f"{k}_{part}": shape for k in _MOMENTS
                    for part, shape in (("codes", (blocks * block * bits // 8,)), ("scales", (blocks,)))}
        else:
            want = {k: tuple(p.shape) for k in _MOMENTS}
        got = self.state[p]
        bad = [k for k, shape in want.items() if k not in got or tuple(got[k].shape) != shape]
        if bad or "step" not in got:
            raise LowbitError(f"optimizer state for a parameter of shape {tuple(p.shape)} does not fit "
                              f"{group['bits']}-bit AdamW ({', '.join(bad) or 'step'}); resume with the optimizer "
                              "it was saved from, or start over")


def check_optimizer(name: str, where: str = "optimizer") -> None:
    """LowbitError unless ``name`` is one of :data:`OPTIMIZERS`."""
    if name not in OPTIMIZERS:
        raise LowbitError(f"unknown {where} {name!r}; choose one of {', '.join(OPTIMIZERS)}")


def make_optimizer(name: str, params: Iterable[Any], lr: float, weight_decay: float = 0.0) -> torch.optim.Optimizer:
    """The optimizer called ``name`` (one of :data:`OPTIMIZERS`) over ``params`` (tensors or param groups)."""
    if name == "adamw":
        return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    if name in ("adamw8bit", "adamw4bit"):
        return QuantizedAdamW(params, lr=lr, weight_decay=weight_decay, bits=8 if name == "adamw8bit" else 4)
    raise LowbitError(f"unknown optimizer {name!r}; choose one of {', '.join(OPTIMIZERS)}")


def state_bytes(opt: torch.optim.Optimizer) -> int:
    """Bytes held by the tensors in ``opt``'s per-parameter state (moments, codes, scales, step counters)."""
    return sum(v.numel() * v.element_size() for s in opt.state.values() for v in s.values() if torch.is_tensor(v))
