"""Run a lowbit ONNX export in ONNX Runtime (CPU provider): logits, perplexity, greedy decoding, speed.

The file written by ``lowbit export --format onnx`` carries its config and tokenizer in its
metadata; ``OnnxDecoder`` reads them back, feeds ``input_ids`` / ``attention_mask`` /
``position_ids`` and the KV cache, and returns numpy logits.
"""

from __future__ import annotations

import base64
import json
import math
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from lowbit.errors import LowbitError
from lowbit.export.onnx_meta import ACCURACY_KEY, CONFIG_KEY, TOKENIZER_PREFIX


def is_onnx_path(ref: str | Path) -> bool:
    return str(ref).lower().endswith(".onnx")


def _ort() -> Any:
    try:
        import onnxruntime
    except ImportError:
        raise LowbitError("running an .onnx model needs onnxruntime: pip install 'lowbit[onnx]'") from None
    return onnxruntime


_METADATA_FIELD = 14  # ModelProto.metadata_props


def _varint(buf: Any, pos: int) -> tuple[int, int]:
    value, shift = 0, 0
    while True:
        if pos >= len(buf) or shift > 63:
            raise ValueError("truncated or overlong varint")
        byte = buf[pos]
        value |= (byte & 0x7F) << shift
        pos, shift = pos + 1, shift + 7
        if byte < 0x80:
            return value, pos


def read_metadata(path: Path) -> dict[str, str]:
    """An ONNX file's ``metadata_props``, read from its top-level protobuf fields without parsing the graph (the
    weights are skipped by their length prefix, so this costs a few reads, not a second load of the model)."""
    import mmap

    from onnx import StringStringEntryProto

    props: dict[str, str] = {}
    try:
        with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as buf:
            pos = 0
            while pos < len(buf):
                key, pos = _varint(buf, pos)
                field, wire = key >> 3, key & 7
                if wire == 0:
                    _, pos = _varint(buf, pos)
                elif wire in (1, 5):
                    pos += 8 if wire == 1 else 4
                elif wire == 2:
                    size, pos = _varint(buf, pos)
                    if pos + size > len(buf):
                        raise ValueError("field runs past the end of the file")
                    if field == _METADATA_FIELD:
                        entry = StringStringEntryProto.FromString(buf[pos:pos + size])
                        props[entry.key] = entry.value
                    pos += size
                else:
                    raise ValueError(f"unexpected wire type {wire}")
    except (ValueError, OSError) as e:  # protobuf's DecodeError is a ValueError too
        raise LowbitError(f"{path} is not a readable ONNX file ({str(e).splitlines()[0][:200]})") from None
    return props


def read_accuracy_level(path: Path) -> int:
    """The MatMulNBits accuracy level a lowbit ONNX file was exported with (0 when it does not say)."""
    value = read_metadata(path).get(ACCURACY_KEY, "0")
    return int(value) if value.isdigit() else 0


class OnnxDecoder:
    """An ONNX Runtime session over a lowbit ONNX decoder, with its config and tokenizer."""

    def __init__(self, path: str | Path, threads: int | None = None) -> None:
        ort = _ort()
        self.path = Path(path)
        if not self.path.is_file():
            raise LowbitError(f"no ONNX file at {self.path}")
        opts = ort.SessionOptions()
        if threads:
            opts.intra_op_num_threads = threads
        self.accuracy_level = read_accuracy_level(self.path)
        # ONNX Runtime fuses QDQ weights into MatMulNBits at its own default accuracy (int8 activations);
        # run them at the level the file was exported for, as its MatMulNBits nodes are
        opts.add_session_config_entry("session.qdq_matmulnbits_accuracy_level", str(self.accuracy_level))
        try:
            self.session = ort.InferenceSession(str(self.path), opts, providers=["CPUExecutionProvider"])
        except Exception as e:  # onnxruntime raises its own exception types for unreadable files
            raise LowbitError(f"{self.path}: ONNX Runtime cannot load it ({str(e).splitlines()[0][:200]})") from None
        meta = self.session.get_modelmeta().custom_metadata_map
        if CONFIG_KEY not in meta:
            raise LowbitError(f"{self.path} was not written by 'lowbit export --format onnx' (no lowbit config in "
                              f"its metadata)")
        self.config = json.loads(meta[CONFIG_KEY])
        self._tokenizer_files = {k[len(TOKENIZER_PREFIX):]: v for k, v in meta.items() if k.startswith(TOKENIZER_PREFIX)}
        names = {i.name: i for i in self.session.get_inputs()}
        self.n_layers = sum(1 for n in names if n.endswith(".key"))
        first = names["past_key_values.0.key"].shape
        self.kv_heads, self.head_dim = int(first[1]), int(first[3])
        self.context = int(self.config.get("max_position_embeddings") or 0) or None

    def tokenizer(self) -> Any:
        from transformers import AutoTokenizer

        with tempfile.TemporaryDirectory() as d:
            for name, data in self._tokenizer_files.items():
                if "/" in name or name.startswith("."):
                    raise LowbitError(f"{self.path}: tokenizer file name {name!r} in its metadata is not a plain name")
                (Path(d) / name).write_bytes(base64.b64decode(data))
            return AutoTokenizer.from_pretrained(d)

    def empty_cache(self, batch: int) -> list[np.ndarray]:
        return [np.zeros((batch, self.kv_heads, 0, self.head_dim), dtype=np.float32) for _ in range(2 * self.n_layers)]

    def forward(self, ids: np.ndarray, cache: list[np.ndarray] | None = None) -> tuple[np.ndarray, list[np.ndarray]]:
        """Logits ``(batch, new, vocab)`` for ``ids`` after ``cache`` (None: empty), and the grown cache."""
        ids = np.asarray(ids, dtype=np.int64)
        batch, new = ids.shape
        cache = cache if cache is not None else self.empty_cache(batch)
        past = cache[0].shape[2]
        feeds = {"input_ids": ids, "attention_mask": np.ones((batch, past + new), dtype=np.int64),
                 "position_ids": np.broadcast_to(np.arange(past, past + new, dtype=np.int64), (batch, new)).copy()}
        for i in range(self.n_layers):
            feeds[f"past_key_values.{i}.key"] = cache[2 * i]
            feeds[f"past_key_values.{i}.value"] = cache[2 * i + 1]
        outs = self.session.run(None, feeds)
        names = [o.name for o in self.session.get_outputs()]
        by_name = dict(zip(names, outs))
        present = [by_name[f"present.{i}.{kv}"] for i in range(self.n_layers) for kv in ("key", "value")]
        return by_name["logits"], present


