"""AWQ: exact scale folding, lower error than RTN, the pipeline end to end, clear errors."""

from __future__ import annotations

import copy

import pytest
import torch

from lowbit.errors import LowbitError
from lowbit.methods import get_method
from lowbit.methods.awq import AWQ, subsample_inputs
from lowbit.models.folding import fold_scales
from lowbit.methods.base import LayerStats
from lowbit.arch import ScaleGroup, architecture_of, decoder_blocks
from lowbit.models.capture import capture_block_inputs, run_block
from lowbit.pipeline.sequential import BlockContext
from lowbit.quantization import quantize
from lowbit.recipe import load_recipe, shipped_recipes
from lowbit.spec import QuantSpec

W4G64 = QuantSpec(type="int", bits=4, granularity="group", group_size=64)
W3G32 = QuantSpec(type="int", bits=3, granularity="group", group_size=32)


@pytest.fixture(autouse=True)
def _one_thread():
    """Small matrices: one thread avoids OpenMP hand-off latency on busy machines (4x faster here)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _salient(model: torch.nn.Module) -> torch.nn.Module:
    """Give the random tiny model what real LLMs have: uneven norm gains and a few outlier channels."""
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for block in decoder_blocks(model):
            for norm in (block.input_layernorm, block.post_attention_layernorm):
                norm.weight.copy_(torch.exp(0.5 * torch.randn(norm.weight.shape, generator=g)))
                norm.weight[:3] *= 15.0
    return model


def _tiny(kv_heads: int) -> torch.nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=kv_heads, max_position_embeddings=256)
    return _salient(LlamaForCausalLM(cfg).eval())


def _linears(block: torch.nn.Module, prefix: str) -> dict[str, torch.nn.Module]:
    return {prefix + n: m for n, m in block.named_modules() if isinstance(m, torch.nn.Linear)}


@torch.no_grad()
def _prepare_all(model, method, calib):
    """Run only AWQ's prepare_block (search + fold, no rounding) on every block, fp propagation."""
    blocks = decoder_blocks(model)
    root = architecture_of(model).blocks
    inputs = capture_block_inputs(model, blocks[0], calib, 4)
    for i, block in enumerate(blocks):
        prefix = f"{root}.{i}."
        method.prepare_block(BlockContext(model, block, i, prefix, inputs, _linears(block, prefix)))
        inputs = run_block(block, inputs)


@pytest.mark.parametrize("kv_heads", [2, 4])  # grouped-query (v->o skipped) and multi-head (v->o folded)
def test_scale_folding_is_exact(kv_heads, tiny_llama, tiny_calib):
    model = _salient(tiny_llama) if kv_heads == 2 else _tiny(kv_heads)
    with torch.no_grad():
        ref = model(tiny_calib).logits
    method = get_method("awq", W3G32, {"clip": False, "grid": 10})
    _prepare_all(model, method, tiny_calib)
    with torch.no_grad():
        out = model(tiny_calib).logits
    diff = (out - ref).abs().max().item()
    assert diff < 1e-4, diff  # measured: 7.0e-7 (kv 2), 1.1e-6 (kv 4); logits up to ~0.8
    done = [r for r in method.records if r.skipped is None]
    skipped = [r for r in method.records if r.skipped is not None]
    assert {r.prev for r in done} >= {"input_layernorm", "post_attention_layernorm", "mlp.up_proj"}
    assert any(r.alpha > 0 for r in done)  # the salient channels do get scaled
    assert all(r.loss <= r.loss_rtn for r in done)  # alpha = 0 is RTN and is in the grid
    if kv_heads == 2:
        assert [r.prev for r in skipped] == ["self_attn.v_proj"] * 2 and "grouped-query" in skipped[0].skipped
    else:
        assert not skipped and sum(r.prev == "self_attn.v_proj" for r in done) == 2


