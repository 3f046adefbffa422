"""WeightClusterer: one weight tensor through layout, padding, temperature, soft step and snapping."""

from __future__ import annotations

import pytest
import torch
from torch.autograd import gradcheck

from torchdkm import TorchdkmError
from torchdkm.cluster import Layout, WeightClusterer
from torchdkm.cluster import clusterer as clusterer_module
from torchdkm.config import LayerConfig

F64 = torch.float64


def make(shape, **fields):
    fields.setdefault("min_numel", 0)
    return WeightClusterer("encoder.proj", LayerConfig(**fields), shape)


def freeze_temperature(monkeypatch, clusterer):
    """Freeze the layer's temperature scale at its first value.

    ``soft`` recomputes ``tau = config.tau * distortion(weight)`` every call, as a
    constant (no gradient flows through the temperature).  Finite differences
    would see it move with the weight, so the gradient check holds it fixed.
    """
    real = clusterer_module.margin
    frozen = {}

    def margin(x, m, c, rows, two=None):
        if "value" not in frozen:
            frozen["value"] = real(x, m, c, rows, two)
        return frozen["value"]

    monkeypatch.setattr(clusterer_module, "margin", margin)


@pytest.mark.parametrize(
    ("shape", "dim", "group_size", "bits", "tau"),
    [
        pytest.param((5, 7), 3, 2, 1, 0.6, id="partial-vectors-ragged-group"),
        pytest.param((5, 4), 1, 2, 1, 0.5, id="dim1-ragged-group"),
        pytest.param((3, 2, 5), 4, None, 1, 0.6, id="conv1d-partial-vector"),
    ],
)
def test_soft_gradient_matches_finite_differences_with_padding(monkeypatch, shape, dim, group_size, bits, tau):
    clusterer = make(
        shape, bits=bits, dim=dim, group_size=group_size, tau=tau, max_iters=5000, tol=1e-13, cluster_dtype="exact"
    )
    assert clusterer.layout.padded
    weight = torch.randn(shape, generator=torch.Generator().manual_seed(3), dtype=F64)
    c0 = clusterer.init(weight)
    freeze_temperature(monkeypatch, clusterer)
    soft = clusterer.soft(weight, c0).weight
    assert not torch.allclose(soft, clusterer.snap(weight, c0), atol=1e-3), "the case is soft"
    weight.requires_grad_(True)
    assert gradcheck(lambda w: clusterer.soft(w, c0).weight, (weight,), eps=1e-6, atol=1e-6, rtol=1e-5)


def test_float64_weights_take_the_exact_path_and_gradcheck(monkeypatch):
    clusterer = make((4, 6), bits=1, tau=0.5, max_iters=5000, tol=1e-13)  # cluster_dtype="auto"
    weight = torch.randn(4, 6, generator=torch.Generator().manual_seed(4), dtype=F64)
    assert clusterer.plan(weight).cluster_dtype is None
    c0 = clusterer.init(weight)
    freeze_temperature(monkeypatch, clusterer)
    weight.requires_grad_(True)
    assert gradcheck(lambda w: clusterer.soft(w, c0).weight, (weight,), eps=1e-6, atol=1e-6, rtol=1e-5)


# float64 (the uniquified case on float16-exact values), so that summation order is
# invisible: chunking must not change anything beyond rounding.
CHUNK_CASES = [
    pytest.param((16, 12), dict(bits=3, cluster_dtype="float16"), id="dim1-unique"),
    pytest.param((16, 12), dict(bits=3, cluster_dtype="exact", group_size=5), id="dim1-exact"),
    pytest.param((10, 3, 3, 3), dict(bits=4, dim=4, group_size=3), id="dim4-padded-groups"),
]


