"""One safetensors file from several, streamed: headers merged, each tensor's bytes copied through a small
buffer, so a checkpoint larger than memory is written without holding it.

Tensors are laid out as the safetensors library (0.8) lays them out (by its dtype order, widest first, then by
name), so every tensor is aligned and the file is byte for byte what ``save_file`` writes for the same tensors."""

from __future__ import annotations

import json
from pathlib import Path

from lowbit.checkpoint import safetensors_spans
from lowbit.errors import LowbitError

# safetensors' order of dtypes in a file (measured with save_file: one tensor of each)
_ORDER = ["U64", "I64", "F64", "C64", "F32", "U32", "I32", "BF16", "F16", "U16", "I16", "F8_E8M0", "F8_E4M3",
          "F8_E5M2", "I8", "U8", "F6_E3M2", "F6_E2M3", "F4", "BOOL"]
CHUNK = 16 << 20


def _entries(parts: list[Path]) -> list[tuple[str, str, list[int], Path, int, int]]:
    """(name, dtype, shape, part, start, end) of every tensor of ``parts``, offsets from the part's start."""
    out, seen = [], {}
    for part in parts:
        for name, (dtype, shape, start, end) in safetensors_spans(part).items():
            if name in seen:
                raise LowbitError(f"tensor {name} is in both {seen[name].name} and {part.name}")
            seen[name] = part
            out.append((name, dtype, shape, part, start, end))
    return out


def assemble_safetensors(parts: list[Path], out: Path, metadata: dict[str, str] | None = None,
                         spans: list[tuple[str, str, list[int], Path, int, int]] = ()) -> int:
    """Write every tensor of ``parts`` into ``out`` (a new file), and every ``spans`` entry (name, dtype, shape,
    file, start, end: bytes copied as they are from another safetensors file); returns the size in bytes."""
    entries = _entries(parts)
    names = {e[0] for e in entries}
    for span in spans:
        if span[0] in names:
            raise LowbitError(f"tensor {span[0]} is both in a part and copied from {span[3].name}")
        entries.append(span)
    entries.sort(key=lambda e: (_ORDER.index(e[1]) if e[1] in _ORDER else len(_ORDER), e[0]))
    header: dict = {"__metadata__": metadata} if metadata else {}
    offset = 0
    for name, dtype, shape, _, start, end in entries:
        header[name] = {"dtype": dtype, "shape": shape, "data_offsets": [offset, offset + end - start]}
        offset += end - start
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    with open(out, "wb") as dst:
        dst.write(len(raw).to_bytes(8, "little"))
        dst.write(raw)
        handles: dict[Path, object] = {}
        try:
            for name, _, _, part, start, end in entries:
                src = handles.get(part) or handles.setdefault(part, open(part, "rb"))
                src.seek(start)  # type: ignore[attr-defined]
                left = end - start
                while left:
                    chunk = src.read(min(CHUNK, left))  # type: ignore[attr-defined]
                    if not chunk:
                        raise LowbitError(f"{part} ends inside tensor {name}; the part file is truncated")
                    dst.write(chunk)
                    left -= len(chunk)
        finally:
            for h in handles.values():
                h.close()  # type: ignore[attr-defined]
    return 8 + len(raw) + offset