def test_scale_folding_is_exact_on_opt(tiny_calib):
    """OPT: LayerNorms with bias, v_proj -> out_proj with biases, fc1 -> ReLU -> fc2 all fold exactly."""
    from transformers import OPTConfig, OPTForCausalLM

    torch.manual_seed(0)
    cfg = OPTConfig(vocab_size=256, hidden_size=64, ffn_dim=128, num_hidden_layers=2, num_attention_heads=4,
                    word_embed_proj_dim=64, max_position_embeddings=64)
    model = OPTForCausalLM(cfg).eval()
    with torch.no_grad():
        for p in model.parameters():  # random biases / gains instead of zeros / ones
            if p.dim() == 1:
                p.copy_(torch.randn_like(p) * 0.3 + (1.0 if p.abs().max() > 0.5 else 0.0))
        ref = model(tiny_calib).logits
    method = get_method("awq", W3G32, {"clip": False, "grid": 10})
    _prepare_all(model, method, tiny_calib)
    with torch.no_grad():
        diff = (model(tiny_calib).logits - ref).abs().max().item()
    assert diff < 1e-4, diff  # measured: 1.8e-7
    assert len(method.records) == 8 and all(r.skipped is None for r in method.records)


@pytest.mark.parametrize("arch", ["phi", "qwen3", "gemma"])
def test_scale_folding_other_architectures(arch, tiny_calib):
    """Phi (parallel block inspected whole; fc1 -> GELU -> fc2 cannot fold), Qwen3 (q/k norms), Gemma (1 + w norms)."""
    import warnings

    import transformers as tf

    kw = dict(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
              max_position_embeddings=64)
    if arch != "phi":
        kw.update(num_key_value_heads=4, head_dim=16)
    cfg, cls = {"phi": (tf.PhiConfig, tf.PhiForCausalLM), "qwen3": (tf.Qwen3Config, tf.Qwen3ForCausalLM),
                "gemma": (tf.GemmaConfig, tf.GemmaForCausalLM)}[arch]
    torch.manual_seed(0)
    model = cls(cfg(**kw)).eval()
    with torch.no_grad():
        for n, p in model.named_parameters():
            if p.dim() == 1 and "norm" in n:
                p.add_(torch.randn_like(p) * 0.3)
        ref = model(tiny_calib).logits
    method = get_method("awq", W3G32, {"clip": False, "grid": 4})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        _prepare_all(model, method, tiny_calib)
    with torch.no_grad():
        diff = (model(tiny_calib).logits - ref).abs().max().item()
    assert diff < 1e-4, diff  # measured: 2.7e-7 (phi), 3.0e-7 (qwen3), 4.8e-7 (gemma)
    for r in method.records:
        if arch == "phi" and r.prev == "mlp.fc1":
            assert r.alpha == 0.0 or "not an exact equivalence" in r.skipped  # measured: skipped in block 0
        else:
            assert r.skipped is None, r


def test_inexact_fold_is_undone_and_recorded(tiny_calib, monkeypatch):
    """A wrong table entry (q/k/v fed by the post-attention norm) is caught, undone and reported."""
    import lowbit.methods.awq as awq_mod

    wrong = (ScaleGroup("post_attention_layernorm", ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
                        "self_attn"),
             ScaleGroup("mlp.up_proj", ("mlp.down_proj",), "mlp.down_proj"))
    monkeypatch.setattr(awq_mod, "scale_groups", lambda model: wrong)
    model = _tiny(2)
    with torch.no_grad():
        ref = model(tiny_calib).logits
    method = get_method("awq", W3G32, {"clip": False, "grid": 4})
    with pytest.warns(UserWarning, match="not an exact equivalence"):
        _prepare_all(model, method, tiny_calib)
    with torch.no_grad():
        diff = (model(tiny_calib).logits - ref).abs().max().item()
    assert diff < 1e-4, diff  # measured: 2.7e-7 (the good up->down folds stay, the wrong ones are undone)
    bad = [r for r in method.records if r.prev == "post_attention_layernorm"]
    assert len(bad) == 2 and all("not an exact equivalence" in r.skipped for r in bad)
    assert all(r.skipped is None for r in method.records if r.prev == "mlp.up_proj")


