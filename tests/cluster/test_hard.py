"""Hard k-means pieces: nearest centroid, counts, distortion, re-seeding, Lloyd."""

from __future__ import annotations

import pytest
import torch

from torchdkm.cluster import hard
from torchdkm.cluster.hard import (
    counts,
    distortion,
    lloyd,
    nearest,
    nearest_scalars,
    nearest_two,
    reseed_empty,
    squared_norms,
)

F64 = torch.float64


@pytest.mark.parametrize("d", [1, 3])
@pytest.mark.parametrize("rows", [1, 7, 1000])
def test_nearest_matches_brute_force(d, rows):
    g = torch.Generator().manual_seed(d)
    x = torch.randn(2, 40, d, generator=g, dtype=F64)
    c = torch.randn(2, 5, d, generator=g, dtype=F64)
    index, dist = nearest(x, c, rows)
    d2 = torch.cdist(x, c).square()
    assert torch.equal(index, d2.argmin(-1))
    assert torch.allclose(dist, d2.min(-1).values, atol=1e-12, rtol=0)


def test_counts_and_distortion_use_multiplicities():
    index = torch.tensor([[0, 1, 1, 2], [2, 2, 2, 2]])
    m = torch.tensor([[1.0, 2.0, 0.0, 3.0], [1.0, 1.0, 0.0, 0.0]])
    assert counts(index, None, 3).tolist() == [[1, 2, 1], [0, 0, 4]]
    assert counts(index, m, 3).tolist() == [[1, 2, 3], [0, 0, 2]]
    dist = torch.tensor([[1.0, 2.0, 100.0, 3.0], [4.0, 2.0, 100.0, 100.0]])
    assert torch.allclose(distortion(dist, m), torch.tensor([(1 + 4 + 9) / 6, 3.0]))
    assert torch.allclose(distortion(dist, None), dist.mean(1))


def test_reseed_moves_empty_centroids_to_worst_served_vectors():
    x = torch.tensor([[[0.0], [0.1], [5.0], [9.0]]], dtype=F64)
    c = torch.tensor([[[0.0], [100.0], [5.0]]], dtype=F64)  # centroid 1 serves nobody
    index, dist = nearest(x, c, 8)
    new = reseed_empty(x, None, c, index, dist)
    assert new is not c
    assert new[0, :, 0].tolist() == [0.0, 9.0, 5.0]  # 9.0 is the worst-served vector


def test_reseed_replaces_duplicates():
    x = torch.tensor([[[0.0], [1.0], [2.0], [8.0]]], dtype=F64)
    c = torch.tensor([[[1.0], [1.0], [8.0]]], dtype=F64)  # a duplicate: one copy is empty
    index, dist = nearest(x, c, 8)
    new = reseed_empty(x, None, c, index, dist)
    assert torch.isfinite(new).all()
    assert len(set(new[0, :, 0].tolist())) == 3


def test_reseed_keeps_duplicates_when_every_vector_is_represented():
    x = torch.tensor([[[1.0], [1.0], [2.0], [2.0]]], dtype=F64)
    c = torch.tensor([[[1.0], [2.0], [2.0], [1.0]]], dtype=F64)
    index, dist = nearest(x, c, 8)
    new = reseed_empty(x, None, c, index, dist)
    assert torch.equal(new, c)


def test_reseed_ignores_padding():
    x = torch.tensor([[[0.0], [1.0], [50.0]]], dtype=F64)
    m = torch.tensor([[1.0, 1.0, 0.0]], dtype=F64)
    c = torch.tensor([[[0.0], [-100.0]]], dtype=F64)
    index, dist = nearest(x, c, 8)
    new = reseed_empty(x, m, c, index, dist)
    assert new[0, 1, 0].item() == 1.0  # not the padded 50.0


def lloyd_reference(x, c, iters=100):
    for _ in range(iters):
        assign = torch.cdist(x, c).argmin(1)
        c = torch.stack([x[assign == j].mean(0) if (assign == j).any() else c[j] for j in range(c.shape[0])])
    return c


