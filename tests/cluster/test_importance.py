"""Importance-weighted clustering (``WeightClusterer.weigh``): every centroid an importance-weighted mean.

The weighing enters the engine as the problem's multiplicities, so every path must give what a
direct weighted computation gives: the 1-D optimum, Lloyd's weighted means, the exact and the
uniquified attention (outputs, centroids and gradients), and finite differences in float64.
"""

from __future__ import annotations

import pytest
import torch
from torch.autograd import gradcheck

from torchdkm.cluster import WeightClusterer
from torchdkm.cluster import clusterer as clusterer_module
from torchdkm.cluster import scales as scales_module
from torchdkm.config import LayerConfig

F64 = torch.float64


def rounded(shape, seed=0):
    """float64 weights float16 represents exactly (the uniquified path then rounds nothing)."""
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed)).half().to(F64)


def importance_like(weight, seed=1):
    """Heavy-tailed importance, as squared gradients are."""
    return torch.randn(weight.shape, generator=torch.Generator().manual_seed(seed), dtype=F64).square() * 10


def make(weight, importance, backend=None, **fields):
    fields = {"min_numel": 0, "bits": 3, **fields}
    clusterer = WeightClusterer("layer", LayerConfig(**fields), weight.shape, backend=backend)
    clusterer.weigh(importance, weight)
    return clusterer


def soft_with_gradient(clusterer, weight, c0, upstream):
    w = weight.clone().requires_grad_(True)
    result = clusterer.soft(w, c0)
    (grad,) = torch.autograd.grad((result.weight.to(F64) * upstream).sum(), w)
    return result.weight.detach().to(F64), result.centroids.to(F64), grad.to(F64)


def assert_close(a, b, rel):
    scale = max(float(a.abs().max()), 1e-30)
    assert float((a - b).abs().max()) <= rel * scale, f"max diff {float((a - b).abs().max())} > {rel} x {scale}"


def test_the_initial_centroids_minimise_the_weighted_error():
    """1-D: the weighted optimum beats the unweighted one by the weighted error, and loses by the plain one."""
    weight = rounded((16, 32))
    importance = importance_like(weight)
    plain, weighted = make(weight, None), make(weight, importance)
    errors = {}
    for name, clusterer in (("plain", plain), ("weighted", weighted)):
        snapped = clusterer.snap(weight, clusterer.init(weight))
        errors[name] = (float(((snapped - weight) ** 2 * importance).sum()), float(((snapped - weight) ** 2).sum()))
    assert errors["weighted"][0] < errors["plain"][0] and errors["weighted"][1] > errors["plain"][1]


def test_a_heavy_weight_pulls_a_centroid_onto_itself():
    """One weight a million times more important than the rest gets a centroid of its own value."""
    weight = torch.linspace(-1, 1, 64, dtype=F64).view(8, 8)
    importance = torch.ones_like(weight)
    importance[3, 5] = 1e6
    centroids = make(weight, importance, bits=1).init(weight)
    assert float((centroids - weight[3, 5]).abs().min()) < 1e-3 * float(weight.abs().max())
    assert float((make(weight, None, bits=1).init(weight) - weight[3, 5]).abs().min()) > 0.1


def test_uniform_importance_changes_nothing():
    """Importance 1 everywhere (any constant: it is normalised) is the unweighted clustering."""
    weight = rounded((12, 10), seed=4)
    plain, uniform = make(weight, None, tau=0.05), make(weight, torch.full_like(weight, 7.0), tau=0.05)
    c0 = plain.init(weight)
    assert_close(uniform.init(weight), c0, 1e-12)
    upstream = torch.randn(weight.shape, generator=torch.Generator().manual_seed(5), dtype=F64)
    for a, b in zip(soft_with_gradient(plain, weight, c0, upstream), soft_with_gradient(uniform, weight, c0, upstream)):
        assert_close(a, b, 1e-12)


