"""The user-facing verbs: ``prepare`` a model, train it as usual, ``finalize`` it.

``kmeans_compress`` is the post-training baseline (Deep Compression's k-means,
no training) through the very same code: prepare (which initialises the
centroids by k-means) then finalize.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn.utils import parametrize

from .config import SUPPORTED_TYPES, DKMConfig
from .distributed import is_dtensor
from .errors import TorchdkmError
from .nn.palettized import PaletteSpec, palettize_module, set_submodule
from .nn.parametrization import DKMParametrization, dkm_parametrizations, original
from .pack import pack


def prepare(model: nn.Module, config: DKMConfig | str) -> nn.Module:
    """Attach DKM to the weights ``config`` selects, in place; returns ``model``.

    ``config`` may be a :class:`DKMConfig` or its shorthand (``"cv:6/6, fc:6/4"``).
    Each chosen weight's centroids are initialised by k-means here.  Train the
    model afterwards with your own loop and loss; nothing else changes.
    """
    if isinstance(config, str):
        config = DKMConfig.parse(config)
    if not isinstance(config, DKMConfig):
        raise TorchdkmError(f"prepare: config must be a DKMConfig or a string, got {type(config).__name__}")
    modules = dict(model.named_modules())
    unknown = config.name_patterns_matching_nothing(list(modules))
    if unknown:
        raise TorchdkmError(f"prepare: name rule(s) {unknown} match no module of {type(model).__name__}")
    seen: dict[int, str] = {}
    chosen = []
    for name, module in modules.items():
        if isinstance(module, (DKMParametrization, parametrize.ParametrizationList)):
            continue
        layer = config.resolve(name, module)
        if layer is None:
            continue
        if not any(t.__name__ in SUPPORTED_TYPES for t in type(module).__mro__):
            if name in config.by_name:
                raise TorchdkmError(
                    f"prepare: module {name!r} is a {type(module).__name__}; torchdkm clusters {list(SUPPORTED_TYPES)}"
                )
            continue
        if parametrize.is_parametrized(module, layer.param):
            raise TorchdkmError(f"prepare: {name or 'model'}.{layer.param} is already prepared for DKM")
        tensor = getattr(module, layer.param, None)
        if not isinstance(tensor, nn.Parameter):
            raise TorchdkmError(f"prepare: module {name!r} has no parameter {layer.param!r}")
        if is_dtensor(tensor):
            raise TorchdkmError(
                f"prepare: {name or 'model'}.{layer.param} is a sharded DTensor (fully_shard applied?); "
                "call torchdkm.prepare before fully_shard"
            )
        if tensor.numel() < layer.min_numel:
            continue
        if id(tensor) in seen:
            raise TorchdkmError(
                f"prepare: {name!r}.{layer.param} is the same tensor as {seen[id(tensor)]!r} (tied weights); "
                "exclude one of them with a name rule set to None"
            )
        seen[id(tensor)] = name
        chosen.append((name, module, layer))
    if not chosen:
        raise TorchdkmError("prepare: the config selects no weight of this model (check rules and min_numel)")
    for name, module, layer in chosen:
        weight = getattr(module, layer.param)
        parametrize.register_parametrization(
            module, layer.param, DKMParametrization(name, layer, weight.detach()), unsafe=True
        )
    return model


@torch.no_grad()
def finalize(model: nn.Module) -> nn.Module:
    """Snap every DKM weight to its nearest centroid and swap in palettized modules.

    Returns the model (a new object only when ``model`` itself is a DKM layer).
    """
    found = dkm_parametrizations(model)
    if not found:
        raise TorchdkmError("finalize: the model has no DKM layer; call torchdkm.prepare first")
    by_module: dict[str, list] = {}
    for name, module, param, p in found:
        by_module.setdefault(name, []).append((module, param, p))
    for name, entries in by_module.items():
        module = entries[0][0]
        tensors = {}
        for _, param, p in entries:
            weight = original(module, param)
            index, centroids = p.hard(weight)  # one nearest-centroid search per weight
            layout = p.clusterer.layout
            spec = PaletteSpec(layout.shape, p.config.bits, p.config.dim, layout.group_size)
            tensors[param] = (spec, pack(index.reshape(-1), spec.bits), centroids.to(weight.dtype).clone())
        new = palettize_module(module, tensors)
        if name == "":
            model = new
        else:
            set_submodule(model, name, new)
    return model


def kmeans_compress(model: nn.Module, config: DKMConfig | str) -> nn.Module:
    """Post-training k-means (no training): the baseline every DKM result sits beside.

    Like ``prepare`` and ``finalize`` it works in place: ``copy.deepcopy`` the
    model first to keep the original.
    """
    prepare(model, config)
    for _, _, _, par in dkm_parametrizations(model):
        par.refresh = False  # snap to the k-means centroids themselves
    return finalize(model)
