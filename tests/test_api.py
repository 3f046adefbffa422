"""The user-facing verbs: prepare, finalize, kmeans_compress."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn
from torch.nn.utils import parametrize

import torchdkm
from torchdkm import DKMConfig, LayerConfig, TorchdkmError
from torchdkm.nn import (
    PalettizedConv1d,
    PalettizedConv2d,
    PalettizedConv3d,
    PalettizedEmbedding,
    PalettizedLinear,
    PalettizedMixin,
)
from torchdkm.nn.parametrization import dkm_parametrizations, original

# Vectors (dim 2 for convs, 4 for linears) and LUT groups of 8 output channels, the last group
# ragged (fc: 20 rows = 8 + 8 + 4; head: 10 rows = 8 + 2), so padded vectors too.
CONV = DKMConfig.parse("cv:4/2, fc:3/4@8", min_numel=0)
ALL = DKMConfig(default=LayerConfig(bits=3, min_numel=0))


def cfg(text):
    return DKMConfig.parse(text, min_numel=0)


def train(model, inputs, steps=3, lr=0.05, optimizer=None):
    optimizer = optimizer or torch.optim.SGD(model.parameters(), lr=lr)
    model.train()
    for _ in range(steps):
        optimizer.zero_grad()
        loss = model(*inputs).square().mean()
        loss.backward()
        optimizer.step()
    return optimizer


# -- prepare -------------------------------------------------------------------


def test_prepare_keeps_classes_and_parameters(make_convnet):
    model = make_convnet()
    params = {n: p for n, p in model.named_parameters()}
    modules = {n: type(m) for n, m in model.named_modules()}
    out = torchdkm.prepare(model, CONV)
    assert out is model
    for name, cls in modules.items():
        assert isinstance(model.get_submodule(name), cls)
    for name in ("conv1", "conv2", "fc", "head"):
        module = model.get_submodule(name)
        assert parametrize.is_parametrized(module, "weight")
        assert original(module, "weight") is params[f"{name}.weight"]  # the very same Parameter
        assert module.bias is params[f"{name}.bias"]
    assert {id(p) for p in model.parameters()} == {id(p) for p in params.values()}
    # The state dict keeps the weight (under parametrizations.weight.original) plus the centroids.
    keys = set(model.state_dict())
    assert "fc.parametrizations.weight.original" in keys and "fc.parametrizations.weight.0.centroids" in keys


def test_prepare_resolves_configs_per_layer(make_convnet):
    model = torchdkm.prepare(make_convnet(), CONV)
    found = {name: p for name, _, _, p in dkm_parametrizations(model)}
    assert set(found) == {"conv1", "conv2", "fc", "head"}
    assert (found["conv1"].config.bits, found["conv1"].config.dim) == (4, 2)
    assert (found["fc"].config.bits, found["fc"].config.dim, found["fc"].config.group_size) == (3, 4, 8)
    assert found["fc"].centroids.shape == (3, 8, 4)  # 20 rows in groups of 8
    assert found["conv2"].centroids.shape == (1, 16, 2)


def test_optimizer_built_before_prepare_still_trains(make_convnet, conv_input):
    model = make_convnet()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    torchdkm.prepare(model, CONV)
    centroids = {n: p.centroids.clone() for n, _, _, p in dkm_parametrizations(model)}
    train(model, (conv_input,), steps=2, optimizer=optimizer)
    for name, p in model.named_parameters():
        key = name.replace("parametrizations.weight.original", "weight")
        assert not torch.equal(p.detach(), before[key]), f"{name} did not train"
    for name, _, _, p in dkm_parametrizations(model):
        assert not torch.equal(p.centroids, centroids[name]), f"{name} centroids did not move"
        assert torch.isfinite(p.centroids).all()


def test_gradients_reach_the_weights(make_mixednet, mixed_input):
    model = torchdkm.prepare(make_mixednet(), ALL)
    model.train()
    model(*mixed_input).sum().backward()
    for name, module, param, _ in dkm_parametrizations(model):
        grad = original(module, param).grad
        assert grad is not None and torch.isfinite(grad).all() and grad.abs().sum() > 0, name


def test_forward_in_train_mode_is_soft_and_eval_is_snapped(make_convnet):
    model = torchdkm.prepare(make_convnet(), CONV)
    fc = model.fc
    p = fc.parametrizations.weight[0]
    model.eval()
    hard = fc.weight
    refreshed = p.export(original(fc, "weight"))[1]  # centroids brought up to date with the weights
    assert torch.equal(hard, p.clusterer.snap(original(fc, "weight"), refreshed))
    layout = p.clusterer.layout
    vectors, real = layout.to_vectors(hard), layout.multiplicity(hard.dtype, hard.device)
    for g in range(layout.groups):
        whole = vectors[g] if real is None else vectors[g][real[g] > 0]
        assert torch.unique(whole, dim=0).shape[0] <= p.config.k
    model.train()
    soft = fc.weight
    assert not torch.equal(soft, hard)


def test_training_moves_centroids(make_convnet, conv_input):
    model = torchdkm.prepare(make_convnet(), cfg("cv:2, fc:2"))
    before = [p.centroids.clone() for _, _, _, p in dkm_parametrizations(model)]
    train(model, (conv_input,), steps=3)
    after = [p.centroids for _, _, _, p in dkm_parametrizations(model)]
    assert any(not torch.equal(a, b) for a, b in zip(before, after))


def test_model_prepared_in_eval_mode_stays_in_eval_mode(make_convnet, conv_input):
    model = make_convnet().eval()
    torchdkm.prepare(model, CONV)
    before = [p.centroids.clone() for _, _, _, p in dkm_parametrizations(model)]
    for name, module, _, p in dkm_parametrizations(model):
        assert not p.training
        weight = original(module, "weight")
        assert torch.equal(module.weight, p.clusterer.snap(weight, p.export(weight)[1])), name
    model(conv_input)
    assert all(torch.equal(b, p.centroids) for b, (_, _, _, p) in zip(before, dkm_parametrizations(model)))


def test_name_rule_matching_no_module_raises(make_convnet):
    config = DKMConfig(default=LayerConfig(bits=2), by_name={"encoder.*.query": {"bits": 3}, "fc": None})
    with pytest.raises(TorchdkmError, match=r"encoder\.\*\.query"):
        torchdkm.prepare(make_convnet(), config)
    with pytest.raises(TorchdkmError, match="fcc"):
        torchdkm.prepare(make_convnet(), "fcc:4")


def test_name_rule_on_unsupported_module_raises():
    model = nn.Sequential(nn.Linear(16, 16), nn.LayerNorm(16))
    with pytest.raises(TorchdkmError, match="'1'.*LayerNorm"):
        torchdkm.prepare(model, DKMConfig(by_name={"1": {"bits": 2}}))


@pytest.mark.parametrize("where", ["conv1", "fc"])
@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_weights_raise_at_prepare(make_convnet, where, bad):
    model = make_convnet()
    with torch.no_grad():
        model.get_submodule(where).weight[0, 0] = bad
    with pytest.raises(TorchdkmError, match=f"'{where}'"):
        torchdkm.prepare(model, cfg("cv:2, fc:2/2"))


@pytest.mark.parametrize(
    ("rule", "extra"),
    [("*:2", {}), ("*:2", {"cluster_dtype": "exact"}), ("*:2/2", {})],
    ids=["uniquified", "exact", "vectors"],
)
@pytest.mark.parametrize("mode", ["train", "eval"])
def test_non_finite_weights_raise_at_forward(make_convnet, conv_input, rule, extra, mode):
    model = torchdkm.prepare(make_convnet(), DKMConfig.parse(rule, min_numel=0, **extra))
    with torch.no_grad():
        original(model.conv2, "weight")[1, 2, 0, 0] = float("nan")
    model.train(mode == "train")
    with pytest.raises(TorchdkmError, match="'conv2'"):
        model(conv_input)


def test_min_numel_leaves_small_layers_alone(make_convnet):
    model = torchdkm.prepare(make_convnet(), DKMConfig.parse("*:2", min_numel=1000))
    # conv1: 216 weights, conv2: 864, fc: 3840, head: 200
    assert {name for name, _, _, _ in dkm_parametrizations(model)} == {"fc"}
    assert type(model.conv1) is nn.Conv2d and type(model.head) is nn.Linear
    with pytest.raises(TorchdkmError, match="selects no weight"):
        torchdkm.prepare(make_convnet(), DKMConfig.parse("*:2", min_numel=10**6))


def test_tied_weights_are_clustered_once(make_tiednet):
    model = torchdkm.prepare(make_tiednet(), ALL)
    found = {name: p for name, _, _, p in dkm_parametrizations(model)}
    assert found["emb"] is found["out"] and found["emb"].holders == [("emb", "weight"), ("out", "weight")]
    assert model.emb.parametrizations.weight.original is model.out.parametrizations.weight.original
    with pytest.raises(
        TorchdkmError, match=r"out.weight and emb.weight are one tensor .* \(bits=3, dim=1, min_numel=0 vs bits=2,"
    ):
        torchdkm.prepare(make_tiednet(), DKMConfig.parse("emb:2/1, out:3/1", min_numel=0))
    config = DKMConfig(default=LayerConfig(bits=3, min_numel=0), by_name={"out": None})
    with pytest.warns(UserWarning, match="out.weight .*tied to emb.weight, which is clustered, but a rule excludes"):
        model = torchdkm.prepare(make_tiednet(), config)
    assert {name for name, _, _, _ in dkm_parametrizations(model)} == {"emb", "fc"}


def test_prepare_twice_raises(make_convnet):
    model = torchdkm.prepare(make_convnet(), CONV)
    with pytest.raises(TorchdkmError, match="already prepared"):
        torchdkm.prepare(model, CONV)


def test_prepare_rejects_bad_config_types(make_convnet):
    with pytest.raises(TorchdkmError, match="dict"):
        torchdkm.prepare(make_convnet(), {"default": {"bits": 2}})
    with pytest.raises(TorchdkmError, match="cannot read rule"):
        torchdkm.prepare(make_convnet(), "cv=4")


def test_prepare_missing_parameter_raises():
    model = nn.Sequential(nn.Linear(16, 16, bias=False))
    with pytest.raises(TorchdkmError, match="'bias'"):
        torchdkm.prepare(model, DKMConfig(default=LayerConfig(bits=2, param="bias", min_numel=0)))


# -- finalize -------------------------------------------------------------------

PALETTIZED = {
    nn.Linear: PalettizedLinear,
    nn.Conv1d: PalettizedConv1d,
    nn.Conv2d: PalettizedConv2d,
    nn.Conv3d: PalettizedConv3d,
    nn.Embedding: PalettizedEmbedding,
}


def check_finalized_equals_eval(model, inputs, train_steps=2):
    if train_steps:
        train(model, inputs, steps=train_steps)
    model.eval()
    with torch.no_grad():
        expected = model(*inputs)
        weights = {name: module.weight.clone() for name, module, _, _ in dkm_parametrizations(model)}
    types = {name: type(module).__mro__[1] for name, module, _, _ in dkm_parametrizations(model)}
    final = torchdkm.finalize(model)
    assert not dkm_parametrizations(final)
    for name, base in types.items():
        module = final.get_submodule(name)
        assert isinstance(module, PALETTIZED[base]) and isinstance(module, base)
        assert "weight" not in dict(module.named_parameters(recurse=False))
        assert torch.equal(module.weight, weights[name])
    with torch.no_grad():
        got = final(*inputs)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)  # LUT kernel: kernels.lut.RTOL
    return final


def test_finalize_equals_prepared_eval_convnet(make_convnet, conv_input):
    check_finalized_equals_eval(torchdkm.prepare(make_convnet(), CONV), (conv_input,))


@pytest.mark.parametrize(
    "config",
    [
        "*:3",
        "*:2/3",  # fc has 70 weights: a partial last vector
        "*:4/2@3",  # groups of 3 rows, the last one ragged in every layer
        "emb:3/5@7, cv:2/4, fc:4",
    ],
)
def test_finalize_equals_prepared_eval_every_type(make_mixednet, mixed_input, config):
    model = torchdkm.prepare(make_mixednet(), DKMConfig.parse(config, min_numel=0))
    final = check_finalized_equals_eval(model, mixed_input)
    assert type(final.norm) is nn.LayerNorm


def test_finalize_model_that_is_itself_a_layer():
    layer = nn.Linear(16, 8)
    x = torch.randn(5, 16)
    torchdkm.prepare(layer, cfg("*:2"))
    layer.eval()
    expected = layer(x)
    final = torchdkm.finalize(layer)
    assert isinstance(final, PalettizedLinear) and final is not layer
    torch.testing.assert_close(final(x), expected, rtol=1e-5, atol=1e-5)  # LUT kernel: kernels.lut.RTOL


def test_finalize_half_precision_model():
    model = nn.Sequential(nn.Linear(32, 16), nn.ReLU(), nn.Linear(16, 4)).to(torch.bfloat16)
    x = torch.randn(3, 32, dtype=torch.bfloat16)
    torchdkm.prepare(model, DKMConfig.parse("*:3", min_numel=0))
    model.eval()
    expected = model(x)
    final = torchdkm.finalize(model)
    assert final[0].weight_lut.dtype == torch.bfloat16
    torch.testing.assert_close(final(x), expected, rtol=2e-2, atol=2e-2)  # LUT kernel: kernels.lut.RTOL


def test_finalize_without_prepare_raises(make_convnet):
    with pytest.raises(TorchdkmError, match="prepare"):
        torchdkm.finalize(make_convnet())


def test_finalized_weights_use_at_most_k_values(make_convnet, conv_input):
    model = torchdkm.prepare(make_convnet(), cfg("cv:2, fc:3"))
    final = check_finalized_equals_eval(model, (conv_input,), train_steps=1)
    assert torch.unique(final.conv1.weight).numel() <= 4
    assert torch.unique(final.fc.weight).numel() <= 8
    assert isinstance(final.fc, PalettizedMixin)


# -- kmeans_compress ------------------------------------------------------------


@pytest.mark.parametrize("config", [CONV, cfg("*:2"), "cv:4/2, fc:3/4@8"])
def test_kmeans_compress_snaps_to_the_kmeans_centroids(make_convnet, conv_input, config):
    prepared = torchdkm.prepare(make_convnet(), config)
    expected = {}
    for name, module, param, p in dkm_parametrizations(prepared):
        weight = original(module, param)
        expected[name] = (p.centroids.clone(), p.clusterer.snap(weight, p.centroids))
    a = torchdkm.kmeans_compress(make_convnet(), config)
    for name, (lut, snapped) in expected.items():
        module = a.get_submodule(name)
        assert torch.equal(module.weight_lut, lut.to(module.weight_lut.dtype)), name
        assert torch.equal(module.weight, snapped), name
    assert isinstance(a.fc, PalettizedLinear) and isinstance(a.conv2, PalettizedConv2d)


def test_kmeans_compress_is_close_to_the_dense_model(make_convnet, conv_input):
    dense = make_convnet()
    expected = dense(conv_input)
    compressed = torchdkm.kmeans_compress(make_convnet(), cfg("*:6"))  # 64 levels: nearly lossless
    got = compressed(conv_input)
    assert (got - expected).abs().max() < 0.05 * expected.abs().max()
    for name in ("conv1", "conv2", "fc", "head"):
        w, q = dense.get_submodule(name).weight, compressed.get_submodule(name).weight
        assert (w - q).abs().max() < 0.05 * w.abs().max()


def test_training_in_eval_mode_passes_the_gradient_straight_through_and_warns(make_convnet, conv_input):
    model = torchdkm.prepare(make_convnet(), CONV).eval()  # e.g. BatchNorm frozen by model.eval()
    fc = model.fc
    weight = original(fc, "weight")
    with torch.no_grad():
        hard = fc.weight.clone()
    probe = torch.randn_like(hard)
    with pytest.warns(UserWarning, match="'fc' is in eval mode but its weight gets a gradient"):
        used = fc.weight
        assert torch.equal(used, hard)  # the snapped weight, as in eval mode without a gradient
        (used * probe).sum().backward()
    assert torch.equal(weight.grad, probe)  # straight through: d(used)/d(weight) = 1
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # once per layer
        (fc.weight * probe).sum().backward()


def test_prepare_names_a_foreign_parametrization():
    model = nn.Sequential(nn.utils.parametrizations.weight_norm(nn.Linear(16, 32)))
    needle = r"0\.weight is computed by another parametrization \(_WeightNorm.*remove_parametrizations"
    with pytest.raises(TorchdkmError, match=needle):
        torchdkm.prepare(model, cfg("fc:3/1"))


class Checkpointed(nn.Module):
    """Two blocks whose forward activation checkpointing recomputes in backward (as transformers' layers)."""

    def __init__(self, reentrant: bool | None):
        super().__init__()
        self.blocks = nn.ModuleList(nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 16)) for _ in range(2))
        self.reentrant = reentrant

    def forward(self, x):
        for block in self.blocks:
            if self.reentrant is None:
                x = block(x)
            else:
                x = torch.utils.checkpoint.checkpoint(block, x, use_reentrant=self.reentrant)
        return x


