"""The architecture matrix: every model family through every step family, on tiny random configs.

Each cell either works (the step runs, the logits stay finite; the packed cell reloads with the same logits) or
is refused with one clear ``LowbitError`` that the table below names; anything else fails.  ``README.md`` holds
the same table between ``<!-- arch-matrix -->`` markers; after a change, print it with
``python tests/models/test_arch_matrix.py`` and paste it there (a test compares them).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from lowbit.errors import LowbitError

pytestmark = pytest.mark.usefixtures("one_thread")

FAMILIES = ["llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3", "phi3", "mixtral", "qwen2_moe",
            "qwen3_moe"]
CELLS = ["rtn", "gptq", "awq", "smoothquant", "quarot", "kv-cache", "packed", "gguf"]
MOE = ("mixtral", "qwen2_moe", "qwen3_moe")
LLAMA_LAYOUT = ("llama", "mistral", "qwen2", "qwen3")
W4 = {"type": "int", "bits": 4, "granularity": "group", "group_size": 32, "symmetric": True, "signed": True}

# (family, cell) -> what the refusal says; every other cell must work
REFUSED: dict[tuple[str, str], str] = {
    **{(f, "quarot"): "QuaRot's rotation mapping is known for" for f in FAMILIES if f not in LLAMA_LAYOUT},
    **{(f, "kv-cache"): "KV-cache quantization knows the attention layout" for f in FAMILIES
       if f not in LLAMA_LAYOUT},
    ("mistral", "kv-cache"): "sliding-window attention is not supported by the quantized KV cache",
    **{(f, "gguf"): "GGUF export supports model types gemma, gemma2, llama" for f in FAMILIES
       if f not in ("llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "phi3")},
}
WHY = {  # the table's footnotes, by refusal
    "QuaRot's rotation mapping is known for": "QuaRot rotates Llama-layout blocks only (plain RMSNorm, rotate-half RoPE)",
    "KV-cache quantization knows the attention layout": "the quantized KV cache knows the Llama attention layout only",
    "sliding-window attention is not supported by the quantized KV cache": "sliding-window caches are not quantized",
    "GGUF export supports model types gemma, gemma2, llama": "GGUF export writes llama, mistral, qwen2, qwen3, "
                                                             "phi3, gemma and gemma2 (gemma3 and MoE files: "
                                                             "not yet)",
}
NOTES = ["MoE families (mixtral, qwen2_moe, qwen3_moe): the experts, fused by transformers into 3-D parameters, "
         "are run as one linear per expert while quantizing, so each is calibrated on the tokens routed to it "
         "(counts in the summary's `experts`; an expert no token reached is rounded without data and named); "
         "routers stay in full precision unless a recipe names them; fake-quant checkpoints keep transformers' "
         "layout, compressed-tensors ones hold one packed linear per expert."]


def _recipe(method: str) -> dict:
    return {"name": method, "methods": [{"method": method, "spec": W4, "ignore": ["lm_head"]}]}


def _logits(model: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(ids).logits


def _quantized(recipe):
    def cell(model, tok, ids, tmp):
        from lowbit.quantization import quantize

        report = quantize(model, recipe, ids, batch_size=2, progress=False)
        assert torch.isfinite(_logits(model, ids)).all()
        assert report.layers
        if model.config.model_type in MOE:
            assert report.extra["experts"]["tokens"] and "full_precision_experts" not in report.extra
    return cell


def _kv_cache(model, tok, ids, tmp):
    from lowbit.kvcache import QuantizedKVCache

    cache = QuantizedKVCache(model, "KV4")
    with torch.no_grad():
        out = model.generate(ids[:1], max_new_tokens=4, do_sample=False, past_key_values=cache)
    assert out.shape[1] == ids.shape[1] + 4


def _packed(model, tok, ids, tmp):
    from lowbit.models.loading import load_model
    from lowbit.quantization import quantize, save_quantized

    quantize(model, _recipe("rtn"), ids, batch_size=2, progress=False)
    out, _ = save_quantized(model, tok, None, tmp / "ct", "compressed-tensors")
    back, _ = load_model(out)
    assert (_logits(back, ids) - _logits(model, ids)).abs().max().item() <= 1e-5  # measured 0.0 for every family


def _gguf(model, tok, ids, tmp):
    from lowbit.export.gguf import export_gguf
    from lowbit.quantization import quantize

    quantize(model, _recipe("rtn"), ids, batch_size=2, progress=False)
    export_gguf(model, tok, tmp / "m.gguf", "Q4_0")
    assert (tmp / "m.gguf").stat().st_size > 0


RUN = {"rtn": _quantized(_recipe("rtn")), "gptq": _quantized(_recipe("gptq")), "awq": _quantized(_recipe("awq")),
       "smoothquant": _quantized("w8a8-smoothquant"), "quarot": _quantized("w4a4-quarot-rtn"), "kv-cache": _kv_cache,
       "packed": _packed, "gguf": _gguf}


@pytest.mark.parametrize("cell", CELLS)
@pytest.mark.parametrize("family", FAMILIES)
def test_cell(family, cell, tiny, tmp_path):
    from lowbit.models.loading import load_model

    model, tok = load_model(tiny.save(family, tmp_path / "fp"))
    ids = torch.randint(0, tiny.vocab, (4, 24), generator=torch.Generator().manual_seed(0))
    refusal = REFUSED.get((family, cell))
    if refusal is None:
        RUN[cell](model, tok, ids, tmp_path)
    else:
        with pytest.raises(LowbitError, match=refusal.replace("(", r"\(").replace(")", r"\)")):
            RUN[cell](model, tok, ids, tmp_path)


@pytest.mark.parametrize("family", FAMILIES)
def test_scale_groups_fold_without_changing_the_block(family, tiny, tmp_path):
    """Every scale group of the architecture table is a true producer -> consumers pair: folding random scales
    across it leaves the block's output unchanged (what AWQ and SmoothQuant rely on)."""
    from lowbit.arch import architecture_of, decoder_blocks, scale_groups
    from lowbit.models.capture import block_output, capture_block_inputs
    from lowbit.models.folding import fold_problem, fold_scales
    from lowbit.models.loading import load_model

    model, _ = load_model(tiny.save(family, tmp_path / "fp"))
    ids = torch.randint(0, tiny.vocab, (2, 16), generator=torch.Generator().manual_seed(0))
    block = decoder_blocks(model)[0]
    inputs = capture_block_inputs(model, block, ids, 2)
    with torch.no_grad():
        before = block_output(block(inputs.hidden[0], **inputs.kwargs[0]))
    linears = {n: m for n, m in block.named_modules() if isinstance(m, torch.nn.Linear)}
    folded = 0
    g = torch.Generator().manual_seed(1)
    for group in scale_groups(model):
        if fold_problem(block, group, linears, "the test") is not None:
            continue  # e.g. v -> o under grouped-query attention: skipped by the methods as well
        width = linears[group.linears[0]].in_features
        fold_scales(block.get_submodule(group.prev), [linears[n] for n in group.linears],
                    torch.rand(width, generator=g) + 0.5)
        folded += 1
    with torch.no_grad():
        after = block_output(block(inputs.hidden[0], **inputs.kwargs[0]))
    assert folded >= 1, architecture_of(model)
    assert (after - before).abs().max().item() <= 1e-4 * before.abs().max().item()  # measured <= 3e-7 relative


def table() -> str:
    """The matrix as markdown (the contract above)."""
    marks = {}
    for why in WHY:
        marks.setdefault(why, f"[{len(marks) + 1}]")
    lines = ["| family | " + " | ".join(CELLS) + " |", "| --- |" + " :---: |" * len(CELLS)]
    for f in FAMILIES:
        row = [marks[REFUSED[(f, c)]] if (f, c) in REFUSED else "yes" for c in CELLS]
        lines.append(f"| {f} | " + " | ".join(row) + " |")
    lines += ["", "yes: runs, logits finite (packed: reloads with the same logits). Refused with a clear error:"]
    lines += [f"{mark} {WHY[why]}" for why, mark in marks.items()]
    lines += [""] + NOTES
    return "\n".join(lines)


def test_readme_holds_this_table():
    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    start, end = "<!-- arch-matrix -->\n", "\n<!-- /arch-matrix -->"
    assert start in readme and end in readme, "README.md lacks the arch-matrix markers"
    held = readme.split(start, 1)[1].split(end, 1)[0]
    assert held == table(), "README's architecture matrix is stale: paste `python tests/models/test_arch_matrix.py`"


if __name__ == "__main__":
    print(table())
