"""Native CPU loops for the hottest passes, with the torch code they replace as the fallback.

Why: uniquified DKM makes four passes over the weights every step (count the
patterns, gather the soft weight, sum the gradient per pattern, gather each
weight's gradient).  In torch each is a ``bincount`` or ``index_select`` on the
patterns widened to int32: 5 to 6 elementwise passes apiece over 4M bf16
weights (min/max scans, zeroed tables, the widening itself); one C loop per
pass reads each 16-bit pattern once (``native_loops.c``): 1.4 to 3 passes.
The sparse path's float64 scatter-adds (:func:`scatter`) are one loop too,
instead of float64 copies of the items in pieces and ``scatter_add_``.

The loops are compiled on first use with the system C compiler (``$CC``, else
``cc``) into a cache folder (``$TORCHDKM_CACHE``, else ``~/.cache/torchdkm``)
and loaded with ``ctypes``, which releases the GIL: a large pass is split
across ``torch.get_num_threads()`` threads, each counting or summing into its
own table.  No compiler, a failed build, a tensor off the CPU, a dtype the loops
do not take, or ``TORCHDKM_NATIVE=0``: :func:`kernels` returns ``None`` and the
torch code runs instead (one warning says why a build failed).
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import threading
import warnings
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch
from torch import Tensor

SOURCE = Path(__file__).with_name("native_loops.c")
FLAGS = ("-O3", "-std=c99", "-shared", "-fPIC", "-ffp-contract=off")
PATTERN_BITS = 16
#: The gradient dtypes :func:`affine` has a loop for.
AFFINE_LOOPS = {torch.float32: "affine_f32", torch.bfloat16: "affine_bf16"}
#: Below this many weights a pass runs on one thread (starting threads costs more than it saves).
MIN_PARALLEL = 1 << 20

_lock = threading.Lock()
_loaded: tuple[ctypes.CDLL | None] | None = None  # (library or None,) once a build was tried
_pool: tuple[ThreadPoolExecutor, int, int] | None = None  # (pool, its size, the process that made it)


def enabled() -> bool:
    return os.environ.get("TORCHDKM_NATIVE", "1") != "0"


def kernels() -> ctypes.CDLL | None:
    """The compiled loops, building them on first use; ``None`` where they cannot be had."""
    global _loaded
    if not enabled():
        return None
    if _loaded is None:
        with _lock:
            if _loaded is None:
                _loaded = (_load(),)
    return _loaded[0]


def simd(enabled: bool | None = None) -> bool:
    """Whether the gathers run their AVX-512 versions (identical results, 1.2-1.5x faster); ``enabled`` sets it.

    On by default where the CPU and the OS support AVX-512; the tests run every loop both ways.
    """
    library = kernels()
    if library is None:
        return False
    return bool(library.tdkm_simd(-1 if enabled is None else int(enabled)))


def usable(*tensors: Tensor) -> bool:
    """Whether the native loops can run on these tensors (all on the CPU) here."""
    return all(t.device.type == "cpu" for t in tensors) and kernels() is not None


def _cache_dir() -> Path:
    if os.environ.get("TORCHDKM_CACHE"):
        return Path(os.environ["TORCHDKM_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "torchdkm"


def _load() -> ctypes.CDLL | None:
    if sys.platform == "win32":
        return None
    compiler = os.environ.get("CC", "cc")
    if shutil.which(compiler) is None:
        warnings.warn(f"torchdkm: no C compiler {compiler!r}: uniquified DKM uses the slower torch loops", stacklevel=3)
        return None
    source = SOURCE.read_bytes()
    key = hashlib.sha256(b"\0".join([source, compiler.encode(), " ".join(FLAGS).encode(), platform.machine().encode()]))
    target = _cache_dir() / f"native_loops-{key.hexdigest()[:16]}.so"
    try:
        if not target.exists():
            _compile(compiler, target)
        library = ctypes.CDLL(str(target))
    except (OSError, subprocess.SubprocessError) as error:
        warnings.warn(f"torchdkm: could not build the native loops ({error}); using the torch loops", stacklevel=3)
        return None
    _declare(library)
    return library


def _compile(compiler: str, target: Path) -> None:
    """Compile next to the target and rename into place, so concurrent processes never load half a file."""
    target.parent.mkdir(parents=True, exist_ok=True)
    handle, partial = tempfile.mkstemp(suffix=".so", dir=target.parent)
    os.close(handle)
    try:
        done = subprocess.run(
            [compiler, *FLAGS, str(SOURCE), "-o", partial], capture_output=True, text=True, timeout=120
        )
        if done.returncode != 0:
            raise subprocess.SubprocessError(done.stderr.strip()[-2000:] or f"{compiler} exited {done.returncode}")
        os.replace(partial, target)
    finally:
        if os.path.exists(partial):
            os.unlink(partial)


def _declare(library: ctypes.CDLL) -> None:
    head = [ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64, ctypes.c_int64]
    pointers = {"count": 1, "expand16": 2, "expand32": 2, "expand64": 2}
    pointers |= {"affine_f32": 4, "affine_bf16": 4}
    for name, extra in pointers.items():
        function = getattr(library, f"tdkm_{name}")
        function.argtypes = head + [ctypes.c_void_p] * extra
        function.restype = None
    for name in ("scatter_f32", "scatter_f64"):  # (keys, items, src, cols, col stride, item stride, sums, bins)
        function = getattr(library, f"tdkm_{name}")
        function.argtypes = [ctypes.c_void_p, ctypes.c_int64, ctypes.c_void_p] + [ctypes.c_int64] * 3
        function.argtypes += [ctypes.c_void_p, ctypes.c_int64]
        function.restype = ctypes.c_int64
    library.tdkm_simd.argtypes, library.tdkm_simd.restype = [ctypes.c_int], ctypes.c_int
    library.tdkm_simd(-1)  # decided once here, under the load lock, before any thread runs a loop
    library.tdkm_present.argtypes = [ctypes.c_void_p, ctypes.c_int64, ctypes.c_void_p]
    library.tdkm_present.restype = ctypes.c_int64
    for name in ("sum_f32", "sum_bf16"):  # (values, live keys, how many, float32 partial table, table)
        function = getattr(library, f"tdkm_{name}")
        function.argtypes = head + [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64, ctypes.c_void_p, ctypes.c_void_p]
        function.restype = None


# -- the passes ---------------------------------------------------------------
def _chunks(numel: int) -> list[tuple[int, int]]:
    threads = torch.get_num_threads()
    if numel < MIN_PARALLEL or threads < 2:
        return [(0, numel)]
    step = -(-numel // threads)
    return [(start, min(start + step, numel)) for start in range(0, numel, step)]


def _run(jobs: list) -> list:
    """Run ``jobs`` (callables), on the thread pool when there are several."""
    global _pool
    if len(jobs) == 1:
        return [jobs[0]()]
    # a new pool when torch's thread count grew, or in a forked child (the parent's threads are not there)
    if _pool is None or _pool[1] < len(jobs) or _pool[2] != os.getpid():
        _pool = (ThreadPoolExecutor(max_workers=len(jobs), thread_name_prefix="torchdkm"), len(jobs), os.getpid())
    return list(_pool[0].map(lambda job: job(), jobs))


def _ptr(tensor: Tensor, offset: int = 0) -> int:
    return tensor.data_ptr() + offset * tensor.element_size()


def _tabulate(loop: Callable[[int, int, int, int, Tensor], None], patterns: Tensor, group_numel: int, table: Tensor):
    """Run ``loop(start, stop, low, high, out)`` over the weights, adding into ``table``, chunk by chunk.

    ``out`` holds the entries of groups ``[low, high)``, the groups of weights ``[start, stop)``.  One chunk
    adds into ``table`` itself; several each add into a zeroed table of their own, added into ``table`` after.
    """
    chunks = _chunks(patterns.numel())
    groups = table.numel() >> PATTERN_BITS
    if len(chunks) == 1:
        loop(0, patterns.numel(), 0, groups, table)
        return table
    spans = [(start // group_numel, (stop - 1) // group_numel + 1) for start, stop in chunks]
    privates = [table.new_zeros((high - low) << PATTERN_BITS) for low, high in spans]
    _run([lambda c=c, s=s, p=p: loop(*c, *s, p) for c, s, p in zip(chunks, spans, privates)])
    for (low, high), private in zip(spans, privates):
        table[low << PATTERN_BITS : high << PATTERN_BITS] += private
    return table


def count(patterns: Tensor, group_numel: int, table_size: int) -> Tensor:
    """``(table_size,)`` int64: how many weights have each key."""
    function = kernels().tdkm_count

    def loop(start: int, stop: int, low: int, high: int, out: Tensor) -> None:
        function(_ptr(patterns, start), stop - start, start, group_numel, out.data_ptr())

    return _tabulate(loop, patterns, group_numel, torch.zeros(table_size, dtype=torch.int64))


def present(table: Tensor) -> Tensor:
    """The keys whose count in ``table`` (int64, from :func:`count`) is not zero, ascending: ``nonzero`` in one loop."""
    keys = torch.empty(table.numel(), dtype=torch.int64)
    found = kernels().tdkm_present(table.data_ptr(), table.numel(), keys.data_ptr())
    return keys[:found].clone()


def sum_per_key(patterns: Tensor, group_numel: int, values: Tensor, live: Tensor, table_size: int) -> Tensor | None:
    """``(table_size,)`` float64: the sum of ``values`` per key; ``None`` for a dtype the loops do not take.

    ``live``: every key that occurs, ascending (int64).  The loop sums blocks of weights in float32 and adds
    each block's sums at these keys into the float64 table.
    """
    name = {torch.float32: "sum_f32", torch.bfloat16: "sum_bf16"}.get(values.dtype)
    if name is None:
        return None
    function = getattr(kernels(), f"tdkm_{name}")
    values = values.contiguous()

    def loop(start: int, stop: int, low: int, high: int, out: Tensor) -> None:
        bounds = torch.tensor([low << PATTERN_BITS, high << PATTERN_BITS], dtype=live.dtype)
        first, last = torch.searchsorted(live, bounds).tolist()
        keys = live[first:last] - (low << PATTERN_BITS) if low else live[first:last]
        partial = torch.zeros(out.numel(), dtype=torch.float32)
        args = (keys.data_ptr(), keys.numel(), partial.data_ptr(), out.data_ptr())
        function(_ptr(patterns, start), stop - start, start, group_numel, _ptr(values, start), *args)
        if bool(partial.any()):  # a weight's key missing from ``live``: its sum would be lost
            raise ValueError("sum_per_key: some weights' keys are not among the live keys given")

    return _tabulate(loop, patterns, group_numel, torch.zeros(table_size, dtype=torch.float64))


def _table_at(table: Tensor, start: int, group_numel: int) -> int:
    """Address of the entries of the group of weight ``start``: the loops count groups from there."""
    return _ptr(table, (start // group_numel) << PATTERN_BITS)


def expand(patterns: Tensor, group_numel: int, table: Tensor) -> Tensor | None:
    """``table[key]`` for every weight, in ``table``'s dtype; ``None`` for an element size the loops lack."""
    width = table.element_size() * 8
    if width not in (16, 32, 64):
        return None
    function = getattr(kernels(), f"tdkm_expand{width}")
    out = table.new_empty(patterns.numel())

    def job(start: int, stop: int) -> None:
        table_at = _table_at(table, start, group_numel)
        function(_ptr(patterns, start), stop - start, start, group_numel, table_at, _ptr(out, start))

    _run([lambda c=c: job(*c) for c in _chunks(patterns.numel())])
    return out


