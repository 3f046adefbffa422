"""The native palettized-inference kernels: wrappers that hand a packed weight to the C loops of ``lut.c``.

They compute what :func:`.default.lut_rows` and :func:`.default.lut_linear` compute (the tests compare
them), for float32 inputs on the CPU; other dtypes go to the torch kernels.  The LUT is widened to float32
(exact for 16-bit LUTs, so decoded rows are still bit for bit the stored values).

``lut_linear`` never writes the dense weight anywhere:

* up to :data:`GEMV_ROWS` rows of ``x`` (decoding, a batch of a few tokens): one pass over the packed
  indices, unpacked and looked up in registers and multiplied into float32 accumulators, output rows split
  over ``torch.get_num_threads()`` threads.  This product is bound by memory traffic, and 3-bit indices are
  ~10x fewer bytes than float32 weights.
* more rows: the loops decode :data:`TILE` weights (a 4 MiB float32 buffer, reused for every tile) and a
  GEMM (``torch.mm``) multiplies each tile, so the compute is the BLAS's and the extra memory one tile.
  A weight that fits one tile is decoded whole and multiplied as a dense ``Linear`` would be (``x W^T +
  b`` in one ``addmm``, no transposed output to copy back: MiniLM at batch 8 x 64 went from 0.65x to
  0.85x fp32 in ``python -m bench.inference``).  What remains over dense is the decode itself.
"""

from __future__ import annotations

import ctypes
import os

import torch
from torch import Tensor

from ..errors import TorchdkmError
from . import default
from .build import Palette, lut_library
from .cpu import run_jobs

#: The documented tolerance of ``lut_linear`` against decode-then-matmul in float64, for rows up to 16k
#: long: ``|y - x W^T| <= RTOL * (|x| |W|^T)`` elementwise (float32 sums in another order, FMA, lanes).
RTOL = 1e-5
#: Up to this many rows of ``x`` the product runs from the indices directly (8 at a time share one unpacking).
GEMV_ROWS = int(os.environ.get("TORCHDKM_GEMV_ROWS", "16"))
#: Weights per decoded tile above :data:`GEMV_ROWS` (float32: 4 MiB). Fewer, larger GEMM calls: on a busy
#: 2-core machine each call pays its OpenMP barrier (measured ~8 ms per call when another process runs).
TILE = 1 << 20
#: Below this much work (weights x rows of ``x``) a call runs on one thread.  Handing jobs to the pool and
#: waiting for them cost more than a small product on a 2-core machine: at 2**18 the 576x1536 batch-1 rows
#: of ``python -m bench.inference`` ran at 0.27x fp32 and SmolLM2 decoded at 0.62x; from 2**24 the split pays.
MIN_PARALLEL = 1 << 24


def available() -> bool:
    """Whether the inference loops are built (or can be) here and not switched off (``TORCHDKM_NATIVE=0``)."""
    return os.environ.get("TORCHDKM_NATIVE", "1") != "0" and lut_library() is not None


def isa(want: str | None = None) -> str:
    """The instruction set the loops use (``"avx512"``, ``"avx2"`` or ``"scalar"``); ``want`` caps it (tests)."""
    names = ("scalar", "avx2", "avx512")
    library = lut_library()
    if library is None:
        return "scalar"
    return names[library.tdkm_lut_isa(-1 if want is None else names.index(want))]


