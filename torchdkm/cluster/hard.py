"""Hard (nearest-centroid) k-means pieces: assignment, distortion, Lloyd, re-seeding.

All functions take the batched ``(G, n, d)`` vectors, ``(G, n)`` multiplicities
(``None``: all 1) and ``(G, k, d)`` centroids of :mod:`.problem`, and
work chunk by chunk so memory stays bounded.
"""

from __future__ import annotations

import functools

import torch
from torch import Tensor

from ..kernels.ranking import INT_OF, nearest_two_packed
from .problem import row_chunks


def nearest(x: Tensor, c: Tensor, rows: int) -> tuple[Tensor, Tensor]:
    """Index of each vector's nearest centroid ``(G, n)`` and its squared distance.

    In chunks of at most ``CACHE_ROWS`` rows (each row's result is its own, so the chunking changes no
    bit): the ``k x rows`` scores then stay in cache (1.7x faster than 64 MiB chunks on 4M scalars).
    Scalars with more than :data:`SEARCH_FROM_K` centroids are looked up among the sorted centroids
    instead (:func:`nearest_scalars`, the same result bit for bit, ``O(n log k)``).
    """
    if x.shape[-1] == 1 and c.shape[1] >= SEARCH_FROM_K:
        return nearest_scalars(x, c)
    index, dist, _ = _nearest(x, c, min(rows, CACHE_ROWS), False)
    return index, dist


#: From this many centroids on, scalars find their nearest by binary search (measured on 28M weights: k=4 ~equal,
#: k=16 several times faster than the k-pass scan).
SEARCH_FROM_K = 4
#: Scalars per chunk of :func:`nearest_scalars` (its temporaries are a few values per scalar).
SEARCH_ROWS = 1 << 20


def nearest_scalars(x: Tensor, c: Tensor) -> tuple[Tensor, Tensor]:
    """:func:`nearest` for scalars ``(G, n, 1)``, by binary search among the sorted centroids.

    The bucket found between midpoints is only a candidate (a rounded midpoint can
    misplace a scalar next to it), so its neighbours are compared too, by the
    same exact ``(c - x)**2`` as the scan; equal centroids are represented by
    their lowest index and equal distances go to the lower index, as the scan's
    first maximum does.
    """
    g, n, _ = x.shape
    k = c.shape[1]
    values, order = c[..., 0].sort(dim=1, stable=True)
    position = torch.arange(k, device=c.device).expand(g, k)
    starts = torch.where(values == values.roll(1, 1), torch.zeros_like(position), position)
    starts[:, 0] = 0
    first = order.gather(1, starts.cummax(1).values)  # (G, k): lowest index among equal centroids
    mids = ((values[:, :-1] + values[:, 1:]) / 2).contiguous()
    index = torch.empty(g, n, dtype=torch.long, device=x.device)
    dist = torch.empty(g, n, dtype=x.dtype, device=x.device)
    for s in row_chunks(n, SEARCH_ROWS):
        xs = x[:, s, 0].contiguous()
        bucket = torch.searchsorted(mids, xs)
        best_d, best_i = None, None
        for shift in (-1, 0, 1):
            candidate = first.gather(1, (bucket + shift).clamp_(0, k - 1))
            d = (c[..., 0].gather(1, candidate) - xs).square_()
            if best_d is None:
                best_d, best_i = d, candidate
            else:
                better = (d < best_d) | ((d == best_d) & (candidate < best_i))
                best_d, best_i = torch.where(better, d, best_d), torch.where(better, candidate, best_i)
        index[:, s], dist[:, s] = best_i, best_d
    return index, dist


def nearest_two(x: Tensor, c: Tensor, rows: int) -> tuple[Tensor, Tensor, Tensor]:
    """Like :func:`nearest`, plus the squared distance to the second-nearest centroid.

    In float32/float64 the distances are ranked as integers (:mod:`torchdkm.kernels.ranking`):
    near-ties go to the lower index, and the distances lose their lowest
    ``ceil(log2 k)`` bits (truncated towards 0).
    """
    if x.dtype in INT_OF and c.shape[1] > 1:
        return nearest_two_packed(x.transpose(1, 2), c, min(rows, CACHE_ROWS))
    index, dist, second = _nearest(x, c, rows, True)
    return index, dist, second


