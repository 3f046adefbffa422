"""``prepare(..., importance=...)``: importance-weighted centroids through the user-facing verbs."""

from __future__ import annotations

import copy

import pytest
import torch

import torchdkm
from torchdkm import DKMConfig, TorchdkmError
from torchdkm.nn.parametrization import dkm_parametrizations

CONFIG = DKMConfig.parse("fc:2/1, emb:2/1", min_numel=0)


def sensitive(model):
    """Squared gradients of a loss on a few tokens: what a calibration run hands ``prepare``."""
    tokens = torch.randint(0, 40, (8, 5), generator=torch.Generator().manual_seed(1))
    loss = model(tokens).logsumexp(-1).mean()
    names = ["emb.weight", "fc.weight"]
    grads = torch.autograd.grad(loss, [model.get_parameter(n) for n in names])
    return {n: g.square() for n, g in zip(names, grads)}


def test_kmeans_compress_weighs_the_centroids(make_tiednet):
    """The weighted k-means lowers the importance-weighted error of every clustered weight."""
    dense = make_tiednet()
    importance = sensitive(dense)
    plain = torchdkm.kmeans_compress(copy.deepcopy(dense), CONFIG)
    weighted = torchdkm.kmeans_compress(copy.deepcopy(dense), CONFIG, importance=importance)
    for name, module in (("emb.weight", "emb"), ("fc.weight", "fc")):
        original, f = dense.get_parameter(name).detach(), importance[name]
        error = {label: float(((m.get_submodule(module).weight - original) ** 2 * f).sum())
                 for label, m in (("plain", plain), ("weighted", weighted))}  # fmt: skip
        assert error["weighted"] < error["plain"], name


def test_a_tied_tensor_takes_its_importance_by_any_holders_name(make_tiednet):
    """``out.weight`` is ``emb.weight``: either name weighs the one clustered tensor, and training runs."""
    dense = make_tiednet()
    importance = sensitive(dense)
    by_owner = torchdkm.prepare(copy.deepcopy(dense), CONFIG, importance={"emb.weight": importance["emb.weight"]})
    by_holder = torchdkm.prepare(copy.deepcopy(dense), CONFIG, importance={"out.weight": importance["emb.weight"]})
    plain = torchdkm.prepare(copy.deepcopy(dense), CONFIG)
    centroids = {label: {n: p.centroids.clone() for n, _, _, p in dkm_parametrizations(m)}
                 for label, m in (("owner", by_owner), ("holder", by_holder), ("plain", plain))}  # fmt: skip
    assert torch.equal(centroids["owner"]["emb"], centroids["holder"]["emb"])
    assert not torch.equal(centroids["owner"]["emb"], centroids["plain"]["emb"])
    assert torch.equal(centroids["owner"]["fc"], centroids["plain"]["fc"])  # (no importance given: unweighted)
    tokens = torch.randint(0, 40, (4, 5))
    by_owner(tokens).sum().backward()
    assert by_owner.emb.parametrizations.weight.original.grad is not None


def test_batched_small_layers_weigh_as_alone(make_tiednet):
    """Small layers stepping together (``batch_numel``) take the same weighted step as alone."""
    dense = make_tiednet()
    importance = sensitive(dense)
    tokens = torch.randint(0, 40, (4, 5), generator=torch.Generator().manual_seed(2))
    outputs = []
    for batch_numel in (0, 1 << 20):
        model = torchdkm.prepare(copy.deepcopy(dense), CONFIG, importance=importance, batch_numel=batch_numel)
        outputs.append(model(tokens).detach())
    torch.testing.assert_close(outputs[0], outputs[1], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(
    ("importance", "message"),
    [
        ({"nope.weight": torch.ones(3)}, r"importance for 'nope.weight', which the config does not cluster"),
        ({"fc.weight": torch.ones(16, 15)}, r"importance for 'fc.weight' must be a tensor of the weight's shape \(16, 16\), got \(16, 15\)"),
        ({"fc.weight": [1.0]}, r"importance for 'fc.weight' must be a tensor of the weight's shape \(16, 16\), got list"),
        ({"fc.weight": -torch.ones(16, 16)}, r"importance for 'fc.weight' must be finite and >= 0 \(least value -1.0\)"),
        ({"fc.weight": torch.full((16, 16), float("nan"))}, r"importance for 'fc.weight' must be finite and >= 0"),
    ],
)
def test_bad_importance_is_refused(make_tiednet, importance, message):
    with pytest.raises(TorchdkmError, match=message):
        torchdkm.prepare(make_tiednet(), CONFIG, importance=importance)


def test_fisher_sums_the_squared_gradients_of_the_selected_weights(make_tiednet):
    """``torchdkm.fisher``: the tied tensor once (under the name prepare clusters it by), every loss counted,
    the model's mode and requires_grad restored; the result weighs prepare as is."""
    model = make_tiednet().train()
    batches = [torch.randint(0, 40, (4, 5), generator=torch.Generator().manual_seed(s)) for s in range(3)]

    def losses(m):
        for tokens in batches:
            yield m(tokens).logsumexp(-1).mean()

    found = torchdkm.fisher(model, losses, CONFIG)
    assert set(found) == {"emb.weight", "fc.weight"}
    want = {name: torch.zeros_like(model.get_parameter(name)) for name in found}
    for tokens in batches:
        model.eval()
        loss = model(tokens).logsumexp(-1).mean()
        for name, grad in zip(want, torch.autograd.grad(loss, [model.get_parameter(n) for n in want])):
            want[name] += grad.square()
    for name in found:
        torch.testing.assert_close(found[name], want[name], rtol=1e-5, atol=1e-12)
    model.train()
    found = torchdkm.fisher(model, losses, CONFIG)
    assert model.training and all(p.requires_grad for p in model.parameters())
    torchdkm.prepare(model, CONFIG, importance=found)
