"""The torch kernels: every kernel in plain torch ops, for any device and dtype.

They are the reference the native loops (:mod:`.cpu`) are tested against, the
kernels of a machine without a C compiler, and the kernels on CUDA.  Passes over
the weights go in pieces of a few hundred thousand weights, so that every
temporary (the patterns widened to int32, a piece's gathered values) stays in
cache; every sum that could run over more than a piece is carried in float64.

Keys: weight ``i`` (of ``patterns``, the weights' 16-bit patterns) is in group
``i // group_numel``; its entry in table space is its pattern plus 65,536 times
its group.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor

from .ranking import Bounds, nearest_two_packed, rank, unpack

PATTERNS = 1 << 16
#: Weights per piece of a gather over the weights: the piece's patterns and temporaries stay in cache.
PIECE = 1 << 17
#: Weights per piece of a count (``bincount``): larger, as each piece also writes and adds a whole table
#: (2**18 int32 patterns, 1 MiB, still stay in a core's cache).
COUNT_PIECE = 1 << 18
#: Weights per piece of a gradient sum: each piece is summed in the given dtype, the pieces in float64.
SUM_PIECE = 1 << 17
#: Items per piece of a float64 scatter-add: the float64 copies stay small (a large temporary costs page
#: faults on every call, more than the scatter itself).
SCATTER_ITEMS = 8192


def pieces(numel: int, size: int) -> list[slice]:
    return [slice(start, min(start + size, numel)) for start in range(0, numel, size)]


def keys_of(patterns: Tensor, group_numel: int, part: slice) -> Tensor:
    """int32 entries in table space of the weights ``part``."""
    keys = patterns[part].to(torch.int32)
    if group_numel < patterns.numel():
        first = torch.arange(part.start, part.stop, device=keys.device, dtype=torch.int32)
        keys += first.div_(group_numel, rounding_mode="floor").mul_(PATTERNS)
    return keys


def bits(table: Tensor) -> Tensor:
    """A 16-bit float tensor viewed as int16 (``index_select`` copies 16-bit integers faster), others as they are."""
    return table.view(torch.int16) if table.is_floating_point() and table.element_size() == 2 else table


def count(patterns: Tensor, group_numel: int, table_size: int) -> Tensor:
    """``(table_size,)`` int64: how many weights have each key."""
    table = torch.zeros(table_size, dtype=torch.int64, device=patterns.device)
    for part in pieces(patterns.numel(), COUNT_PIECE):
        table += torch.bincount(keys_of(patterns, group_numel, part), minlength=table_size)
    return table


def present(table: Tensor) -> Tensor:
    """The keys whose count is not zero, ascending."""
    return torch.nonzero(table).flatten()


def expand(patterns: Tensor, group_numel: int, table: Tensor) -> Tensor:
    """``table[key]`` for every weight, bit for bit."""
    return expand_by(lambda part: keys_of(patterns, group_numel, part), patterns.numel(), table)


def sum_per_key(
    patterns: Tensor, group_numel: int, values: Tensor, live: Tensor, table_size: int, dtype: torch.dtype
) -> Tensor:
    """float64 sums of ``values`` at the keys ``live`` (every key that occurs, ascending)."""
    return sums_by(lambda part: keys_of(patterns, group_numel, part), values, live, table_size, dtype)


def affine(patterns: Tensor, group_numel: int, shift: Tensor, slope: Tensor, grad: Tensor) -> Tensor:
    """``shift[key] + grad * slope[key]`` for every weight (tables in ``grad``'s dtype)."""
    return affine_by(lambda part: keys_of(patterns, group_numel, part), shift, slope, grad)


# -- the same passes for keys given piece by piece (from the patterns above, or a stored index) ----------


def expand_by(keys: Callable[[slice], Tensor], numel: int, table: Tensor) -> Tensor:
    """``table[keys]`` for ``numel`` weights, bit for bit; ``keys(part)`` gives the keys of a piece."""
    out = table.new_empty(numel)
    source, target = bits(table), bits(out)
    for part in pieces(numel, PIECE):
        torch.index_select(source, 0, keys(part), out=target[part])
    return out


def sums_by(keys: Callable[[slice], Tensor], values: Tensor, live: Tensor, table_size: int, dtype: torch.dtype) -> Tensor:
    """float64 sums of ``values`` at the keys ``live``: each piece summed in ``dtype`` (``bincount`` adds in
    sequence), the pieces in float64."""
    total = torch.zeros(live.numel(), dtype=torch.float64, device=values.device)
    for part in pieces(values.numel(), SUM_PIECE):
        total += torch.bincount(keys(part), weights=values[part].to(dtype), minlength=table_size)[live]
    return total


def affine_by(keys: Callable[[slice], Tensor], shift: Tensor, slope: Tensor, grad: Tensor) -> Tensor:
    """``shift[key] + grad * slope[key]`` for every weight, tables in ``grad``'s dtype."""
    out = torch.empty_like(grad)
    shift_bits, slope_bits = bits(shift), bits(slope)
    for part in pieces(grad.numel(), PIECE):
        index = keys(part)
        a = shift_bits.index_select(0, index).view(shift.dtype)
        b = slope_bits.index_select(0, index).view(slope.dtype)
        torch.addcmul(a, grad[part], b, out=out[part])
    return out


def scatter(sums: Tensor, keys: Tensor, src: Tensor) -> None:
    """``sums[col, keys[i]] += src[col, i]`` for every column of ``sums`` (C, bins) float64.

    In float32, thousands of items on one centroid would lose digits, so the
    items are widened to float64 a piece at a time (one reused buffer).
    """
    cols, items = sums.shape[0], keys.numel()
    src = src.reshape(cols, -1)
    buffer = sums.new_empty(cols, min(items, SCATTER_ITEMS))
    for part in pieces(items, SCATTER_ITEMS):
        piece = buffer[:, : part.stop - part.start]
        sums.scatter_add_(1, keys[part].long().expand(cols, -1), piece.copy_(src[:, part]))


def row_weights(xt: Tensor, m: Tensor | None) -> Tensor:
    """``(P, ..., r)``: each row's Gram weights ``m, m x_a, (m x_a) x_b (a <= b)`` for ``xt`` ``(d, ..., r)``.

    The sparse path sums them per centroid (:func:`gram_scatter`).  Written in place into one
    buffer (``stack``/``cat`` of the terms cost several times more).
    """
    d = xt.shape[0]
    out = xt.new_empty(1 + d + d * (d + 1) // 2, *xt.shape[1:])
    if m is None:
        out[0].fill_(1.0)
        out[1 : 1 + d].copy_(xt)
    else:
        out[0].copy_(m)
        torch.mul(m, xt, out=out[1 : 1 + d])
    pos = 1 + d
    for a in range(d):  # m x_a x_b for b >= a
        torch.mul(out[1 + a], xt[a:], out=out[pos : pos + d - a])
        pos += d - a
    return out


def gram_scatter(sums: Tensor, keys: Tensor, xt: Tensor, m: Tensor | None, first: int) -> None:
    """``sums[p - first, keys[i]] += w_p(row i)`` for the Gram weights ``w`` (:func:`row_weights`) from term ``first`` on.

    ``xt`` (d, ..., r) the rows, ``m`` (..., r) their multiplicities or None, ``keys`` one per row.
    """
    scatter(sums, keys.reshape(-1), row_weights(xt, m)[first:])


# -- palettized inference: a weight used from its packed indices and LUT (see lut.c for the layout) --------

#: Weights per tile of the torch ``lut_linear``: a tile's int64 temporaries (~6 per weight) stay near 3 MiB.
LUT_TILE = 1 << 16


def lut_rows(packed: Tensor, lut: Tensor, bits: int, dim: int, group_size: int, row_len: int, rows: Tensor) -> Tensor:
    """``(len(rows), row_len)`` rows of the weight, in the LUT's dtype, bit for bit (each is a LUT entry).

    Only the indices of these rows are unpacked: an embedding lookup decodes the tokens it fetches.
    """
    k = lut.shape[1]
    vectors = -(-group_size * row_len // dim)
    rows = rows.reshape(-1).to(device=packed.device, dtype=torch.int64)
    group = torch.div(rows, group_size, rounding_mode="floor")
    position = (rows - group * group_size).unsqueeze(1) * row_len + torch.arange(row_len, device=packed.device)
    bit = (group.unsqueeze(1) * vectors + torch.div(position, dim, rounding_mode="floor")) * bits
    byte = bit >> 3
    # an index's bits span at most two bytes; where the second is past the end, the first holds them all
    word = packed[byte].long() | (packed[(byte + 1).clamp_(max=packed.numel() - 1)].long() << 8)
    index = (word >> (bit & 7)) & ((1 << bits) - 1)
    flat = (group.unsqueeze(1) * k + index) * dim + position % dim
    return gather_bits(lut, flat)


def gather_bits(lut: Tensor, flat: Tensor) -> Tensor:
    """``lut.flatten()[flat]`` copied as bits (16-bit floats as int16: a plain copy, never a rounding)."""
    return bits(lut.reshape(-1)).index_select(0, flat.reshape(-1)).view(lut.dtype).view(flat.shape)


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
    """``x @ W.T + bias``, decoding ``LUT_TILE`` weights of ``W`` at a time (never the whole of it).

    ``scales`` (``(out_features, blocks)``, and ``offsets``): block scales along the rows, blocks of ``block``
    weights (0: one per row), applied to each decoded tile as :mod:`torchdkm.cluster.scales` decodes them.
    """
    row_len = x.shape[-1]
    flat = x.reshape(-1, row_len)
    out = x.new_empty(out_features, flat.shape[0])  # y transposed: a tile's rows are a contiguous block
    tile = max(1, LUT_TILE // max(row_len, 1))
    for start in range(0, out_features, tile):
        stop = min(start + tile, out_features)
        rows = torch.arange(start, stop, device=x.device)
        weight = lut_rows(packed, lut, bits, dim, group_size, row_len, rows)
        weight = scale_rows(weight, rows, scales, offsets, block).to(x.dtype)
        torch.mm(weight, flat.t(), out=out[start:stop])
    y = out.t() + bias.to(x.dtype) if bias is not None else out.t().contiguous()
    return y.reshape(*x.shape[:-1], out_features)


def scale_rows(weight: Tensor, rows: Tensor, scales: Tensor | None, offsets: Tensor | None, block: int) -> Tensor:
    """``weight``, the decoded ``rows``, with those rows' block scales (and offsets) applied as the decoder
    applies them (:func:`rescale`: bit for bit); ``scales`` None: ``weight`` as it is."""
    if scales is None:
        return weight
    row_len = weight.shape[1]
    offset = None if offsets is None else offsets[rows].to(weight.dtype)
    return rescale(weight, min(block or row_len, row_len), scales[rows].to(weight.dtype), offset)


# -- block scales (torchdkm.cluster.scales): a weight (rows, row_len) in blocks of ``block`` along the row --------
# Per-block tables are ``(rows, blocks)`` in the weight's dtype; a short last block is padded (see ``blocked``).


def blocked(flat: Tensor, block: int, mode: str = "constant") -> Tensor:
    """``(rows, blocks, block)``: a short last block padded with zeros (``"constant"``) or its last value."""
    rows, row_len = flat.shape
    pad = -row_len % block
    if pad:
        flat = torch.nn.functional.pad(flat.unsqueeze(1), (0, pad), mode=mode).squeeze(1)
    return flat.view(rows, -1, block)


def _unblocked(per_weight: Tensor, row_len: int) -> Tensor:
    return per_weight.reshape(per_weight.shape[0], -1)[:, :row_len]


def normalise(weight: Tensor, block: int, safe: Tensor, offset: Tensor | None) -> Tensor:
    """``(weight - offset) / safe`` per block (``offset`` None: ``weight / safe``)."""
    w = blocked(weight, block)
    if offset is not None:
        w = w - offset.unsqueeze(-1)
    return _unblocked(w / safe.unsqueeze(-1), weight.shape[1])


def rescale(normalised: Tensor, block: int, scale: Tensor, offset: Tensor | None) -> Tensor:
    """``normalised * scale + offset`` per block (``offset`` None: ``normalised * scale``)."""
    out = blocked(normalised, block) * scale.unsqueeze(-1)
    if offset is not None:
        out = out + offset.unsqueeze(-1)
    return _unblocked(out, normalised.shape[1])


def rescale_grad(grad: Tensor, normalised: Tensor, block: int, scale: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """The gradient of :func:`rescale`: ``(grad * scale, sum grad * normalised, sum grad)`` (sums per block)."""
    g = blocked(grad, block)
    grad_n = _unblocked(g * scale.unsqueeze(-1), grad.shape[1])
    return grad_n, (g * blocked(normalised, block)).sum(-1), g.sum(-1)


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
    """The gradient into the weight of :func:`normalise` with the scale and offset derived from each block.

    With an offset, ``scale = (high - low) / 2`` and ``offset = (high + low) / 2`` (the block's largest and
    smallest values); without, ``scale = high``, the largest magnitude.  ``extra_scale`` / ``extra_offset``:
    the gradient reaching the scale and offset otherwise (None: none).  Ties share evenly (as ``amax``);
    a short last block counts copies of its last value (``blocked``'s ``"replicate"``), their shares going
    to it.  See ``tdkm_normalise_grad_f32`` in ``loops.c`` for the formulas.
    """
    rows, row_len = weight.shape
    w, g = blocked(weight, block, "replicate"), blocked(grad, block)
    s = safe.unsqueeze(-1)
    t = g / s
    n = (w - offset.unsqueeze(-1) if offset is not None else w) / s
    grad_scale = torch.where(scale != 0, -(t * n).sum(-1), torch.zeros_like(scale))
    if extra_scale is not None:
        grad_scale = grad_scale + extra_scale
    if offset is not None:
        assert low is not None
        grad_offset = -t.sum(-1) + (extra_offset if extra_offset is not None else 0)
        at_high, at_low = w == high.unsqueeze(-1), w == low.unsqueeze(-1)
        shares = at_high * ((grad_scale + grad_offset) / 2 / at_high.sum(-1)).unsqueeze(-1)
        shares = shares + at_low * ((grad_offset - grad_scale) / 2 / at_low.sum(-1)).unsqueeze(-1)
    else:
        at_high = w.abs() == high.unsqueeze(-1)
        shares = at_high * torch.sign(w) * (grad_scale / at_high.sum(-1)).unsqueeze(-1)
    flat = (t + shares).reshape(rows, -1)
    out = flat[:, :row_len].clone()
    if flat.shape[1] > row_len:  # the padding copies' shares go to the last value
        out[:, -1] += shares.reshape(rows, -1)[:, row_len:].sum(-1)
    return out


# -- the sparse path's set choice (torchdkm/cluster/selection.py) -----------------------------------------------


def nearest_two(xt: Tensor, c: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Each row's nearest centroid and squared distances to the nearest two: ``(index, first, second)``, ``(G, r)``.

    ``xt`` (G, d, r) the rows, ``c`` (G, k >= 2, d).  One packed ranking (:mod:`.ranking`): near-ties go
    to the lower index, and the distances lose their lowest ``ceil(log2 k)`` bits (truncated towards 0).
    """
    return nearest_two_packed(xt, c)


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
    """Each row's set, whether it is hard, its score and its slack (see :func:`torchdkm.cluster.selection.choose`).

    ``xt`` (G, d, r) the rows, ``c`` (G, k, d) the centroids (``top < k``), ``inv_tau`` (G, 1),
    ``pad`` (G, r) the rows that weigh nothing (hard, with infinite score and slack) or None;
    ``index``, ``first``, ``second``: the rows' :func:`nearest_two` at ``c`` if already made (else
    all None).  Returns ``(index (G, top, r) int64, hard (G, r) bool, score (G, r), slack (G, r))``;
    a hard row's slots after the first are not meaningful.

    The nearest two's distances are read back through :class:`.ranking.Bounds` as safe bounds
    and decide the hard rows; the rows soft in some group are ranked to their ``top + 1`` nearest.
    """
    k, r = c.shape[1], xt.shape[2]
    eps = torch.finfo(c.dtype).eps
    if first is None or second is None or index is None:
        index, first, second = nearest_two(xt, c)
    bounds = Bounds.of(xt, k)
    second, nearest = bounds.below(second), bounds.above(first)
    log_soft, log_hard = math.log(k - top), math.log(k - 1)
    score = (second - nearest).mul_(inv_tau).sub_(log_hard)  # every row as if hard
    hard = score >= hard_score
    if pad is not None:
        hard |= pad
    slack = _slack(score, second, nearest, inv_tau, eps, reselect)
    slots = torch.zeros(c.shape[0], top, r, dtype=torch.int64, device=c.device)
    slots[:, 0] = index
    soft = (~hard).any(0).nonzero().squeeze(1)
    if soft.numel() and top > 1:  # the rows soft in some group: their top nearest, scored on the (top + 1)-th
        xs = xt.reshape(-1, r).index_select(1, soft).view(*xt.shape[:2], -1)
        full = rank(xs, c, top)
        hard_s, second_s, nearest_s = (t.index_select(1, soft) for t in (hard, second, nearest))
        bound_s = torch.where(hard_s, second_s, Bounds.of(xs, k).lower(full[:, top]))
        score_s = (bound_s - nearest_s).mul_(inv_tau).sub_(torch.where(hard_s, log_hard, log_soft))
        score.index_copy_(1, soft, score_s)
        slack.index_copy_(1, soft, _slack(score_s, bound_s, nearest_s, inv_tau, eps, reselect))
        slots.view(-1, r).index_copy_(1, soft, unpack(full[:, :top], k)[0].reshape(-1, soft.numel()).long())
    if pad is not None:
        slack.masked_fill_(pad, math.inf)
        score.masked_fill_(pad, math.inf)
    return slots, hard, score, slack


def _slack(score: Tensor, bound: Tensor, nearest: Tensor, inv_tau: Tensor, eps: float, reselect: float) -> Tensor:
    """The move after which a row's score could fall to ``max(-log eps, score - reselect)``."""
    room = (score + math.log(eps)).clamp_min_(reselect)  # score less the floor it may drop to
    root = bound.sqrt()
    return torch.minimum(room.div_(inv_tau).div_((root + nearest.sqrt()).mul_(2.0)), root)
