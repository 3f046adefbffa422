"""The Fashion-MNIST ablation of DKM's options, on synthetic images and an untrained model (seconds)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from experiments.baselines import CoremlDKM, unpalettized
from experiments.fashion import load_fashion, synthetic_fashion
from experiments.fashion_ablation import DEFAULT, SETTLED, VARIANTS, cli, readme_table, summaries
from experiments.fashion_models import MobileNetV1
from experiments.vision import loss_fn


@pytest.fixture
def run_args(tmp_path: Path) -> list[str]:
    """Synthetic images, an untrained MobileNet as the fp32 checkpoint: the arguments every run here shares."""
    data = synthetic_fashion(tmp_path / "data", n_train=5100, n_test=40)
    torch.manual_seed(0)
    torch.save(MobileNetV1().state_dict(), tmp_path / "fashion_mobilenet_s0.pt")
    return ["--model", "mobilenet", "--data-dir", str(data), "--checkpoints", str(tmp_path), "--out", str(tmp_path),
            "--no-progress", "--threads", "1"]  # fmt: skip


def test_variants_run_and_are_tabled_per_seed(tmp_path: Path, run_args: list[str]) -> None:
    only = ["1/1 scale+offset, ST", "4/4, ST, schedule", "1/1 uniform QAT", "4/4 coremltools scale", "4/4, ST, Fisher"]
    assert cli([*run_args, "--steps", "2", "--seeds", "0", "1", "--only", *only]) == 0
    saved = json.loads((tmp_path / "fashion_ablation_mobilenet.json").read_text())
    records = [r for r in saved["records"] if r["method"] != "fp32"]
    assert sorted({r["method"] for r in records}) == sorted(only)
    assert sorted(r["seed"] for r in records) == [0] * 5 + [1] * 5
    st = next(r for r in records if r["method"] == only[0])
    assert "straight_through=1.0" in st["note"] and st["steps"] == 2 and st["bits_per_weight"] == 1
    assert "tau 0.05 to 0.002" in next(r for r in records if r["method"] == only[1])["note"]
    assert "Fisher-weighted centroids (16 batches)" in next(r for r in records if r["method"] == only[4])["note"]
    table = (tmp_path / "fashion_ablation_mobilenet.md").read_text()
    assert "fine-tuning seeds 0, 1" in table
    assert all(f"| {label} |" in table for label in only)
    assert sum(line.startswith("| ") for line in table.splitlines()) == 1 + len(only)
    saved = tmp_path / "fashion_ablation_mobilenet.json"
    both = readme_table({"mobilenet": saved, "again": saved})
    assert both.count("| 1/1 scale+offset, ST | 1 | ") == 1 and "± " in both and "again factor" in both


def test_dkm_from_a_gptq_start(tmp_path: Path, run_args: list[str]) -> None:
    """The GPTQ rows compensate the convolutions GPTQ takes (not MobileNet's depthwise ones) before training."""
    label = "4/4, ST, Fisher, classifier dense, 1 term, GPTQ"
    assert cli([*run_args, "--steps", "2", "--seeds", "0", "--only", label]) == 0
    record = next(r for r in json.loads((tmp_path / "fashion_ablation_mobilenet.json").read_text())["records"]
                  if r["method"] == label)  # fmt: skip
    assert "GPTQ start (16 batches, sequential)" in record["note"] and "GPTQ start: output error " in record["note"]


ROOT = Path(__file__).resolve().parents[2]


def test_a_plan_to_qat_size_is_no_larger_than_qat(tmp_path: Path, run_args: list[str]) -> None:
    only = ["1/1 uniform QAT", "4/4, ST, Fisher, planned to QAT's size"]
    assert cli([*run_args, "--steps", "2", "--seeds", "0", "--only", *only]) == 0
    records = {r["method"]: r for r in json.loads((tmp_path / "fashion_ablation_mobilenet.json").read_text())["records"]}
    qat, planned = records[only[0]], records[only[1]]
    assert planned["bytes"] <= qat["bytes"]
    assert "plan: " in planned["note"] and "planned to the size of uniform `cv:1/1, fc:1/1`" in planned["note"]


def test_readme_quotes_the_stored_results() -> None:
    """README's Fashion-MNIST table is what ``--readme`` renders from ``results/fashion_ablation_*.json``."""
    paths = {m: ROOT / "results" / f"fashion_ablation_{m}.json" for m in ("mobilenet", "resnet")}
    assert readme_table(paths) in (ROOT / "README.md").read_text()


def test_more_seeds_are_appended_to_an_earlier_run(tmp_path: Path, run_args: list[str]) -> None:
    base = [*run_args, "--steps", "1"]
    assert cli([*base, "--seeds", "0", "--only", "1/1", "4/4"]) == 0
    assert cli([*base, "--seeds", "1", "--only", "1/1", "--append"]) == 0
    saved = json.loads((tmp_path / "fashion_ablation_mobilenet.json").read_text())
    assert [(r["method"], r["seed"]) for r in saved["records"]] == [("fp32", 0), ("1/1", 0), ("4/4", 0), ("1/1", 1)]
    assert saved["config"]["seeds"] == [0, 1]
    assert cli([*base, "--seeds", "0", "1", "--only", "4/4", "--append"]) == 0  # 4/4 at seed 0 again, and at 1
    saved = json.loads((tmp_path / "fashion_ablation_mobilenet.json").read_text())
    assert [(r["method"], r["seed"]) for r in saved["records"]] == [
        ("fp32", 0), ("1/1", 0), ("1/1", 1), ("4/4", 0), ("4/4", 1)
    ]
    with pytest.raises(SystemExit, match="steps=1"):
        cli([*run_args, "--steps", "2", "--seeds", "2", "--only", "1/1", "--append"])


def test_unknown_variant_is_refused(tmp_path: Path) -> None:
    with pytest.raises(SystemExit):
        cli(["--only", "no such variant", "--checkpoints", str(tmp_path)])


def test_default_run_is_the_head_of_the_list() -> None:
    labels = [v.label for v in VARIANTS]
    assert len(set(labels)) == len(labels) and 0 < DEFAULT < SETTLED < len(VARIANTS)
    assert {v.method for v in VARIANTS[:DEFAULT]} == {"DKM", "uniform QAT", "coremltools DKM"}


def test_readme_rows_are_the_default_and_settled_variants() -> None:
    """Every row of README's table is a variant that ``--settled`` runs, and each of those has a row."""
    rows = summaries(ROOT / "results" / "fashion_ablation_resnet.json")
    assert set(rows) - {"fp32"} == {v.label for v in VARIANTS[:SETTLED]}


def test_coremltools_takes_one_scale_per_channel_and_nothing_finer() -> None:
    model = MobileNetV1()
    CoremlDKM(model, "cv:4/4#row, fc:4/4#row")  # enable_per_channel_scale
    for setting in ("cv:4/4#rowa", "cv:4/4#16"):
        with pytest.raises(ValueError, match="one scale per output channel"):
            CoremlDKM(model, setting)


def test_a_per_channel_scaled_weight_counts_as_palettized() -> None:
    """With a scale per channel each channel holds at most k d values: the layer is palettized, not dense."""
    layer = torch.nn.Linear(64, 8, bias=False)
    levels = torch.tensor([-1.0, 1.0])
    with torch.no_grad():
        layer.weight.copy_(levels[torch.randint(0, 2, (8, 64))] * torch.arange(1.0, 9.0).unsqueeze(1))
    model = torch.nn.Sequential(layer)
    assert unpalettized(model, "fc:1/1#row") == []
    assert unpalettized(model, "fc:1/1") == [("0", 512)]  # one LUT for the tensor: 16 values are too many


def test_distillation_mixes_the_kl_to_the_fp32_model_into_the_loss(tmp_path: Path) -> None:
    data = synthetic_fashion(tmp_path / "data", n_train=5100, n_test=40)
    fashion = load_fashion(data)
    torch.manual_seed(0)
    student, teacher = MobileNetV1().eval(), MobileNetV1().eval()
    batch = torch.arange(8)
    with torch.no_grad():
        ce = float(loss_fn(fashion)(student, batch))
        assert float(loss_fn(fashion, teacher, 0.0)(student, batch)) == ce  # no weight: cross-entropy alone
        assert float(loss_fn(fashion, student, 0.5)(student, batch)) == pytest.approx(0.5 * ce, rel=1e-5)  # KL 0
        logits, target = student(fashion.x_train[batch]), teacher(fashion.x_train[batch])
        kl = float((target.softmax(-1) * (target.log_softmax(-1) - logits.log_softmax(-1))).sum(-1).mean())
        assert kl > 0
        assert float(loss_fn(fashion, teacher, 1.0)(student, batch)) == pytest.approx(kl, rel=1e-4)


def test_a_distilled_variant_says_so(tmp_path: Path, run_args: list[str]) -> None:
    only = ["1/1 uniform QAT, distilled"]
    assert cli([*run_args, "--steps", "1", "--seeds", "0", "--only", *only]) == 0
    records = {r["method"]: r for r in json.loads((tmp_path / "fashion_ablation_mobilenet.json").read_text())["records"]}
    assert "distilled from fp32, KL weight 0.5" in records[only[0]]["note"] and records[only[0]]["steps"] == 1


def test_runs_made_apart_merge_into_one_table(tmp_path: Path, run_args: list[str]) -> None:
    base = [*run_args, "--steps", "1"]
    assert cli([*base, "--seeds", "0", "--only", "1/1", "--name", "a"]) == 0
    assert cli([*base, "--seeds", "1", "--only", "1/1", "4/4", "--name", "b"]) == 0
    assert cli(["--merge", str(tmp_path / "a.json"), str(tmp_path / "b.json"), "--name", "ab", "--out", str(tmp_path)]) == 0
    saved = json.loads((tmp_path / "ab.json").read_text())
    assert [(r["method"], r["seed"]) for r in saved["records"]] == [("fp32", 0), ("1/1", 0), ("1/1", 1), ("4/4", 1)]
    assert saved["config"]["seeds"] == [0, 1] and saved["config"]["variants"] == ["1/1", "4/4"]
    assert "| 1/1 | 1 | " in (tmp_path / "ab.md").read_text() and "fine-tuning seeds 0, 1" in (tmp_path / "ab.md").read_text()
    assert cli([*run_args, "--steps", "2", "--seeds", "2", "--only", "1/1", "--name", "c"]) == 0
    with pytest.raises(SystemExit, match="steps=2"):
        cli(["--merge", str(tmp_path / "a.json"), str(tmp_path / "c.json"), "--name", "ac", "--out", str(tmp_path)])
