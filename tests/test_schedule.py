"""TauSchedule: every DKM layer's temperature annealed geometrically, resumable, validated."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

import torchdkm
from torchdkm.nn.parametrization import dkm_parametrizations


def small_model(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 8))


def taus(model: nn.Module) -> list[float]:
    return [p.config.tau for _, _, _, p in dkm_parametrizations(model)] + [
        p.clusterer.config.tau for _, _, _, p in dkm_parametrizations(model)
    ]


def test_geometric_from_start_to_end_then_held():
    model = torchdkm.prepare(small_model(), "fc:2/1")
    schedule = torchdkm.TauSchedule(model, steps=4, start=0.08, end=0.005)
    seen = [schedule.tau]
    assert all(t == 0.08 for t in taus(model))
    for _ in range(6):
        schedule.step()
        seen.append(schedule.tau)
        assert all(t == pytest.approx(schedule.tau, rel=1e-12) for t in taus(model))
    expected = [0.08 * (0.005 / 0.08) ** min(i / 4, 1.0) for i in range(7)]
    assert seen == pytest.approx(expected, rel=1e-12)
    assert seen[4:] == pytest.approx([0.005] * 3, rel=1e-12)
    assert all(math.log(a) > math.log(b) for a, b in zip(seen[:4], seen[1:5]))


def test_state_dict_resumes_where_it_stopped():
    model = torchdkm.prepare(small_model(), "fc:2/1")
    schedule = torchdkm.TauSchedule(model, steps=10, start=0.1, end=0.001)
    for _ in range(3):
        schedule.step()
    state = schedule.state_dict()
    other = torchdkm.prepare(small_model(), "fc:2/1")
    resumed = torchdkm.TauSchedule(other, steps=1, start=1.0, end=1.0)
    resumed.load_state_dict(state)
    assert resumed.tau == schedule.tau
    assert taus(other) == pytest.approx([schedule.tau] * len(taus(other)))
    with pytest.raises(torchdkm.TorchdkmError, match="keys"):
        resumed.load_state_dict({"done": 1})


def test_the_temperature_changes_the_soft_weight():
    """A step after the schedule moved runs at the new temperature: the soft weight is softer."""
    model = torchdkm.prepare(small_model(), "fc:2/1")
    layer = model[0]
    schedule = torchdkm.TauSchedule(model, steps=1, start=1.0, end=1e-4)
    soft = layer.weight.detach().clone()
    schedule.step()
    hard_ish = layer.weight.detach().clone()
    model.eval()
    snapped = layer.weight.detach()
    assert (hard_ish - snapped).abs().mean() < 0.2 * (soft - snapped).abs().mean()


def test_training_with_a_schedule_closes_the_gap():
    """With DKM's own gradient (no straight-through term, which lets weights sit between centroids)."""
    model = torchdkm.prepare(small_model(), torchdkm.DKMConfig.parse("fc:1/1", straight_through=0.0))
    x, y = torch.randn(64, 16), torch.randint(0, 8, (64,))
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    schedule = torchdkm.TauSchedule(model, steps=20, start=0.1, end=0.001)
    for _ in range(20):
        optimizer.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        optimizer.step()
        schedule.step()
    gaps = [row.gap for row in torchdkm.report(model, show=False).layers]
    assert max(gaps) < 0.01


def test_tied_weight_is_set_once_and_shared():
    torch.manual_seed(0)
    emb = nn.Embedding(40, 16)
    head = nn.Linear(16, 40, bias=False)
    head.weight = emb.weight
    model = nn.Sequential(emb, head)
    torchdkm.prepare(model, "emb:2/1, fc:2/1")
    schedule = torchdkm.TauSchedule(model, steps=2, start=0.05, end=0.01)
    assert len(schedule.layers) == 1


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"steps": 0, "start": 0.1, "end": 0.01}, "steps=0"),
        ({"steps": 2.5, "start": 0.1, "end": 0.01}, "steps=2.5"),
        ({"steps": True, "start": 0.1, "end": 0.01}, "steps=True"),
        ({"steps": 5, "start": 0.0, "end": 0.01}, "start=0.0"),
        ({"steps": 5, "start": 0.1, "end": float("nan")}, "end=nan"),
        ({"steps": 5, "start": -1.0, "end": 0.01}, "start=-1.0"),
    ],
)
def test_bad_arguments_are_named(kwargs, match):
    model = torchdkm.prepare(small_model(), "fc:2/1")
    with pytest.raises(torchdkm.TorchdkmError, match=match):
        torchdkm.TauSchedule(model, **kwargs)


def test_a_model_without_dkm_is_refused():
    with pytest.raises(torchdkm.TorchdkmError, match="no DKM weights"):
        torchdkm.TauSchedule(small_model(), steps=3, start=0.1, end=0.01)


# -- straight_through: the same value, DKM's gradient plus s times the soft weight's own ---------------------------


