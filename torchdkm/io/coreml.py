"""Core ML export: a finalized model to an ``.mlpackage`` whose weights stay palettized.

How.  coremltools' own convention, the one ``coremltools.optimize.torch``
palettizers use: a module carries buffers named
``_COREML_/<param>/compression_type`` (``[2]``, palettization),
``_COREML_/<param>/lut`` and ``_COREML_/<param>/vector_axis``; ``ct.convert``
then turns that parameter into a ``constexpr_lut_to_dense`` op (indices + LUT)
instead of a dense constant.  We hand it the snapped dense weight and the LUT
laid out as the iOS 18 op wants it (``lut.rank == weight.rank + 2``); the
converter recovers the indices by nearest-centroid search, which is exact
because every snapped weight vector *is* a centroid.  This path was chosen over
post-conversion ``palettize_weights(mode="unique")`` because it keeps
torchdkm's LUTs as they are (per-tensor, per-grouped-channel and vector LUTs)
rather than re-clustering.

Layouts.  A palettized weight maps to Core ML natively when its vectors run
along one axis (``dim == 1``, or the weight's last non-unit axis is a
multiple of ``dim``: Linear/Embedding rows, 1x1 convs).  A group size that
does not divide the output channels is expressed with one LUT per channel
(each a copy of its group's LUT).  Otherwise (vectors that cross kernel rows,
e.g. 3x3 convs with ``dim=4``) the weight is stored as its ``(groups,
vectors * dim)`` vector matrix, palettized along axis 1, and reshaped back in
the graph (a reshape and a slice per such weight).  Core ML has no 5- or
7-bit indices: those LUTs are padded to 6 / 8 bits with copies of the last
centroid.  ``minimum_deployment_target`` must be iOS 18 or later (vector and
grouped LUTs); LUTs are stored in the compute precision (fp16 by default).

Block scales (``scale_block``).  coremltools' ``palettization_scale`` metadata
makes the converter follow the LUT op with ``constexpr_blockwise_shift_scale``
(the decoded normalised weight times its block's scale).  Core ML blocks must
divide the axis they run along: blocks that do not divide a row are given at
the largest block length that divides both (each block's scale repeated).
Such a weight is stored as ``(out, blocks, block)`` and reshaped
back in the graph.  The converter's metadata path has no offsets: asymmetric blocks
(``scale_offset``) add theirs in the graph, an ``add`` of an ``(out, blocks, 1)``
constant after the blockwise scale (stored in the compute precision, as many values as
the torchdkm file holds).  Scales on vectors that cross kernel rows are refused with a message.

Core ML runs predictions only on Apple platforms; on Linux the package can be
built, saved and inspected (see :func:`lut_ops`), not run.
"""

from __future__ import annotations

import copy
import logging
import math
import os
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from ..errors import TorchdkmError
from ..nn.palettized import PaletteSpec, PalettizedMixin, palettized_modules, set_submodule
from ..nn.parametrization import dkm_parametrizations

PALETTIZATION = 2  # coremltools CompressionType.PALETTIZATION
CORE_ML_BITS = (1, 2, 3, 4, 6, 8)  # index widths constexpr_lut_to_dense accepts


def _coremltools() -> Any:
    logging.getLogger("coremltools").setLevel(logging.ERROR)  # import chatter about missing macOS libraries
    try:
        import coremltools as ct
    except ImportError:
        raise TorchdkmError("Core ML export needs coremltools: pip install 'torchdkm[coreml]'") from None
    return ct


def vector_axis(spec: PaletteSpec) -> int | None:
    """The weight axis its vectors run along, or ``None`` when they cross axes (scalars: axis 1).

    A transposed weight (``Conv1D``, ``(in, out)``) has its vectors along axis 0, its LUT groups along axis 1.
    """
    if spec.dim == 1:
        return 1
    if spec.transposed:
        return None if spec.shape[0] % spec.dim else 0
    axes = [i for i in range(1, len(spec.shape)) if spec.shape[i] != 1]
    if not axes or spec.shape[axes[-1]] % spec.dim:
        return None
    return axes[-1]


