"""Per-layer sensitivity and automatic mixed precision on smollm2-135m.

1. ``sens``: per-layer sensitivity of all 210 decoder linears at each candidate format (w2g64, w3g64,
   w4g64, w8 per channel; symmetric, fp32 scales), RTN one layer at a time, mean KL(fp || quantized)
   on the first 4 calibration windows cut to 128 tokens, for calibration seeds 0 and 1 (WikiText-2
   validation, so nothing is chosen on the test text); Spearman rho between the seeds and between
   measured KL and the Hessian-diagonal proxy.
2. ``rows``: GPTQ (act-order, static groups) uniform w3g64 (3.5 bpw) and w4g64 (4.5 bpw) against
   mixed precision at targets between them (formats picked by the seed-0 sensitivity, knapsack
   allocation), and one allocation from the proxy instead of the measured KL; perplexity on the
   first 10 WikiText-2 test windows of 2048; calibration 128 x 512 WikiText-2 validation, seed 0.

Every piece runs in its own process; finished pieces are kept in ``results/mixed_precision.json``, so
re-running resumes (``--redo NAME ...`` measures some again).  ``--quick`` checks the whole path in
about 2 minutes (RTN, two formats, a 16-token sensitivity window, one 512-token evaluation window)
and writes ``results/mixed_precision_quick.*`` instead.  On cores other jobs also use, run with
``OMP_NUM_THREADS=1``: two OpenMP threads fighting for them made the sensitivity passes 4x slower.

    python benchmarks/mixed_precision.py
    python benchmarks/mixed_precision.py --targets 3.5 3.75 4.0 4.25
    python benchmarks/mixed_precision.py --quick
    python benchmarks/mixed_precision.py --device cuda   # results/mixed_precision_cuda.*
"""

from __future__ import annotations

import argparse
import json
import sys
import time

from _results import RESULTS, run_child, table_lines, write_results

FULL = {"method": "gptq", "candidates": [[2, 64], [3, 64], [4, 64], [8, None]], "sens_windows": 4,
        "sens_seqlen": 128, "nsamples": 128, "seqlen": 512, "eval_windows": 10, "eval_seqlen": 2048,
        "targets": [3.5, 4.0], "proxy_targets": [4.0], "seeds": [0, 1]}
QUICK = {"method": "rtn", "candidates": [[3, 64], [4, 64]], "sens_windows": 1, "sens_seqlen": 16,
         "nsamples": 4, "seqlen": 128, "eval_windows": 1, "eval_seqlen": 512, "targets": [4.0],
         "proxy_targets": [4.0], "seeds": [0, 1]}
MODEL = "smollm2-135m"


def _setup(cfg: dict):
    from lowbit.analysis.candidates import as_candidates
    from lowbit.data import get_calibration
    from lowbit.models.loading import load_model

    model, tok = load_model(MODEL, device=cfg.get("device", "cpu"))
    calib = get_calibration("wikitext2", tok, cfg["nsamples"], cfg["seqlen"], 0)
    return model, tok, calib, as_candidates([tuple(c) for c in cfg["candidates"]])


def run_sensitivity(cfg: dict, seed: int) -> dict:
    """The sensitivity result of one calibration seed (the windows ``mixed_precision_recipe`` uses)."""
    from lowbit.analysis.mixed import eval_ids
    from lowbit.analysis.sensitivity import measure_sensitivity
    from lowbit.data import get_calibration

    model, tok, _, cands = _setup(cfg)
    calib = get_calibration("wikitext2", tok, cfg["nsamples"], cfg["seqlen"], seed)
    ids = eval_ids(calib, cfg["sens_windows"], cfg["sens_seqlen"])
    src = f"wikitext2 validation, seed {seed}: first {cfg['sens_windows']} windows x {cfg['sens_seqlen']} tokens"
    return measure_sensitivity(model, ids, cands, name=MODEL, source=src, progress=sys.stderr.isatty())


def run_row(cfg: dict, name: str, sens: dict | None) -> dict:
    """Quantize (uniform or mixed) and evaluate one configuration in this process."""
    from lowbit.analysis.mixed import mixed_precision_recipe
    from lowbit.eval.memory import peak_rss_mb
    from lowbit.eval.perplexity import evaluate
    from lowbit.quantization import quantize

    model, tok, calib, cands = _setup(cfg)
    row: dict = {"config": name}
    t0 = time.perf_counter()
    if name == "fp32":
        row["bits_per_weight"] = 32.0
    else:
        if name.startswith("uniform-"):
            recipe = f"{cfg['method']}-{name.split('-', 1)[1]}"  # shipped recipe, e.g. gptq-w3g64 (sym, g64)
        else:
            kind, target = name.rsplit("-", 1)
            recipe, alloc = mixed_precision_recipe(
                model, tok, calib, cfg["method"], target_bpw=float(target), options=cands, sensitivity=sens,
                loss="proxy" if kind == "mixed-proxy" else "kl", eval_windows=cfg["sens_windows"],
                eval_seqlen=cfg["sens_seqlen"])
            row.update(target_bpw=float(target), counts=alloc["counts"], predicted_loss=alloc["predicted_loss"],
                       lower_bound=alloc["lower_bound"], solver=alloc["solver"], loss=alloc["loss"])
        report = quantize(model, recipe, calib, progress=False)
        row.update(bits_per_weight=report.bits_per_weight, recipe=report.recipe["name"])
    row["quant_seconds"] = time.perf_counter() - t0
    res = evaluate(model, tok, "wikitext2", "test", seqlen=cfg["eval_seqlen"], max_windows=cfg["eval_windows"])
    row.update(perplexity=res.perplexity, windows=res.windows, peak_rss_mb=peak_rss_mb())
    return row


