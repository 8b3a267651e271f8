"""Tests for lowbit.core.packing: exact round trips, hand-computed layouts, sizes and errors."""

from __future__ import annotations

import math
import sys

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from lowbit.core.packing import (
    SUPPORTED_BITS,
    pack,
    packed_cols,
    packed_nbytes,
    to_signed,
    to_unsigned,
    unpack,
)

CONTAINERS = ("uint8", "int32")


# ------------------------------------------------------------------ independent oracles (Python ints)
def _ref_pack_uint8_row(row: list[int], bits: int) -> list[int]:
    stream = sum(c << (bits * i) for i, c in enumerate(row))
    return list(stream.to_bytes(math.ceil(bits * len(row) / 8), "little"))


def _ref_pack_int32_row(row: list[int], bits: int) -> list[int]:
    stream = sum(c << (bits * i) for i, c in enumerate(row))
    words = [(stream >> (32 * k)) & 0xFFFFFFFF for k in range(math.ceil(bits * len(row) / 32))]
    return [w - 2**32 if w >= 2**31 else w for w in words]


def _ref_pack(codes: torch.Tensor, bits: int, container: str) -> list[list[int]]:
    rows = codes.reshape(-1, codes.shape[-1]).tolist()
    fn = _ref_pack_uint8_row if container == "uint8" else _ref_pack_int32_row
    return [fn(r, bits) for r in rows]


@st.composite
def codes_case(draw):
    bits = draw(st.sampled_from(SUPPORTED_BITS))
    container = draw(st.sampled_from(CONTAINERS))
    lead = draw(st.lists(st.integers(0, 3), min_size=0, max_size=2))
    cols = draw(st.integers(0, 70))  # covers every remainder modulo 8 and modulo 32 // bits
    dtype = draw(st.sampled_from([torch.uint8, torch.int16, torch.int32, torch.int64]))
    seed = draw(st.integers(0, 2**31 - 1))
    g = torch.Generator().manual_seed(seed)
    codes = torch.randint(0, 2**bits, (*lead, cols), generator=g).to(dtype)
    return codes, bits, container


# ------------------------------------------------------------------ round trip, layout, size
@settings(max_examples=150, deadline=None)
@given(codes_case())
def test_round_trip_exact(case):
    codes, bits, container = case
    packed = pack(codes, bits, container)
    assert packed.dtype == (torch.uint8 if container == "uint8" else torch.int32)
    assert packed.shape == (*codes.shape[:-1], packed_cols(codes.shape[-1], bits, container))
    assert torch.equal(unpack(packed, bits, codes.shape[-1], container), codes.to(torch.uint8))
    assert torch.equal(unpack(packed, bits, tuple(codes.shape)), codes.to(torch.uint8))  # container from dtype


@settings(max_examples=100, deadline=None)
@given(codes_case())
def test_layout_matches_python_int_oracle(case):
    codes, bits, container = case
    if codes.dim() == 1:
        codes = codes.unsqueeze(0)
    if codes.numel() == 0:
        return
    packed = pack(codes, bits, container)
    assert packed.reshape(-1, packed.shape[-1]).tolist() == _ref_pack(codes, bits, container)


@settings(max_examples=100, deadline=None)
@given(codes_case())
def test_packed_size(case):
    codes, bits, container = case
    cols = codes.shape[-1]
    rows = math.prod(codes.shape[:-1])
    packed = pack(codes, bits, container)
    nbytes = packed.numel() * packed.element_size()
    assert nbytes == packed_nbytes(cols, rows, bits, container)
    if container == "uint8":
        assert nbytes == rows * math.ceil(bits * cols / 8)
    else:
        assert nbytes == rows * 4 * math.ceil(bits * cols / 32)  # dense words, whole words per row


@pytest.mark.skipif(sys.byteorder != "little", reason="int32 byte view depends on host byte order")
@pytest.mark.parametrize("bits", [1, 2, 4, 8])
def test_int32_bytes_equal_uint8_stream_for_power_of_two_bits(bits):
    g = torch.Generator().manual_seed(bits)
    codes = torch.randint(0, 2**bits, (3, 45), generator=g)
    words = pack(codes, bits, "int32")
    stream = pack(codes, bits, "uint8")
    assert torch.equal(words.view(torch.uint8)[:, : stream.shape[1]], stream)
    assert not words.view(torch.uint8)[:, stream.shape[1] :].any()


