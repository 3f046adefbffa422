"""The quick 1-bit Fashion-MNIST comparison, on synthetic images and an untrained model (seconds)."""

from __future__ import annotations

import json
from pathlib import Path

from experiments.fashion import load_fashion, synthetic_fashion
from experiments.fashion_models import MobileNetV1
from experiments.fashion_quick import METHODS, SCALAR_SETTING, VECTOR_SETTING, cli, compare, subset


def test_every_method_at_one_bit(tmp_path: Path) -> None:
    data = subset(load_fashion(synthetic_fashion(tmp_path / "data"), val_size=40), 128)
    assert len(data.y_train) == 128
    results = compare(
        MobileNetV1().eval(), data, model="mobilenet", steps=2, seed=0, out=tmp_path, name="q", lr=1e-3,
        coreml_seconds=60, progress=False, bn_batches=1,
    )  # fmt: skip
    rows = {(r.method, r.setting): r for r in results.records}
    for method in ("DKM", "k-means", "coremltools DKM"):
        assert rows[(method, VECTOR_SETTING)].bits_per_weight == 1
    for method in ("DKM", "k-means", "uniform PTQ", "uniform QAT"):
        assert rows[(method, SCALAR_SETTING)].bits_per_weight == 1
    # coremltools cannot cut fc's 10 output channels into 4-vectors: fc stays dense, on both sides of the match
    coreml, matched = rows[("coremltools DKM", VECTOR_SETTING)], rows[(METHODS[1], VECTOR_SETTING)]
    assert "left dense by coremltools: fc" in coreml.note and matched.note.endswith("fc:none")
    assert coreml.bytes == matched.bytes > rows[("DKM", VECTOR_SETTING)].bytes
    assert rows[("DKM", VECTOR_SETTING)].steps == 2 and rows[("DKM", VECTOR_SETTING)].factor > 8
    saved = json.loads((tmp_path / "q.json").read_text())
    assert len(saved["records"]) == len(results.records)
    assert "uniform QAT" in (tmp_path / "q.md").read_text()
    assert all("accuracy_bn" in r.metrics for r in results.records if r.method != "fp32")
    assert "re-estimating their BatchNorm statistics on 1 training batches" in (tmp_path / "q.md").read_text()


def test_batchnorm_statistics_are_re_estimated_on_a_copy() -> None:
    import torch
    from torch import nn

    from experiments.vision import Options, scores

    class Data:
        x_train = torch.randn(256, 3)
        y_train = (x_train[:, 0] > 0).long()
        x_test, y_test = x_train, y_train

    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.ReLU(), nn.Linear(4, 2))
    model[1].running_mean.fill_(100.0)  # statistics of other weights: every unit off
    found = scores(model, Data(), Options(bn_batches=2))
    assert set(found) == {"accuracy", "accuracy_bn"} and float(model[1].running_mean[0]) == 100.0
    assert scores(model, Data()) == {"accuracy": found["accuracy"]}
    assert scores(nn.Linear(3, 2), Data(), Options(bn_batches=2)).keys() == {"accuracy"}


def test_cli_needs_the_fp32_weights(tmp_path: Path, capsys) -> None:
    assert cli(["--checkpoints", str(tmp_path), "--out", str(tmp_path)]) == 2
    assert "run `python -m experiments.fashion_fp32` first" in capsys.readouterr().err
