"""A fixed corpus of bad (and a few valid) command lines against lowbit, built from tiny valid inputs.

Each case names the class of problem it probes (the classes of issue 16), a command line, and what
must hold afterwards.  ``run_case`` runs one in-process and classifies the outcome:

* ``clean``: bad input refused with exit 2, exactly one ``error:`` line (holding every needle), no
  traceback, no output written, every input byte-identical; for a valid case: exit 0 and its check;
* ``traceback``: an exception escaped or a traceback was printed (or an exit code other than 0/2);
* ``silent``: bad input accepted (exit 0);
* ``message``: exit 2 but the error line lacks what it must name;
* ``data lost``: an input file changed or vanished, or an output appeared for a refused command;
* ``hang``: no answer within the time limit;
* ``failed``: a valid command did not succeed or its check failed.

Used by ``tests/fuzz/test_fuzz.py`` (every case must be ``clean``) and ``benchmarks/robustness.py``
(the table in ``benchmarks/results/robustness.md``).
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import shutil
import signal
import struct
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from fuzz_artifacts import Artifacts

CLASSES = {
    "loss": "1 data loss (--out / export targets)",
    "crash": "0/2 crash on valid input",
    "traceback": "3 tracebacks on bad input",
    "silent": "4 bad input accepted silently",
    "metadata": "6 written metadata",
    "message": "7 weak messages",
}
TIME_LIMIT_S = 60


@dataclass
class Case:
    """One command line and what must hold after it."""

    cls: str
    name: str
    argv: list[str]
    expect: str = "error"  # "error": refused cleanly; "ok": succeeds
    needles: tuple[str, ...] = ()  # substrings the error line must hold
    out: Path | None = None  # error: must not appear (or stay as it was); ok: the output written
    check: Callable[[], str | None] | None = None  # ok cases: a problem found afterwards, or None
    cwd: Path | None = None
    watch: list[Path] = field(default_factory=list)  # inputs that must stay byte-identical


# ------------------------------------------------------------------------- file surgery
def copy_dir(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def read_st(path: Path) -> tuple[dict, bytes]:
    """A safetensors file's JSON header and its data bytes."""
    raw = path.read_bytes()
    n = struct.unpack("<Q", raw[:8])[0]
    return json.loads(raw[8:8 + n]), raw[8 + n:]


def write_st(path: Path, header: dict, data: bytes) -> None:
    blob = json.dumps(header).encode()
    blob += b" " * (-len(blob) % 8)
    path.write_bytes(struct.pack("<Q", len(blob)) + blob + data)


def edit_tensors(path: Path, edit: Callable[[dict[str, torch.Tensor]], None]) -> None:
    """Load every tensor of a safetensors file, let ``edit`` change the dict, write it back."""
    from safetensors.torch import load_file, save_file

    tensors = load_file(str(path))
    edit(tensors)
    save_file(tensors, str(path), metadata={"format": "pt"})


def edit_json(path: Path, edit: Callable[[dict], None]) -> None:
    data = json.loads(path.read_text())
    edit(data)
    path.write_text(json.dumps(data, indent=1))


def gguf_offsets(path: Path) -> tuple[dict[str, int], dict[str, int]]:
    """Byte offsets of each metadata value (last part) and of each tensor's type field."""
    from gguf import GGUFReader

    r = GGUFReader(str(path))
    values = {k: f.offset + sum(p.nbytes for p in f.parts[:-1]) for k, f in r.fields.items()}
    types = {t.name: t.field.offset + sum(p.nbytes for p in t.field.parts[:-2]) for t in r.tensors}
    return values, types


def patch(path: Path, offset: int, data: bytes) -> None:
    raw = bytearray(path.read_bytes())
    raw[offset:offset + len(data)] = data
    path.write_bytes(bytes(raw))


def weight_file(d: Path) -> Path:
    return d / "model.safetensors"


