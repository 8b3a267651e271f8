"""One linear layer (and its input quantizer), or the embedding table, as ONNX nodes.

``ops='matmulnbits'`` writes 2/3/4-bit grouped weights as ONNX Runtime's ``MatMulNBits`` and the
rest (int8, per-channel, odd group widths) as QDQ; ``ops='qdq'`` writes every integer weight as
``DequantizeLinear`` + ``MatMul``.  Layers without integer codes stay fp32 ``MatMul``; quantized
layers whose format is not integer (FP8, NF4, codebooks) are refused with what can be written.
Activation quantizers become QuantizeLinear / DequantizeLinear pairs: dynamic per-token ranges are
computed in the graph (blocked quantization, one block per token), static per-tensor ranges are
constants.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from lowbit.activations import act_quantizer_of
from lowbit.activations.quantizer import ActQuantizer
from lowbit.core.affine import EPS
from lowbit.errors import LowbitError
from lowbit.export.onnx_builder import MS_DOMAIN, GraphBuilder
from lowbit.export.onnx_weights import in_group_order, int4_raw, nbits_block, nbits_tensors, qdq_tensors
from lowbit.packed.intweight import IntWeight
from lowbit.quantized_layers import is_quantized

OPS = ("matmulnbits", "qdq")


@dataclass
class LinearRecord:
    """How one weight was written, and the bits it takes in the file."""

    name: str
    form: str  # "float32", "MatMulNBits 4-bit (4-bit codes) g64", "QDQ int8 (8-bit codes) per channel", ...
    activations: str  # "-" or the input quantization
    bytes: int


def _quantizer(name: str, module: torch.nn.Module) -> ActQuantizer | None:
    q = act_quantizer_of(module)
    if q is None or not q.enabled:
        return None
    sp = q.spec
    where = f"{name}: input quantizer {q.extra_repr().strip()}"
    if type(q) is not ActQuantizer or q.shift is not None:
        raise LowbitError(f"{where} is not a plain int quantizer (outlier split / shift); ONNX export writes int8 "
                          f"per-token (dynamic) or per-tensor (static) input quantization")
    if sp.type != "int" or sp.bits != 8:
        raise LowbitError(f"{where}: ONNX QDQ activations are int8; re-quantize with an int8 activation spec "
                          f"(A8_TOKEN or A8_TENSOR) or export weights only")
    if sp.dynamic and not (sp.granularity == "token" and sp.symmetric):
        raise LowbitError(f"{where}: dynamic activations are written per token, symmetric (A8_TOKEN)")
    if sp.pow2_scale or sp.scale_dtype not in (None, "float32"):
        raise LowbitError(f"{where}: rounded activation scales have no ONNX QDQ form")
    if not q.calibrated:
        raise LowbitError(f"{where} has no calibrated range")
    return q


def _quantize_input(b: GraphBuilder, x: str, name: str, q: ActQuantizer, width: int) -> tuple[str, str]:
    from onnx import TensorProto

    sp = q.spec
    if sp.dynamic:  # per token: scale = max|x| / levels over the last axis, one quantization block per token
        levels = (1 << (sp.bits - 1)) - (0.5 if sp.full_range else 1)
        absmax = b.op("ReduceMax", [b.op("Abs", [x]), b.const([-1], np.int64)], keepdims=1)
        scale = b.op("Max", [b.op("Div", [absmax, b.const(levels)]), b.const(EPS)], name=f"{name}.input_scale")
        xq = b.op("QuantizeLinear", [x, scale], axis=-1, block_size=width, output_dtype=TensorProto.INT8)
        return b.op("DequantizeLinear", [xq, scale], name=f"{name}.input_dq", axis=-1, block_size=width), "int8 per token"
    s, z = q.qparams()
    signed = sp.signed
    scale = b.const(float(s.reshape(-1)[0]))
    zero = b.const(int(round(float(z.reshape(-1)[0]))), np.int8 if signed else np.uint8)
    xq = b.op("QuantizeLinear", [x, scale, zero])
    return b.op("DequantizeLinear", [xq, scale, zero], name=f"{name}.input_dq"), "int8 per tensor (static)"


def _dequantize_linear(b: GraphBuilder, name: str, w: IntWeight, transpose: bool = True) -> tuple[str, str, int]:
    """A DequantizeLinear giving the fp32 weight of ``w``: ``(in, out)`` for MatMul, or ``(out, in)`` as stored."""
    from onnx import TensorProto

    t = qdq_tensors(w, transpose)
    kind = TensorProto.INT4 if t.int4 else TensorProto.INT8
    raw = int4_raw(t.codes) if t.int4 else t.codes.astype(np.int8).tobytes()
    codes = b.raw_initializer(f"{name}.qweight", kind, list(t.codes.shape), raw)
    scale = b.initializer(f"{name}.scales", t.scale.astype(np.float32))
    inputs = [codes, scale]
    size = len(raw) + t.scale.nbytes
    if t.zero is not None:
        zraw = int4_raw(t.zero) if t.int4 else t.zero.astype(np.int8).tobytes()
        inputs.append(b.raw_initializer(f"{name}.zero_points", kind, list(t.zero.shape), zraw))
        size += len(zraw)
    attrs = {"axis": t.axis} if t.block_size is None else {"axis": t.axis, "block_size": t.block_size}
    grid = "per channel" if t.block_size is None else f"g{t.block_size}"
    form = f"QDQ int{4 if t.int4 else 8} ({w.bits}-bit codes) {grid}{'' if w.zero is None else ' asym'}"
    return b.op("DequantizeLinear", inputs, name=f"{name}.weight", **attrs), form, size


def _nbits(b: GraphBuilder, x: str, name: str, w: IntWeight, block: int, accuracy_level: int) -> tuple[str, str, int]:
    t = nbits_tensors(w, block)
    inputs = [x, b.initializer(f"{name}.qweight", t.packed), b.initializer(f"{name}.scales", t.scales)]
    size = t.packed.nbytes + t.scales.nbytes
    if t.zero_points is not None:
        inputs.append(b.initializer(f"{name}.zero_points", t.zero_points))
        size += t.zero_points.nbytes
    out = b.op("MatMulNBits", inputs, name=name, domain=MS_DOMAIN, K=t.k, N=t.n, bits=t.bits, block_size=block,
               accuracy_level=accuracy_level)
    form = f"MatMulNBits {t.bits}-bit ({w.bits}-bit codes) g{block}{'' if w.zero is None else ' asym'}"
    return out, form, size


def _int_weight_or_refuse(name: str, module: torch.nn.Module, w: IntWeight | None) -> IntWeight | None:
    if w is None and is_quantized(module):
        raise LowbitError(f"{name} is quantized to a format without integer codes (float / codebook); ONNX export "
                          f"writes integer weights (MatMulNBits 2/4-bit groups, QDQ int4 / int8)")
    return w


def check_layers(model: torch.nn.Module, weights: dict[str, IntWeight]) -> None:
    """Refuse, before the graph is built, any weight or input quantizer ONNX cannot hold."""
    for name, module in model.named_modules():
        if isinstance(module, (torch.nn.Linear, torch.nn.Embedding)):
            _int_weight_or_refuse(name, module, weights.get(name))
            _quantizer(name, module)


def write_linear(b: GraphBuilder, x: str, name: str, module: torch.nn.Module, w: IntWeight | None, ops: str,
                 accuracy_level: int) -> tuple[str, LinearRecord]:
    """``module(x)`` as nodes; returns the output value and how the weight was written."""
    w = _int_weight_or_refuse(name, module, w)
    q = _quantizer(name, module)
    acts = "-"
    if q is not None:
        x, acts = _quantize_input(b, x, name, q, module.in_features)
    if w is None:
        wt = module.weight.detach().float().numpy().T
        out = b.op("MatMul", [x, b.initializer(f"{name}.weight", wt)], name=name)
        form, size = "float32", wt.nbytes
    else:
        w, perm = in_group_order(w)
        if perm is not None:  # act-order columns: gather the input in group order instead
            x = b.op("Gather", [x, b.initializer(f"{name}.g_perm", perm)], axis=-1)
        block = nbits_block(w) if ops == "matmulnbits" and w.bits <= 4 else None
        if block is not None:
            out, form, size = _nbits(b, x, name, w, block, accuracy_level)
        else:
            weight, form, size = _dequantize_linear(b, name, w)
            out = b.op("MatMul", [x, weight], name=name)
    bias = getattr(module, "bias", None)
    if bias is not None:
        arr = bias.detach().float().numpy()
        out = b.op("Add", [out, b.initializer(f"{name}.bias", arr)], name=f"{name}.biased")
        size += arr.nbytes
    return out, LinearRecord(name, form, acts, size)


def write_embedding(b: GraphBuilder, name: str, module: torch.nn.Module, w: IntWeight | None
                    ) -> tuple[str, LinearRecord]:
    """The ``(vocab, hidden)`` fp32 table (dequantized in the graph when it is quantized)."""
    w = _int_weight_or_refuse(name, module, w)
    if w is None:
        arr = module.weight.detach().float().numpy()
        return b.initializer(f"{name}.weight", arr), LinearRecord(name, "float32", "-", arr.nbytes)
    table, form, size = _dequantize_linear(b, name, w, transpose=False)
    return table, LinearRecord(name, form, "-", size)
