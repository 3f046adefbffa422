"""Forward passes of palettized modules that never materialise the dense weight.

* ``Linear`` (and transformers' ``Conv1D``): ``x @ W.T`` from the packed indices, the LUT and the block
  scales (native loops on the CPU, see :mod:`torchdkm.kernels.lut`, called directly with the module's
  prepared :func:`packed_weight` in eager gradient-free forwards; ``torch.ops.torchdkm.lut_linear``
  otherwise, a tile-at-a-time torch kernel off the CPU).
* ``Embedding``: ``torch.ops.torchdkm.lut_rows`` decodes only the rows looked up, bit for bit the rows of
  the decoded weight.
* ``Conv1d/2d/3d``: a tile of output channels at a time, :data:`CONV_TILE` weights, each convolved and
  written into the output.  Why tiles and not one buffer kept per module: a kept buffer is the dense weight
  again, for as long as the model lives.  Why not smaller tiles: each tile convolves the whole input again,
  and most convolution weights (under 1M weights) fit in one tile, so they run as one call.

Extra memory of a forward: one tile of float32 weights (the native Linear kernel: 4 MiB, one buffer per
thread kept for the next call; its GEMM on AVX-512, ``lut_gemm.c``: a 32 x 256 panel and a 512 x 256 block of
packed rows of ``x``, ~600 KB in all; the torch kernel:
``LUT_TILE`` weights and their int64 temporaries, ~3 MiB; convolutions: ``CONV_TILE`` weights, 4 MiB, and
the tile's slice of the output), or for an embedding the rows it returns.  :func:`keep_decoded` is the
opt-in that trades memory for speed at large batch: it keeps one decoded copy per module.
"""

from __future__ import annotations

import functools
import weakref

import torch
from torch import Tensor, nn
from torch.nn import functional

from .. import kernels  # noqa: F401  (declares the torch.ops.torchdkm ops these forwards call)
from ..kernels import default, lut

#: Weights of a convolution decoded at a time (float32: 4 MiB).
CONV_TILE = 1 << 20
_CONV = {1: functional.conv1d, 2: functional.conv2d, 3: functional.conv3d}


def lut_args(module: nn.Module, param: str = "weight") -> tuple:
    """The packed tensor's arguments to the ``torchdkm`` ops: ``(indices, lut, bits, dim, group_size)``."""
    spec = module.palette[param]
    return (getattr(module, f"{param}_indices"), getattr(module, f"{param}_lut"), spec.bits, spec.dim, spec.group_size)


def decoded_rows(module: nn.Module, rows: Tensor, param: str = "weight") -> Tensor:
    """Rows ``rows`` of the decoded ``param``, flattened to ``(len(rows), row_len)`` (block scales applied)."""
    packed, lut, bits, dim, group_size = lut_args(module, param)
    spec = module.palette[param]
    values = torch.ops.torchdkm.lut_rows(packed, lut, bits, dim, group_size, spec.layout.row_len, rows)
    return default.scale_rows(values, rows, *scale_args(module, param))


def scale_args(module: nn.Module, param: str = "weight") -> tuple:
    """The block scales' arguments to ``lut_linear``: ``(scales, offsets, block)`` (``(None, None, 0)``: none)."""
    blocks = module.palette[param].scales
    if blocks is None:
        return None, None, 0
    return getattr(module, f"{param}_scales"), getattr(module, f"{param}_offsets", None), blocks.block


_PACKED: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


@functools.cache
def _buffer_names(param: str) -> tuple[str, ...]:
    return tuple(f"{param}_{part}" for part in ("indices", "lut", "scales", "offsets"))


def packed_weight(module: nn.Module, param: str = "weight") -> lut.PackedWeight | None:
    """The module's packed weight as the native loops read it, made once and kept (remade if a buffer moves
    or changes); None where the loops are not available (:func:`torchdkm.kernels.lut.available`, asked when the
    weight is made, not at every call).  Kept beside the module, not in it: copies and pickles of the module do
    not carry it."""
    buffers = module._buffers  # (not getattr: a forward's every microsecond counts here)
    tensors = [buffers.get(name) for name in _buffer_names(param)]
    key = tuple((t.data_ptr(), t._version) for t in tensors if t is not None)
    kept = _PACKED.get(module)
    entry = None if kept is None else kept.get(param)
    if entry is None or entry[0] != key:
        weight = None
        if lut.available():
            spec = module.palette[param]
            weight = lut.PackedWeight(*lut_args(module, param)[:2], spec.bits, spec.dim, spec.group_size,
                                      spec.layout.shape[0], spec.layout.row_len, *scale_args(module, param))  # fmt: skip
        entry = _PACKED.setdefault(module, {})[param] = (key, weight)
    return entry[1]


def native_call(input: Tensor, bias: Tensor | None) -> bool:
    """Whether a forward may call the native loops directly: an eager float32 CPU input, no gradient to keep.

    The direct call skips the dispatcher and the per-call setup (~40 us a call: SmolLM2 decodes a token in
    211 of them); compiled, exported or differentiated forwards go through ``torch.ops.torchdkm.lut_linear``.
    """
    if type(input) is not Tensor or input.dtype != torch.float32 or not input.is_cpu:
        return False
    if torch.is_grad_enabled() and (input.requires_grad or (bias is not None and bias.requires_grad)):
        return False
    return not torch.compiler.is_compiling()


