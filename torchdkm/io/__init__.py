"""The compressed file format (and, later, exporters)."""

from .format import FORMAT_VERSION, load, read, save, saved_dtype

__all__ = ["FORMAT_VERSION", "load", "read", "save", "saved_dtype"]
