"""What each matmul candidate really does per layer shape on this CPU (smollm2-135m's shapes).

For every linear shape of smollm2-135m (and its 49152 x 576 output head) and 1 token (decode) or 128
tokens (prefill), each candidate's time (min over rounds, the candidates taking turns) and its
relative error against an fp64 reference.  Weights are streamed from memory as in a real decode
step: each candidate cycles through enough copies of its weight (>= 96 MiB, three times the 32 MiB
L3) that no copy is in cache when it is used again.

Candidates: fp32 ``F.linear`` (MKL) and lowbit's native fp32 GEMV; for 4-bit (GPTQ W4 g64, asymmetric):
torch dequantize + GEMM, lowbit's native dequantize + GEMM, lowbit's native GEMV, torch's tinygemm
``_weight_int4pack_mm_for_cpu`` with fp32 and with bf16 activations, and dequantize fused into an
inductor-compiled matmul; for 8-bit per-channel: ``_weight_int8pack_mm`` (fp32 / bf16 activations),
lowbit's native GEMV and W8A8 ``torch._int_mm``.  Also the time ``select_kernels`` takes on the real
4-bit model (kernel choice at load time).

    python benchmarks/kernels.py

Writes benchmarks/results/kernels.{json,md}.
"""

from __future__ import annotations

import os
import time
from typing import Callable

import torch
import torch.nn.functional as F

from _results import write_results

SHAPES = {"q/o 576x576": (576, 576), "k/v 192x576": (192, 576), "gate/up 1536x576": (1536, 576),
          "down 576x1536": (576, 1536), "head 49152x576 (fp32)": (49152, 576)}
STREAM_BYTES = 96 << 20
ROUNDS = 7


