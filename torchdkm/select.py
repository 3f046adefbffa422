"""Which weights ``prepare`` clusters, which it leaves dense and why, and what a bad rule key meant.

Nothing is skipped silently: every weight matrix a rule covers either gets a
DKM layer or is listed, with its reason, in one warning (:func:`skip_warning`).
A weight matrix is a parameter with two or more dimensions; 1-D parameters
(biases, norm scales) are never clustered and never listed here (``report``
lists them among the uncompressed tensors).
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass, field

from torch import Tensor, nn
from torch.nn.utils import parametrize

from .config import SUPPORTED_TYPES, TYPE_GROUPS, UNSUPPORTED_WHY, WEIGHT_PARAMS, DKMConfig, LayerConfig
from .distributed import is_dtensor
from .errors import TorchdkmError
from .nn.palettized import is_palettized
from .nn.parametrization import DKMParametrization


@dataclass(frozen=True)
class Skipped:
    """A weight a rule covers that stays dense: ``<name>.<param>`` (``numel`` values), and why."""

    name: str
    param: str
    numel: int
    reason: str

    @property
    def key(self) -> str:
        return f"{self.name}.{self.param}" if self.name else self.param


@dataclass
class Selection:
    chosen: list[tuple[str, nn.Module, str, LayerConfig]] = field(default_factory=list)
    skipped: list[Skipped] = field(default_factory=list)


def weight_param(module: nn.Module, layer: LayerConfig) -> str | None:
    """The parameter a rule clusters: ``layer.param``, or the class's own name for its weight matrix.

    ``None`` for a ``MultiheadAttention`` without ``in_proj_weight`` (separate q/k/v weights).
    """
    if layer.param != "weight" or "weight" in module._parameters:
        return layer.param
    for cls in type(module).__mro__:
        if cls.__name__ in WEIGHT_PARAMS:
            param = WEIGHT_PARAMS[cls.__name__]
            return param if module._parameters.get(param) is not None else None
    return layer.param


def separate_projections(name: str, module: nn.Module) -> list[Skipped]:
    why = (
        "MultiheadAttention with kdim/vdim != embed_dim keeps separate q/k/v weights, which torchdkm "
        "does not cluster (only in_proj_weight; out_proj is a Linear and is clustered)"
    )
    return [Skipped(name, p, t.numel(), why) for p, t in module.named_parameters(recurse=False) if t.dim() >= 2]


def is_supported(module: nn.Module) -> bool:
    return any(t.__name__ in SUPPORTED_TYPES for t in type(module).__mro__)


def select(model: nn.Module, config: DKMConfig) -> Selection:
    """The ``(name, module, param, layer)`` to cluster and the covered weights left dense."""
    modules = dict(model.named_modules())
    check_not_finalized(modules)
    check_name_rules(config, model, modules)
    result = Selection()
    seen: dict[int, str] = {}
    for name, module in modules.items():
        if isinstance(module, (DKMParametrization, parametrize.ParametrizationList)):
            continue
        layer = config.resolve(name, module, any_type=True)
        if layer is None:
            continue
        if not is_supported(module):
            result.skipped += unsupported(name, module, config)
            continue
        param = weight_param(module, layer)
        if param is None:
            result.skipped += separate_projections(name, module)
            continue
        tensor = checked_parameter(name, module, param)
        explicit = config.by_name.get(name) is not None
        if tensor.numel() < layer.min_numel and not explicit:
            why = f"below min_numel={layer.min_numel} (a rule naming {name!r} overrides it)"
            result.skipped.append(Skipped(name, param, tensor.numel(), why))
            continue
        if id(tensor) in seen:
            raise TorchdkmError(
                f"prepare: {name!r}.{param} is the same tensor as {seen[id(tensor)]!r} (tied weights); "
                "exclude one of them with a name rule set to None"
            )
        seen[id(tensor)] = name
        result.chosen.append((name, module, param, layer))
    result.skipped += tied_to_dense(model, result.chosen)
    return result


def checked_parameter(name: str, module: nn.Module, param: str) -> Tensor:
    """``module.<param>``, which must be a plain, not yet prepared, unsharded ``Parameter``."""
    where = f"{name or 'model'}.{param}"
    if parametrize.is_parametrized(module, param):
        raise TorchdkmError(f"prepare: {where} is already prepared for DKM")
    tensor = getattr(module, param, None)
    if not isinstance(tensor, nn.Parameter):
        found = [n for n, p in module.named_parameters(recurse=False) if p.dim() >= 2]
        raise TorchdkmError(
            f"prepare: module {name!r} ({type(module).__name__}) has no parameter {param!r}"
            + (f"; its weight matrices: {found}" if found else "")
        )
    if is_dtensor(tensor):
        raise TorchdkmError(
            f"prepare: {where} is a sharded DTensor (fully_shard applied?); call torchdkm.prepare before fully_shard"
        )
    return tensor


def unsupported(name: str, module: nn.Module, config: DKMConfig) -> list[Skipped]:
    """The weight matrices of a module class torchdkm does not cluster; an error if a rule names it exactly."""
    cls = type(module).__name__
    why = next((UNSUPPORTED_WHY[t.__name__] for t in type(module).__mro__ if t.__name__ in UNSUPPORTED_WHY), None)
    if name in config.by_name:
        raise TorchdkmError(
            f"prepare: module {name!r} is a {cls}; "
            + (why if why else f"torchdkm clusters {list(SUPPORTED_TYPES)}, and their subclasses")
        )
    reason = why or f"module type {cls} is not supported (torchdkm clusters {', '.join(SUPPORTED_TYPES)})"
    return [
        Skipped(name, param, tensor.numel(), reason)
        for param, tensor in module.named_parameters(recurse=False)
        if tensor.dim() >= 2
    ]


def tied_to_dense(model: nn.Module, chosen: list) -> list[Skipped]:
    """Chosen weights that another, unclustered module also holds: that module keeps a dense copy."""
    clustered = {(name, param) for name, _, param, _ in chosen}
    ids = {id(getattr(module, param)): (name, param) for name, module, param, _ in chosen}
    found = []
    for name, module in model.named_modules():
        for param, tensor in module.named_parameters(recurse=False):
            if id(tensor) in ids and (name, param) not in clustered:
                owner = ids[id(tensor)]
                key = f"{owner[0]}.{owner[1]}" if owner[0] else owner[1]
                why = (
                    f"tied to {key}, which is clustered: this module keeps the dense tensor, stored beside the palette"
                )
                found.append(Skipped(name, param, tensor.numel(), why))
    return found


def skip_warning(skipped: list[Skipped]) -> str:
    """One message listing every covered weight that stays dense, and why."""
    total = sum(s.numel for s in skipped)
    by_reason: dict[tuple[str, str], list[Skipped]] = {}
    for s in skipped:  # one line per module and reason: a GRU's four matrices share one
        by_reason.setdefault((s.name, s.reason), []).append(s)
    lines = [
        f"  {', '.join(s.key for s in group)} ({sum(s.numel for s in group):,} values): {reason}"
        for (_, reason), group in by_reason.items()
    ]
    return f"torchdkm.prepare: {len(skipped)} weight(s) the rules cover stay dense ({total:,} values):\n" + "\n".join(
        lines
    )


def check_not_finalized(modules: dict[str, nn.Module]) -> None:
    palettized = [name or "model" for name, module in modules.items() if is_palettized(module)]
    if palettized:
        raise TorchdkmError(
            f"prepare: the model is already finalized (palettized: {few(palettized)}); "
            "prepare a model with dense weights"
        )


def few(names: list[str], shown: int = 3) -> str:
    """``'a', 'b', 'c' and 2 more``: enough names to recognise, one line however many."""
    text = ", ".join(repr(n) for n in names[:shown])
    return text + (f" and {len(names) - shown} more" if len(names) > shown else "")


def check_name_rules(config: DKMConfig, model: nn.Module, modules: dict[str, nn.Module]) -> None:
    """Every name rule must match a module; explain the ones that do not."""
    unknown = config.name_patterns_matching_nothing(list(modules))
    if unknown:
        raise TorchdkmError("prepare: " + "; ".join(unknown_key_message(key, model, modules) for key in unknown))


def unknown_key_message(key: str, model: nn.Module, modules: dict[str, nn.Module]) -> str:
    """Why a rule key matched nothing: an unsupported class, a class the model lacks, or a near miss."""
    classes = {t.__name__ for m in modules.values() for t in type(m).__mro__}
    where = type(model).__name__
    if key in UNSUPPORTED_WHY:
        return f"rule key {key!r} is a module class torchdkm does not cluster: {UNSUPPORTED_WHY[key]}"
    if key in classes:
        return (
            f"rule key {key!r} is a module class of {where} that torchdkm does not cluster "
            f"(it clusters {', '.join(SUPPORTED_TYPES)})"
        )
    if key[:1].isupper() and isinstance(getattr(nn, key, None), type):
        return f"rule key {key!r} is a module class, but {where} has no {key}"
    known = sorted(TYPE_GROUPS) + list(SUPPORTED_TYPES) + ["*"] + [n for n in modules if n]
    lowered = {k.lower(): k for k in known}
    close = [lowered[key.lower()]] if key.lower() in lowered else difflib.get_close_matches(key, known, n=3)
    hint = f"; did you mean {' or '.join(repr(c) for c in close)}?" if close else ""
    return f"name rule {key!r} matches no module of {where}{hint}"