@pytest.mark.parametrize(("shape", "fields"), CHUNK_CASES)
def test_chunked_equals_unchunked(shape, fields):
    weight = torch.randn(shape, generator=torch.Generator().manual_seed(5)).half().double()
    upstream = torch.randn(shape, generator=torch.Generator().manual_seed(6), dtype=F64)
    outs = []
    for chunk_mb in (1e-9, 1024.0):  # one row at a time vs everything at once
        clusterer = make(shape, chunk_mb=chunk_mb, **fields)
        assert (clusterer.plan(weight).rows == 1) == (chunk_mb < 1)
        c0 = clusterer.init(weight)
        w = weight.clone().requires_grad_(True)
        result = clusterer.soft(w, c0)
        (grad,) = torch.autograd.grad((result.weight * upstream).sum(), w)
        outs.append((c0, result.weight.detach(), result.centroids, grad, clusterer.assign(weight, result.centroids)))
    for a, b in zip(*outs):
        if a.dtype == torch.long:
            assert torch.equal(a, b)
        else:
            assert torch.allclose(a, b, atol=1e-10 * float(a.abs().max()), rtol=0)


def fill_padding(monkeypatch, value):
    """Make ``Layout.to_vectors`` write ``value`` into every padding slot instead of zero."""
    real = Layout.to_vectors

    def to_vectors(self, weight):
        vectors = real(self, weight)
        if not self.padded:
            return vectors
        mask = torch.zeros(self.groups, self.vectors * self.dim, dtype=torch.bool)
        for g, count in enumerate(self.real_counts()):
            mask[g, count:] = True
        return vectors.masked_fill(mask.view_as(vectors), value)

    monkeypatch.setattr(Layout, "to_vectors", to_vectors)


PAD_CASES = [
    pytest.param((5, 7), dict(bits=2, dim=3, group_size=2), id="partial-vectors-ragged-group"),
    pytest.param((7, 10), dict(bits=2, dim=4), id="partial-vector"),
    pytest.param((5, 6), dict(bits=2, dim=1, group_size=2, cluster_dtype="exact"), id="dim1-ragged-group"),
]


@pytest.mark.parametrize("tau", [0.05, 0.5])
@pytest.mark.parametrize(("shape", "fields"), PAD_CASES)
def test_padding_never_leaks(monkeypatch, shape, fields, tau):
    weight = torch.randn(shape, generator=torch.Generator().manual_seed(7))
    upstream = torch.randn(shape, generator=torch.Generator().manual_seed(8))
    clusterer = make(shape, tau=tau, max_iters=20, **fields)
    assert clusterer.layout.padded

    def everything():
        c0 = clusterer.init(weight)
        w = weight.clone().requires_grad_(True)
        result = clusterer.soft(w, c0)
        (grad,) = torch.autograd.grad((result.weight * upstream).sum(), w)
        index = clusterer.assign(weight, result.centroids)
        return c0, result.weight.detach(), result.centroids, grad, index, clusterer.snap(weight, result.centroids)

    clean = everything()
    for value in (1e3, -7.0):
        fill_padding(monkeypatch, value)
        dirty = everything()
        monkeypatch.undo()
        for a, b in zip(clean, dirty):
            assert a.shape == b.shape
            assert torch.allclose(a.double(), b.double(), atol=1e-6, rtol=0)


def test_padding_fill_reaches_the_clusterer(monkeypatch):
    """Sanity check of the test above: with the fill, the padded vectors really change."""
    weight = torch.randn(5, 7)
    layout = Layout.of(weight.shape, 3, 2)
    clean = layout.to_vectors(weight)
    fill_padding(monkeypatch, 1e3)
    dirty = layout.to_vectors(weight)
    assert (dirty == 1e3).sum() == clean.numel() - weight.numel()


def test_partial_vector_is_assigned_by_its_real_values():
    # One row of 4 values cut into dim-3 vectors: [1, 1, 1] and the partial [5, pad, pad].
    weight = torch.tensor([[1.0, 1.0, 1.0, 5.0]])
    clusterer = make(weight.shape, bits=1, dim=3)
    lut = torch.tensor([[[5.0, 5.0, 5.0], [1.0, 0.0, 0.0]]])
    # With the zero padding counted, [5, 0, 0] would be nearer to [1, 0, 0] (16 < 50).
    index = clusterer.assign(weight, lut)
    assert index.tolist() == [[1, 0]]
    assert clusterer.snap(weight, lut).tolist() == [[1.0, 0.0, 0.0, 5.0]]


