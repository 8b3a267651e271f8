"""Streamed compression: quantize a model one decoder block at a time without ever holding all of it.

The model is built on the meta device; the embedding is read to compute the calibration inputs of block 0 and
freed; then each block is read from the checkpoint's (memory-mapped) safetensors, compressed by the same
sequential pipeline as the in-memory run, its output tensors written to a part file, and freed.  Memory holds
one block, the calibration activations and the step's statistics.  At the end the parts are merged into one
``model.safetensors`` (``lowbit.stream.assemble``, streamed) beside the config, tokenizer and summary.

Finished blocks are durable: beside the output, ``.OUT.partial/`` keeps each block's part file, the
calibration activations entering the next block and ``state.json`` (what the run is, how many blocks are done,
their layer reports).  ``resume=True`` continues from there and ends with the same bytes as an uninterrupted
run; the folder is removed once the output is in place.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from lowbit.arch import architecture_of, decoder_blocks
from lowbit.atomic import allow_replace, atomic_dir, atomic_file, check_replaceable, write_text_atomic
from lowbit.errors import LowbitError
from lowbit.jsonable import to_jsonable
from lowbit.models.capture import BlockInputs, capture_block_inputs
from lowbit.experts import fuse_state, unfuse_experts
from lowbit.pipeline.memory import map_large_allocations, release_freed_memory
from lowbit.pipeline.sequential import BlockHooks, LayerReport, run_sequential
from lowbit.quantized_layers import is_quantized
from lowbit.stream.assemble import assemble_safetensors
from lowbit.checkpoint_names import as_saved
from lowbit.stream.spill import SpilledBatches
from lowbit.stream.weights import (DTYPE_NAMES, WeightReader, materialize, materialize_rows, meta_model,
                                   open_weights, release)

STATE_FILE = "state.json"
HIDDEN_FILE = "hidden.pt"
STREAM_FORMATS = ("auto", "compressed-tensors", "fake-quant")


class _Dropped(list):
    """A store that keeps nothing: a resumed run re-captures block 0's keyword arguments, not its inputs."""

    def append(self, value: Any) -> None:
        pass


def partial_dir(out: Path) -> Path:
    """Where a streamed run into ``out`` keeps its finished blocks until the output is in place."""
    out = Path(out).absolute()
    return out.parent / f".{out.name}.partial"


def check_streamable(rec: Any, assignments: dict[str, list[Any]], fmt: str) -> None:
    """Refuse (before work) what a block-at-a-time run cannot do."""
    if fmt not in STREAM_FORMATS:
        raise LowbitError(f"a streamed run writes {', '.join(STREAM_FORMATS[1:])}, not {fmt}; run without "
                          "--streamed for other formats")
    if rec.transforms:
        raise LowbitError(f"recipe {rec.name!r} transforms the whole model ({rec.transforms[0].transform}), which a "
                          "streamed run cannot hold at once; run it without --streamed")
    if rec.kv_cache is not None and not rec.kv_cache.calibrated:
        raise LowbitError(f"the KV-cache setting {rec.kv_cache.name} is fitted on the whole quantized model; run "
                          "without --streamed, or pick a KV-cache setting that needs no fitting (KIVI4 ...)")
    for steps in assignments.values():
        for step in steps:
            whole = step.needs_whole_model()
            if whole:
                raise LowbitError(f"step {step.name!r} ({whole}) needs the whole model at once, which a streamed run "
                                  "does not hold; run it without --streamed")


def _fingerprint(source_files: list[Path], recipe: dict[str, Any], calib: torch.Tensor, batch_size: int, fmt: str,
                 dtype: torch.dtype) -> str:
    """What makes two runs the same run (a resumed run must be one of them)."""
    h = hashlib.sha256()
    for f in source_files:
        st = f.stat()
        h.update(f"{f.resolve()}:{st.st_size}:{st.st_mtime_ns}".encode())
    h.update(json.dumps(to_jsonable(recipe), sort_keys=True).encode())
    h.update(calib.contiguous().numpy().tobytes())
    h.update(f"{batch_size}:{fmt}:{dtype}".encode())
    return h.hexdigest()


