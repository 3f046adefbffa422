"""Training-time parametrization and palettized inference modules."""

from .inference import keep_decoded
from .palettized import (
    PaletteSpec,
    PalettizedConv1d,
    PalettizedConv2d,
    PalettizedConv3d,
    PalettizedConvTranspose1d,
    PalettizedConvTranspose2d,
    PalettizedConvTranspose3d,
    PalettizedEmbedding,
    PalettizedLinear,
    PalettizedMixin,
    PalettizedMultiheadAttention,
    palettized_class,
)
from .parametrization import DKMParametrization

__all__ = [
    "DKMParametrization",
    "PaletteSpec",
    "PalettizedConv1d",
    "PalettizedConv2d",
    "PalettizedConv3d",
    "PalettizedConvTranspose1d",
    "PalettizedConvTranspose2d",
    "PalettizedConvTranspose3d",
    "PalettizedEmbedding",
    "PalettizedLinear",
    "PalettizedMixin",
    "PalettizedMultiheadAttention",
    "keep_decoded",
    "palettized_class",
]
