"""The user-facing verbs: ``prepare`` a model, train it as usual, ``finalize`` it.

``kmeans_compress`` is the post-training baseline (Deep Compression's k-means,
no training) through the very same code: prepare (which initialises the
centroids by k-means) then finalize.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping

import torch
from torch import Tensor, nn
from torch.nn.utils import parametrize
from tqdm import tqdm

from .cluster.batch import BATCH_NUMEL
from .config import DKMConfig
from .errors import TorchdkmError
from .kernels.scratch import release_scratch
from .nn.batching import batch_layers
from .nn.palettized import palettize_module, palettized_modules, set_submodule
from .nn.parametrization import (
    DKMParametrization,
    cache_while_forward,
    dkm_parametrizations,
    original,
    stop_caching,
)
from .pack import pack
from .select import Selection, few, is_transposed, key_of, select, skip_warning


def prepare(
    model: nn.Module,
    config: DKMConfig | str,
    *,
    progress: bool = False,
    batch_numel: int = BATCH_NUMEL,
    importance: Mapping[str, Tensor] | None = None,
) -> nn.Module:
    """Attach DKM to the weights ``config`` selects, in place; returns ``model``.

    ``config`` may be a :class:`DKMConfig` or its shorthand (``"cv:6/6, fc:6/4"``).
    Each chosen weight's centroids are initialised by k-means here (``progress``
    shows a bar over the layers: minutes for a large model).  Weight matrices a
    rule covers but that stay dense (below ``min_numel``, an unsupported module
    type, a rule-excluded holder of a tied tensor) are listed in one
    ``UserWarning``, so nothing is skipped silently.  A tensor several modules
    share (tied weights) is clustered once and stays shared.

    Layers with at most ``batch_numel`` weights whose attention settings agree
    (bits, dim, path, stopping rule) take their training steps together, one
    engine run for all (:mod:`torchdkm.nn.batching`): a small layer's step costs
    milliseconds of fixed overhead alone.  Each layer gets its own step's result
    to float rounding; ``0`` steps every layer alone.  Train the model
    afterwards with your own loop and loss; nothing else changes.

    ``importance``: per-weight importance by parameter name (``"layers.0.fc.weight"``, each of a shape like
    the weight's; e.g. :attr:`torchdkm.SizePlan.importance`, the squared gradients of calibration losses):
    each centroid is then the importance-weighted mean of its cluster, in the initial k-means and in every
    training step (:meth:`torchdkm.cluster.WeightClusterer.weigh`).  It is not stored in ``state_dict``: a
    resumed run passes it again.
    """
    if isinstance(config, str):
        config = DKMConfig.parse(config)
    if not isinstance(config, DKMConfig):
        raise TorchdkmError(f"prepare: config must be a DKMConfig or a string, got {type(config).__name__}")
    if isinstance(batch_numel, bool) or not isinstance(batch_numel, int) or batch_numel < 0:
        raise TorchdkmError(f"prepare: batch_numel={batch_numel!r} is invalid: must be an integer >= 0")
    selection = select(model, config)
    if selection.skipped:
        warnings.warn(skip_warning(selection.skipped), UserWarning, stacklevel=2)
    if not selection.chosen:
        raise TorchdkmError(
            "prepare: the config selects no weight of this model (check rules and min_numel)"
            + (f"; left dense: {', '.join(s.key for s in selection.skipped[:5])}" if selection.skipped else "")
        )
    weighing = _importance_by_layer(importance or {}, selection)
    chosen = tqdm(selection.chosen, desc="k-means init", unit="layer", disable=not progress, leave=False)
    prepared = []
    for name, module, param, layer in chosen:
        weight = getattr(module, param)
        dkm = DKMParametrization(name, layer, weight.detach(), transposed=is_transposed(module),
                                 importance=weighing.get((name, param)))  # fmt: skip
        # A tied tensor: the same parametrization on every holder, whose `original` is the one shared Parameter.
        for holder, holder_module, holder_param in [(name, module, param), *selection.tied.get((name, param), [])]:
            parametrize.register_parametrization(holder_module, holder_param, dkm, unsafe=True)
            dkm.holders.append((holder, holder_param))
            cache_while_forward(holder_module)
        prepared.append((dkm, module.parametrizations[param]))
    batch_layers(prepared, batch_numel)
    return model


def _importance_by_layer(importance: Mapping[str, Tensor], selection: Selection) -> dict[tuple[str, str], Tensor]:
    """``prepare``'s ``importance`` by chosen ``(module name, parameter)``, checked: every key names a chosen
    weight (a tied tensor by any of its holders' names), has its shape, and is finite and >= 0."""
    owners = {}
    for name, _, param, _ in selection.chosen:
        for holder, holder_param in [(name, param), *((h, hp) for h, _, hp in selection.tied.get((name, param), []))]:
            owners[key_of(holder, holder_param)] = (name, param)
    shapes = {(name, param): tuple(getattr(module, param).shape) for name, module, param, _ in selection.chosen}
    found = {}
    for key, values in importance.items():
        if key not in owners:
            raise TorchdkmError(f"prepare: importance for {key!r}, which the config does not cluster "
                                f"(clustered: {few(sorted(owners))})")  # fmt: skip
        owner = owners[key]
        if not isinstance(values, Tensor) or tuple(values.shape) != shapes[owner]:
            got = tuple(values.shape) if isinstance(values, Tensor) else type(values).__name__
            raise TorchdkmError(f"prepare: importance for {key!r} must be a tensor of the weight's shape {shapes[owner]}, got {got}")
        low = float(values.min()) if values.numel() else 0.0
        if not (bool(torch.isfinite(values).all()) and low >= 0):
            raise TorchdkmError(f"prepare: importance for {key!r} must be finite and >= 0 (least value {low})")
        found[owner] = values
    return found


@torch.no_grad()
def finalize(model: nn.Module) -> nn.Module:
    """Snap every DKM weight to its nearest centroid and swap in palettized modules.

    Returns the model (a new object only when ``model`` itself is a DKM layer).
    """
    found = dkm_parametrizations(model)
    if not found:
        palettized = [name or "model" for name, _ in palettized_modules(model)]
        if palettized:
            raise TorchdkmError(
                f"finalize: the model is already finalized (palettized: {few(palettized)}); "
                "finalize once, on a prepared model"
            )
        raise TorchdkmError("finalize: the model has no DKM layer; call torchdkm.prepare first")
    by_module: dict[str, list] = {}
    for name, module, param, p in found:
        by_module.setdefault(name, []).append((module, param, p))
    palettes: dict[int, tuple] = {}  # by parametrization: tied holders get the very same buffers
    for name, entries in by_module.items():
        module = entries[0][0]
        stop_caching(module)
        tensors = {}
        for _, param, p in entries:
            if id(p) not in palettes:
                weight = original(module, param)
                index, centroids = p.hard(weight)  # one nearest-centroid search per weight
                spec = p.spec(weight)
                packed = pack(index.reshape(-1), spec.bits)
                palettes[id(p)] = (spec, packed, centroids.to(weight.dtype).clone(), *p.stored_scales(weight))
            tensors[param] = palettes[id(p)]
        new = palettize_module(module, tensors)
        if name == "":
            model = new
        else:
            set_submodule(model, name, new)
    release_scratch()  # training is over: the passes' scratch maps are not needed
    return model


def kmeans_compress(
    model: nn.Module, config: DKMConfig | str, *, importance: Mapping[str, Tensor] | None = None
) -> nn.Module:
    """Post-training k-means (no training): the baseline every DKM result sits beside.

    Like ``prepare`` and ``finalize`` it works in place: ``copy.deepcopy`` the
    model first to keep the original.  ``importance``: as ``prepare``'s (importance-weighted k-means).
    """
    prepare(model, config, importance=importance)
    for _, _, _, par in dkm_parametrizations(model):
        par.refresh = False  # snap to the k-means centroids themselves
    return finalize(model)
