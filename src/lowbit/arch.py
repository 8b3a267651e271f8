"""Architecture knowledge as data: where the decoder blocks are, which op feeds which linears,
and what else lowbit knows per model type.  The one place that knowledge lives: transforms,
methods, the KV cache, the GGUF exporter and evaluation read it from here.

Methods that move scales between neighbouring ops (AWQ, SmoothQuant, ...) read ``ScaleGroup``
entries: ``prev`` is the op whose output feeds ``linears`` (a norm or a linear, named relative
to the block).  Architectures not in the table fall back to a generic finder that locates the
decoder blocks (the longest ``ModuleList`` of modules holding linears); methods that need
scale groups then raise a clear error.

This module sits at the bottom of the package (beside ``lowbit.spec``, which describes formats):
it imports nothing of lowbit but ``lowbit.errors``.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any

import torch

from lowbit.errors import LowbitError


@dataclass(frozen=True)
class ScaleGroup:
    """``prev`` (norm or linear) produces the input of every module in ``linears``.

    ``inspect`` (optional) names the sub-module whose output measures the group's error when
    the linears' weights change (AWQ's ``module2inspect``): e.g. ``self_attn`` for q/k/v,
    ``mlp`` for gate/up, the consuming linear itself for v->o and up->down; ``""`` is the whole
    block.  ``None``: each linear is measured on its own output.

    ``partners`` are ops whose outputs are combined elementwise with ``prev``'s (the gate beside
    ``up_proj``): scaling ``prev`` alone is fine, but reordering its channels must reorder theirs too.
    """

    prev: str
    linears: tuple[str, ...]
    inspect: str | None = None
    partners: tuple[str, ...] = ()


@dataclass(frozen=True)
class Architecture:
    """Per-model-type layout: dotted path of the block list, the block's scale groups, and facts
    other parts of lowbit need.

    ``llama_layout``: Llama's module names and attention (``model.model.layers[i]`` with
    ``self_attn.{q,k,v,o}_proj``, ``mlp.{gate,up,down}_proj``, plain RMSNorms, ``model.rotary_emb``
    with rotate-half RoPE, one full-attention cache layer per block): what QuaRot's rotations and the
    quantized KV cache are written for.  ``plain_head``: the logits are ``lm_head`` of the base
    model's last hidden state (unless the config scales or soft-caps them), so evaluation may
    compute them a slice at a time.  ``gguf``: llama.cpp's architecture name for GGUF export
    (``None``: not exportable to GGUF).
    """

    blocks: str
    groups: tuple[ScaleGroup, ...] = field(default=())
    llama_layout: bool = False
    plain_head: bool = False
    gguf: str | None = None
    routers: tuple[str, ...] = ()  # linears (block-relative) that route tokens: left in full precision unless named


_LLAMA_GROUPS = (
    ScaleGroup("input_layernorm", ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"), "self_attn"),
    ScaleGroup("self_attn.v_proj", ("self_attn.o_proj",), "self_attn.o_proj"),
    ScaleGroup("post_attention_layernorm", ("mlp.gate_proj", "mlp.up_proj"), "mlp"),
    ScaleGroup("mlp.up_proj", ("mlp.down_proj",), "mlp.down_proj", ("mlp.gate_proj",)),
)
_LLAMA = Architecture(blocks="model.layers", groups=_LLAMA_GROUPS, llama_layout=True, plain_head=True)

# Gemma 2 / 3: the MLP reads pre_feedforward_layernorm (post_attention_layernorm normalises the attention output)
_GEMMA2_GROUPS = (
    *_LLAMA_GROUPS[:2],
    ScaleGroup("pre_feedforward_layernorm", ("mlp.gate_proj", "mlp.up_proj"), "mlp"),
    _LLAMA_GROUPS[3],
)
# mixture of experts: transformers keeps the experts as fused 3-D parameters, not linears; the attention's
# groups still fold
_MOE = Architecture(blocks="model.layers", groups=_LLAMA_GROUPS[:2], plain_head=True,
                    routers=("mlp.gate", "mlp.shared_expert_gate"))

ARCHITECTURES: dict[str, Architecture] = {
    "llama": replace(_LLAMA, gguf="llama"),
    "mistral": replace(_LLAMA, gguf="llama"),
    "qwen2": replace(_LLAMA, gguf="qwen2"),
    "qwen3": replace(_LLAMA, gguf="qwen3"),
    "gemma": Architecture(blocks="model.layers", groups=_LLAMA_GROUPS, plain_head=True,  # RMSNorm scales by 1 + w: not llama_layout
                          gguf="gemma"),
    "gemma2": Architecture(blocks="model.layers", groups=_GEMMA2_GROUPS, plain_head=True, gguf="gemma2"),
    "gemma3_text": Architecture(blocks="model.layers", groups=_GEMMA2_GROUPS, plain_head=True),
    "mixtral": _MOE,
    "qwen2_moe": _MOE,
    "qwen3_moe": _MOE,
    "phi3": Architecture(
        blocks="model.layers",
        groups=(
            ScaleGroup("input_layernorm", ("self_attn.qkv_proj",), "self_attn"),
            ScaleGroup("post_attention_layernorm", ("mlp.gate_up_proj",), "mlp"),
        ),
        plain_head=True,
        gguf="phi3",
    ),
    "phi": Architecture(
        blocks="model.layers",
        groups=(ScaleGroup("input_layernorm", ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "mlp.fc1"), ""),
                ScaleGroup("mlp.fc1", ("mlp.fc2",), "mlp.fc2")),
        plain_head=True,
    ),
    "opt": Architecture(
        blocks="model.decoder.layers",
        groups=(
            ScaleGroup("self_attn_layer_norm", ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"), "self_attn"),
            ScaleGroup("self_attn.v_proj", ("self_attn.out_proj",), "self_attn.out_proj"),
            ScaleGroup("final_layer_norm", ("fc1",), "fc1"),
            ScaleGroup("fc1", ("fc2",), "fc2"),
        ),
        plain_head=True,
    ),
    "gpt2": Architecture(
        blocks="transformer.h",
        groups=(ScaleGroup("ln_1", ("attn.c_attn",), "attn"), ScaleGroup("ln_2", ("mlp.c_fc",), "mlp")),
        plain_head=True,
    ),
}


def head_is_tied(model: torch.nn.Module) -> bool:
    """Whether the output head reads the input embedding's tensor (a packed head, holding codes, never does)."""
    embed, head = model.get_input_embeddings(), model.get_output_embeddings()
    weight = getattr(head, "weight", None)
    return embed is not None and weight is not None and weight.data_ptr() == embed.weight.data_ptr()