def onnx_perplexity(decoder: OnnxDecoder, windows: torch.Tensor, progress: bool = False) -> dict[str, float]:
    """NLL sum, predicted-token count and forward seconds of ``windows`` run one at a time (empty cache each)."""
    from tqdm import tqdm

    from lowbit.eval.nll import nll_sum

    nll, count, seconds = 0.0, 0, 0.0
    for row in tqdm(windows, desc="eval (onnxruntime)", unit="win", disable=not progress, leave=False):
        ids = row.unsqueeze(0).numpy()
        t0 = time.perf_counter()
        logits, _ = decoder.forward(ids)
        seconds += time.perf_counter() - t0
        nll += nll_sum(torch.from_numpy(logits[:, :-1]), row.unsqueeze(0)[:, 1:]).item()
        count += ids.shape[1] - 1
    return {"nll_sum": nll, "count": count, "seconds": seconds}


def onnx_generate(decoder: OnnxDecoder, prompt_ids: list[int], max_new_tokens: int, eos: int | None = None
                  ) -> list[int]:
    """Greedy continuation of ``prompt_ids`` with the KV cache: the new token ids (up to ``eos``, included)."""
    logits, cache = decoder.forward(np.asarray([prompt_ids]))
    out: list[int] = []
    while len(out) < max_new_tokens:
        out.append(int(logits[0, -1].argmax()))
        if out[-1] == eos:
            break
        if len(out) < max_new_tokens:
            logits, cache = decoder.forward(np.asarray([[out[-1]]]), cache)
    return out


def onnx_speed(decoder: OnnxDecoder, prompt_ids: list[int], new_tokens: int = 64, repeats: int = 3) -> dict[str, float]:
    """Best-of-``repeats`` prefill and decode tokens per second (the lowbit speed benchmark's protocol)."""
    prompt = np.asarray([prompt_ids])
    best_prefill, best_decode = math.inf, math.inf
    decoder.forward(prompt[:, :8])  # warm-up: ONNX Runtime plans its buffers on the first run
    for _ in range(repeats):
        t0 = time.perf_counter()
        logits, cache = decoder.forward(prompt)
        best_prefill = min(best_prefill, time.perf_counter() - t0)
        nxt = int(logits[0, -1].argmax())
        t0 = time.perf_counter()
        for _ in range(new_tokens):
            logits, cache = decoder.forward(np.asarray([[nxt]]), cache)
            nxt = int(logits[0, -1].argmax())
        best_decode = min(best_decode, time.perf_counter() - t0)
    return {"prefill_tok_s": prompt.shape[1] / best_prefill, "decode_tok_s": new_tokens / best_decode}


def evaluate_onnx(path: str | Path, dataset: str = "wikitext2", split: str = "test", seqlen: int = 2048,
                  max_windows: int | None = None, data_dir: str | None = None, progress: bool = False) -> Any:
    """``lowbit.eval.perplexity.evaluate`` for an ONNX file: the same windows, run by ONNX Runtime."""
    from lowbit.data import eval_windows, load_text, tokenize_text
    from lowbit.eval.memory import peak_rss_mb
    from lowbit.eval.perplexity import EvalResult

    decoder = OnnxDecoder(path)
    if decoder.context is not None and seqlen > decoder.context:
        raise LowbitError(f"seqlen {seqlen} exceeds the model's context of {decoder.context} tokens; use --seqlen "
                          f"{decoder.context} or less")
    tokenizer = decoder.tokenizer()
    try:
        windows = eval_windows(tokenize_text(tokenizer, load_text(dataset, split, data_dir)), seqlen, max_windows)
    except LowbitError as e:
        raise LowbitError(f"evaluation data {dataset} ({split}): {e}") from None
    t0 = time.perf_counter()
    m = onnx_perplexity(decoder, windows, progress)
    nll = m["nll_sum"] / m["count"]
    return EvalResult(model=str(path), dataset=dataset, split=split, seqlen=seqlen, windows=windows.shape[0],
                      tokens=windows.numel(), perplexity=math.exp(nll), nll=nll, kl=None, top1_agreement=None,
                      reference=None, seconds=time.perf_counter() - t0, tokens_per_s=windows.numel() / m["seconds"],
                      peak_rss_mb=peak_rss_mb(), peak_device_mb=None, device="cpu (onnxruntime)", dtype="float32")
