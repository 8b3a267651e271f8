"""Streamed evaluation: block-at-a-time perplexity equals the in-memory evaluation, and what it cannot read is
refused with one line."""

from __future__ import annotations

import pytest
import torch

from lowbit.stream.evaluate import evaluate_streamed, sliced_nll


def test_sliced_nll_is_cross_entropy():
    g = torch.Generator().manual_seed(0)
    h, head, bias = torch.randn(7, 16, generator=g), torch.randn(50, 16, generator=g), torch.randn(50, generator=g)
    targets = torch.randint(0, 50, (7,), generator=g)
    ref = torch.nn.functional.cross_entropy(h @ head.T + bias, targets, reduction="sum").item()
    assert sliced_nll(h, head, targets, bias, rows=8) == pytest.approx(ref, rel=1e-6)  # measured 2e-8


def test_streamed_perplexity_equals_the_in_memory_one(small_model_dir, data_dir):
    from lowbit.eval.perplexity import evaluate
    from lowbit.models.loading import load_model

    model, tok = load_model(small_model_dir)
    ref = evaluate(model, tok, "wikitext2", "test", seqlen=128, max_windows=3, data_dir=str(data_dir))
    got = evaluate_streamed(str(small_model_dir), tok, "wikitext2", "test", seqlen=128, max_windows=3,
                            data_dir=str(data_dir))
    assert got.windows == ref.windows == 3 and got.tokens == ref.tokens
    assert got.perplexity == pytest.approx(ref.perplexity, rel=1e-5)  # softmax summed by vocabulary slices


def test_cli_streamed_eval_and_its_refusals(run_cli, small_model_dir, data_dir, tmp_path, clean_error):
    code, out, err = run_cli("eval", str(small_model_dir), "--streamed", "--seqlen", "128", "--max-windows", "2",
                             "--data-dir", str(data_dir))
    assert code == 0, err
    assert "perplexity" in out
    clean_error(*run_cli("eval", str(small_model_dir), "--streamed", "--reference", str(small_model_dir))[::2],
                "--reference")
    code, _, err = run_cli("quantize", str(small_model_dir), "--recipe", "rtn-w4g64", "--kv-cache", "KIVI4",
                           "--out", str(tmp_path / "kv"), "--nsamples", "2", "--seqlen", "64")
    assert code == 0, err
    clean_error(*run_cli("eval", str(tmp_path / "kv"), "--streamed")[::2], "KV cache")


@pytest.mark.parametrize("recipe, fmt", [("rtn-w4g64", "compressed-tensors"), ("w8a8-smoothquant", "compressed-tensors"),
                                         ("w8a8-smoothquant", "fake-quant")])
def test_streamed_perplexity_of_quantized_checkpoints(small_model_dir, data_dir, tmp_path, recipe, fmt):
    """Packed layers are built from their stored codes while their block runs; a fake-quant checkpoint's input
    quantizers (lowbit_activations.json) are applied: the in-memory evaluation of the same checkpoint."""
    from lowbit.data.calibration import get_calibration
    from lowbit.eval.perplexity import evaluate
    from lowbit.models.loading import load_model
    from lowbit.quantization import quantize, save_quantized

    model, tok = load_model(small_model_dir)
    calib = get_calibration("wikitext2", tok, nsamples=4, seqlen=64)
    report = quantize(model, recipe, calib, batch_size=2, progress=False)
    out, written = save_quantized(model, tok, report, tmp_path / "q", fmt)
    assert written == fmt
    back, _ = load_model(out)
    ref = evaluate(back, tok, "wikitext2", "test", seqlen=128, max_windows=2, data_dir=str(data_dir))
    got = evaluate_streamed(str(out), tok, "wikitext2", "test", seqlen=128, max_windows=2, data_dir=str(data_dir))
    assert got.perplexity == pytest.approx(ref.perplexity, rel=1e-5)  # measured <= 1e-6 relative (softmax slices)