def test_bf16_model_runs(tiny_calib):
    model = _tiny(4).to(torch.bfloat16)
    rep = quantize(model, {"methods": [{"method": "awq", "spec": W3G32.to_dict(), "options": {"grid": 4}}]},
                   tiny_calib, progress=False)
    assert len(rep.layers) == 14 and all(l["output_error"] < 0.5 for l in rep.layers)  # measured: max 0.032
    assert next(model.parameters()).dtype == torch.bfloat16


def test_fold_scales_norm_variants():
    """LayerNorm with bias, Gemma's (1 + weight) RMSNorm and a linear producer fold exactly."""
    from transformers.models.gemma.modeling_gemma import GemmaRMSNorm

    torch.manual_seed(0)
    x = torch.randn(10, 16)
    s = torch.rand(16) * 3 + 0.2
    for prev in (torch.nn.LayerNorm(16), GemmaRMSNorm(16), torch.nn.Linear(8, 16)):
        with torch.no_grad():
            for p in prev.parameters():
                p.copy_(torch.randn_like(p))
        lin = torch.nn.Linear(16, 12)
        inp = x if not isinstance(prev, torch.nn.Linear) else x[:, :8]
        with torch.no_grad():
            ref = lin(prev(inp))
            fold_scales(prev, [lin], s)
            diff = (lin(prev(inp)) - ref).abs().max().item()
        assert diff < 1e-4, (type(prev).__name__, diff)  # measured: 3.6e-7, 2.4e-7, 8.3e-7


def _block_errors(model, calib, spec, opts, n_blocks=None, batch_size=8):
    """Relative output error of each quantized block (fp inputs) for RTN and AWQ."""
    blocks = decoder_blocks(model)
    inputs = capture_block_inputs(model, blocks[0], calib, batch_size)
    errs = {"rtn": [], "awq": []}
    with torch.no_grad():
        for i in range(n_blocks or len(blocks)):
            ref = run_block(blocks[i], inputs)
            for name, o in (("rtn", {}), ("awq", opts)):
                block = copy.deepcopy(blocks[i])
                layers = _linears(block, f"model.layers.{i}.")
                method = get_method(name, spec, o)
                method.prepare_block(BlockContext(model, block, i, f"model.layers.{i}.", inputs, layers))
                for n, m in layers.items():
                    m.weight.data.copy_(method.quantize_layer(n, m, LayerStats()).weight)
                out = run_block(block, inputs)
                num = sum((a - r).pow(2).sum().item() for a, r in zip(out.hidden, ref.hidden))
                den = sum((r - h).pow(2).sum().item() for r, h in zip(ref.hidden, inputs.hidden))
                errs[name].append(num / den)  # relative to the block's own update of the residual stream
            inputs = ref
    return errs


@pytest.mark.parametrize("duo", [False, True])
def test_awq_beats_rtn_on_tiny_blocks(duo, tiny_calib):
    model = _tiny(4)
    errs = _block_errors(model, tiny_calib, W3G32, {"grid": 10, "duo_scaling": duo})
    # measured (W3 g32): rtn [0.205, 0.151], awq [0.060, 0.092], awq duo scaling [0.058, 0.076]
    for r, a in zip(errs["rtn"], errs["awq"]):
        assert a < 0.85 * r, errs


