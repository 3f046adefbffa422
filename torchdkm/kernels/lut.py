"""The native palettized-inference kernels: wrappers that hand a packed weight to the C loops of ``lut.c``.

They compute what :func:`.default.lut_rows` and :func:`.default.lut_linear` compute (the tests compare
them), for float32 inputs on the CPU; other dtypes go to the torch kernels.  The LUT is widened to float32
(exact for 16-bit LUTs, so decoded rows are still bit for bit the stored values).

``lut_linear`` never writes the dense weight anywhere:

* up to :data:`GEMV_ROWS` rows of ``x`` (decoding, a batch of a few tokens): one pass over the packed
  indices, unpacked and looked up in registers, multiplied by their block's scale (and offset) and into
  float32 accumulators, output rows split over ``torch.get_num_threads()`` threads.  This product is
  bound by memory traffic, and 3-bit indices are ~10x fewer bytes than float32 weights.  Block scales
  whose blocks cut a 16-index chunk take the next path instead (:attr:`PackedWeight.direct`).
* more rows, up to :data:`GEMM_ROWS`, on AVX-512 (:attr:`PackedWeight.gemm`): ``lut_gemm.c``, a GEMM whose weight
  operand is decoded 32 outputs x 256 inputs at a time into L1 and used there by every row of ``x``, so no
  decoded weight is written to memory (``python -m bench.inference`` on the Xeon of its results: batch 64 at
  0.87-1.02x fp32 where the tiles below ran at 0.59-0.76x; MiniLM on one sentence of 24 tokens 1.32-1.50x fp32).
* more rows (or without AVX-512): the loops decode :data:`TILE` weights (block scales applied as the decoder applies them) into
  a 4 MiB float32 buffer (one per thread, :mod:`.scratch`, reused by every call) and a GEMM (``torch.mm``)
  multiplies each tile, so the compute is the BLAS's and the extra memory one tile.
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
from .scratch import scratch

#: The documented tolerance of ``lut_linear`` against decode-then-matmul in float64, for rows up to 16k
#: long: ``|y - x W^T| <= RTOL * (|x| |W|^T)`` elementwise (float32 sums in another order, FMA, lanes).
RTOL = 1e-5
#: Up to this many rows of ``x`` the product runs from the indices directly (8 at a time share one unpacking).
GEMV_ROWS = int(os.environ.get("TORCHDKM_GEMV_ROWS", "16"))
#: Up to this many rows of ``x`` (above :data:`GEMV_ROWS`), or any number for a weight of at most :data:`TILE`
#: weights, the product runs as ``lut_gemm.c``'s GEMM where it can (AVX-512).  More rows times a larger weight
#: go to decoded tiles and torch's GEMM: there its efficiency on a large product wins (timed alternately on the
#: 2-core Xeon: 4096x4096 at 512 rows, tiles 0.89x fp32 and lut_gemm 0.79x; MiniLM at 8 x 64 tokens, whose
#: weights fit a tile, lut_gemm 0.90x and tiles 0.83x).
GEMM_ROWS = int(os.environ.get("TORCHDKM_GEMM_ROWS", "256"))
#: Weights per decoded tile above :data:`GEMV_ROWS` (float32: 4 MiB). Fewer, larger GEMM calls: on a busy
#: 2-core machine each call pays its OpenMP barrier (measured ~8 ms per call when another process runs).
TILE = 1 << 20
#: Below this much work (weights x rows of ``x``) a call runs on one thread.  Handing jobs to the pool and
#: waiting for them cost more than a small product on a 2-core machine: at 2**18 the 576x1536 batch-1 rows
#: of ``python -m bench.inference`` ran at 0.27x fp32 and SmolLM2 decoded at 0.62x; from 2**24 the split pays.
MIN_PARALLEL = 1 << 24
#: The same for the direct product on torch's OpenMP team (``pool.c``: a parallel region costs a few
#: microseconds, not the Python pool's 30-50 us), so much smaller products pay.
MIN_GEMV_PARALLEL = int(os.environ.get("TORCHDKM_GEMV_PARALLEL", str(1 << 16)))


_PID = os.getpid()  # the process that imported torchdkm: a forked child's differs


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


class PackedWeight:
    """A packed weight as the native loops read it, made once and used by every call.

    Holds the C view (:class:`.build.Palette`) and the tensors it points into (the LUT widened to float32
    and padded to ``2**bits`` entries; the block scales and offsets as stored), so a call pays
    neither the conversions nor the checks: a palettized module keeps one (see
    :func:`torchdkm.nn.inference.packed_weight`) and the ``torch.ops.torchdkm`` kernels make one per call.
    ``block`` (with ``scales``): blocks of ``block`` weights along each row, one scale (and offset) each,
    weight ``LUT[index] * scale + offset`` (see :mod:`torchdkm.cluster.scales`).
    """

    def __init__(
        self,
        packed: Tensor,
        lut: Tensor,
        bits: int,
        dim: int,
        group_size: int,
        out_features: int,
        row_len: int,
        scales: Tensor | None = None,
        offsets: Tensor | None = None,
        block: int = 0,
    ) -> None:
        groups, k = -(-out_features // group_size), 1 << bits
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
        self.out_features, self.row_len = out_features, row_len
        self.packed, self.table = packed.contiguous(), table.contiguous()
        self.scales, self.offsets, self.block = _block_tables(scales, offsets, block, out_features, row_len)
        blocks = self.scales.shape[1] if self.scales is not None else 0
        half = self.scales is not None and self.scales.dtype == torch.float16
        self.spec = Palette(
            self.packed.data_ptr(), self.packed.numel(), bits, dim, group_size, row_len, vectors,
            self.table.data_ptr(), _pointer(self.scales), _pointer(self.offsets), self.block, blocks, half,
        )  # fmt: skip
        self.ref = ctypes.byref(self.spec)
        self.library = lut_library()
        #: Whether the direct product takes the block scales (every 16-index chunk in one block; else tiles).
        self.direct = bool(self.library.tdkm_lut_whole_chunks(self.ref))
        #: The loops run their parts on torch's OpenMP team (else the Python pool splits the work).
        self.openmp = bool(self.library.tdkm_openmp())
        self._gemv = self.library.tdkm_lut_gemv_threads  # (bound once: decoding calls it ~200 times a token)

    @property
    def gemm(self) -> bool:
        """Whether ``lut_gemm.c`` multiplies more rows here (AVX-512, vectorised rows, torch's OpenMP team); asked
        at each use, as the instruction set may be capped after the weight is made (the tests do)."""
        return self.openmp and bool(self.library.tdkm_lut_gemm_ok(self.ref))

    def rows(self, rows: Tensor, scaled: bool = False) -> Tensor:
        """``(len(rows), row_len)`` float32 rows of the weight (``scaled``: block scales applied as decoding does)."""
        rows = rows.reshape(-1).to(torch.int64).contiguous()
        out_rows = self.table.shape[0] * self.spec.group_size
        if rows.numel() and (int(rows.min()) < 0 or int(rows.max()) >= out_rows):
            raise IndexError(f"lut_rows: a row index is outside [0, {out_rows})")
        out = torch.empty(rows.numel(), self.row_len, dtype=torch.float32)
        if not rows.numel() or not self.row_len:
            return out
        self._decode(rows, 0, rows.numel(), out, scaled)
        return out

    def _decode(self, rows: Tensor, first: int, count: int, out: Tensor, scaled: bool) -> None:
        """``out[:count] =`` rows ``rows[first : first + count]`` of the weight, on torch's OpenMP team where the
        loops joined it (a whole weight decoded for a GEMM is written by every core), else on the
        Python pool above :data:`MIN_PARALLEL`."""
        pointer, work = rows.data_ptr() + 8 * first, count * self.row_len
        if self.openmp:
            self.library.tdkm_lut_rows_threads(self.ref, pointer, count, out.data_ptr(), int(scaled), _team_threads(work))
            return
        function = self.library.tdkm_lut_rows

        def job(start: int, stop: int) -> None:
            function(self.ref, pointer + 8 * start, stop - start, out[start].data_ptr(), int(scaled))

        run_jobs([lambda s=s: job(*s) for s in _spans(count, work)])

    def linear(self, x: Tensor, bias: Tensor | None) -> Tensor:
        """``x @ W.T + bias`` for float32 ``x`` on the CPU (see the module docstring for the four paths)."""
        out_features, row_len = self.out_features, self.row_len
        if self.direct and row_len and x.shape[-1] == row_len and x.numel() // row_len <= GEMV_ROWS:
            # decoding: the direct product in x's own shape, no reshapes or transposed copies (each costs ~1 us)
            x = x.contiguous()
            y = x.new_empty((*x.shape[:-1], out_features))
            self._product(x, x.numel() // row_len, y)
            return y if bias is None else y.add_(bias)
        flat = x.reshape(-1, row_len).contiguous()
        n = flat.shape[0]
        if (n <= GEMM_ROWS or out_features * row_len <= TILE) and self.gemm:
            y = self._gemm(flat, bias)
        elif out_features * row_len <= TILE:  # one tile holds the weight: decode it, then a dense Linear's GEMM
            buffer = scratch((out_features, row_len), torch.float32, flat.device, "lut")
            self._decode(_all_rows(out_features), 0, out_features, buffer, True)
            y = torch.nn.functional.linear(flat, buffer, None if bias is None else bias.to(torch.float32))
        else:
            y = self._tiles(flat, bias)
        return y.reshape(*x.shape[:-1], out_features)

    def _product(self, x: Tensor, n: int, y: Tensor) -> None:
        """``y = x @ W.T`` for ``n`` contiguous rows of ``x`` (any leading shape) from the indices: on torch's
        OpenMP team where the loops joined it, else on the Python pool (only products of :data:`MIN_PARALLEL`
        and more: handing jobs to it costs 30-50 us)."""
        row_len, out = self.row_len, self.out_features
        work = out * row_len * n
        if self.openmp:
            failed = self._gemv(self.ref, 0, out, x.data_ptr(), row_len, n, y.data_ptr(), out, _team_threads(work))
        else:
            gemv = self.library.tdkm_lut_gemv
            failed = any(run_jobs([lambda s=s: gemv(self.ref, *s, x.data_ptr(), row_len, n, y.data_ptr(), out) for s in _spans(out, work)]))
        if failed:
            raise MemoryError("lut_linear: out of memory for the block tables")

    def _gemm(self, flat: Tensor, bias: Tensor | None) -> Tensor:
        """``flat @ W.T + bias`` by ``lut_gemm.c`` on torch's OpenMP team (bias added as the sums start)."""
        n, out = flat.shape[0], self.out_features
        y = torch.empty(n, out, dtype=torch.float32)
        bias = None if bias is None else bias.to(torch.float32).contiguous()
        threads = _team_threads(out * self.row_len * n)
        if self.library.tdkm_lut_gemm_threads(self.ref, flat.data_ptr(), self.row_len, n, y.data_ptr(), out, _pointer(bias), threads):
            raise MemoryError("lut_linear: out of memory for the packed rows of x")
        return y

    def _tiles(self, flat: Tensor, bias: Tensor | None) -> Tensor:
        """A tile of rows at a time: decoded into one reused buffer, then multiplied by a GEMM."""
        out_features, row_len = self.out_features, self.row_len
        out = torch.empty(out_features, flat.shape[0], dtype=torch.float32)  # y transposed: a tile's rows are one block
        tile = max(1, min(out_features, TILE // max(row_len, 1)))
        buffer = scratch((tile, row_len), torch.float32, flat.device, "lut")
        rows = _all_rows(out_features)
        for first in range(0, out_features, tile):
            count = min(tile, out_features - first)
            # (without OpenMP on this thread: the GEMM's OpenMP threads still spin after each call, so pool
            # threads decoding beside them would fight them for the cores; measured: 768x3072 at batch 64, 7x slower)
            if self.openmp:
                self._decode(rows, first, count, buffer, True)
            else:
                self.library.tdkm_lut_rows(self.ref, rows.data_ptr() + 8 * first, count, buffer.data_ptr(), 1)
            torch.mm(buffer[:count], flat.t(), out=out[first : first + count])
        y = out.t()
        return y + bias.to(torch.float32) if bias is not None else y.contiguous()


def _team_threads(work: int) -> int:
    """Threads of torch's OpenMP team for ``work`` (weights x rows): all of them from :data:`MIN_GEMV_PARALLEL`,
    else one; one in a forked child too (see pool.c; torch's operators do the same)."""
    return torch.get_num_threads() if work >= MIN_GEMV_PARALLEL and os.getpid() == _PID else 1


def _pointer(t: Tensor | None) -> int | None:
    return None if t is None else t.data_ptr()


def _block_tables(
    scales: Tensor | None, offsets: Tensor | None, block: int, rows: int, row_len: int
) -> tuple[Tensor | None, Tensor | None, int]:
    """The block scales (and offsets) as ``(rows, blocks)`` tables the loops read, checked, and the block length.

    float16 tables (as stored) are used in place, widened a row at a time in the loops, so a loaded model
    holds its scales once; others become float32 (both of one dtype).
    """
    if scales is None:
        if offsets is not None:
            raise TorchdkmError("lut kernel: offsets without scales")
        return None, None, 0
    block = min(block or row_len, row_len)
    shape = (rows, -(-row_len // block))
    for name, t in (("scales", scales), ("offsets", offsets)):
        if t is not None and tuple(t.shape) != shape:
            raise TorchdkmError(f"lut kernel: {name} of shape {shape} needed for blocks of {block}, got {tuple(t.shape)}")
    half = scales.dtype == torch.float16 and (offsets is None or offsets.dtype == torch.float16)
    dtype = torch.float16 if half else torch.float32
    table = (lambda t: None if t is None else t.to(dtype).contiguous())
    return table(scales), table(offsets), block


def _spans(count: int, work: int) -> list[tuple[int, int]]:
    threads = torch.get_num_threads()
    if work < MIN_PARALLEL or threads < 2 or count < 2:
        return [(0, count)]
    step = -(-count // threads)
    return [(start, min(start + step, count)) for start in range(0, count, step)]


_ROWS: dict[int, Tensor] = {}


def _all_rows(count: int) -> Tensor:
    """``arange(count)`` as int64, kept (the loops take a list of rows)."""
    if count not in _ROWS:
        _ROWS[count] = torch.arange(count, dtype=torch.int64)
    return _ROWS[count]


def lut_rows(packed: Tensor, lut: Tensor, bits: int, dim: int, group_size: int, row_len: int, rows: Tensor) -> Tensor:
    """``(len(rows), row_len)`` rows of the weight in the LUT's dtype, bit for bit (see :func:`.default.lut_rows`)."""
    weight = PackedWeight(packed, lut, bits, dim, group_size, lut.shape[0] * group_size, row_len)
    out = weight.rows(rows)
    return out if lut.dtype == torch.float32 else out.to(lut.dtype)


def lut_linear(
    x: Tensor,
    packed: Tensor,
    lut: Tensor,
    bits: int,
    dim: int,
    group_size: int,
    out_features: int,
    bias: Tensor | None,
    scales: Tensor | None = None,
    offsets: Tensor | None = None,
    block: int = 0,
) -> Tensor:
    """``x @ W.T + bias`` from the packed weight (float32 ``x``; others: the torch kernel)."""
    if x.dtype != torch.float32:
        return default.lut_linear(x, packed, lut, bits, dim, group_size, out_features, bias, scales, offsets, block)
    weight = PackedWeight(packed, lut, bits, dim, group_size, out_features, x.shape[-1], scales, offsets, block)
    return weight.linear(x, bias)
