"""Throughput of the quantization core: quantize + dequantize of a 4096 x 4096 fp32 tensor.

Writes ``benchmarks/results/core.json`` and ``benchmarks/results/core.md``.  Run on an idle
machine (timings are best-of-N wall times):

    python benchmarks/core.py [--repeats 10] [--size 4096]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path

import torch

from lowbit.core.metrics import sqnr_db
from lowbit.core.quant import dequantize, quantize, storage_bits
from lowbit.spec import preset

CASES = [("int4 g128 (W4_G128)", "W4_G128"), ("int8 per-channel (W8)", "W8"), ("NF4 (g64, double quant)", "NF4"),
         ("FP8 E4M3 per-channel", "FP8_E4M3"), ("MXFP4", "MXFP4"), ("NVFP4", "NVFP4")]
TARGET_GBPS = 1.0  # issue 3: int and fp8 paths at least 1 GB/s on 2 cores
RESULTS = Path(__file__).resolve().parent / "results"


def best_of(fn, repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--size", type=int, default=4096)
    args = parser.parse_args()
    torch.manual_seed(0)
    x = torch.randn(args.size, args.size)
    gbytes = x.numel() * 4 / 1e9
    rows = []
    for label, name in CASES:
        spec = preset(name)
        q_s = best_of(lambda: quantize(x, spec), args.repeats)
        qt = quantize(x, spec)
        d_s = best_of(lambda: dequantize(qt), args.repeats)
        total = q_s + d_s
        rows.append({
            "format": label, "preset": name, "quantize_ms": 1e3 * q_s, "dequantize_ms": 1e3 * d_s,
            "total_ms": 1e3 * total, "gb_per_s": gbytes / total, "bits_per_weight": storage_bits(qt),
            "sqnr_db": sqnr_db(x, dequantize(qt)),
        })
        print(f"{label:26s} q {1e3*q_s:7.1f} ms  dq {1e3*d_s:7.1f} ms  {gbytes/total:5.2f} GB/s")
    meta = {"shape": [args.size, args.size], "repeats": args.repeats, "torch": torch.__version__,
            "threads": torch.get_num_threads(), "cpus": os.cpu_count(), "machine": platform.machine(),
            "target_gb_per_s_int_fp8": TARGET_GBPS}
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "core.json").write_text(json.dumps({"meta": meta, "results": rows}, indent=2))
    lines = [
        f"# Core throughput: quantize + dequantize, {args.size}x{args.size} fp32 (best of {args.repeats})",
        "",
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, {os.cpu_count()} CPUs. "
        f"Target: int and FP8 paths >= {TARGET_GBPS} GB/s of fp32 input.",
        "",
        "| format | quantize ms | dequantize ms | GB/s | bits/weight | SQNR dB |",
        "| --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    lines += [f"| {r['format']} | {r['quantize_ms']:.1f} | {r['dequantize_ms']:.1f} | {r['gb_per_s']:.2f} | "
              f"{r['bits_per_weight']:.3f} | {r['sqnr_db']:.1f} |" for r in rows]
    (RESULTS / "core.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
