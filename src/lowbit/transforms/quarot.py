"""QuaRot (Ashkboos et al., 2024): rotate the residual stream and the MLP/attention internals with
randomized Hadamard matrices so that activations lose their outlier channels, enabling W4A4.

``QuaRot.apply_model`` rewrites a llama-family model in place, computing the same function:

1. every RMSNorm's weight is folded into the linears it feeds (the norm becomes a plain RMS
   normalisation, which commutes with orthogonal maps); tied embeddings are untied;
2. the residual stream is rotated by ``Q`` (hidden x hidden): embedding ``E Q``; readers of the
   stream (q/k/v, gate/up, lm_head) ``W Q``; writers (o_proj, down_proj) ``Q^T W``;
3. each value head is rotated by a head-size Hadamard ``H``: v_proj rows and o_proj columns
   (folded, exact);
4. the down projection's input gets an online Hadamard (``lowbit.rotation.online``).

Then any weight method and activation spec of the recipe quantize the rotated model.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from lowbit.arch import types_with
from lowbit.errors import LowbitError
from lowbit.fields import bounded
from lowbit.rotation.hadamard import random_hadamard
from lowbit.rotation.online import attach_input_rotation
from lowbit.transforms.base import BlockTransform, register_transform

SUPPORTED = types_with("llama_layout")  # the module names and norms rewritten below (lowbit.arch)


def _rms_norm_weight(norm: torch.nn.Module, where: str) -> torch.Tensor:
    w = getattr(norm, "weight", None)
    if w is None or w.dim() != 1 or getattr(norm, "bias", None) is not None or "RMSNorm" not in type(norm).__name__:
        raise LowbitError(f"QuaRot folds RMSNorm weights; {where} is {type(norm).__name__}")
    return w


@torch.no_grad()
def _fold_norm(norm: torch.nn.Module, linears: list[torch.nn.Linear], where: str) -> None:
    g = _rms_norm_weight(norm, where)
    for lin in linears:
        lin.weight.copy_((lin.weight.double() * g.double().view(1, -1)).to(lin.weight.dtype))
    g.fill_(1.0)


@torch.no_grad()
def _read(lin: torch.nn.Linear, q: torch.Tensor) -> None:
    """A reader of the rotated stream: ``W <- W Q``."""
    lin.weight.copy_((lin.weight.double() @ q).to(lin.weight.dtype))


@torch.no_grad()
def _write(lin: torch.nn.Linear, q: torch.Tensor) -> None:
    """A writer into the rotated stream: ``W <- Q^T W``, ``b <- b Q``."""
    lin.weight.copy_((q.T @ lin.weight.double()).to(lin.weight.dtype))
    if lin.bias is not None:
        lin.bias.copy_((lin.bias.double() @ q).to(lin.bias.dtype))


@torch.no_grad()
def _rotate_value_heads(v: torch.nn.Linear, o: torch.nn.Linear, head_dim: int, seed: int) -> None:
    h = random_hadamard(head_dim, seed).to(v.weight.device)
    heads_v = v.out_features // head_dim
    wv = v.weight.double().view(heads_v, head_dim, -1)
    v.weight.copy_(torch.einsum("hdi,de->hei", wv, h).reshape(v.out_features, -1).to(v.weight.dtype))
    if v.bias is not None:
        v.bias.copy_((v.bias.double().view(heads_v, head_dim) @ h).reshape(-1).to(v.bias.dtype))
    heads_o = o.in_features // head_dim
    wo = o.weight.double().view(o.out_features, heads_o, head_dim)
    o.weight.copy_(torch.einsum("ohd,de->ohe", wo, h).reshape(o.out_features, -1).to(o.weight.dtype))


@register_transform
@dataclass
class QuaRot(BlockTransform):
    """Options: ``seed`` (random signs of the Hadamard matrices), ``online_down`` (the online
    Hadamard on down_proj inputs), ``rotate_values`` (per-head value/output rotation)."""

    name: ClassVar[str] = "quarot"
    seed: int = bounded(0, ge=0, le=2**32 - 3)  # seed + 2 seeds the down_proj rotation
    online_down: bool = True
    rotate_values: bool = True

    def check_model(self, model: torch.nn.Module) -> None:
        model_type = getattr(getattr(model, "config", None), "model_type", None)
        if model_type not in SUPPORTED:
            raise LowbitError(f"QuaRot's rotation mapping is known for {', '.join(SUPPORTED)}, not {model_type!r}")

    @torch.no_grad()
    def apply_model(self, model: torch.nn.Module) -> None:
        self.check_model(model)
        cfg = model.config
        inner = model.model
        hidden = cfg.hidden_size
        head_dim = getattr(cfg, "head_dim", None) or hidden // cfg.num_attention_heads
        if getattr(cfg, "tie_word_embeddings", False) or model.lm_head.weight is inner.embed_tokens.weight:
            model.lm_head.weight = torch.nn.Parameter(inner.embed_tokens.weight.detach().clone())
            cfg.tie_word_embeddings = False
        for i, layer in enumerate(inner.layers):
            at, mlp = layer.self_attn, layer.mlp
            _fold_norm(layer.input_layernorm, [at.q_proj, at.k_proj, at.v_proj], f"layer {i} input_layernorm")
            _fold_norm(layer.post_attention_layernorm, [mlp.gate_proj, mlp.up_proj], f"layer {i} post_attention_layernorm")
        _fold_norm(inner.norm, [model.lm_head], "the final norm")
        emb = inner.embed_tokens.weight
        q = random_hadamard(hidden, self.seed).to(emb.device)
        emb.copy_((emb.double() @ q).to(emb.dtype))
        for i, layer in enumerate(inner.layers):
            at, mlp = layer.self_attn, layer.mlp
            for lin in (at.q_proj, at.k_proj, at.v_proj, mlp.gate_proj, mlp.up_proj):
                _read(lin, q)
            _write(at.o_proj, q)
            _write(mlp.down_proj, q)
            if self.rotate_values:
                _rotate_value_heads(at.v_proj, at.o_proj, head_dim, self.seed + 1)
            if self.online_down:
                attach_input_rotation(mlp.down_proj, self.seed + 2)
        _read(model.lm_head, q)
        self.records.append({"hidden_rotation": hidden, "head_rotation": head_dim if self.rotate_values else None,
                             "online_down": mlp.down_proj.in_features if self.online_down else None})

    def apply_block(self, ctx: Any) -> None:
        """QuaRot rewrites the whole model once, before the blocks are visited."""