def test_rows_packed_independently():
    codes = torch.tensor([[1, 2, 3], [4, 5, 6]])
    packed = pack(codes, 4)
    assert torch.equal(packed[0], pack(codes[0], 4))
    assert torch.equal(packed[1], pack(codes[1], 4))


# ------------------------------------------------------------------ hand-computed bytes
def test_4bit_uint8_bytes():
    # element 2i -> low nibble, 2i+1 -> high nibble; odd row length pads a zero high nibble
    packed = pack(torch.tensor([[1, 2, 3, 4, 5]]), 4)
    assert packed.tolist() == [[0x21, 0x43, 0x05]]


def test_2bit_uint8_bytes():
    # 0 | 1<<2 | 2<<4 | 3<<6 = 0xE4 ; 3 | 2<<2 = 0x0B
    packed = pack(torch.tensor([0, 1, 2, 3, 3, 2]), 2)
    assert packed.tolist() == [0xE4, 0x0B]


def test_1bit_uint8_bytes():
    packed = pack(torch.tensor([1, 0, 1, 1, 0, 0, 0, 0, 1]), 1)
    assert packed.tolist() == [0b00001101, 0b00000001]


def test_3bit_uint8_bytes():
    # stream = 1 | 2<<3 | 3<<6 | 4<<9 | 5<<12 | 6<<15 | 7<<18 | 0<<21 = 0x1F58D1
    assert pack(torch.tensor([1, 2, 3, 4, 5, 6, 7, 0]), 3).tolist() == [0xD1, 0x58, 0x1F]
    # third code sits at stream bits 6..8, straddling bytes 0 and 1: 7<<6 = 0x1C0
    assert pack(torch.tensor([0, 0, 7]), 3).tolist() == [0xC0, 0x01]


def test_8bit_uint8_is_copy():
    codes = torch.tensor([[0, 17, 255]], dtype=torch.uint8)
    packed = pack(codes, 8)
    assert packed.tolist() == [[0, 17, 255]]
    packed[0, 0] = 9
    assert codes[0, 0] == 0  # a copy, not a view


# ------------------------------------------------------------------ int32: compressed-tensors layout
def test_int32_4bit_matches_compressed_tensors_word():
    # compressed-tensors pack_to_int32: element i of each 8-group at bits 4*i -> 0x87654321
    packed = pack(torch.tensor([[1, 2, 3, 4, 5, 6, 7, 8, 15]]), 4, "int32")
    assert packed.dtype == torch.int32
    assert packed.tolist() == [[0x87654321 - 2**32, 0x0000000F]]  # [-2023406815, 15]
    assert unpack(packed, 4, 9).tolist() == [[1, 2, 3, 4, 5, 6, 7, 8, 15]]


def test_int32_8bit_matches_compressed_tensors_docstring():
    # compressed-tensors docstring: signed [1, 2] + offset 128 -> [129, 130] -> 33409
    assert pack(to_unsigned(torch.tensor([[1, 2]], dtype=torch.int8), 8), 8, "int32").tolist() == [[33409]]


def test_int32_3bit_dense_straddles_words():
    # compressed-tensors 0.20 dense layout: 11 codes x 3 bits = 33 bits -> 2 words; the 11th code
    # (7 = 0b111) starts at bit 30: its two low bits top word 0, its high bit is bit 0 of word 1
    packed = pack(torch.tensor([[1] * 10 + [7]]), 3, "int32")
    assert packed.tolist() == [[0x09249249 | (0b11 << 30) - 2**32, 1]]
    assert unpack(packed, 3, 11).tolist() == [[1] * 10 + [7]]


def test_int32_top_bit_all_ones():
    packed = pack(torch.full((2, 16), 15), 4, "int32")
    assert packed.tolist() == [[-1, -1], [-1, -1]]
    assert torch.equal(unpack(packed, 4, 16), torch.full((2, 16), 15, dtype=torch.uint8))


