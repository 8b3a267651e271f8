"""The one guard every command-line writer calls on its output path before any work starts.

``check_output(path, kind, overwrite, inputs, option)`` raises ``LowbitError`` (one line naming the
problem and the fix) when writing there could lose the user's data or would fail at the end:

* all kinds: an empty path, a path under /proc, /sys or /dev, a parent that is a file or that
  this user cannot write;
* ``"dir"`` (a checkpoint directory, replaced as a whole by ``lowbit.atomic.atomic_dir``): the
  working directory, the home directory, the filesystem root, an input, or a directory holding any
  of them (even with ``overwrite``); an existing file or mount point; a non-empty directory lowbit
  did not write, unless ``overwrite`` (the writer then replaces it: ``save_quantized(overwrite=True)``);
* ``"file"`` (a single file, e.g. GGUF): the same protected paths; an existing directory; an
  existing file unless ``overwrite``;
* ``"results"`` (a results directory that lowbit writes named files into and never deletes, so a
  previous one is reused): an existing file, or a non-empty directory holding no lowbit results.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path
from typing import Literal

from lowbit.atomic import absolute, foreign_files, is_lowbit_output, protected_reason
from lowbit.errors import LowbitError

Kind = Literal["dir", "file", "results"]
SYSTEM_DIRS = ("/proc", "/sys", "/dev")
RESULT_KINDS = ("sweep", "sensitivity", "analysis")  # one KIND.json each in a results directory


def results_path(directory: str | os.PathLike[str], kind: str) -> Path:
    """The file of the ``kind`` results in a results directory (``lowbit.analysis.results`` reads and writes it)."""
    if kind not in RESULT_KINDS:
        raise ValueError(f"kind must be one of {RESULT_KINDS}, got {kind!r}")
    return Path(directory) / f"{kind}.json"


def is_results_dir(directory: str | os.PathLike[str]) -> bool:
    """True when ``directory`` holds results of any kind (so lowbit may write more results there)."""
    return any(results_path(directory, kind).is_file() for kind in RESULT_KINDS)


def input_paths(*refs: str | os.PathLike[str] | None, cache: str | None = None) -> list[Path]:
    """The local files and directories that ``refs`` (model references, recipe or data paths) name:
    a built-in model alias gives its converted checkpoint in the cache; hub ids and names give nothing."""
    from lowbit.models.aliases import ALIASES
    from lowbit.cache import cache_dir
    from lowbit.models.loading import _alias_dir

    paths = []
    for ref in refs:
        if ref is None or str(ref) == "":
            continue
        if str(ref) in ALIASES:
            paths.append(_alias_dir(str(ref), cache_dir(cache)))
        elif os.path.lexists(absolute(ref)):
            paths.append(absolute(ref))
    return paths


def _fail(label: str, path: str, problem: str) -> LowbitError:
    return LowbitError(f"{label} {path} {problem}")


def _check_system(p: Path, label: str, given: str) -> None:
    real = os.path.realpath(p)
    for root in SYSTEM_DIRS:
        if any(x == root or x.startswith(root + "/") for x in (str(p), real)):
            raise _fail(label, given, f"is under {root}, which holds no user files; choose a path in your own "
                                      "directories")


def _check_parent(p: Path, label: str, given: str) -> None:
    """The nearest existing ancestor of ``p`` must be a directory this user can write."""
    parent = p.parent
    while not os.path.lexists(parent):
        parent = parent.parent
    if not parent.is_dir():
        raise _fail(label, given, f"cannot be created: {parent} is a file, not a directory; choose another path")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise _fail(label, given, f"cannot be written: no permission to write in {parent} (or it is read-only); "
                                  "choose another path")


def _check_dir(p: Path, label: str, given: str, overwrite: bool) -> None:
    if not os.path.lexists(p):
        return
    if p.is_symlink() or not p.is_dir():
        raise _fail(label, given, "exists and is not a directory (a file or a link); choose another path")
    if os.path.ismount(p):
        raise _fail(label, given, "is a mount point; give a directory inside it")
    try:
        if overwrite or is_lowbit_output(p) or not any(p.iterdir()):
            return
        added = foreign_files(p)
    except PermissionError:
        raise _fail(label, given, "cannot be read (permission denied); choose another path") from None
    if added:
        raise _fail(label, given, f"is a lowbit output holding files lowbit did not write ({', '.join(added[:3])}"
                                  f"{', ...' if len(added) > 3 else ''}); pass --overwrite to replace it with them, "
                                  "or choose another path")
    raise _fail(label, given, "is a non-empty directory that lowbit did not write; pass --overwrite to replace "
                              "it (its contents are deleted), or choose another path")


def _check_file(p: Path, label: str, given: str, overwrite: bool) -> None:
    if p.is_dir():
        raise _fail(label, given, "is a directory; give a file path")
    if os.path.lexists(p) and not overwrite:
        raise _fail(label, given, "already exists; pass --overwrite to replace it, or choose another path")


def _check_results(p: Path, label: str, given: str) -> None:
    if not os.path.lexists(p):
        return
    if not p.is_dir():
        raise _fail(label, given, "is a file; give a directory for the results")
    try:
        holds = any(p.iterdir())
    except PermissionError:
        raise _fail(label, given, "cannot be read (permission denied); choose another path") from None
    if holds and not is_results_dir(p):
        raise _fail(label, given, "is a non-empty directory holding no lowbit results; give a new or empty directory, "
                                  "or one written by 'lowbit sweep' / 'lowbit analyze'")
    if not os.access(p, os.W_OK | os.X_OK):
        raise _fail(label, given, "cannot be written (permission denied or read-only); choose another directory")


def check_output(path: str | os.PathLike[str] | None, kind: Kind, overwrite: bool = False,
                 inputs: Iterable[str | os.PathLike[str]] = (), option: str | None = None) -> Path:
    """Check that writing output ``kind`` at ``path`` is safe (see the module docstring) and return
    it absolute; ``option`` names the argument in the error (e.g. ``--out``)."""
    label = option or "output"
    given = "" if path is None else os.fspath(path)
    if not given.strip():
        raise LowbitError(f"{label} is empty: give the path to write")
    p = absolute(given)
    _check_system(p, label, given)
    if kind != "results":
        reason = protected_reason(p, inputs)
        if reason is not None:
            raise _fail(label, given, f"is {reason}, which is never replaced (not even with --overwrite); "
                                      "choose a new path for the output")
    if kind == "dir":
        _check_dir(p, label, given, overwrite)
    elif kind == "file":
        _check_file(p, label, given, overwrite)
    elif kind == "results":
        _check_results(p, label, given)
    else:
        raise ValueError(f"kind must be dir, file or results, got {kind!r}")
    _check_parent(p, label, given)
    return p

