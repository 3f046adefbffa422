"""Which weights the loss is sensitive to: the diagonal empirical Fisher of the weights a config selects.

``fisher(model, calibration, config)`` runs the calibration (a callable returning one scalar loss or
yielding several), backpropagates each loss, and sums every selected weight's squared gradients.  The
size planner weighs each option's error by it (``plan_to_size(..., fisher=True)``) and ``prepare``
weighs the centroids by it (``prepare(..., importance=...)``): the LUT then reproduces the weights the
loss depends on, as SqueezeLLM's sensitivity-weighted k-means does post-training.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import torch
from torch import Tensor, nn

from .config import DKMConfig
from .errors import TorchdkmError
from .select import key_of, select


def fisher(model: nn.Module, calibration: Callable[[nn.Module], object], config: DKMConfig | str) -> dict[str, Tensor]:
    """Each weight ``config`` selects: its squared gradients summed over the calibration's losses, float32.

    Keyed by parameter name (``"layers.0.fc.weight"``; a tied tensor once, by the name ``prepare``
    clusters it under), ready for ``prepare(model, config, importance=...)``.  The model runs in eval
    mode and only the selected weights take gradients (``requires_grad`` and the mode restored after);
    a weight no loss reached gets zeros.  ``calibration`` e.g. ``lambda m: m(x).logsumexp(-1).mean()``,
    or a generator ``for ids in batches: yield m(input_ids=ids, labels=ids).loss`` (each loss is
    backpropagated before the next is computed, so one batch's graph is held at a time).
    """
    if isinstance(config, str):
        config = DKMConfig.parse(config)
    chosen = select(model, config).chosen
    names = {id(getattr(module, param)): key_of(name, param) for name, module, param, _ in chosen}
    weights = {id(w): w for w in (getattr(module, param) for _, module, param, _ in chosen)}
    every = list(model.parameters())
    needed = [p.requires_grad for p in every]
    was_training = model.training
    sums: dict[int, Tensor] = {}
    losses = 0
    try:
        model.eval()
        for p in every:
            p.requires_grad_(id(p) in weights)
        result = calibration(model)
        for loss in result if isinstance(result, Iterator) else [result]:
            _accumulate(loss, weights, sums)
            losses += 1
    finally:
        for p, flag in zip(every, needed):
            p.requires_grad_(flag)
        model.train(was_training)
    if not losses:
        raise TorchdkmError("fisher: the calibration yielded no loss")
    return {names[key]: sums[key] if key in sums else torch.zeros(w.shape) for key, w in weights.items()}


def _accumulate(loss: object, weights: dict[int, Tensor], sums: dict[int, Tensor]) -> None:
    """Backpropagate one calibration loss and add each selected weight's squared gradient to ``sums``."""
    if not (isinstance(loss, Tensor) and loss.numel() == 1 and loss.requires_grad and loss.dtype.is_floating_point):
        raise TorchdkmError(
            f"fisher: the calibration returned {type(loss).__name__} "
            f"{tuple(loss.shape) if isinstance(loss, Tensor) else ''} where a scalar loss with a gradient was expected"
        )
    if not torch.isfinite(loss):
        raise TorchdkmError(f"fisher: a calibration loss is {float(loss)}")
    grads = torch.autograd.grad(loss, list(weights.values()), allow_unused=True)
    for key, grad in zip(weights, grads):
        if grad is not None:
            square = grad.detach().float().square()
            sums[key] = sums[key] + square if key in sums else square
