"""Numerics under stress: 16-bit training, outliers, degenerate weights, tiny layers.

Each case must give a correct result or a clear ``TorchdkmError``.  A correct
result: everything finite, ``finalize`` exports exactly the eval-mode snapped
weight, and sensible centroids (inside the range of the layer's weights, not
collapsed; lossless where there are at least as many centroids as distinct
values, up to the documented 16-bit rounding of the uniquified path).
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import torchdkm
from torchdkm import DKMConfig, TorchdkmError
from torchdkm.nn.parametrization import dkm_parametrizations, original

#: The uniquified path clusters float32 weights rounded to float16: a relative error of 2**-11.
FP16_REL = 2.0**-11
#: bfloat16 (chosen when weights exceed float16's range): 2**-8.
BF16_REL = 2.0**-8
#: float16's smallest subnormal: weights below it round to 0 on the uniquified path.
FP16_TINY = 2.0**-24


def mlp(dtype: torch.dtype = torch.float32) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 4)).to(dtype)


def train(model: nn.Module, steps: int = 3, autocast: torch.dtype | None = None, lr: float = 0.05) -> None:
    """Cross-entropy (bounded gradients), SGD; every loss must be finite."""
    g = torch.Generator().manual_seed(1)
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    dtype = next(model.parameters()).dtype
    for _ in range(steps):
        x = torch.randn(8, model[0].in_features, generator=g).to(dtype)
        y = torch.randint(0, model[-1].out_features, (8,), generator=g)
        with torch.autocast("cpu", dtype=autocast or torch.bfloat16, enabled=autocast is not None):
            loss = nn.functional.cross_entropy(model(x).float(), y)
        assert torch.isfinite(loss)
        opt.zero_grad()
        loss.backward()
        opt.step()


def finalize_checked(model: nn.Module) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Finalize, checking the contract; returns ``{layer: (trained weight, exported weight)}``."""
    layers = {name: module for name, module, _, _ in dkm_parametrizations(model)}
    for _, _, _, p in dkm_parametrizations(model):
        assert p.centroids.dtype in (torch.float32, torch.float64) and torch.isfinite(p.centroids).all()
    model.eval()
    trained = {name: original(m, "weight").detach().clone() for name, m in layers.items()}
    snapped = {name: m.weight.detach().clone() for name, m in layers.items()}
    torchdkm.finalize(model)
    result = {}
    for name, weight in trained.items():
        module = model.get_submodule(name)
        exported = module.weight
        assert exported.dtype == weight.dtype and torch.equal(exported, snapped[name]), name  # bit for bit
        assert torch.isfinite(module.weight_lut).all()
        # The centroids in use (the exported values) lie inside the range of the weights they stand for
        # (a 16-bit rounding further at most).  An unused LUT entry may keep a stale value: no index points to it.
        low, high = weight.double().min(), weight.double().max()
        slack = BF16_REL * max(abs(low), abs(high)) + FP16_TINY
        assert exported.double().min() >= low - slack and exported.double().max() <= high + slack, name
        result[name] = (weight, exported)
    return result


def rel_err(weight: torch.Tensor, exported: torch.Tensor) -> float:
    return float((exported.double() - weight.double()).norm() / weight.double().norm())


# -- 16-bit training --------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("rule", ["fc:3", "fc:3/2"])
def test_training_under_autocast(dtype, rule):
    model = torchdkm.prepare(mlp(), DKMConfig.parse(rule, min_numel=0))
    train(model, autocast=dtype)
    for _, _, _, p in dkm_parametrizations(model):
        assert p.centroids.dtype == torch.float32  # the buffer keeps its dtype under autocast
    reference = torchdkm.prepare(mlp(), DKMConfig.parse(rule, min_numel=0))
    train(reference)
    got, want = finalize_checked(model), finalize_checked(reference)
    for name in got:
        # about what float32 training gives: 16-bit activations do not spoil the clustering
        assert rel_err(*got[name]) <= 1.2 * rel_err(*want[name]) + 0.01, name


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("rule", ["fc:3", "fc:3/2", "fc:4@8"])
def test_half_precision_weights(dtype, rule):
    model = torchdkm.prepare(mlp(dtype), DKMConfig.parse(rule, min_numel=0))
    train(model)
    for name, (weight, exported) in finalize_checked(model).items():
        assert exported.dtype == dtype and model.get_submodule(name).weight_lut.dtype == dtype
        assert rel_err(weight, exported) < 0.5


# -- outliers ---------------------------------------------------------------------------


