"""lowbit's native decode kernels: ``gemv.c`` (the math) behind the torch operators of ``ops.cpp``.

* ``qgemv``: a few tokens times a 4- or 8-bit group-quantized weight, read straight from the layer's
  packed words (no second copy), computed in fp32;
* ``fgemv``: the same for a plain fp32 weight (MKL's GEMV reads it at about a third of this
  machine's memory bandwidth: an output head of 49152 x 576 took 11.4 ms there, 3.4 ms here);
* ``dequant``: a 4- / 8-bit weight to fp32 in one pass (the prefill path's GEMM input), bit-identical
  to ``lowbit.packed.kernels.dequantize_packed``'s torch expression.

The library is built once per machine with the system compilers (``$CC`` / ``$CXX``, else ``cc`` /
``c++``; ``-O3 -march=native -fopenmp``, against the running torch's headers and its OpenMP runtime, so
both share one thread pool) into ``<lowbit cache>/kernels/<hash>/`` (the hash covers the sources,
the compilers, the flags, torch's version and the CPU's flags), built in a temporary directory and
renamed into place.  Registered as C++ operators (``torch.ops.lowbit_native``) they cost a few
microseconds a call from eager code and from ``torch.compile``'d graphs alike.  Without compilers, on
a failed build, or with ``LOWBIT_NATIVE=0``, ``available()`` is False and layers use torch's kernels.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

import torch

from lowbit.cache import cache_dir

HERE = Path(__file__).parent
SOURCES = (HERE / "gemv.c", HERE / "ops.cpp")
C_FLAGS = ("-O3", "-march=native", "-fopenmp", "-fPIC", "-std=c11")
CXX_FLAGS = ("-O2", "-std=c++17", "-fPIC", "-fopenmp", "-shared", "-w")
BUILD_TIMEOUT_S = 300
_state: dict[str, object] = {}


def _cpu_flags() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return line
    except OSError:
        pass
    return ""


def _compilers() -> tuple[str, str] | None:
    cc = shutil.which(os.environ.get("CC", "cc")) or shutil.which("gcc")
    cxx = shutil.which(os.environ.get("CXX", "c++")) or shutil.which("g++")
    return (cc, cxx) if cc and cxx else None


def library_path(cc: str, cxx: str) -> Path:
    """Where the library built by these compilers for this machine and torch lives."""
    h = hashlib.sha256()
    for part in [*(p.read_bytes() for p in SOURCES), cc.encode(), cxx.encode(), " ".join(C_FLAGS + CXX_FLAGS).encode(),
                 torch.__version__.encode(), _cpu_flags().encode()]:
        h.update(part)
    return cache_dir() / "kernels" / h.hexdigest()[:16] / "liblowbit_native.so"


def _build(cc: str, cxx: str, out: Path) -> None:
    from torch.utils.cpp_extension import include_paths

    torch_lib = Path(torch.__file__).parent / "lib"
    abi = f"-D_GLIBCXX_USE_CXX11_ABI={int(torch.compiled_with_cxx11_abi())}"
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".build-", dir=out.parent) as tmp:
        obj, so = Path(tmp) / "gemv.o", Path(tmp) / out.name
        run = dict(check=True, capture_output=True, timeout=BUILD_TIMEOUT_S)
        subprocess.run([cc, *C_FLAGS, "-c", str(SOURCES[0]), "-o", str(obj)], **run)
        subprocess.run([cxx, *CXX_FLAGS, abi, *(f"-I{p}" for p in include_paths()), str(SOURCES[1]), str(obj),
                        "-o", str(so), f"-L{torch_lib}", "-ltorch_cpu", "-lc10", f"-Wl,-rpath,{torch_lib}"], **run)
        os.replace(so, out)


def _load() -> bool:
    if os.environ.get("LOWBIT_NATIVE", "1") == "0":
        return False
    compilers = _compilers()
    if compilers is None:
        return False
    path = library_path(*compilers)
    try:
        if not path.is_file():
            _build(*compilers, path)
        torch.ops.load_library(str(path))
    except (OSError, RuntimeError, subprocess.SubprocessError):
        return False
    _register_fakes()
    return True


def _register_fakes() -> None:
    """Shapes of the operators' outputs for tracing (``torch.compile``, meta tensors)."""

    @torch.library.register_fake("lowbit_native::qgemv")
    def _qgemv(x, packed, scale, zero, bias, bits, group_size, out_features):  # noqa: ANN001, ANN202
        return x.new_empty(*x.shape[:-1], out_features)

    @torch.library.register_fake("lowbit_native::fgemv")
    def _fgemv(x, weight, bias):  # noqa: ANN001, ANN202
        return x.new_empty(*x.shape[:-1], weight.shape[0])

    @torch.library.register_fake("lowbit_native::dequant")
    def _dequant(packed, scale, zero, bits, group_size, rows, cols):  # noqa: ANN001, ANN202
        return scale.new_empty(rows, cols)


def available() -> bool:
    """Whether the native operators are loaded (building them on first use)."""
    if "ok" not in _state:
        _state["ok"] = _load()
    return bool(_state["ok"])


def uses_avx512() -> bool:
    return available() and bool(torch.ops.lowbit_native.avx512())


def qgemv(x: torch.Tensor, packed: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None,
          bias: torch.Tensor | None, bits: int, group_size: int, out_features: int) -> torch.Tensor:
    """``x @ W^T (+ bias)`` for fp32 ``x`` (..., K), ``W`` the ``bits``-bit packed words (N, K * bits / 32)
    int32 with fp32 ``scale`` and int8 ``zero`` (N, groups), all contiguous on the CPU (the caller checks:
    ``lowbit.packed.kernels.native_layout``)."""
    return torch.ops.lowbit_native.qgemv.default(x, packed, scale, zero, bias, bits, group_size, out_features)


def fgemv(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """``x @ weight^T (+ bias)`` for fp32 ``x`` (..., K) and a contiguous fp32 ``weight`` (N, K)."""
    return torch.ops.lowbit_native.fgemv.default(x, weight, bias)


def dequant(packed: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None, bits: int, group_size: int,
            shape: tuple[int, int]) -> torch.Tensor:
    """The fp32 weight (N, K) of packed words ``packed`` with ``scale`` / ``zero`` (as ``qgemv``), in one pass."""
    return torch.ops.lowbit_native.dequant.default(packed, scale, zero, bits, group_size, shape[0], shape[1])