def test_partial_vector_soft_value_uses_only_its_real_values():
    weight = torch.tensor([[1.0, 1.0, 1.0, 5.0]], dtype=F64)
    clusterer = make(weight.shape, bits=1, dim=3, tau=0.5, max_iters=1, cluster_dtype="exact")
    result = clusterer.soft(weight, torch.tensor([[[5.0, 5.0, 5.0], [1.0, 0.0, 0.0]]], dtype=F64))
    # The whole vector [1, 1, 1] alone moves the centroids (multiplicity 1); the partial one has none.
    c = result.centroids[0]
    assert torch.isfinite(c).all()
    d2 = (c[:, 0] - 5.0) ** 2  # distance of the partial vector over its single real value
    # Its temperature: tau times the distortion, the mean squared distance of the whole vectors only.
    distortion = float(((torch.tensor([1.0, 1.0, 1.0], dtype=F64) - c) ** 2).sum(-1).min())
    a = torch.softmax(-d2 / (0.5 * max(distortion, 1e-6 * 3.0)), 0)
    assert result.weight[0, 3].item() == pytest.approx(float(a @ c[:, 0]), rel=1e-9)


@pytest.mark.parametrize(
    ("shape", "fields"),
    [
        pytest.param((16, 12), dict(bits=3), id="dim1-unique"),
        pytest.param((16, 12), dict(bits=3, cluster_dtype="exact"), id="dim1-exact"),
        pytest.param((6, 10), dict(bits=2, dim=3, group_size=4), id="dim3-padded"),
    ],
)
def test_tiny_tau_soft_equals_snap(shape, fields):
    weight = torch.randn(shape, generator=torch.Generator().manual_seed(9))
    clusterer = make(shape, tau=1e-6, max_iters=50, **fields)
    result = clusterer.soft(weight, clusterer.init(weight))
    snapped = clusterer.snap(weight, result.centroids)
    assert torch.allclose(result.weight, snapped, atol=1e-5, rtol=0)


@pytest.mark.parametrize(
    ("shape", "fields"),
    [
        pytest.param((16, 12), dict(bits=2), id="dim1"),
        pytest.param((9, 10), dict(bits=3, dim=3, group_size=4), id="dim3-padded"),
    ],
)
def test_snap_replaces_every_vector_by_its_nearest_centroid(shape, fields):
    weight = torch.randn(shape, generator=torch.Generator().manual_seed(10))
    clusterer = make(shape, **fields)
    layout = clusterer.layout
    c = clusterer.init(weight)
    index = clusterer.assign(weight, c)
    assert index.shape == (layout.groups, layout.vectors)
    assert int(index.min()) >= 0 and int(index.max()) < 2 ** fields["bits"]
    snapped = clusterer.snap(weight, c)
    assert snapped.shape == weight.shape and snapped.dtype == weight.dtype
    # Brute force over the real values of every vector.
    x, s = layout.to_vectors(weight), layout.to_vectors(snapped)
    real = torch.zeros(layout.groups, layout.vectors * layout.dim, dtype=torch.bool)
    for g, count in enumerate(layout.real_counts()):
        real[g, :count] = True
    real = real.view_as(x)
    for g in range(layout.groups):
        for v in range(layout.vectors):
            mask = real[g, v]
            if not mask.any():
                continue
            d2 = ((x[g, v][mask] - c[g][:, mask]) ** 2).sum(-1)
            assert torch.equal(s[g, v][mask], c[g, d2.argmin()][mask])


@pytest.mark.parametrize(
    "fields",
    [dict(bits=2), dict(bits=2, cluster_dtype="exact"), dict(bits=2, dim=2)],
)
def test_nan_and_inf_weights_raise_naming_the_layer(fields):
    clusterer = make((8, 8), **fields)
    good = torch.randn(8, 8)
    c0 = clusterer.init(good)
    for bad_value in (float("nan"), float("inf")):
        bad = good.clone()
        bad[3, 4] = bad_value
        with pytest.raises(TorchdkmError, match="encoder.proj"):
            clusterer.init(bad)
        with pytest.raises(TorchdkmError, match="encoder.proj"):
            clusterer.soft(bad, c0)
        with pytest.raises(TorchdkmError, match="encoder.proj"):
            clusterer.assign(bad, c0)


