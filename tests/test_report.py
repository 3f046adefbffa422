"""Size accounting: per-layer rows, totals, compression factor and the train/export gap."""

from __future__ import annotations

import math

import pytest
import torch

import torchdkm
from torchdkm import DKMConfig, LayerConfig
from torchdkm.nn.parametrization import dkm_parametrizations
from torchdkm.report import Report

CONFIG = DKMConfig.parse("cv:4/2, fc:3/4@8", min_numel=0)


def expected_row_bytes(shape, bits, dim, group_size, itemsize):
    """Index and LUT bytes from first principles."""
    out, row = shape[0], math.prod(shape[1:])
    group_size = min(group_size or out, out)
    groups = -(-out // group_size)
    vectors = -(-(group_size * row) // dim)
    return -(-(groups * vectors * bits) // 8), groups * 2**bits * dim * itemsize


def check_totals(rep: Report, model_fp32_values: int):
    assert rep.compressed_bytes == sum(r.index_bytes + r.lut_bytes for r in rep.layers) + sum(
        b for _, _, b in rep.uncompressed
    )
    assert rep.fp32_bytes == 4 * model_fp32_values
    assert rep.factor == pytest.approx(rep.fp32_bytes / rep.compressed_bytes)
    data = rep.to_dict()
    assert data["compressed_bytes"] == rep.compressed_bytes and data["fp32_bytes"] == rep.fp32_bytes
    assert data["factor"] == pytest.approx(rep.factor)
    assert len(data["layers"]) == len(rep.layers) and len(data["uncompressed"]) == len(rep.uncompressed)


def numel_of(model):
    return sum(p.numel() for p in model.parameters()) + sum(b.numel() for b in model.buffers())


@pytest.mark.parametrize("stage", ["prepared", "finalized"])
def test_rows_and_totals(make_convnet, stage):
    dense = make_convnet()
    values = sum(p.numel() for p in dense.parameters())
    model = torchdkm.prepare(make_convnet(), CONFIG)
    if stage == "finalized":
        model = torchdkm.finalize(model)
    rep = torchdkm.report(model, show=False)
    assert [r.name for r in rep.layers] == ["conv1.weight", "conv2.weight", "fc.weight", "head.weight"]
    specs = {"conv1": (4, 2, None), "conv2": (4, 2, None), "fc": (3, 4, 8), "head": (3, 4, 8)}
    for row in rep.layers:
        module = row.name.rsplit(".", 1)[0]
        bits, dim, group = specs[module]
        shape = tuple(dense.get_submodule(module).weight.shape)
        assert (row.shape, row.bits, row.dim, row.k) == (shape, bits, dim, 2**bits)
        assert (row.index_bytes, row.lut_bytes) == expected_row_bytes(shape, bits, dim, group, 4)
        assert row.bytes == row.index_bytes + row.lut_bytes
        assert row.bits_per_weight == bits / dim and row.numel == math.prod(shape)
    assert sorted(n for n, _, _ in rep.uncompressed) == ["conv1.bias", "conv2.bias", "fc.bias", "head.bias"]
    for _, shape, size in rep.uncompressed:
        assert size == 4 * math.prod(shape)
    check_totals(rep, values)
    assert rep.factor > 4


def test_prepared_and_finalized_reports_agree(make_mixednet):
    config = DKMConfig.parse("emb:3/5@7, cv:2/4, fc:4", min_numel=0)
    model = torchdkm.prepare(make_mixednet(), config)
    before = torchdkm.report(model, show=False, gap=False).to_dict()
    after = torchdkm.report(torchdkm.finalize(model), show=False).to_dict()
    assert before == after
    check_totals(torchdkm.report(model, show=False), numel_of(make_mixednet()))


def test_tied_weight_left_dense_is_counted(make_tiednet):
    """The output layer shares the embedding matrix; the embedding is clustered, the output keeps it dense."""
    values = sum(p.numel() for p in make_tiednet().parameters()) + 40 * 16  # the shared matrix, stored twice
    config = DKMConfig(default=LayerConfig(bits=3, min_numel=0), by_name={"out": None})
    model = torchdkm.prepare(make_tiednet(), config)
    prepared = torchdkm.report(model, show=False, gap=False)
    finalized = torchdkm.report(torchdkm.finalize(model), show=False)
    assert "out.weight" in [n for n, _, _ in finalized.uncompressed]
    check_totals(finalized, values)
    assert prepared.to_dict() == finalized.to_dict()


def test_gap_is_reported_for_prepared_models_only(make_convnet):
    model = torchdkm.prepare(make_convnet(), CONFIG)
    rep = torchdkm.report(model, show=False)
    assert all(r.gap is not None and 0 <= r.gap < 0.05 for r in rep.layers)
    assert all(r.gap is None for r in torchdkm.report(model, show=False, gap=False).layers)
    assert all(r.gap is None for r in torchdkm.report(torchdkm.finalize(model), show=False).layers)


def test_gap_is_small_for_tiny_tau_and_grows_with_tau(make_convnet):
    gaps = {}
    for tau in (1e-6, 0.05, 1.0):
        config = DKMConfig.parse("cv:4/2, fc:3", min_numel=0, tau=tau)
        model = torchdkm.prepare(make_convnet(), config)
        gaps[tau] = [r.gap for r in torchdkm.report(model, show=False).layers]
    assert max(gaps[1e-6]) < 1e-3
    for small, large in zip(gaps[0.05], gaps[1.0]):
        assert small < large


def test_report_does_not_move_centroids(make_convnet):
    model = torchdkm.prepare(make_convnet(), CONFIG)
    before = [p.centroids.clone() for _, _, _, p in dkm_parametrizations(model)]
    torchdkm.report(model, show=False)
    for b, (_, _, _, p) in zip(before, dkm_parametrizations(model)):
        assert torch.equal(b, p.centroids)


def test_half_precision_luts_are_counted_at_their_size():
    model = torch.nn.Sequential(torch.nn.Linear(32, 16)).to(torch.float16)
    model = torchdkm.finalize(torchdkm.prepare(model, DKMConfig.parse("*:3", min_numel=0)))
    rep = torchdkm.report(model, show=False)
    assert rep.layers[0].lut_bytes == 8 * 2
    assert rep.uncompressed == [("0.bias", (16,), 32)]
    assert rep.fp32_bytes == 4 * (32 * 16 + 16)


def test_show_prints_the_table(make_convnet, capsys):
    model = torchdkm.finalize(torchdkm.prepare(make_convnet(), CONFIG))
    torchdkm.report(model, show=False)
    assert capsys.readouterr().out == ""
    rep = torchdkm.report(model)
    out = capsys.readouterr().out
    assert out.strip() == str(rep).strip()
    for name in ("conv1.weight", "fc.weight", "factor", f"{rep.compressed_bytes:,}"):
        assert name in out


def test_bits_per_weight_is_weighted_by_layer_size(make_convnet):
    model = torchdkm.prepare(make_convnet(), DKMConfig.parse("cv:4/1, fc:6/2", min_numel=0))
    rows = torchdkm.report(model, gap=False, show=False).layers
    expected = sum(r.bits / r.dim * r.numel for r in rows) / sum(r.numel for r in rows)
    assert torchdkm.report(model, gap=False, show=False).bits_per_weight == pytest.approx(expected)
    assert 3 < expected < 4 and Report().bits_per_weight == 32.0
