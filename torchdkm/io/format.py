"""The torchdkm file: one safetensors file with packed indices, LUTs, dense tensors and metadata.

Tensors are the finalized model's ``state_dict``: for every palettized weight
``<module>.<param>_indices`` (uint8, bit-packed, see :mod:`torchdkm.pack`) and
``<module>.<param>_lut`` (``(groups, k, dim)``), with per-block scales
``<module>.<param>_scales`` (and ``_offsets``; float16, ``(rows, blocks)``),
and every other tensor as is.
Tensors that share memory (tied weights) are stored once; the others are
listed as aliases.  The safetensors header's ``__metadata__`` holds one key,
``torchdkm``, a JSON document::

    {"format": "torchdkm", "format_version": 2,
     "layers": {"<module>": {"class": "Linear",
                             "params": {"weight": {"shape": [...], "bits": 4,
                                                   "dim": 1, "group_size": 64,
                                                   "scale_block": 32, "scale_offset": false}}}},
     "aliases": {"<key>": "<stored key>"},
     "checksum": "sha256:<hex over every stored tensor, keys sorted>",
     "meta_checksum": "sha256:<hex over the canonical JSON of layers and aliases>"}

``load`` checks everything it reads against the model it fills and raises
:class:`~torchdkm.errors.TorchdkmError` naming what is wrong.  The order:
structure first (so a damaged file gets the most specific message), then the
two checksums, which catch what is consistent but not what was written (a
``group_size`` changed to another that decodes to the same sizes, say).  Memory
stays bounded by the file's size: safetensors checks every declared shape
against the bytes present, and the palette metadata is checked against the
model before anything is unpacked.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections import OrderedDict
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import Tensor, nn

from ..cluster.scales import STORED
from ..errors import TorchdkmError
from ..nn.palettized import PaletteSpec, is_palettized, palettize_module, palettized_modules, set_submodule
from ..nn.parametrization import dkm_parametrizations
from ..pack import packed_size

FORMAT = "torchdkm"
FORMAT_VERSION = 2
#: Versions ``load`` reads: 1 had no block scales (its palettes lack the two ``scale_`` keys).
READABLE_VERSIONS = (1, 2)
#: The torchdkm file inside a pretrained directory (``save_pretrained``, ``torchdkm compress``): the name
#: transformers' ``from_pretrained`` reads.  Directories written before it was chosen hold ``LEGACY_WEIGHTS``.
WEIGHTS = "model.safetensors"
LEGACY_WEIGHTS = "model.dkm.safetensors"


def weights_path(path: str | os.PathLike) -> Path:
    """A torchdkm file, given itself or a pretrained directory that holds it."""
    path = Path(path)
    if path.is_dir():
        for name in (WEIGHTS, LEGACY_WEIGHTS):
            if (path / name).is_file():
                return path / name
        raise TorchdkmError(f"{path}: a directory without {WEIGHTS} (not written by torchdkm compress?)")
    if not path.exists():
        raise TorchdkmError(f"{path}: no such file or directory")
    return path


def user_umask() -> int:
    """The process umask: from /proc on Linux, else by setting it and putting it back (racy across threads)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def honour_umask(path: Path) -> None:
    """Give a file we wrote the mode ``open()`` would have: safetensors creates its files ``0600``."""
    os.chmod(path, 0o666 & ~user_umask())


def checksum(tensors: dict[str, Tensor]) -> str:
    digest = hashlib.sha256()
    for key in sorted(tensors):
        tensor = tensors[key].detach().contiguous().cpu()
        digest.update(key.encode())
        digest.update(str(tensor.dtype).encode() + str(tuple(tensor.shape)).encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().data)
    return "sha256:" + digest.hexdigest()


def meta_checksum(meta: dict[str, Any]) -> str:
    """Digest of the metadata that decides how tensors are decoded and placed: layers and aliases."""
    text = json.dumps({"layers": meta["layers"], "aliases": meta["aliases"]}, sort_keys=True)
    return "sha256:" + hashlib.sha256(text.encode()).hexdigest()


def save(model: nn.Module, path: str | os.PathLike) -> Path:
    """Write a finalized model to ``path``; returns the path."""
    if dkm_parametrizations(model):
        raise TorchdkmError("save: the model still has DKM training layers; call torchdkm.finalize(model) first")
    layers = {name: {"class": module.base_class.__name__, "params": {p: s.to_dict() for p, s in module.palette.items()}}
              for name, module in palettized_modules(model)}  # fmt: skip
    if not layers:
        raise TorchdkmError("save: the model has no palettized layer; prepare, train and finalize it first")
    tensors: dict[str, Tensor] = {}
    aliases: dict[str, str] = {}
    storage_key: dict[tuple, str] = {}
    for key, tensor in model.state_dict().items():
        ident = (tensor.untyped_storage().data_ptr(), tensor.storage_offset(), tuple(tensor.shape), tensor.dtype)
        if tensor.numel() and ident in storage_key:
            aliases[key] = storage_key[ident]
            continue
        storage_key[ident] = key
        tensors[key] = tensor.detach().contiguous().cpu().clone()
    meta = {"format": FORMAT, "format_version": FORMAT_VERSION, "layers": layers, "aliases": aliases,
            "checksum": checksum(tensors)}  # fmt: skip
    meta["meta_checksum"] = meta_checksum(meta)
    path = Path(path)
    save_file(tensors, str(path), metadata={FORMAT: json.dumps(meta)})
    honour_umask(path)
    return path


