"""The native CPU kernels: thin wrappers that hand tensors to the C loops of ``loops.c`` and ``sparse.c``.

Each takes CPU tensors of the dtypes :data:`DTYPES` lists for it (the registry in
:mod:`torchdkm.kernels` checks that when a layer's kernels are chosen) and
computes what the torch kernel of the same name in :mod:`.default` computes:
the tests compare the two.  A large pass is split across
``torch.get_num_threads()`` threads (``ctypes`` releases the GIL), each counting
or summing into its own table.
"""

from __future__ import annotations

import ctypes
import math
import os
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import torch
from torch import Tensor

from . import default
from .build import library

PATTERN_BITS = 16
#: The dtypes each kernel has a loop for (of the tensor named): ``None`` means any.
DTYPES: dict[str, tuple[torch.dtype, ...] | None] = {
    "count": None,
    "present": None,
    "expand": None,  # (16-, 32- and 64-bit tables: every float dtype torchdkm clusters in)
    "sum_per_key": (torch.float32, torch.bfloat16),  # values
    "affine": (torch.float32, torch.bfloat16),  # grad (tables: float32)
    "scatter": (torch.float32, torch.float64),  # src
    "row_sets": (torch.float32, torch.float64),  # the rows and centroids
    "nearest_two": (torch.float32, torch.float64),  # the rows and centroids
    "gram_scatter": (torch.float32, torch.float64),  # the rows
    "normalise": (torch.float32,),  # the weight (and its block tables)
    "rescale": (torch.float32,),
    "rescale_grad": (torch.float32,),
    "normalise_grad": (torch.float32,),
}
#: The dtype of :func:`affine`'s tables, whatever the gradient's.
TABLE_DTYPE = torch.float32
#: Below this many weights a pass runs on one thread (starting threads costs more than it saves).
MIN_PARALLEL = 1 << 20

_pool: tuple[ThreadPoolExecutor, int, int] | None = None  # (pool, its size, the process that made it)


def _loops() -> ctypes.CDLL:
    loops = library()
    if loops is None:
        raise RuntimeError("torchdkm: the native loops are not built here; select the torch kernels")
    return loops


