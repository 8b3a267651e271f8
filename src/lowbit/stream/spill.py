"""Calibration activations kept on disk instead of in memory (a streamed run under ``--max-memory``).

``SpilledBatches`` stands in for the list of per-batch hidden states the pipeline reads and replaces: batch
``j`` is read from its file when used, and a replacement goes to the next generation's folder, so the inputs of
the block being worked on stay intact until ``commit`` (the block is done) makes the new ones current.  A run
killed mid-block therefore resumes from whole, consistent inputs."""

from __future__ import annotations

import re
import shutil
from pathlib import Path
from typing import Iterator

import torch

from lowbit.errors import LowbitError


class SpilledBatches:
    """A list of tensors stored one file per item under ``root/gen-K`` (module docstring)."""

    def __init__(self, root: Path, generation: int = 0) -> None:
        self.root = Path(root)
        self.generation = generation
        self._next: set[int] = set()
        self.current.mkdir(parents=True, exist_ok=True)
        self._len = len(list(self.current.glob("*.pt")))

    @property
    def current(self) -> Path:
        return self.root / f"gen-{self.generation}"

    @property
    def upcoming(self) -> Path:
        return self.root / f"gen-{self.generation + 1}"

    def __len__(self) -> int:
        return self._len

    def _file(self, folder: Path, j: int) -> Path:
        return folder / f"{j:06d}.pt"

    def __getitem__(self, j: int) -> torch.Tensor:
        if not 0 <= j < self._len:
            raise IndexError(j)
        folder = self.upcoming if j in self._next else self.current
        return torch.load(self._file(folder, j), weights_only=True)

    def __setitem__(self, j: int, value: torch.Tensor) -> None:
        if not 0 <= j < self._len:
            raise IndexError(j)
        self.upcoming.mkdir(exist_ok=True)
        torch.save(value.contiguous(), self._file(self.upcoming, j))
        self._next.add(j)

    def append(self, value: torch.Tensor) -> None:
        """Add a batch to the current generation (while the first block's inputs are captured)."""
        torch.save(value.contiguous(), self._file(self.current, self._len))
        self._len += 1

    def __iter__(self) -> Iterator[torch.Tensor]:
        return (self[j] for j in range(self._len))

    def commit(self) -> int:
        """Make the replaced batches current (every batch must have been replaced); the new generation number."""
        if len(self._next) != self._len:
            raise LowbitError(f"only {len(self._next)} of {self._len} spilled batches were replaced in this block")
        return self.generation + 1

    def advance(self) -> None:
        """After the run's state records ``commit()``'s generation: drop the old files and move on."""
        shutil.rmtree(self.current, ignore_errors=True)
        self.generation += 1
        self._next = set()


def parse_memory(text: str) -> int:
    """Bytes from ``600MiB`` / ``600MB`` / ``1.5GiB`` / ``2GB`` / a bare number of MiB."""
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([KMGT]i?B?)?\s*", str(text), re.IGNORECASE)
    if m is None:
        raise LowbitError(f"--max-memory {text!r} is not a size; write e.g. 600MiB, 1.5GiB or 2GB")
    value, unit = float(m.group(1)), (m.group(2) or "MiB").upper()
    base = 1024 if "I" in unit or len(unit) == 1 else 1000
    scale = base ** ("KMGT".index(unit[0]) + 1)
    if value <= 0:
        raise LowbitError(f"--max-memory must be positive, got {text!r}")
    return int(value * scale)
