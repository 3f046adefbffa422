"""The vision experiment's pipeline, at a size that runs in seconds."""

from __future__ import annotations

import json
from pathlib import Path

from experiments.vision import MATCHED, Options, run


def test_tiny_vision_run_writes_every_method_and_ablation(tmp_path: Path) -> None:
    results = run(Options.tiny(out=tmp_path))
    methods = {(r.method, r.setting) for r in results.records}
    for method in ("DKM", "k-means", "coremltools DKM", "uniform PTQ", "uniform QAT"):
        assert (method, "cv:2/1, fc:2/1") in methods
    assert ("uniform PTQ", "cv:4/8, fc:4/8") not in methods  # below 1 bit/weight: no uniform grid
    # coremltools cannot cut fc2's 10 channels into 8-vectors: it leaves fc2 dense, and an
    # equal-terms DKM row (fc2 left dense too) sits beside it, each sized accordingly
    ct = next(r for r in results.records if r.method == "coremltools DKM" and r.setting == "cv:4/8, fc:4/8")
    matched = next(r for r in results.records if r.method == MATCHED)
    assert "left dense by coremltools: fc2" in ct.note and matched.note.endswith("fc2:none")
    assert ct.bytes == matched.bytes
    assert {m for m, _ in methods} >= {"ablation: tau", "ablation: iterations", "ablation: dim at 1 bit/weight"}
    dkm = next(r for r in results.records if r.method == "DKM" and r.setting == "cv:2/1, fc:2/1")
    assert 14 < dkm.factor < 16 and dkm.bits_per_weight == 2 and dkm.steps > 0
    assert 0 <= dkm.metrics["accuracy"] <= 1 and dkm.metrics["gap"] >= 0
    saved = json.loads((tmp_path / "vision-tiny.json").read_text())
    assert len(saved["records"]) == len(results.records) and saved["environment"]["torch"]
    table = (tmp_path / "vision-tiny.md").read_text()
    assert "coremltools DKM" in table and "Ablation: tau" in table
    for png in ("vision-tiny_tradeoff.png", "vision-tiny_histogram.png"):
        assert (tmp_path / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_cli_tiny_run(tmp_path: Path, capsys) -> None:
    from experiments.vision import cli

    assert cli(["--tiny", "--no-progress", "--out", str(tmp_path)]) == 0
    assert "run time:" in capsys.readouterr().out and (tmp_path / "vision-tiny.md").is_file()


def test_environment_is_captured_when_the_run_starts(monkeypatch, tmp_path):
    """Sources edited during a run: the JSON keeps the start's digest and flags the change."""
    from experiments import common

    results = common.Results("probe", {})
    started = results.environment["torchdkm_source_sha256"]
    monkeypatch.setattr(common, "source_digest", lambda: "edited-meanwhile")
    saved = json.loads(results.write(tmp_path).read_text())
    assert saved["environment"]["torchdkm_source_sha256"] == started
    assert saved["environment"]["torchdkm_source_sha256_at_end"] == "edited-meanwhile"
