"""The fortunes dataset: parsing, de-duplication, balance and a split that never changes."""

from __future__ import annotations

from pathlib import Path

import pytest

from experiments.fortunes import FORTUNES_DIR, TOPICS, load_fortunes, read_topic


def write_topic(directory: Path, name: str, entries: list[str]) -> None:
    (directory / name).write_text("\n%\n".join(entries) + "\n%\n", encoding="utf-8")


@pytest.fixture
def fake_fortunes(tmp_path: Path) -> Path:
    write_topic(
        tmp_path,
        "cats",
        [f"A cat story number {i}, with whiskers\nand a tail." for i in range(10)]
        + ["Shared text that appears in both topics.", "A cat story number 0, with whiskers and a tail!"],
    )
    write_topic(
        tmp_path,
        "dogs",
        [f"A dog tale number {i} about barking loudly." for i in range(10)]
        + ["shared TEXT that appears in both topics", "short"],
    )
    return tmp_path


def test_read_topic_joins_lines(fake_fortunes: Path) -> None:
    entries = read_topic(fake_fortunes / "cats")
    assert entries[0] == "A cat story number 0, with whiskers and a tail."
    assert len(entries) == 12


def test_dedup_balance_and_split(fake_fortunes: Path) -> None:
    data = load_fortunes(fake_fortunes, ("cats", "dogs"), per_topic=8)
    stats = data.stats
    assert stats["dropped_shared_between_topics"] == 2  # one text, under both topics
    assert stats["dropped_repeats"] == 1  # same key once punctuation and case are ignored
    assert stats["per_topic"] == {"cats": 8, "dogs": 8}
    everything = data.train.texts + data.val.texts + data.test.texts
    assert len(everything) == len(set(everything)) == 16
    assert not any("shared" in t.lower() or t == "short" for t in everything)
    assert sorted(data.test.labels) == [0, 0, 1, 1] or len(data.test) >= 2
    again = load_fortunes(fake_fortunes, ("cats", "dogs"), per_topic=8)
    assert again.fingerprint == data.fingerprint and again.test.texts == data.test.texts


def test_missing_package_names_the_fix(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="apt-get install fortunes"):
        load_fortunes(tmp_path, ("computers", "law"))
    with pytest.raises(ValueError, match="at least 2 topics"):
        load_fortunes(tmp_path, ("computers",))


@pytest.mark.skipif(not FORTUNES_DIR.is_dir(), reason="Debian's fortunes package is not installed")
def test_real_dataset_is_the_documented_one() -> None:
    data = load_fortunes()
    assert data.topics == TOPICS and len(TOPICS) >= 6
    sizes = data.stats["sizes"]
    assert sizes["train"] > 1000 and sizes["test"] > 300
    assert set(data.test.labels) == set(range(len(TOPICS)))
