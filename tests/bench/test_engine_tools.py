"""The engine's before/after tools run end to end: the step comparison and the bit-identity check."""

from __future__ import annotations

import importlib
import json
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


def test_engine_compare_writes_ratios(tmp_path, monkeypatch):
    compare = importlib.import_module("bench.engine_compare")
    monkeypatch.setattr(compare, "CASES", [("tiny", 16, 32, 2, 1, "float32")])
    assert compare.main(["--old", str(ROOT), "--turns", "1", "--steps", "1", "--out-dir", str(tmp_path)]) == 0
    report = json.loads((tmp_path / "engine_compare.json").read_text())
    (row,) = report["rows"]
    assert row["case"] == "tiny" and row["old_ms"] > 0 and row["new_ms"] > 0
    assert row["ratio"] == row["new_ms"] / row["old_ms"]
    assert row["old_cpu_ms"] > 0 and row["cpu_ratio"] == row["new_cpu_ms"] / row["old_cpu_ms"]
    assert "| tiny |" in (tmp_path / "engine_compare.md").read_text()


def test_engine_identity_compares_saved_runs(tmp_path, monkeypatch, capsys):
    identity = importlib.import_module("bench.engine_identity")
    monkeypatch.setenv("TORCHDKM_NATIVE", "1")
    monkeypatch.setattr(identity, "CASES", {"tiny": ((8, 6), torch.float32, dict(bits=2, top_m=None))})
    monkeypatch.setattr(identity, "run_model", lambda alone=False: [torch.full((1,), float(alone))])
    out = tmp_path / "a.pt"
    monkeypatch.setattr(sys, "argv", ["engine_identity", "--out", str(out)])
    identity.main()
    changed = torch.load(out)
    changed["tiny/native=0"][1] = changed["tiny/native=0"][1] + 1.0
    torch.save(changed, tmp_path / "b.pt")
    monkeypatch.setattr(sys, "argv", ["engine_identity", "--compare", str(out), str(tmp_path / "b.pt")])
    identity.main()
    printed = capsys.readouterr().out
    assert "tiny/native=1" in printed and "DIFFERS" in printed.split("tiny/native=0")[1].splitlines()[0]
