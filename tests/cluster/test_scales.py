"""Per-block scales (``scale_block``): exact round trips, the gradient through the normalisation, the file."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from torch import nn
from torch.autograd import gradcheck

import torchdkm
from torchdkm import DKMConfig, LayerConfig, TorchdkmError
from torchdkm.cluster import WeightClusterer
from torchdkm.cluster import clusterer as clusterer_module
from torchdkm.cluster import scales as scales_module
from torchdkm.cluster.scales import BlockScales

F64 = torch.float64
DATA = Path(__file__).resolve().parents[1] / "data"


def heavy_tailed(rows: int, cols: int, seed: int = 0) -> torch.Tensor:
    """Rows whose scales span three orders of magnitude, with outliers: what language-model weights look like."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(rows, cols, generator=g) * torch.logspace(-3, 0, rows)[:, None]
    w[:, ::11] *= 8
    return w


def test_block_stats_and_apply():
    blocks = BlockScales.of((2, 7), 3, False)  # blocks of 3, 3 and a short 1
    assert blocks.shape == (2, 3) and blocks.stored_bytes == 2 * 3 * 2
    w = torch.tensor([[1.0, -4.0, 2.0, 0.5, 0.25, -0.5, 3.0], [0.0, 0.0, 0.0, 1.0, 2.0, 3.0, -6.0]])
    n, s, o = blocks.normalise(w)
    assert o is None and s.tolist() == [[4.0, 0.5, 3.0], [0.0, 3.0, 6.0]]
    assert n[1, :3].tolist() == [0.0, 0.0, 0.0]  # a block of zeros: scale 0, normalised to 0, decodes to 0
    assert torch.equal(blocks.apply(n, s, o), w)
    asym = BlockScales.of((2, 7), 3, True)
    n, s, o = asym.normalise(w)
    assert s[0].tolist() == [3.0, 0.5, 0.0] and o[0].tolist() == [-1.0, 0.0, 3.0]
    assert n.abs().max() <= 1.0
    assert torch.allclose(asym.apply(n, s, o), w)
    assert BlockScales.of((4, 5), 0, False).shape == (4, 1)  # one block per row
    assert BlockScales.of((4, 5), None, False) is None


def test_scales_are_float16_values_in_training_too():
    blocks = BlockScales.of((3, 64), 32, True)
    w = torch.randn(3, 64, dtype=F64) * 0.1234567
    _, s, o = blocks.normalise(w)
    assert torch.equal(s, s.half().double()) and torch.equal(o, o.half().double())


SETTINGS = [  # (bits, dim, block, offset): blocks that divide the row and blocks that do not (rows of 70)
    (bits, 1, block, offset) for bits in (1, 2, 3, 4, 8) for block in (7, 32, 0) for offset in (False, True)
] + [(3, 2, 6, False), (4, 2, 32, True), (2, 4, 8, True)]