def _block_tensors(model: torch.nn.Module, block: torch.nn.Module, prefix: str, fmt: str, dtype: torch.dtype
                   ) -> tuple[dict[str, torch.Tensor], dict[str, dict[str, Any]], str | None]:
    """The block's checkpoint tensors (full names) in ``fmt``, its layers' compressed-tensors schemes, and why
    compressed-tensors cannot hold it (None when it can).  Dense blocks are written under the names
    ``save_pretrained`` gives ``model``'s tensors."""
    from lowbit.export.compressed_tensors import (collect_exportable, dense_tensors, layer_tensors_and_schemes,
                                                  saved_names)
    from lowbit.export.dense import dense_state_dict

    quantized = any(is_quantized(m) for m in block.modules())
    if fmt == "fake-quant" or not quantized:
        dense = fuse_state(block, dense_state_dict(block))  # MoE experts fused back, as transformers has them
        return as_saved(model, {prefix + k: v.contiguous() for k, v in dense.items()}), {}, None
    weights, inputs, problem = collect_exportable(block)
    if problem is not None:
        return {}, {}, problem
    tensors = {prefix + k: v for k, v in dense_tensors(block, set(weights)).items()}
    full = ({prefix + n: w for n, w in weights.items()}, {prefix + n: q for n, q in inputs.items()})
    quantized, schemes = layer_tensors_and_schemes(*saved_names(model, *full), dtype)
    tensors.update(quantized)
    return tensors, schemes, None


def _bytes(module: torch.nn.Module) -> int:
    return sum(p.numel() * p.element_size() for p in module.parameters())


@dataclass
class MemoryPlan:
    """What a streamed run will hold, in bytes: ``minimum`` with the calibration activations on disk, ``in_ram``
    with them in memory; ``spill`` says where they go under the budget."""

    minimum: int
    in_ram: int
    spill: bool


