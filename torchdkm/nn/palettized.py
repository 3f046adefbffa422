"""Inference modules whose weights are stored palettized: packed indices + LUT.

``PalettizedLinear`` is an ``nn.Linear`` (so ``isinstance`` checks, ``forward``
and hyper-parameters are the original's) whose ``weight`` is a read-only
property decoded from two buffers, ``weight_indices`` (bit-packed uint8) and
``weight_lut`` (``(groups, k, dim)``).  The decoded weight is bit-identical to
the snapped weight, so outputs equal the snapped dense model exactly.  The same
mechanism serves every supported class (Conv1d/2d/3d, ConvTranspose1d/2d/3d,
Embedding, MultiheadAttention's ``in_proj_weight``) and any subclass of them: :func:`palettized_class` builds the palettized class once per
base class.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import asdict, dataclass

from torch import Tensor, nn
from torch.nn.utils import parametrize

from ..cluster import Layout
from ..cluster.scales import BlockScales
from ..matching import WEIGHT_PARAMS
from ..pack import unpack
from .inference import forward_for


@dataclass(frozen=True)
class PaletteSpec:
    """What it takes to decode one palettized tensor.

    ``shape`` is the tensor's own shape.  ``transposed`` (a 2-D weight stored
    ``(in, out)``, transformers' ``Conv1D``): the layout cuts its transpose, so
    groups count output channels and vectors run along the input axis as for
    ``Linear``; :meth:`decode` transposes back.
    """

    shape: tuple[int, ...]
    bits: int
    dim: int
    group_size: int
    scale_block: int | None = None  # per-block scales (``LayerConfig.scale_block``), None: none
    scale_offset: bool = False
    transposed: bool = False

    @property
    def layout(self) -> Layout:
        """How the indices cut the tensor (its transpose when ``transposed``)."""
        return Layout(self.shape[::-1] if self.transposed else self.shape, self.dim, self.group_size)

    @property
    def scales(self) -> BlockScales | None:
        """The block structure of the scales, over the layout's (output-channels-first) tensor."""
        return BlockScales.of(self.layout.shape, self.scale_block, self.scale_offset)

    @property
    def index_count(self) -> int:
        layout = self.layout
        return layout.groups * layout.vectors

    def indices(self, packed: Tensor) -> Tensor:
        """``(groups, vectors)`` indices from the packed bytes."""
        layout = self.layout
        return unpack(packed, self.bits, self.index_count).view(layout.groups, layout.vectors)

    def decode(self, packed: Tensor, lut: Tensor, scales: Tensor | None = None, offsets: Tensor | None = None) -> Tensor:
        """The dense tensor from packed indices, a ``(groups, k, dim)`` LUT and the block scales (and offsets)."""
        dense = self.layout.decode(self.indices(packed), lut)
        blocks = self.scales
        if blocks is not None:
            if scales is None or (blocks.offset and offsets is None):
                raise ValueError("decode: this palette has block scales (and offsets): pass them")
            dense = blocks.apply(dense, scales, offsets)
        # contiguous: the same memory layout as a dense (in, out) weight, so matmuls round the same way
        return dense.mT.contiguous() if self.transposed else dense

    def to_dict(self) -> dict:
        """The file's JSON; ``transposed`` only when set, so other layers' metadata is unchanged."""
        data = asdict(self)
        if not self.transposed:
            del data["transposed"]
        return data

    @classmethod
    def from_dict(cls, data: dict) -> PaletteSpec:
        block = data.get("scale_block")  # (absent in files of format version 1: no scales)
        return cls(
            tuple(int(s) for s in data["shape"]),
            int(data["bits"]),
            int(data["dim"]),
            int(data["group_size"]),
            scale_block=None if block is None else int(block),
            scale_offset=bool(data.get("scale_offset", False)),
            transposed=bool(data.get("transposed")),
        )


class PalettizedMixin:
    """Decoding shared by every palettized class; ``palette`` maps parameter name to spec."""

    palette: dict[str, PaletteSpec]
    base_class: type  # the class this one palettizes (nn.Linear, ...)

    #: Whether reading a weight keeps the decoded copy (see :func:`torchdkm.nn.inference.keep_decoded`).
    keep_decoded: bool = False

    def decode(self, param: str) -> Tensor:
        """The dense ``param``: decoded on every read unless :attr:`keep_decoded` (forwards do not read it)."""
        tensors = [getattr(self, f"{param}_{part}", None) for part in ("indices", "lut", "scales", "offsets")]
        if not self.keep_decoded:
            return self.palette[param].decode(*tensors)
        key = tuple((t.data_ptr(), t._version, t.dtype, t.device) for t in tensors if t is not None)
        cache = self.__dict__.setdefault("decoded_cache", {})
        if param not in cache or cache[param][0] != key:
            cache[param] = (key, self.palette[param].decode(*tensors))
        return cache[param][1]

    def decoded_copy(self, param: str = "weight") -> Tensor | None:
        """The kept decoded ``param`` (the opt-in of :func:`keep_decoded`), or None: forwards use the packed form."""
        return self.decode(param) if self.keep_decoded else None

    def extra_repr(self) -> str:
        base = super().extra_repr()  # type: ignore[misc]
        specs = ", ".join(f"{p}: {s.bits}/{s.dim} bits/dim, group {s.group_size}" for p, s in self.palette.items())
        return f"{base}, palettized({specs})"