# ------------------------------------------------------------------------- the cases
def build_cases(art: Artifacts, root: Path) -> list[Case]:
    """Every case, its mutated inputs written under ``root`` (one folder a case)."""
    cases: list[Case] = []
    hf, ct, gg, text = art.hf_dir, art.ct_dir, art.gguf, art.text
    q = ["--calib", str(text), "--nsamples", "4", "--seqlen", "32"]  # fast calibration on the tiny model
    ev = ["--dataset", str(text), "--seqlen", "64", "--max-windows", "2"]

    made = iter(range(10**6))

    def case_dir(name: str) -> Path:
        d = root / f"{next(made):03d}-{name}"
        d.mkdir(parents=True)
        return d

    def add(cls: str, name: str, argv: list[str], *needles: str, out: Path | None = None, expect: str = "error",
            check: Callable[[], str | None] | None = None, cwd: Path | None = None) -> None:
        cases.append(Case(cls, name, argv, expect, tuple(needles), out, check, cwd))

    # ---- 1. data loss: outputs that would replace what the user did not ask to replace
    d = case_dir("out-victim")
    victim = d / "victim"
    (victim / "sub").mkdir(parents=True)
    (victim / "notes.txt").write_text("my notes")
    (victim / "sub" / "thesis.tex").write_text("\\section{mine}")
    add("loss", "quantize --out a non-empty user directory", ["quantize", str(hf), "--method", "rtn", *q, "--out",
        str(victim)], "victim", out=victim)
    add("loss", "export into a non-empty user directory", ["export", str(ct), str(victim), "--format", "fake-quant"],
        "victim", out=victim)
    add("loss", "export gguf over a user's file", ["export", str(ct), str(victim / "notes.txt"), "--format", "gguf",
        "--type", "Q8_0"], "notes.txt", out=victim)
    add("loss", "quantize --out the input model", ["quantize", str(hf), "--method", "rtn", *q, "--out", str(hf)],
        out=hf)
    add("loss", "quantize --out the input model with --overwrite", ["quantize", str(hf), "--method", "rtn", *q,
        "--out", str(hf), "--overwrite"], out=hf)
    add("loss", "export onto its own input", ["export", str(ct), str(ct), "--format", "fake-quant", "--overwrite"],
        out=ct)
    add("loss", "quantize --out . (the working directory)", ["quantize", str(hf), "--method", "rtn", *q, "--out", "."],
        cwd=victim, out=victim)
    add("loss", "quantize --out an existing file", ["quantize", str(hf), "--method", "rtn", *q, "--out",
        str(victim / "notes.txt")], "notes.txt", out=victim)
    add("loss", "quantize --out ''", ["quantize", str(hf), "--method", "rtn", *q, "--out", ""])
    add("loss", "quantize --out under /proc", ["quantize", str(hf), "--method", "rtn", *q, "--out",
        "/proc/lowbit-fuzz-out"])
    add("loss", "quantize --out a parent of the input", ["quantize", str(hf), "--method", "rtn", *q, "--out",
        str(hf.parent), "--overwrite"], out=hf.parent)
    add("loss", "sweep --out a non-empty user directory", ["sweep", str(hf), "--methods", "rtn", "--bits", "4",
        "--group-sizes", "32", "--calib", str(text), "--nsamples", "4", "--seqlen", "32", "--eval-dataset", str(text),
        "--eval-seqlen", "64", "--max-windows", "1", "--out", str(victim)], "victim", out=victim)
    add("loss", "analyze --out a non-empty user directory", ["analyze", str(hf), "--calib", str(text), "--nsamples",
        "4", "--seqlen", "32", "--out", str(victim)], "victim", out=victim)

    d = case_dir("out-model-card")
    carded = copy_dir(ct, d / "q")
    (carded / "README.md").write_text("# my model card")
    add("loss", "quantize --out a lowbit output the user added a model card to", ["quantize", str(hf), "--method",
        "rtn", *q, "--out", str(carded)], "README.md", out=carded)
    add("loss", "--sensitivity inside --out", ["quantize", str(hf), "--target-bpw", "5", "--candidates", "4:32,8",
        *q, "--out", str(d / "mixed"), "--sensitivity", str(d / "mixed" / "sens")], "overlap", out=d / "mixed")

    # ---- 0/2. valid input must not crash (and must round-trip)
    for method in ("awq", "gptq", "rtn", "hqq"):
        d = case_dir(f"valid-{method}")
        out = d / "q"
        add("crash", f"{method} W4 g32 with --out and --json", ["quantize", str(hf), "--method", method, "--group-size",
            "32", "--asym", *q, "--out", str(out), "--json"], out=out, expect="ok",
            check=_loads_and_evaluates(out, text))
    d = case_dir("valid-overwrite")
    out = d / "q"
    add("crash", "quantize twice into the same output (first run)", ["quantize", str(hf), "--method", "rtn", *q,
        "--out", str(out)], out=out, expect="ok")
    add("crash", "quantize again over its own output with --overwrite", ["quantize", str(hf), "--method", "rtn",
        "--bits", "8", *q, "--out", str(out), "--overwrite"], out=out, expect="ok",
        check=lambda o=out: None if "rtn-w8" in (o / "recipe.yaml").read_text() else "not replaced")
    d = case_dir("valid-qwen2")
    qwen = _biased_family(d / "qwen2", hf)
    out = d / "q"
    add("crash", "quantize a model with biased linears (Qwen2), reload", ["quantize", str(qwen), "--method", "rtn",
        "--group-size", "32", *q, "--out", str(out)], out=out, expect="ok", check=_loads_and_evaluates(out, text))

    # ---- 6. written metadata
    d = case_dir("meta-gguf")
    out = d / "q"
    add("metadata", "checkpoint written from a GGUF names its architecture", ["quantize", str(gg), "--method", "rtn",
        "--group-size", "32", *q, "--out", str(out)], out=out, expect="ok",
        check=lambda o=out: None if json.loads((o / "config.json").read_text()).get("architectures")
        else "config.json architectures is empty")

    # ---- GGUF files
    values, types = gguf_offsets(gg)

    def gguf_case(cls: str, name: str, mutate: Callable[[Path], None], *needles: str) -> None:
        p = case_dir("gguf-" + name.replace(" ", "-")) / "m.gguf"
        shutil.copy(gg, p)
        mutate(p)
        add(cls, f"GGUF: {name}", ["eval", str(p), *ev], *needles)

    gguf_case("traceback", "unknown architecture", lambda p: patch(p, values["general.architecture"], b"zzzzz"),
              "zzzzz")
    gguf_case("silent", "header claims fewer tensors", lambda p: patch(p, 8, struct.pack("<Q", 18)))
    gguf_case("silent", "tensor type Q8_0 changed to F32",
              lambda p: patch(p, types["blk.0.attn_q.weight"], struct.pack("<I", 0)))
    gguf_case("traceback", "embedding length disagrees with the tensors",
              lambda p: patch(p, values["llama.embedding_length"], struct.pack("<I", 32)))
    gguf_case("traceback", "block count larger than the tensors",
              lambda p: patch(p, values["llama.block_count"], struct.pack("<I", 3)))
    gguf_case("traceback", "truncated", lambda p: p.write_bytes(p.read_bytes()[: p.stat().st_size // 2]))
    gguf_case("traceback", "bad magic", lambda p: patch(p, 0, b"GGUX"))
    gguf_case("traceback", "empty file", lambda p: p.write_bytes(b""))
    gguf_case("traceback", "tensor count absurd", lambda p: patch(p, 8, struct.pack("<Q", 2**60)))
    gguf_case("traceback", "metadata count absurd", lambda p: patch(p, 16, struct.pack("<Q", 2**60)))

    # ---- Hugging Face directories (safetensors + config)
    def hf_case(cls: str, name: str, mutate: Callable[[Path], None], *needles: str, cmd: str = "eval") -> None:
        d = copy_dir(hf, case_dir("hf-" + name.replace(" ", "-").replace("/", "-")) / "m")
        mutate(d)
        argv = ["eval", str(d), *ev] if cmd == "eval" else ["quantize", str(d), "--method", "rtn", *q]
        add(cls, f"HF dir: {name}", argv, *needles)

    hf_case("silent", "a weight tensor deleted", lambda d: edit_tensors(
        weight_file(d), lambda t: t.pop("model.layers.1.mlp.down_proj.weight")), "down_proj")
    hf_case("silent", "a float weight stored as I32", lambda d: edit_tensors(
        weight_file(d), lambda t: t.update({"model.norm.weight": t["model.norm.weight"].to(torch.int32)})), "model.norm")
    hf_case("silent", "an unexpected extra tensor", lambda d: edit_tensors(
        weight_file(d), lambda t: t.update({"model.layers.7.mlp.up_proj.weight": torch.zeros(4, 4)})), "layers.7")
    hf_case("silent", "config model_type disagrees with the weights (gpt2)", lambda d: edit_json(
        d / "config.json", lambda c: c.update({"model_type": "gpt2", "architectures": ["GPT2LMHeadModel"]})))
    hf_case("silent", "config model_type disagrees with the weights (qwen2)", lambda d: edit_json(
        d / "config.json", lambda c: c.update({"model_type": "qwen2", "architectures": ["Qwen2ForCausalLM"]})))
    hf_case("silent", "config has more layers than the weights", lambda d: edit_json(
        d / "config.json", lambda c: c.update({"num_hidden_layers": 3})), "layers.2")
    hf_case("silent", "NaN in a weight", lambda d: edit_tensors(
        weight_file(d), lambda t: t["model.layers.0.self_attn.q_proj.weight"].__setitem__((0, 0), float("nan"))),
        "q_proj")
    hf_case("traceback", "config hidden size disagrees with the weights", lambda d: edit_json(
        d / "config.json", lambda c: c.update({"hidden_size": 128})))
    hf_case("traceback", "truncated safetensors", lambda d: weight_file(d).write_bytes(
        weight_file(d).read_bytes()[:-1000]), "model.safetensors")
    hf_case("traceback", "safetensors header length absurd", lambda d: patch(
        weight_file(d), 0, struct.pack("<Q", 2**62)), "model.safetensors")
    d = copy_dir(hf, case_dir("info-absurd-header") / "m")
    patch(weight_file(d), 0, struct.pack("<Q", 2**62))
    add("traceback", "info: safetensors header length absurd", ["info", str(d)], "model.safetensors")
    hf_case("traceback", "safetensors header not JSON", lambda d: patch(weight_file(d), 8, b"{{{{"),
            "model.safetensors")
    hf_case("traceback", "safetensors offsets overlap", lambda d: _overlap_offsets(weight_file(d)),
            "model.safetensors")
    hf_case("traceback", "config.json nested 100000 deep", lambda d: (d / "config.json").write_text(
        "[" * 100000 + "]" * 100000), "config.json")
    hf_case("message", "config.json not JSON", lambda d: (d / "config.json").write_text('{"model_type": "llama",,}'),
            "config.json")
    hf_case("traceback", "config.json binary", lambda d: (d / "config.json").write_bytes(os.urandom(300)),
            "config.json")
    hf_case("traceback", "config.json a list", lambda d: (d / "config.json").write_text("[1, 2]"), "config.json")
    hf_case("message", "needs remote code", lambda d: edit_json(d / "config.json", lambda c: c.update(
        {"model_type": "fuzzy-custom", "auto_map": {"AutoConfig": "cfg.FuzzyConfig",
                                                   "AutoModelForCausalLM": "mdl.FuzzyModel"}})),
            "--trust-remote-code")
    hf_case("message", "pickled weights refused", _pickle_weights, "pytorch_model.bin", "safetensors")
    hf_case("message", "tokenizer.json corrupt", lambda d: (d / "tokenizer.json").write_text("{not json"),
            "tokenizer", cmd="quantize")
    hf_case("message", "tokenizer files missing", lambda d: [(d / f).unlink() for f in
                                                            ("tokenizer.json", "tokenizer_config.json")],
            "tokenizer", cmd="quantize")

    # ---- compressed-tensors checkpoints
    layer = "model.layers.0.self_attn.q_proj"

    def ct_case(cls: str, name: str, mutate: Callable[[Path], None], *needles: str, cmd: str = "eval") -> None:
        d = copy_dir(ct, case_dir("ct-" + name.replace(" ", "-")) / "m")
        mutate(d)
        if cmd == "eval":
            argv = ["eval", str(d), *ev]
        else:
            argv = ["export", str(d), str(d.parent / "exported"), "--format", "gguf", "--type", "Q8_0"]
        add(cls, f"compressed-tensors: {name} ({cmd})", argv, *needles, out=d.parent / "exported")

    for cmd in ("eval", "export"):
        ct_case("silent", "NaN scale", lambda d: edit_tensors(weight_file(d), lambda t: t[
            f"{layer}.weight_scale"].__setitem__((0, 0), float("nan"))), "weight_scale", cmd=cmd)
        ct_case("traceback", "g_idx out of range", lambda d: edit_tensors(weight_file(d), lambda t: t.update(
            {f"{layer}.weight_g_idx": torch.full((64,), 99, dtype=torch.int32)})), "g_idx", cmd=cmd)
    ct_case("message", "weight_scale missing", lambda d: edit_tensors(weight_file(d), lambda t: t.pop(
        f"{layer}.weight_scale")), "weight_scale")
    ct_case("traceback", "packed weight with too few rows", lambda d: edit_tensors(weight_file(d), lambda t: t.update(
        {f"{layer}.weight_packed": t[f"{layer}.weight_packed"][:10].contiguous()})), "q_proj")
    ct_case("traceback", "packed weight with too few columns", lambda d: edit_tensors(weight_file(d), lambda t: t.update(
        {f"{layer}.weight_packed": t[f"{layer}.weight_packed"][:, :4].contiguous()})), "q_proj")
    ct_case("traceback", "weight_shape disagrees", lambda d: edit_tensors(weight_file(d), lambda t: t.update(
        {f"{layer}.weight_shape": torch.tensor([64, 128])})), "q_proj")
    ct_case("traceback", "scale of the wrong shape", lambda d: edit_tensors(weight_file(d), lambda t: t.update(
        {f"{layer}.weight_scale": t[f"{layer}.weight_scale"][:, :1].contiguous()})), "q_proj")
    ct_case("traceback", "num_bits 9 in the config", lambda d: edit_json(d / "config.json", lambda c: next(iter(
        c["quantization_config"]["config_groups"].values()))["weights"].update({"num_bits": 9})))
    ct_case("traceback", "unknown format in the config", lambda d: edit_json(d / "config.json", lambda c: c[
        "quantization_config"].update({"format": "zz-quantized"})), "zz-quantized")
    ct_case("traceback", "config groups not a mapping", lambda d: edit_json(d / "config.json", lambda c: c[
        "quantization_config"].update({"config_groups": [1, 2]})), "config_groups")

    # ---- recipes (YAML)
    def recipe_case(cls: str, name: str, body: str | bytes, *needles: str) -> None:
        p = case_dir("recipe-" + name.replace(" ", "-").replace("/", "-")) / "r.yaml"
        p.write_bytes(body if isinstance(body, bytes) else body.encode())
        out = p.parent / "out"
        add(cls, f"recipe: {name}", ["quantize", str(hf), "--recipe", str(p), *q, "--out", str(out)], *needles, out=out)

    base = "name: r\nmethods:\n  - method: gptq\n    spec: {type: int, bits: 4, granularity: group, group_size: 32}\n"
    recipe_case("traceback", "binary file", os.urandom(400) + b"\xff\xfe", "r.yaml")
    recipe_case("traceback", "billion laughs under name", _billion_laughs("name"), "r.yaml")
    recipe_case("traceback", "billion laughs under spec.bits", _billion_laughs("bits"), "r.yaml")
    recipe_case("traceback", "deeply nested", "name: r\nmethods: " + "[" * 5000 + "]" * 5000 + "\n", "r.yaml")
    recipe_case("traceback", "options not a mapping", base + "    options: [1, 2]\n", "options")
    recipe_case("traceback", "invalid re: pattern", base + "    targets: ['re:(unclosed']\n", "re:(unclosed")
    recipe_case("traceback", "re: pattern with a huge repeat", base + "    targets: ['re:a{4294967296}']\n", "re:")
    recipe_case("traceback", "option of the wrong type", base + "    options: {damp: abc}\n", "damp")
    recipe_case("silent", "negative block_size", base + "    options: {block_size: -5}\n", "block_size")
    recipe_case("silent", "zero damp", base + "    options: {damp: 0}\n", "damp")
    recipe_case("message", "invalid YAML has a line number", base + "    options: {damp: [0.1}\n", "line")
    recipe_case("traceback", "targets a mapping", base + "    targets: {a: 1}\n", "targets")
    recipe_case("traceback", "methods entries not mappings", "name: r\nmethods: [1, 2]\n", "entry")
    recipe_case("traceback", "spec bits a string", "name: r\nmethods:\n  - method: rtn\n    spec: {type: int, bits: "
                "four}\n", "bits")
    recipe_case("traceback", "name a mapping", "name: {a: 1}\nmethods:\n  - method: rtn\n    spec: W8\n", "name")
    recipe_case("traceback", "empty document", "", "r.yaml")
    recipe_case("traceback", "a scalar document", "42\n", "r.yaml")
    recipe_case("silent", "awq grid zero", "name: r\nmethods:\n  - method: awq\n    spec: {type: int, bits: 4, "
                "granularity: group, group_size: 32}\n    options: {grid: 0}\n", "grid")

    # ---- flags
    d = case_dir("flags")
    out = d / "out"

    def flag_case(cls: str, name: str, extra: list[str], *needles: str, method: str = "rtn") -> None:
        add(cls, f"flag: {name}", ["quantize", str(hf), "--method", method, *q, *extra, "--out", str(out)], *needles,
            out=out)

    flag_case("silent", "--group-size 0", ["--group-size", "0"], "group")
    flag_case("silent", "--group-size -32", ["--group-size", "-32"], "group")
    flag_case("traceback", "--batch-size 0", ["--batch-size", "0"], "batch")
    flag_case("traceback", "--batch-size -1", ["--batch-size", "-1"], "batch")
    flag_case("traceback", "--option damp=abc", ["--option", "damp=abc"], "damp", method="gptq")
    flag_case("traceback", "--option block_size=-5", ["--option", "block_size=-5"], "block_size", method="gptq")
    flag_case("traceback", "--option with a YAML bomb", ["--option", "damp=" + _billion_laughs_flow()], "damp",
              method="gptq")
    flag_case("traceback", "--nsamples 0", ["--nsamples", "0"], "nsamples")
    flag_case("traceback", "--bits 0", ["--bits", "0"], "bits")
    add("traceback", "flag: eval --max-windows 0", ["eval", str(hf), "--dataset", str(text), "--seqlen", "64",
        "--max-windows", "0"], "max-windows")
    add("traceback", "flag: eval --seqlen 0", ["eval", str(hf), "--dataset", str(text), "--seqlen", "0"], "seqlen")
    add("traceback", "flag: eval --seqlen 1", ["eval", str(hf), "--dataset", str(text), "--seqlen", "1"], "seqlen")

    # ---- data files
    def data_case(cls: str, name: str, fname: str, body: bytes, *needles: str, role: str = "calib") -> None:
        p = case_dir("data-" + name.replace(" ", "-")) / fname
        p.write_bytes(body)
        if role == "calib":
            argv = ["quantize", str(hf), "--method", "rtn", "--calib", str(p), "--nsamples", "2", "--seqlen", "16",
                    "--out", str(p.parent / "out")]
        else:
            argv = ["eval", str(hf), "--dataset", str(p), "--seqlen", "16"]
        add(cls, f"data: {name} ({role})", argv, *needles, out=p.parent / "out")

    binary = os.urandom(2000) + b"\xff\xfe\xfa"
    data_case("traceback", "binary calibration .txt", "c.txt", binary, "c.txt")
    data_case("traceback", "binary eval .txt", "e.txt", binary, "e.txt", role="eval")
    data_case("traceback", "jsonl text a number", "c.jsonl", b'{"text": 5}\n' * 50, "c.jsonl")
    data_case("traceback", "jsonl text null", "c.jsonl", b'{"text": null}\n' * 50, "c.jsonl")
    data_case("traceback", "jsonl row not JSON", "c.jsonl", b'{"text": "a"\n' * 50, "c.jsonl")
    data_case("traceback", "jsonl rows not objects", "c.jsonl", b'[1, 2]\n' * 50, "c.jsonl")
    data_case("traceback", "jsonl eval text a number", "e.jsonl", b'{"text": 5}\n' * 50, "e.jsonl", role="eval")
    data_case("traceback", "empty calibration file", "c.txt", b"", "c.txt")
    data_case("traceback", "empty eval file", "e.txt", b"", "e.txt", role="eval")
    return cases


def _biased_family(dst: Path, like: Path) -> Path:
    """A tiny Qwen2 (q/k/v biases) with the tiny tokenizer of ``like``."""
    from transformers import AutoTokenizer, Qwen2Config, Qwen2ForCausalLM

    tok = AutoTokenizer.from_pretrained(like)
    torch.manual_seed(0)
    cfg = Qwen2Config(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)
    Qwen2ForCausalLM(cfg).save_pretrained(dst)
    tok.save_pretrained(dst)
    return dst


def _loads_and_evaluates(out: Path, text: Path) -> Callable[[], str | None]:
    """Check: the written model loads and evaluates to the perplexity its summary recorded in memory."""

    def check() -> str | None:
        from lowbit.eval.perplexity import evaluate
        from lowbit.models.loading import load_model

        summary = json.loads((out / "lowbit_summary.json").read_text())
        model, tok = load_model(out)
        r = evaluate(model, tok, str(text), "test", 64, 2)
        if not r.perplexity < float("inf") or summary["bits_per_weight"] <= 0:
            return f"reloaded perplexity {r.perplexity}"
        return None

    return check


def _overlap_offsets(path: Path) -> None:
    header, data = read_st(path)
    names = [k for k in header if k != "__metadata__"]
    header[names[1]]["data_offsets"] = header[names[0]]["data_offsets"]
    write_st(path, header, data)


def _pickle_weights(d: Path) -> None:
    """Replace the safetensors weights with a pickle holding an object weights_only refuses."""
    import collections
    import datetime

    from safetensors.torch import load_file

    state = collections.OrderedDict(load_file(str(d / "model.safetensors")))
    state["_when"] = datetime.datetime(2026, 1, 1)  # not on torch's weights_only allow-list
    torch.save(state, d / "pytorch_model.bin")
    (d / "model.safetensors").unlink()


def _billion_laughs(where: str) -> str:
    lines = ['a: &a ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]']
    for i in range(1, 9):
        prev, cur = chr(ord("a") + i - 1), chr(ord("a") + i)
        lines.append(f"{cur}: &{cur} [" + ",".join([f"*{prev}"] * 9) + "]")
    bomb = "\n".join(lines) + "\n"
    if where == "name":
        return bomb + "name: *i\nmethods:\n  - method: rtn\n    spec: W8\n"
    return bomb + "name: r\nmethods:\n  - method: rtn\n    spec: {type: int, bits: *i}\n"


def _billion_laughs_flow() -> str:
    """The same bomb on one line (a flow sequence), as a --option value."""
    items = ["&a [" + ",".join(["lol"] * 9) + "]"]
    for i in range(1, 9):
        prev, cur = chr(ord("a") + i - 1), chr(ord("a") + i)
        items.append(f"&{cur} [" + ",".join([f"*{prev}"] * 9) + "]")
    return "[" + ",".join(items) + "]"


# ------------------------------------------------------------------------- running
def _snapshot(paths: list[Path]) -> dict[str, str]:
    out: dict[str, str] = {}
    for root in paths:
        if root.is_file():
            out[str(root)] = hashlib.sha256(root.read_bytes()).hexdigest()
        elif root.is_dir():
            for p in sorted(root.rglob("*")):
                if p.is_file() or p.is_symlink():
                    out[str(p)] = hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "link"
    return out


class _Timeout(Exception):
    pass


@dataclass
class Outcome:
    """How one case ended."""

    case: Case
    verdict: str
    code: int | None
    error_line: str
    detail: str = ""


def run_case(case: Case, art: Artifacts, root: Path) -> Outcome:
    """Run ``case`` in-process (``lowbit.cli.main``) and classify what happened."""
    from lowbit.cli import main

    watched = [art.hf_dir.parent, root / case_folder(case, root)]
    if case.cwd is not None:
        watched.append(case.cwd)
    keep = {p for p in (case.out,) if case.expect == "ok" and p is not None}
    before = {k: v for k, v in _snapshot(watched).items() if not any(k.startswith(str(p)) for p in keep)}
    out_existed = case.out is not None and case.out.exists()
    buf = io.StringIO()
    code: int | None = None
    escaped = ""
    old_cwd = Path.cwd()
    old_handler = signal.signal(signal.SIGALRM, _raise_timeout)
    signal.alarm(TIME_LIMIT_S)
    try:
        if case.cwd is not None:
            os.chdir(case.cwd)
        with contextlib.redirect_stdout(buf), contextlib.redirect_stderr(buf):
            try:
                code = main(case.argv)
            except SystemExit as e:  # argparse
                code = e.code if isinstance(e.code, int) else 2
    except _Timeout:
        return Outcome(case, "hang", None, "", f"no answer in {TIME_LIMIT_S} s")
    except BaseException as e:  # noqa: BLE001 - any escape is a traceback for the user
        escaped = "".join(traceback.format_exception_only(type(e), e)).strip()
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old_handler)
        os.chdir(old_cwd)
    text = buf.getvalue()
    error_lines = [l for l in text.splitlines() if l.startswith("error:") or ": error:" in l[:40]]
    line = error_lines[-1] if error_lines else ""
    after = {k: v for k, v in _snapshot(watched).items() if not any(k.startswith(str(p)) for p in keep)}
    changed = sorted(k for k in before if after.get(k) != before[k])
    if escaped or "Traceback (most recent call last)" in text or code not in (0, 2):
        return Outcome(case, "traceback", code, line, escaped or text[-300:])
    if changed:
        return Outcome(case, "data lost", code, line, f"changed or removed: {changed[:3]}")
    if case.expect == "ok":
        if code != 0:
            return Outcome(case, "failed", code, line, text[-300:])
        try:
            problem = case.check() if case.check is not None else None
        except Exception as e:  # noqa: BLE001 - the written output does not load back: a failed valid case
            problem = f"{type(e).__name__}: {str(e)[:200]}"
        return Outcome(case, "failed" if problem else "clean", code, line, problem or "")
    if code == 0:
        return Outcome(case, "silent", code, line, text[-200:])
    if case.out is not None and not out_existed and case.out.exists():
        return Outcome(case, "data lost", code, line, f"{case.out} was created")
    new_files = sorted(k for k in after if k not in before)
    if new_files:
        return Outcome(case, "data lost", code, line, f"left behind: {new_files[:3]}")
    if len(error_lines) != 1:
        return Outcome(case, "message", code, line, f"{len(error_lines)} error lines")
    missing = [n for n in case.needles if n.lower() not in line.lower()]
    if missing:
        return Outcome(case, "message", code, line, f"error line lacks {missing}")
    return Outcome(case, "clean", code, line)


def case_folder(case: Case, root: Path) -> str:
    """The case's own folder under ``root`` (the first argv path inside it), or ``root`` itself."""
    for a in case.argv:
        p = Path(a)
        if p.is_absolute() and str(p).startswith(str(root) + os.sep):
            return p.relative_to(root).parts[0]
    return "."


def _raise_timeout(signum: int, frame: object) -> None:
    raise _Timeout
