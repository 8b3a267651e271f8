"""Write-then-rename helpers so that no reader ever sees a half-written output, and nothing the user
did not ask to replace is ever deleted.

* Outputs are written to a temporary path beside the target, ``.NAME.tmp-PID-HOST-XXXXXXXX``, and
  renamed into place only when complete.  A run killed before the rename leaves that temporary
  behind; the next write to the same target removes it once its owner process is gone (same host,
  PID no longer running) or it is older than ``STALE_AGE_S``.
* Every directory written by ``atomic_dir`` holds ``MARKER`` (``lowbit_output.json``, listing the files
  written).  ``atomic_dir`` replaces an existing directory only when it is empty, carries the marker
  (or a file only lowbit writes, ``LEGACY_MARKERS``, for outputs of older versions) and holds nothing
  lowbit did not write there, or was explicitly allowed with
  ``allow_replace`` (the user passed ``--overwrite``); it never replaces the working directory, the
  home directory, the filesystem root or an ancestor of any of them.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import shutil
import socket
import tempfile
import time
from collections.abc import Iterable, Iterator
from pathlib import Path

from lowbit.errors import LowbitError

MARKER = "lowbit_output.json"
LEGACY_MARKERS = ("lowbit_summary.json", "lowbit_source.json", "lowbit_codes.safetensors")
STALE_AGE_S = 6 * 3600  # a temporary whose owner cannot be checked (older layout, other host) is stale after this
_HOST = hashlib.sha1(socket.gethostname().encode()).hexdigest()[:8]
_TOKEN = r"[a-z0-9_]{8}"  # tempfile's random part
_OWNED = re.compile(rf"(?P<pid>\d+)-(?P<host>[0-9a-f]{{8}})-{_TOKEN}")
_LEGACY = re.compile(_TOKEN)
_allowed: set[Path] = set()  # targets being replaced with --overwrite right now (see allow_replace)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def absolute(path: str | os.PathLike[str]) -> Path:
    """``path`` made absolute and normalised lexically (symbolic links are kept)."""
    return Path(os.path.abspath(os.path.expanduser(os.fspath(path))))


@contextlib.contextmanager
def allow_replace(path: str | os.PathLike[str]) -> Iterator[None]:
    """Within this block, let ``atomic_dir`` replace ``path`` though lowbit did not write it (``--overwrite``);
    the permission ends with the block, so a later write there is checked again."""
    p = absolute(path)
    added = p not in _allowed
    _allowed.add(p)
    try:
        yield
    finally:
        if added:
            _allowed.discard(p)


# What older versions wrote (no file list in their marker): the model, tokenizer and lowbit's own files.
_LEGACY_NAMES = re.compile(r"(config|generation_config|special_tokens_map|added_tokens|vocab)\.json|merges\.txt|"
                           r"model(-\d+-of-\d+)?\.safetensors(\.index\.json)?|recipe\.yaml|chat_template\.jinja|"
                           r"tokenizer.*|lowbit_.*")


def _files_under(p: Path) -> list[str]:
    return sorted(str(f.relative_to(p)) for f in p.rglob("*") if f.is_file() or f.is_symlink())


def foreign_files(path: str | os.PathLike[str]) -> list[str] | None:
    """The files in directory ``path`` that lowbit did not write there ([] for an untouched lowbit output);
    None when ``path`` is not a lowbit output at all."""
    p = Path(path)
    if not p.is_dir() or not any((p / name).is_file() for name in (MARKER, *LEGACY_MARKERS)):
        return None
    written: set[str] | None = None
    try:
        listed = json.loads((p / MARKER).read_text()).get("files")
        written = set(listed) if isinstance(listed, list) else None
    except (OSError, ValueError, AttributeError):
        pass
    present = [f for f in _files_under(p) if f != MARKER]
    if written is not None:
        return [f for f in present if f not in written]
    return [f for f in present if not _LEGACY_NAMES.fullmatch(f)]


def is_lowbit_output(path: str | os.PathLike[str]) -> bool:
    """True when directory ``path`` was written by lowbit (it holds ``MARKER`` or a legacy marker) and holds
    nothing else: a file the user added (a model card, notes) makes it the user's."""
    return foreign_files(path) == []


def protected_reason(path: str | os.PathLike[str], inputs: Iterable[str | os.PathLike[str]] = ()) -> str | None:
    """Why ``path`` must never be replaced (it is, or contains, the working directory, the home
    directory, the filesystem root or one of ``inputs``), or None."""
    p = Path(os.path.realpath(absolute(path)))
    if p == Path(p.anchor):
        return "the filesystem root"
    keep = [("the working directory", Path(os.path.realpath(Path.cwd()))),
            ("your home directory", Path(os.path.realpath(Path.home())))]
    keep += [(f"the input {i}", Path(os.path.realpath(absolute(i)))) for i in inputs]
    for what, q in keep:
        if p == q:
            return what
        if p in q.parents:
            return f"a directory holding {what}"
    return None


def _temp_prefix(final: Path) -> str:
    return f".{final.name}.tmp-{os.getpid()}-{_HOST}-"