_CLASSES: dict[tuple[type, tuple[str, ...]], type] = {}


def palettized_class(base: type, params: tuple[str, ...] = ("weight",)) -> type:
    """The palettized subclass of ``base`` whose ``params`` are decoded properties."""
    key = (base, tuple(sorted(params)))
    if key not in _CLASSES:
        props = {
            p: property(lambda self, p=p: self.decode(p), doc=f"{p}, decoded from indices and LUT") for p in params
        }
        own = next((WEIGHT_PARAMS[t.__name__] for t in base.__mro__ if t.__name__ in WEIGHT_PARAMS), "weight")
        suffix = "" if key[1] == (own,) else "_" + "_".join(key[1])
        forward = forward_for(base, key[1])
        if forward is not None:
            props["forward"] = forward
        _CLASSES[key] = type(
            f"Palettized{base.__name__}{suffix}",
            (PalettizedMixin, base),
            {**props, "base_class": base, "__module__": __name__},
        )
    return _CLASSES[key]


PalettizedLinear = palettized_class(nn.Linear)
PalettizedConv1d = palettized_class(nn.Conv1d)
PalettizedConv2d = palettized_class(nn.Conv2d)
PalettizedConv3d = palettized_class(nn.Conv3d)
PalettizedEmbedding = palettized_class(nn.Embedding)
PalettizedConvTranspose1d = palettized_class(nn.ConvTranspose1d)
PalettizedConvTranspose2d = palettized_class(nn.ConvTranspose2d)
PalettizedConvTranspose3d = palettized_class(nn.ConvTranspose3d)
PalettizedMultiheadAttention = palettized_class(nn.MultiheadAttention, ("in_proj_weight",))


def palettize_module(module: nn.Module, tensors: dict[str, tuple]) -> nn.Module:
    """A palettized copy of ``module``: ``tensors`` maps parameter to ``(spec, packed, lut[, scales, offsets])``.

    The copy shares every other parameter, buffer and submodule with ``module``.
    ``module`` itself is left untouched; if it is parametrized (a DKM layer),
    the copy is built on the class it had before, without the parametrizations
    (torch's ``remove_parametrizations`` would edit a class that
    ``copy.deepcopy`` shares between copies).
    """
    base = parametrize.type_before_parametrizations(module)
    if isinstance(module, PalettizedMixin):
        raise TypeError(f"{base.__name__} is already palettized")
    if parametrize.is_parametrized(module) and set(module.parametrizations) - set(tensors):
        raise TypeError(f"{base.__name__} has parametrizations torchdkm does not own: {list(module.parametrizations)}")
    cls = palettized_class(base, tuple(tensors))
    new = cls.__new__(cls)
    new.__dict__.update(module.__dict__)
    new._parameters = OrderedDict((k, v) for k, v in module._parameters.items() if k not in tensors)
    new._buffers = OrderedDict(module._buffers)
    new._modules = OrderedDict((k, v) for k, v in module._modules.items() if k != "parametrizations")
    new._non_persistent_buffers_set = set(module._non_persistent_buffers_set)
    new.palette = {}
    for param, (spec, packed, lut, *scaled) in tensors.items():
        new.palette[param] = spec
        new.register_buffer(f"{param}_indices", packed)
        new.register_buffer(f"{param}_lut", lut)
        scales, offsets = (scaled + [None, None])[:2]
        if spec.scale_block is not None:
            new.register_buffer(f"{param}_scales", scales)
            if spec.scale_offset:
                new.register_buffer(f"{param}_offsets", offsets)
    return new


def set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, module)


def is_palettized(module: nn.Module) -> bool:
    return isinstance(module, PalettizedMixin)


def palettized_modules(model: nn.Module) -> list[tuple[str, nn.Module]]:
    return [(n, m) for n, m in model.named_modules() if isinstance(m, PalettizedMixin)]


__all__ = [
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
    "is_palettized",
    "palettize_module",
    "palettized_class",
    "palettized_modules",
]
