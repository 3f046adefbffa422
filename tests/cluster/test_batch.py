"""Small layers stepping together (``cluster.batch``, ``nn.batching``): each layer gets what it gets alone."""

from __future__ import annotations

import copy
import io

import pytest
import torch
from torch import nn

import torchdkm
from torchdkm import TorchdkmError
from torchdkm.cluster import WeightClusterer, engine
from torchdkm.cluster.batch import BATCH_NUMEL, batch_key, soft_together
from torchdkm.config import LayerConfig
from torchdkm.nn.batching import StepBatch

SHAPES = [(32, 1, 3, 3), (24, 8, 3, 3), (48, 48, 1, 1), (10, 157), (20, 30)]


def layers(config: LayerConfig, dtype: torch.dtype = torch.float64, seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    weights = [torch.randn(s, generator=generator, dtype=dtype) * 0.1 * (i + 1) for i, s in enumerate(SHAPES)]
    clusterers = [WeightClusterer(f"layer{i}", config, w.shape) for i, w in enumerate(weights)]
    centroids = [cl.init(w) for cl, w in zip(clusterers, weights)]
    grads = [torch.randn(w.shape, generator=generator, dtype=dtype) for w in weights]
    return clusterers, weights, centroids, grads


def alone(clusterers, weights, centroids, grads):
    out = []
    for cl, w, c, g in zip(clusterers, weights, centroids, grads):
        w = w.clone().requires_grad_()
        result = cl.soft(w, c)
        (result.weight * g).sum().backward()
        out.append((result.weight.detach(), result.centroids, w.grad))
    return out


def together(clusterers, weights, centroids, grads):
    ws = [w.clone().requires_grad_() for w in weights]
    results = soft_together(clusterers, ws, centroids)
    sum((r.weight * g).sum() for r, g in zip(results, grads)).backward()
    return [(r.weight.detach(), r.centroids, w.grad) for r, w in zip(results, ws)]


def assert_close(got, want, rtol):
    for (w, c, g), (w0, c0, g0) in zip(got, want):
        for a, b in ((w, w0), (c, c0), (g, g0)):
            assert float((a - b).abs().max()) <= rtol * float(b.abs().max()) + 1e-300


CONFIGS = {
    "sparse 4/4": dict(bits=4, dim=4),
    "dense 4/4": dict(bits=4, dim=4, top_m=None),
    "3/2 blocks of 8": dict(bits=3, dim=2, scale_block=8),
    "3/3 LUT per 4 channels, partial vectors": dict(bits=3, dim=3, group_size=4),
    "8/1 Neumann series, unconverged": dict(bits=8, dim=1, max_iters=2),
    "4/2 asymmetric per-channel scales": dict(bits=4, dim=2, scale_block=0, scale_offset=True),
    "2/1 tight tolerance": dict(bits=2, dim=1, tol=0.0, max_iters=7),
}


@pytest.mark.parametrize("name", list(CONFIGS))
def test_each_layer_gets_its_own_step_in_float64(name):
    """In float64 the rounding that padding changes is far below the comparison: any logic slip shows."""
    case = layers(LayerConfig(**CONFIGS[name]))
    assert_close(together(*case), alone(*case), 1e-8)


def test_uniquified_layers_match_to_float32_rounding(backend):
    config = LayerConfig(bits=2, dim=1)  # float32 scalars: the 16-bit uniquified path
    clusterers, weights, centroids, grads = layers(config, torch.float32)
    clusterers = [WeightClusterer(cl.name, config, cl.layout.shape, backend=backend) for cl in clusterers]
    assert {cl.plan(weights[0]).path for cl in clusterers} == {"unique"}
    got, want = together(clusterers, weights, centroids, grads), alone(clusterers, weights, centroids, grads)
    for (w, c, _), (w0, c0, _) in zip(got, want):
        torch.testing.assert_close(c, c0, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(w, w0, rtol=1e-3, atol=1e-4)  # (a sharp softmax amplifies rounding)


def test_members_take_the_solve_or_the_series_each(monkeypatch):
    """With no amplification allowed, a member whose gradient is zero still solves; the others sum the series."""
    monkeypatch.setattr(engine, "MAX_AMPLIFICATION", 0.0)
    clusterers, weights, centroids, grads = layers(LayerConfig(bits=3, dim=1))
    grads[1] = torch.zeros_like(grads[1])
    got, want = together(clusterers, weights, centroids, grads), alone(clusterers, weights, centroids, grads)
    assert_close([g for i, g in enumerate(got) if i != 1], [w for i, w in enumerate(want) if i != 1], 1e-8)
    assert float(got[1][2].abs().max()) == 0.0


def test_plans_must_agree():
    a = WeightClusterer("a", LayerConfig(bits=2, dim=1), (8, 8))
    b = WeightClusterer("b", LayerConfig(bits=2, dim=1, cluster_dtype="exact"), (8, 8))
    w = torch.randn(8, 8)
    with pytest.raises(ValueError, match="plans differ"):
        soft_together([a, b], [w, w], [a.init(w), b.init(w)])
    assert batch_key(LayerConfig(bits=2)) != batch_key(LayerConfig(bits=3))
    assert batch_key(LayerConfig(bits=2, tau=0.01, scale_block=8)) == batch_key(LayerConfig(bits=2))
    assert batch_key(LayerConfig(shard_attention=True)) is None


# -- training: prepare, rounds, copies --------------------------------------------------------------------


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(1, 8, 3, padding=1)
        self.conv2 = nn.Conv2d(8, 8, 3, padding=1)
        self.big = nn.Linear(8 * 6 * 6, 300)
        self.head = nn.Linear(300, 5)

    def forward(self, x, twice: bool = False):
        x = torch.relu(self.conv1(x))
        x = torch.relu(self.conv2(x))
        if twice:
            x = torch.relu(self.conv2(x))
        return self.head(torch.relu(self.big(x.flatten(1))))


def prepared(batch_numel: int = BATCH_NUMEL, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    model = Net().double()
    return torchdkm.prepare(model, torchdkm.DKMConfig.parse("*:3/1", min_numel=0), batch_numel=batch_numel)


def members(model):
    return {name: m.parametrizations.weight[0] for name, m in model.named_children()}


def train(model, steps: int = 3, twice: bool = False) -> list[float]:
    generator = torch.Generator().manual_seed(1)
    x, y = torch.randn(16, 1, 6, 6, generator=generator).double(), torch.randint(0, 5, (16,), generator=generator)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    losses = []
    for _ in range(steps):
        optimizer.zero_grad()
        loss = nn.functional.cross_entropy(model(x, twice), y)
        loss.backward()
        optimizer.step()
        losses.append(float(loss))
    return losses


def test_prepare_batches_the_small_layers_only():
    model = prepared(batch_numel=10_000)  # big: 288 x 300 = 86,400 weights
    found = members(model)
    batch = found["conv1"].batch
    assert isinstance(batch, StepBatch) and found["conv2"].batch is batch and found["head"].batch is batch
    assert found["big"].batch is None
    assert all(p.batch is None for p in members(prepared(batch_numel=0)).values())


@pytest.mark.parametrize("bad", [-1, 1.5, True, "64k"])
def test_batch_numel_is_checked(bad):
    with pytest.raises(TorchdkmError, match="batch_numel"):
        torchdkm.prepare(Net(), "*:3/1", batch_numel=bad)


@pytest.mark.parametrize("twice", [False, True])
def test_training_matches_layers_alone(twice):
    """Same losses, weights and centroids as stepping every layer alone; a module called twice steps once."""
    batched, solo = prepared(), prepared(batch_numel=0)
    assert train(batched, twice=twice) == pytest.approx(train(solo, twice=twice), rel=1e-9)
    for (name, a), (_, b) in zip(members(batched).items(), members(solo).items()):
        torch.testing.assert_close(a.centroids, b.centroids, rtol=1e-8, atol=1e-12, msg=name)
    for a, b in zip(batched.parameters(), solo.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-8, atol=1e-12)


def test_backward_ends_the_round():
    """A read of one layer starts a round that keeps the others' soft weights; its backward frees the op's
    graph, so the next forward must step again rather than backpropagate through a kept weight."""
    model = prepared()
    x = torch.randn(4, 1, 6, 6).double()
    model.conv2.weight.sum().backward()
    model(x).sum().backward()
    model.head.weight.sum().backward()
    model(x).sum().backward()
    assert all(bool(torch.isfinite(p.grad).all()) for p in model.parameters())


def test_copies_drop_the_round():
    model = prepared()
    model.conv1.weight  # noqa: B018  (a round is open: the other members' soft weights are kept)
    clone, other = copy.deepcopy(model), copy.deepcopy(model)
    assert members(clone)["conv1"].batch is not members(model)["conv1"].batch
    assert members(clone)["conv2"].batch is members(clone)["conv1"].batch
    torch.save(model.state_dict(), io.BytesIO())
    assert train(clone, steps=2) == train(other, steps=2)  # (both start a new round)


def test_a_member_of_another_dtype_switches_the_batch_off():
    model = prepared()
    model.head.parametrizations.weight.original.data = model.head.parametrizations.weight.original.data.float()
    model.head.parametrizations.weight[0].centroids.data = model.head.parametrizations.weight[0].centroids.float()
    model.conv1.weight  # noqa: B018
    assert members(model)["conv1"].batch.enabled is False


def test_another_parametrization_switches_the_batch_off():
    """The batch reads every member's trainable tensor: another parametrization on a weight would be skipped."""
    from torch.nn.utils import parametrize

    class Double(nn.Module):
        def forward(self, w):
            return 2 * w

    model = prepared()
    parametrize.register_parametrization(model.conv1, "weight", Double())  # (torch evaluates the list once)
    train(model, steps=2)  # the second step's weights are new: a new round, which checks the members
    assert members(model)["conv2"].batch.enabled is False
