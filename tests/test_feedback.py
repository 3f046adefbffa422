"""``torchdkm.gptq`` (``torchdkm/feedback.py``): error feedback onto the LUT and block scales before training or finalize."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import torchdkm
from torchdkm import TorchdkmError
from torchdkm.cluster.scales import BlockScales
from torchdkm.feedback import compensate, gptq


def correlated(n: int, width: int, seed: int) -> torch.Tensor:
    """Samples (by ``seed``) of inputs whose features are strongly correlated, as a transformer's are: where
    error feedback pays.  The correlation is the same for every seed."""
    structure = torch.Generator().manual_seed(width)
    basis = torch.randn(4, width, generator=structure)
    mix = torch.randn(width, width, generator=structure) / width**0.5 + 2 * torch.eye(width)
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 4, generator=g) @ basis + 0.3 * torch.randn(n, width, generator=g) @ mix


def prepared_config(text: str) -> torchdkm.DKMConfig:
    return torchdkm.DKMConfig.parse(text, min_numel=0)


def mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(48, 64), nn.ReLU(), nn.Linear(64, 32))


def test_uncorrelated_inputs_leave_nothing_to_feed_back():
    """With ``H`` diagonal no column's error moves another: the weight comes back as it went in."""
    torch.manual_seed(1)
    weight = torch.randn(8, 40)
    lut = torch.linspace(-2, 2, 4)[None, :, None]  # (groups, k, dim)
    out, rounded = compensate(weight, torch.diag(torch.rand(40) + 0.5), lut, 8, None)
    assert torch.equal(out, weight)
    assert torch.equal(rounded, lut[0, (weight[..., None] - lut[0, :, 0]).abs().argmin(-1), 0])


@pytest.mark.parametrize("block, offset", [(None, False), (16, False), (16, True), (0, True)])
def test_compensated_rounding_has_less_output_error_than_nearest_rounding(block, offset):
    """Rounded to the same grid (LUT, block scales derived from the result), GPTQ's columns give a smaller
    ``|(Q - W) X|`` on the inputs it saw than rounding each weight on its own."""
    torch.manual_seed(2)
    weight = torch.randn(24, 64)
    x = correlated(512, 64, 3)
    H = (x.T @ x).double()
    values = torch.tensor([-1.0, -0.4, 0.1, 0.7]) * (1 if block is not None else 2.5)
    blocks = BlockScales.of(weight.shape, block, offset)

    def rounded(w):
        normalised, scale, shift = (w, None, None) if blocks is None else blocks.normalise(w)
        q = values[(normalised[..., None] - values).abs().argmin(-1)]
        return q if blocks is None else blocks.apply(q, scale, shift)

    plain = rounded(weight)
    compensated, quantized = compensate(weight, H, values[None, :, None], 24, blocks)
    fed_back = rounded(compensated)
    assert torch.allclose(fed_back, quantized, rtol=0, atol=1e-6)  # its blocks derive GPTQ's scales
    error = lambda q: float(((q - weight) @ x.T).square().sum())  # noqa: E731
    assert error(fed_back) < 0.8 * error(plain)


@pytest.mark.parametrize("config", ["fc:2/1", "fc:3/1#16a", "fc:2/1#row", "fc:3/2#16a", "fc:4/4"])
def test_gptq_lowers_every_layers_output_error_and_the_models(config):
    """Through the verbs: prepare, gptq, finalize gives a model closer to the float one on held-out inputs."""
    dense = mlp()
    x, held_out = correlated(256, 48, 4), correlated(256, 48, 5)
    config = torchdkm.DKMConfig.parse(config, min_numel=0)
    plain = torchdkm.finalize(torchdkm.prepare(copy.deepcopy(dense), config, progress=False))
    prepared = torchdkm.prepare(copy.deepcopy(dense), config, progress=False)
    report = gptq(prepared, lambda m: m(x), reference=dense)
    assert set(report.errors) == {"0.weight", "2.weight"} and not report.skipped
    for before, after in report.errors.values():
        assert after < before
    compensated = torchdkm.finalize(prepared)
    with torch.no_grad():
        want = dense(held_out)
        assert (compensated(held_out) - want).square().mean() < (plain(held_out) - want).square().mean()
    assert "output error" in str(report)


