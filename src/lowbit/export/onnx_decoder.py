"""A Llama-family decoder (llama, mistral, qwen2, qwen3) written as an ONNX graph with a KV cache.

Inputs ``input_ids``, ``attention_mask`` (past + new positions), ``position_ids`` and
``past_key_values.{i}.key`` / ``.value`` ``(batch, kv_heads, past, head_dim)``; outputs ``logits`` and
``present.{i}.key`` / ``.value`` (the names ONNX Runtime's and Optimum's decoders use).  A prefill
passes an empty past (``past = 0``).  Grouped-query attention broadcasts each KV head over its query
heads with 5-D matmuls (no copies); sliding-window layers mask keys older than the window.

Linear layers are written by ``onnx_linear.write_linear`` (float, ``MatMulNBits`` or QDQ), and
activation quantizers become QuantizeLinear / DequantizeLinear pairs in front of their layers.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from lowbit.arch import architecture_of, head_is_tied
from lowbit.errors import LowbitError
from lowbit.export.onnx_builder import GraphBuilder
from lowbit.export.onnx_linear import LinearRecord, write_embedding, write_linear

SUPPORTED = ("llama", "mistral", "qwen2", "qwen3")
STATIC_ROPE = ("default", "linear", "llama3", "yarn")  # inv_freq fixed at load time


@dataclass
class DecoderGraph:
    builder: GraphBuilder
    records: list[LinearRecord] = field(default_factory=list)


def check_exportable(model: torch.nn.Module) -> None:
    """Raise a LowbitError naming what the ONNX exporter cannot write."""
    config = model.config
    kind = getattr(config, "model_type", None)
    if kind not in SUPPORTED or not architecture_of(model).llama_layout:
        raise LowbitError(f"ONNX export writes {', '.join(SUPPORTED)} decoders; this model is {kind!r} (export it to "
                          f"GGUF or compressed-tensors instead)")
    act = getattr(config, "hidden_act", "silu")
    if act != "silu":
        raise LowbitError(f"ONNX export writes SiLU-gated MLPs; this model uses {act!r}")
    rotary = model.model.rotary_emb
    if getattr(rotary, "rope_type", "default") not in STATIC_ROPE:
        raise LowbitError(f"RoPE type {rotary.rope_type!r} changes with the sequence length; ONNX export supports "
                          f"{', '.join(STATIC_ROPE)}")


def _rms_norm(b: GraphBuilder, x: str, module: torch.nn.Module, name: str) -> str:
    eps = float(getattr(module, "variance_epsilon", getattr(module, "eps", 1e-6)))
    sq = b.op("Pow", [x, b.const(2.0)], name=f"{name}.sq")
    mean = b.op("ReduceMean", [sq, b.const([-1], np.int64)], name=f"{name}.mean", keepdims=1)
    std = b.op("Sqrt", [b.op("Add", [mean, b.const(eps)])], name=f"{name}.std")
    weight = b.initializer(f"{name}.weight", module.weight.detach().float().numpy())
    return b.op("Mul", [b.op("Div", [x, std]), weight], name=name)


def _rotate(b: GraphBuilder, x: str, cos: str, sin: str, half: int) -> str:
    """``x * cos + rotate_half(x) * sin`` (HF's rotate-half RoPE) over the last axis."""
    x1, x2 = b.op("Split", [x, b.const([half, half], np.int64)], n_out=2, axis=-1)
    rot = b.op("Concat", [b.op("Neg", [x2]), x1], axis=-1)
    return b.op("Add", [b.op("Mul", [x, cos]), b.op("Mul", [rot, sin])])


def _masks(b: GraphBuilder, windows: set[int | None]) -> dict[int | None, str]:
    """Additive masks ``(batch, 1, 1, new, total)``: causal, padding, and each sliding window."""
    T = b.op("Squeeze", [b.op("Shape", ["attention_mask"], start=1, end=2)])
    S = b.op("Squeeze", [b.op("Shape", ["input_ids"], start=1, end=2)])
    past = b.op("Sub", [T, S], name="past_len")
    one = b.const(1, np.int64)
    kpos = b.op("Unsqueeze", [b.op("Range", [b.const(0, np.int64), T, one]), b.const([0], np.int64)])
    qpos = b.op("Unsqueeze", [b.op("Range", [past, T, one]), b.const([1], np.int64)])
    causal = b.op("LessOrEqual", [kpos, qpos], name="causal")  # (new, total)
    pad = b.op("Unsqueeze", [b.op("Cast", ["attention_mask"], to=9), b.const([1, 2, 3], np.int64)])
    out = {}
    for w in windows:
        allowed = causal
        if w is not None:  # HF's sliding window: key k is seen from query q when k > q - window
            allowed = b.op("And", [allowed, b.op("Greater", [kpos, b.op("Sub", [qpos, b.const(w, np.int64)])])])
        allowed = b.op("And", [allowed, pad])
        out[w] = b.op("Where", [allowed, b.const(0.0), b.const(np.finfo(np.float32).min)], name="mask")
    return out


def _window(attn: torch.nn.Module, config: Any) -> int | None:
    if hasattr(attn, "sliding_window"):  # qwen2 / qwen3: per layer type
        return attn.sliding_window
    return getattr(config, "sliding_window", None)  # mistral: model-wide


def build_decoder(model: torch.nn.Module, weights: dict[str, Any], ops: str, accuracy_level: int) -> DecoderGraph:
    """The ONNX graph of ``model``; ``weights`` maps quantized layer names to their ``IntWeight``."""
    from onnx import TensorProto

    check_exportable(model)
    config = model.config
    base = model.model
    layers = base.layers
    b = GraphBuilder()
    graph = DecoderGraph(b)
    n_kv = config.num_key_value_heads or config.num_attention_heads
    n_heads = config.num_attention_heads
    hd = getattr(config, "head_dim", None) or config.hidden_size // n_heads
    n_rep = n_heads // n_kv
    F = TensorProto.FLOAT
    b.input("input_ids", TensorProto.INT64, ["batch", "sequence"])
    b.input("attention_mask", TensorProto.INT64, ["batch", "total_sequence"])
    b.input("position_ids", TensorProto.INT64, ["batch", "sequence"])
    for i in range(len(layers)):
        for kv in ("key", "value"):
            b.input(f"past_key_values.{i}.{kv}", F, ["batch", n_kv, "past_sequence", hd])

    def linear(x: str, name: str) -> str:
        out, rec = write_linear(b, x, name, model.get_submodule(name), weights.get(name), ops, accuracy_level)
        graph.records.append(rec)
        return out

    tied = head_is_tied(model)
    table_w = weights.get("model.embed_tokens") or (weights.get("lm_head") if tied else None)
    table, rec = write_embedding(b, "model.embed_tokens", base.embed_tokens, table_w)
    graph.records.append(rec)
    h = b.op("Gather", [table, "input_ids"], name="embeddings")

    rotary = base.rotary_emb
    pos = b.op("Unsqueeze", [b.op("Cast", ["position_ids"], to=F), b.const([-1], np.int64)])
    freqs = b.op("Mul", [pos, b.initializer("rope.inv_freq", rotary.inv_freq.detach().float().numpy())])
    emb = b.op("Concat", [freqs, freqs], axis=-1)
    scaling = b.const(float(getattr(rotary, "attention_scaling", 1.0)))
    heads_axis = b.const([2], np.int64)
    cos = b.op("Unsqueeze", [b.op("Mul", [b.op("Cos", [emb]), scaling]), heads_axis], name="rope.cos")  # (B, S, 1, hd)
    sin = b.op("Unsqueeze", [b.op("Mul", [b.op("Sin", [emb]), scaling]), heads_axis], name="rope.sin")

    windows = [_window(layer.self_attn, config) for layer in layers]
    masks = _masks(b, set(windows))
    for i, layer in enumerate(layers):
        p = f"model.layers.{i}"
        attn = layer.self_attn
        x = _rms_norm(b, h, layer.input_layernorm, f"{p}.input_layernorm")
        q = b.op("Reshape", [linear(x, f"{p}.self_attn.q_proj"), b.const([0, 0, n_heads, hd], np.int64)])
        k = b.op("Reshape", [linear(x, f"{p}.self_attn.k_proj"), b.const([0, 0, n_kv, hd], np.int64)])
        v = b.op("Reshape", [linear(x, f"{p}.self_attn.v_proj"), b.const([0, 0, n_kv, hd], np.int64)])
        if getattr(attn, "q_norm", None) is not None:  # qwen3: RMSNorm over each head before RoPE
            q = _rms_norm(b, q, attn.q_norm, f"{p}.self_attn.q_norm")
            k = _rms_norm(b, k, attn.k_norm, f"{p}.self_attn.k_norm")
        q = _rotate(b, q, cos, sin, hd // 2)
        k = _rotate(b, k, cos, sin, hd // 2)
        q5 = b.op("Transpose", [b.op("Reshape", [q, b.const([0, 0, n_kv, n_rep, hd], np.int64)])], perm=[0, 2, 3, 1, 4])
        kt = b.op("Transpose", [k], perm=[0, 2, 1, 3])
        vt = b.op("Transpose", [v], perm=[0, 2, 1, 3])
        present_k = b.op("Concat", [f"past_key_values.{i}.key", kt], axis=2)
        present_v = b.op("Concat", [f"past_key_values.{i}.value", vt], axis=2)
        b.output(present_k, f"present.{i}.key", F, ["batch", n_kv, "total_sequence", hd])
        b.output(present_v, f"present.{i}.value", F, ["batch", n_kv, "total_sequence", hd])
        kT = b.op("Transpose", [b.op("Unsqueeze", [present_k, heads_axis])], perm=[0, 1, 2, 4, 3])
        scores = b.op("Mul", [b.op("MatMul", [q5, kT]), b.const(float(attn.scaling))])
        probs = b.op("Softmax", [b.op("Add", [scores, masks[windows[i]]])], axis=-1)
        ctx = b.op("MatMul", [probs, b.op("Unsqueeze", [present_v, heads_axis])])  # (B, kv, rep, S, hd)
        ctx = b.op("Reshape", [b.op("Transpose", [ctx], perm=[0, 3, 1, 2, 4]), b.const([0, 0, n_heads * hd], np.int64)])
        h = b.op("Add", [h, linear(ctx, f"{p}.self_attn.o_proj")], name=f"{p}.attn_out")
        x = _rms_norm(b, h, layer.post_attention_layernorm, f"{p}.post_attention_layernorm")
        gate = linear(x, f"{p}.mlp.gate_proj")
        act = b.op("Mul", [gate, b.op("Sigmoid", [gate])])
        up = linear(x, f"{p}.mlp.up_proj")
        h = b.op("Add", [h, linear(b.op("Mul", [act, up]), f"{p}.mlp.down_proj")], name=f"{p}.out")
    h = _rms_norm(b, h, base.norm, "model.norm")
    if tied:
        # tied head: the logits read the embedding table itself (one copy in the file)
        flat = b.op("Reshape", [h, b.const([-1, config.hidden_size], np.int64)])
        logits2 = b.op("Gemm", [flat, table], transB=1)
        shape = b.op("Concat", [b.op("Shape", ["input_ids"]), b.const([config.vocab_size], np.int64)], axis=0)
        logits = b.op("Reshape", [logits2, shape])
    else:
        logits = linear(h, "lm_head")
    b.output(logits, "logits", F, ["batch", "sequence", config.vocab_size])
    return graph
