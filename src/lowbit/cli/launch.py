"""``--nproc N``: run the same command as N data-parallel ranks on this machine (``lowbit.ranks``), as ``torchrun
--nproc-per-node N`` would, but with one line of error when a rank fails: every rank's output is collected,
the first failure stops the others, and only what it said is shown."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

from lowbit.errors import LowbitError


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _without_nproc(argv: Sequence[str]) -> list[str]:
    out, skip = [], False
    for a in argv:
        if skip:
            skip = False
        elif a == "--nproc":
            skip = True
        elif not a.startswith("--nproc="):
            out.append(a)
    return out


def launch(nproc: int, argv: Sequence[str], threads: int | None = None, module: str = "lowbit.cli") -> int:
    """Run ``python -m MODULE ARGV`` (``--nproc`` dropped) as ``nproc`` ranks; rank 0's output is printed when all
    succeed, else the first failing rank's ``error:`` line; returns the exit code."""
    if nproc < 1:
        raise LowbitError(f"--nproc must be at least 1, got {nproc}")
    port = _free_port()
    per_rank = threads or max(1, (os.cpu_count() or 1) // nproc)
    logs = Path(tempfile.mkdtemp(prefix="lowbit-ranks-"))
    procs = []
    for rank in range(nproc):
        env = dict(os.environ, MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank),
                   WORLD_SIZE=str(nproc), LOCAL_WORLD_SIZE=str(nproc), OMP_NUM_THREADS=str(per_rank))
        out = open(logs / f"{rank}.out", "w")
        err = open(logs / f"{rank}.err", "w")
        procs.append((subprocess.Popen([sys.executable, "-m", module, *_without_nproc(argv)], env=env,
                                       stdout=out, stderr=err), out, err))
    failed = None
    while failed is None and any(p.poll() is None for p, _, _ in procs):
        failed = next((r for r, (p, _, _) in enumerate(procs) if p.poll() not in (None, 0)), None)
        time.sleep(0.1)
    failed = failed if failed is not None else next((r for r, (p, _, _) in enumerate(procs) if p.returncode), None)
    for p, out, err in procs:
        if p.poll() is None:
            p.terminate()
        p.wait()
        out.close()
        err.close()
    if failed is not None:
        lines = (logs / f"{failed}.err").read_text().strip().splitlines()
        print(next((l for l in reversed(lines) if l.startswith("error: ")), lines[-1] if lines else
                   f"error: rank {failed} of {nproc} failed (exit {procs[failed][0].returncode})"), file=sys.stderr)
        return procs[failed][0].returncode or 1
    sys.stdout.write((logs / "0.out").read_text())
    sys.stderr.write((logs / "0.err").read_text())
    return 0
