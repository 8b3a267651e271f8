"""One bits-per-weight count: int code blocks with scales / zeros, full-precision values, positions."""

from __future__ import annotations

from lowbit.solvers.storage import CodeBlock, bits_per_weight
from lowbit.spec import QuantSpec


def test_code_block_of_spec():
    asym = QuantSpec(type="int", bits=3, granularity="group", group_size=16, symmetric=False, signed=False)
    sym16 = QuantSpec(type="int", bits=4, granularity="group", group_size=16, scale_dtype="float16")
    assert CodeBlock.of_spec(64, 4, asym) == CodeBlock(64, 3, 4, 32, 3)
    assert CodeBlock.of_spec(64, 4, asym).total == 64 * 3 + 4 * (32 + 3)
    assert CodeBlock.of_spec(64, 4, sym16).total == 64 * 4 + 4 * 16  # symmetric: no zero point stored


def test_bits_per_weight_by_hand():
    # 8 x 32 layer: 30 columns of 3-bit codes in 2 groups per row, 2 fp16 columns with a 32-bit index each
    asym = QuantSpec(type="int", bits=3, granularity="group", group_size=16, symmetric=False, signed=False)
    bits = bits_per_weight(8 * 32, [CodeBlock.of_spec(8 * 30, 8 * 2, asym)], fp_values=2 * 8, index_bits=2 * 32)
    assert bits == (8 * 30 * 3 + 16 * 35 + 16 * 16 + 64) / 256 == 6.25
    # two code blocks (Atom: 4-bit groups + 8-bit outlier columns with an fp32 scale per row) add up
    int8_row = QuantSpec(type="int", bits=8, granularity="channel")
    two = bits_per_weight(4 * 64, [CodeBlock.of_spec(4 * 56, 4 * 4, asym), CodeBlock.of_spec(4 * 8, 4, int8_row)])
    assert two == (4 * 56 * 3 + 16 * 35 + 4 * 8 * 8 + 4 * 32) / 256
    assert bits_per_weight(10, []) == 0.0
