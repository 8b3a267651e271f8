"""Every architecture lowbit knows survives quantize -> save -> load -> eval with the same logits.

Tiny random models of each family in ``lowbit.arch.ARCHITECTURES`` (q/k/v biases, tied
heads, q/k norms, fused projections, OPT, GPT-2's Conv1D) are RTN-quantized to 4 bits, written
as compressed-tensors and as fake-quant, loaded back with ``lowbit.load_model`` and run.
"""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

from lowbit.errors import LowbitError
from lowbit.arch import ARCHITECTURES
from lowbit.models.loading import load_model
from lowbit.quantization import quantize, save_quantized

pytestmark = pytest.mark.usefixtures("one_thread")

RECIPE = {"name": "rtn-w4g32", "methods": [{"method": "rtn", "spec": {
    "type": "int", "bits": 4, "granularity": "group", "group_size": 32, "symmetric": True, "signed": True}}]}
TOL = 1e-5  # measured 0.0 for every family and format, lowbit's loader and plain transformers alike


@pytest.fixture(autouse=True)
def _untimed_kernels(monkeypatch):
    """QuantLinear times its kernels at the first call; the tiny models do not need it (speed only)."""
    pytest.importorskip("compressed_tensors")  # transformers reads the compressed-tensors outputs with it
    from lowbit.packed import kernels

    monkeypatch.setattr(kernels, "time_call", lambda fn, x, repeats=5: 0.0)  # ties: the reference kernel


def _logits(model: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(ids).logits


@pytest.mark.parametrize("family", sorted(ARCHITECTURES))
def test_quantized_checkpoint_loads_back_with_the_same_logits(family, tmp_path, tiny):
    ids = torch.randint(0, tiny.vocab, (2, 24), generator=torch.Generator().manual_seed(0))
    model, tok = load_model(tiny.save(family, tmp_path / "fp"))
    quantize(model, RECIPE, ids, progress=False)
    ref = _logits(model, ids)
    for fmt in ("compressed-tensors", "fake-quant"):
        if family == "gpt2" and fmt == "compressed-tensors":  # transformers / vLLM cannot read Conv1D packed
            with pytest.raises(LowbitError, match="Conv1D layer .* write fake-quant"):
                save_quantized(model, tok, None, tmp_path / fmt, fmt)
            assert not (tmp_path / fmt).exists()
            continue
        out, written = save_quantized(model, tok, None, tmp_path / fmt, fmt)
        assert written == fmt
        back, _ = load_model(out)
        assert back.config.architectures == [type(model).__name__]
        assert (_logits(back, ids) - ref).abs().max().item() <= TOL
        theirs = AutoModelForCausalLM.from_pretrained(out)  # what any transformers reads (GPT-2: Conv1D layout)
        assert (_logits(theirs, ids) - ref).abs().max().item() <= TOL


def test_bias_checkpoint_evaluates_through_the_cli(run_cli, tmp_path, text_file, tiny):
    """The tester's repro: a Qwen2 (q/k/v biases) quantized and saved by the CLI, then evaluated."""
    src = tiny.save("qwen2", tmp_path / "qwen2")
    out = tmp_path / "q"
    code, _, err = run_cli("quantize", str(src), "--method", "rtn", "--bits", "4", "--group-size", "32",
                           "--calib", str(text_file), "--nsamples", "4", "--seqlen", "32", "--out", str(out))
    assert code == 0, err
    code, stdout, err = run_cli("eval", str(out), "--dataset", str(text_file), "--max-windows", "1", "--seqlen", "64")
    assert code == 0, err
    assert "perplexity" in stdout
