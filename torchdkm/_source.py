"""Which torchdkm code ran: a digest of the package's sources, recorded with every benchmark and experiment."""

from __future__ import annotations

import hashlib
from pathlib import Path

#: The files that decide what torchdkm computes: Python modules and the native loops' C source.
SOURCE_SUFFIXES = (".py", ".c")


def source_digest(package: Path | None = None) -> str:
    """SHA-256 (first 16 hex digits) over the package's source files, path and contents, in path order."""
    package = package or Path(__file__).parent
    digest = hashlib.sha256()
    for path in sorted(p for p in package.rglob("*") if p.suffix in SOURCE_SUFFIXES and p.is_file()):
        digest.update(str(path.relative_to(package)).encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()[:16]