def row_names(cfg: dict) -> list[str]:
    return (["fp32", "uniform-w3g64", "uniform-w4g64"] + [f"mixed-{t:.2f}" for t in cfg["targets"]]
            + [f"mixed-proxy-{t:.2f}" for t in cfg["proxy_targets"]])


def _interp(rows: dict, b: float) -> tuple[float, float] | None:
    """Perplexity of uniform 3-bit and 4-bit interpolated at ``b`` bpw: linearly, and linearly in log
    perplexity (NLL)."""
    import math

    lo, hi = rows.get("uniform-w3g64"), rows.get("uniform-w4g64")
    if not lo or not hi:
        return None
    t = (b - lo["bits_per_weight"]) / (hi["bits_per_weight"] - lo["bits_per_weight"])
    lin = lo["perplexity"] + t * (hi["perplexity"] - lo["perplexity"])
    geo = math.exp(math.log(lo["perplexity"]) + t * (math.log(hi["perplexity"]) - math.log(lo["perplexity"])))
    return lin, geo


def _sens_lines(data: dict) -> list[str]:
    sens = data.get("sensitivity", {})
    s0 = sens.get("seed0")
    if not s0:
        return []
    labels = [c["label"] for c in s0["candidates"]]
    times = ", ".join(f"seed {k[4:]}: {v['eval']['seconds']:.0f} s" for k, v in sens.items())
    lines = table_lines(
        [f"Sensitivity: {len(s0['layers'])} linears x {len(labels)} formats, RTN one layer at a time, mean KL over "
         f"{s0['eval']['tokens']} tokens ({s0['eval']['source']}); {times}.",
         "Spearman rho of the per-layer ranking between calibration seeds 0 and 1, and between measured KL and",
         f"the proxy {s0['proxy_definition']} (seed 0):"],
        ["format", "rho seeds (KL)", "rho KL vs proxy"],
        [[lab, _f((s0.get("spearman_seeds_by_option") or {}).get(lab)), _f(s0["spearman_proxy_by_option"].get(lab))]
         for lab in labels])
    if s0.get("spearman_seeds_proxy") is not None:
        lines += ["", f"The proxy's own ranking between seeds: rho {s0['spearman_seeds_proxy']:.3f}."]
    lab = f"w{s0['bits']}" + (f"g{s0['group_size']}" if s0["group_size"] else "")
    lines += table_lines([f"Per layer type at {lab} (seed 0): mean KL, and the type's share of the summed KL:"],
                         ["type", "layers", "mean KL", "median KL", "share of KL"],
                         [[t, str(int(r["count"])), f"{r['mean_kl']:.4g}", f"{r['median_kl']:.4g}",
                           f"{100 * r['share_kl']:.1f}%"]
                          for t, r in sorted(s0["by_type"].items(), key=lambda kv: -kv[1]["mean_kl"])])
    top = sorted(s0["layers"], key=lambda l: -l["kl"])[:10]
    lines += table_lines([f"The 10 most sensitive layers at {lab} (seed 0):"], ["layer", *labels],
                         [[l["name"], *(f"{l['options'][x]['kl']:.4g}" for x in labels)] for l in top])
    return lines


def _f(v: float | None) -> str:
    return "n/a" if v is None else f"{v:.3f}"