@pytest.mark.parametrize(("group_size", "out"), [(None, 12), (5, 12), (2, 130)])
def test_weighted_uniquified_path_equals_the_weighted_exact_path(backend, group_size, out):
    """The uniquified path sums importance per distinct value and hands each weight its share of the gradient."""
    weight = rounded((out, 16), seed=2)
    importance = importance_like(weight, seed=3)
    common = dict(group_size=group_size, max_iters=8, tau=0.05, tol=0.0)
    exact = make(weight, importance, backend, cluster_dtype="exact", **common)
    uniq = make(weight, importance, backend, cluster_dtype="float16", **common)
    assert uniq.plan(weight).path == "unique", "the test must exercise the uniquified path"
    c0 = exact.init(weight)
    upstream = torch.randn(weight.shape, generator=torch.Generator().manual_seed(6), dtype=F64)
    for a, b in zip(soft_with_gradient(exact, weight, c0, upstream), soft_with_gradient(uniq, weight, c0, upstream)):
        assert_close(a, b, 1e-10)


@pytest.mark.parametrize(("shape", "dim", "scale_block"), [((4, 6), 1, None), ((5, 7), 3, None), ((4, 8), 1, 4)])
def test_weighted_soft_gradient_matches_finite_differences(monkeypatch, shape, dim, scale_block):
    """float64, converged iterations, the temperature held fixed (as tests/cluster/test_layer.py does), block
    scales unrounded (float16's rounding is passed straight through, which finite differences cannot see)."""
    monkeypatch.setattr(scales_module, "STORED", F64)
    weight = torch.randn(shape, generator=torch.Generator().manual_seed(7), dtype=F64)
    clusterer = make(weight, importance_like(weight, seed=8), bits=1, dim=dim, tau=0.6, max_iters=5000, tol=1e-13,
                     cluster_dtype="exact", scale_block=scale_block, grad_terms=0)  # fmt: skip  (the exact gradient)
    c0 = clusterer.init(weight)
    real, frozen = clusterer_module.margin, {}

    def margin(x, m, c, rows, two=None):
        frozen.setdefault("value", real(x, m, c, rows, two))
        return frozen["value"]

    monkeypatch.setattr(clusterer_module, "margin", margin)
    soft = clusterer.soft(weight, c0).weight
    assert not torch.allclose(soft, clusterer.snap(weight, c0), atol=1e-3), "the case is soft"
    weight.requires_grad_(True)
    assert gradcheck(lambda w: clusterer.soft(w, c0).weight, (weight,), eps=1e-6, atol=1e-6, rtol=1e-5)


def test_block_scales_weigh_importance_by_the_squared_scale():
    """A block of weights 100x larger weighs 10,000x more per unit of normalised error: its own
    normalised values set the shared LUT."""
    small = torch.randn(4, 8, generator=torch.Generator().manual_seed(9), dtype=F64)
    weight = torch.cat([small, 100 * torch.randn(4, 8, generator=torch.Generator().manual_seed(10), dtype=F64)], 1)
    clusterer = make(weight, torch.ones_like(weight), scale_block=8, bits=2)
    vectors = clusterer.importance.view(4, 16)  # (one group: rows in order, 16 weights each)
    ratio = vectors[:, 8:].mean() / vectors[:, :8].mean()
    assert 1e3 < float(ratio) < 1e5


def test_zero_importance_keeps_every_weight_clustered():
    """Weights no loss reached (importance 0) keep a floor, so their distinct values stay live on the uniquified
    path (a zero count would mark them padding); a group with no importance at all is clustered unweighted."""
    weight = rounded((12, 16), seed=11)
    importance = importance_like(weight, seed=12)
    importance[:, :8] = 0
    common = dict(max_iters=8, tau=0.05, tol=0.0)
    exact = make(weight, importance, cluster_dtype="exact", **common)
    uniq = make(weight, importance, cluster_dtype="float16", **common)
    c0 = exact.init(weight)
    upstream = torch.randn(weight.shape, generator=torch.Generator().manual_seed(13), dtype=F64)
    for a, b in zip(soft_with_gradient(exact, weight, c0, upstream), soft_with_gradient(uniq, weight, c0, upstream)):
        assert_close(a, b, 1e-10)
    assert float(exact.importance.min()) > 0
    none = make(weight, torch.zeros_like(weight))
    assert_close(none.init(weight), make(weight, None).init(weight), 1e-12)