def _chunks(numel: int) -> list[tuple[int, int]]:
    threads = torch.get_num_threads()
    if numel < MIN_PARALLEL or threads < 2:
        return [(0, numel)]
    step = -(-numel // threads)
    return [(start, min(start + step, numel)) for start in range(0, numel, step)]


def run_jobs(jobs: list) -> list:
    """Run ``jobs`` (callables that release the GIL, like ``ctypes`` calls), on the shared thread pool
    when there are several."""
    global _pool
    if len(jobs) <= 1:
        return [job() for job in jobs]
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
    run_jobs([lambda c=c, s=s, p=p: loop(*c, *s, p) for c, s, p in zip(chunks, spans, privates)])
    for (low, high), private in zip(spans, privates):
        table[low << PATTERN_BITS : high << PATTERN_BITS] += private
    return table


def count(patterns: Tensor, group_numel: int, table_size: int) -> Tensor:
    """``(table_size,)`` int64: how many weights have each key."""
    function = _loops().tdkm_count

    def loop(start: int, stop: int, low: int, high: int, out: Tensor) -> None:
        function(_ptr(patterns, start), stop - start, start, group_numel, out.data_ptr())

    return _tabulate(loop, patterns, group_numel, torch.zeros(table_size, dtype=torch.int64))


def present(table: Tensor) -> Tensor:
    """The keys whose count in ``table`` (int64, from :func:`count`) is not zero, ascending: ``nonzero`` in one loop."""
    keys = torch.empty(table.numel(), dtype=torch.int64)
    found = _loops().tdkm_present(table.data_ptr(), table.numel(), keys.data_ptr())
    return keys[:found].clone()


def sum_per_key(
    patterns: Tensor, group_numel: int, values: Tensor, live: Tensor, table_size: int, dtype: torch.dtype
) -> Tensor:
    """float64 sums of ``values`` (float32 or bfloat16) at the keys ``live`` (every key that occurs, ascending).

    The loop sums blocks of weights in float32 and adds each block's sums at these keys into a float64
    table (``dtype``, the torch kernel's piece dtype, is not needed here).
    """
    function = getattr(_loops(), "tdkm_sum_f32" if values.dtype == torch.float32 else "tdkm_sum_bf16")
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

    return _tabulate(loop, patterns, group_numel, torch.zeros(table_size, dtype=torch.float64))[live]


def _table_at(table: Tensor, start: int, group_numel: int) -> int:
    """Address of the entries of the group of weight ``start``: the loops count groups from there."""
    return _ptr(table, (start // group_numel) << PATTERN_BITS)


def expand(patterns: Tensor, group_numel: int, table: Tensor) -> Tensor:
    """``table[key]`` for every weight, bit for bit (16-, 32- or 64-bit tables)."""
    function = getattr(_loops(), f"tdkm_expand{table.element_size() * 8}")
    out = table.new_empty(patterns.numel())

    def job(start: int, stop: int) -> None:
        table_at = _table_at(table, start, group_numel)
        function(_ptr(patterns, start), stop - start, start, group_numel, table_at, _ptr(out, start))

    run_jobs([lambda c=c: job(*c) for c in _chunks(patterns.numel())])
    return out


def affine(patterns: Tensor, group_numel: int, shift: Tensor, slope: Tensor, grad: Tensor) -> Tensor:
    """``shift[key] + grad * slope[key]`` in ``grad``'s dtype (float32 or bfloat16), from float32 tables.

    The loop computes in float32 and rounds once, so its tables are float32 whatever ``grad``'s dtype
    (:data:`TABLE_DTYPE`).
    """
    if shift.dtype != torch.float32 or slope.dtype != torch.float32:
        raise ValueError(f"affine: the native loop takes float32 tables, got {shift.dtype} and {slope.dtype}")
    function = getattr(_loops(), "tdkm_affine_f32" if grad.dtype == torch.float32 else "tdkm_affine_bf16")
    grad = grad.contiguous().reshape(-1)
    out = torch.empty_like(grad)

    def job(start: int, stop: int) -> None:
        tables = (_table_at(shift, start, group_numel), _table_at(slope, start, group_numel))
        function(_ptr(patterns, start), stop - start, start, group_numel, *tables, _ptr(grad, start), _ptr(out, start))

    run_jobs([lambda c=c: job(*c) for c in _chunks(patterns.numel())])
    return out


def scatter(sums: Tensor, keys: Tensor, src: Tensor) -> None:
    """``sums[col, keys[i]] += src[col, i]`` added in float64, in item order (``sums`` (C, bins) float64,
    its rows contiguous).  A key outside ``[0, bins)`` raises ``IndexError`` (nothing is added then).
    """
    src = src.reshape(sums.shape[0], -1)
    if not (sums.dtype == torch.float64 and sums.dim() == 2 and sums.stride(1) == 1 and keys.numel() == src.shape[1]):
        raise ValueError(f"scatter: float64 (C, bins) sums with contiguous rows and (C, {keys.numel()}) items expected")
    keys = keys.reshape(-1).to(torch.int64).contiguous()
    function = _loops().tdkm_scatter_f32 if src.dtype == torch.float32 else _loops().tdkm_scatter_f64
    cols, bins = sums.shape
    bad = function(
        keys.data_ptr(), keys.numel(), src.data_ptr(), cols, src.stride(0), src.stride(1), sums.data_ptr(), bins,
        sums.stride(0),
    )
    if bad >= 0:
        raise IndexError(f"scatter: key {int(keys[bad])} at item {bad} is outside [0, {bins})")


def gram_scatter(sums: Tensor, keys: Tensor, xt: Tensor, m: Tensor | None, first: int) -> None:
    """The torch kernel's sums (:func:`.default.gram_scatter`), bit for bit, without the ``(P, rows)`` weights.

    ``xt`` is ``(d, r)`` or ``(d, G, r)`` (any strides), ``m`` ``(r,)`` or ``(G, r)``, ``keys`` ``G r`` in
    row order.  Rows of multiplicity 0 (padding) are skipped: for finite rows, whose terms are then all 0,
    the sums are the same.  A key outside ``sums``' bins raises ``IndexError`` (nothing is added then).
    """
    if not (sums.dtype == torch.float64 and sums.dim() == 2 and sums.stride(1) == 1):
        raise ValueError("gram_scatter: float64 (terms, bins) sums with contiguous rows expected")
    d = xt.shape[0]
    x3 = xt if xt.dim() == 3 else xt.unsqueeze(1)
    m2 = None if m is None else (m if m.dim() == 2 else m.unsqueeze(0)).to(xt.dtype)
    if sums.shape[0] != 1 + d + d * (d + 1) // 2 - first or keys.numel() != x3.shape[1] * x3.shape[2]:
        raise ValueError(f"gram_scatter: {tuple(sums.shape)} sums, {keys.numel()} keys and {tuple(xt.shape)} rows")
    keys = keys.reshape(-1).to(torch.int64).contiguous()
    function = _loops().tdkm_gram_scatter_f32 if xt.dtype == torch.float32 else _loops().tdkm_gram_scatter_f64
    mx = torch.empty(d, dtype=xt.dtype)
    m_args = (None, 0, 0) if m2 is None else (m2.data_ptr(), m2.stride(0), m2.stride(1))
    bad = function(
        keys.data_ptr(), x3.data_ptr(), *x3.stride(), *m_args, x3.shape[1], x3.shape[2], d, first,
        sums.data_ptr(), sums.shape[1], sums.stride(0), mx.data_ptr(),
    )
    if bad >= 0:
        raise IndexError(f"gram_scatter: key {int(keys[bad])} at row {bad} is outside [0, {sums.shape[1]})")


#: The largest ``top`` the set loop keeps on its stack (a larger one runs the torch kernel).
ROW_SETS_MAX_TOP = 64
#: Rows per block of the set loops (``sparse.c``), for the size of their work space.
ROW_SETS_BLOCK = 64


def _row_spans(r: int, k: int, d: int) -> list[tuple[int, int]]:
    """The row ranges of a pass over ``r`` rows and ``k`` centroids of ``d`` values, one per thread when large."""
    spans = _chunks(r * k * d)
    if len(spans) == 1:
        return [(0, r)]
    step = -(-r // len(spans))
    return [(start, min(start + step, r)) for start in range(0, r, step)]


def _rows_and_centroids(xt: Tensor, c: Tensor) -> tuple[tuple, Tensor]:
    """The loops' first arguments for rows ``xt`` (G, d, r) (any strides) and centroids ``c`` (G, k, d)."""
    if xt.dtype != c.dtype:
        raise ValueError(f"rows of {xt.dtype} and centroids of {c.dtype}")
    c = c.contiguous()
    return (xt.data_ptr(), xt.stride(1), xt.stride(0), xt.stride(2), c.data_ptr()), c  # coordinate, group, row


def _work(spans: list, d: int, k: int, dtype: torch.dtype) -> Tensor:
    """Each job's block buffers (``ROW_SETS_BLOCK`` rows: coordinates, distances, the nearest two)."""
    return torch.empty(len(spans), ROW_SETS_BLOCK * (d + k + 3), dtype=dtype)


def nearest_two(xt: Tensor, c: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """The torch kernel's ``(index, first, second)`` (:func:`.default.nearest_two`), from exact differences.

    The distances are rounded once to the rows' dtype (the torch kernel's lose their lowest
    ``ceil(log2 k)`` bits); near-ties go to the lower index in both.
    """
    g, d, r = xt.shape
    k = c.shape[1]
    head, c = _rows_and_centroids(xt, c)
    function = _loops().tdkm_nearest_two_f32 if c.dtype == torch.float32 else _loops().tdkm_nearest_two_f64
    index = torch.empty(g, r, dtype=torch.int64)
    first, second = torch.empty(g, r, dtype=c.dtype), torch.empty(g, r, dtype=c.dtype)
    outputs = (index.data_ptr(), first.data_ptr(), second.data_ptr())
    spans = _row_spans(r, k, d)
    work = _work(spans, d, k, c.dtype)
    run_jobs([lambda span=span, w=w: function(*head, g, d, k, r, *span, w.data_ptr(), *outputs) for span, w in zip(spans, work)])
    return index, first, second


def row_sets(
    xt: Tensor,
    c: Tensor,
    inv_tau: Tensor,
    top: int,
    pad: Tensor | None,
    index: Tensor | None,
    first: Tensor | None,
    second: Tensor | None,
    hard_score: float,
    reselect: float,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """The torch kernel's result (:func:`.default.row_sets`) from exact differences, in one pass over the rows.

    Where the torch kernel reads bounds off packed distances (a few ulps of ``|x|^2`` wide), the loop
    computes each distance from the differences (its rounding folded into the bounds), so its bounds
    are tighter: a row hard for the torch kernel is hard here, and the rows' sets agree but for
    near-ties.  The nearest two (``index``, ``first``, ``second``) are not needed.
    """
    if top > ROW_SETS_MAX_TOP:
        return default.row_sets(xt, c, inv_tau, top, pad, index, first, second, hard_score, reselect)
    g, d, r = xt.shape
    k = c.shape[1]
    head, c = _rows_and_centroids(xt, c)
    inv_tau = inv_tau.to(c.dtype).contiguous()
    function = _loops().tdkm_row_sets_f32 if c.dtype == torch.float32 else _loops().tdkm_row_sets_f64
    slots = torch.empty(g, top, r, dtype=torch.int64)
    hard = torch.empty(g, r, dtype=torch.bool)
    score, slack = torch.empty(g, r, dtype=c.dtype), torch.empty(g, r, dtype=c.dtype)
    flags = None if pad is None else pad.to(torch.bool).contiguous()
    eps = torch.finfo(c.dtype).eps
    head += (inv_tau.data_ptr(), g, d, k, r)
    tail = (top, None if flags is None else flags.data_ptr(), hard_score, math.log(eps), reselect)
    outputs = (slots.data_ptr(), hard.data_ptr(), score.data_ptr(), slack.data_ptr())
    spans = _row_spans(r, k, d)
    work = _work(spans, d, k, c.dtype)
    run_jobs([lambda span=span, w=w: function(*head, *span, *tail, w.data_ptr(), *outputs) for span, w in zip(spans, work)])
    return slots, hard, score, slack


# -- block scales: (rows, row_len) float32 weights, (rows, blocks) float32 tables (see loops.c) -----------------


def _by_rows(rows: int, row_len: int, loop: Callable[[int, int], None]) -> None:
    """Run ``loop(first_row, end_row)`` over the rows, split across the threads for a large weight."""
    step = max(1, -(-rows // len(_chunks(rows * row_len))))
    run_jobs([lambda first=first: loop(first, min(first + step, rows)) for first in range(0, rows, step)])


def _opt(tensor: Tensor | None, row: int = 0) -> int | None:
    """A table's address from row ``row`` on (None for no table)."""
    return None if tensor is None else _ptr(tensor, row * tensor.shape[1])


def _floats(weight: Tensor, *tensors: Tensor | None) -> list[Tensor | None]:
    """The tables as float32, contiguous (for a float32 ``weight``: the loops take no other)."""
    if weight.dtype != torch.float32:
        raise ValueError(f"the block-scale loops take float32 weights, got {weight.dtype}")
    return [None if t is None else t.to(torch.float32).contiguous() for t in tensors]


def normalise(weight: Tensor, block: int, safe: Tensor, offset: Tensor | None) -> Tensor:
    """``(weight - offset) / safe`` per block, bit for bit as the torch kernel, in one pass."""
    return _per_block(_loops().tdkm_normalise_f32, weight, block, safe, offset)


def rescale(normalised: Tensor, block: int, scale: Tensor, offset: Tensor | None) -> Tensor:
    """``normalised * scale + offset`` per block, bit for bit as the torch kernel, in one pass."""
    return _per_block(_loops().tdkm_rescale_f32, normalised, block, scale, offset)


def _per_block(function, x: Tensor, block: int, table: Tensor, offset: Tensor | None) -> Tensor:
    """Run an elementwise per-block loop (``x``, a value and an optional offset per block) over row ranges."""
    x = x.contiguous()
    table, offset = _floats(x, table, offset)
    out = torch.empty_like(x)
    rows, row_len = x.shape

    def loop(first: int, end: int) -> None:
        args = (_opt(table, first), _opt(offset, first), _ptr(out, first * row_len))
        function(_ptr(x, first * row_len), end - first, row_len, block, *args)

    _by_rows(rows, row_len, loop)
    return out


def rescale_grad(grad: Tensor, normalised: Tensor, block: int, scale: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """``(grad * scale, sum grad * normalised, sum grad)`` (sums per block, in double), in one pass."""
    grad, normalised, scale = grad.contiguous(), normalised.contiguous(), _floats(grad, scale)[0]
    assert scale is not None
    grad_n = torch.empty_like(grad)
    grad_scale, grad_offset = torch.empty_like(scale), torch.empty_like(scale)
    rows, row_len = grad.shape
    function = _loops().tdkm_rescale_grad_f32

    def loop(first: int, end: int) -> None:
        at = first * row_len
        tables = (_opt(scale, first), _ptr(grad_n, at), _opt(grad_scale, first), _opt(grad_offset, first))
        function(_ptr(grad, at), _ptr(normalised, at), end - first, row_len, block, *tables)

    _by_rows(rows, row_len, loop)
    return grad_n, grad_scale, grad_offset


def normalise_grad(
    grad: Tensor,
    weight: Tensor,
    block: int,
    scale: Tensor,
    safe: Tensor,
    offset: Tensor | None,
    high: Tensor,
    low: Tensor | None,
    extra_scale: Tensor | None,
    extra_offset: Tensor | None,
) -> Tensor:
    """The torch kernel's gradient (same formulas, sums in double) in one pass over the weights."""
    grad, weight = grad.contiguous(), weight.contiguous()
    tables = _floats(grad, scale, safe, offset, high, low, extra_scale, extra_offset)
    out = torch.empty_like(grad)
    rows, row_len = grad.shape
    pad = -row_len % block
    function = _loops().tdkm_normalise_grad_f32

    def loop(first: int, end: int) -> None:
        at = first * row_len
        addresses = [_opt(t, first) for t in tables]
        function(_ptr(grad, at), _ptr(weight, at), end - first, row_len, block, *addresses, pad, _ptr(out, at))

    _by_rows(rows, row_len, loop)
    return out
