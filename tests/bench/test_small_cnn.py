"""The small-CNN overhead benchmark runs end to end in a tiny configuration (batch 8-32, one round).

``bench`` is not an installed package, so the repository root is put on ``sys.path`` (see
``test_dkm_step.py``).  The coremltools run skips where coremltools is not installed.
"""

from __future__ import annotations

import importlib
import importlib.util
import json
import sys
from pathlib import Path
from types import ModuleType

import pytest

ROOT = Path(__file__).resolve().parents[2]
HAVE_COREMLTOOLS = importlib.util.find_spec("coremltools") is not None
WEIGHTS = ["conv1", "conv2", "conv3", "conv4", "conv5", "conv6", "conv7", "classifier"]
#: One round of one timed step after no untimed ones: seconds, not minutes.
TINY = ["--quick", "--rounds", "1", "--warm", "0", "--timed", "1"]


@pytest.fixture(scope="module")
def small_cnn() -> ModuleType:
    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))
    return importlib.import_module("bench.small_cnn")


def test_the_model_has_eight_weights_of_288_to_16k(small_cnn: ModuleType) -> None:
    table = small_cnn.layer_table()
    assert [layer["name"] for layer in table] == WEIGHTS
    sizes = [layer["numel"] for layer in table]
    assert min(sizes) == 288 and max(sizes) <= 16384
    x, y = small_cnn.make_batch(4, seed=0)
    assert tuple(x.shape) == (4, 1, 28, 28) and small_cnn.build_model(0)(x).shape == (4, 10)
    assert small_cnn.make_batch(4, seed=0)[0].equal(x) and y.max() < 10


def test_settings_parse_and_coremltools_skip_rule(small_cnn: ModuleType) -> None:
    assert small_cnn.parse_setting("cv:4/4") == "4/4" and small_cnn.parse_setting("2/1") == "2/1"
    with pytest.raises(Exception, match="BITS/DIM"):
        small_cnn.parse_setting("four")
    assert small_cnn.coremltools_skips("2/1") == {}
    skips = small_cnn.coremltools_skips("4/4")
    assert list(skips) == ["classifier"] and "10 output channels" in skips["classifier"]


def test_torchdkm_rows_cluster_all_eight_weights(small_cnn: ModuleType, tmp_path: Path) -> None:
    assert small_cnn.main([*TINY, "--only", "torchdkm", "--out-dir", str(tmp_path)]) == 0
    report = json.loads((tmp_path / "small_cnn.json").read_text())
    assert {"command", "date", "environment", "config", "model", "results", "comparisons"} <= set(report)
    env = report["environment"]
    from torchdkm._source import source_digest

    assert env["torchdkm_source_sha256"] == source_digest(ROOT / "torchdkm")
    assert "git_head" in env and env["torch_threads"] == 1
    assert report["config"]["batch"] == 32 and report["config"]["rounds"] == 1
    rows = report["results"]
    assert [(r["library"], r["setting"], r["alone"]) for r in rows] == [
        ("plain", "-", False),
        ("torchdkm", "2/1", False),
        ("torchdkm", "2/1", True),
        ("torchdkm", "4/4", False),
        ("torchdkm", "4/4", True),
    ]
    assert rows[2]["label"] == "torchdkm 2/1, each layer alone"
    for row in rows[1:]:
        assert row["layers_clustered"] == 8 and row["clustered"] == WEIGHTS and row["skipped"] == {}
        assert len(row["round_step_s"]) == 1 and row["step_s"] > 0 and row["plain_s"] == rows[0]["step_s"]
        assert row["overhead_s"] == pytest.approx(row["step_s"] - row["plain_s"])
        assert row["overhead_per_layer_s"] == pytest.approx(row["overhead_s"] / 8)
    assert report["comparisons"] == []  # no coremltools row to compare with
    md = (tmp_path / "small_cnn.md").read_text()
    assert "| torchdkm | 2/1 | 8/8 |" in md and env["torchdkm_source_sha256"] in md