def affine(patterns: Tensor, group_numel: int, shift: Tensor, slope: Tensor, grad: Tensor) -> Tensor | None:
    """``shift[key] + grad * slope[key]`` (float32 tables) in ``grad``'s dtype; ``None`` for other dtypes."""
    name = AFFINE_LOOPS.get(grad.dtype)
    if name is None or shift.dtype != torch.float32 or slope.dtype != torch.float32:
        return None
    function = getattr(kernels(), f"tdkm_{name}")
    grad = grad.contiguous().reshape(-1)
    out = torch.empty_like(grad)

    def job(start: int, stop: int) -> None:
        tables = (_table_at(shift, start, group_numel), _table_at(slope, start, group_numel))
        function(_ptr(patterns, start), stop - start, start, group_numel, *tables, _ptr(grad, start), _ptr(out, start))

    _run([lambda c=c: job(*c) for c in _chunks(patterns.numel())])
    return out


def scatter(sums: Tensor, keys: Tensor, src: Tensor) -> bool:
    """``sums[col, keys[i]] += src[col, i]`` added in float64 (``sums`` (C, bins) float64, ``src`` (C, items)).

    Returns ``False`` (nothing done) where the loop does not apply: off the CPU, no native loops, or
    dtypes or layouts it does not take.  A key outside ``[0, bins)`` raises ``IndexError``.
    """
    if not (
        sums.dtype == torch.float64
        and sums.dim() == 2
        and sums.is_contiguous()
        and src.dim() == 2
        and src.shape[0] == sums.shape[0]
        and src.dtype in (torch.float32, torch.float64)
        and keys.numel() == src.shape[1]
        and usable(sums, keys, src)
    ):
        return False
    keys = keys.reshape(-1).to(torch.int64).contiguous()
    function = kernels().tdkm_scatter_f32 if src.dtype == torch.float32 else kernels().tdkm_scatter_f64
    cols, bins = sums.shape
    bad = function(
        keys.data_ptr(), keys.numel(), src.data_ptr(), cols, src.stride(0), src.stride(1), sums.data_ptr(), bins
    )
    if bad >= 0:
        raise IndexError(f"scatter: key {int(keys[bad])} at item {bad} is outside [0, {bins})")
    return True