def read(path: str | os.PathLike) -> tuple[dict[str, Any], dict[str, Tensor]]:
    """Metadata and tensors of a torchdkm file (or a pretrained directory's), verified (checksum, structure)."""
    path = weights_path(path)
    if not path.is_file():
        raise TorchdkmError(f"{path}: not a file")
    try:
        with safe_open(str(path), framework="pt") as handle:
            header = handle.metadata() or {}
            tensors = {key: handle.get_tensor(key) for key in handle.keys()}
    except Exception as err:  # safetensors raises several types for damaged files
        raise TorchdkmError(f"{path}: not a readable safetensors file (truncated or corrupted?): {err}") from None
    if FORMAT not in header:
        raise TorchdkmError(f"{path}: a safetensors file, but not a torchdkm file (no '{FORMAT}' metadata)")
    try:
        meta = json.loads(header[FORMAT])
    except (ValueError, RecursionError) as err:  # JSONDecodeError, an over-long integer, deep nesting
        raise TorchdkmError(f"{path}: torchdkm metadata is not valid JSON: {err}") from None
    _check_meta(path, meta)
    if checksum(tensors) != meta["checksum"]:
        raise TorchdkmError(f"{path}: checksum mismatch: the tensor data is corrupted")
    stored = set(tensors)
    for key, target in meta["aliases"].items():
        if not isinstance(target, str) or target not in stored:
            raise TorchdkmError(f"{path}: alias {key!r} points to missing tensor {target!r}")
        if key in stored:
            raise TorchdkmError(f"{path}: alias {key!r} names a tensor that is also stored")
        tensors[key] = tensors[target]
    return meta, tensors


def saved_dtype(path: str | os.PathLike) -> torch.dtype:
    """The palettized weights' dtype when saved (their LUTs'): what a model to fill is built in (reads one LUT)."""
    path = weights_path(path)
    try:
        with safe_open(str(path), framework="pt") as handle:
            key = next((k for k in handle.keys() if k.endswith("_lut")), None)
            if key is not None:
                return handle.get_tensor(key).dtype
    except Exception as err:  # safetensors raises several types for damaged files
        raise TorchdkmError(f"{path}: not a readable safetensors file (truncated or corrupted?): {err}") from None
    raise TorchdkmError(f"{path}: no LUT in the file: not a torchdkm file")


def _check_meta(path: Path, meta: Any) -> None:
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise TorchdkmError(f"{path}: metadata does not describe a torchdkm file")
    version = meta.get("format_version")
    if version not in READABLE_VERSIONS or isinstance(version, bool):
        raise TorchdkmError(
            f"{path}: format_version {version!r} is not supported (this torchdkm reads {list(READABLE_VERSIONS)})"
        )
    for key, kind in (("layers", dict), ("aliases", dict), ("checksum", str), ("meta_checksum", str)):
        if not isinstance(meta.get(key), kind):
            raise TorchdkmError(f"{path}: metadata key {key!r} is missing or not a {kind.__name__}")


def load(path: str | os.PathLike, model: nn.Module) -> nn.Module:
    """Fill a freshly built model of the same architecture from ``path``; returns it in eval mode.

    ``path`` is a torchdkm file or a directory written by ``save_pretrained`` /
    ``torchdkm compress``.  Eval mode because a palettized model is for
    inference: its weights are decoded from buffers and cannot be trained
    (``model.train()`` turns dropout back on if you need it).
    """
    path = weights_path(path)
    meta, tensors = read(path)
    model = palettize_from_meta(path, model, meta, tensors)
    _fill(path, model, meta, tensors)
    return model.eval()


def palettize_from_meta(
    path: str | os.PathLike, model: nn.Module, meta: dict[str, Any], tensors: dict[str, Tensor] | None = None
) -> nn.Module:
    """Swap every layer the file lists for its palettized class; returns the model.

    ``tensors=None`` (transformers' loader fills the buffers afterwards, see
    :mod:`torchdkm.integrations.hf_quantizer`): empty buffers of the shapes the
    metadata gives, on the device of the weight they replace.
    """
    path = Path(path)
    _check_meta(path, meta)
    for name, entry in meta["layers"].items():
        module = _layer(path, model, name, entry)
        palettes = {param: _palette(path, name, module, param, raw, tensors) for param, raw in entry["params"].items()}
        new = palettize_module(module, palettes)
        if name == "":
            model = new
        else:
            set_submodule(model, name, new)
    tie_palettes(model, meta)  # transformers' loader then fills one placeholder per tied tensor
    return model


