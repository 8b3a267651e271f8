"""One calibration pass through the dense model, accumulating what structured importance needs: per block the
sum of squares of each MLP intermediate channel (the input of ``down_proj``) and of each attention output
channel (the input of ``o_proj``), over all blocks the sum of squares of each hidden channel after the two
norms (Minitron's embedding-channel importance), and per block the summed cosine of each token's hidden state
before and after the block (ShortGPT's block influence)."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from lowbit.arch import decoder_blocks
from lowbit.structured.importance import Scores, block_influence, channel_scores, head_scores


@dataclass
class Activations:
    """Accumulated calibration statistics (module docstring); sums over ``tokens`` tokens."""

    mlp_sq: list[torch.Tensor] = field(default_factory=list)  # per block: (intermediate,)
    attn_sq: list[torch.Tensor] = field(default_factory=list)  # per block: (heads * head_dim,)
    hidden_sq: torch.Tensor | None = None  # (hidden,)
    cos_sum: torch.Tensor | None = None  # (layers,)
    tokens: int = 0


def _first_tensor(x: object) -> torch.Tensor:
    return x[0] if isinstance(x, (tuple, list)) else x  # type: ignore[return-value]


@torch.no_grad()
def measure(model: torch.nn.Module, calib: torch.Tensor, batch_size: int = 8) -> Activations:
    """Run ``calib`` (n, seqlen) through ``model`` and accumulate its ``Activations``."""
    blocks = decoder_blocks(model)
    n = len(blocks)
    acts = Activations(mlp_sq=[0] * n, attn_sq=[0] * n, cos_sum=torch.zeros(n, dtype=torch.float64))  # type: ignore[list-item]
    hidden: list[torch.Tensor | int] = [0]

    def add_sq(store: list, i: int):
        def fn(module: torch.nn.Module, args: tuple, output: torch.Tensor) -> None:
            x = args[0].detach().float()
            store[i] = store[i] + x.reshape(-1, x.shape[-1]).pow(2).sum(0).double()
        return fn

    def norm_out(module: torch.nn.Module, args: tuple, output: torch.Tensor) -> None:
        y = _first_tensor(output).detach().float()
        hidden[0] = hidden[0] + y.reshape(-1, y.shape[-1]).pow(2).sum(0).double()

    def influence(i: int):
        def fn(module: torch.nn.Module, args: tuple, kwargs: dict, output: object) -> None:
            x_in = (args[0] if args else kwargs["hidden_states"]).detach().float()
            x_out = _first_tensor(output).detach().float()
            cos = torch.nn.functional.cosine_similarity(x_in.reshape(-1, x_in.shape[-1]),
                                                        x_out.reshape(-1, x_out.shape[-1]), dim=-1)
            acts.cos_sum[i] += cos.double().sum()  # type: ignore[index]
        return fn

    handles = []
    for i, block in enumerate(blocks):
        handles.append(block.mlp.down_proj.register_forward_hook(add_sq(acts.mlp_sq, i)))
        handles.append(block.self_attn.o_proj.register_forward_hook(add_sq(acts.attn_sq, i)))
        handles.append(block.input_layernorm.register_forward_hook(norm_out))
        handles.append(block.post_attention_layernorm.register_forward_hook(norm_out))
        handles.append(block.register_forward_hook(influence(i), with_kwargs=True))
    try:
        device = next(model.parameters()).device
        for s in range(0, calib.shape[0], batch_size):
            batch = calib[s : s + batch_size].to(device)
            model(batch, use_cache=False)
            acts.tokens += batch.numel()
    finally:
        for h in handles:
            h.remove()
    acts.hidden_sq = hidden[0] if isinstance(hidden[0], torch.Tensor) else None
    return acts


def activation_scores(acts: Activations, n_heads: int) -> Scores:
    """Minitron's activation importance and ShortGPT's block influence from one pass's ``Activations``."""
    assert acts.cos_sum is not None
    return Scores(mlp=[channel_scores(t) for t in acts.mlp_sq],
                  heads=[head_scores(t, n_heads) for t in acts.attn_sq],
                  hidden=None if acts.hidden_sq is None else channel_scores(acts.hidden_sq),
                  layers=block_influence(acts.cos_sum, acts.tokens), tokens=acts.tokens)