def _palette(packed: Tensor, lut: Tensor, bits: int, dim: int, group_size: int, out: int, row_len: int):
    """The C view of a packed weight (and the tensors it points into, which must outlive the call)."""
    groups, k = -(-out // group_size), 1 << bits
    vectors = -(-group_size * row_len // dim)
    if packed.dtype != torch.uint8 or packed.dim() != 1 or packed.numel() * 8 < groups * vectors * bits:
        raise TorchdkmError(
            f"lut kernel: {groups * vectors} indices of {bits} bits need {-(-groups * vectors * bits // 8)} uint8 "
            f"bytes, got {packed.numel()} of {packed.dtype}"
        )
    if lut.dim() != 3 or lut.shape[0] < groups or lut.shape[1] > k or lut.shape[2] != dim:
        raise TorchdkmError(f"lut kernel: a ({groups}, <= {k}, {dim}) LUT is needed, got {tuple(lut.shape)}")
    table = lut.to(torch.float32)
    if table.shape[1] < k:  # indices are below the LUT's size; the loops read whole 2**bits tables
        table = torch.cat([table, table.new_zeros(table.shape[0], k - table.shape[1], dim)], 1)
    packed, table = packed.contiguous(), table.contiguous()
    spec = Palette(packed.data_ptr(), packed.numel(), bits, dim, group_size, row_len, vectors, table.data_ptr())
    return spec, (packed, table)


def _spans(count: int, work: int) -> list[tuple[int, int]]:
    threads = torch.get_num_threads()
    if work < MIN_PARALLEL or threads < 2 or count < 2:
        return [(0, count)]
    step = -(-count // threads)
    return [(start, min(start + step, count)) for start in range(0, count, step)]


def lut_rows(packed: Tensor, lut: Tensor, bits: int, dim: int, group_size: int, row_len: int, rows: Tensor) -> Tensor:
    """``(len(rows), row_len)`` rows of the weight in the LUT's dtype, bit for bit (see :func:`.default.lut_rows`)."""
    rows = rows.reshape(-1).to(torch.int64).contiguous()
    out_rows = lut.shape[0] * group_size
    if rows.numel() and (int(rows.min()) < 0 or int(rows.max()) >= out_rows):
        raise IndexError(f"lut_rows: a row index is outside [0, {out_rows})")
    spec, keep = _palette(packed, lut, bits, dim, group_size, out_rows, row_len)
    out = torch.empty(rows.numel(), row_len, dtype=torch.float32)
    if not rows.numel() or not row_len:
        return out.to(lut.dtype)
    function = lut_library().tdkm_lut_rows

    def job(start: int, stop: int) -> None:
        function(ctypes.byref(spec), rows.data_ptr() + 8 * start, stop - start, out[start].data_ptr())

    run_jobs([lambda s=s: job(*s) for s in _spans(rows.numel(), rows.numel() * row_len)])
    del keep
    return out if lut.dtype == torch.float32 else out.to(lut.dtype)


def lut_linear(
    x: Tensor, packed: Tensor, lut: Tensor, bits: int, dim: int, group_size: int, out_features: int, bias: Tensor | None
) -> Tensor:
    """``x @ W.T + bias`` from the packed weight (float32 ``x``; others: the torch kernel)."""
    if x.dtype != torch.float32:
        return default.lut_linear(x, packed, lut, bits, dim, group_size, out_features, bias)
    row_len = x.shape[-1]
    flat = x.reshape(-1, row_len).contiguous()
    n = flat.shape[0]
    spec, keep = _palette(packed, lut, bits, dim, group_size, out_features, row_len)
    library = lut_library()
    if n <= GEMV_ROWS:
        y = torch.empty(n, out_features, dtype=torch.float32)

        def product(start: int, stop: int) -> None:
            library.tdkm_lut_gemv(ctypes.byref(spec), start, stop, flat.data_ptr(), row_len, n, y.data_ptr(), out_features)

        run_jobs([lambda s=s: product(*s) for s in _spans(out_features, out_features * row_len * n)])
    elif out_features * row_len <= TILE:  # one tile holds the weight: decode it, then a dense Linear's GEMM
        buffer = torch.empty(out_features, row_len, dtype=torch.float32)
        rows = torch.arange(out_features, dtype=torch.int64)
        library.tdkm_lut_rows(ctypes.byref(spec), rows.data_ptr(), out_features, buffer.data_ptr())
        del keep
        y = torch.nn.functional.linear(flat, buffer, None if bias is None else bias.to(torch.float32))
        return y.reshape(*x.shape[:-1], out_features)
    else:
        out = torch.empty(out_features, n, dtype=torch.float32)  # y transposed: a tile's rows are one block
        tile = max(1, min(out_features, TILE // max(row_len, 1)))
        buffer = torch.empty(tile, row_len, dtype=torch.float32)
        rows = torch.arange(out_features, dtype=torch.int64)
        for first in range(0, out_features, tile):
            count = min(tile, out_features - first)

            def decode(start: int, stop: int, first: int = first) -> None:
                at = rows.data_ptr() + 8 * (first + start)
                library.tdkm_lut_rows(ctypes.byref(spec), at, stop - start, buffer[start].data_ptr())

            # on this thread: the GEMM's OpenMP threads still spin after each call, so pool threads decoding
            # beside them would fight them for the cores (measured: 768x3072 at batch 64, 7x slower)
            decode(0, count)
            torch.mm(buffer[:count], flat.t(), out=out[first : first + count])
        y = out.t()
    del keep
    y = y + bias.to(torch.float32) if bias is not None else y.contiguous()
    return y.reshape(*x.shape[:-1], out_features)
