"""Kernels: each declared once, implemented per backend, chosen when a layer is prepared.

A kernel is a named pass over tensors (``count``, ``present``, ``expand``,
``sum_per_key``, ``affine``, ``scatter``, ``gram_scatter``, ``nearest_two``,
``row_sets``: the uniquified and sparse paths' passes over the weights).  Each has a torch implementation
(:mod:`.default`, any device, any dtype) and, on the CPU, a native one
(:mod:`.cpu`, C loops built on first use, for the dtypes :data:`.cpu.DTYPES`
lists).  Each is also declared once as a PyTorch custom op,
``torch.ops.torchdkm.<name>``, whose default kernel is the torch one and whose
CPU kernel is the native one where it was built: that is the form
``torch.compile`` and ``torch.export`` see, and where a CUDA kernel will register.

:func:`select` is called once per layer plan (:mod:`torchdkm.cluster.plan`) and
returns a :class:`Kernels` holding the implementation of each kernel to call
directly (a dispatcher call costs ~15 us; a small layer's step makes dozens),
so no call asks again which backend runs.  Users switch the native loops off
with ``TORCHDKM_NATIVE=0``; tests pass ``backend="native"`` or ``"torch"``.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass

import torch

from . import build, cpu, default, lut

BACKENDS = ("native", "torch")
NAMES = ("count", "present", "expand", "sum_per_key", "affine", "scatter", "gram_scatter", "nearest_two", "row_sets")
#: The block scales' kernels (:mod:`torchdkm.cluster.scales`), for weights of the layer's dtype.
BLOCK_NAMES = ("normalise", "rescale", "rescale_grad", "normalise_grad")


@dataclass(frozen=True)
class Kernels:
    """The implementation of every kernel for one layer's device and dtype (see :func:`select`)."""

    backend: str  # "native" where the native loops run (those that take the dtype), else "torch"
    count: Callable
    present: Callable
    expand: Callable
    sum_per_key: Callable
    affine: Callable
    scatter: Callable
    gram_scatter: Callable
    nearest_two: Callable
    row_sets: Callable
    normalise: Callable
    rescale: Callable
    rescale_grad: Callable
    normalise_grad: Callable
    affine_table: torch.dtype | None  # the dtype of ``affine``'s tables (None: the gradient's)


def native_available() -> bool:
    """Whether the native loops are built (or can be) on this machine and not switched off."""
    return os.environ.get("TORCHDKM_NATIVE", "1") != "0" and build.library() is not None


def select(device: torch.device | str, dtype: torch.dtype, backend: str | None = None) -> Kernels:
    """The kernels for a weight of ``dtype`` on ``device`` (its gradients come in the same dtype).

    ``backend``: ``"native"`` (raises if the loops cannot be had here), ``"torch"``, or ``None``
    for the native loops on the CPU where they are available.  A kernel whose native loop does not
    take ``dtype`` (or the compute dtype) is the torch one either way.
    """
    if backend not in (None, *BACKENDS):
        raise ValueError(f"backend must be one of {BACKENDS} or None, got {backend!r}")
    on_cpu = torch.device(device).type == "cpu"
    if backend == "native" and not (on_cpu and build.library() is not None):
        raise RuntimeError(f"the native loops cannot run here (device {device}, built: {build.library() is not None})")
    native = backend == "native" or (backend is None and on_cpu and native_available())
    compute = torch.float64 if dtype == torch.float64 else torch.float32
    checked = {"sum_per_key": dtype, "affine": dtype, "scatter": compute, "gram_scatter": compute, "nearest_two": compute, "row_sets": compute}
    checked |= dict.fromkeys(BLOCK_NAMES, dtype)
    chosen = {name: _implementation(name, native, checked.get(name)) for name in NAMES + BLOCK_NAMES}
    table = cpu.TABLE_DTYPE if chosen["affine"] is cpu.affine else None
    return Kernels("native" if native else "torch", affine_table=table, **chosen)


def _implementation(name: str, native: bool, dtype: torch.dtype | None) -> Callable:
    takes = cpu.DTYPES[name]
    if native and (takes is None or dtype in takes):
        return getattr(cpu, name)
    return getattr(default, name)


# -- the same kernels as PyTorch custom ops (the dispatcher picks the backend by device) ------------------


def _cpu_kernel(name: str, dtype_of: Callable | None = None) -> Callable:
    def run(*args):
        dtype = dtype_of(*args) if dtype_of is not None else None
        return _implementation(name, native_available(), dtype)(*args)

    return run


