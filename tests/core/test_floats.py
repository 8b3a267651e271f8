"""Tests for lowbit.core.floats: element rounding, codes, scaled/MX/NVFP4 quantization, STE."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from lowbit.core import floats as F
from lowbit.core.floats import (
    E2M1,
    E2M3,
    E3M2,
    E4M3,
    E5M2,
    FORMATS,
    FloatFormat,
    decode,
    dequantize_float,
    e8m0_to_float,
    encode,
    fake_quant_float,
    float_grid,
    mx_shared_exponent,
    nvfp4_global_scale,
    quantize_float,
    round_to_format,
)
from lowbit.core.granularity import ungroup
from lowbit.spec import SpecError, preset

SMALL = (E3M2, E2M3, E2M1)
FP8 = (E4M3, E5M2)


# ------------------------------------------------------------------------- brute-force reference
def ref_grid(fmt: FloatFormat) -> list[float]:
    """Non-negative values in magnitude-code order, from the textbook formula (no bit tricks)."""
    m = fmt.man_bits
    values = []
    for e in range(1 << fmt.exp_bits):
        for mant in range(1 << m):
            if e == 0:
                values.append(2.0 ** (1 - fmt.bias) * mant / 2**m)
            else:
                values.append(2.0 ** (e - fmt.bias) * (1 + mant / 2**m))
    return [v for v in values if v <= fmt.max_normal]


def ref_round(x: torch.Tensor, fmt: FloatFormat) -> torch.Tensor:
    """Nearest grid value (ties to the even code), saturating, sign kept; computed in float64.

    |x| and the grid are fp32 values, so distances near a midpoint (same binade) are exact in fp64.
    """
    grid = torch.tensor(ref_grid(fmt), dtype=torch.float64)
    a = x.double().abs().clamp(max=fmt.max_normal).reshape(-1, 1)
    d = (a - grid).abs()
    cand = d == d.min(dim=1, keepdim=True).values
    first = cand.to(torch.int8).argmax(dim=1)
    tie = cand.sum(dim=1) > 1
    idx = torch.where(tie & (first % 2 == 1), first + 1, first)
    return torch.copysign(grid[idx], x.double().reshape(-1)).float().reshape(x.shape)


def all_bf16_values() -> torch.Tensor:
    """Every finite bfloat16 number as fp32 (65536 bit patterns minus inf/NaN)."""
    v = torch.arange(-(1 << 15), 1 << 15, dtype=torch.int32).to(torch.int16).view(torch.bfloat16).float()
    return v[torch.isfinite(v)]


def midpoints(fmt: FloatFormat) -> torch.Tensor:
    g = torch.tensor(ref_grid(fmt), dtype=torch.float64)
    return ((g[1:] + g[:-1]) / 2).float()


def torch_cast(x: torch.Tensor, fmt: FloatFormat) -> torch.Tensor:
    assert fmt.torch_dtype is not None
    return x.to(fmt.torch_dtype).float()


finite32 = st.floats(width=32, allow_nan=False, allow_infinity=False)


# ------------------------------------------------------------------------------- format tables
def test_format_numbers_and_grids() -> None:
    assert float_grid(E2M1).tolist() == [0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0]
    assert list(F.E2M1_VALUES) == float_grid(E2M1).tolist()
    expected = {  # name: (max, min normal, min subnormal, emax, distinct signed finite values)
        "e4m3": (448.0, 2**-6, 2**-9, 8, 253),
        "e5m2": (57344.0, 2**-14, 2**-16, 15, 247),
        "e3m2": (28.0, 0.25, 0.0625, 4, 63),
        "e2m3": (7.5, 1.0, 0.125, 2, 63),
        "e2m1": (6.0, 1.0, 0.5, 2, 15),
    }
    for name, (mx, mn, ms, emax, distinct) in expected.items():
        f = FORMATS[name]
        grid = float_grid(f)
        assert (f.max_normal, f.min_normal, f.min_subnormal, f.emax) == (mx, mn, ms, emax)
        assert grid.tolist() == ref_grid(f)
        assert grid.max().item() == mx and grid[1].item() == ms and grid[1 << f.man_bits].item() == mn
        every = decode(torch.arange(1 << f.bits, dtype=torch.uint8), f)
        assert torch.unique(every[torch.isfinite(every)]).numel() == distinct
    assert E4M3.max_normal == torch.finfo(torch.float8_e4m3fn).max
    assert E5M2.max_normal == torch.finfo(torch.float8_e5m2).max
    assert all(f.bits == 6 for f in (E3M2, E2M3)) and E2M1.bits == 4


def test_code_layout_sign_exponent_mantissa() -> None:
    x = torch.tensor([0.5, 1.0, 6.0, -6.0, -0.0])
    assert encode(x, E2M1).tolist() == [0b0001, 0b0010, 0b0111, 0b1111, 0b1000]
    assert encode(torch.tensor([28.0, -0.0625, 0.25]), E3M2).tolist() == [0b011111, 0b100001, 0b000100]
    assert encode(torch.tensor([-7.5, 1.0, 0.125]), E2M3).tolist() == [0b111111, 0b001000, 0b000001]
    assert encode(torch.tensor([448.0, -1.0]), E4M3).tolist() == [0x7E, 0xB8]


# ------------------------------------------------------------------------------------------ FP8
@pytest.mark.parametrize("fmt", FP8, ids=lambda f: f.name)
def test_fp8_equals_torch_cast_on_every_bf16_value(fmt: FloatFormat) -> None:
    v = all_bf16_values()
    v = v[v.abs() <= fmt.max_normal]
    assert torch.equal(round_to_format(v, fmt), torch_cast(v, fmt))
    assert torch.equal(encode(v, fmt), v.to(fmt.torch_dtype).view(torch.uint8))
    # the brute-force reference agrees with torch too, which validates the reference itself
    assert torch.equal(ref_round(v, fmt), torch_cast(v, fmt))


@pytest.mark.parametrize("fmt", FP8, ids=lambda f: f.name)
@settings(max_examples=60, deadline=None)
@given(xs=st.lists(finite32, min_size=1, max_size=64))
def test_fp8_equals_torch_cast_in_range_and_saturates(fmt: FloatFormat, xs: list[float]) -> None:
    x = torch.tensor(xs, dtype=torch.float32)
    inside = x.abs() <= fmt.max_normal
    got = round_to_format(x, fmt)
    assert torch.equal(got[inside], torch_cast(x[inside], fmt))
    assert torch.equal(got[~inside], torch.sign(x[~inside]) * fmt.max_normal)


@pytest.mark.parametrize("fmt", FP8, ids=lambda f: f.name)
def test_fp8_specials(fmt: FloatFormat) -> None:
    x = torch.tensor([math.inf, -math.inf, 1e30, -1e30, math.nan])
    got = round_to_format(x, fmt)
    assert got[:4].tolist() == [fmt.max_normal, -fmt.max_normal] * 2
    assert math.isnan(got[4].item())
    codes = torch.arange(256, dtype=torch.uint8)
    ours, ref = decode(codes, fmt), codes.view(fmt.torch_dtype).float()  # slow path (specials)
    assert torch.equal(torch.isnan(ours), torch.isnan(ref))
    assert torch.equal(ours.nan_to_num(0.0), ref.nan_to_num(0.0))
    finite = codes[torch.isfinite(ref)]  # fast bit-trick path
    assert torch.equal(decode(finite, fmt), finite.view(fmt.torch_dtype).float())
    assert torch.equal(encode(decode(finite, fmt), fmt), finite)


# -------------------------------------------------------------------------------------- FP6/FP4
@pytest.mark.parametrize("fmt", SMALL, ids=lambda f: f.name)
def test_small_formats_match_reference_on_every_bf16_value(fmt: FloatFormat) -> None:
    v = all_bf16_values()
    assert torch.equal(round_to_format(v, fmt), ref_round(v, fmt))


def _tie_inputs(fmt: FloatFormat) -> st.SearchStrategy[list[float]]:
    mids = midpoints(fmt).tolist() + ref_grid(fmt)
    point = st.tuples(st.sampled_from(mids), st.integers(-2, 2), st.booleans()).map(
        lambda t: _nudge(t[0], t[1], t[2])
    )
    scaled = st.tuples(finite32, st.integers(-6, 6)).map(lambda t: t[0] * 2.0 ** t[1] if abs(t[0]) < 1e30 else t[0])
    tiny = st.floats(min_value=-(2.0**-126), max_value=2.0**-126, width=32)  # fp32 subnormals
    return st.lists(st.one_of(point, finite32, scaled, tiny), min_size=1, max_size=64)


def _nudge(v: float, ulps: int, negative: bool) -> float:
    t = torch.tensor(v, dtype=torch.float32)
    direction = torch.tensor(math.inf if ulps > 0 else -math.inf)
    for _ in range(abs(ulps)):
        t = torch.nextafter(t, direction)
    return -t.item() if negative else t.item()


@pytest.mark.parametrize("fmt", SMALL, ids=lambda f: f.name)
@settings(max_examples=80, deadline=None)
@given(data=st.data())
def test_small_formats_match_bruteforce_reference(fmt: FloatFormat, data: st.DataObject) -> None:
    x = torch.tensor(data.draw(_tie_inputs(fmt)), dtype=torch.float32)
    got = round_to_format(x, fmt)
    assert torch.equal(got, ref_round(x, fmt))
    assert torch.equal(torch.signbit(got), torch.signbit(x))


@pytest.mark.parametrize("fmt", SMALL, ids=lambda f: f.name)
def test_small_format_ties_go_to_even_code(fmt: FloatFormat) -> None:
    mids = midpoints(fmt)
    codes = encode(mids, fmt)
    assert (codes % 2 == 0).all()
    lo_codes = torch.arange(mids.numel())
    assert torch.equal(codes.long(), lo_codes + lo_codes % 2)


@pytest.mark.parametrize("fmt", SMALL, ids=lambda f: f.name)
def test_small_formats_saturate_and_code_round_trip(fmt: FloatFormat) -> None:
    x = torch.tensor([1e38, -1e38, math.inf, -math.inf, 3 * fmt.max_normal, math.nan])
    mx = fmt.max_normal
    assert round_to_format(x, fmt).tolist() == [mx, -mx, mx, -mx, mx, 0.0]  # no NaN code: NaN -> +0
    codes = torch.arange(1 << fmt.bits, dtype=torch.uint8)
    values = decode(codes, fmt)
    assert torch.isfinite(values).all()
    assert torch.equal(encode(values, fmt), codes)  # includes -0.0 -> sign bit set
    assert torch.equal(decode(codes | (0xFF << fmt.bits & 0xFF), fmt), values)  # high bits ignored


# --------------------------------------------------------------------------- chunked processing
@pytest.mark.parametrize("name", ["FP8_E4M3", "FP4_E2M1", "MXFP6", "NVFP4"])
@pytest.mark.parametrize("gran", ["tensor", "channel", "group"])
def test_chunking_does_not_change_results(monkeypatch: pytest.MonkeyPatch, name: str, gran: str) -> None:
    torch.manual_seed(0)
    x = torch.randn(12, 64)
    spec = preset(name)
    if gran != "group":
        spec = spec.replace(granularity=gran, group_size=None)
    ref = quantize_float(x, spec)
    monkeypatch.setattr(F, "_CHUNK", 40)  # rows of 64 > chunk: column pieces; groups: row blocks
    small = quantize_float(x, spec)
    assert torch.equal(small.codes, ref.codes) and torch.equal(small.scales.float(), ref.scales.float())
    assert torch.equal(dequantize_float(small), dequantize_float(ref))


# ------------------------------------------------------------------------------ scaled quantization
def test_fp8_per_channel_scale_and_reconstruction() -> None:
    torch.manual_seed(0)
    x = torch.randn(16, 64)
    qt = quantize_float(x, preset("FP8_E4M3"))
    absmax = x.abs().amax(dim=1, keepdim=True)
    assert torch.equal(qt.scales, absmax / 448.0)
    assert torch.equal(qt.values(), torch_cast(x / qt.scales, E4M3))
    assert encode(qt.values(), E4M3).eq(qt.codes).all()
    err = ((dequantize_float(qt) - x).norm() / x.norm()).item()
    assert err < 0.03  # measured 0.0249 (3 mantissa bits)


def test_pow2_scale_rounds_up_so_nothing_saturates() -> None:
    torch.manual_seed(1)
    x = torch.randn(8, 32) * 3
    spec = preset("FP8_E4M3").replace(pow2_scale=True)
    qt = quantize_float(x, spec)
    s = qt.scales
    assert torch.equal(torch.log2(s), torch.log2(s).round())
    ideal = x.abs().amax(dim=1, keepdim=True) / 448.0
    assert (s >= ideal).all() and (s < 2 * ideal).all()
    assert (qt.values().abs() <= 448).all()
    exact = torch.tensor([[448.0, -3.0]])  # absmax/max = 1 exactly: scale 1, no rounding up
    assert quantize_float(exact, spec).scales.item() == 1.0
    for dtype in ("float16", "bfloat16"):
        q16 = quantize_float(x, spec.replace(scale_dtype=dtype))
        assert torch.equal(q16.scales.float(), s) and torch.equal(q16.codes, qt.codes)


def test_zero_group_and_float16_scales() -> None:
    x = torch.zeros(2, 32)
    x[1] = torch.linspace(-1, 1, 32)
    for spec in (preset("FP6_E2M3"), preset("FP6_E2M3").replace(scale_dtype="float16"), preset("MXFP4")):
        qt = quantize_float(x, spec)
        out = dequantize_float(qt)
        assert torch.isfinite(out).all() and (out[0] == 0).all()
    qt16 = quantize_float(x, preset("FP6_E2M3").replace(scale_dtype="float16"))
    assert qt16.scales.dtype == torch.float16


def test_padding_and_code_shapes() -> None:
    x = torch.randn(3, 40)
    spec = preset("MXFP4").replace(padding="pad")
    qt = quantize_float(x, spec)
    assert qt.codes.shape == (6, 32) and qt.scales.shape == (3, 2)
    assert ungroup(qt.codes, qt.layout).shape == x.shape
    assert dequantize_float(qt).shape == x.shape
    with pytest.raises(ValueError):
        quantize_float(x, preset("MXFP4"))


# ----------------------------------------------------------------------------------------- MX
def _mx_block(values: list[float], fill: float = 0.0) -> torch.Tensor:
    return torch.tensor(values + [fill] * (32 - len(values)), dtype=torch.float32).reshape(1, 32)


def test_mx_scale_choice_on_hand_made_blocks() -> None:
    cases = [  # (element fmt, absmax, shared exponent)
        (E2M1, 6.0, 0),  # floor(log2 6) = 2 = emax
        (E2M1, 7.0, 0),  # still 2; 7 saturates to 6
        (E2M1, 8.0, 1),
        (E2M1, 0.3, -4),  # floor(log2 0.3) = -2
        (E4M3, 448.0, 0),
        (E4M3, 1.0, -8),
        (E5M2, 1.0, -15),
        (E3M2, 28.0, 0),
        (E2M3, 7.5, 0),
        (E2M1, 0.0, -127),  # zero block: no log2(0)
        (E2M1, 1e-40, -127),  # fp32 subnormal absmax: clamped
        (E2M1, 3e38, 125),  # floor(log2 3e38) = 127
    ]
    for fmt, absmax, shared in cases:
        got = mx_shared_exponent(torch.tensor([absmax]), fmt).item()
        assert got == shared, (fmt.name, absmax, got)
    spec = preset("MXFP4")
    qt = quantize_float(_mx_block([6.0, -3.0, 0.5, 1.75]), spec)
    assert qt.scales.dtype == torch.uint8 and qt.scales.item() == 127
    assert dequantize_float(qt)[0, :4].tolist() == [6.0, -3.0, 0.5, 2.0]  # 1.75 ties to 2 (even)
    qt = quantize_float(_mx_block([7.0, -7.0, 5.0]), spec)
    assert qt.scales.item() == 127 and dequantize_float(qt)[0, :3].tolist() == [6.0, -6.0, 4.0]
    qt = quantize_float(_mx_block([0.3, 0.1, -0.05]), spec)
    assert qt.scales.item() == 127 - 4  # element values 4.8 -> 4, 1.6 -> 1.5, -0.8 -> -1
    assert dequantize_float(qt)[0, :3].tolist() == [0.25, 0.09375, -0.0625]


def test_mx_zero_block_and_e8m0_decoding() -> None:
    qt = quantize_float(torch.zeros(2, 32), preset("MXFP8"))
    assert qt.scales.tolist() == [[0], [0]] and (dequantize_float(qt) == 0).all()
    codes = torch.tensor([0, 1, 127, 254, 255], dtype=torch.uint8)
    got = e8m0_to_float(codes)
    assert got[:4].tolist() == [2.0**-127, 2.0**-126, 1.0, 2.0**127] and math.isnan(got[4].item())


@pytest.mark.parametrize("name", ["MXFP8", "MXFP6", "MXFP4"])
def test_mx_round_trip_of_representable_blocks(name: str) -> None:
    spec = preset(name)
    fmt = FORMATS[spec.fmt or ""]
    torch.manual_seed(2)
    grid = float_grid(fmt)
    idx = torch.randint(0, grid.numel(), (4, 64))
    x = grid[idx] * torch.where(torch.rand(4, 64) < 0.5, -1.0, 1.0)
    x[:, 0] = fmt.max_normal  # every block holds the max so its shared exponent is 0 ...
    x[:, 32] = fmt.max_normal
    x = x * torch.tensor([[2.0**-10], [1.0], [2.0**5], [2.0**-3]])  # ... after this power-of-2 shift
    qt = quantize_float(x, spec)
    assert torch.equal(dequantize_float(qt), x)
    assert torch.equal(qt.scales.long() - 127, torch.tensor([[-10] * 2, [0] * 2, [5] * 2, [-3] * 2]))
    assert torch.equal(decode(encode(qt.values(), fmt), fmt), qt.values())


@pytest.mark.parametrize("name", ["MXFP8", "MXFP6", "MXFP4", "NVFP4"])
def test_block_formats_follow_their_definition(name: str) -> None:
    """Scales and elements equal a plain re-statement of the OCP MX / NVFP4 recipes."""
    torch.manual_seed(5)
    spec = preset(name)
    decades = 1 if spec.global_scale else 3  # keep NVFP4 block scales above the E4M3 minimum 2^-9
    x = torch.randn(8, 64) * torch.logspace(-decades, decades, 8).reshape(8, 1)
    fmt = FORMATS[spec.fmt or ""]
    qt = quantize_float(x, spec)
    blocks = x.reshape(-1, spec.group_size or 0)
    absmax = blocks.abs().amax(dim=1, keepdim=True)
    if spec.scale_dtype == "e8m0":
        shared = torch.floor(torch.log2(absmax)) - fmt.emax
        assert torch.equal(qt.scales.reshape(-1, 1).float() - 127, shared)
        scale = 2.0**shared
    else:
        g = absmax.max() / (6.0 * 448.0)
        assert qt.global_scale is not None and qt.global_scale.item() == g.item()
        fp8 = (absmax / (6.0 * g)).to(torch.float8_e4m3fn)
        assert torch.equal(qt.scales.reshape(-1, 1).float(), fp8.float())
        scale = fp8.float() * g
    assert torch.equal(qt.values(), ref_round(blocks / scale, fmt))
    assert torch.equal(dequantize_float(qt), (ref_round(blocks / scale, fmt) * scale).reshape(x.shape))


# ---------------------------------------------------------------------------------------- NVFP4
def test_nvfp4_hand_computed_scales() -> None:
    blocks = [
        [2688.0, -1344.0, 672.0],  # absmax 2688 = tensor amax: global = 2688 / (6*448) = 1
        [120.0, 45.0, -30.0],  # block scale 120/6 = 20 (exact E4M3); 45/20 = 2.25 -> 2 -> 40
        [117.0, 1.0],  # 117/6 = 19.5 -> E4M3 20 (step 2 in [16, 32)); 117/20 = 5.85 -> 6 -> 120
        [102.0, -102.0],  # 102/6 = 17: tie 16|18 -> 16 (even); 102/16 = 6.375 saturates at 6 -> 96
        [0.0],  # zero block: scale 1.0 as in TensorRT-Model-Optimizer
    ]
    x = torch.cat([torch.tensor(b + [0.0] * (16 - len(b))) for b in blocks]).reshape(1, -1)
    qt = quantize_float(x, preset("NVFP4"))
    assert qt.global_scale is not None and qt.global_scale.item() == 1.0
    assert qt.scales.dtype == torch.float8_e4m3fn
    assert qt.scales.float().tolist() == [[448.0, 20.0, 20.0, 16.0, 1.0]]
    out = dequantize_float(qt).reshape(5, 16)
    assert out[0, :3].tolist() == [2688.0, -1344.0, 672.0]
    assert out[1, :3].tolist() == [120.0, 40.0, -30.0]
    assert out[2, :2].tolist() == [120.0, 0.0]
    assert out[3, :2].tolist() == [96.0, -96.0]
    assert (qt.values().abs() <= 6).all() and qt.values()[3, :2].tolist() == [6.0, -6.0]
    assert (out[4] == 0).all()
    # a general amax: global = amax / 2688 in fp32 (TensorRT-Model-Optimizer's weights_scaling_factor_2)
    y = x * 0.01
    g = quantize_float(y, preset("NVFP4")).global_scale
    assert g is not None and g.item() == (y.abs().max() / 2688.0).item()
    assert nvfp4_global_scale(torch.tensor(0.0)).item() == 1.0


def test_nvfp4_tiny_blocks_keep_a_nonzero_scale() -> None:
    x = torch.ones(1, 32)
    x[0, :16] = 1e4  # tensor amax: global = 1e4 / 2688 = 3.72, block scale 448
    x[0, 16:] = 1e-3  # raw block scale 1e-3 / (6 * 3.72) = 4.5e-5 < 2^-9: clamped, not cast to 0
    qt = quantize_float(x, preset("NVFP4"))
    assert qt.scales.float().tolist() == [[448.0, 2.0**-9]]
    out = dequantize_float(qt)
    assert torch.isfinite(out).all() and out[0, 16:].eq(0).all()  # 1e-3 / (2^-9 * 3.72) = 0.14 rounds to 0


def test_nvfp4_zero_tensor_and_global_override() -> None:
    qt = quantize_float(torch.zeros(4, 32), preset("NVFP4"))
    assert (dequantize_float(qt) == 0).all()
    x = torch.randn(4, 32)
    qt = quantize_float(x, preset("NVFP4"), global_amax=10.0)
    assert qt.global_scale is not None and qt.global_scale.item() == pytest.approx(10.0 / 2688.0)


def test_nvfp4_beats_per_tensor_fp4() -> None:
    torch.manual_seed(0)
    x = torch.randn(256, 256)
    nv = dequantize_float(quantize_float(x, preset("NVFP4")))
    plain = dequantize_float(quantize_float(x, preset("FP4_E2M1").replace(granularity="tensor", group_size=None)))
    mx = dequantize_float(quantize_float(x, preset("MXFP4")))
    err = {k: ((v - x).norm() / x.norm()).item() for k, v in {"nv": nv, "plain": plain, "mx": mx}.items()}
    assert err["nv"] < 0.105  # measured 0.0955 (blocks of 16, E4M3 scales)
    assert err["mx"] < 0.125  # measured 0.1148 (blocks of 32, power-of-two scales)
    assert err["plain"] > 0.12  # measured 0.1286 (one fp32 scale for all 65536 values)
    assert err["nv"] < err["mx"] < err["plain"]


# ------------------------------------------------------------------------------- dtypes, STE, spec
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("name", ["FP8_E4M3", "MXFP4", "NVFP4", "FP6_E3M2"])
def test_half_inputs_are_computed_in_fp32(dtype: torch.dtype, name: str) -> None:
    torch.manual_seed(3)
    x = torch.randn(8, 64).to(dtype)
    spec = preset(name)
    out = dequantize_float(quantize_float(x, spec))
    assert out.dtype == dtype and out.shape == x.shape
    assert torch.equal(out, dequantize_float(quantize_float(x.float(), spec)).to(dtype))
    assert torch.equal(round_to_format(x, E2M1), round_to_format(x.float(), E2M1))


def test_fake_quant_straight_through_gradient() -> None:
    torch.manual_seed(4)
    x = (torch.randn(4, 32) * 2).requires_grad_()
    spec = preset("MXFP4")
    y = fake_quant_float(x, spec)
    assert torch.equal(y.detach(), dequantize_float(quantize_float(x.detach(), spec)))
    (y * torch.arange(32.0)).sum().backward()
    assert x.grad is not None and torch.equal(x.grad, torch.arange(32.0).expand(4, 32))


def test_spec_errors_and_observer_override() -> None:
    x = torch.randn(4, 32)
    with pytest.raises(SpecError):
        quantize_float(x, preset("W8"))
    with pytest.raises(SpecError):
        quantize_float(x, preset("FP8_E4M3").replace(global_scale=True))
    with pytest.raises(SpecError):
        quantize_float(x, preset("FP8_E4M3").replace(symmetric=False))
    with pytest.raises(SpecError):
        quantize_float(x, preset("FP8_E4M3").replace(observer="mse"))
    spec = preset("FP8_E4M3").replace(observer="percentile")
    clip = torch.full((4,), 0.5)
    qt = quantize_float(x, spec, absmax=clip)
    assert torch.allclose(qt.scales, torch.full((4, 1), 0.5 / 448))
    assert dequantize_float(qt).abs().max().item() == 0.5  # clipped range saturates
    with pytest.raises(ValueError):
        quantize_float(x, spec, absmax=torch.ones(3))
    with pytest.raises(ValueError):
        encode(x, "e9m9")
