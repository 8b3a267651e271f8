"""Mixture-of-experts weights as one linear layer per expert, and back.

transformers 5 keeps a MoE block's experts as two 3-D parameters (``gate_up_proj`` [E, 2I, H] and ``down_proj``
[E, H, I]) run by one module.  Every lowbit step rounds linear layers and calibrates them on the inputs they
see, so before quantization the fused module is replaced by ``ExpertLinears``: one ``gate_proj`` / ``up_proj`` /
``down_proj`` linear per expert (the per-expert names Qwen-MoE checkpoints and vLLM use), run exactly as the fused
module runs them.  Each expert's linears then see only the tokens the router sent it (per-expert calibration), and
an expert no calibration token reached is visible as such (the pipeline's RTN fallback).

``fuse_state`` turns the per-expert tensors of a state dict back into the fused parameters, so a dense checkpoint
loads in plain transformers; ``unfuse_like`` rebuilds the per-expert layout of a freshly built model whose
checkpoint (compressed-tensors, codes) names per-expert layers.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

import torch
from torch import nn

PROJECTIONS = ("gate_proj", "up_proj", "down_proj")


def _unfusable(module: nn.Module) -> bool:
    """A transformers experts module in the layout ``ExpertLinears`` reproduces: concatenated gate/up, the default
    gate (``act(gate) * up``), no biases."""
    from transformers.integrations.moe import _default_apply_gate

    params = dict(module.named_parameters(recurse=False))
    return (set(params) == {"gate_up_proj", "down_proj"} and params["gate_up_proj"].dim() == 3
            and params["down_proj"].dim() == 3 and getattr(module, "has_gate", True)
            and not getattr(module, "has_bias", False) and getattr(module, "is_concatenated", True)
            and getattr(type(module), "_apply_gate", _default_apply_gate) is _default_apply_gate
            and hasattr(module, "act_fn") and set(dict(module.named_children())) <= {"act_fn"})


class ExpertMLP(nn.Module):
    """One expert's gated MLP as three linears."""

    def __init__(self, hidden: int, intermediate: int, dtype: torch.dtype, device: torch.device | str) -> None:
        super().__init__()
        kw = dict(bias=False, dtype=dtype, device=device)
        self.gate_proj = nn.Linear(hidden, intermediate, **kw)
        self.up_proj = nn.Linear(hidden, intermediate, **kw)
        self.down_proj = nn.Linear(intermediate, hidden, **kw)