def types_with(fact: str) -> tuple[str, ...]:
    """The model types whose table entry has ``fact`` (an ``Architecture`` field) set, in table order."""
    return tuple(t for t, a in ARCHITECTURES.items() if getattr(a, fact))


def get_submodule(root: torch.nn.Module, path: str) -> Any:
    try:
        return root.get_submodule(path)
    except AttributeError:
        raise LowbitError(f"module {path!r} not found in {type(root).__name__}") from None


def _generic_blocks(model: torch.nn.Module) -> str:
    best, best_len = None, 0
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.ModuleList) and len(module) > best_len:
            if any(isinstance(m, torch.nn.Linear) for m in module[0].modules()):
                best, best_len = name, len(module)
    if best is None:
        raise LowbitError(
            f"cannot find the decoder blocks of {type(model).__name__}; add its layout to "
            "lowbit.arch.ARCHITECTURES"
        )
    return best


def architecture_of(model: torch.nn.Module) -> Architecture:
    """The table entry for ``model.config.model_type``, or a generic one (blocks only)."""
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if model_type in ARCHITECTURES:
        return ARCHITECTURES[model_type]
    return Architecture(blocks=_generic_blocks(model))


def decoder_blocks(model: torch.nn.Module) -> torch.nn.ModuleList:
    """The model's list of decoder blocks."""
    blocks = get_submodule(model, architecture_of(model).blocks)
    if not isinstance(blocks, torch.nn.ModuleList):
        raise LowbitError(f"{architecture_of(model).blocks} of {type(model).__name__} is not a list of blocks")
    return blocks


def scale_groups(model: torch.nn.Module) -> tuple[ScaleGroup, ...]:
    """Scale groups of the model's blocks; a clear error where the architecture has none."""
    arch = architecture_of(model)
    if not arch.groups:
        model_type = getattr(model.config, "model_type", type(model).__name__)
        raise LowbitError(
            f"no norm -> linear mapping is known for model type {model_type!r}; methods that move "
            "scales between ops (AWQ, SmoothQuant) need one in lowbit.arch.ARCHITECTURES"
        )
    return arch.groups
