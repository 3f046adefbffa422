"""The digits 0.5-bit temperature probe: a smoke run writes one row per setting and temperature."""

from __future__ import annotations

import json

from experiments import digits_half_bit


def test_tiny_run_writes_every_setting_at_every_temperature(tmp_path):
    assert digits_half_bit.cli(["--tiny", "--out", str(tmp_path)]) == 0
    saved = json.loads((tmp_path / "digits_half_bit_tiny.json").read_text())
    runs = {(r["setting"], r["method"]) for r in saved["records"] if r["method"] != "fp32"}
    want = {(s, f"DKM tau {t:g}") for s in digits_half_bit.SETTINGS for t in digits_half_bit.TAUS}
    assert runs == want
    for record in saved["records"]:
        if record["method"] != "fp32":
            assert record["bits_per_weight"] in (0.5, 0.25) and 0 <= record["metrics"]["accuracy"] <= 1
    md = (tmp_path / "digits_half_bit_tiny.md").read_text()
    assert "| cv:4/8, fc:4/8, fc2:none | 0.5 | DKM tau 0.02 |" in md
