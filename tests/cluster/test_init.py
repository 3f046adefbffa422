"""Centroid initialisation: optimal 1-D k-means, k-means++ and Lloyd for vectors."""

from __future__ import annotations

import itertools

import pytest
import torch

from torchdkm.cluster import init as init_mod
from torchdkm.cluster import init_centroids, kmeans_pp, optimal_1d, optimal_1d_many

F64 = torch.float64


def segment_cost(v, w, j, i):
    """Weighted squared error of sorted values ``v[j:i]`` around their weighted mean."""
    vs, ws = v[j:i], w[j:i]
    mean = (vs * ws).sum() / ws.sum()
    return float((ws * (vs - mean) ** 2).sum())


def dp_optimum(values, weights, k):
    """O(k n^2) dynamic programme for weighted 1-D k-means (independent of torchdkm).

    ``cost[j, i]`` is the squared error of sorted values ``j..i-1``, from sums shifted by
    ``v[j]`` (no cancellation); ``best[q][i] = min_j best[q-1][j] + cost[j, i]``.
    """
    keep = weights > 0
    order = values[keep].argsort()
    v, w = values[keep][order].double(), weights[keep][order].double()
    n = v.numel()
    cost = torch.full((n + 1, n + 1), float("inf"), dtype=F64)
    for j in range(n):
        d = v[j:] - v[j]
        sw, sx, sq = w[j:].cumsum(0), (w[j:] * d).cumsum(0), (w[j:] * d * d).cumsum(0)
        cost[j, j + 1 :] = (sq - sx * sx / sw).clamp_min(0)
    best = torch.full((n + 1,), float("inf"), dtype=F64)
    best[0] = 0.0
    answer = float("inf")
    for _ in range(k):
        best = (best[:, None] + cost).min(0).values
        answer = min(answer, float(best[n]))
    return answer


def brute_force_optimum(values, weights, k):
    """Enumerate every split of the sorted values into at most k contiguous runs."""
    order = values.argsort()
    v, w = values[order].double(), weights[order].double()
    n = v.numel()
    best = float("inf")
    for parts in range(1, min(k, n) + 1):
        for cuts in itertools.combinations(range(1, n), parts - 1):
            edges = (0, *cuts, n)
            best = min(best, sum(segment_cost(v, w, a, b) for a, b in zip(edges[:-1], edges[1:])))
    return best


def nearest_cost(values, weights, centroids):
    d2 = (values[:, None].double() - centroids[None, :].double()) ** 2
    return float((weights.double() * d2.min(1).values).sum())


def test_dp_reference_agrees_with_enumeration():
    g = torch.Generator().manual_seed(0)
    for n, k in [(5, 2), (7, 3), (8, 4)]:
        v, w = torch.randn(n, generator=g, dtype=F64), torch.rand(n, generator=g, dtype=F64) + 0.1
        assert dp_optimum(v, w, k) == pytest.approx(brute_force_optimum(v, w, k), rel=1e-12, abs=1e-15)


@pytest.mark.parametrize(("n", "k"), [(6, 2), (8, 3), (8, 4), (9, 8)])
def test_optimal_1d_matches_enumeration(n, k):
    g = torch.Generator().manual_seed(n * 10 + k)
    values = torch.randn(3, n, generator=g, dtype=F64)
    weights = torch.rand(3, n, generator=g, dtype=F64) * 3 + 0.1
    c = optimal_1d(values, weights, k)
    assert c.shape == (3, k)
    for row in range(3):
        assert torch.all(c[row, 1:] >= c[row, :-1]), "centroids are sorted"
        opt = brute_force_optimum(values[row], weights[row], k)
        assert nearest_cost(values[row], weights[row], c[row]) == pytest.approx(opt, rel=1e-9, abs=1e-12)


@pytest.mark.parametrize("k", [2, 4, 16])
def test_optimal_1d_matches_dp_with_padding_and_uneven_rows(k):
    g = torch.Generator().manual_seed(k)
    values = torch.randn(4, 40, generator=g, dtype=F64) * 3
    weights = torch.randint(1, 5, (4, 40), generator=g).to(F64)
    # Rows of different real sizes; the rest is padding (weight 0) holding junk values.
    for row, real in enumerate([40, 31, 17, 23]):
        weights[row, real:] = 0
        values[row, real:] = 1e6 * (row + 1)
    c = optimal_1d(values, weights, k)
    assert torch.isfinite(c).all()
    assert c.abs().max() < 100, "padding never becomes a centroid"
    for row in range(4):
        opt = dp_optimum(values[row], weights[row], k)
        assert nearest_cost(values[row], weights[row], c[row]) == pytest.approx(opt, rel=1e-9, abs=1e-12)


