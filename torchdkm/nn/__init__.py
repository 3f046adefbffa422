"""Training-time parametrization and palettized inference modules."""

from .palettized import (
    PaletteSpec,
    PalettizedConv1d,
    PalettizedConv2d,
    PalettizedConv3d,
    PalettizedEmbedding,
    PalettizedLinear,
    PalettizedMixin,
    palettized_class,
)
from .parametrization import DKMParametrization

__all__ = [
    "DKMParametrization",
    "PaletteSpec",
    "PalettizedConv1d",
    "PalettizedConv2d",
    "PalettizedConv3d",
    "PalettizedEmbedding",
    "PalettizedLinear",
    "PalettizedMixin",
    "palettized_class",
]
