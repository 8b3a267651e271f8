"""Quantized KV cache on smollm2-135m: perplexity, cache bytes, greedy agreement, long generation, memory.

Sections (``--only`` picks some; finished rows are kept, so re-running resumes):

* ``ppl``: WikiText-2 test perplexity (first ``--windows`` windows of 2048) where attention reads the
  keys and values back from the quantized cache, with the cache's bytes per token (all 30 layers)
  against the fp32 cache;
* ``gen``: greedy continuations (20 tokens) of 512-token WikiText-2 prompts with each cache against
  the fp32 cache: share of prompts whose 20 tokens all agree, and of agreeing tokens before the
  first difference;
* ``long``: the fp32 model's 256-token greedy continuation of a 512-token prompt, decoded token by
  token through each quantized cache: mean KL(fp32 || quantized) and top-1 agreement per step;
* ``mem``: peak RSS of a long generation (batch 4, 1024-token prompts, 512 new tokens) in a fresh
  process per cache, and the cache's bytes at the end.

    python benchmarks/kv_cache.py
    python benchmarks/kv_cache.py --only ppl --windows 10
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time

from _results import RESULTS, claim_lines, table_lines, write_results

PPL_SETTINGS = ["none", "KV8", "KV4", "KV2", "KIVI4", "KIVI2", "KVQUANT4", "KVQUANT3", "KVQUANT2"]
GEN_SETTINGS = ["KV8", "KV4", "KIVI4", "KIVI2", "KVQUANT4"]
LONG_SETTINGS = ["KV8", "KV4", "KIVI4", "KIVI2", "KVQUANT4"]
MEM_SETTINGS = ["none", "KV8", "KIVI4", "KIVI2"]
FP32_BYTES_PER_TOKEN = 30 * 2 * 3 * 64 * 4  # layers x (keys, values) x kv heads x head_dim x 4 bytes = 46080
CLAIMS = [
    ("KV8", "KV8 within 0.5% of fp32", lambda r: r <= 0.5),
    ("KIVI4", "KV4 KIVI within 2% of fp32", lambda r: r <= 2.0),
]


def _model():
    from lowbit.models.loading import load_model

    return load_model("smollm2-135m")


def run_ppl(setting: str, windows: int) -> dict:
    from lowbit.eval.perplexity import evaluate

    model, tok = _model()
    r = evaluate(model, tok, "wikitext2", "test", seqlen=2048, max_windows=windows, kv_cache=setting)
    return {"setting": setting, "perplexity": r.perplexity, "windows": r.windows,
            "bytes_per_token": r.kv_bytes_per_token or float(FP32_BYTES_PER_TOKEN), "seconds": r.seconds}


def _prompts(tok, n: int, length: int):
    import torch

    from lowbit.data.corpora import load_text
    from lowbit.data.windows import tokenize_text

    ids = tokenize_text(tok, load_text("wikitext2", "test"))
    step = ids.numel() // n
    return [ids[i * step:i * step + length].unsqueeze(0).to(torch.long) for i in range(n)]


def run_gen(settings: list[str], prompts: int = 8, new: int = 20) -> dict:
    from lowbit.kvcache import QuantizedKVCache

    model, tok = _model()
    rows = {}
    ps = _prompts(tok, prompts, 512)
    gen = dict(max_new_tokens=new, do_sample=False, pad_token_id=tok.eos_token_id)
    refs = [model.generate(p, **gen)[0, p.shape[1]:] for p in ps]
    for s in settings:
        full, prefix = 0, 0
        for p, ref in zip(ps, refs):
            out = model.generate(p, past_key_values=QuantizedKVCache(model, s), **gen)[0, p.shape[1]:]
            same = (out == ref).long()
            full += int(bool(same.all()))
            prefix += int(same.cumprod(0).sum())
        rows[s] = {"prompts": len(ps), "all_20_agree": full / len(ps), "tokens_before_first_difference": prefix / len(ps)}
        print(f"gen {s:10s} {rows[s]}", flush=True)
    return rows


def run_long(settings: list[str], prompt_len: int = 512, new: int = 256) -> dict:
    import torch

    from lowbit.kvcache import QuantizedKVCache

    model, tok = _model()
    p = _prompts(tok, 1, prompt_len)[0]
    with torch.no_grad():
        cont = model.generate(p, max_new_tokens=new, do_sample=False, pad_token_id=tok.eos_token_id)[0, p.shape[1]:]
        ids = torch.cat([p[0], cont]).unsqueeze(0)
        ref_logp = torch.log_softmax(model(ids).logits[0, prompt_len - 1:-1].float(), -1)
        rows = {}
        for s in settings:
            cache = QuantizedKVCache(model, s)
            out = model(ids[:, :prompt_len], past_key_values=cache, use_cache=True)
            logits = [out.logits[0, -1]]
            for t in range(prompt_len, ids.shape[1] - 1):  # decode step by step, as generate does
                logits.append(model(ids[:, t:t + 1], past_key_values=cache, use_cache=True).logits[0, -1])
            logp = torch.log_softmax(torch.stack(logits).float(), -1)
            kl = (ref_logp.exp() * (ref_logp - logp)).sum(-1)
            rows[s] = {"steps": logp.shape[0], "mean_kl": float(kl.mean()), "max_kl": float(kl.max()),
                       "top1_agreement": float((logp.argmax(-1) == ref_logp.argmax(-1)).float().mean())}
            print(f"long {s:10s} {rows[s]}", flush=True)
    return rows


def run_mem_one(setting: str, batch: int = 4, prompt_len: int = 1024, new: int = 512) -> dict:
    import torch

    from lowbit.eval.memory import peak_rss_mb
    from lowbit.kvcache import QuantizedKVCache

    model, tok = _model()
    ps = torch.cat(_prompts(tok, batch, prompt_len))
    base = peak_rss_mb()
    kw = {} if setting == "none" else {"past_key_values": QuantizedKVCache(model, setting)}
    t0 = time.perf_counter()
    out = model.generate(ps, max_new_tokens=new, min_new_tokens=new, do_sample=False, pad_token_id=tok.eos_token_id,
                         return_dict_in_generate=True, **kw)
    seconds = time.perf_counter() - t0
    cache = out.past_key_values
    tokens = batch * (prompt_len + new - 1)
    nbytes = cache.nbytes() if hasattr(cache, "nbytes") else FP32_BYTES_PER_TOKEN * tokens
    return {"setting": setting, "batch": batch, "prompt": prompt_len, "new": new, "cache_mb": nbytes / 2**20,
            "peak_rss_mb": peak_rss_mb(), "rss_before_mb": base, "seconds": seconds}


def write_tables(data: dict, windows: int) -> None:
    ppl = data.get("ppl", {})
    fp = ppl.get("none", {}).get("perplexity")
    lines = ["# Quantized KV cache on smollm2-135m", "",
             f"Perplexity: WikiText-2 test, first {windows} windows of 2048; each window prefilled into a fresh cache and",
             "attention reading keys and values back from it. Bytes per token: everything the cache holds (codes,",
             "fp16 scales/minima, fp16 outliers with int32 positions, full-precision sink and residual tokens in the",
             "model's fp32) over all 30 layers, averaged over the windows; fp32 cache: 46080.", "",
             "| KV cache | perplexity | vs fp32 | bytes / token | vs fp32 cache |", "| --- | ---: | ---: | ---: | ---: |"]
    for s, r in ppl.items():
        rel = f"{100 * (r['perplexity'] / fp - 1):+.2f}%" if fp else ""
        lines.append(f"| {s if s != 'none' else 'fp32'} | {r['perplexity']:.3f} | {rel} | {r['bytes_per_token']:.0f} | "
                     f"{r['bytes_per_token'] / FP32_BYTES_PER_TOKEN:.3f} |")
    if fp:
        lines += ["", "Claims (from the issue), read off the rows above:"]
        lines += claim_lines(ppl, fp, CLAIMS)
        if "KIVI2" in ppl and "KV2" in ppl:
            a, b = ppl["KV2"]["perplexity"], ppl["KIVI2"]["perplexity"]
            lines.append(f"- KIVI-2 far better than naive 2-bit: {'yes' if b < a / 2 else 'NO'} ({b:.2f} vs {a:.2f})")
    if data.get("gen"):
        lines += table_lines(
            ["Greedy generation, 20 new tokens after 512-token WikiText-2 prompts, against the fp32 cache:"],
            ["KV cache", "prompts", "all 20 tokens agree", "mean tokens before the first difference"],
            [[s, str(r["prompts"]), f"{100 * r['all_20_agree']:.0f}%", f"{r['tokens_before_first_difference']:.1f}"]
             for s, r in data["gen"].items()])
    if data.get("long"):
        lines += table_lines(
            ["Long generation: the fp32 model's 256-token greedy continuation of a 512-token prompt, decoded step",
             "by step through each cache:"],
            ["KV cache", "steps", "mean KL(fp32 ‖ quantized)", "max KL", "top-1 agreement"],
            [[s, str(r["steps"]), f"{r['mean_kl']:.4f}", f"{r['max_kl']:.3f}", f"{100 * r['top1_agreement']:.1f}%"]
             for s, r in data["long"].items()])
    if data.get("mem"):
        lines += table_lines(
            ["Memory of a long generation (batch 4, 1024-token prompts + 512 new tokens, one process each):"],
            ["KV cache", "cache MiB at the end", "peak RSS MiB", "RSS after loading MiB", "seconds"],
            [[s if s != "none" else "fp32", f"{r['cache_mb']:.1f}", f"{r['peak_rss_mb']:.0f}", f"{r['rss_before_mb']:.0f}",
              f"{r['seconds']:.0f}"] for s, r in data["mem"].items()])
    write_results("kv_cache", data, lines)


def _subprocess(args: list[str]) -> dict | None:
    proc = subprocess.run([sys.executable, __file__, *args], capture_output=True, text=True)
    if proc.returncode != 0:
        print(f"{args}: failed\n{proc.stderr[-2000:]}", file=sys.stderr)
        return None
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", nargs="*", choices=["ppl", "gen", "long", "mem"], help="run only these sections")
    parser.add_argument("--settings", nargs="*", help="re-run only these KV settings")
    parser.add_argument("--windows", type=int, default=10)
    parser.add_argument("--ppl-one", help=argparse.SUPPRESS)
    parser.add_argument("--mem-one", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.ppl_one:
        print(json.dumps(run_ppl(args.ppl_one, args.windows)))
        return
    if args.mem_one:
        print(json.dumps(run_mem_one(args.mem_one)))
        return
    path = RESULTS / "kv_cache.json"
    data: dict = json.loads(path.read_text()) if path.exists() else {}
    sections = args.only or ["ppl", "gen", "long", "mem"]
    pick = (lambda all_: [s for s in all_ if not args.settings or s in args.settings])
    if "ppl" in sections:
        rows = data.setdefault("ppl", {})
        for s in pick(PPL_SETTINGS):
            if s in rows and not args.settings:
                continue
            r = _subprocess(["--ppl-one", s, "--windows", str(args.windows)])
            if r:
                rows[s] = r
                print(f"ppl {s:10s} {r['perplexity']:.3f}", flush=True)
                write_tables(data, args.windows)
    if "gen" in sections:
        data.setdefault("gen", {}).update(run_gen(pick(GEN_SETTINGS)))
        write_tables(data, args.windows)
    if "long" in sections:
        data.setdefault("long", {}).update(run_long(pick(LONG_SETTINGS)))
        write_tables(data, args.windows)
    if "mem" in sections:
        rows = data.setdefault("mem", {})
        for s in pick(MEM_SETTINGS):
            r = _subprocess(["--mem-one", s])
            if r:
                rows[s] = r
                write_tables(data, args.windows)


if __name__ == "__main__":
    main()