def load_into_palettized(path: str | os.PathLike, model: nn.Module) -> None:
    """Read ``path`` (verified) into a model :func:`palettize_from_meta` prepared without tensors."""
    path = Path(path)
    meta, tensors = read(path)
    for name, entry in meta["layers"].items():
        module = _layer(path, model, name, entry, palettized=True)
        for param, raw in entry["params"].items():
            _palette(path, name, module, param, raw, tensors)
    _fill(path, model, meta, tensors)


def _layer(path: Path, model: nn.Module, name: str, entry: Any, palettized: bool = False) -> nn.Module:
    """The model's module for one layer of the file, checked against the file's description of it."""
    try:
        module = model.get_submodule(name)
    except AttributeError:
        raise TorchdkmError(f"{path}: the model has no module {name!r} (file made for another architecture?)") from None
    if not isinstance(entry, dict) or not isinstance(entry.get("params"), dict):
        raise TorchdkmError(f"{path}: metadata for layer {name!r} is malformed")
    if is_palettized(module) != palettized:
        raise TorchdkmError(
            f"{path}: layer {name!r} of the model is already palettized; load into a freshly built model"
        )
    expected = entry.get("class")
    if not isinstance(expected, str) or expected not in [t.__name__ for t in type(module).__mro__]:
        expected = expected if isinstance(expected, str) else _short(expected)
        raise TorchdkmError(
            f"{path}: layer {name!r} is a {expected} in the file but a {type(module).__name__} in the model"
        )
    if not entry["params"]:
        raise TorchdkmError(f"{path}: metadata for layer {name!r} is malformed (no parameter)")
    return module


def _fill(path: Path, model: nn.Module, meta: dict[str, Any], tensors: dict[str, Tensor]) -> None:
    """Every tensor of the file into the (palettized) model, strictly; then the metadata checksum."""
    wanted = model.state_dict()
    for key, tensor in tensors.items():
        if key in wanted and tensor.dtype != wanted[key].dtype:
            raise TorchdkmError(
                f"{path}: tensor {key!r} is {tensor.dtype} in the file but {wanted[key].dtype} in the model"
            )
    state = OrderedDict(tensors)
    # the model's own module versions: a module that reads its version on load (torchvision's MNASNet
    # refuses none) loads the file as it loads its own state_dict
    state._metadata = getattr(wanted, "_metadata", OrderedDict())  # type: ignore[attr-defined]
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as err:
        raise TorchdkmError(f"{path}: file does not match the model: {err}") from None
    if meta_checksum(meta) != meta["meta_checksum"]:
        raise TorchdkmError(f"{path}: metadata checksum mismatch: the layer metadata is corrupted")
    tie_palettes(model, meta)


def tie_palettes(model: nn.Module, meta: dict[str, Any]) -> None:
    """Make palette buffers the file stores once (tied weights) one tensor again, as they were when saved.

    ``load_state_dict`` copies values, and transformers' loader may give every
    buffer its own tensor: without this a tied embedding and output head would
    load as two equal copies, twice the memory, no longer one weight.
    """
    for key, target in meta["aliases"].items():
        if not isinstance(key, str) or not isinstance(target, str):
            continue  # a malformed file: the strict load names it
        owner, _, name = key.rpartition(".")
        source_owner, _, source_name = target.rpartition(".")
        try:
            module, source = model.get_submodule(owner), model.get_submodule(source_owner)
        except AttributeError:
            continue  # not this model's: the strict load names it
        if is_palettized(module) and name in module._buffers and source_name in source._buffers:
            module._buffers[name] = source._buffers[source_name]


