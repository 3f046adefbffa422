"""Fashion-MNIST: the IDX loader and its errors, the two models, and fp32 training on synthetic images (seconds).

The real data (Debian's ``dataset-fashion-mnist``) is read by one test only,
skipped when the package is not installed; everything else runs on tiny
synthetic IDX files written by :func:`experiments.fashion.synthetic_fashion`.
"""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import pytest
import torch

from experiments.fashion import (
    DATA_DIR,
    FILES,
    IMAGES_MAGIC,
    LABELS_MAGIC,
    IDXError,
    load_fashion,
    read_idx,
    synthetic_fashion,
    write_idx,
)
from experiments.fashion_fp32 import Options, cli, run
from experiments.fashion_models import BasicBlock, MobileNetV1, ResNet, parameter_count


def test_read_idx_round_trip(tmp_path: Path) -> None:
    images = torch.randint(0, 256, (7, 28, 28), dtype=torch.uint8)
    assert torch.equal(read_idx(write_idx(tmp_path / "x.gz", images), IMAGES_MAGIC), images)
    labels = torch.tensor([0, 9, 3], dtype=torch.uint8)
    assert torch.equal(read_idx(write_idx(tmp_path / "y.gz", labels), LABELS_MAGIC), labels)


def test_read_idx_errors_name_the_path(tmp_path: Path) -> None:
    missing = tmp_path / "nothing.gz"
    with pytest.raises(FileNotFoundError, match="apt-get install dataset-fashion-mnist") as error:
        read_idx(missing, IMAGES_MAGIC)
    assert str(missing) in str(error.value)
    labels = write_idx(tmp_path / "labels.gz", torch.zeros(5, dtype=torch.uint8))
    with pytest.raises(IDXError, match=r"labels\.gz: IDX magic number 0x00000801, expected 0x00000803"):
        read_idx(labels, IMAGES_MAGIC)  # labels where images belong
    raw = gzip.decompress(write_idx(tmp_path / "cut.gz", torch.zeros(4, 28, 28)).read_bytes())
    (tmp_path / "cut.gz").write_bytes(gzip.compress(raw[:-10]))
    with pytest.raises(IDXError, match=r"cut\.gz: header says shape \(4, 28, 28\)"):
        read_idx(tmp_path / "cut.gz", IMAGES_MAGIC)
    (tmp_path / "plain.gz").write_bytes(b"not gzip at all")
    with pytest.raises(IDXError, match="not a readable gzip file"):
        read_idx(tmp_path / "plain.gz", IMAGES_MAGIC)


def test_load_checks_shapes_and_pairs(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="directory not found.*apt-get install dataset-fashion-mnist"):
        load_fashion(tmp_path / "absent")
    synthetic_fashion(tmp_path)
    write_idx(tmp_path / FILES["test"][1], torch.zeros(49, dtype=torch.uint8))
    with pytest.raises(IDXError, match="50 test images but 49 labels"):
        load_fashion(tmp_path, val_size=20)
    write_idx(tmp_path / FILES["test"][0], torch.zeros(49, 32, 32))
    with pytest.raises(IDXError, match="images of \\(32, 32\\), expected 28x28"):
        load_fashion(tmp_path, val_size=20)


def test_split_is_fixed_disjoint_and_normalised(tmp_path: Path) -> None:
    synthetic_fashion(tmp_path)
    data = load_fashion(tmp_path, val_size=40)
    assert data.sizes() == {"train": 160, "val": 40, "test": 50}
    assert data.x_train.shape == (160, 1, 28, 28) and data.x_test.shape == (50, 1, 28, 28)
    assert abs(float(data.x_train.mean())) < 1e-4 and abs(float(data.x_train.std()) - 1) < 1e-3
    again = load_fashion(tmp_path, val_size=40)
    assert again.fingerprint == data.fingerprint  # the split does not depend on any global seed
    other = load_fashion(tmp_path, val_size=40, split_seed=1)
    assert other.fingerprint != data.fingerprint
    # no validation image is also a training image (the synthetic images are all distinct)
    train_rows = {tuple(row.tolist()) for row in data.x_train.flatten(1)[:, :40]}
    assert not any(tuple(row.tolist()) in train_rows for row in data.x_val.flatten(1)[:, :40])
    with pytest.raises(ValueError, match="val_size 200"):
        load_fashion(tmp_path, val_size=200)


