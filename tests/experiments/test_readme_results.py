"""README's result tables quote results/*.md: every mean ± std it shows was measured and saved."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
NUMBER = re.compile(r"\d+\.\d\d ± \d+\.\d\d")


def results_section() -> str:
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    start = text.index("<!-- section: results -->")
    return text[start : text.index("<!-- section:", start + 1)]


def test_every_quoted_mean_is_in_a_results_file() -> None:
    saved = "".join(path.read_text(encoding="utf-8") for path in sorted((ROOT / "results").glob("*.md")))
    quoted = NUMBER.findall(results_section())
    assert len(quoted) > 40
    assert [q for q in quoted if q not in saved] == []


def test_the_vision_table_is_copied_whole() -> None:
    saved = (ROOT / "results" / "vision.md").read_text(encoding="utf-8")
    rows = [line for line in results_section().splitlines() if line.startswith("| cv:")]
    assert len(rows) >= 8 and all(row in saved for row in rows)


def test_plots_linked_from_the_readme_exist() -> None:
    for link in re.findall(r"\((results/[\w.-]+\.png)\)", results_section()):
        assert (ROOT / link).read_bytes()[:4] == b"\x89PNG", link


def test_the_language_model_rows_are_copied_from_results() -> None:
    text = results_section()
    start = text.index("### Language models")
    section = text[start : text.index("\n### ", start + 1)]
    rows = [line for line in section.splitlines() if line.startswith("| ") and not line.startswith("| method")]
    saved = (ROOT / "results" / "llm.md").read_text(encoding="utf-8")
    assert len(rows) >= 8 and [row for row in rows if row not in saved] == []