@pytest.mark.model
def test_awq_beats_rtn_on_real_blocks(smollm, data_dir):
    from lowbit.data import get_calibration

    model, tok = smollm
    calib = get_calibration("wikitext2", tok, 4, 512, 0)
    # Scaling alone, per block: stable to the last digit across thread counts here.
    # measured (W4 g64, 4 x 512 calibration, 1024 search tokens, grid 10, no clip):
    # rtn [1.07e-2, 1.66e-2], awq [8.99e-3, 1.15e-2] (ratios 0.84, 0.69)
    errs = _block_errors(model, calib, W4G64, {"grid": 10, "n_tokens": 1024, "clip": False}, n_blocks=2,
                         batch_size=4)
    for r, a in zip(errs["rtn"], errs["awq"]):
        assert a < 0.92 * r, errs
    # Scaling + clipping, summed over the blocks.  Which alpha wins a near-tie of the search depends on
    # float rounding (thread count, CPU), and the down_proj scales also change how up_proj rounds, so a
    # single block can swing (seen on one CI machine with 1024 search tokens: block 0 awq/rtn 1.18, sum
    # 0.76); searching on all the evaluated tokens with the default grid keeps the sum well below RTN.
    # measured (2048 search tokens, grid 20): awq [6.43e-3, 7.75e-3] -> sum ratio 0.52
    errs = _block_errors(model, calib, W4G64, {"grid": 20, "n_tokens": 2048}, n_blocks=2, batch_size=4)
    assert sum(errs["awq"]) < 0.8 * sum(errs["rtn"]), errs


def test_pipeline_end_to_end(tiny_llama, tiny_calib):
    model = _salient(tiny_llama)
    ref_model = copy.deepcopy(model)
    rtn_model = copy.deepcopy(model)
    spec = W3G32.to_dict()
    rep = quantize(model, {"name": "awq-t", "methods": [{"method": "awq", "spec": spec, "options": {"grid": 10}}]},
                   tiny_calib, progress=False)
    rtn = quantize(rtn_model, {"name": "rtn-t", "methods": [{"method": "rtn", "spec": spec}]}, tiny_calib,
                   progress=False)
    assert len(rep.layers) == 14 and all(l["method"] == "awq" for l in rep.layers)
    assert rep.bits_per_weight == pytest.approx(rtn.bits_per_weight) == pytest.approx(3 + 32 / 32)  # scales folded
    assert all(l["output_error"] is not None for l in rep.layers)
    assert rep.mean_output_error() < rtn.mean_output_error()  # measured: 0.0155 vs 0.0513
    mods = dict(model.named_modules())
    q = mods["model.layers.0.self_attn.q_proj"].quantized.details
    o = mods["model.layers.0.self_attn.o_proj"].quantized.details
    down = mods["model.layers.1.mlp.down_proj"].quantized.details
    assert q["awq_scales"].shape == (64,) and q["clip_range"] is None  # q/k are not clipped
    assert o["awq_scales"] is None and o["clip_range"] is not None  # v->o skipped under GQA, still clipped
    assert down["awq_scales"].shape == (128,) and down["quantized"].q.shape == (64, 128)
    with torch.no_grad():
        ref = ref_model(tiny_calib).logits
        e_awq = (model(tiny_calib).logits - ref).pow(2).mean().item()
        e_rtn = (rtn_model(tiny_calib).logits - ref).pow(2).mean().item()
    assert e_awq < e_rtn  # measured: 3.6e-3 vs 8.0e-3 logit MSE


def test_clipping_never_worse_than_minmax():
    torch.manual_seed(0)
    w = torch.randn(32, 128)
    w[torch.rand_like(w) < 0.01] *= 8  # a few outlier weights that min-max ranges chase
    x = torch.randn(600, 128)
    for spec in (W3G32, W3G32.replace(symmetric=False, signed=False), QuantSpec(type="int", bits=4)):
        method = AWQ(spec=spec)
        lo, hi = method._clip_ranges(w, x)
        xs = x[:512]
        clipped = quantize_err(w, xs, spec, lo, hi)
        plain = quantize_err(w, xs, spec, None, None)
        assert clipped < plain, (spec, clipped / plain)  # measured ratio: 0.71 (W3 g32), 0.90 (asym), 0.75 (W4 channel)
        assert bool((lo <= 0).all() and (hi >= 0).all())