def step_results(model: nn.Module, x: torch.Tensor) -> tuple[list, list]:
    model(x).pow(2).mean().backward()
    grads = [p.grad.clone() for p in model.parameters()]
    return grads, [p.centroids.clone() for _, _, _, p in dkm_parametrizations(model)]


@pytest.mark.parametrize("reentrant", [False, True])
def test_activation_checkpointing_gives_the_plain_forwards_step(reentrant):
    """Recomputing a checkpointed forward reads each weight again: the same DKM step, not a second one from
    the moved centroids (non-reentrant checkpointing raised a CheckpointError; reentrant gave other gradients)."""
    config = cfg("fc:3/1#8a")
    torch.manual_seed(0)
    plain = torchdkm.prepare(Checkpointed(None), config)
    torch.manual_seed(0)
    checkpointed = torchdkm.prepare(Checkpointed(reentrant), config)
    x = torch.randn(4, 16, requires_grad=True)
    expected, got = step_results(plain, x), step_results(checkpointed, x)
    for a, b in zip(expected[0] + expected[1], got[0] + got[1]):
        if reentrant:  # its first pass runs without gradients: the step runs again from the same start, alone
            torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-4 * float(a.abs().max()))  # (not batched: rounding)
        else:  # the step's own graph is kept: bit for bit
            assert torch.equal(a, b)