def _palette(path: Path, name: str, module: nn.Module, param: str, raw: Any, tensors: dict[str, Tensor] | None):
    where = f"{path}: layer {name!r} parameter {param!r}"
    spec = _spec(where, raw)
    layout = spec.layout
    current = getattr(module, param, None) if isinstance(param, str) else None
    if not isinstance(current, Tensor):
        raise TorchdkmError(f"{where}: the model's module has no tensor {param!r}")
    # Checked against the model before any size is computed from it (a huge shape allocates nothing).
    if tuple(current.shape) != spec.shape:
        raise TorchdkmError(f"{where}: shape {list(spec.shape)} in the file, {list(current.shape)} in the model")
    if not 1 <= spec.bits <= 8 or spec.dim < 1 or not 1 <= spec.group_size <= layout.out:
        raise TorchdkmError(f"{where}: invalid bits/dim/group_size {spec.bits}/{spec.dim}/{spec.group_size}")
    blocks = spec.scales
    if tensors is None:  # placeholders, filled by transformers' loader
        device = current.device
        empty = [] if blocks is None else [torch.empty(blocks.shape, dtype=STORED, device=device)]
        return (
            spec,
            torch.empty(packed_size(spec.index_count, spec.bits), dtype=torch.uint8, device=device),
            (torch.empty(layout.groups, 2**spec.bits, spec.dim, dtype=current.dtype, device=device)),
            *(empty * (1 + (blocks is not None and blocks.offset))),
        )
    prefix = f"{name}." if name else ""
    packed = tensors.get(f"{prefix}{param}_indices")
    lut = tensors.get(f"{prefix}{param}_lut")
    if packed is None or lut is None:
        raise TorchdkmError(f"{where}: indices or LUT missing from the file")
    need = packed_size(spec.index_count, spec.bits)
    if packed.dtype != torch.uint8 or tuple(packed.shape) != (need,):
        raise TorchdkmError(
            f"{where}: indices should be {need} uint8 bytes, found {tuple(packed.shape)} {packed.dtype}"
        )
    want = (layout.groups, 2**spec.bits, spec.dim)
    if tuple(lut.shape) != want or not lut.is_floating_point():
        raise TorchdkmError(
            f"{where}: LUT should be a float tensor of shape {want}, found {tuple(lut.shape)} {lut.dtype}"
        )
    if not bool(torch.isfinite(lut).all()):
        raise TorchdkmError(f"{where}: LUT holds NaN/Inf values")
    if lut.dtype != current.dtype:
        raise TorchdkmError(
            f"{where}: LUT is {lut.dtype} in the file but the model's {param} is {current.dtype}; "
            "build the model in the file's dtype"
        )
    if blocks is None:
        return spec, packed, lut
    stored = [_block_tensor(where, tensors, f"{prefix}{param}_scales", blocks.shape)]
    if blocks.offset:
        stored.append(_block_tensor(where, tensors, f"{prefix}{param}_offsets", blocks.shape))
    return spec, packed, lut, *stored


def _block_tensor(where: str, tensors: dict[str, Tensor], key: str, shape: tuple[int, int]) -> Tensor:
    """A per-block scale or offset tensor, checked: float16, ``shape``, finite."""
    found = tensors.get(key)
    if found is None:
        raise TorchdkmError(f"{where}: {key.rsplit('.', 1)[-1]} missing from the file")
    if found.dtype != STORED or tuple(found.shape) != shape:
        what = f"{tuple(found.shape)} {found.dtype}"
        raise TorchdkmError(f"{where}: {key.rsplit('.', 1)[-1]} should be float16 of shape {shape}, found {what}")
    if not bool(torch.isfinite(found).all()):
        raise TorchdkmError(f"{where}: {key.rsplit('.', 1)[-1]} hold NaN/Inf values")
    return found


def _spec(where: str, raw: Any) -> PaletteSpec:
    """A :class:`PaletteSpec` from the file's JSON, accepting only what ``save`` writes (no coercion)."""

    def whole(value: Any) -> bool:
        return isinstance(value, int) and not isinstance(value, bool)

    fields = ("shape", "bits", "dim", "group_size")
    scaled = ("scale_block", "scale_offset")  # (format version 2)
    transposed = isinstance(raw, dict) and raw.get("transposed") is True  # written only when set, only for 2-D
    extra = {"transposed"} if transposed else set()
    if (
        not isinstance(raw, dict)
        or set(raw) not in (set(fields) | extra, set(fields + scaled) | extra)
        or not isinstance(raw["shape"], list)
        or not all(whole(v) for v in raw["shape"])
        or not all(whole(raw[f]) for f in fields[1:])
        or (transposed and len(raw["shape"]) != 2)
        or not (raw.get("scale_block") is None or (whole(raw["scale_block"]) and raw["scale_block"] >= 0))
        or not isinstance(raw.get("scale_offset", False), bool)
        or (raw.get("scale_offset") and raw.get("scale_block") is None)
    ):
        raise TorchdkmError(f"{where}: malformed palette metadata {_short(raw)}")
    block = raw.get("scale_block")
    if block and block % raw["dim"]:
        raise TorchdkmError(f"{where}: scale_block {block} is not a multiple of dim {raw['dim']}")
    return PaletteSpec(tuple(raw["shape"]), raw["bits"], raw["dim"], raw["group_size"], scale_block=block,
                       scale_offset=raw.get("scale_offset", False), transposed=transposed)  # fmt: skip


def _short(value: Any, limit: int = 200) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[:limit] + "..."