def st_gradients(through: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    torch.manual_seed(3)
    layer = nn.Linear(24, 12).double()
    torchdkm.prepare(layer, torchdkm.DKMConfig.parse("fc:2/1", straight_through=through, min_numel=0))
    upstream = torch.randn(12, 24, dtype=torch.float64)
    weight = layer.weight
    (weight * upstream).sum().backward()
    grad = layer.parametrizations.weight.original.grad
    return weight.detach(), grad, upstream


@pytest.mark.parametrize("through", [0.5, 1.0])
def test_straight_through_adds_the_soft_weights_own_gradient(through):
    plain_weight, plain_grad, upstream = st_gradients(0.0)
    weight, grad, _ = st_gradients(through)
    assert torch.equal(weight, plain_weight)  # the forward value does not change
    torch.testing.assert_close(grad - plain_grad, through * upstream, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize(
    "setting, through", [("fc:2/1", 0.0), ("fc:1/1", 1.0), ("fc:4/4", 1.0), ("fc:4/8", 1.0), ("fc:4/2", 0.0)]
)
def test_straight_through_is_on_by_default_at_one_bit_per_weight_and_below(setting, through):
    layer = torchdkm.DKMConfig.parse(setting).by_type["fc"]
    assert layer.straight_through is None and layer.through == through
    assert torchdkm.DKMConfig.parse(setting, straight_through=0.0).by_type["fc"].through == 0.0


def test_automatic_straight_through_reaches_the_gradient():
    """``fc:1/1`` without the field gets the same gradient as ``straight_through=1``; ``0`` is DKM's alone."""
    grads = {}
    for name, fields in (("auto", {}), ("one", {"straight_through": 1.0}), ("zero", {"straight_through": 0.0})):
        torch.manual_seed(5)
        layer = nn.Linear(16, 8).double()
        torchdkm.prepare(layer, torchdkm.DKMConfig.parse("fc:1/1", min_numel=0, **fields))
        (layer.weight * torch.arange(128.0, dtype=torch.float64).view(8, 16)).sum().backward()
        grads[name] = layer.parametrizations.weight.original.grad
    assert torch.equal(grads["auto"], grads["one"]) and not torch.equal(grads["auto"], grads["zero"])


@pytest.mark.parametrize("value", [-0.5, float("inf"), float("nan"), "1", True])
def test_straight_through_is_validated(value):
    with pytest.raises(torchdkm.TorchdkmError, match="straight_through"):
        torchdkm.LayerConfig(straight_through=value)


def test_straight_through_round_trips_in_the_config():
    config = torchdkm.DKMConfig.parse("fc:2/1", straight_through=0.25)
    layer = config.by_type["fc"]
    assert layer.straight_through == 0.25
    assert torchdkm.LayerConfig.from_dict(layer.to_dict()) == layer


def test_a_bad_saved_state_is_refused():
    model = torchdkm.prepare(small_model(), "fc:2/1")
    schedule = torchdkm.TauSchedule(model, steps=5, start=0.1, end=0.01)
    with pytest.raises(torchdkm.TorchdkmError, match="done=-1"):
        schedule.load_state_dict({"steps": 5, "start": 0.1, "end": 0.01, "done": -1})
    with pytest.raises(torchdkm.TorchdkmError, match="steps=0"):
        schedule.load_state_dict({"steps": 0, "start": 0.1, "end": 0.01, "done": 0})


# -- grad_terms: the centroids' share of the gradient, exact (solve) or truncated (unrolled iterations) --------------


def layer_gradient(**fields) -> torch.Tensor:
    torch.manual_seed(6)
    layer = nn.Linear(24, 12).double()
    torchdkm.prepare(layer, torchdkm.DKMConfig.parse("fc:2/1", min_numel=0, straight_through=0.0, **fields))
    (layer.weight * torch.arange(288.0, dtype=torch.float64).view(12, 24)).sum().backward()
    return layer.parametrizations.weight.original.grad


def test_grad_terms_reaches_a_layers_gradient():
    """Truncating the series changes the gradient, and more terms come closer to the exact one."""
    exact, one, many = layer_gradient(grad_terms=0), layer_gradient(grad_terms=1), layer_gradient(grad_terms=200)
    assert torch.equal(layer_gradient(), exact)  # (scalars: the exact gradient by default)
    assert not torch.allclose(exact, one, rtol=1e-3, atol=0)
    assert (many - exact).norm() < (one - exact).norm()


@pytest.mark.parametrize(
    "setting, terms", [("fc:2/1", 0), ("fc:1/1", 0), ("fc:4/4", 1), ("fc:4/8", 1), ("fc:4/2", 0), ("fc:2/2", 1)]
)
def test_one_term_is_the_default_for_vectors_at_one_bit_per_weight_and_below(setting, terms):
    layer = torchdkm.DKMConfig.parse(setting).by_type["fc"]
    assert layer.grad_terms is None and layer.terms == terms
    assert torchdkm.DKMConfig.parse(setting, grad_terms=0).by_type["fc"].terms == 0


@pytest.mark.parametrize("value", [-1, 1.5, "2", True])
def test_grad_terms_is_validated(value):
    with pytest.raises(torchdkm.TorchdkmError, match="grad_terms"):
        torchdkm.LayerConfig(grad_terms=value)


def test_grad_terms_round_trips_in_the_config():
    layer = torchdkm.DKMConfig.parse("fc:4/4", grad_terms=3).by_type["fc"]
    assert layer.grad_terms == 3 and torchdkm.LayerConfig.from_dict(layer.to_dict()) == layer
