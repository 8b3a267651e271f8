"""QuantSpec: presets, JSON round trip, and clear errors for impossible specs."""

from __future__ import annotations

import pytest

from lowbit.spec import PRESETS, QuantSpec, SpecError, preset

REQUIRED = ["W8", "W4_G128", "W3_G128", "W2_G64", "NF4", "FP8_E4M3", "FP8_E5M2", "FP6_E3M2", "FP6_E2M3",
            "FP4_E2M1", "MXFP8", "MXFP6", "MXFP4", "NVFP4", "BINARY", "TERNARY"]


@pytest.mark.parametrize("name", REQUIRED)
def test_required_presets_exist_and_round_trip(name):
    spec = preset(name)
    assert QuantSpec.from_json(spec.to_json()) == spec
    assert preset(name.lower().replace("_", "-")) == spec


def test_all_presets_round_trip():
    for spec in PRESETS.values():
        assert QuantSpec.from_dict(spec.to_dict()) == spec


def test_int_ranges():
    assert (QuantSpec(bits=4).qmin, QuantSpec(bits=4).qmax) == (-8, 7)
    s = QuantSpec(bits=4, symmetric=False, signed=False)
    assert (s.qmin, s.qmax) == (0, 15)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (dict(bits=0), "1 <= bits <= 8"),
        (dict(bits=9), "1 <= bits <= 8"),
        (dict(type="posit"), "unknown type 'posit'"),
        (dict(granularity="group"), "needs a positive integer group_size"),
        (dict(granularity="channel", group_size=64), "only meaningful with granularity 'group'"),
        (dict(granularity="block"), r"needs block=\(rows, cols\)"),
        (dict(type="float", fmt="e4m3", bits=4), "has 8 bits"),
        (dict(type="float", fmt="e9m9", bits=8), "float type needs fmt"),
        (dict(type="codebook", fmt="nf4", bits=3), "uses 4 bits"),
        (dict(bits=1, symmetric=True), "no positive level"),
        (dict(type="float", fmt="e2m1", bits=4, symmetric=False), "signed and symmetric"),
        (dict(observer="kl", granularity="channel"), "per-tensor range"),
        (dict(observer="magic"), "unknown observer"),
        (dict(padding="wrap"), "padding must be one of"),
        (dict(granularity="channel", dynamic=True), "dynamic quantization"),
    ],
)
def test_impossible_specs_are_rejected(kwargs, message):
    with pytest.raises(SpecError, match=message):
        QuantSpec(**kwargs)


def test_unknown_preset_and_field():
    with pytest.raises(SpecError, match="unknown preset"):
        preset("W5_G7")
    with pytest.raises(SpecError, match="unknown field"):
        QuantSpec.from_dict({"bits": 4, "colour": "red"})
