"""The uniquified-step profile runs end to end on a tiny layer and its parts add up to what torchdkm adds."""

from __future__ import annotations

import importlib
import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def unique_profile():
    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))
    return importlib.import_module("bench.unique_profile")


def test_profile_writes_a_table_whose_parts_add_up(unique_profile, tmp_path):
    assert unique_profile.main(["--size", "64x64", "--steps", "2", "--out-dir", str(tmp_path)]) == 0
    report = json.loads((tmp_path / "unique_profile.json").read_text())
    rows = {row["what"]: row for row in report["rows"]}
    assert {"forward", "backward", "optimizer step", "step", "count the patterns", "temperature"} <= set(rows)
    added = rows["step"]["torchdkm_s"] - rows["step"]["plain_s"]
    parts = [row for row in report["rows"] if row["plain_s"] is None]
    assert sum(row["torchdkm_s"] for row in parts) == pytest.approx(added)
    assert all(row["torchdkm_s"] > 0 for row in parts if row["what"].startswith(("count", "gather", "sum", "DKM")))
    assert "| count the patterns |" in (tmp_path / "unique_profile.md").read_text()


def test_wrapped_functions_are_restored(unique_profile):
    from torchdkm.cluster import clusterer, engine

    before = (clusterer.distinct, engine.iterate)
    with unique_profile.timed_parts({}):
        assert clusterer.distinct is not before[0]
    assert (clusterer.distinct, engine.iterate) == before
