"""bench/inference.py's end-to-end SmolLM2 rows, on the tiny random LLaMA (seconds)."""

from __future__ import annotations

import importlib

import pytest

pytest.importorskip("transformers")


def test_smollm2_decoding_rows(monkeypatch) -> None:
    inference = importlib.import_module("bench.inference")
    llm = importlib.import_module("experiments.llm")
    real = llm.load_model
    monkeypatch.setattr(llm, "load_model", lambda opts: real(llm.Options(tiny_model=True)))
    found = inference.smollm2(rounds=1, tokens=3)
    assert found["tokens"] == 3 and found["compress_s"] > 0
    assert found["fp32 tokens/s"] > 0 and found["torchdkm fc:3/1 tokens/s"] > 0
    assert found["fp32 peak MiB"] > 0 and found["torchdkm peak MiB"] > 0 and found["torchdkm file MiB"] < found["fp32 file MiB"]
    assert found["speedup_vs_fp32"] == pytest.approx(found["torchdkm fc:3/1 tokens/s"] / found["fp32 tokens/s"])
    assert found["fp32 Linears ms/token"] > 0 and found["torchdkm fc:3/1 Linears ms/token"] > 0
    assert "fp32 rest ms/token" in found and "torchdkm fc:3/1 rest ms/token" in found
