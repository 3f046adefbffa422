"""Centroid initialisation: optimal 1-D k-means for scalars, k-means++ then Lloyd for vectors.

Scalars (``dim == 1``).  1-D k-means has an exact solution by dynamic
programming on the sorted values: ``D[q][i]`` is the least squared error of
the first ``i`` values in ``q`` clusters.  The best start of the last cluster is
monotone in ``i`` (the cost is Monge), so each row is filled by divide and
conquer in ``O(n log n)``.  Here it runs on the distinct values with their
counts, every group at once, level by level, in vectorised torch.  For float32
weights the distinct values are taken in 16 bits (at most 65,536 per group), so
the solution is optimal for the rounded weights (relative rounding 2**-11);
a few Lloyd steps on the exact weights then polish it.

Vectors (``dim > 1``).  k-means++ seeding on a sample (deterministic: seeded
generator) and Lloyd on all vectors, chunked.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import torch
from torch import Tensor

from .hard import lloyd

#: k-means++ draws its seeds from at most this many vectors per group.
SEED_SAMPLE = 65536


def optimal_1d(values: Tensor, weights: Tensor, k: int) -> Tensor:
    """Optimal weighted 1-D k-means of each row: ``values``/``weights`` are ``(G, U)``.

    Entries with weight 0 are ignored (padding).  Returns ``(G, k)`` sorted
    centroids; a row with fewer than ``k`` distinct values repeats its values.
    """
    return optimal_1d_many(values, weights, (k,))[k]


def optimal_1d_many(values: Tensor, weights: Tensor, ks: Sequence[int]) -> dict[int, Tensor]:
    """:func:`optimal_1d` for several ``k`` at once, by cluster count.

    The programme for the largest ``k`` fills every smaller one's rows on its
    way (row ``q`` is the optimum with ``q + 1`` clusters), so a planner that
    weighs 1 to 4 bits pays for one programme, not four.
    """
    if not ks or min(ks) < 1:
        raise ValueError(f"optimal_1d_many: cluster counts must be >= 1, got {list(ks)}")
    with _one_thread():  # thousands of small ops: thread start-up would dominate
        return _optimal_1d(values, weights, sorted(set(ks)))


@contextmanager
def _one_thread() -> Iterator[None]:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def _optimal_1d(values: Tensor, weights: Tensor, ks: list[int]) -> dict[int, Tensor]:
    device = values.device
    g_count = values.shape[0]
    v = values.to(torch.float64)
    w = weights.to(torch.float64)
    # Sort each row, padding last, and flatten every row's real values into one array.
    key = torch.where(w > 0, v, torch.full_like(v, float("inf")))
    order = key.argsort(dim=1)
    v, w = v.gather(1, order), w.gather(1, order)
    sizes = (w > 0).sum(1)
    keep = torch.arange(v.shape[1], device=device)[None, :] < sizes[:, None]
    v, w = v[keep], w[keep]
    ends = sizes.cumsum(0) - 1
    starts = ends - sizes + 1
    problem = torch.repeat_interleave(torch.arange(g_count, device=device), sizes)
    centre = torch.zeros(g_count, dtype=torch.float64, device=device)
    centre.index_add_(0, problem, v * w)
    centre = centre / torch.zeros_like(centre).index_add_(0, problem, w).clamp_min(1e-300)
    v = v - centre[problem]  # centred per row: prefix sums lose less to cancellation

    zero = v.new_zeros(1)
    cw = torch.cat([zero, w.cumsum(0)])
    cs = torch.cat([zero, (w * v).cumsum(0)])
    cq = torch.cat([zero, (w * v * v).cumsum(0)])

    def cost(j: Tensor, i: Tensor) -> Tensor:  # squared error of values j..i (inclusive)
        sw = cw[i + 1] - cw[j]
        sx = cs[i + 1] - cs[j]
        return ((cq[i + 1] - cq[j]) - sx * sx / sw).clamp_min(0)

    n = v.shape[0]
    is_start = torch.zeros(n, dtype=torch.bool, device=device)
    is_start[starts] = True
    start_of = starts[problem]
    idx = torch.arange(n, device=device)
    best = cost(start_of, idx)  # one cluster
    choices = []
    for _ in range(1, ks[-1]):
        before = torch.where(is_start, torch.zeros_like(best), best.roll(1))
        best, opt = _dp_row(before, cost, starts, ends)
        choices.append(opt)

    def backtrack(k: int) -> Tensor:
        """Every row at once: the q-th of ``k`` clusters spans opt_q[i]..i."""
        centroids = torch.full((g_count, k), float("nan"), dtype=torch.float64, device=device)
        i = ends.clone()
        for q in range(k - 1, -1, -1):
            alive = i >= starts
            j = choices[q - 1][i.clamp_min(0)] if q > 0 else starts
            j = torch.where(alive, j, i + 1)
            nonempty = alive & (j <= i)
            jj, ii = j.clamp(0, n - 1), i.clamp(0, n - 1)
            mean = (cs[ii + 1] - cs[jj]) / (cw[ii + 1] - cw[jj]).clamp_min(1e-300)
            centroids[:, q] = torch.where(nonempty, mean + centre, centroids[:, q])
            i = torch.where(nonempty, j - 1, i)
        return _fill_missing(centroids).to(values.dtype)

    return {k: backtrack(k) for k in ks}


def _dp_row(before: Tensor, cost, starts: Tensor, ends: Tensor) -> tuple[Tensor, Tensor]:
    """One DP row by divide and conquer, all problems and all segments of a level at once.

    ``best[i] = min_{start <= j <= i} before[j] + cost(j, i)``, argmin monotone in ``i``.
    """
    n = before.shape[0]
    device = before.device
    best = torch.full((n,), float("inf"), dtype=before.dtype, device=device)
    opt = torch.zeros(n, dtype=torch.long, device=device)
    lo, hi, olo, ohi = starts, ends, starts, ends
    big = torch.iinfo(torch.long).max
    while lo.numel():
        mid = (lo + hi) // 2
        top = torch.minimum(mid, ohi)
        lens = top - olo + 1
        seg = torch.repeat_interleave(torch.arange(lo.numel(), device=device), lens)
        offsets = lens.cumsum(0) - lens
        j = olo[seg] + torch.arange(seg.numel(), device=device) - offsets[seg]
        val = before[j] + cost(j, mid[seg])
        seg_best = torch.full((lo.numel(),), float("inf"), dtype=val.dtype, device=device)
        seg_best = seg_best.scatter_reduce(0, seg, val, "amin")
        hit = torch.where(val <= seg_best[seg], j, torch.full_like(j, big))
        arg = torch.full((lo.numel(),), big, dtype=torch.long, device=device).scatter_reduce(0, seg, hit, "amin")
        best[mid], opt[mid] = seg_best, arg
        left = lo <= mid - 1
        right = mid + 1 <= hi
        lo, hi, olo, ohi = (
            torch.cat([lo[left], mid[right] + 1]),
            torch.cat([mid[left] - 1, hi[right]]),
            torch.cat([olo[left], arg[right]]),
            torch.cat([arg[left], ohi[right]]),
        )
    return best, opt


def _fill_missing(centroids: Tensor) -> Tensor:
    """Rows with fewer distinct values than ``k``: repeat the values found (never NaN)."""
    missing = torch.isnan(centroids)
    if not bool(missing.any()):
        return centroids
    out = centroids.clone()
    for g in torch.nonzero(missing.any(1)).flatten().tolist():
        found = centroids[g][~missing[g]]
        if found.numel() == 0:
            found = centroids.new_zeros(1)
        out[g] = found.repeat(-(-centroids.shape[1] // found.numel()))[: centroids.shape[1]].sort().values
    return out


def kmeans_pp(x: Tensor, m: Tensor | None, k: int, generator: torch.Generator) -> Tensor:
    """k-means++ seeds for every group at once (sampled, weighted by multiplicity)."""
    g, n, d = x.shape
    if n > SEED_SAMPLE:
        pick = torch.randperm(n, generator=generator, device="cpu")[:SEED_SAMPLE].to(x.device)
        x = x[:, pick]
        m = None if m is None else m[:, pick]
    weights = torch.ones(x.shape[:2], dtype=x.dtype, device=x.device) if m is None else m.to(x.dtype)
    rows = torch.arange(g, device=x.device)
    c = x.new_empty(g, k, d)
    first = torch.multinomial(weights.cpu() + 1e-30, 1, generator=generator).flatten().to(x.device)
    c[:, 0] = x[rows, first]
    d2 = ((x - c[:, :1]) ** 2).sum(-1)
    for j in range(1, k):
        p = d2 * weights
        total = p.sum(1, keepdim=True)
        p = torch.where(total > 0, p, weights)  # all covered: any real vector
        pick = torch.multinomial(p.cpu() + 1e-30, 1, generator=generator).flatten().to(x.device)
        c[:, j] = x[rows, pick]
        d2 = torch.minimum(d2, ((x - c[:, j : j + 1]) ** 2).sum(-1))
    return c


def init_centroids(
    x: Tensor,
    m: Tensor | None,
    k: int,
    rows: int,
    *,
    distinct: tuple[Tensor, Tensor] | None = None,
    lloyd_iters: int | None = None,
    seed: int = 0,
) -> Tensor:
    """Initial ``(G, k, d)`` centroids for ``(G, n, d)`` vectors.

    distinct: for ``dim == 1``, ``(values, counts)`` of shape ``(G, U)``; when
        given, the 1-D optimum is found on them and polished on ``x``.
    lloyd_iters: Lloyd steps after the start (default 3 polishing the 1-D
        optimum, 25 after k-means++).
    """
    return init_centroids_many(x, m, (k,), rows, distinct=distinct, lloyd_iters=lloyd_iters, seed=seed)[k]


def init_centroids_many(
    x: Tensor,
    m: Tensor | None,
    ks: Sequence[int],
    rows: int,
    *,
    distinct: tuple[Tensor, Tensor] | None = None,
    lloyd_iters: int | None = None,
    seed: int = 0,
) -> dict[int, Tensor]:
    """:func:`init_centroids` for several cluster counts (scalars share one dynamic programme)."""
    work = x.to(torch.float64) if x.dtype not in (torch.float32, torch.float64) else x
    if work.shape[-1] == 1:
        values, weights = distinct if distinct is not None else (work[..., 0], _ones(work, m))
        starts = {k: c.to(work.dtype).unsqueeze(-1) for k, c in optimal_1d_many(values, weights, ks).items()}
        iters = 3 if lloyd_iters is None else lloyd_iters
    else:
        starts = {k: kmeans_pp(work, m, k, torch.Generator().manual_seed(seed)) for k in ks}
        iters = 25 if lloyd_iters is None else lloyd_iters
    return {k: (lloyd(work, m, c, rows, iters) if iters else c).to(x.dtype) for k, c in starts.items()}


def _ones(x: Tensor, m: Tensor | None) -> Tensor:
    return torch.ones(x.shape[:2], dtype=x.dtype, device=x.device) if m is None else m