def test_optimal_1d_on_float32_input():
    g = torch.Generator().manual_seed(3)
    values = torch.randn(1, 30, generator=g)
    weights = torch.ones(1, 30)
    c = optimal_1d(values, weights, 4)
    assert c.dtype == torch.float32
    opt = dp_optimum(values[0], weights[0], 4)
    assert nearest_cost(values[0], weights[0], c[0]) == pytest.approx(opt, rel=1e-5)


@pytest.mark.parametrize(
    ("values", "k"),
    [([1.0, 1.0, 2.0, 2.0, 2.0], 4), ([3.5] * 6, 8), ([-1.0, 0.0, 5.0], 3), ([0.25], 2), ([2.0, -2.0], 16)],
)
def test_optimal_1d_with_fewer_distinct_values_than_k(values, k):
    v = torch.tensor([values], dtype=F64)
    c = optimal_1d(v, torch.ones_like(v), k)
    assert c.shape == (1, k)
    assert torch.isfinite(c).all()
    # Every distinct value is a centroid, and nothing else is (up to rounding).
    distinct = torch.tensor(sorted(set(values)), dtype=F64)
    assert torch.isclose(c[0][:, None], distinct[None, :], atol=1e-12, rtol=0).any(1).all()
    assert torch.isclose(distinct[:, None], c[0][None, :], atol=1e-12, rtol=0).any(1).all()
    assert torch.all(c[0, 1:] >= c[0, :-1])


def test_optimal_1d_row_with_few_values_beside_a_full_row():
    values = torch.tensor([[0.0, 1.0, 2.0, 3.0, 4.0, 5.0], [7.0, 7.0, 9.0, 0.0, 0.0, 0.0]], dtype=F64)
    weights = torch.tensor([[1.0] * 6, [1.0, 1.0, 1.0, 0.0, 0.0, 0.0]], dtype=F64)
    c = optimal_1d(values, weights, 4)
    assert torch.isfinite(c).all()
    close = torch.isclose(c[1][:, None], torch.tensor([7.0, 9.0], dtype=F64), atol=1e-12, rtol=0)
    assert close.any(1).all() and close.any(0).all()
    assert nearest_cost(values[0], weights[0], c[0]) == pytest.approx(2 * 0.5, abs=1e-12)  # 4 runs of 6 values


@pytest.mark.parametrize("d", [2, 3, 5])
def test_kmeans_pp_and_lloyd_give_finite_centroids(d):
    g = torch.Generator().manual_seed(d)
    x = torch.randn(3, 200, d, generator=g)
    c = init_centroids(x, None, 8, rows=64)
    assert c.shape == (3, 8, d) and c.dtype == x.dtype
    assert torch.isfinite(c).all()
    # Lloyd's fixed point: every centroid is the mean of the vectors nearest to it.
    assign = torch.cdist(x, c).argmin(-1)
    for grp in range(3):
        for j in range(8):
            members = x[grp][assign[grp] == j]
            assert members.numel(), "no empty centroid"
            assert torch.allclose(c[grp, j], members.mean(0), atol=1e-5)


def test_kmeans_pp_seeds_are_real_vectors_and_deterministic():
    x = torch.randn(2, 50, 3)
    m = torch.ones(2, 50)
    m[:, 40:] = 0
    seeds = kmeans_pp(x, m, 6, torch.Generator().manual_seed(0))
    again = kmeans_pp(x, m, 6, torch.Generator().manual_seed(0))
    assert torch.equal(seeds, again)
    for grp in range(2):
        hits = (seeds[grp][:, None] == x[grp][None, :40]).all(-1).any(-1)
        assert hits.all(), "every seed is one of the real (multiplicity > 0) vectors"
    assert torch.equal(init_centroids(x, m, 6, rows=16), init_centroids(x, m, 6, rows=16))


def test_kmeans_pp_samples_large_inputs(monkeypatch):
    monkeypatch.setattr(init_mod, "SEED_SAMPLE", 16)
    x = torch.randn(2, 100, 2)
    m = torch.ones(2, 100)
    m[:, ::2] = 0
    seeds = kmeans_pp(x, m, 4, torch.Generator().manual_seed(0))
    for grp in range(2):
        assert (seeds[grp][:, None] == x[grp][None, 1::2]).all(-1).any(-1).all()


