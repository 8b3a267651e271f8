"""First-order Taylor importance (Molchanov et al., 2019; LLM-Pruner's element-wise criterion): the loss change of
removing a unit is estimated by ``sum |w * dL/dw|`` over its weights, accumulated over the calibration batches
with the next-token loss.  The per-unit sums use the same units as the activation scores: MLP channels (gate and
up rows, down columns), query heads (q rows, o columns), hidden channels (embedding columns, the input columns
of q/k/v/gate/up, the output rows of o/down, the norms), whole blocks (every weight of the block)."""

from __future__ import annotations

import torch

from lowbit.arch import decoder_blocks
from lowbit.structured.importance import Scores
from lowbit.structured.surgery import head_dim_of


def taylor_scores(model: torch.nn.Module, calib: torch.Tensor, batch_size: int = 8) -> Scores:
    """Every unit's ``sum |w * grad|`` over ``calib`` (module docstring); gradients are left cleared."""
    params = {id(p): p for p in model.parameters()}.values()
    flags = [p.requires_grad for p in params]
    saliency: dict[int, torch.Tensor] = {}
    device = next(model.parameters()).device
    try:
        for p in params:
            p.requires_grad_(True)
        tokens = 0
        for s in range(0, calib.shape[0], batch_size):
            batch = calib[s : s + batch_size].to(device)
            model.zero_grad(set_to_none=True)
            with torch.enable_grad():
                model(input_ids=batch, labels=batch, use_cache=False).loss.backward()
            for p in params:
                if p.grad is not None:
                    term = (p.detach() * p.grad).abs().double()
                    saliency[id(p)] = saliency[id(p)] + term if id(p) in saliency else term
            tokens += batch.numel()
    finally:
        model.zero_grad(set_to_none=True)
        for p, flag in zip(params, flags):
            p.requires_grad_(flag)
    return _unit_sums(model, saliency, tokens)


def _unit_sums(model: torch.nn.Module, sal: dict[int, torch.Tensor], tokens: int) -> Scores:
    def of(p: torch.Tensor) -> torch.Tensor:
        return sal.get(id(p), torch.zeros_like(p, dtype=torch.float64))

    n_heads, hd = model.config.num_attention_heads, head_dim_of(model)
    mlp, heads, layers = [], [], []
    hidden = of(model.model.embed_tokens.weight).sum(0) + of(model.model.norm.weight)
    for block in decoder_blocks(model):
        attn, ffn = block.self_attn, block.mlp
        mlp.append(of(ffn.gate_proj.weight).sum(1) + of(ffn.up_proj.weight).sum(1) + of(ffn.down_proj.weight).sum(0))
        heads.append(of(attn.q_proj.weight).sum(1).reshape(n_heads, hd).sum(1)
                     + of(attn.o_proj.weight).sum(0).reshape(n_heads, hd).sum(1))
        for lin in (attn.q_proj, attn.k_proj, attn.v_proj, ffn.gate_proj, ffn.up_proj):
            hidden = hidden + of(lin.weight).sum(0)
        for lin in (attn.o_proj, ffn.down_proj):
            hidden = hidden + of(lin.weight).sum(1)
        hidden = hidden + of(block.input_layernorm.weight) + of(block.post_attention_layernorm.weight)
        layers.append(sum(of(p).sum() for p in block.parameters()))
    return Scores(mlp=mlp, heads=heads, hidden=hidden, layers=torch.stack(layers), tokens=tokens)
