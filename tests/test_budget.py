"""Size targets: plan_to_size never exceeds its budget, spends bits where the error is, and says when it cannot."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import torchdkm
from torchdkm import TorchdkmError, plan_to_size


def make_model() -> nn.Module:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Embedding(1000, 48), nn.Linear(48, 192), nn.ReLU(), nn.Linear(192, 48), nn.Linear(48, 1000))
    with torch.no_grad():  # one layer with outlier-heavy input channels
        model[3].weight.mul_(torch.logspace(-2, 1, 192)[None, :])
    return model


@pytest.mark.parametrize("target", [3.0, 4.5])
@pytest.mark.parametrize(
    ("base", "blocks", "groups"),
    [
        ("fc:4/1, emb:4/1", None, None),
        ("fc:4/1#32a, emb:4/1", (None, 32), None),
        ("fc:4/1, emb:4/1", (None, 32), (None, 1, 7)),
    ],
)
def test_the_written_file_never_exceeds_the_target(tmp_path, target, base, blocks, groups):
    model = make_model()
    plan = plan_to_size(model, target, base, blocks=blocks, groups=groups)
    assert plan.bytes <= plan.target_bytes == int(target * plan.parameters / 8)
    final = torchdkm.kmeans_compress(copy.deepcopy(model), plan.config)
    torchdkm.save(final, tmp_path / "m.dkm.safetensors")
    assert (tmp_path / "m.dkm.safetensors").stat().st_size <= plan.target_bytes
    report = torchdkm.report(final, show=False)
    assert report.compressed_bytes <= plan.bytes  # the plan counts what report counts, plus the header allowance
    assert {r.name for r in report.layers} == {layer.name for layer in plan.layers}


def test_more_budget_never_plans_more_error():
    model = make_model()
    errors = [sum(layer.error for layer in plan_to_size(model, t, "fc:4/1, emb:4/1").layers) for t in (3.0, 3.5, 4.5)]
    assert errors[0] > errors[1] > errors[2]


def test_calibration_weighs_each_input_channel_by_its_mean_square():
    """With calibration, a layer's error is ||(W_q - W) D||^2 / ||W D||^2, D^2 the inputs' mean squares."""
    from torchdkm import LayerConfig
    from torchdkm.cluster import WeightClusterer

    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(32, 16))
    x = torch.randn(64, 32) * torch.linspace(0.1, 10, 32)
    plan = plan_to_size(model, 64.0, "fc:4/1", bits=(2,), calibration=lambda m: m(x))  # (tiny: the header dominates)
    weight = model[0].weight.detach()
    clusterer = WeightClusterer("0", LayerConfig(bits=2), weight.shape)
    diff = (clusterer.snap(weight, clusterer.init(weight)) - weight).square()
    importance = x.square().mean(0)
    want = float((diff * importance).sum() / (weight.square() * importance).sum())
    assert plan.layers[0].error == pytest.approx(want, rel=1e-5)
    assert plan_to_size(model, 64.0, "fc:4/1", bits=(2,)).layers[0].error != pytest.approx(want, rel=1e-3)


def test_an_unreachable_target_names_the_smallest_size():
    with pytest.raises(TorchdkmError, match=r"needs [\d,]+ B \([\d.]+ bits per parameter\), over the target"):
        plan_to_size(make_model(), 1.0, "fc:4/1, emb:4/1")
    with pytest.raises(TorchdkmError, match="target_bpw"):
        plan_to_size(make_model(), float("nan"))


def test_plan_prints_every_layer():
    plan = plan_to_size(make_model(), 3.0, "fc:4/1, emb:4/1")
    text = str(plan)
    assert all(layer.name in text for layer in plan.layers) and "bits per parameter" in text


def test_retarget_spends_the_same_measurements_for_another_size():
    model = make_model()
    wide = plan_to_size(model, 4.5, "fc:4/1, emb:4/1")
    for target in (3.0, 3.5):
        again = wide.retarget(target)
        fresh = plan_to_size(model, target, "fc:4/1, emb:4/1")
        assert [layer.config for layer in again.layers] == [layer.config for layer in fresh.layers]
        assert again.bytes == fresh.bytes <= again.target_bytes
    assert [layer.chosen for layer in wide.layers] != [layer.chosen for layer in wide.retarget(3.0).layers]
    with pytest.raises(TorchdkmError, match="over the target"):
        wide.retarget(1.0)


def test_a_llama_file_with_block_scales_and_offsets_fits_its_target(tmp_path):
    """Long tensor names and four tensors per layer (indices, LUT, scales, offsets): the header allowance covers them."""
    transformers = pytest.importorskip("transformers")
    config = transformers.LlamaConfig(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                                      num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True)  # fmt: skip
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(config)
    for target in (5.0, 6.0):
        plan = plan_to_size(model, target, "fc:4/1#32a, emb:4/1#32a", bits=(2, 3, 4), blocks=(32, None), offset=True)
        torchdkm.save(torchdkm.kmeans_compress(copy.deepcopy(model), plan.config), tmp_path / "m.dkm.safetensors")
        assert (tmp_path / "m.dkm.safetensors").stat().st_size <= plan.target_bytes


def test_fisher_error_is_the_squared_gradients_times_the_squared_weight_error():
    """With ``fisher``, a layer's error is sum_losses (dL/dW)^2 * (W_q - W)^2, every yielded loss counted."""
    from torchdkm import LayerConfig
    from torchdkm.cluster import WeightClusterer

    torch.manual_seed(2)
    model = nn.Sequential(nn.Linear(32, 16))
    xs = [torch.randn(8, 32) for _ in range(3)]

    def losses(m):
        for x in xs:
            yield m(x).square().mean()

    plan = plan_to_size(model, 64.0, "fc:4/1", bits=(2,), calibration=losses, fisher=True)
    weight = model[0].weight.detach()
    fisher = torch.zeros_like(weight)
    for x in xs:
        w = weight.clone().requires_grad_(True)
        (grad,) = torch.autograd.grad((x @ w.T + model[0].bias.detach()).square().mean(), w)
        fisher += grad.square()
    clusterer = WeightClusterer("0", LayerConfig(bits=2), weight.shape)
    plain = float(((clusterer.snap(weight, clusterer.init(weight)) - weight).square() * fisher).sum())
    clusterer.weigh(fisher, weight)  # the options are Fisher-weighted k-means
    want = float(((clusterer.snap(weight, clusterer.init(weight)) - weight).square() * fisher).sum())
    assert plan.measure == "Fisher" and "Fisher" in str(plan)
    assert plan.layers[0].error == pytest.approx(want, rel=1e-4)
    assert want < plain  # the weighted optimum is the better one by the Fisher measure
    assert torch.allclose(plan.importance["0.weight"], fisher, rtol=1e-5)  # what prepare is to weigh by
    assert all(not p.requires_grad or p.grad is None for p in model.parameters())  # no gradient left behind
    assert all(p.requires_grad for p in model.parameters())  # requires_grad restored


