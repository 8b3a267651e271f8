"""Cut a Llama-layout model down in place: keep some rows / columns of its linears, norms and embeddings,
drop whole blocks, and write the new sizes into its config so ``save_pretrained`` gives a checkpoint that
plain transformers builds and loads.  Every cut keeps the model's function on the kept units exactly (a
dropped unit simply stops contributing)."""

from __future__ import annotations

import torch

from lowbit.arch import architecture_of, decoder_blocks
from lowbit.errors import LowbitError


def check_llama_layout(model: torch.nn.Module) -> None:
    """Structured surgery knows Llama's module names; refuse anything else before work."""
    if not architecture_of(model).llama_layout:
        model_type = getattr(getattr(model, "config", None), "model_type", type(model).__name__)
        raise LowbitError(f"structured pruning supports Llama-layout models (llama, mistral, qwen2, qwen3), not "
                          f"{model_type}; use unstructured pruning (lowbit prune --method ...) instead")


@torch.no_grad()
def sliced_linear(linear: torch.nn.Linear, rows: torch.Tensor | None = None,
                  cols: torch.Tensor | None = None) -> torch.nn.Linear:
    """A new Linear holding ``linear``'s weight (and bias) at the kept output ``rows`` and input ``cols`` (and
    their ``requires_grad``)."""
    w = linear.weight
    if rows is not None:
        w = w.index_select(0, rows.to(w.device))
    if cols is not None:
        w = w.index_select(1, cols.to(w.device))
    out = torch.nn.Linear(w.shape[1], w.shape[0], bias=linear.bias is not None, device=w.device, dtype=w.dtype)
    out.weight.copy_(w)
    if linear.bias is not None:
        b = linear.bias if rows is None else linear.bias.index_select(0, rows.to(w.device))
        out.bias.copy_(b)
        out.bias.requires_grad_(linear.bias.requires_grad)
    out.weight.requires_grad_(linear.weight.requires_grad)
    return out


def _head_rows(heads: torch.Tensor, head_dim: int) -> torch.Tensor:
    """The weight rows of the given heads (each ``head_dim`` consecutive rows)."""
    return (heads.unsqueeze(1) * head_dim + torch.arange(head_dim)).reshape(-1)


def head_dim_of(model: torch.nn.Module) -> int:
    cfg = model.config
    return getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads


@torch.no_grad()
def keep_mlp_channels(model: torch.nn.Module, keep: list[torch.Tensor]) -> None:
    """Keep MLP intermediate channels ``keep[i]`` in block ``i`` (the same count in every block)."""
    sizes = {int(k.numel()) for k in keep}
    if len(sizes) != 1:
        raise ValueError("every block must keep the same number of MLP channels (one intermediate_size)")
    for block, k in zip(decoder_blocks(model), keep):
        mlp = block.mlp
        mlp.gate_proj = sliced_linear(mlp.gate_proj, rows=k)
        mlp.up_proj = sliced_linear(mlp.up_proj, rows=k)
        mlp.down_proj = sliced_linear(mlp.down_proj, cols=k)
    model.config.intermediate_size = sizes.pop()


@torch.no_grad()
def keep_query_heads(model: torch.nn.Module, keep: list[torch.Tensor]) -> None:
    """Keep query heads ``keep[i]`` in block ``i`` (the same count per key/value group in every block)."""
    cfg = model.config
    head_dim = head_dim_of(model)
    sizes = {int(k.numel()) for k in keep}
    if len(sizes) != 1 or sizes.copy().pop() % cfg.num_key_value_heads:
        raise ValueError("every block must keep the same number of query heads, a multiple of the key/value heads")
    for block, k in zip(decoder_blocks(model), keep):
        attn = block.self_attn
        rows = _head_rows(k, head_dim)
        attn.q_proj = sliced_linear(attn.q_proj, rows=rows)
        attn.o_proj = sliced_linear(attn.o_proj, cols=rows)
        n = int(k.numel())
        attn.num_key_value_groups = n // cfg.num_key_value_heads
        if hasattr(attn, "num_heads"):
            attn.num_heads = n
    cfg.head_dim = head_dim  # explicit: hidden_size / num_attention_heads no longer gives it
    cfg.num_attention_heads = sizes.pop()


@torch.no_grad()
def keep_hidden_channels(model: torch.nn.Module, keep: torch.Tensor) -> None:
    """Keep hidden (residual stream) channels ``keep`` everywhere: embeddings, norms, every linear that reads
    or writes the stream, and the head."""
    cfg = model.config
    cfg.head_dim = head_dim_of(model)
    base = model.model
    emb = base.embed_tokens
    tied = model.get_output_embeddings() is not None and model.get_output_embeddings().weight is emb.weight
    new_emb = torch.nn.Embedding(emb.num_embeddings, int(keep.numel()), padding_idx=emb.padding_idx,
                                 device=emb.weight.device, dtype=emb.weight.dtype)
    new_emb.weight.copy_(emb.weight.index_select(1, keep.to(emb.weight.device)))
    new_emb.weight.requires_grad_(emb.weight.requires_grad)
    base.embed_tokens = new_emb
    for block in decoder_blocks(model):
        attn, mlp = block.self_attn, block.mlp
        for name in ("q_proj", "k_proj", "v_proj"):
            setattr(attn, name, sliced_linear(getattr(attn, name), cols=keep))
        attn.o_proj = sliced_linear(attn.o_proj, rows=keep)
        mlp.gate_proj = sliced_linear(mlp.gate_proj, cols=keep)
        mlp.up_proj = sliced_linear(mlp.up_proj, cols=keep)
        mlp.down_proj = sliced_linear(mlp.down_proj, rows=keep)
        for norm in (block.input_layernorm, block.post_attention_layernorm):
            _slice_norm(norm, keep)
    _slice_norm(base.norm, keep)
    if tied:
        model.tie_weights()
    else:
        head = model.get_output_embeddings()
        model.set_output_embeddings(sliced_linear(head, cols=keep))
    cfg.hidden_size = int(keep.numel())


def _slice_norm(norm: torch.nn.Module, keep: torch.Tensor) -> None:
    norm.weight = torch.nn.Parameter(norm.weight.detach().index_select(0, keep.to(norm.weight.device)).clone(),
                                     requires_grad=norm.weight.requires_grad)


@torch.no_grad()
def drop_layers(model: torch.nn.Module, drop: list[int]) -> None:
    """Remove decoder blocks ``drop``; the rest are renumbered (their KV-cache index too)."""
    cfg = model.config
    blocks = decoder_blocks(model)
    kept = [b for i, b in enumerate(blocks) if i not in set(drop)]
    if not kept:
        raise ValueError("cannot drop every layer")
    for new_idx, block in enumerate(kept):
        if hasattr(block.self_attn, "layer_idx"):
            block.self_attn.layer_idx = new_idx
    model.model.layers = torch.nn.ModuleList(kept)
    layer_types = getattr(cfg, "layer_types", None)
    if layer_types:
        cfg.layer_types = [t for i, t in enumerate(layer_types) if i not in set(drop)]
    cfg.num_hidden_layers = len(kept)