def _pad_lut(lut: Tensor) -> Tensor:
    """Pad the centroid axis (-2) to a width Core ML supports, repeating the last centroid."""
    k = lut.shape[-2]
    bits = next(b for b in CORE_ML_BITS if 2**b >= k)
    if 2**bits == k:
        return lut
    extra = lut.narrow(-2, k - 1, 1).expand(*lut.shape[:-2], 2**bits - k, lut.shape[-1])
    return torch.cat([lut, extra], dim=-2)


def _metadata(module: nn.Module, param: str, lut: Tensor, axis: int | None) -> None:
    module.register_buffer(f"_COREML_/{param}/compression_type", torch.tensor([PALETTIZATION]))
    module.register_buffer(f"_COREML_/{param}/lut", _pad_lut(lut).contiguous())
    if axis is not None and lut.shape[-1] > 1:
        module.register_buffer(f"_COREML_/{param}/vector_axis", torch.tensor(axis))


@dataclass(frozen=True)
class _BlockTables:
    """A weight's block scales (and offsets) as Core ML's blocks want them: ``(out, blocks, 1)``, float32."""

    scales: Tensor
    offsets: Tensor | None
    step: int  # Core ML's block length


def _block_tables(module: nn.Module, param: str, spec: PaletteSpec, axis: int | None) -> _BlockTables | None:
    """The block tables of a weight with block scales, or ``None``.

    Core ML's blocks must divide the axis they run along: the block length is
    the largest that divides both the row and ``scale_block`` (each block's
    scale and offset repeated over its pieces).
    """
    blocks = spec.scales
    if blocks is None:
        return None
    if axis is None:
        raise TorchdkmError(
            f"Core ML export: {type(module).__name__} {param}: block scales on vectors that cross rows have no Core ML form"
        )
    step = math.gcd(blocks.block, blocks.row_len)

    def per_piece(name: str) -> Tensor:
        table = getattr(module, f"{param}_{name}").repeat_interleave(blocks.block // step, dim=1)
        return table[:, : blocks.row_len // step].unsqueeze(-1).float()

    return _BlockTables(per_piece("scales"), per_piece("offsets") if blocks.offset else None, step)


def _vector_class(base: type, crossing: tuple[str, ...], blocked: tuple[str, ...] = ()) -> type:
    """``base`` whose params are rebuilt in the graph: ``crossing`` ones from a palettized ``<param>_vectors``
    matrix, ``blocked`` ones (block scales) from a palettized, blockwise-scaled ``<param>_blocks`` tensor."""

    def from_vectors(param: str):
        def get(self):
            spec = self.palette[param]
            layout = spec.layout
            vectors = getattr(self, f"{param}_vectors")
            weight = layout.from_vectors(vectors.view(layout.groups, layout.vectors, -1))
            return weight.transpose(0, 1) if spec.transposed else weight  # the converter has no `mT`

        return property(get)

    def from_blocks(param: str):
        def get(self):
            spec = self.palette[param]
            blocks = getattr(self, f"{param}_blocks")
            offsets = self._buffers.get(f"{param}_block_offsets")
            weight = (blocks if offsets is None else blocks + offsets).reshape(spec.layout.shape)
            return weight.transpose(0, 1) if spec.transposed else weight  # Conv1D: blocks ran along its rows

        return property(get)

    props = {p: from_vectors(p) for p in crossing} | {p: from_blocks(p) for p in blocked}
    return type(f"CoreML{base.__name__}", (base,), props)


@torch.no_grad()
def coreml_ready(model: nn.Module) -> nn.Module:
    """A copy of a finalized model that ``ct.convert`` turns into LUT ops.

    Each palettized module becomes its original class again, with the snapped
    weight as a plain tensor plus coremltools' palettization metadata (see the
    module docstring).  The copy computes the same outputs as ``model``.
    """
    if dkm_parametrizations(model):
        raise TorchdkmError("Core ML export: the model still has DKM training layers; call torchdkm.finalize first")
    ready = copy.deepcopy(model)
    found = [(n, m) for n, m in ready.named_modules() if isinstance(m, PalettizedMixin)]
    if not found:
        raise TorchdkmError("Core ML export: the model has no palettized layer; finalize it first")
    for name, module in found:
        new = _plain_module(module)
        if name == "":
            ready = new
        else:
            set_submodule(ready, name, new)
    return ready.eval()


def _plain_module(module: nn.Module) -> nn.Module:
    crossing = tuple(p for p, s in module.palette.items() if vector_axis(s) is None and s.scales is None)
    blocked = tuple(p for p, s in module.palette.items() if s.scales is not None)
    base = module.base_class
    cls = _vector_class(base, crossing, blocked) if crossing or blocked else base
    new = cls.__new__(cls)
    new.__dict__.update(module.__dict__)
    hidden = {f"{p}_{s}" for p in module.palette for s in ("indices", "lut", "scales", "offsets")}
    new._buffers = OrderedDict((k, v) for k, v in module._buffers.items() if k not in hidden)
    new._parameters = OrderedDict(module._parameters)
    new._non_persistent_buffers_set = set(module._non_persistent_buffers_set) - hidden
    for param, spec in module.palette.items():
        layout = spec.layout
        index = spec.indices(getattr(module, f"{param}_indices"))
        lut = getattr(module, f"{param}_lut")
        axis = vector_axis(spec)
        tables = _block_tables(module, param, spec, axis)
        if axis is None:  # store the (groups, vectors * dim) matrix, palettized along axis 1
            vectors = torch.gather(lut, 1, index.unsqueeze(-1).expand(-1, -1, spec.dim))
            flat = vectors.reshape(layout.groups, -1).clone()
            new.register_parameter(f"{param}_vectors", nn.Parameter(flat, False))  # a parameter: torch.export lifts it
            _metadata(new, f"{param}_vectors", lut.unsqueeze(1), 1)
            continue
        if layout.groups > 1 and layout.out % layout.group_size:
            lut = lut[torch.arange(layout.out) // layout.group_size]  # one LUT per channel
        if tables is not None:  # (out, blocks, block): palettized along the block axis, scaled per block
            packed, scales = getattr(module, f"{param}_indices"), getattr(module, f"{param}_scales")
            zero = None if tables.offsets is None else torch.zeros_like(scales)  # LUT x scale, the offsets added after
            blocks = spec.decode(packed, getattr(module, f"{param}_lut"), scales, zero)
            blocks = (blocks.mT if spec.transposed else blocks).reshape(spec.layout.shape[0], -1, tables.step)
            new.register_parameter(f"{param}_blocks", nn.Parameter(blocks.contiguous(), False))
            _metadata(new, f"{param}_blocks", lut.reshape(lut.shape[0], 1, 1, *lut.shape[1:]), 2)
            new.register_buffer(f"_COREML_/{param}_blocks/palettization_scale", tables.scales)
            if tables.offsets is not None:
                new.register_buffer(f"{param}_block_offsets", tables.offsets)
            continue
        shape = (lut.shape[0],) + (1,) * (len(spec.shape) - 1) + tuple(lut.shape[1:])
        if spec.transposed:  # (in, out): one LUT per group of output channels, along axis 1
            shape = (1, lut.shape[0]) + tuple(lut.shape[1:])
        weight = spec.decode(getattr(module, f"{param}_indices"), getattr(module, f"{param}_lut"))
        new.register_parameter(param, nn.Parameter(weight, False))
        _metadata(new, param, lut.reshape(shape), axis)
    if not crossing and not blocked:
        del new.__dict__["palette"]
    return new


def export_coreml(
    model: nn.Module,
    example_inputs: tuple[Tensor, ...],
    path: str | os.PathLike | None = None,
    *,
    input_names: list[str] | None = None,
    output_names: list[str] | None = None,
    compute_precision: str = "float16",
    deployment_target: str = "iOS18",
    frontend: str = "trace",
) -> Any:
    """Capture a finalized model and convert it to a Core ML ``mlprogram``; returns the ``MLModel``.

    ``example_inputs`` fix the input shapes (Core ML wants static shapes by
    default); integer inputs become int32.  With ``path`` (``*.mlpackage``) the
    package is saved too.  Weights that torchdkm palettized become
    ``constexpr_lut_to_dense`` ops; everything else stays dense.  ``frontend``:
    ``"trace"`` (``torch.jit.trace``, deprecated by torch but what coremltools
    supports best) or ``"export"`` (``torch.export``).  A bfloat16 (or float64) model is exported from a
    float32 copy: Core ML stores float16 and float32 only.
    """
    ct = _coremltools()
    if path is not None and Path(path).suffix != ".mlpackage":
        raise TorchdkmError(f"Core ML export: {path} should end in .mlpackage")
    target = getattr(ct.target, deployment_target, None)
    if target is None or target < ct.target.iOS18:
        raise TorchdkmError(f"Core ML export: deployment_target {deployment_target!r} must be iOS18 or later")
    precision = {"float16": ct.precision.FLOAT16, "float32": ct.precision.FLOAT32}.get(compute_precision)
    if precision is None:
        raise TorchdkmError(
            f"Core ML export: compute_precision must be 'float16' or 'float32', not {compute_precision!r}"
        )
    example_inputs = tuple(example_inputs)
    names = input_names or [f"input_{i}" for i in range(len(example_inputs))]
    inputs = [
        ct.TensorType(name=n, shape=tuple(x.shape), dtype=np.int32 if not x.is_floating_point() else np.float32)
        for n, x in zip(names, example_inputs)
    ]
    ready = coreml_ready(model)
    tensors = [*ready.parameters(), *ready.buffers()]
    if any(t.is_floating_point() and t.dtype not in (torch.float16, torch.float32) for t in tensors):
        ready = ready.to(torch.float32)  # Core ML holds float16 and float32: bfloat16 widens exactly
        example_inputs = tuple(x.to(torch.float32) if x.is_floating_point() else x for x in example_inputs)
    if frontend == "trace":
        captured = torch.jit.trace(ready, example_inputs, strict=False)
    elif frontend == "export":
        captured = torch.export.export(ready, example_inputs).run_decompositions({})
    else:
        raise TorchdkmError(f"Core ML export: frontend must be 'trace' or 'export', not {frontend!r}")
    outputs = [ct.TensorType(name=n) for n in output_names] if output_names else None
    pipeline = ct.PassPipeline.DEFAULT
    if any(s.scales is not None and s.dim > 1 for _, m in palettized_modules(model) for s in m.palette.values()):
        # coremltools 9.0's canonicalize_quantized_lut_pattern rebuilds a vector LUT op followed by a
        # blockwise scale without its vector_axis (and then fails): skip that pass for such models
        pipeline.remove_passes(["common::canonicalize_quantized_lut_pattern"])
    mlmodel = ct.convert(
        captured,
        inputs=inputs,
        outputs=outputs,
        convert_to="mlprogram",
        minimum_deployment_target=target,
        compute_precision=precision,
        pass_pipeline=pipeline,
    )
    if path is not None:
        mlmodel.save(str(path))
    return mlmodel


@dataclass(frozen=True)
class LutOp:
    """One ``constexpr_lut_to_dense`` op of a converted program."""

    name: str
    shape: tuple[int, ...]  # the dense tensor it produces
    lut_shape: tuple[int, ...]
    nbits: int
    vector_axis: int | None
    op: Any  # the MIL operation (``op.materialized_val_inference()`` decodes it)


def lut_ops(converted: Any) -> list[LutOp]:
    """The LUT ops of an ``MLModel`` (via its MIL program) or of a MIL ``Program``."""
    program = getattr(converted, "_mil_program", converted)
    if program is None or not hasattr(program, "functions"):
        raise TorchdkmError("lut_ops: pass an MLModel made by ct.convert in this process, or a MIL Program")
    found = []
    for function in program.functions.values():
        for op in function.operations:
            if op.op_type != "constexpr_lut_to_dense":
                continue
            axis = op.inputs.get("vector_axis")
            found.append(
                LutOp(
                    name=op.name,
                    shape=tuple(op.outputs[0].shape),
                    lut_shape=tuple(op.lut.shape),
                    nbits=int(np.log2(op.lut.shape[-2])),
                    vector_axis=None if axis is None else int(axis.val),
                    op=op,
                )
            )
    return found


def weight_file_bytes(package: str | os.PathLike) -> int:
    """Size of an ``.mlpackage``'s weight file(s): what the weights cost on disk."""
    root = Path(package) / "Data" / "com.apple.CoreML" / "weights"
    return sum(f.stat().st_size for f in root.rglob("*") if f.is_file())


__all__ = ["LutOp", "coreml_ready", "export_coreml", "lut_ops", "vector_axis", "weight_file_bytes"]