def packed_product(module: nn.Module, input: Tensor, out_features: int) -> Tensor:
    """``input @ W.T + bias`` from the module's packed weight: the native loops directly where
    :func:`native_call` allows and they are built, else ``torch.ops.torchdkm.lut_linear``."""
    bias = module._parameters.get("bias")  # (not module.bias: nn.Module's __getattr__ costs ~2.5 us a read)
    if native_call(input, bias):
        weight = packed_weight(module)
        if weight is not None:
            return weight.linear(input, bias)
    return torch.ops.torchdkm.lut_linear(input, *lut_args(module), out_features, bias, *scale_args(module))


def linear_forward(self: nn.Module, input: Tensor) -> Tensor:
    """``nn.Linear.forward`` from the packed weight and its block scales, never decoding the whole weight."""
    if self.decoded_copy() is not None:
        return functional.linear(input, self.weight, self.bias)
    return packed_product(self, input, self.out_features)


def conv1d_forward(self: nn.Module, input: Tensor) -> Tensor:
    """transformers' ``Conv1D.forward`` (``x @ W + b``, ``W`` stored ``(in, out)``) from the packed weight.

    Its palette cuts ``W``'s transpose as a ``Linear``'s weight (``PaletteSpec.transposed``), so the product
    is the Linear kernel's with ``nf`` outputs.
    """
    if self.decoded_copy() is not None:
        return torch.addmm(self.bias, input.reshape(-1, input.shape[-1]), self.weight).view(*input.shape[:-1], self.nf)
    return packed_product(self, input, self.nf)


def embedding_forward(self: nn.Module, input: Tensor) -> Tensor:
    """``nn.Embedding.forward`` decoding only the rows looked up (``max_norm``: the whole table, as before)."""
    if self.decoded_copy() is not None or self.max_norm is not None:
        return functional.embedding(
            input, self.weight, self.padding_idx, self.max_norm, self.norm_type, self.scale_grad_by_freq, self.sparse
        )
    if input.numel() and (int(input.min()) < 0 or int(input.max()) >= self.num_embeddings):
        raise IndexError(f"index out of range in self (num_embeddings={self.num_embeddings})")
    return decoded_rows(self, input.reshape(-1)).view(*input.shape, self.embedding_dim)


def conv_forward(self: nn.Module, input: Tensor) -> Tensor:
    """``nn.ConvNd.forward``, decoding :data:`CONV_TILE` weights (whole convolution groups) at a time."""
    weight_shape = self.palette["weight"].shape
    out, per_filter = weight_shape[0], self.palette["weight"].layout.row_len
    per_group = out // self.groups  # output channels of one convolution group
    if self.decoded_copy() is not None or out * per_filter <= CONV_TILE:
        return self._conv_forward(input, self.weight, self.bias)
    if self.padding_mode != "zeros":
        input = functional.pad(input, self._reversed_padding_repeated_twice, mode=self.padding_mode)
        padding = 0
    else:
        padding = self.padding
    conv = _CONV[len(weight_shape) - 2]
    in_group = input.shape[-len(weight_shape) + 1] // self.groups
    # a tile: whole convolution groups when there are several, else output channels
    unit = per_group if self.groups > 1 else 1
    step = max(1, CONV_TILE // (unit * per_filter)) * unit
    result = None
    for first in range(0, out, step):
        last = min(first + step, out)
        rows = torch.arange(first, last, device=input.device)
        weight = decoded_rows(self, rows).view(last - first, *weight_shape[1:]).to(input.dtype)
        bias = self.bias[first:last] if self.bias is not None else None
        groups = (last - first) // per_group if self.groups > 1 else 1
        x = input if self.groups == 1 else input.narrow(-len(weight_shape) + 1, first // per_group * in_group, groups * in_group)
        part = conv(x, weight, bias, self.stride, padding, self.dilation, groups)
        if result is None:
            result = part.new_empty(part.shape[0], out, *part.shape[2:])
        result[:, first:last] = part
    return result


FORWARDS = {nn.Linear: linear_forward, nn.Embedding: embedding_forward}
FORWARDS |= {cls: conv_forward for cls in (nn.Conv1d, nn.Conv2d, nn.Conv3d)}


def forward_for(base: type, params: tuple[str, ...]):
    """The packed forward for a palettized ``base`` (None: keep ``base``'s own, which decodes ``weight``).

    Only the stock classes' forward is replaced (a subclass with a forward of its own reads ``self.weight``)
    and only when ``weight`` alone is palettized.  transformers' ``Conv1D`` is found by name (transformers
    is optional): the class itself or a subclass keeping its forward.
    """
    if params != ("weight",):
        return None
    for cls, forward in FORWARDS.items():
        if issubclass(base, cls) and base.forward is cls.forward:
            return forward
    stock = next((t for t in base.__mro__ if t.__name__ == "Conv1D" and t.__module__.startswith("transformers.")), None)
    if stock is not None and base.forward is stock.forward:
        return conv1d_forward
    return None


def keep_decoded(model: nn.Module, enabled: bool = True) -> nn.Module:
    """Opt-in: every palettized module of ``model`` keeps a decoded copy of its weights (or drops it).

    Costs the dense weights' memory for as long as the copy is kept; buys the dense model's speed at large
    batch (the copy is a plain tensor, not in ``state_dict``, and is re-decoded if the buffers change).
    """
    from .palettized import palettized_modules

    for _, module in palettized_modules(model):
        module.keep_decoded = enabled
        module.decoded_cache = {}
    return model