#: Rows per chunk of :func:`nearest_two`: the ``k x rows`` distances then stay in cache.
CACHE_ROWS = 32768


def _nearest(x: Tensor, c: Tensor, rows: int, two: bool) -> tuple[Tensor, Tensor, Tensor | None]:
    g, n, _ = x.shape
    index = torch.empty(g, n, dtype=torch.long, device=x.device)
    dist = torch.empty(g, n, dtype=x.dtype, device=x.device)
    second = torch.empty(g, n, dtype=x.dtype, device=x.device) if two and c.shape[1] > 1 else None
    cc = (c * c).sum(-1, keepdim=True)
    for s in row_chunks(n, rows):
        xs = x[:, s]
        if x.shape[-1] == 1:  # exact differences for scalars
            score = (c - xs.transpose(1, 2)).square_().neg_()  # (G, k, r): -|x - c|^2
            offset = 0.0
        else:
            score = torch.baddbmm(-cc, 2.0 * c, xs.transpose(1, 2))  # (G, k, r): 2 x.c - |c|^2 = -|x - c|^2 + |x|^2
            offset = (xs * xs).sum(-1)
        best, index[:, s] = score.max(1)
        if second is not None:  # mask the winner, take the max again: two passes, cheaper than topk
            score.scatter_(1, index[:, s].unsqueeze(1), float("-inf"))
            second[:, s] = (offset - score.amax(1)).clamp_min(0)
        dist[:, s] = (offset - best).clamp_min(0)
    return index, dist, second


def squared_norms(x: Tensor) -> Tensor:
    """``|x|^2`` of every vector ``(G, n, d)``: ``(G, n)`` (a coordinate at a time: a sum over a short last
    dim is several times slower)."""
    if x.shape[-1] > 16:
        return (x * x).sum(-1)
    out = x[..., 0].square()
    for a in range(1, x.shape[-1]):
        out.addcmul_(x[..., a], x[..., a])
    return out


def counts(index: Tensor, m: Tensor | None, k: int) -> Tensor:
    """Multiplicity-weighted number of vectors per centroid: ``(G, k)``."""
    g = index.shape[0]
    keys = index.reshape(-1) if g == 1 else (index + k * torch.arange(g, device=index.device)[:, None]).reshape(-1)
    weights = None if m is None else m.reshape(-1)
    return torch.bincount(keys, weights=weights, minlength=g * k).view(g, k).to(torch.float64)


def distortion(dist: Tensor, m: Tensor | None) -> Tensor:
    """Mean squared distance to the nearest centroid, per group: ``(G,)``."""
    if m is None:
        return dist.mean(1)
    return (dist * m).sum(1) / m.sum(1).clamp_min(1)


#: In the layer's mean margin (the unit of tau) and in the mean square under its floor, no
#: vector counts more than this many times the median, so a few outlying weights (1e6 among
#: N(0, 0.02)) cannot make the temperature so high that the other centroids collapse.
#: Gaussian weights reach it only in their far tails at 6-8 bits (max/median margin ~460-1600
#: at 512x512), where it lowers the mean by 1.3% (6 bits) and 2.2% (8 bits); at 4 bits and
#: for 2-dim vectors it changes nothing.
MARGIN_CLIP = 100.0
#: The median is taken over about this many evenly strided entries in all (at least 16 per
#: group), unweighted (multiplicities only mark padding): a coarse clip needs no exact median,
#: and a sort of the whole layer every step would cost more than the step.
MEDIAN_SAMPLE = 4096


def clipped_mean(values: Tensor, m: Tensor | None, groups: int | None = None, picks: Tensor | None = None) -> Tensor:
    """Per-row mean of ``values`` (R, n) clipped at ``MARGIN_CLIP`` times their (sampled) median.

    ``groups``: the groups the sample is shared among (default: the rows; rows that stack several
    quantities of the same groups give the groups, so each row is sampled as it would be alone).
    ``picks``: each row's sample positions instead (-1: none), from :func:`median_picks`.
    """
    g, n = values.shape
    if picks is not None:
        sample = values.gather(1, picks.clamp_min(0))
        real = picks >= 0 if m is None else (picks >= 0) & (m.gather(1, picks.clamp_min(0)) > 0)
        sample = torch.where(real, sample, torch.full_like(sample, float("nan")))
    else:
        pick = sample_positions(n, groups or g, values.device)
        sample = values if pick is None else values[:, pick]
        if m is not None:
            real = m if pick is None else m[:, pick]
            sample = torch.where(real > 0, sample, torch.full_like(sample, float("nan")))
    median = sample.nanmedian(dim=1).values
    cap = torch.where(median > 0, MARGIN_CLIP * median, torch.full_like(median, float("inf")))
    return distortion(torch.minimum(values, cap[:, None]), m)


