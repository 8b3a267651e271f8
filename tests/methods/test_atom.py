"""Atom: outlier channels at 8 bits beside 4-bit groups, for weights (GPTQ) and inputs."""

from __future__ import annotations

import torch

from lowbit.activations import input_quantizers
from lowbit.activations.quantizer import SplitActQuantizer
from lowbit.core.affine import fake_quant_int
from lowbit.methods.atom import atom_gptq
from lowbit.quantization import quantize
from lowbit.spec import QuantSpec

G4 = QuantSpec(type="int", bits=4, granularity="group", group_size=16, dynamic=True, padding="pad")
T8 = QuantSpec(type="int", bits=8, granularity="token", dynamic=True)


def test_split_quantizer_matches_naive_parts():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(20, 40, generator=g)
    out_idx = torch.tensor([3, 17, 30])
    x[:, out_idx] *= 30
    q = SplitActQuantizer(G4, T8, out_idx, 40)
    got = q(x)
    mask = torch.zeros(40, dtype=torch.bool)
    mask[out_idx] = True
    assert torch.equal(got[:, mask], fake_quant_int(x[:, mask], T8))
    assert torch.equal(got[:, ~mask], fake_quant_int(x[:, ~mask], G4))  # 37 columns: groups 16, 16, 5
    plain = fake_quant_int(x, G4)
    assert (got - x).pow(2).sum() < (plain - x).pow(2).sum() / 10  # outliers no longer set the 4-bit scales


def test_atom_gptq_keeps_outlier_columns_at_8_bits():
    g = torch.Generator().manual_seed(1)
    w = torch.randn(32, 64, generator=g)
    x = torch.randn(512, 64, generator=g)
    x[:, [5, 9]] *= 20
    h = 2 / 512 * x.T @ x
    spec = QuantSpec(type="int", bits=4, granularity="group", group_size=16, symmetric=False, signed=False)
    wq = atom_gptq(w, h, spec, torch.tensor([5, 9]))
    err_out = (w[:, [5, 9]] - wq[:, [5, 9]]).abs().max()
    err_rest = (w - wq).abs().max()
    assert err_out < err_rest / 4  # 8-bit columns: measured 0.0068 vs 0.21
    y_err = ((x @ (w - wq).T).pow(2).sum() / (x @ w.T).pow(2).sum()).item()
    assert y_err < 0.005  # measured 4.2e-4


def test_atom_on_tiny_model(tiny_llama, tiny_calib):
    report = quantize(tiny_llama, {"name": "a", "methods": [{"method": "atom", "spec": {
        "type": "int", "bits": 4, "granularity": "group", "group_size": 16, "symmetric": False, "signed": False},
        "activations": {"type": "int", "bits": 4, "granularity": "group", "group_size": 16, "dynamic": True},
        "options": {"outliers": 8}}]}, tiny_calib, batch_size=4, progress=False)
    qs = input_quantizers(tiny_llama)
    assert len(qs) == 14 and all(isinstance(q, SplitActQuantizer) for q in qs.values())
    assert all(int(q.outlier_mask.sum()) == 8 for q in qs.values())
    # per row: 56 (down_proj: 120) channels at 4 bits + an fp32 scale and 4-bit zero per group of 16 (the last
    # partial), 8 outliers at 8 bits + an fp32 scale: 464 / 64 = 7.25 and 864 / 128 = 6.75 bits per weight
    by_cols = {64: 7.25, 128: 6.75}
    assert all(abs(l["bits_per_weight"] - by_cols[l["shape"][1]]) < 1e-9 for l in report.layers)
