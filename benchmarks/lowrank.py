"""Low-rank factorization on smollm2-135m (issue 19): plain SVD, ASVD and SVD-LLM at a parameter budget of the
decoder's linear weights, and LoRC's correction of a GPTQ W3 g64 model.

Each row runs in its own process on the same calibration (128 random 512-token windows of WikiText-2
validation, seed 0) and evaluation (the first 10 WikiText-2 test windows of 2048).  The factorization rows are
the shipped step (``lowrank``: every decoder linear factorized so its two factors hold at most ``fraction`` of
its parameters); their size is the factors' values at fp32 relative to the dense linears.  The LoRC rows apply
``lowbit.core.lowrank.lorc_correction`` to each layer of the GPTQ model in this script (whitened by the dense
model's calibration Gram matrix, rank ``r``).  The row ``gptq-w3g64-lorc32`` is the user path: the shipped recipe
(GPTQ's ``lorc_rank`` option, whitened by each layer's GPTQ Hessian), saved (fake-quant), loaded back by lowbit
and evaluated; plain transformers' load of the same directory is compared on a probe.

    python benchmarks/lowrank.py [--only svd-80 svd-llm-80]

Writes ``results/lowrank.json`` and ``lowrank.md``; finished rows are kept.
"""

from __future__ import annotations

import argparse
import time

from _results import in_order, rows_main, table_lines, vs

MODEL = "smollm2-135m"
FACTOR_ROWS = {f"{w}-{p}": (w, p / 100) for p in (80, 90) for w in ("svd", "asvd", "svd-llm")}
LORC_ROWS = {"gptq-w3g64": 0, "gptq-w3g64+lorc-8": 8, "gptq-w3g64+lorc-32": 32}
RECIPE_ROWS = ["gptq-w3g64-lorc32"]
ORDER = ["dense", *FACTOR_ROWS, *LORC_ROWS, *RECIPE_ROWS]


def _grams(model, calib, batch_size: int = 8) -> dict:
    """Each decoder linear's input Gram matrix X^T X on the dense model."""
    import torch

    grams: dict = {}

    def hook(name):
        def fn(m, args, out):
            x = args[0].detach().reshape(-1, args[0].shape[-1]).double()
            grams[name] = grams.get(name, 0) + x.T @ x
        return fn

    handles = [m.register_forward_hook(hook(n)) for n, m in model.named_modules()
               if isinstance(m, torch.nn.Linear) and "lm_head" not in n]
    with torch.no_grad():
        for i in range(0, calib.shape[0], batch_size):
            model(calib[i:i + batch_size], use_cache=False)
    for h in handles:
        h.remove()
    return grams


def run_one(name: str, args: argparse.Namespace) -> dict:
    import torch

    from lowbit.data import get_calibration
    from lowbit.eval.perplexity import evaluate
    from lowbit.models.loading import load_model
    from lowbit.quantization import quantize

    model, tok = load_model(MODEL)
    calib = get_calibration("wikitext2", tok, nsamples=args.nsamples, seqlen=512, seed=0)
    ref = evaluate(model, tok, "wikitext2", "test", seqlen=2048, max_windows=1)
    row: dict = {"config": name, "fp32_eval_tokens_per_s": ref.tokens_per_s}
    t0 = time.perf_counter()
    if name in FACTOR_ROWS:
        whiten, fraction = FACTOR_ROWS[name]
        recipe = {"name": name, "methods": [{"method": "lowrank", "ignore": ["lm_head"],
                                             "options": {"fraction": fraction,
                                                         "whiten": "none" if whiten == "svd" else whiten}}]}
        report = quantize(model, recipe, calib, progress=False)
        row["bits_per_weight"] = report.bits_per_weight
        row["size_vs_dense"] = report.bits_per_weight / 32
    elif name in LORC_ROWS:
        from lowbit.core.lowrank import lorc_correction

        rank = LORC_ROWS[name]
        dense = {n: m.weight.detach().clone() for n, m in model.named_modules()
                 if isinstance(m, torch.nn.Linear) and "lm_head" not in n}
        grams = _grams(model, calib) if rank else {}
        report = quantize(model, "gptq-w3g64", calib, progress=False)
        extra = 0
        with torch.no_grad():
            for n, m in model.named_modules():
                if n in dense and rank:
                    f = lorc_correction(dense[n], m.weight, rank, grams[n])
                    m.weight.add_(f.product().to(m.weight.dtype))
                    extra += rank * sum(m.weight.shape)
        numel = sum(w.numel() for w in dense.values())
        row["bits_per_weight"] = report.bits_per_weight + 16 * extra / numel  # factors at fp16
        row["lorc_rank"] = rank
    elif name in RECIPE_ROWS:
        import tempfile

        from transformers import AutoModelForCausalLM

        from lowbit.quantization import save_quantized

        report = quantize(model, name, calib, progress=False)
        row["bits_per_weight"] = report.bits_per_weight
        probe = calib[:1, :64]
        with tempfile.TemporaryDirectory() as d, torch.no_grad():
            out, row["saved_as"] = save_quantized(model, tok, report, f"{d}/q")
            ref_logits = model(probe).logits
            model, _ = load_model(out)
            plain = AutoModelForCausalLM.from_pretrained(out).eval()
            row["plain_transformers_max_diff"] = float((plain(probe).logits - ref_logits).abs().max())
            del plain
    row["seconds"] = time.perf_counter() - t0
    res = evaluate(model, tok, "wikitext2", "test", seqlen=2048, max_windows=args.windows)
    row.update(perplexity=res.perplexity, windows=res.windows)
    return row


def _lines(rows: dict) -> list[str]:
    dense = rows.get("dense", {}).get("perplexity")
    body = []
    for name, r in in_order(rows, ORDER):
        bpw = f"{r['bits_per_weight']:.3f}" if "bits_per_weight" in r else "32"
        body.append([name, f"{r['perplexity']:.2f}", vs(r["perplexity"], dense),
                     bpw, f"{r['seconds']:.0f}", f"{r['fp32_eval_tokens_per_s']:.0f}"])
    caption = [f"# Low-rank factorization on {MODEL} (WikiText-2 test, first 10 x 2048 windows)", "",
               "svd / asvd / svd-llm-P: every decoder linear factorized, the factors holding at most P% of its parameters",
               "(bits/weight: the factors' fp32 values per dense weight). gptq-w3g64+lorc-r: LoRC's rank-r correction",
               "of each GPTQ W3 g64 layer's error, whitened by the dense model's calibration Gram matrix, factors at",
               "fp16 (bits/weight includes them), applied in the benchmark script. gptq-w3g64-lorc32: the shipped recipe",
               "(GPTQ option lorc_rank: 32, whitened by each layer's GPTQ Hessian), saved as fake-quant, loaded back and",
               "evaluated (time includes the save and load).",
               "time: the factorization / quantization step; ref tok/s: fp32 eval speed in the same process."]
    return table_lines(caption, ["config", "perplexity", "vs dense", "bits/weight", "time s", "ref tok/s"], body)


def main() -> None:
    rows_main(__file__, __doc__, "lowrank", ORDER, run_one, _lines, {"--nsamples": (int, 128), "--windows": (int, 10)})


if __name__ == "__main__":
    main()
