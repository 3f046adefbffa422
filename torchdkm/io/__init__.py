"""The compressed file format (and, later, exporters)."""

from .format import FORMAT_VERSION, load, read, save

__all__ = ["FORMAT_VERSION", "load", "read", "save"]
