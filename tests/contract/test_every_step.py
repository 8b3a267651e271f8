"""Contract: every shipped recipe (so every registered method and transform) survives the whole user path
on a tiny model built from a config: quantize -> report as JSON -> save -> load -> evaluate -> export -> load.

What each step must keep: the saved checkpoint evaluates to the in-memory model's NLL, and its export
(fake-quant, the format every quantized layer fits) evaluates to it too.
"""

from __future__ import annotations

import json

import pytest
import torch

from lowbit.eval.perplexity import kv_cache_factory, window_metrics
from lowbit.export.codes import attach_codes
from lowbit.methods import METHODS
from lowbit.models.loading import load_model
from lowbit.quantization import quantize, save_quantized
from lowbit.recipe import load_recipe, shipped_recipes
from lowbit.transforms import TRANSFORMS

RECIPES = sorted(shipped_recipes())
WINDOW = 192  # longer than KIVI's 128 full-precision recent tokens, so the KV recipes quantize something


def _tiny_llama() -> torch.nn.Module:
    """2 blocks, hidden 128 (groups of 64 and 128 divide every linear), 4 heads of 32, GQA 2."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=256, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512)
    return LlamaForCausalLM(cfg).eval()


def _nll(model: torch.nn.Module, windows: torch.Tensor) -> float:
    new_cache, _ = kv_cache_factory(model, None, windows.shape[1])
    m = window_metrics(model, windows, new_cache=new_cache)
    return m["nll_sum"] / m["count"]


def test_every_registered_step_is_in_a_shipped_recipe():
    used_methods, used_transforms = set(), set()
    for name in RECIPES:
        d = load_recipe(name).to_dict()
        used_methods |= {e["method"] for e in d["methods"]}
        used_transforms |= {t["transform"] for t in d.get("transforms", [])}
    assert set(METHODS) <= used_methods, set(METHODS) - used_methods
    assert set(TRANSFORMS) <= used_transforms, set(TRANSFORMS) - used_transforms


@pytest.mark.parametrize("recipe", RECIPES)
def test_recipe_survives_quantize_save_load_eval_export(recipe, tmp_path):
    model = _tiny_llama()
    calib = torch.randint(0, 256, (4, 64), generator=torch.Generator().manual_seed(0))  # 256: static ranges' minimum
    windows = torch.randint(0, 256, (1, WINDOW), generator=torch.Generator().manual_seed(1))
    report = quantize(model, recipe, calib, batch_size=4, progress=False)
    json.dumps(report.to_dict(), allow_nan=True)  # --json and lowbit_summary.json print exactly this
    assert report.layers and all(l["bits_per_weight"] > 0 for l in report.layers)
    model.lowbit_kv_cache = load_recipe(recipe).kv_cache
    expected = _nll(model, windows)

    out, fmt = save_quantized(model, None, report, tmp_path / "q")
    loaded, _ = load_model(out, require_tokenizer=False)
    # packed int kernels and fp32 reassociation: measured |diff| <= 2e-6 nats on these tiny models
    assert _nll(loaded, windows) == pytest.approx(expected, abs=1e-4), fmt
    assert json.loads((out / "lowbit_summary.json").read_text())["recipe"]["name"] == recipe

    attach_codes(loaded, out)
    exported, _ = save_quantized(loaded, None, None, tmp_path / "fq", "fake-quant")
    again, _ = load_model(exported, require_tokenizer=False)
    assert _nll(again, windows) == pytest.approx(expected, abs=1e-4), f"{fmt} -> fake-quant"