def test_inputs_from_the_snapped_model_and_a_generator_calibration():
    """Without ``reference`` the layers' inputs come from the model itself (eval mode, snapped weights), and a
    generator calibration (what ``fisher`` takes) is run to its end, once per stage."""
    dense = mlp()
    batches = [correlated(64, 48, s) for s in range(3)]
    prepared = torchdkm.prepare(copy.deepcopy(dense), torchdkm.DKMConfig.parse("fc:2/1", min_numel=0), progress=False)
    prepared.train()

    def losses(m):
        for b in batches:
            yield m(b).square().mean()

    passes = []
    prepared[0].register_forward_pre_hook(lambda *_: passes.append(1))
    report = gptq(prepared, losses, stages=2)
    assert prepared.training  # its mode is restored
    assert len(passes) == 2 * len(batches)
    assert all(after < before for before, after in report.errors.values())


def test_tied_tensors_and_layers_it_does_not_compensate_are_listed_with_the_reason(make_tiednet):
    """A tied tensor is compensated once, for its Linear holder's inputs (the embedding shares it); with
    ``tied=False`` it keeps its weights.  Grouped convolutions keep theirs.  The report says which and why."""
    tokens = torch.randint(0, 40, (8, 5), generator=torch.Generator().manual_seed(1))
    config = torchdkm.DKMConfig.parse("fc:2/1, emb:2/1", min_numel=0)
    prepared = torchdkm.prepare(make_tiednet(), config, progress=False)
    before = prepared.emb.parametrizations.weight.original.clone()
    report = gptq(prepared, lambda m: m(tokens))
    assert set(report.errors) == {"fc.weight", "out.weight"}
    assert report.skipped == {"emb.weight": "tied: compensated as 'out.weight'"}
    assert not torch.equal(prepared.emb.parametrizations.weight.original, before)
    assert prepared.emb.parametrizations.weight.original is prepared.out.parametrizations.weight.original
    prepared = torchdkm.prepare(make_tiednet(), config, progress=False)
    report = gptq(prepared, lambda m: m(tokens), tied=False)
    assert set(report.errors) == {"fc.weight"} and set(report.skipped.values()) == {"tied (tied=False)"}
    assert torch.equal(prepared.emb.parametrizations.weight.original, before)
    only_tied = torchdkm.prepare(make_tiednet(), torchdkm.DKMConfig.parse("emb:2/1", min_numel=0), progress=False)
    assert set(gptq(copy.deepcopy(only_tied), lambda m: m(tokens)).errors) == {"out.weight"}
    with pytest.raises(TorchdkmError, match="no layer to compensate.*tied=False"):
        gptq(only_tied, lambda m: m(tokens), tied=False)
    torch.manual_seed(0)
    convs = nn.Sequential(nn.Conv2d(3, 8, 3), nn.Conv2d(8, 8, 3, groups=8, padding=1))
    prepared = torchdkm.prepare(convs, torchdkm.DKMConfig.parse("cv:2/1", min_numel=0), progress=False)
    report = gptq(prepared, lambda m: m(torch.randn(2, 3, 9, 9)))
    assert set(report.errors) == {"0.weight"} and report.skipped == {"1.weight": "a grouped convolution"}


@pytest.mark.parametrize("config", ["cv:2/1", "cv:3/3#9a", "cv:2/3"])
def test_convolutions_and_vectors_are_compensated_on_their_patches(config):
    """A Conv2d's rows multiply its input's patches (unfold): GPTQ on them, sequentially (the second layer
    compensated for the first one's compensated outputs), lowers the held-out output error, with scalars,
    vectors along the row and block scales."""
    torch.manual_seed(3)
    dense = nn.Sequential(nn.Conv2d(4, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 8, 3, stride=2))
    base = torch.randn(1, 4, 12, 12)
    sample = lambda seed: base + 0.3 * torch.randn(16, 4, 12, 12, generator=torch.Generator().manual_seed(seed))  # noqa: E731
    config = torchdkm.DKMConfig.parse(config, min_numel=0)
    plain = torchdkm.finalize(torchdkm.prepare(copy.deepcopy(dense), config, progress=False))
    prepared = torchdkm.prepare(copy.deepcopy(dense), config, progress=False)
    report = gptq(prepared, lambda m: m(sample(1)), stages=2)
    assert set(report.errors) == {"0.weight", "2.weight"}
    assert all(after < before for before, after in report.errors.values())
    compensated, held_out = torchdkm.finalize(prepared), sample(2)
    with torch.no_grad():
        want = dense(held_out)
        assert (compensated(held_out) - want).square().mean() < (plain(held_out) - want).square().mean()