# ------------------------------------------------------------------ signed helpers
@pytest.mark.parametrize("bits", SUPPORTED_BITS)
def test_signed_unsigned_round_trip(bits):
    half = 2 ** (bits - 1)
    q = torch.arange(-half, half, dtype=torch.int8 if bits < 8 else torch.int16)
    u = to_unsigned(q, bits)
    assert u.dtype == torch.uint8 and u.tolist() == list(range(2**bits))
    s = to_signed(unpack(pack(u, bits, "int32"), bits, q.shape[-1]), bits)
    assert s.dtype == torch.int8 and s.tolist() == q.tolist()


def test_signed_range_errors():
    with pytest.raises(ValueError, match="-9 is below the 4-bit minimum -8"):
        to_unsigned(torch.tensor([-9, 0]), 4)
    with pytest.raises(ValueError, match="8 is above the 4-bit maximum 7"):
        to_unsigned(torch.tensor([8]), 4)
    with pytest.raises(ValueError, match="16 is above the 4-bit maximum 15"):
        to_signed(torch.tensor([16]), 4)


# ------------------------------------------------------------------ errors
@pytest.mark.parametrize("container", CONTAINERS)
def test_code_above_range(container):
    with pytest.raises(ValueError, match="code 4 is above the 2-bit maximum 3"):
        pack(torch.tensor([[0, 4]]), 2, container)


def test_code_below_range_mentions_signed_offset():
    with pytest.raises(ValueError, match=r"code -1 is below the 3-bit minimum 0.*to_unsigned"):
        pack(torch.tensor([[-1, 2]]), 3)


@pytest.mark.parametrize("bits", [0, 9, 16, 2.0, True, "4"])
def test_unsupported_bits(bits):
    with pytest.raises(ValueError, match="unsupported bits"):
        pack(torch.tensor([1]), bits)
    with pytest.raises(ValueError, match="unsupported bits"):
        packed_nbytes(4, 1, bits, "uint8")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bool])
def test_wrong_codes_dtype(dtype):
    with pytest.raises(ValueError, match="integer tensor"):
        pack(torch.zeros(4, dtype=dtype), 4)


def test_unknown_container_and_scalar():
    with pytest.raises(ValueError, match="unknown container"):
        pack(torch.tensor([1]), 4, "int64")
    with pytest.raises(ValueError, match="0-d"):
        pack(torch.tensor(1), 4)


def test_unpack_errors():
    packed = pack(torch.tensor([[1, 2, 3]]), 4)  # 2 bytes
    with pytest.raises(ValueError, match="needs a torch.int32 packed tensor"):
        unpack(packed, 4, 3, "int32")
    with pytest.raises(ValueError, match="uint8 or int32"):
        unpack(packed.to(torch.int64), 4, 3)
    with pytest.raises(ValueError, match="pack into 3 uint8 values.*has 2"):
        unpack(packed, 4, 5)
    with pytest.raises(ValueError, match=r"shape \(2, 3\) has 2 rows"):
        unpack(packed, 4, (2, 3))


def test_packed_nbytes_values():
    assert packed_nbytes(4096, 11008, 4, "uint8") == 11008 * 2048
    assert packed_nbytes(4096, 11008, 4, "int32") == 11008 * 2048
    assert packed_nbytes(5, 2, 3, "uint8") == 2 * 2  # ceil(15 / 8)
    assert packed_nbytes(11, 2, 3, "int32") == 2 * 2 * 4  # ceil(11 / 10) words
    assert packed_nbytes(0, 7, 2, "uint8") == 0


@pytest.mark.parametrize("bits", SUPPORTED_BITS)
def test_int32_equals_compressed_tensors_pack_to_int32(bits):
    """Bit-identical to the installed compressed-tensors (0.20 dense layout), both directions."""
    helpers = pytest.importorskip("compressed_tensors.compressors.pack_quantized.helpers")
    g = torch.Generator().manual_seed(bits)
    for cols in (1, 7, 32, 33, 576):
        q = torch.randint(-(1 << bits - 1), 1 << bits - 1, (5, cols), generator=g).to(torch.int8)
        theirs = helpers.pack_to_int32(q, bits)
        assert torch.equal(pack(to_unsigned(q, bits), bits, "int32"), theirs), cols
        assert torch.equal(to_signed(unpack(theirs, bits, cols), bits), q), cols