def _copies(nbytes: int) -> int:
    return max(1, -(-STREAM_BYTES // max(nbytes, 1)))


def _timed(fn: Callable[[int], torch.Tensor], n: int, rounds: int = ROUNDS) -> float:
    """Min over ``rounds`` of the mean seconds of one call, cycling through ``n`` weight copies."""
    fn(0)
    best = float("inf")
    for _ in range(rounds):
        t0 = time.perf_counter()
        for i in range(n):
            fn(i)
        best = min(best, (time.perf_counter() - t0) / n)
    return best


def _rel(y: torch.Tensor, ref: torch.Tensor) -> float:
    return ((y.double() - ref).norm() / ref.norm()).item()


def candidates_int4(rows: int, cols: int, tokens: int) -> dict[str, tuple[float, float]]:
    from lowbit.packed import QuantLinear, kernels, native
    from lowbit.packed.intweight import IntWeight

    g = torch.Generator().manual_seed(rows + cols)
    n = _copies(rows * cols // 2)
    layers = []
    for i in range(n):
        codes = torch.randint(-8, 8, (rows, cols), generator=g, dtype=torch.int8)
        scale = torch.rand(rows, cols // 64, generator=g) * 0.02 + 0.001
        zero = torch.randint(-8, 8, (rows, cols // 64), generator=g, dtype=torch.int8)
        layers.append(QuantLinear(IntWeight(codes, scale, zero, 4, 64)))
    x = torch.randn(tokens, cols, generator=g)
    w0 = layers[0].int_weight()
    ref = x.double() @ w0.dequantize(torch.float64).t()
    out: dict[str, tuple[float, float]] = {}

    def run(name: str, make: Callable[[QuantLinear], Callable[[torch.Tensor], torch.Tensor]]) -> None:
        fns = [make(q) for q in layers]
        with torch.no_grad():
            err = _rel(fns[0](x), ref)
            out[name] = (_timed(lambda i: fns[i % n](x), n), err)

    def torch_dequant(q):
        return lambda x: F.linear(x, q.dequantized_weight())

    saved = native.available
    native.available = lambda: False  # the torch expression
    run("torch dequantize + GEMM", torch_dequant)
    native.available = saved
    if native.available():
        run("native dequantize + GEMM", torch_dequant)
        run("native GEMV", lambda q: lambda x: native.qgemv(x, q.weight_packed, q.weight_scale, q.weight_zero_point,
                                                             None, 4, 64, rows))
    if tokens == 1:
        tiny = [kernels.int4pack_tensors(q.int_weight()) for q in layers]
        run("tinygemm int4pack fp32", lambda q, t=iter(tiny): (lambda p, s: lambda x: torch.ops.aten._weight_int4pack_mm_for_cpu(x, p, 64, s))(*next(t)))
        tiny_b = [(p, s.bfloat16()) for p, s in tiny]
        run("tinygemm int4pack bf16", lambda q, t=iter(tiny_b): (lambda p, s: lambda x: torch.ops.aten._weight_int4pack_mm_for_cpu(x.bfloat16(), p, 64, s).float())(*next(t)))

        @torch.compile(dynamic=False)
        def fused(x, packed, scale, zero):
            u = packed.view(torch.uint8)
            q = torch.stack([u & 15, u >> 4], -1).reshape(rows, cols // 64, 64).float()
            w = (q - (zero.float() + 8).unsqueeze(-1)) * scale.unsqueeze(-1)
            return (x.unsqueeze(1) * w.reshape(rows, cols).unsqueeze(0)).sum(-1)
        run("inductor fused dequantize-matmul", lambda q: lambda x: fused(x, q.weight_packed, q.weight_scale,
                                                                           q.weight_zero_point))
    return out


def candidates_int8(rows: int, cols: int, tokens: int) -> dict[str, tuple[float, float]]:
    from lowbit.packed import QuantLinear, kernels, native
    from lowbit.packed.intweight import IntWeight

    g = torch.Generator().manual_seed(rows * cols)
    n = _copies(rows * cols)
    layers = [QuantLinear(IntWeight(torch.randint(-127, 128, (rows, cols), generator=g, dtype=torch.int8),
                                    torch.rand(rows, 1, generator=g) * 0.01 + 1e-4, None, 8, None)) for _ in range(n)]
    x = torch.randn(tokens, cols, generator=g)
    ref = x.double() @ layers[0].int_weight().dequantize(torch.float64).t()
    out: dict[str, tuple[float, float]] = {}

    def run(name: str, fns: list) -> None:
        with torch.no_grad():
            out[name] = (_timed(lambda i: fns[i % n](x), n), _rel(fns[0](x), ref))

    codes = [q.int_weight() for q in layers]
    if tokens == 1:
        run("int8pack fp32", [lambda x, w=w: torch.ops.aten._weight_int8pack_mm(x, w.codes, w.scale.reshape(-1))
                              for w in codes])
        run("int8pack bf16", [lambda x, w=w, s=w.scale.reshape(-1).bfloat16(): torch.ops.aten._weight_int8pack_mm(
            x.bfloat16(), w.codes, s).float() for w in codes])
    if native.available():
        run("native GEMV" if tokens == 1 else "native dequantize + GEMM",
            [(lambda x, q=q: native.qgemv(x, q.weight_packed, q.weight_scale, None, None, 8, cols, rows)) if tokens == 1
             else (lambda x, q=q: F.linear(x, q.dequantized_weight())) for q in layers])
    wt = [w.codes.t().contiguous() for w in codes]
    run("W8A8 _int_mm (activations int8 per token)",
        [lambda x, t=t, w=w: kernels.int8x8_matmul(torch.cat([x] * max(1, 17 - x.shape[0]))[: max(x.shape[0], 17)],
                                                   t, w.scale.reshape(-1).float(), False)[: x.shape[0]]
         for t, w in zip(wt, codes)])
    return out


def candidates_fp32(rows: int, cols: int, tokens: int) -> dict[str, tuple[float, float]]:
    from lowbit.packed import native

    g = torch.Generator().manual_seed(rows)
    n = _copies(rows * cols * 4)
    ws = [torch.randn(rows, cols, generator=g) for _ in range(n)]
    x = torch.randn(tokens, cols, generator=g)
    ref = x.double() @ ws[0].double().t()
    out = {"fp32 F.linear (MKL)": (_timed(lambda i: F.linear(x, ws[i % n]), n), _rel(F.linear(x, ws[0]), ref))}
    if native.available() and tokens <= 4:
        out["native fp32 GEMV"] = (_timed(lambda i: native.fgemv(x, ws[i % n], None), n),
                                   _rel(native.fgemv(x, ws[0], None), ref))
    return out


def kernel_choice_seconds() -> dict[str, float]:
    """Seconds ``select_kernels`` takes on the real model quantized to 4 bits (fresh choices), and the load."""
    from lowbit.data import get_calibration
    from lowbit.models.loading import load_model
    from lowbit.packed import kernels, pack_model
    from lowbit.quantization import quantize
    from lowbit.runtime.speed import select_kernels

    model, tok = load_model("smollm2-135m")
    spec = {"type": "int", "bits": 4, "granularity": "group", "group_size": 64, "symmetric": False}
    calib = get_calibration("wikitext2", tok, nsamples=4, seqlen=128, seed=0)  # RTN measures its output error on it
    quantize(model, {"name": "q", "methods": [{"method": "rtn", "spec": spec}]}, calib, progress=False)
    pack_model(model)
    kernels.clear_choices()
    t0 = time.perf_counter()
    counts = select_kernels(model)
    return {"seconds": time.perf_counter() - t0, "layers": sum(counts.values()), "kernels": counts}


def main() -> None:
    from lowbit.packed import native

    load_before = os.getloadavg()[0]
    native.available()  # built before any timing
    results: dict = {"shapes": {}, "native_avx512": native.uses_avx512(), "threads": torch.get_num_threads(),
                     "kernel_choice": kernel_choice_seconds()}  # first: a failure here costs no shape timings
    for name, (rows, cols) in SHAPES.items():
        for tokens in (1, 128):
            row = candidates_fp32(rows, cols, tokens)
            if not name.startswith("head"):
                row |= {f"int4 {k}": v for k, v in candidates_int4(rows, cols, tokens).items()}
                row |= {f"int8 {k}": v for k, v in candidates_int8(rows, cols, tokens).items()}
            results["shapes"][f"{name}, {tokens} token{'s' if tokens > 1 else ''}"] = {
                k: {"us": 1e6 * t, "rel_err": e} for k, (t, e) in row.items()}
            print(name, tokens, {k: round(1e6 * t, 1) for k, (t, _) in row.items()}, flush=True)
    load_after = os.getloadavg()[0]
    lines = ["# Matmul kernels per layer shape (smollm2-135m, this CPU)", "",
             f"Each cell: microseconds per call (min over {ROUNDS} rounds, weights streamed from memory: each "
             f"candidate cycles through >= {STREAM_BYTES >> 20} MiB of weight copies) and the relative error against "
             f"an fp64 reference. {results['threads']} threads; native kernels built with AVX-512: "
             f"{results['native_avx512']}. Load average (1 min) {load_before:.2f} before, {load_after:.2f} after.", ""]
    for case, row in results["shapes"].items():
        fp = row["fp32 F.linear (MKL)"]["us"]
        lines += [f"## {case}", "", "| candidate | us | vs fp32 F.linear | rel. error |", "| --- | ---: | ---: | ---: |"]
        for k, v in sorted(row.items(), key=lambda kv: kv[1]["us"]):
            lines.append(f"| {k} | {v['us']:.1f} | {fp / v['us']:.2f}x | {v['rel_err']:.1e} |")
        lines.append("")
    kc = results["kernel_choice"]
    lines += [f"Kernel choice on the real 4-bit model (RTN W4 g64, {kc['layers']} packed layers, fresh choices): "
              f"{kc['seconds']:.3f} s ({', '.join(f'{k}: {v}' for k, v in kc['kernels'].items())} for decode). "
              "Where the native kernels apply, decode takes them by rule and prefill has one candidate, so nothing "
              "is timed."]
    write_results("kernels", results, lines)


if __name__ == "__main__":
    main()
