"""CUDA check: lowbit's pipeline, activation quantizers and W8A8 integer kernel on a GPU.

The real model's weights (516 MiB fp32) cannot travel to the lent GPU machine (64 MiB per call),
so this runs on a model of smollm2-135m's exact shapes (its config.json, passed as an argument)
with random weights: it checks that every CUDA path runs and agrees with the same work on CPU, and
times it; it says nothing about quality.

    python benchmarks/gpu_check.py CONFIG_JSON OUT_JSON
"""

from __future__ import annotations

import copy
import json
import sys
import time

import torch


def _model(config_path: str):
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig.from_dict(json.loads(open(config_path).read()))
    torch.manual_seed(0)
    return LlamaForCausalLM(cfg).eval()


def _timed(fn):
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    out = fn()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return out, time.perf_counter() - t0


def main() -> None:
    from lowbit.packed.kernels import int8x8_matmul
    from lowbit.quantization import quantize

    config_path, out_path = sys.argv[1], sys.argv[2]
    dev = "cuda"
    res: dict = {"device": torch.cuda.get_device_name(0), "torch": torch.__version__,
                 "tf32_matmul": torch.backends.cuda.matmul.allow_tf32}
    base = _model(config_path)
    g = torch.Generator().manual_seed(0)
    calib = torch.randint(0, base.config.vocab_size, (128, 512), generator=g)
    ids = torch.randint(0, base.config.vocab_size, (1, 2048), generator=g)
    for recipe in ("gptq-w4g64", "awq-w4g64", "w8a8-smoothquant", "w4a4-quarot"):
        gpu = copy.deepcopy(base).to(dev)
        report, secs = _timed(lambda: quantize(gpu, recipe, calib, progress=False))
        with torch.no_grad():
            (lg, fwd) = _timed(lambda: gpu(ids.to(dev)).logits.float().cpu())
        row = {"quant_seconds": secs, "forward_2048_seconds": fwd, "bits_per_weight": report.bits_per_weight}
        if recipe in ("gptq-w4g64", "w8a8-smoothquant"):  # same work on the CPU, for agreement
            cpu = copy.deepcopy(base)
            _, cpu_secs = _timed(lambda: quantize(cpu, recipe, calib[:16], progress=False))
            gpu16 = copy.deepcopy(base).to(dev)
            quantize(gpu16, recipe, calib[:16], progress=False)
            with torch.no_grad():
                ref = base(ids[:, :512]).logits.float()
                a = cpu(ids[:, :512]).logits.float()
                b = gpu16(ids[:, :512].to(dev)).logits.float().cpu()
            rel = lambda u, v: ((u - v).norm() / v.norm()).item()  # noqa: E731
            # both quantized models are equally far from fp (same method, Hessians summed in another order)
            row["rel_logit_err_vs_fp_cpu_16_windows"] = rel(a, ref)
            row["rel_logit_err_vs_fp_gpu_16_windows"] = rel(b, ref)
            row["cpu_vs_gpu_rel_logit_diff_16_windows"] = rel(b, a)
            row["cpu_quant_seconds_16_windows"] = cpu_secs
        res[recipe] = row
        print(recipe, row, flush=True)
        del gpu
    # W8A8 integer GEMM on the GPU: torch._int_mm against fp32 of the same codes, and its speed
    x = torch.randn(4096, 1536, device=dev)
    w = torch.randint(-127, 128, (576, 1536), device=dev, dtype=torch.int8)
    sw = torch.rand(576, device=dev) / 100
    w_t = w.t().contiguous()
    y, t_int = _timed(lambda: int8x8_matmul(x, w_t, sw, True))
    for _ in range(3):
        _, t_int = _timed(lambda: int8x8_matmul(x, w_t, sw, True))
    wf = (w.float() * sw.view(-1, 1)).t().contiguous()
    for _ in range(3):
        _, t_fp = _timed(lambda: x @ wf)
    s = x.abs().amax(1, keepdim=True) / 127.5
    ref = torch.clamp(torch.round(x / s), -128, 127) @ w.float().t() * s * sw.view(1, -1)
    res["int8x8_4096x1536x576"] = {"seconds": t_int, "fp32_matmul_seconds": t_fp,
                                   "max_rel_err": ((y - ref).abs().max() / ref.abs().max()).item()}
    print(res["int8x8_4096x1536x576"])
    open(out_path, "w").write(json.dumps(res, indent=2))


if __name__ == "__main__":
    main()