_lib = torch.library.Library("torchdkm", "DEF")
_SCHEMAS = {
    "count": ("(Tensor patterns, int group_numel, int table_size) -> Tensor", None),
    "present": ("(Tensor table) -> Tensor", None),
    "expand": ("(Tensor patterns, int group_numel, Tensor table) -> Tensor", None),
    "sum_per_key": (
        "(Tensor patterns, int group_numel, Tensor values, Tensor live, int table_size, ScalarType dtype) -> Tensor",
        lambda patterns, group_numel, values, *rest: values.dtype,
    ),
    "affine": (
        "(Tensor patterns, int group_numel, Tensor shift, Tensor slope, Tensor grad) -> Tensor",
        lambda patterns, group_numel, shift, slope, grad: grad.dtype if shift.dtype == cpu.TABLE_DTYPE else None,
    ),
    "scatter": ("(Tensor(a!) sums, Tensor keys, Tensor src) -> ()", lambda sums, keys, src: src.dtype),
    "gram_scatter": (
        "(Tensor(a!) sums, Tensor keys, Tensor xt, Tensor? m, int first) -> ()",
        lambda sums, keys, xt, *rest: xt.dtype,
    ),
    "nearest_two": ("(Tensor xt, Tensor c) -> (Tensor, Tensor, Tensor)", lambda xt, c: c.dtype),
    "row_sets": (
        "(Tensor xt, Tensor c, Tensor inv_tau, int top, Tensor? pad, Tensor? index, Tensor? first, Tensor? second,"
        " float hard_score, float reselect) -> (Tensor, Tensor, Tensor, Tensor)",
        lambda xt, c, *rest: c.dtype,
    ),
    "normalise": ("(Tensor weight, int block, Tensor safe, Tensor? offset) -> Tensor", lambda weight, *rest: weight.dtype),
    "rescale": ("(Tensor normalised, int block, Tensor scale, Tensor? offset) -> Tensor", lambda n, *rest: n.dtype),
    "rescale_grad": (
        "(Tensor grad, Tensor normalised, int block, Tensor scale) -> (Tensor, Tensor, Tensor)",
        lambda grad, *rest: grad.dtype,
    ),
    "normalise_grad": (
        "(Tensor grad, Tensor weight, int block, Tensor scale, Tensor safe, Tensor? offset, Tensor high, Tensor? low, "
        "Tensor? extra_scale, Tensor? extra_offset) -> Tensor",
        lambda grad, *rest: grad.dtype,
    ),
}
for _name, (_schema, _dtype_of) in _SCHEMAS.items():
    _lib.define(_name + _schema)
    _lib.impl(_name, getattr(default, _name), "CompositeExplicitAutograd")
    _lib.impl(_name, _cpu_kernel(_name, _dtype_of), "CPU")


# -- palettized inference (torch.ops.torchdkm.lut_rows / lut_linear): decode rows, or x @ W.T from the indices --
_lib.define("lut_rows(Tensor packed, Tensor lut, int bits, int dim, int group_size, int row_len, Tensor rows) -> Tensor")
_lib.define(
    "lut_linear(Tensor x, Tensor packed, Tensor lut, int bits, int dim, int group_size, int out_features, "
    "Tensor? bias, Tensor? scales=None, Tensor? offsets=None, int block=0) -> Tensor"
)
for _name in ("lut_rows", "lut_linear"):
    _lib.impl(_name, getattr(default, _name), "CompositeExplicitAutograd")
    _lib.impl(_name, lambda *args, _name=_name: getattr(lut if lut.available() else default, _name)(*args), "CPU")


@torch.library.register_fake("torchdkm::lut_rows")
def _lut_rows_shape(packed, lut_, bits, dim, group_size, row_len, rows):
    return lut_.new_empty(rows.numel(), row_len)


@torch.library.register_fake("torchdkm::lut_linear")
def _lut_linear_shape(x, packed, lut_, bits, dim, group_size, out_features, bias, scales=None, offsets=None, block=0):
    return x.new_empty(*x.shape[:-1], out_features)


def _lut_linear_context(ctx, inputs, output) -> None:
    x, packed, lut_, bits, dim, group_size, out_features, bias, *scaled = inputs
    scales, offsets, block = (scaled + [None, None, 0])[:3]
    ctx.save_for_backward(packed, lut_, scales, offsets)
    ctx.spec = (bits, dim, group_size, x.shape[-1], out_features, block)
    ctx.bias = bias is not None


def _lut_linear_backward(ctx, grad):
    """The input's gradient ``grad @ W``, a tile of ``W`` at a time (the packed weight itself has none)."""
    packed, lut_, scales, offsets = ctx.saved_tensors
    bits, dim, group_size, row_len, out_features, block = ctx.spec
    flat = grad.reshape(-1, out_features)
    grad_x = flat.new_zeros(flat.shape[0], row_len)
    tile = max(1, default.LUT_TILE // max(row_len, 1))
    for start in range(0, out_features, tile):
        rows = torch.arange(start, min(start + tile, out_features), device=grad.device)
        weight = torch.ops.torchdkm.lut_rows(packed, lut_, bits, dim, group_size, row_len, rows)
        weight = default.scale_rows(weight, rows, scales, offsets, block)
        grad_x.addmm_(flat[:, start : start + rows.numel()], weight.to(grad.dtype))
    grad_bias = flat.sum(0) if ctx.bias else None
    grad_x = grad_x.reshape(*grad.shape[:-1], row_len)
    return grad_x, None, None, None, None, None, None, grad_bias, None, None, None


torch.library.register_autograd("torchdkm::lut_linear", _lut_linear_backward, setup_context=_lut_linear_context)

__all__ = ["BACKENDS", "Kernels", "native_available", "select"]