def test_bad_arguments_are_named():
    prepared = torchdkm.prepare(mlp(), torchdkm.DKMConfig.parse("fc:2/1", min_numel=0), progress=False)
    with pytest.raises(TorchdkmError, match="damp"):
        gptq(prepared, lambda m: m(correlated(8, 48, 0)), damp=0)
    with pytest.raises(TorchdkmError, match="never ran"):
        gptq(prepared, lambda m: None)
    for stages in (0, 1.5):
        with pytest.raises(TorchdkmError, match="stages"):
            gptq(prepared, lambda m: m(correlated(8, 48, 0)), stages=stages)
    with pytest.raises(TorchdkmError, match="stages"):
        gptq(prepared, lambda m: m(correlated(8, 48, 0)), reference=mlp(), stages=2)
    with pytest.raises(TorchdkmError, match="no module"):
        gptq(prepared, lambda m: m(correlated(8, 48, 0)), reference=nn.Sequential(nn.Linear(48, 64)))


@pytest.mark.parametrize("config", ["fc:3/1#16a", "fc:2/1#16", "fc:3/2#8a"])
def test_finalize_snaps_to_the_grid_gptq_rounded_to(config):
    """After ``gptq`` the weights' blocks derive the scales GPTQ used and ``finalize`` snaps each weight to the
    centroid GPTQ rounded it to: the decoded weight is the nearest grid value of the compensated weight."""
    dense = mlp()
    prepared = torchdkm.prepare(copy.deepcopy(dense), prepared_config(config), progress=False)
    gptq(prepared, lambda m: m(correlated(128, 48, 1)), reference=dense)
    layer = prepared[0].parametrizations.weight
    compensated, centroids, dim = layer.original.detach().clone(), layer[0].centroids[0].clone(), layer[0].config.dim
    blocks = layer[0].clusterer.scales
    normalised, scale, offset = blocks.normalise(compensated)
    vectors = normalised.reshape(-1, dim)
    nearest = centroids[(vectors[:, None, :] - centroids[None]).square().sum(-1).argmin(1)]
    want = blocks.apply(nearest.reshape(compensated.shape), scale, offset)
    decoded = torchdkm.finalize(prepared)[0].weight
    assert torch.allclose(decoded, want, rtol=0, atol=1e-6)
    assert not torch.allclose(decoded, torchdkm.finalize(torchdkm.prepare(copy.deepcopy(dense), prepared_config(config), progress=False))[0].weight)


def test_a_training_step_after_gptq_refreshes_the_centroids_again():
    """``finalize`` right after ``gptq`` snaps to GPTQ's centroids; once DKM trains, the usual refresh is back."""
    prepared = torchdkm.prepare(mlp(), prepared_config("fc:2/1"), progress=False)
    gptq(prepared, lambda m: m(correlated(64, 48, 1)))
    layer = prepared[0].parametrizations.weight[0]
    assert layer.refresh is False
    prepared.train()
    prepared(correlated(8, 48, 2)).square().mean().backward()
    assert layer.refresh is True


def test_a_tiny_gpt2_conv1d_and_llama_sequentially():
    """transformers' Conv1D (weight stored (in, out)) and a LLaMA's Linears, their tied head left as it was."""
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    gpt2 = transformers.GPT2LMHeadModel(transformers.GPT2Config(vocab_size=64, n_positions=32, n_embd=32, n_layer=2, n_head=2))
    llama = transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
        num_key_value_heads=1, tie_word_embeddings=True))  # fmt: skip
    tokens = torch.randint(0, 64, (8, 16), generator=torch.Generator().manual_seed(0))
    for model, kind in ((gpt2, "Conv1D"), (llama, "Linear")):
        dense = copy.deepcopy(model).eval()
        prepared = torchdkm.prepare(model, prepared_config("fc:3/1#16a, emb:3/1#16a"), progress=False)
        report = gptq(prepared, lambda m: m(input_ids=tokens), stages=3)
        assert len(report.errors) == (7 * 2 if kind == "Linear" else 4 * 2) + 1  # (the head)
        assert all(after < before for before, after in report.errors.values()), report
        head = "lm_head.weight"
        assert head in report.errors and list(report.skipped.values()).count(f"tied: compensated as {head!r}") == 1
        assert all(why.startswith("Embedding") for why in report.skipped.values() if "tied" not in why)
        compensated = torchdkm.finalize(prepared)
        assert type(compensated.get_submodule(next(iter(report.errors)).rsplit(".", 1)[0])).__name__ == f"Palettized{kind}"
        with torch.no_grad():
            assert torch.isfinite(compensated(input_ids=tokens).logits).all() and dense(input_ids=tokens).logits.shape