@pytest.mark.parametrize("d", [1, 2])
def test_lloyd_converges_to_the_reference_fixed_point(d):
    g = torch.Generator().manual_seed(10 + d)
    x = torch.randn(1, 80, d, generator=g, dtype=F64)
    c0 = x[:, :6].clone()
    c = lloyd(x, None, c0, rows=16, iters=100)
    assert torch.allclose(c[0], lloyd_reference(x[0], c0[0]), atol=1e-12, rtol=0)


def test_lloyd_with_empty_start_never_gives_nan():
    x = torch.randn(2, 30, 2, dtype=F64)
    c0 = torch.full((2, 4, 2), 1e3, dtype=F64)
    c0[:, 0] = 0.0
    c = lloyd(x, None, c0, rows=8, iters=20)
    assert torch.isfinite(c).all()
    assert (torch.cdist(x, c).argmin(-1)[:, :, None] == torch.arange(4)).any(1).all(), "no centroid left empty"


@pytest.mark.parametrize("dtype", [torch.float32, F64])
@pytest.mark.parametrize(("d", "k"), [(1, 16), (2, 16), (3, 12), (2, 4)])
def test_nearest_two_ranks_integers_like_brute_force(dtype, d, k, monkeypatch):
    """The packed-integer ranking (amin, rotation, amin) finds the nearest and second nearest, in chunks."""
    monkeypatch.setattr(hard, "CACHE_ROWS", 64)  # several chunks
    g = torch.Generator().manual_seed(10 * d + k)
    x = torch.randn(2, 300, d, generator=g, dtype=dtype)
    c = torch.randn(2, k, d, generator=g, dtype=dtype)
    c[0, 1] = c[0, 0]  # a tie: the lower index wins
    x[1, 5] = c[1, 3]  # a vector on a centroid: distance exactly 0
    index, first, second = nearest_two(x, c, 100)
    d2 = torch.cdist(x.double(), c.double()).square()
    two = d2.topk(2, -1, largest=False)
    tol = 1e-5 if dtype == torch.float32 else 1e-12
    chosen = d2.gather(-1, index.unsqueeze(-1)).squeeze(-1)  # the chosen centroid is (one of) the nearest
    assert torch.allclose(chosen, two.values[..., 0], atol=tol, rtol=tol)
    assert torch.allclose(first.double(), two.values[..., 0], atol=tol, rtol=tol)
    assert torch.allclose(second.double(), two.values[..., 1], atol=tol, rtol=tol)
    assert int(index[1, 5]) == 3 and float(first[1, 5]) <= (0.0 if d == 1 else tol)  # vectors: a matmul's rounding
    assert not (index[0] == 1).any()  # centroid 1 duplicates centroid 0: never the nearest


def test_squared_norms():
    x = torch.randn(2, 7, 3, dtype=F64)
    assert torch.allclose(squared_norms(x), (x * x).sum(-1))
    wide = torch.randn(1, 5, 20, dtype=F64)
    assert torch.allclose(squared_norms(wide), (wide * wide).sum(-1))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("k", [4, 5, 16, 64])
def test_scalar_search_equals_the_scan_bit_for_bit(dtype, k):
    """Binary search among sorted centroids = the k-pass scan: same index (ties to the lower index,
    equal centroids to the lowest) and the same distance, also at exact midpoints and on centroids."""
    torch.manual_seed(k)
    c = torch.randn(3, k, 1, dtype=dtype)
    c[:, 2] = c[:, 0]  # duplicate centroids, not adjacent in index
    c[:, k - 1] = c[:, 0]
    x = torch.randn(3, 5000, 1, dtype=dtype) * 2
    x[:, :40, 0] = ((c[:, 0] + c[:, 1]) / 2)  # exact midpoints
    x[:, 40:80, 0] = c[:, 1]  # on a centroid
    x[:, 80:120, 0] = c[:, 0]  # on a triplicated centroid
    scan = torch.stack([(c[..., 0].unsqueeze(1) - x).square()[..., j] for j in range(k)], -1)  # (G, n, k)
    want_dist, want_index = scan.min(-1)  # min returns the first (lowest) index among equals
    index, dist = nearest_scalars(x, c)
    assert torch.equal(index, want_index) and torch.equal(dist, want_dist)
    assert torch.equal(index, nearest(x, c, 1 << 20)[0])
