"""The source digest recorded with benchmark and experiment results."""

from __future__ import annotations

from torchdkm._source import source_digest


def test_digest_covers_python_and_c_sources_only(tmp_path):
    (tmp_path / "sub").mkdir()
    (tmp_path / "a.py").write_text("x = 1\n")
    (tmp_path / "sub" / "loops.c").write_text("int f(void) { return 1; }\n")
    first = source_digest(tmp_path)
    (tmp_path / "notes.txt").write_text("not code")
    assert source_digest(tmp_path) == first
    (tmp_path / "sub" / "loops.c").write_text("int f(void) { return 2; }\n")
    changed = source_digest(tmp_path)
    assert changed != first
    (tmp_path / "sub" / "loops.c").rename(tmp_path / "loops.c")  # same bytes, another path
    assert source_digest(tmp_path) != changed


def test_digest_of_the_installed_package_is_stable():
    assert source_digest() == source_digest()
    assert len(source_digest()) == 16