def test_values_beyond_float16_range():
    weight = torch.randn(8, 8) * 1e5  # beyond 65504
    with pytest.raises(TorchdkmError, match="cluster_dtype"):
        make(weight.shape, bits=2, cluster_dtype="float16").soft(weight, torch.zeros(1, 4, 1))
    auto = make(weight.shape, bits=2)  # auto: bfloat16 for this range
    result = auto.soft(weight, auto.init(weight))
    assert torch.isfinite(result.weight).all() and torch.isfinite(result.centroids).all()


def test_group_smaller_than_dim_is_rejected():
    with pytest.raises(TorchdkmError, match="encoder.proj.*dim=4"):
        make((5, 3), bits=2, dim=4, group_size=1)
    make((5, 3), bits=2, dim=3, group_size=1)  # 3 weights per group: fine


def test_soft_keeps_dtype_and_shape_and_updates_centroids():
    for dtype in (torch.float32, F64, torch.float16, torch.bfloat16):
        weight = torch.randn(12, 8).to(dtype)
        clusterer = make(weight.shape, bits=2)
        c0 = clusterer.init(weight)
        assert c0.shape == (1, 4, 1) and torch.isfinite(c0).all()
        result = clusterer.soft(weight, c0)
        assert result.weight.dtype == dtype and result.weight.shape == weight.shape
        assert result.centroids.shape == c0.shape and not result.centroids.requires_grad
        assert torch.isfinite(result.weight.float()).all()


def test_constant_weight_gets_a_finite_temperature():
    """Weights already on the centroids: the distortion floor keeps tau > 0 (no NaN)."""
    weight = torch.tensor([[0.5, -0.5] * 4] * 4)
    for fields in (dict(bits=1), dict(bits=2, cluster_dtype="exact"), dict(bits=2, dim=2)):
        clusterer = make(weight.shape, **fields)
        w = weight.clone().requires_grad_(True)
        result = clusterer.soft(w, clusterer.init(weight))
        assert torch.allclose(result.weight, weight)
        (grad,) = torch.autograd.grad(result.weight.sum(), w)
        assert torch.isfinite(grad).all()


def test_scalar_init_is_polished_on_the_exact_weights():
    """The 1-D optimum is found on 16-bit roundings, then Lloyd on the exact float32 values."""
    weight = torch.randn(32, 32, generator=torch.Generator().manual_seed(11)) * 0.05
    assert not torch.equal(weight, weight.half().float())
    clusterer = make(weight.shape, bits=3)
    assert clusterer.plan(weight).cluster_dtype == torch.float16
    c = clusterer.init(weight)[0, :, 0].double()
    w = weight.reshape(-1).double()
    assign = (w[:, None] - c[None, :]).abs().argmin(1)
    for j in range(8):
        assert c[j].item() == pytest.approx(w[assign == j].mean().item(), rel=1e-6, abs=1e-9)


@pytest.mark.parametrize("fields", [dict(bits=2, cluster_dtype="exact"), dict(bits=2), dict(bits=2, dim=2)])
def test_soft_reseeds_empty_and_duplicate_centroids(fields):
    weight = torch.randn(8, 8, generator=torch.Generator().manual_seed(12))
    clusterer = make(weight.shape, **fields)
    d = clusterer.config.dim
    c0 = torch.zeros(1, 4, d)
    c0[0, 3] = 100.0  # three duplicates and one centroid nobody chooses
    result = clusterer.soft(weight, c0)
    assert torch.isfinite(result.weight).all() and torch.isfinite(result.centroids).all()
    c = result.centroids[0]
    assert (torch.cdist(c, c) + 1e9 * torch.eye(4)).min() > 1e-3, "no duplicates are left"
    assert c.abs().max() < 10, "the unused centroid was moved onto the weights"