def test_vectors_with_fewer_distinct_points_than_k():
    base = torch.tensor([[0.0, 0.0], [1.0, 2.0], [-3.0, 1.0]])
    x = base.repeat(10, 1)[None]  # 30 vectors, 3 distinct
    c = init_centroids(x, None, 8, rows=7)
    assert torch.isfinite(c).all()
    for point in base:
        assert (c[0] == point).all(-1).any(), "every distinct vector is a centroid"
    assert float(torch.cdist(x[0], c[0]).min(-1).values.max()) == 0.0


def test_padded_vectors_never_become_centroids():
    g = torch.Generator().manual_seed(4)
    x = torch.randn(1, 64, 3, generator=g)
    m = torch.ones(1, 64)
    x[:, 50:] = 1e3
    m[:, 50:] = 0
    c = init_centroids(x, m, 16, rows=16)
    assert torch.isfinite(c).all()
    assert c.abs().max() < 10
    # dim 1: the optimal 1-D init ignores zero-multiplicity entries too.
    c1 = init_centroids(x[..., :1], m, 16, rows=16)
    assert torch.isfinite(c1).all() and c1.abs().max() < 10


def test_scalar_init_is_optimal_then_polished():
    g = torch.Generator().manual_seed(5)
    x = torch.randn(2, 300, 1, generator=g, dtype=F64)
    c = init_centroids(x, None, 4, rows=50)
    for grp in range(2):
        opt = dp_optimum(x[grp, :, 0], torch.ones(300, dtype=F64), 4)
        assert nearest_cost(x[grp, :, 0], torch.ones(300), c[grp, :, 0]) == pytest.approx(opt, rel=1e-9)


def test_scalar_init_from_distinct_values():
    """The distinct-value route (16-bit roundings with counts) lands on the optimum of the rounded weights."""
    g = torch.Generator().manual_seed(6)
    x = torch.randn(1, 500, 1, generator=g).half().float()
    values, counts = torch.unique(x[0, :, 0], return_counts=True)
    c = init_centroids(x, None, 8, rows=100, distinct=(values[None], counts[None].float()), lloyd_iters=0)
    opt = dp_optimum(x[0, :, 0], torch.ones(500), 8)
    assert nearest_cost(x[0, :, 0], torch.ones(500), c[0, :, 0]) == pytest.approx(opt, rel=1e-5)


def test_optimal_1d_many_equals_one_programme_per_k() -> None:
    """One programme up to the largest k gives every smaller k's optimum (rows padded and uneven)."""
    torch.manual_seed(3)
    values = torch.randn(3, 40, dtype=torch.float64)
    weights = torch.rand(3, 40, dtype=torch.float64)
    weights[1, 25:] = 0  # padding
    found = optimal_1d_many(values, weights, (16, 2, 4, 8))
    assert sorted(found) == [2, 4, 8, 16]
    for k, centroids in found.items():
        torch.testing.assert_close(centroids, optimal_1d(values, weights, k), rtol=0, atol=0)
    with pytest.raises(ValueError, match="cluster counts"):
        optimal_1d_many(values, weights, (0, 2))


def test_init_many_shares_one_start_and_polishes_on_request() -> None:
    from torchdkm.cluster import WeightClusterer
    from torchdkm.config import LayerConfig

    torch.manual_seed(4)
    weight = torch.randn(48, 96)
    layer = LayerConfig(bits=4, dim=1, scale_block=32, scale_offset=True)
    widest = WeightClusterer("w", layer, weight.shape)
    many = widest.init_many(weight, (1, 2, 4))
    rough = widest.init_many(weight, (1, 2, 4), polish=False)
    for bits in (1, 2, 4):
        alone = WeightClusterer("w", layer.replace(bits=bits), weight.shape).init(weight)
        torch.testing.assert_close(many[bits], alone, rtol=0, atol=0)
        torch.testing.assert_close(rough[bits], alone, rtol=1e-3, atol=1e-3)  # the 16-bit optimum, unpolished
    with pytest.raises(ValueError, match="bits must lie in 1..4"):
        widest.init_many(weight, (5,))


def test_init_many_for_vectors_is_each_width_alone() -> None:
    """4-vectors: k-means++ and Lloyd per width, the same as one initialisation per width (polish or not)."""
    from torchdkm.cluster import WeightClusterer
    from torchdkm.config import LayerConfig

    torch.manual_seed(5)
    weight = torch.randn(32, 64)
    layer = LayerConfig(bits=3, dim=4)
    many = WeightClusterer("w", layer, weight.shape).init_many(weight, (1, 2, 3), polish=False)
    for bits in (1, 2, 3):
        alone = WeightClusterer("w", layer.replace(bits=bits), weight.shape).init(weight)
        torch.testing.assert_close(many[bits], alone, rtol=0, atol=0)
