"""Training-time parametrization and palettized inference modules."""

from .inference import keep_decoded
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
    "keep_decoded",
    "palettized_class",
]