def sample_positions(n: int, groups: int, device: torch.device | None = None) -> Tensor | None:
    """Where a row of ``n`` values is sampled for its median when ``groups`` rows share ``MEDIAN_SAMPLE``:
    evenly spaced positions, or ``None`` (every value) when the row is no longer than its share."""
    per_group = max(16, MEDIAN_SAMPLE // max(groups, 1))
    return torch.linspace(0, n - 1, per_group, device=device).long() if n > per_group else None


def median_picks(lengths: list[int], groups: list[int], device: torch.device) -> Tensor:
    """:func:`clipped_mean`'s sample positions for layers stacked as groups, each sampled as it would be alone.

    Layer ``i`` has ``groups[i]`` groups of ``lengths[i]`` rows; the result is ``(sum groups, s)``, -1-padded.
    Layers that step together ask for the same picks every step: they are made once (read-only).
    """
    return _median_picks(tuple(lengths), tuple(groups), torch.device(device))


@functools.lru_cache(maxsize=64)
def _median_picks(lengths: tuple[int, ...], groups: tuple[int, ...], device: torch.device) -> Tensor:
    rows = []
    for n, g in zip(lengths, groups):
        pick = sample_positions(n, g)
        rows += [torch.arange(n) if pick is None else pick] * g
    return torch.nn.utils.rnn.pad_sequence(rows, batch_first=True, padding_value=-1).to(device)


def reseed_empty(x: Tensor, m: Tensor | None, c: Tensor, index: Tensor, dist: Tensor) -> Tensor:
    """Move centroids that no vector chooses (empty or duplicate) onto the worst-served vectors.

    A centroid is replaced only by a vector that no centroid represents exactly
    (distance > 0), so a layer with fewer distinct vectors than centroids keeps
    its duplicates rather than churning.  Returns new centroids (or ``c``).
    """
    k = c.shape[1]
    empty = counts(index, m, k) == 0
    if not bool(empty.any()):
        return c
    c = c.clone()
    score = dist if m is None else torch.where(m > 0, dist, torch.zeros_like(dist))
    for g in torch.nonzero(empty.any(1)).flatten().tolist():
        slots = torch.nonzero(empty[g]).flatten()
        worst = torch.topk(score[g], min(len(slots), score.shape[1]))
        usable = worst.values > 0
        slots, chosen = slots[: int(usable.sum())], worst.indices[usable]
        c[g, slots] = x[g, chosen].to(c.dtype)
    return c


def lloyd(x: Tensor, m: Tensor | None, c: Tensor, rows: int, iters: int) -> Tensor:
    """Hard k-means iterations from ``c``, re-seeding empty centroids; stops when assignments settle."""
    g, k, d = c.shape
    weights = torch.ones_like(x[..., 0]) if m is None else m
    previous = None
    for _ in range(iters):
        index, dist = nearest(x, c, rows)
        if previous is not None and torch.equal(index, previous):
            break
        previous = index
        keys = (index + k * torch.arange(g, device=x.device)[:, None]).reshape(-1)
        sums = torch.zeros(g * k, d, dtype=x.dtype, device=x.device)
        sums.index_add_(0, keys, (x * weights.unsqueeze(-1)).reshape(-1, d))
        mass = torch.zeros(g * k, dtype=x.dtype, device=x.device).index_add_(0, keys, weights.reshape(-1))
        full = (mass > 0).view(g, k, 1)
        c = torch.where(full, sums.view(g, k, d) / mass.clamp_min(1e-30).view(g, k, 1), c)
        c = reseed_empty(x, m, c, index, dist)
    return c