def quantize_err(w, x, spec, lo, hi):
    from lowbit.core.quant import dequantize, quantize as q

    kw = {} if lo is None else {"xmin": lo, "xmax": hi}
    wq = dequantize(q(w, spec, **kw))
    return (x @ (w - wq).T).pow(2).sum().item()


def test_subsample_keeps_whole_windows():
    from lowbit.models.capture import BlockInputs

    h = [torch.randn(4, 32, 8), torch.randn(4, 32, 8)]
    kw = [{"attention_mask": torch.ones(4, 1, 32, 32), "position_embeddings": (torch.ones(1, 32, 2),) * 2}] * 2
    sub = subsample_inputs(BlockInputs(h, kw), 100)
    assert len(sub) == 1 and sub.hidden[0].shape == (4, 32, 8)
    sub = subsample_inputs(BlockInputs(h, kw), 40)
    assert sub.hidden[0].shape[0] == 2 and sub.kwargs[0]["attention_mask"].shape[0] == 2
    assert sub.kwargs[0]["position_embeddings"][0].shape == (1, 32, 2)


def test_model_without_scale_groups_is_a_clear_error(tiny_calib):
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

    torch.manual_seed(0)
    cfg = GPTNeoXConfig(vocab_size=256, hidden_size=64, num_hidden_layers=1, num_attention_heads=2,
                        intermediate_size=128, max_position_embeddings=64)
    model = GPTNeoXForCausalLM(cfg).eval()
    with pytest.raises(LowbitError, match="no norm -> linear mapping is known for model type 'gpt_neox'"):
        quantize(model, "awq-w4g64", tiny_calib, progress=False)


def test_options_and_shipped_recipes():
    with pytest.raises(LowbitError, match="invalid options for method 'awq'"):
        get_method("awq", W4G64, {"grid": 0})
    with pytest.raises(LowbitError, match="invalid options for method 'awq'"):
        get_method("awq", W4G64, {"max_shrink": 1.0})
    with pytest.raises(LowbitError, match="has no option"):
        get_method("awq", W4G64, {"alpha": 0.5})
    names = {n for n in shipped_recipes() if n.startswith("awq-") and not n.startswith("awq-gptq-")}  # AWQ alone
    assert names == {f"awq-w{b}g{g}{a}" for b in (3, 4) for g in (64, 128) for a in ("", "-asym")}
    for b in (3, 4):
        for g in (64, 128):
            for a, sym in (("", True), ("-asym", False)):
                spec = load_recipe(f"awq-w{b}g{g}{a}").entries[0].spec
                assert (spec.bits, spec.group_size, spec.symmetric) == (b, g, sym)


def test_capture_shares_an_input_only_between_linears_fed_that_very_tensor():
    """Linears fed the same tensor share one stored copy; a buffer rewritten in place between two
    linears (same address, shape and stride) and a tensor freed mid-forward whose address is reused
    must not be mistaken for it (a stale memo gave gate/up the attention input in about one run in
    three on smollm2-135m, and AWQ then picked other scales)."""
    from lowbit.methods.awq import _Capture

    class Block(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a1, self.a2, self.b, self.c = (torch.nn.Linear(8, 8) for _ in range(4))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            buf = torch.empty_like(x)
            h = buf.copy_(x * 2)
            y = self.a1(h) + self.a2(h)  # fed the same tensor: one copy
            h = buf.copy_(x * 3)  # the same buffer rewritten in place
            y = y + self.b(h)
            return y + self.c(torch.exp(x))  # a new tensor, perhaps at a freed address

    block = Block()
    x = torch.randn(4, 8)
    with _Capture(block, set(), {"a1": block.a1, "a2": block.a2, "b": block.b, "c": block.c}) as cap:
        block(x)
        cap.end_batch()
    assert cap.inputs["a1"] is cap.inputs["a2"] and torch.equal(cap.inputs["a1"], x * 2)
    assert torch.equal(cap.inputs["b"], x * 3)
    assert torch.equal(cap.inputs["c"], torch.exp(x))