def test_fisher_spends_the_bits_where_the_loss_is():
    """Two identical layers, one a hundred times more sensitive: Fisher gives it the bits, the relative error cannot tell."""

    class Two(nn.Module):
        def __init__(self):
            super().__init__()
            self.loud, self.quiet = nn.Linear(256, 256), nn.Linear(256, 256)
            self.quiet.load_state_dict(self.loud.state_dict())

        def forward(self, x):
            return 10 * self.loud(x) + 0.1 * self.quiet(x)

    torch.manual_seed(3)
    model, x = Two(), torch.randn(32, 256)
    target = torch.randn(32, 256)
    for p in model.parameters():
        p.requires_grad_(False)  # a frozen teacher: the planner turns the selected weights' gradients on itself
    fisher = plan_to_size(model, 5.0, "fc:4/1", bits=(2, 3, 4, 6), calibration=lambda m: (m(x) - target).square().mean(), fisher=True)  # fmt: skip
    bits = {layer.module: layer.config.bits for layer in fisher.layers}
    assert bits["loud"] > bits["quiet"]
    assert not any(p.requires_grad for p in model.parameters())
    relative = plan_to_size(model, 5.0, "fc:4/1", bits=(2, 3, 4, 6))
    assert relative.layers[0].options == relative.layers[1].options  # the norm sees two identical layers


def test_fisher_needs_losses():
    model = nn.Sequential(nn.Linear(32, 16))
    x = torch.randn(2, 32)
    with pytest.raises(TorchdkmError, match="fisher=True needs a calibration"):
        plan_to_size(model, 64.0, "fc:4/1", fisher=True)
    with pytest.raises(TorchdkmError, match=r"returned Tensor \(2, 16\) where a scalar loss"):
        plan_to_size(model, 64.0, "fc:4/1", calibration=lambda m: m(x), fisher=True)
    with pytest.raises(TorchdkmError, match="yielded no loss"):
        plan_to_size(model, 64.0, "fc:4/1", calibration=lambda m: iter(()), fisher=True)
    assert model[0].weight.requires_grad


def test_lut_groups_are_options_the_plan_can_take():
    """Rows of very different scales: a LUT per few channels (cheap beside block scales) is what the plan takes."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(512, 64), nn.Linear(512, 64))
    with torch.no_grad():
        for layer in model:
            layer.weight.mul_(torch.logspace(-2, 1, 64)[:, None])
    plain = plan_to_size(model, 3.0, "fc:4/1", blocks=(None, 32))
    grouped = plan_to_size(model, 3.0, "fc:4/1", blocks=(None, 32), groups=(None, 1, 4))
    assert all(len(g.options) == 3 * len(p.options) for g, p in zip(grouped.layers, plain.layers))
    assert sum(layer.error for layer in grouped.layers) < sum(layer.error for layer in plain.layers)
    assert all(layer.config.group_size is not None for layer in grouped.layers)
    assert "LUT per" in str(grouped) and " ch " in str(grouped)


def test_without_the_header_the_budget_is_what_report_counts():
    """header=False: the tensors' bytes (report's count) fit the target; the header's allowance goes to the layers."""
    model = make_model()
    with_header = plan_to_size(model, 3.0, "fc:4/1, emb:4/1")
    tensors_only = plan_to_size(model, 3.0, "fc:4/1, emb:4/1", header=False)
    assert tensors_only.dense_bytes < with_header.dense_bytes
    assert sum(layer.error for layer in tensors_only.layers) <= sum(layer.error for layer in with_header.layers)
    final = torchdkm.kmeans_compress(copy.deepcopy(model), tensors_only.config)
    assert torchdkm.report(final, show=False).compressed_bytes <= tensors_only.target_bytes