@pytest.mark.parametrize(("bits", "dim", "block", "offset"), SETTINGS)
def test_round_trip_is_bit_exact(tmp_path, bits, dim, block, offset):
    """prepare -> eval weight == finalize weight == reloaded weight, bit for bit, for every bits/block setting."""
    torch.manual_seed(bits * 100 + block)
    model = nn.Sequential(nn.Linear(70, 12), nn.ReLU(), nn.Linear(12, 4))
    with torch.no_grad():
        model[0].weight.copy_(heavy_tailed(12, 70, seed=bits))
    config = LayerConfig(bits=bits, dim=dim, scale_block=block, scale_offset=offset, min_numel=0, top_m=None)
    torchdkm.prepare(model, DKMConfig(default=config))
    model.eval()
    snapped = model[0].weight.detach().clone()
    x = torch.randn(5, 70)
    expected = model(x)
    final = torchdkm.finalize(model)
    assert torch.equal(final[0].weight, snapped)
    # the output: the LUT kernel's, from the packed weight and scales (float32 sums in another order)
    torch.testing.assert_close(final(x), expected, rtol=1e-5, atol=1e-6)
    path = tmp_path / "m.dkm.safetensors"
    torchdkm.save(final, path)
    fresh = torchdkm.load(path, nn.Sequential(nn.Linear(70, 12), nn.ReLU(), nn.Linear(12, 4)))
    assert torch.equal(fresh[0].weight, snapped) and torch.equal(fresh(x), final(x))
    rows = torchdkm.report(fresh, show=False).layers
    blocks = -(-70 // (block or 70))
    assert rows[0].scale_bytes == 12 * blocks * 2 * (2 if offset else 1)


def test_scales_follow_outlier_rows_better_than_one_lut():
    """On rows three orders of magnitude apart, block scales cut the snapped weight's error several times."""
    w = heavy_tailed(32, 128, seed=4)
    errors = {}
    for block in (None, 32):
        c = WeightClusterer("l", LayerConfig(bits=3, min_numel=0, scale_block=block), w.shape)
        snapped = c.snap(w, c.init(w))
        errors[block] = float(((snapped - w).norm(dim=1) / w.norm(dim=1)).mean())  # mean relative error per row
    assert errors[32] < 0.3 * errors[None], errors


@pytest.mark.parametrize("offset", [False, True])
def test_gradient_through_the_normalisation_matches_finite_differences(monkeypatch, offset):
    """float64, scales unrounded (float16 rounding is straight through by design): the exact gradient."""
    monkeypatch.setattr(scales_module, "STORED", F64)
    shape = (4, 10)
    config = LayerConfig(
        bits=2, scale_block=4, scale_offset=offset, min_numel=0, tau=0.5, max_iters=3000, tol=1e-13,
        cluster_dtype="exact", top_m=None,
    )  # fmt: skip
    c = WeightClusterer("l", config, shape)
    weight = torch.randn(shape, generator=torch.Generator().manual_seed(int(offset)), dtype=F64)
    c0 = c.init(weight)
    real, frozen = clusterer_module.margin, {}

    def margin(x, m, cs, rows, two=None):  # the temperature held at its first value (a constant of the step)
        if "value" not in frozen:
            frozen["value"] = real(x, m, cs, rows, two)
        return frozen["value"]

    monkeypatch.setattr(clusterer_module, "margin", margin)
    weight.requires_grad_(True)
    assert gradcheck(lambda w: c.soft(w, c0).weight, (weight,), eps=1e-6, atol=1e-6, rtol=1e-5)


def test_training_reaches_the_weights_through_the_scales():
    model = nn.Sequential(nn.Linear(64, 8))
    torchdkm.prepare(model, "fc:2/1#16a")
    model(torch.randn(4, 64)).pow(2).sum().backward()
    grad = model[0].parametrizations.weight.original.grad
    assert grad is not None and bool(torch.isfinite(grad).all()) and bool(grad.abs().sum() > 0)


def test_config_and_shorthand():
    rules = DKMConfig.parse("fc:3/1#32a, cv:4/2@8#row, emb:4/1#64").by_type
    assert (rules["fc"].scale_block, rules["fc"].scale_offset) == (32, True)
    assert (rules["cv"].group_size, rules["cv"].scale_block, rules["cv"].scale_offset) == (8, 0, False)
    assert rules["emb"].scale_block == 64 and DKMConfig.from_dict(DKMConfig.parse("fc:3/1#32a").to_dict())
    with pytest.raises(TorchdkmError, match="scale_block.*multiple of dim=4"):
        LayerConfig(dim=4, scale_block=6)
    with pytest.raises(TorchdkmError, match="scale_offset.*needs scale_block"):
        LayerConfig(scale_offset=True)
    with pytest.raises(TorchdkmError, match="scale_block"):
        LayerConfig(scale_block=-1)


def test_a_scale_beyond_float16_is_refused_naming_the_layer():
    w = torch.randn(4, 32)
    w[2, 5] = 1e5
    c = WeightClusterer("encoder.fc", LayerConfig(scale_block=8, min_numel=0), w.shape)
    with pytest.raises(TorchdkmError, match="'encoder.fc'.*float16"):
        c.init(w)


def test_files_of_format_version_1_still_load():
    """A file written by torchdkm before block scales (format version 1) loads and computes what it did."""
    model = nn.Sequential(nn.Linear(12, 8), nn.ReLU(), nn.Linear(8, 5))
    loaded = torchdkm.load(DATA / "format_v1.safetensors", model)
    reference = torch.load(DATA / "format_v1_outputs.pt")
    torch.testing.assert_close(loaded(reference["x"]), reference["y"], rtol=1e-5, atol=1e-6)  # (the LUT kernel)
    assert loaded[0].palette["weight"].scale_block is None


@pytest.mark.parametrize(
    ("change", "needle"),
    [
        (lambda t: t.update({"0.weight_scales": t["0.weight_scales"].float()}), "weight_scales should be float16"),
        (lambda t: t.update({"0.weight_scales": t["0.weight_scales"][:, :1]}), "weight_scales should be float16"),
        (lambda t: t.update({"0.weight_scales": t["0.weight_scales"] * float("inf")}), "weight_scales hold NaN/Inf"),
        (lambda t: t.pop("0.weight_scales"), "weight_scales missing"),
        (lambda t: t.pop("0.weight_offsets"), "weight_offsets missing"),
    ],
)
def test_missing_or_bad_scales_in_a_file_are_named(tmp_path, change, needle):
    from safetensors.torch import save_file

    from torchdkm.io.format import checksum, read

    final = torchdkm.finalize(torchdkm.prepare(nn.Sequential(nn.Linear(64, 8)), "fc:2/1#16a"))
    torchdkm.save(final, tmp_path / "m.dkm.safetensors")
    meta, tensors = read(tmp_path / "m.dkm.safetensors")
    change(tensors)
    meta["checksum"] = checksum({k: v.contiguous() for k, v in tensors.items()})
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp_path / "bad.safetensors"),
              metadata={"torchdkm": json.dumps(meta)})  # fmt: skip
    with pytest.raises(TorchdkmError, match=needle):
        torchdkm.load(tmp_path / "bad.safetensors", nn.Sequential(nn.Linear(64, 8)))