def memory_plan(model: torch.nn.Module, calib: torch.Tensor, batch_size: int, max_memory: int | None) -> MemoryPlan:
    """Estimate a streamed run's peak from this process's own (anonymous) memory now, the largest block, its
    layers' statistics (Hessians and their working copies), one forward pass's activations and the calibration
    activations; LowbitError when ``max_memory`` is below the minimum (before any work).  Mapped files (the
    libraries' code, the checkpoint's pages) are left out: the kernel drops them under pressure."""
    from lowbit.eval.memory import current_anon_mb

    now = int((current_anon_mb() or 0) * 2**20)
    blocks = decoder_blocks(model)
    block = max(_bytes(b) for b in blocks)
    linears = [[m for m in b.modules() if isinstance(m, torch.nn.Linear)] for b in blocks]
    stats = max(sum(4 * m.in_features ** 2 for m in ms) for ms in linears)
    width = model.get_input_embeddings().weight.shape[1]
    windows = min(batch_size, calib.shape[0])
    batch = windows * calib.shape[1] * width * 4
    # one forward pass: every linear's output and the attention's own, for the batch's tokens (fp32)
    forward = windows * calib.shape[1] * (max(sum(m.out_features for m in ms) for ms in linears) + 2 * width) * 4
    batches = -(-calib.shape[0] // batch_size)
    rows = calib.unique().numel() * (width * 4 + 4096)  # the embedding rows calibration reads, page-rounded
    work = max(rows, 3 * block + 2 * stats + forward)
    minimum = now + work + 2 * batch
    in_ram = minimum + batches * batch
    if max_memory is not None and max_memory < minimum:
        raise LowbitError(f"--max-memory {max_memory / 2**20:.0f} MiB is below what one block needs here: at least "
                          f"{-(-minimum // 2**20)} MiB (this process's own memory {now / 2**20:.0f} MiB, a block, its "
                          f"statistics and one forward pass {work / 2**20:.0f} MiB, two batches of activations "
                          f"{2 * batch / 2**20:.0f} MiB); raise it, or lower --batch-size")
    return MemoryPlan(minimum, in_ram, max_memory is not None and max_memory < in_ram)


class _StreamedBlocks(BlockHooks):
    """Reads each block before the pipeline works on it; writes its part, the next inputs and the state after."""

    def __init__(self, model: torch.nn.Module, reader: WeightReader, dtype: torch.dtype, fmt: str, partial: Path,
                 state: dict[str, Any], blocks_prefix: str) -> None:
        self.model, self.reader, self.dtype, self.fmt = model, reader, dtype, fmt
        self.partial, self.state = partial, state
        self.prefix = blocks_prefix

    def load(self, index: int, block: torch.nn.Module) -> None:
        materialize(block, f"{self.prefix}{index}.", self.reader, self.dtype)

    def done(self, index: int, block: torch.nn.Module, reports: list[LayerReport], inputs: BlockInputs) -> None:
        prefix = f"{self.prefix}{index}."
        written = None
        if self.state["format"] == "auto" and reports:  # auto: decided by the first block the recipe changed
            if any(is_quantized(m) for m in block.modules()):
                written = _block_tensors(self.model, block, prefix, "compressed-tensors", self.dtype)
            fits = written is not None and written[2] is None
            self.state["format"] = "compressed-tensors" if fits else "fake-quant"
            written = written if fits else None
        fmt = "fake-quant" if self.state["format"] == "auto" else self.state["format"]
        tensors, schemes, problem = written or _block_tensors(self.model, block, prefix, fmt, self.dtype)
        if problem is not None:
            raise LowbitError(f"block {index} cannot be written as compressed-tensors: {problem}; rerun with "
                              "--format fake-quant")
        with atomic_file(self.partial / f"block-{index:05d}.safetensors") as tmp:
            save_file(tensors, str(tmp), metadata={"format": "pt"})
        spilled = isinstance(inputs.hidden, SpilledBatches)
        if spilled:
            self.state["hidden_generation"] = inputs.hidden.commit()
        else:
            with atomic_file(self.partial / HIDDEN_FILE) as tmp:
                torch.save(list(inputs.hidden), tmp)
        self.state["schemes"].update(schemes)
        self.state["layers"] += [to_jsonable(asdict(r)) for r in reports]
        self.state["done"] = index + 1
        write_text_atomic(self.partial / STATE_FILE, json.dumps(self.state))  # the commit point of this block
        if spilled:
            inputs.hidden.advance()
        release(block)


def _open_partial(partial: Path, fingerprint: str, resume: bool, overwrite: bool, fmt: str, spill: bool
                  ) -> dict[str, Any]:
    """The run's state: a fresh one, or the interrupted run's when resuming it."""
    fresh = {"fingerprint": fingerprint, "done": 0, "format": fmt, "layers": [], "schemes": {}, "spill": spill}
    state_file = partial / STATE_FILE
    if partial.exists() and not resume and not overwrite:
        raise LowbitError(f"{partial} holds an interrupted streamed run into this output; pass --resume to continue "
                          "it or --overwrite to start over")
    if resume and state_file.is_file():
        try:
            state = json.loads(state_file.read_text())
        except (OSError, ValueError):
            raise LowbitError(f"{state_file} is unreadable; pass --overwrite to start over") from None
        if state.get("fingerprint") != fingerprint:
            raise LowbitError(f"{partial} was started with another model, recipe, calibration, batch size or format; "
                              "rerun with the same ones to resume, or --overwrite to start over")
        return state
    if partial.exists():
        shutil.rmtree(partial)
    partial.mkdir(parents=True)
    return fresh


def _tied_copies(model: torch.nn.Module) -> set[str]:
    """State-dict keys that name a tensor an earlier key already names (a tied head), on the fresh skeleton (meta
    tensors share no storage to compare, so by object)."""
    seen: set[int] = set()
    copies = set()
    for key, t in model.state_dict(keep_vars=True).items():
        if id(t) in seen:
            copies.add(key)
        seen.add(id(t))
    return copies


def _rest(model: torch.nn.Module, reader: WeightReader, blocks_prefix: str, dtype: torch.dtype, tied: set[str]
          ) -> tuple[dict[str, torch.Tensor], list[tuple[str, str, list[int], Path, int, int]]]:
    """The tensors outside the decoder blocks (embedding, final norm, an untied head), ``tied`` copies dropped:
    those already stored in ``dtype`` as spans to copy byte for byte from the checkpoint (never read into memory),
    the others cast here."""
    cast: dict[str, torch.Tensor] = {}
    spans = []
    want = DTYPE_NAMES.get(str(dtype).replace("torch.", ""))
    for key in model.state_dict(keep_vars=True):
        if key.startswith(blocks_prefix) or key in tied:
            continue
        span = reader.span(key) if reader.byte_spans else None
        if span is not None and (span[1] == want or span[1] not in DTYPE_NAMES.values()):
            spans.append(span)
        else:
            cast[key] = reader.tensor(key).to(dtype)
    return cast, spans


def quantize_streamed(ref: str, recipe: Any, calib: torch.Tensor, out: str | os.PathLike[str], tokenizer: Any = None,
                      *, fmt: str = "auto",
                      batch_size: int = 8, resume: bool = False, overwrite: bool = False, progress: bool = True,
                      dtype: torch.dtype = torch.float32, cache: str | None = None, max_memory: int | None = None
                      ) -> tuple[Any, str]:
    """Quantize model ``ref`` (a local or cached safetensors checkpoint) with ``recipe`` block by block into
    ``out`` (module docstring).  Under ``max_memory`` (bytes) the calibration activations go to disk when they do
    not fit beside the block; below the minimum a block needs, LowbitError before work.  Returns
    ``(QuantizationReport, format written)``."""
    from lowbit.data.windows import check_batch_size, check_token_windows
    from lowbit.export.compressed_tensors import checkpoint_config, write_beside_weights
    from lowbit.models.loading import load_config, resolve_model
    from lowbit.quantization import SUMMARY_FILE, build_report, expert_report
    from lowbit.recipe import load_recipe, resolve_outer_targets, resolve_targets

    check_batch_size(batch_size)
    check_token_windows(calib, "quantization's calibration")
    map_large_allocations()  # activations come and go block after block: give their memory back at once
    release_freed_memory()  # what reading the calibration corpus left in the heap
    source = resolve_model(ref, cache)
    config = load_config(source)
    rec = load_recipe(recipe)
    model = meta_model(config, dtype)
    reader = open_weights(source, model, "a streamed run")
    unfused = unfuse_experts(model)  # MoE experts calibrated one by one, as in memory
    reader.follow(model)
    tied = _tied_copies(model)
    assignments = resolve_targets(model, rec)
    check_streamable(rec, assignments, fmt)
    if resolve_outer_targets(model, rec):
        raise LowbitError(f"recipe {rec.name!r} quantizes the embedding or the head, which a streamed run does not do "
                          "yet; run it without --streamed")
    out = Path(out).absolute()
    replacing = allow_replace(out) if overwrite else contextlib.nullcontext()
    with replacing:
        check_replaceable(out)  # before the work, not after it
    partial = partial_dir(out)
    fingerprint = _fingerprint(reader.files(), rec.to_dict(), calib, batch_size, fmt, dtype)
    plan = memory_plan(model, calib, batch_size, max_memory)
    state = _open_partial(partial, fingerprint, resume, overwrite, fmt, plan.spill)
    t0 = time.perf_counter()
    blocks_prefix = architecture_of(model).blocks + "."
    blocks = decoder_blocks(model)
    start = int(state["done"])
    store = None
    if state["spill"]:
        store = SpilledBatches(partial / "hidden", int(state.get("hidden_generation", 0)))
        shutil.rmtree(store.upcoming, ignore_errors=True)  # what a killed block had begun to write
    embed = model.get_input_embeddings()
    embed_name = next(n for n, m in model.named_modules() if m is embed)
    if isinstance(embed, torch.nn.Embedding) and embed.weight.dim() == 2:
        materialize_rows(embed, f"{embed_name}.weight", reader, calib, dtype)  # just the rows calibration reads
    else:
        materialize(embed, f"{embed_name}.", reader, dtype)
    inputs = capture_block_inputs(model, blocks[0], calib, batch_size, store=_Dropped() if start else store)
    release(embed)
    if start:
        inputs.hidden = store if store is not None else torch.load(partial / HIDDEN_FILE, weights_only=True)
    hooks = _StreamedBlocks(model, reader, dtype, fmt, partial, state, blocks_prefix)
    if start < len(blocks):
        run_sequential(model, assignments, calib, batch_size, progress, hooks=hooks, inputs=inputs, start=start)
    seconds = time.perf_counter() - t0
    written = state["format"] if state["format"] != "auto" else "fake-quant"
    report = build_report(rec, state["layers"], model, seconds, calib.numel(),
                          {"streamed": {"resumed_at_block": start, "blocks": len(blocks)}})
    extra = {"recipe.yaml": _yaml(report.recipe), SUMMARY_FILE: json.dumps(report.to_dict(), indent=2)}
    if rec.kv_cache is not None:
        from lowbit.kvcache.config import KV_CACHE_FILE

        extra[KV_CACHE_FILE] = json.dumps(rec.kv_cache.to_dict(), indent=1)
    cast, spans = _rest(model, reader, blocks_prefix, dtype, tied)
    parts = [partial / f"block-{i:05d}.safetensors" for i in range(len(blocks))]
    if cast:
        save_file(cast, str(partial / "rest.safetensors"), metadata={"format": "pt"})
        parts.append(partial / "rest.safetensors")
    del cast
    with allow_replace(out) if overwrite else contextlib.nullcontext(), atomic_dir(out) as tmp:
        assemble_safetensors(parts, tmp / "model.safetensors", {"format": "pt"}, spans)
        if written == "compressed-tensors":
            cfg = checkpoint_config(model, state["schemes"], dtype)
            (tmp / "config.json").write_text(json.dumps(cfg, indent=2, default=str))
        else:  # as save_pretrained writes it
            model.config.architectures = [type(model).__name__]
            model.config.dtype = dtype
            model.config.save_pretrained(tmp)
        write_beside_weights(tmp, None, tokenizer, extra)
        if source.path.is_dir():
            _copy_generation_config(source.path, tmp)
    shutil.rmtree(partial, ignore_errors=True)
    report.extra["format"] = written
    if unfused:
        report.extra["experts"] = expert_report(report.layers, unfused)
    return report, written


def _yaml(recipe: dict[str, Any]) -> str:
    import yaml

    return yaml.safe_dump(recipe, sort_keys=False)


def _copy_generation_config(src: Path, dst: Path) -> None:
    gen = src / "generation_config.json"
    if gen.is_file():
        shutil.copyfile(gen, dst / gen.name)
