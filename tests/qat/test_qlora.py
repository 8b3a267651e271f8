"""QLoRA: an NF4 + double-quant base at 4.127 bits, peft adapters trained on it, saved and loaded by plain peft."""

from __future__ import annotations

import copy

import pytest
import torch

peft = pytest.importorskip("peft")

from lowbit.qat.qlora import FrozenQuantLinear, add_lora, quantize_base  # noqa: E402
from lowbit.qat.train import train_next_token  # noqa: E402
from lowbit.spec import preset  # noqa: E402

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def _linears(model):
    return [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and n.startswith("model.layers.")]


def test_base_is_nf4_double_quant_at_4127_bits():
    """4-bit codes + 8-bit absmax per 64 + an fp32 scale per 256 absmax and one fp32 offset: QLoRA's 4.127."""
    model = torch.nn.ModuleDict({"up": torch.nn.Linear(1024, 256, bias=False)})
    bpw = quantize_base(model, ["up"])
    assert bpw == pytest.approx(4 + 8 / 64 + (16 * 32 + 32) / (256 * 1024), abs=1e-12)  # 4.12708
    assert isinstance(model["up"], FrozenQuantLinear) and not list(model["up"].parameters())


def test_adapters_train_and_load_in_plain_peft(tiny_llama, tmp_path):
    fp_base = copy.deepcopy(tiny_llama)
    quantize_base(tiny_llama, _linears(tiny_llama))
    model = add_lora(tiny_llama, TARGETS, r=4, alpha=8)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    text = torch.arange(64).repeat(8, 1) % 50
    r = train_next_token(model, text, steps=15, lr=1e-2, batch_size=4)
    assert r.losses[-1] < 0.95 * r.losses[0]  # measured 5.53 -> 4.89 (15 steps)
    model.save_pretrained(tmp_path / "adapter")
    plain = peft.PeftModel.from_pretrained(fp_base, tmp_path / "adapter")  # plain peft, full-precision base
    ours = {n.split("base_model.model.")[-1]: p for n, p in model.named_parameters() if "lora_" in n}
    theirs = {n.split("base_model.model.")[-1]: p for n, p in plain.named_parameters() if "lora_" in n}
    assert ours.keys() == theirs.keys()
    assert all(torch.equal(ours[k], theirs[k]) for k in ours)


def test_frozen_base_backward_matches_dense_and_keeps_no_weight():
    """The input gradient through the NF4 base equals the dense one; autograd saves no dequantized weight."""
    torch.manual_seed(0)
    lin = torch.nn.Linear(128, 64)
    q = FrozenQuantLinear.from_linear(lin, preset("NF4"))
    x = torch.randn(3, 128, requires_grad=True)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        y = q(x)
    y.square().sum().backward()
    dense = q.dequantized_weight()
    x2 = x.detach().clone().requires_grad_(True)
    torch.nn.functional.linear(x2, dense, lin.bias).square().sum().backward()
    assert torch.allclose(x.grad, x2.grad, atol=1e-5)  # measured max |diff| ~5e-7
    assert not any(t.shape == dense.shape for t in saved)
