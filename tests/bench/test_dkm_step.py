"""The DKM step benchmark keeps working: its parts on a 64x64 layer, one timed step, in seconds.

``bench`` is not an installed package, so the repository root is put on
``sys.path`` (this directory deliberately has no ``__init__.py``: it must not
shadow the real ``bench`` package).  coremltools parts skip when it is missing.
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
TINY = ["--sizes", "64x64", "--bits", "4", "--dims", "1", "--steps", "1", "--cml-steps", "1", "--threads", "1"]
HAVE_COREMLTOOLS = importlib.util.find_spec("coremltools") is not None


def _import(name: str) -> ModuleType:
    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))
    return importlib.import_module(name)


@pytest.fixture(scope="module")
def dkm_step() -> ModuleType:
    return _import("bench.dkm_step")


@pytest.fixture(scope="module")
def worker() -> ModuleType:
    return _import("bench._dkm_worker")


@pytest.fixture(scope="module")
def report() -> ModuleType:
    return _import("bench._dkm_report")


def tiny_case(worker: ModuleType, library: str = "torchdkm", variant: str = "default", dim: int = 1, tau: float = 0.05):
    return worker.Case(library, variant, "64x64", 64, 64, bits=4, dim=dim, steps=1, iters=3, tau=tau)


@pytest.mark.parametrize(
    ("variant", "dim"), [("default", 1), ("exact", 1), ("bf16", 1), ("bf16-torch", 1), ("default", 2)]
)
def test_torchdkm_case_measures_everything(worker: ModuleType, variant: str, dim: int, monkeypatch) -> None:
    monkeypatch.setenv("TORCHDKM_NATIVE", "1")  # (bf16-torch sets it to 0 in-process: restored after the test)
    result = worker.measure(tiny_case(worker, variant=variant, dim=dim))
    assert result["status"] == "ok"
    assert len(result["step_times_s"]) == 1
    assert 0 < result["prepare_s"] <= result["first_step_s"]
    assert result["step_s"] > 0 and result["rss_peak_bytes"] is not None
    # 4-bit indices over N(0, 0.02) weights (2 bits per weight at dim 2): error well below the variance.
    assert 0 < result["mse"] < 0.02**2 / 5
    assert 0 < result["kmeans_mse"] < 0.02**2 / 5


@pytest.mark.skipif(not HAVE_COREMLTOOLS, reason="coremltools not installed (pip install -e '.[bench]')")
def test_coremltools_case_measures_everything(worker: ModuleType) -> None:
    result = worker.measure(tiny_case(worker, library="coremltools", tau=2e-7))
    assert result["status"] == "ok"
    assert 0 < result["mse"] < 0.02**2 / 5


def test_cli_writes_json_and_markdown(dkm_step: ModuleType, tmp_path: Path) -> None:
    args = [*TINY, "--variants", "default", "--only", "torchdkm", "--out-dir", str(tmp_path)]
    assert dkm_step.main(args) == 0
    data = json.loads((tmp_path / "dkm_step.json").read_text())
    rows = {r["case"]["library"]: r for r in data["results"]}
    assert set(rows) == {"none", "torchdkm"}  # the plain-layer reference row and the torchdkm row
    assert all(r["status"] == "ok" for r in rows.values())
    assert {(p["size"], p["dtype"]) for p in data["passes"]} == {("64x64", "float32")}
    assert data["machine"]["torch"] and data["runs"][0]["command"].startswith("python -m bench.dkm_step")
    markdown = (tmp_path / "dkm_step.md").read_text()
    assert "| torchdkm | default | 64x64 |" in markdown and "## Targets" in markdown


def test_sizes_parse(dkm_step: ModuleType) -> None:
    assert dkm_step.parse_size("1M") == ("1M", 1024, 1024)
    assert dkm_step.parse_size("4K") == ("4K", 64, 64)
    assert dkm_step.parse_size("64x32") == ("64x32", 64, 32)


def test_timeout_gives_lower_bounds(dkm_step: ModuleType) -> None:
    partial = {"case": {}, "first_step_started_at": 100.0, "baseline_rss_bytes": 1000}
    dkm_step.mark_timeout(partial, timeout=60.0, killed_at=150.0, rss_seen=5000)
    assert partial["status"] == "timeout"
    assert partial["first_step_s"] == 50.0 and partial["rss_peak_bytes"] == 4000
    assert set(partial["lower_bounds"]) == {"first_step_s", "rss_peak_bytes"}


def test_bounds_carry_through_ratios_and_verdicts(report: ModuleType) -> None:
    Bounded = report.Bounded
    speedup = Bounded(600.0, ">=") / Bounded(2.0)  # coremltools timed out after 600 s
    assert (speedup.value, speedup.bound) == (300.0, ">=")
    memory = Bounded(100.0) / Bounded(1000.0, ">=")
    assert (memory.value, memory.bound) == (0.1, "<=")
    assert report.verdict(speedup, ">=", 50) == "pass"
    assert report.verdict(Bounded(10.0, ">="), ">=", 50) == "unknown"
    assert report.verdict(memory, "<=", 0.2) == "pass"
    assert report.verdict(Bounded(0.5), "<=", 0.2) == "FAIL"
    assert report.verdict(Bounded(None), "<=", 0.2) == "unknown"


def test_paired_steps_measure_the_overhead_in_one_process(worker: ModuleType, report: ModuleType) -> None:
    """A bf16 row with paired rounds times its step beside the plain layer's, and the report uses those."""
    case = tiny_case(worker, variant="bf16")
    result = worker.measure(worker.Case(**{**case.__dict__, "paired": worker.PAIRED_TIMED}))
    assert result["status"] == "ok"
    assert result["paired_step_s"] > 0 and result["paired_plain_s"] > 0 and result["paired_pass_s"] > 0
    # what the report shows: the paired overhead over the paired pass, whatever the other rows say
    plain = {"case": {**result["case"], "library": "none"}, "step_s": 123.0}
    passes = {("64x64", "bfloat16"): {"pass_s": 1e-9}}
    results = {report.result_key(plain): plain}
    assert report.overhead_passes(result, results, passes).value == pytest.approx(
        result["paired_overhead_s"] / result["paired_pass_s"]
    )
    unpaired = {k: v for k, v in result.items() if not k.startswith("paired")}
    plain["case"].update(variant="bf16", bits=0, dim=0)
    results = {report.result_key(plain): plain}
    assert report.overhead_passes(unpaired, results, passes).value == pytest.approx((result["step_s"] - 123.0) / 1e-9)