class ExpertLinears(nn.ModuleList):
    """A fused experts module's work done by one ``ExpertMLP`` per expert (same inputs, same routing); expert
    ``e``'s layers are named ``e.gate_proj`` ... under the fused module's name."""

    def __init__(self, fused: nn.Module) -> None:
        gate_up, down = fused.gate_up_proj, fused.down_proj
        transposed = bool(getattr(fused, "is_transposed", False))
        if transposed:  # stored [E, H, 2I] / [E, I, H]
            gate_up, down = gate_up.transpose(1, 2), down.transpose(1, 2)
        n, two_i, hidden = gate_up.shape
        super().__init__(ExpertMLP(hidden, two_i // 2, gate_up.dtype, "meta") for _ in range(n))
        self.num_experts = n
        self.transposed = transposed
        self._shell = [fused]  # the fused module (its activation, and refilled by ``fuse_experts``), unregistered
        if gate_up.device.type != "meta":
            self.load_fused(fused.gate_up_proj.detach(), fused.down_proj.detach())
        for p in ("gate_up_proj", "down_proj"):  # its 3-D copies are not kept
            setattr(fused, p, nn.Parameter(getattr(fused, p).detach().to("meta"), requires_grad=False))

    def load_fused(self, gate_up: torch.Tensor, down: torch.Tensor) -> None:
        """Give every expert its own copy of its weights from the fused tensors (in the fused module's layout):
        views would share one storage, which checkpoint writers take for tied weights."""
        if self.transposed:
            gate_up, down = gate_up.transpose(1, 2), down.transpose(1, 2)
        inter = gate_up.shape[1] // 2
        for e, mlp in enumerate(self):
            for linear, w in ((mlp.gate_proj, gate_up[e, :inter]), (mlp.up_proj, gate_up[e, inter:]),
                              (mlp.down_proj, down[e])):
                linear._parameters["weight"] = nn.Parameter(w.clone(memory_format=torch.contiguous_format),
                                                             requires_grad=False)

    def forward(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor
                ) -> torch.Tensor:
        out = torch.zeros_like(hidden_states)
        hit = torch.bincount(top_k_index.reshape(-1), minlength=self.num_experts)
        for e in torch.nonzero(hit[: self.num_experts]).flatten().tolist():
            token, slot = torch.where(top_k_index == e)
            mlp = self[e]
            x = hidden_states[token]
            y = mlp.down_proj(self._shell[0].act_fn(mlp.gate_proj(x)) * mlp.up_proj(x))
            out.index_add_(0, token, (y * top_k_weights[token, slot, None]).to(out.dtype))
        return out

    def fused_shapes(self) -> dict[str, tuple[int, ...]]:
        """The fused module's parameter names and shapes."""
        return {p: tuple(getattr(self._shell[0], p).shape) for p in ("gate_up_proj", "down_proj")}

    def fused_weights(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(gate_up_proj, down_proj)`` in the fused module's layout, from the experts' current weights."""
        return self.stack([(m.gate_proj.weight, m.up_proj.weight, m.down_proj.weight) for m in self])

    def stack(self, weights: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-expert ``(gate, up, down)`` weights stacked into the fused module's ``(gate_up_proj, down_proj)``."""
        gate_up = torch.stack([torch.cat([g, u]) for g, u, _ in weights])
        down = torch.stack([d for _, _, d in weights])
        if self.transposed:
            gate_up, down = gate_up.transpose(1, 2), down.transpose(1, 2)
        return gate_up.detach().contiguous(), down.detach().contiguous()


def unfuse_experts(model: nn.Module) -> list[str]:
    """Replace every fused experts module of ``model`` that ``ExpertLinears`` reproduces; returns their names."""
    names = [n for n, m in model.named_modules() if n and _unfusable(m)]
    for name in names:
        model.set_submodule(name, ExpertLinears(model.get_submodule(name)))
    return names


def fuse_experts(model: nn.Module) -> list[str]:
    """Inverse of ``unfuse_experts`` for full-precision experts (a validation that failed after unfusing)."""
    names = [n for n, m in model.named_modules() if isinstance(m, ExpertLinears)]
    for name in names:
        unfused: ExpertLinears = model.get_submodule(name)
        gate_up, down = unfused.fused_weights()
        fused = unfused._shell[0]
        fused.gate_up_proj = nn.Parameter(gate_up, requires_grad=False)
        fused.down_proj = nn.Parameter(down, requires_grad=False)
        model.set_submodule(name, fused)
    return names


def fuse_state(model: nn.Module, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``state`` (``model``'s state dict, values possibly dequantized) with each ``ExpertLinears``' per-expert
    weights stacked back into the fused ``gate_up_proj`` / ``down_proj`` that plain transformers loads (where
    every expert has a dense ``weight``)."""
    out = dict(state)
    for name, m in model.named_modules():
        if not isinstance(m, ExpertLinears):
            continue
        prefix = f"{name}."
        keys = [[f"{prefix}{e}.{p}.weight" for p in PROJECTIONS] for e in range(m.num_experts)]
        if not all(k in out for ks in keys for k in ks):
            continue  # experts held another way (low-rank factors): written one linear each
        g, d = m.stack([(out.pop(gate), out.pop(up), out.pop(dn)) for gate, up, dn in keys])
        out[prefix + "gate_up_proj"] = g
        out[prefix + "down_proj"] = d
    return out


_PER_EXPERT = re.compile(r"^(.*)\.experts\.\d+\.(?:gate_proj|up_proj|down_proj)(?:\.|$)")
_ANY_EXPERT = re.compile(r"\.experts\.\d+\.")  # a per-expert tensor under any layout's names (Mixtral's w1 ...)


def unfuse_like(model: nn.Module, names: Iterable[str]) -> list[str]:
    """Unfuse ``model``'s experts when ``names`` (a checkpoint's layer or tensor names) hold per-expert tensors
    and ``model`` has fused experts; returns the modules unfused."""
    if not any(_ANY_EXPERT.search(n) for n in names):
        return []
    return unfuse_experts(model)


def expert_calibration(layers: Iterable[dict]) -> dict[str, object]:
    """Per-expert calibration counts from a run's layer reports (``LayerReport`` dicts): ``tokens`` (expert ->
    rows its first projection saw) and ``unrouted`` (experts no calibration token reached)."""
    tokens: dict[str, int] = {}
    for layer in layers:
        name, seen = layer["name"], layer.get("tokens")
        if _PER_EXPERT.match(name) and seen is not None:
            expert = name.rsplit(".", 1)[0]
            tokens[expert] = max(tokens.get(expert, 0), int(seen))
    return {"tokens": tokens, "unrouted": [e for e, n in tokens.items() if n == 0]}