@pytest.mark.skipif(not DATA_DIR.is_dir(), reason="Debian's dataset-fashion-mnist is not installed")
def test_real_fashion_mnist() -> None:
    data = load_fashion()
    assert data.sizes() == {"train": 55_000, "val": 5_000, "test": 10_000}
    assert torch.equal(torch.bincount(data.y_test), torch.full((10,), 1000))
    assert data.fingerprint == "37b5389fd0104d66"


@pytest.mark.parametrize(("model", "low", "high"), [(MobileNetV1, 50_000, 300_000), (ResNet, 100_000, 300_000)])
def test_models_shapes_and_sizes(model, low: int, high: int) -> None:
    net = model().eval()
    assert net(torch.randn(3, 1, 28, 28)).shape == (3, 10)
    assert low < parameter_count(net) < high
    assert any(isinstance(m, torch.nn.BatchNorm2d) for m in net.modules())


def test_mobilenet_is_depthwise_separable() -> None:
    net = MobileNetV1()
    depthwise = [m for m in net.modules() if isinstance(m, torch.nn.Conv2d) and m.groups > 1]
    assert len(depthwise) == 5 and all(m.groups == m.in_channels == m.out_channels for m in depthwise)
    pointwise = sum(m.weight.numel() for n, m in net.named_modules() if n.endswith("pointwise.0"))
    assert pointwise > 0.8 * parameter_count(net)  # the paper's hard case: nearly all weights are 1x1


def test_resnet_blocks_and_shortcuts() -> None:
    net = ResNet()
    blocks = [m for m in net.modules() if isinstance(m, BasicBlock)]
    assert len(blocks) == 6
    assert sum(not isinstance(b.shortcut, torch.nn.Identity) for b in blocks) == 3  # each stage's first block


def test_one_epoch_of_training_on_synthetic_images(tmp_path: Path) -> None:
    data = load_fashion(synthetic_fashion(tmp_path / "data"), val_size=40)
    opts = Options(
        models=("mobilenet", "resnet"),
        max_epochs=1,
        batch_size=32,
        out=tmp_path / "results",
        checkpoints=tmp_path / "out",
        progress=False,
    )
    runs = run(opts, data)
    assert [(r.model, r.epochs, r.best_epoch, r.stopped_by) for r in runs] == [
        ("mobilenet", 1, 1, "max_epochs"),
        ("resnet", 1, 1, "max_epochs"),
    ]
    assert all(0 <= r.test_accuracy <= 1 and r.history[0]["train_loss"] > 0 for r in runs)
    saved = json.loads((tmp_path / "results" / "fashion_fp32.json").read_text())
    assert [r["model"] for r in saved["runs"]] == ["mobilenet", "resnet"]
    assert saved["data"]["fingerprint"] == data.fingerprint
    assert "| mobilenet | 0 |" in (tmp_path / "results" / "fashion_fp32.md").read_text()
    reloaded = MobileNetV1()
    reloaded.load_state_dict(torch.load(tmp_path / "out" / "fashion_mobilenet_s0.pt"))


def test_plateau_stops_and_keeps_the_best_epoch(tmp_path: Path) -> None:
    """With a zero learning rate nothing improves after epoch 1: patience 2 stops at epoch 3, best epoch 1."""
    data = load_fashion(synthetic_fashion(tmp_path / "data"), val_size=40)
    opts = Options(
        models=("mobilenet",), lr=0.0, max_epochs=10, patience=2, batch_size=64, out=tmp_path, checkpoints=None
    )
    (trained,) = run(opts, data)
    assert (trained.epochs, trained.best_epoch) == (3, 1) and trained.stopped_by.startswith("plateau")


def test_cli_reports_missing_data(tmp_path: Path, capsys) -> None:
    assert cli(["--data-dir", str(tmp_path / "absent"), "--out", str(tmp_path), "--no-progress"]) == 2
    assert "apt-get install dataset-fashion-mnist" in capsys.readouterr().err