def test_a_layer_read_again_in_one_forward_steps_once(make_convnet):
    model = torchdkm.prepare(make_convnet(), CONV)
    dkm = model.fc.parametrizations.weight[0]
    first = model.fc.weight
    centroids = dkm.centroids.clone()
    assert torch.equal(model.fc.weight, first)  # the same step's soft weight
    assert torch.equal(dkm.centroids, centroids)  # the centroids moved once
    first.sum().backward()  # backward ran through it: the next read is the next step
    model.fc.weight  # noqa: B018
    assert not torch.equal(dkm.centroids, centroids)


def test_a_compiled_model_trains_as_the_eager_one():
    """The DKM step runs eagerly inside torch.compile (inductor dropped the float16 rounding of the block
    scales; Dynamo crashed in the native loops of vector layers); the rest of the model compiles."""
    config = cfg("fc:4/2#8a")
    results = []
    for compiled in (False, True):
        torch.manual_seed(0)
        model = torchdkm.prepare(nn.Sequential(nn.Linear(16, 64), nn.ReLU(), nn.Linear(64, 8)), config)
        run = torch.compile(model) if compiled else model
        torch.manual_seed(1)
        loss = run(torch.randn(8, 16)).pow(2).mean()
        loss.backward()
        results.append([loss.detach()] + [p.grad for p in model.parameters()])
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
