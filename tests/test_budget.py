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
@pytest.mark.parametrize(("base", "blocks"), [("fc:4/1, emb:4/1", None), ("fc:4/1#32a, emb:4/1", (None, 32))])
def test_the_written_file_never_exceeds_the_target(tmp_path, target, base, blocks):
    model = make_model()
    plan = plan_to_size(model, target, base, blocks=blocks)
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