@pytest.mark.skipif(not HAVE_COREMLTOOLS, reason="coremltools is not installed (pip install coremltools==9.0)")
def test_coremltools_rows_and_ratios(small_cnn: ModuleType, tmp_path: Path) -> None:
    """At 4/4 coremltools leaves the 10-output classifier dense; the harness says so, compares both ways and
    holds the target to the comparison on the same weights."""
    assert small_cnn.main([*TINY, "--settings", "4/4", "--out-dir", str(tmp_path)]) == 0
    report = json.loads((tmp_path / "small_cnn.json").read_text())
    rows = {r["label"]: r for r in report["results"]}
    cml = rows["coremltools 4b dim4"]
    assert cml["layers_clustered"] == 7 and "classifier" in cml["skipped"] and "divisible" in cml["note"]
    assert rows["torchdkm 4/4"]["layers_clustered"] == 8
    assert rows["torchdkm 4/4, same layers as coremltools"]["clustered"] == WEIGHTS[:-1]
    comparisons = report["comparisons"]
    assert [c["basis"] for c in comparisons] == [
        "all 8 weights",
        "all 8 weights, each layer alone",
        "coremltools' layers",
    ]
    primary = comparisons[2]  # the same 7 weights on both sides: the row with the target
    if primary["coremltools_overhead_s"] > 0:
        assert primary["ratio"] == pytest.approx(primary["torchdkm_overhead_s"] / primary["coremltools_overhead_s"])
        assert primary["passes"] == (primary["ratio"] <= 0.5)
    if primary["coremltools_cpu_overhead_s"] > 0:  # the same in CPU time
        cpu = primary["torchdkm_cpu_overhead_s"] / primary["coremltools_cpu_overhead_s"]
        assert primary["cpu_ratio"] == pytest.approx(cpu) and primary["cpu_passes"] == (cpu <= 0.5)
    assert comparisons[0]["passes"] is None and comparisons[1]["passes"] is None  # more work for torchdkm
    assert comparisons[0]["ratio"] is not None
    assert "left dense" in (tmp_path / "small_cnn.md").read_text()


def test_profile_mode(small_cnn: ModuleType, tmp_path: Path) -> None:
    argv = ["--profile", "cv:2/1", "--batch", "8", "--profile-steps", "1", "--top", "3", "--out-dir", str(tmp_path)]
    assert small_cnn.main(argv) == 0
    found = json.loads((tmp_path / "small_cnn_profile_2_1.json").read_text())["profile"]
    assert found["setting"] == "2/1" and [layer["name"] for layer in found["layers"]] == WEIGHTS
    assert found["together"]["forward_s"] > 0 and "one shared step" in (tmp_path / "small_cnn_profile_2_1.md").read_text()
    assert set(found["phases"]["torchdkm"]) == {"forward", "backward", "optimizer", "step"}
    ops = found["dispatched_ops"]
    assert (
        ops["torchdkm"]["forward"] > ops["plain"]["forward"] and ops["torchdkm"]["backward"] > ops["plain"]["backward"]
    )
    assert len(found["top_dispatching_functions"]) == 3
    assert all(e["function"].startswith("torchdkm/") for e in found["python"]["torchdkm"]["top_torchdkm_cumulative"])
    assert "where the per-step overhead goes" in (tmp_path / "small_cnn_profile_2_1.md").read_text()


def test_readme_quotes_the_stored_results(small_cnn: ModuleType) -> None:
    """README's small-CNN table shows the overheads and ratios of ``bench/results/small_cnn.json``."""
    report = json.loads((ROOT / "bench" / "results" / "small_cnn.json").read_text())
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    section = readme[readme.index("## Benchmark: DKM overhead per step on a small CNN") :]
    section = section[: section.index("<!-- section:")]
    plain = report["results"][0]
    assert f"plain step {plain['step_s'] * 1e3:.1f} ms" in section
    assert report["environment"]["git_head"][:7] in section
    for c in report["comparisons"]:
        mine, theirs = (f"{c[k] * 1e3:.1f} ms" for k in ("torchdkm_overhead_s", "coremltools_overhead_s"))
        verdict = "-" if c["passes"] is None else ("pass" if c["passes"] else "fail")
        assert f"| {mine} | {theirs} | {c['ratio']:.2f} | {verdict} |" in section
