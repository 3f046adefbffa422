"""Building and loading the native CPU loops (``loops.c``): compiled on first use, cached per machine.

Why native loops: uniquified DKM makes four passes over the weights every step
(count the patterns, gather the soft weight, sum the gradient per pattern,
gather each weight's gradient).  In torch each is a ``bincount`` or
``index_select`` on the patterns widened to int32: 5 to 6 elementwise passes
apiece over 4M bf16 weights; one C loop per pass reads each 16-bit pattern
once: 1.4 to 3 passes.  The sparse path's float64 scatter-adds are one loop too.

The loops are compiled with the system C compiler (``$CC``, else ``cc``) into a
cache folder (``$TORCHDKM_CACHE``, else ``~/.cache/torchdkm``) and loaded with
``ctypes``, which releases the GIL (so :mod:`.cpu` can split a pass over
threads).  No compiler or a failed build: :func:`library` returns ``None``
(one warning says why) and :mod:`torchdkm.kernels` selects the torch kernels.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import warnings
from pathlib import Path

SOURCE = Path(__file__).with_name("loops.c")
#: The sparse path's loops, compiled into the same library as ``loops.c``.
SPARSE_SOURCE = Path(__file__).with_name("sparse.c")
#: The inference loops (a palettized weight used from its indices and LUT), a library of their own.
LUT_SOURCE = Path(__file__).with_name("lut.c")
#: Their threads (torch's OpenMP team), compiled into the same library.
POOL_SOURCE = Path(__file__).with_name("pool.c")
#: The inference loops' vector paths (one file per instruction set; lut_gemm.c: many rows of x at once), and the
#: header they share with lut.c.
LUT_VECTOR_SOURCES = tuple(Path(__file__).with_name(name) for name in ("lut_avx512.c", "lut_avx2.c", "lut_gemm.c"))
LUT_HEADER = Path(__file__).with_name("lut.h")
#: The files each library is compiled from (named by its first).
PARTS = {SOURCE: (SOURCE, SPARSE_SOURCE), LUT_SOURCE: (LUT_SOURCE, *LUT_VECTOR_SOURCES, POOL_SOURCE)}
#: Headers the sources include: part of the cache key, not compiled on their own.
HEADERS = {LUT_SOURCE: (LUT_HEADER,)}
FLAGS = ("-O3", "-std=c99", "-shared", "-fPIC", "-ffp-contract=off")

_lock = threading.Lock()
_loaded: dict[Path, ctypes.CDLL | None] = {}  # per source, once a build was tried (None: it failed)


def library() -> ctypes.CDLL | None:
    """The compiled loops, building them on first use; ``None`` where they cannot be had."""
    return _library(SOURCE)


def lut_library() -> ctypes.CDLL | None:
    """The compiled inference loops (``lut.c``), built on first use; ``None`` where they cannot be had."""
    return _library(LUT_SOURCE)


def _library(source: Path) -> ctypes.CDLL | None:
    found = _loaded.get(source, False)
    if found is False:
        with _lock:
            if source not in _loaded:
                _loaded[source] = _load(source)
            found = _loaded[source]
    return found


def forget() -> None:
    """Drop the loaded libraries, so the next call builds or loads them again (tests of the build)."""
    with _lock:
        _loaded.clear()


def simd(enabled: bool | None = None) -> bool:
    """Whether the gathers run their AVX-512 versions (identical results, 1.2-1.5x faster); ``enabled`` sets it.

    On by default where the CPU and the OS support AVX-512; the tests run every loop both ways.
    """
    loops = library()
    if loops is None:
        return False
    return bool(loops.tdkm_simd(-1 if enabled is None else int(enabled)))


def _cache_dir() -> Path:
    if os.environ.get("TORCHDKM_CACHE"):
        return Path(os.environ["TORCHDKM_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "torchdkm"


def _load(path: Path) -> ctypes.CDLL | None:
    if sys.platform == "win32":
        return None
    compiler = os.environ.get("CC", "cc")
    if shutil.which(compiler) is None:
        what = "uniquified DKM" if path == SOURCE else "palettized inference"
        warnings.warn(f"torchdkm: no C compiler {compiler!r}: {what} uses the slower torch loops", stacklevel=4)
        return None
    parts = PARTS.get(path, (path,))
    runtime = openmp_runtime() if path == LUT_SOURCE else None
    sources = [part.read_bytes() for part in (*parts, *HEADERS.get(path, ()))]
    key = hashlib.sha256(b"\0".join([*sources, compiler.encode(), " ".join(FLAGS).encode(), platform.machine().encode(),
                                     str(runtime).encode()]))  # fmt: skip
    stem = "native_loops" if path == SOURCE else f"native_{path.stem}"
    target = _cache_dir() / f"{stem}-{key.hexdigest()[:16]}.so"
    try:
        if not target.exists():
            _compile(compiler, target, parts, runtime)
        library = ctypes.CDLL(str(target))
    except (OSError, subprocess.SubprocessError) as error:
        warnings.warn(f"torchdkm: could not build the native loops ({error}); using the torch loops", stacklevel=4)
        return None
    (_declare if path == SOURCE else _declare_lut)(library)
    return library


def _compile(compiler: str, target: Path, sources: tuple[Path, ...] = PARTS[SOURCE], runtime: Path | None = None) -> None:
    """Compile next to the target and rename into place, so concurrent processes never load half a file.

    ``runtime`` (an OpenMP runtime's file): the sources are compiled with OpenMP and linked against that file
    alone (not the compiler's own ``-lgomp``), so the library joins the team of the runtime already loaded.
    """
    target.parent.mkdir(parents=True, exist_ok=True)
    handle, partial = tempfile.mkstemp(suffix=".so", dir=target.parent)
    os.close(handle)
    objects = [f"{partial}.{i}.o" for i in range(len(sources))]
    try:
        if runtime is None:
            steps = [[compiler, *FLAGS, *map(str, sources), "-o", partial, "-lm"]]
        else:
            steps = [[compiler, *FLAGS, "-fopenmp", "-c", str(source), "-o", obj] for source, obj in zip(sources, objects)]
            steps.append([compiler, *FLAGS, *objects, "-o", partial, "-lm", str(runtime), f"-Wl,-rpath,{runtime.parent}"])
        for step in steps:
            done = subprocess.run(step, capture_output=True, text=True, timeout=120)
            if done.returncode != 0:
                raise subprocess.SubprocessError(done.stderr.strip()[-2000:] or f"{compiler} exited {done.returncode}")
        os.replace(partial, target)
    finally:
        for leftover in [partial, *objects]:
            if os.path.exists(leftover):
                os.unlink(leftover)


def openmp_runtime() -> Path | None:
    """The OpenMP runtime this process has loaded (torch's: GNU ``libgomp`` or Intel's ``libiomp5``), or None.

    The inference loops link against this very file so that their parallel regions run on torch's threads.
    """
    try:
        maps = Path("/proc/self/maps").read_text()
    except OSError:
        return None
    for line in maps.splitlines():
        fields = line.split()
        name = Path(fields[-1]).name if len(fields) >= 6 else ""
        if re.fullmatch(r"lib(gomp|iomp5)[-.\w]*\.so[.\d]*", name):
            return Path(fields[-1])
    return None


def _declare(library: ctypes.CDLL) -> None:
    head = [ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64, ctypes.c_int64]
    pointers = {"count": 1, "expand16": 2, "expand32": 2, "expand64": 2}
    pointers |= {"affine_f32": 4, "affine_bf16": 4}
    for name, extra in pointers.items():
        function = getattr(library, f"tdkm_{name}")
        function.argtypes = head + [ctypes.c_void_p] * extra
        function.restype = None
    for name in ("scatter_f32", "scatter_f64"):  # (keys, items, src, cols, col stride, item stride, sums, bins,
        function = getattr(library, f"tdkm_{name}")  # sums row stride)
        function.argtypes = [ctypes.c_void_p, ctypes.c_int64, ctypes.c_void_p] + [ctypes.c_int64] * 3
        function.argtypes += [ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64]
        function.restype = ctypes.c_int64
    library.tdkm_simd.argtypes, library.tdkm_simd.restype = [ctypes.c_int], ctypes.c_int
    library.tdkm_simd(-1)  # decided once here, under the load lock, before any thread runs a loop
    library.tdkm_present.argtypes = [ctypes.c_void_p, ctypes.c_int64, ctypes.c_void_p]
    library.tdkm_present.restype = ctypes.c_int64
    # block scales: (weight, rows, row_len, block, then the tables and outputs, see loops.c)
    shape = [ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64, ctypes.c_int64]
    blocks = {"normalise_f32": [ctypes.c_void_p] * 3, "rescale_f32": [ctypes.c_void_p] * 3}
    blocks["rescale_grad_f32"] = [ctypes.c_void_p] * 4
    blocks["normalise_grad_f32"] = [ctypes.c_void_p] * 7 + [ctypes.c_int64, ctypes.c_void_p]
    for name, rest in blocks.items():
        function = getattr(library, f"tdkm_{name}")
        extra = [ctypes.c_void_p] if "grad" in name else []  # (the gradient comes first)
        function.argtypes, function.restype = extra + shape + rest, None
    for name in ("row_sets_f32", "row_sets_f64"):  # (x and its 3 strides, centroids, 1 / tau, 7 sizes, pad flags,
        function = getattr(library, f"tdkm_{name}")  # 3 thresholds, work space, 4 outputs)
        function.argtypes = [ctypes.c_void_p] + [ctypes.c_int64] * 3 + [ctypes.c_void_p] * 2 + [ctypes.c_int64] * 7
        function.argtypes += [ctypes.c_void_p] + [ctypes.c_double] * 3 + [ctypes.c_void_p] * 5
        function.restype = None
    for name in ("nearest_two_f32", "nearest_two_f64"):  # (x and its 3 strides, centroids, 6 sizes, work, 3 outputs)
        function = getattr(library, f"tdkm_{name}")
        function.argtypes = [ctypes.c_void_p] + [ctypes.c_int64] * 3 + [ctypes.c_void_p] + [ctypes.c_int64] * 6
        function.argtypes += [ctypes.c_void_p] * 4
        function.restype = None
    for name in ("gram_scatter_f32", "gram_scatter_f64"):  # (keys, x and 3 strides, m and 2 strides, groups, rows,
        function = getattr(library, f"tdkm_{name}")  # d, first term, sums, bins, sums row stride, work space)
        function.argtypes = [ctypes.c_void_p, ctypes.c_void_p] + [ctypes.c_int64] * 3 + [ctypes.c_void_p]
        function.argtypes += [ctypes.c_int64] * 6 + [ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64, ctypes.c_void_p]
        function.restype = ctypes.c_int64
    for name in ("sum_f32", "sum_bf16"):  # (values, live keys, how many, float32 partial table, table)
        function = getattr(library, f"tdkm_{name}")
        function.argtypes = head + [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64, ctypes.c_void_p, ctypes.c_void_p]
        function.restype = None


class Palette(ctypes.Structure):
    """``lut.c``'s ``palette``: a packed weight as the inference loops read it (see :mod:`.lut`)."""

    _fields_ = [
        ("packed", ctypes.c_void_p),
        ("nbytes", ctypes.c_int64),
        ("bits", ctypes.c_int64),
        ("dim", ctypes.c_int64),
        ("group_size", ctypes.c_int64),
        ("row_len", ctypes.c_int64),
        ("vectors", ctypes.c_int64),
        ("lut", ctypes.c_void_p),
        ("scales", ctypes.c_void_p),  # (rows, blocks) block scales, or None
        ("offsets", ctypes.c_void_p),
        ("block", ctypes.c_int64),
        ("blocks", ctypes.c_int64),
        ("half", ctypes.c_int64),  # 1: the scales and offsets are float16, 0: float32
    ]


def _declare_lut(library: ctypes.CDLL) -> None:
    palette = ctypes.POINTER(Palette)
    library.tdkm_lut_isa.argtypes, library.tdkm_lut_isa.restype = [ctypes.c_int], ctypes.c_int
    library.tdkm_lut_isa(-1)  # decided once here, under the load lock, before any thread runs a loop
    library.tdkm_lut_rows.argtypes = [palette, ctypes.c_void_p, ctypes.c_int64, ctypes.c_void_p, ctypes.c_int]
    library.tdkm_lut_rows.restype = None
    library.tdkm_lut_whole_chunks.argtypes, library.tdkm_lut_whole_chunks.restype = [palette], ctypes.c_int
    # (palette, first row, end row, x, x row stride, x rows, y, y row stride)
    library.tdkm_lut_gemv.argtypes = [palette, ctypes.c_int64, ctypes.c_int64, ctypes.c_void_p, ctypes.c_int64]
    library.tdkm_lut_gemv.argtypes += [ctypes.c_int64, ctypes.c_void_p, ctypes.c_int64]
    library.tdkm_lut_gemv.restype = ctypes.c_int  # 0, or -1: out of memory
    library.tdkm_lut_gemv_threads.argtypes = library.tdkm_lut_gemv.argtypes + [ctypes.c_int]  # (..., threads)
    library.tdkm_lut_gemv_threads.restype = ctypes.c_int
    library.tdkm_lut_rows_threads.argtypes = library.tdkm_lut_rows.argtypes + [ctypes.c_int]  # (..., threads)
    library.tdkm_lut_rows_threads.restype = None
    library.tdkm_lut_gemm_ok.argtypes, library.tdkm_lut_gemm_ok.restype = [palette], ctypes.c_int
    library.tdkm_lut_gemm_threads.argtypes = [palette, ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64, ctypes.c_void_p]
    library.tdkm_lut_gemm_threads.argtypes += [ctypes.c_int64, ctypes.c_void_p, ctypes.c_int]  # (..., y, ys, bias, threads)
    library.tdkm_lut_gemm_threads.restype = ctypes.c_int
    library.tdkm_openmp.argtypes, library.tdkm_openmp.restype = [], ctypes.c_int