def with_outliers(value: float = 1e6) -> nn.Module:
    """One layer (so the outliers' huge outputs do not blow up the gradients of another)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 32))
    with torch.no_grad():
        model[0].weight.normal_(0, 0.02, generator=torch.Generator().manual_seed(2))
        model[0].weight[0, 0] = value
        model[0].weight[5, 3] = -value
    return model


@pytest.mark.parametrize(
    ("rule", "extra", "outlier_rel", "bulk_max"),
    [
        ("fc:3", {}, BF16_REL, 0.35),  # 1e6 > float16's range: uniquified in bfloat16
        ("fc:3", {"cluster_dtype": "exact"}, 1e-7, 0.35),
        ("fc:3@8", {}, BF16_REL, 0.35),
        ("fc:4", {}, BF16_REL, 0.2),
        ("fc:3/2", {}, 1e-7, 0.6),
    ],
)
@pytest.mark.parametrize("steps", [0, 3])
def test_huge_outliers_do_not_collapse_the_other_centroids(rule, extra, outlier_rel, bulk_max, steps):
    """Two weights at +-1e6 among 510 from N(0, 0.02): they get their own centroids, the others keep theirs.

    (Before the margin was clipped at 100x its median, the outliers' margins set the
    temperature and the finalized bulk collapsed onto one value: relative error 1.0.)
    """
    model = torchdkm.prepare(with_outliers(), DKMConfig.parse(rule, min_numel=0, **extra))
    train(model, steps)
    weight, exported = finalize_checked(model)["0"]
    big = weight.abs() > 1e3
    assert int(big.sum()) == 2
    assert ((exported[big] - weight[big]).abs() <= outlier_rel * weight[big].abs()).all()
    assert rel_err(weight[~big], exported[~big]) < bulk_max
    k = 2 ** int(rule.split(":")[1][0])
    dim = 2 if "/2" in rule else 1
    assert exported[~big].reshape(-1, dim).unique(dim=0).shape[0] >= k - 3  # not collapsed


def test_weights_too_large_for_float32_distances_raise():
    model = with_outliers(1e16)
    with pytest.raises(TorchdkmError, match="magnitude"):
        torchdkm.prepare(model, DKMConfig.parse("fc:3", min_numel=0))


def test_non_finite_weights_raise():
    model = mlp()
    with torch.no_grad():
        model[0].weight[1, 1] = float("nan")
    with pytest.raises(TorchdkmError, match="NaN/Inf"):
        torchdkm.prepare(model, DKMConfig.parse("fc:3", min_numel=0))


# -- degenerate weights -----------------------------------------------------------------


@pytest.mark.parametrize("value", [0.0, 0.5, -3.0])
@pytest.mark.parametrize("rule", ["fc:3", "fc:3/2", "fc:2@8"])
def test_all_equal_weights(value, rule):
    model = mlp()
    with torch.no_grad():
        for layer in (model[0], model[2]):
            layer.weight.fill_(value)
    model = torchdkm.prepare(model, DKMConfig.parse(rule, min_numel=0))
    kept = torchdkm.finalize(_copy(model))
    assert (kept[0].weight == value).all() and (kept[2].weight == value).all()  # lossless
    train(model)
    finalize_checked(model)


@pytest.mark.parametrize("rule", ["fc:4", "fc:8", "fc:4/2", "fc:4/4", "fc:2/2"])
def test_fewer_weights_than_centroids(rule):
    """A 2x2 Linear at up to 8 bits (k up to 256 > 4 weights): every weight keeps its value."""
    torch.manual_seed(0)
    model = torchdkm.prepare(nn.Sequential(nn.Linear(2, 2)), DKMConfig.parse(rule, min_numel=0))
    train(model)
    weight, exported = finalize_checked(model)["0"]
    assert ((exported - weight).abs() <= FP16_REL * weight.abs()).all()  # lossless up to 16-bit rounding


def test_fewer_weights_than_the_vector_length_raise():
    with pytest.raises(TorchdkmError, match="fewer than dim=8"):
        torchdkm.prepare(nn.Sequential(nn.Linear(2, 2)), DKMConfig.parse("fc:4/8", min_numel=0))


def three_valued() -> nn.Module:
    model = mlp()
    values = torch.tensor([-0.1, 0.0, 0.2])
    with torch.no_grad():
        pick = torch.randint(0, 3, model[0].weight.shape, generator=torch.Generator().manual_seed(3))
        model[0].weight.copy_(values[pick])
    return model


@pytest.mark.parametrize(
    ("rule", "cluster_dtype", "tolerance"),
    [
        ("fc:4", "auto", FP16_REL),
        ("fc:8", "auto", FP16_REL),
        ("fc:4", "exact", 1e-6),
        ("fc:4/2", "auto", 1e-6),  # vectors: always the exact path
        ("fc:8/2", "auto", 1e-6),
    ],
)
def test_more_centroids_than_distinct_values(rule, cluster_dtype, tolerance):
    """3 distinct scalars (9 distinct pairs) at 16 or 256 centroids: the export is lossless."""
    model = torchdkm.prepare(three_valued(), DKMConfig.parse(rule, min_numel=0, cluster_dtype=cluster_dtype))
    weight, exported = finalize_checked(_copy(model))["0"]
    # not bit for bit: a centroid is a float32 mean of many copies of its value
    assert ((exported - weight).abs() <= tolerance * weight.abs()).all()
    if "/" not in rule:
        assert exported.unique().numel() == 3
    train(model)
    finalize_checked(model)


def _copy(model: nn.Module) -> nn.Module:
    return copy.deepcopy(model)