def _owner_alive(pid: int, host: str) -> bool:
    if host != _HOST:
        return True  # cannot tell: left to the age rule
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # running, as another user
        pass
    return True


def _last_touched(path: Path) -> float:
    """The newest modification time of ``path`` and (for a directory) of everything in it."""
    newest = path.lstat().st_mtime
    if path.is_dir() and not path.is_symlink():
        for root, dirs, files in os.walk(path):
            for name in dirs + files:
                with contextlib.suppress(OSError):
                    newest = max(newest, os.lstat(os.path.join(root, name)).st_mtime)
    return newest


def _is_stale(entry: Path, rest: str) -> bool:
    """True when temporary ``entry`` (``rest``: its name after the prefix) was left by a dead run."""
    owned = _OWNED.fullmatch(rest)
    if owned is None and _LEGACY.fullmatch(rest) is None:
        return False  # not a name lowbit makes
    if owned is not None and owned["host"] == _HOST:  # a run on this host: stale exactly when it is gone
        return not _owner_alive(int(owned["pid"]), owned["host"])
    return time.time() - _last_touched(entry) > STALE_AGE_S  # another host or an older name: by age only


def _discard(path: Path) -> None:
    """Remove ``path`` (a directory tree, a file or a link), ignoring what is already gone."""
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()


def clean_stale(final: str | os.PathLike[str]) -> list[Path]:
    """Remove the temporaries of ``final`` left beside it by killed lowbit runs; returns them."""
    final = absolute(final)
    head = f".{final.name}.tmp-"
    try:
        entries = [e for e in final.parent.iterdir() if e.name.startswith(head)]
    except OSError:
        return []
    removed = []
    for entry in entries:
        with contextlib.suppress(OSError):  # gone meanwhile, or not ours to remove
            if _is_stale(entry, entry.name[len(head):]):
                _discard(entry)
                removed.append(entry)
    return removed


def check_replaceable(final: Path) -> None:
    """LowbitError unless ``atomic_dir`` may put a new directory at ``final`` (see the module docstring)."""
    reason = protected_reason(final)
    if reason is not None:
        raise LowbitError(f"refusing to replace {final}: it is {reason}; choose a new directory for the output")
    if not os.path.lexists(final) or final in _allowed:
        return
    if final.is_symlink() or not final.is_dir():
        raise LowbitError(f"{final} exists and is not a directory; remove it or choose another output path")
    if any(final.iterdir()) and not is_lowbit_output(final):
        raise LowbitError(f"{final} holds files lowbit did not write ({_sample(final)}); refusing to replace it: "
                          "choose a new directory, or pass --overwrite")


def _sample(directory: Path, n: int = 3) -> str:
    """A few of the files in ``directory`` that are not lowbit's (all of them when it is not a lowbit output)."""
    names = foreign_files(directory)
    names = names if names else sorted(p.name for p in directory.iterdir())
    return ", ".join(names[:n]) + (", ..." if len(names) > n else "")


def _swap_in(tmp: Path, final: Path) -> None:
    """Rename ``tmp`` to ``final``; a previous ``final`` is moved aside first and removed after."""
    if not os.path.lexists(final):
        os.replace(tmp, final)
        return
    check_replaceable(final)  # again: it may have changed while the output was being written
    old = Path(tempfile.mkdtemp(prefix=_temp_prefix(final), dir=final.parent))
    os.rmdir(old)  # only its unique name is needed
    os.rename(final, old)
    try:
        os.replace(tmp, final)
    except BaseException:
        os.rename(old, final)
        raise
    _discard(old)


def _write_marker(directory: Path) -> None:
    from lowbit import __version__

    files = _files_under(directory)  # what this output holds: anything else found there later is the user's
    (directory / MARKER).write_text(json.dumps({"written_by": "lowbit", "version": __version__, "files": files}) + "\n")


@contextlib.contextmanager
def atomic_dir(final: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a temporary directory beside ``final``; rename it to ``final`` only on success.

    Refuses (LowbitError, before anything is written) to replace a directory lowbit did not write.
    """
    final = absolute(final)
    check_replaceable(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    clean_stale(final)
    tmp = Path(tempfile.mkdtemp(prefix=_temp_prefix(final), dir=final.parent))
    try:
        yield tmp
        _write_marker(tmp)
        os.chmod(tmp, 0o777 & ~_umask())
        _swap_in(tmp, final)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


@contextlib.contextmanager
def atomic_file(final: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a temporary file path beside ``final``; rename it to ``final`` only on success."""
    final = absolute(final)
    if final.is_dir():
        raise LowbitError(f"{final} is a directory; give a file path for this output")
    final.parent.mkdir(parents=True, exist_ok=True)
    clean_stale(final)
    fd, name = tempfile.mkstemp(prefix=_temp_prefix(final), dir=final.parent)
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, final)
    finally:
        if tmp.exists():
            tmp.unlink()


def write_text_atomic(path: str | os.PathLike[str], text: str) -> Path:
    """Write ``text`` (UTF-8) to ``path`` through a temporary file, so no reader sees half of it."""
    with atomic_file(Path(path)) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return Path(path)