def write_tables(data: dict, name: str) -> None:
    cfg, rows = data["settings"], data.get("rows", {})
    fp = rows.get("fp32", {}).get("perplexity")
    where = "" if cfg.get("device", "cpu") == "cpu" else f", measured on {cfg['device']}"
    quick = " (quick check, not a result)" if "quick" in name else ""
    lines = [f"# Mixed precision on {MODEL}{where}{quick}", "",
             f"{cfg['method'].upper()} per layer at the format a knapsack allocation picks from "
             f"{', '.join('w%d' % b + ('g%d' % g if g else '') for b, g in cfg['candidates'])} (symmetric, fp32 scales)",
             "to minimise the summed per-layer KL within the bits-per-weight budget (KL assumed additive over layers).",
             f"Perplexity: WikiText-2 test, first {cfg['eval_windows']} windows of {cfg['eval_seqlen']}. Calibration: "
             f"{cfg['nsamples']} x {cfg['seqlen']} WikiText-2 validation, seed 0. Bits per weight over the 210 quantized",
             "linears (codes, scales and zeros counted; embeddings / lm_head not quantized)."]
    body = []
    for n, r in rows.items():
        counts = ", ".join(f"{k}: {v}" for k, v in r.get("counts", {}).items() if v)
        rel = f"{100 * (r['perplexity'] / fp - 1):+.1f}%" if fp else ""
        body.append([n, f"{r['bits_per_weight']:.4f}", f"{r['perplexity']:.3f}", rel, counts or "",
                     f"{r['quant_seconds']:.0f}"])
    lines += table_lines(["Quant s: wall time of allocation (sensitivity reused) and quantization; the sensitivity",
                          "itself is measured once per seed (below)."],
                         ["config", "bits/weight", "perplexity", "vs fp32", "layers per format", "quant s"], body)
    claims = []
    for n, r in rows.items():
        both = _interp(rows, r["target_bpw"]) if n.startswith("mixed") else None
        if both is None:
            continue
        lin, geo = both
        what = "proxy" if n.startswith("mixed-proxy") else "measured-KL"
        claims.append(f"- {n} ({what} allocation, target {r['target_bpw']} bpw, achieved {r['bits_per_weight']:.3f}): "
                      f"lower perplexity than the linear interpolation of uniform 3-bit and 4-bit at the target: "
                      f"{'YES' if r['perplexity'] < lin else 'NO'} ({r['perplexity']:.3f} vs {lin:.3f}; "
                      f"log-linear interpolation {geo:.3f}: {'below' if r['perplexity'] < geo else 'not below'})")
    if claims:
        lines += ["", "Claim: mixed precision at budget B beats the linear interpolation of uniform 3-bit and 4-bit at B",
                  "(perplexity is convex in bits here, so the log-linear interpolation is the harder baseline):", *claims]
    write_results(name, data, lines + _sens_lines(data))



def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="a few-minute check of the whole path (RTN, tiny sets)")
    parser.add_argument("--targets", nargs="*", type=float, help="mixed-precision targets in bpw (default 3.5 4.0)")
    parser.add_argument("--device", default="cpu", help="where to measure (cpu, cuda); cuda writes *_cuda.*")
    parser.add_argument("--redo", nargs="*", default=[], help="measure these pieces again (seed0, seed1, row names)")
    parser.add_argument("--sens-one", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--row-one", help=argparse.SUPPRESS)
    args = parser.parse_args()
    name = ("mixed_precision_quick" if args.quick else "mixed_precision") + ("" if args.device == "cpu" else "_cuda")
    path = RESULTS / f"{name}.json"
    cfg = dict(QUICK if args.quick else FULL) | {"device": args.device}
    if args.targets:
        cfg["targets"] = args.targets
    if args.sens_one is not None:
        print(json.dumps(run_sensitivity(cfg, args.sens_one)))
        return
    if args.row_one:
        stored = json.loads(path.read_text()).get("sensitivity", {}).get("seed0") if path.exists() else None
        print(json.dumps(run_row(cfg, args.row_one, stored)))
        return
    data: dict = json.loads(path.read_text()) if path.exists() else {}
    same = {k: v for k, v in cfg.items() if k not in ("targets", "proxy_targets")}
    if data and {k: data["settings"].get(k) for k in same} != same:
        print(f"{path.name} was measured with other settings; starting over", file=sys.stderr)
        data = {}
    data["settings"] = cfg
    flags = (["--quick"] if args.quick else []) + ["--device", args.device]
    sens = data.setdefault("sensitivity", {})
    for seed in cfg["seeds"]:
        key = f"seed{seed}"
        if key in sens and key not in args.redo:
            continue
        r = run_child(__file__, ["--sens-one", str(seed), *flags])
        if r is None:
            return  # the rows need the seed-0 sensitivity
        sens[key] = r
        print(f"sensitivity {key}: {r['eval']['seconds']:.0f} s, rho(KL, proxy) {_f(r['spearman_proxy'])}", flush=True)
        if "seed0" in sens and "seed1" in sens:
            from lowbit.analysis.sensitivity import seed_agreement

            seed_agreement(sens["seed0"], sens["seed1"])
        write_tables(data, name)
    rows = data.setdefault("rows", {})
    for row in row_names(cfg):
        if row in rows and row not in args.redo:
            continue
        r = run_child(__file__, ["--row-one", row, *flags])
        if r:
            rows[row] = r
            print(f"{row:18s} bpw {r['bits_per_weight']:.4f}  ppl {r['perplexity']:.3f}  {r['quant_seconds']:.0f} s",
                  flush=True)
            write_tables(data, name)


if __name__ == "__main__":
    main()
