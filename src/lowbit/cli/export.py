"""``lowbit export INPUT OUTPUT``: rewrite a quantized checkpoint in another format (GGUF too)."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from lowbit.cli.display import fmt_bytes, print_table
from lowbit.cli.options import add_dtype_option, add_overwrite_option
from lowbit.errors import LowbitError
from lowbit.experiment import ModelSource, load
from lowbit.export import FORMATS
from lowbit.outputs import check_output


def add_parser(sub: Any) -> None:
    p = sub.add_parser("export", help="rewrite a quantized checkpoint in another format")
    p.add_argument("input", help="a directory written by 'lowbit quantize --out' or 'lowbit export'")
    p.add_argument("output", metavar="OUTPUT", help="directory (a .gguf / .onnx file for --format gguf / onnx) to "
                                                    "write; an output lowbit wrote before is replaced atomically")
    add_overwrite_option(p)
    p.add_argument("--format", default="compressed-tensors", choices=[*FORMATS, "gguf", "onnx"])
    p.add_argument("--type", default="Q4_0",
                   help="GGUF type of the linear weights (Q8_0, Q4_0, Q4_1, Q5_0, Q5_1, Q2_K ... Q6_K, IQ4_NL, F16, "
                        "F32) or a llama.cpp mix (Q3_K_S/M/L, Q4_K_S/M, Q5_K_S/M)")
    p.add_argument("--imatrix", default=None, metavar="CALIB",
                   help="weight K-quant rounding by each input column's mean square over this calibration text "
                        "(wikitext2, c4, a .txt/.jsonl path), as llama.cpp's --imatrix")
    p.add_argument("--nsamples", type=int, default=32, help="with --imatrix: calibration windows")
    p.add_argument("--seqlen", type=int, default=512, help="with --imatrix: tokens per window")
    p.add_argument("--embed-type", default="Q8_0", help="GGUF type of the token embedding / untied output head")
    p.add_argument("--onnx-ops", default="matmulnbits", choices=["matmulnbits", "qdq"],
                   help="ONNX: 2/3/4-bit groups as ONNX Runtime's MatMulNBits (default; int8 and per-channel weights "
                        "as QDQ), or every integer weight as DequantizeLinear + MatMul (qdq)")
    p.add_argument("--accuracy-level", type=int, default=0,
                   help="ONNX: MatMulNBits compute precision (0 fp32, as lowbit evaluates; 4 int8 activations, faster)")
    add_dtype_option(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from lowbit.export.codes import attach_codes
    from lowbit.quantization import SUMMARY_FILE, save_quantized

    src = Path(args.input)
    if not src.is_dir():
        raise LowbitError(f"{src} is not a directory; give the --out directory of 'lowbit quantize'")
    check_output(args.output, "file" if args.format in ("gguf", "onnx") else "dir", args.overwrite, [src], "OUTPUT")
    if args.format == "onnx":
        from lowbit.export.onnx_export import check_accuracy_level

        if not str(args.output).endswith(".onnx"):
            raise LowbitError(f"OUTPUT {args.output}: an ONNX export is one file; give a path ending in .onnx")
        check_accuracy_level(args.accuracy_level)
    if args.imatrix is not None and args.format != "gguf":
        raise LowbitError("--imatrix weights GGUF K-quant rounding; use it with --format gguf")
    if args.nsamples < 1 or args.seqlen < 2:
        raise LowbitError(f"--nsamples {args.nsamples} / --seqlen {args.seqlen}: need at least 1 window of 2 tokens")
    model, tok = load(ModelSource(src, dtype=args.dtype), require_tokenizer=False)
    attach_codes(model, src)
    if args.format == "gguf":
        return _export_gguf(model, tok, args)
    if args.format == "onnx":
        return _export_onnx(model, tok, args)
    extra = {n: (src / n).read_text() for n in ("recipe.yaml", SUMMARY_FILE) if (src / n).is_file()}
    out, written = save_quantized(model, tok, None, args.output, args.format, extra, overwrite=args.overwrite)
    size = sum(f.stat().st_size for f in Path(out).rglob("*") if f.is_file())
    print_table([("format", written), ("written to", str(out)), ("size on disk", fmt_bytes(size))])
    return 0


def _export_gguf(model: Any, tok: Any, args: argparse.Namespace) -> int:
    from lowbit.export.gguf import export_gguf

    imatrix = None
    if args.imatrix is not None:
        from lowbit.data import get_calibration
        from lowbit.export.imatrix import collect_imatrix

        if tok is None:
            raise LowbitError("--imatrix tokenizes calibration text; the checkpoint has no tokenizer")
        imatrix = collect_imatrix(model, get_calibration(args.imatrix, tok, args.nsamples, args.seqlen))
    report = export_gguf(model, tok, args.output, args.type, args.embed_type, imatrix)
    worst = max(report.tensors, key=lambda r: r.rel_error)
    requant = [r for r in report.tensors if not r.exact and r.type not in ("F32", "F16")]
    rows = [("format", f"gguf {args.type} (embeddings {args.embed_type})"), ("written to", str(report.path)),
            ("size on disk", fmt_bytes(report.path.stat().st_size)),
            ("tensors kept code for code", f"{report.exact_count} of {len(report.tensors)}"),
            ("re-quantized by llama.cpp rules", str(len(requant))),
            ("largest relative error", f"{worst.rel_error:.2e} ({worst.name}{': ' + worst.note if worst.note else ''})")]
    print_table(rows)
    return 0


def _export_onnx(model: Any, tok: Any, args: argparse.Namespace) -> int:
    from collections import Counter

    from lowbit.export.onnx_export import export_onnx

    report = export_onnx(model, tok, args.output, args.onnx_ops, args.accuracy_level)
    forms = Counter(r.form for r in report.records)
    acts = Counter(r.activations for r in report.records if r.activations != "-")
    rows = [("format", f"onnx ({args.onnx_ops}, accuracy level {args.accuracy_level})"),
            ("written to", str(report.path)), ("size on disk", fmt_bytes(report.size()))]
    rows += [(f"weights: {form}", str(n)) for form, n in sorted(forms.items())]
    rows += [(f"inputs: {a}", str(n)) for a, n in sorted(acts.items())]
    print_table(rows)
    return 0
