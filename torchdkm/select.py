"""Which weights ``prepare`` clusters, which it leaves dense and why, and what a bad rule key meant.

Nothing is skipped silently: every weight matrix a rule covers either gets a
DKM layer or is listed, with its reason, in one warning (:func:`skip_warning`).
A weight matrix is a parameter with two or more dimensions; 1-D parameters
(biases, norm scales) are never clustered and never listed here (``report``
lists them among the uncompressed tensors).

Tied weights (one ``Parameter`` held by several modules, an embedding and an
output head) are one tensor, clustered once: when a rule chooses any holder,
every holder no rule covers reads the same clustered tensor (``Selection.tied``),
so the tie survives training, ``finalize`` and the file.  Holders whose rules
disagree (``"fc:4/1, emb:3/1"``) are an error; a holder a rule excludes by name
(``"lm_head:none"``) or a recurrent holder keeps a dense copy, and the warning says so.
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass, field

from torch import Tensor, nn
from torch.nn.utils import parametrize

from .config import DKMConfig, LayerConfig
from .distributed import is_dtensor
from .errors import TorchdkmError
from .matching import SUPPORTED_TYPES, TRANSPOSED_TYPES, TYPE_GROUPS, UNSUPPORTED_WHY, WEIGHT_PARAMS
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
    """``chosen``: ``(name, module, param, layer)`` to cluster; ``tied``: ``(name, param)`` of a chosen
    weight -> the ``(name, module, param)`` of the other modules that hold the same tensor and share its DKM layer.
    """

    chosen: list[tuple[str, nn.Module, str, LayerConfig]] = field(default_factory=list)
    skipped: list[Skipped] = field(default_factory=list)
    tied: dict[tuple[str, str], list[tuple[str, nn.Module, str]]] = field(default_factory=dict)


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


def is_transposed(module: nn.Module) -> bool:
    """Whether the module stores its weight ``(in, out)`` (see :data:`~torchdkm.matching.TRANSPOSED_TYPES`)."""
    return any(t.__name__ in TRANSPOSED_TYPES for t in type(module).__mro__)


def select(model: nn.Module, config: DKMConfig) -> Selection:
    """The ``(name, module, param, layer)`` to cluster and the covered weights left dense."""
    modules = dict(model.named_modules())
    check_not_finalized(modules)
    check_name_rules(config, model, modules)
    result = Selection()
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
        if is_transposed(module) and tensor.dim() != 2:
            raise TorchdkmError(
                f"prepare: {name!r} is a {type(module).__name__} whose weight is not 2-D: {list(tensor.shape)}"
            )
        result.chosen.append((name, module, param, layer))
    tie(result, model, config)
    return result


def checked_parameter(name: str, module: nn.Module, param: str) -> Tensor:
    """``module.<param>``, which must be a plain, not yet prepared, unsharded ``Parameter``."""
    where = f"{name or 'model'}.{param}"
    if parametrize.is_parametrized(module, param):
        chain = list(module.parametrizations[param])
        if any(isinstance(p, DKMParametrization) for p in chain):
            raise TorchdkmError(f"prepare: {where} is already prepared for DKM")
        raise TorchdkmError(
            f"prepare: {where} is computed by another parametrization ({', '.join(type(p).__name__ for p in chain)}, "
            f"e.g. weight_norm or spectral_norm); torchdkm clusters a plain weight: remove it first with "
            f"torch.nn.utils.parametrize.remove_parametrizations(module, {param!r}), which keeps the weight it computes"
        )
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


def holders(model: nn.Module) -> dict[int, list[tuple[str, nn.Module, str]]]:
    """Every weight matrix of the model by tensor identity: the modules holding it, in module order."""
    found: dict[int, list[tuple[str, nn.Module, str]]] = {}
    for name, module in model.named_modules():
        if isinstance(module, parametrize.ParametrizationList):
            continue  # a weight prepared earlier: held by its module, already clustered
        for param, tensor in module._parameters.items():
            if tensor is not None and tensor.dim() >= 2:
                found.setdefault(id(tensor), []).append((name, module, param))
    return found


def tie(result: Selection, model: nn.Module, config: DKMConfig) -> None:
    """Cluster each tied tensor once: one chosen owner, the other holders share its DKM layer (module docstring)."""
    by_tensor = holders(model)
    owners: dict[int, tuple[str, str, LayerConfig]] = {}
    chosen = []
    for name, module, param, layer in result.chosen:
        ident = id(getattr(module, param))
        if ident in owners:
            owner, owner_param, owner_layer = owners[ident]
            if layer != owner_layer:
                raise TorchdkmError(
                    f"prepare: {key_of(name, param)} and {key_of(owner, owner_param)} are one tensor (tied weights) "
                    f"but their rules differ ({describe(layer)} vs {describe(owner_layer)}); a tied tensor has one "
                    "palette: give both the same rule, or exclude one (its module then keeps a dense copy)"
                )
            continue
        owners[ident] = (name, param, layer)
        chosen.append((name, module, param, layer))
        others = [h for h in by_tensor[ident] if (h[0], h[2]) != (name, param)]
        if not others:
            continue
        sharing, dense = [], []
        for other in others:
            (dense if keeps_dense_copy(other, config) else sharing).append(other)
        for other_name, other_module, other_param in sharing:
            if is_transposed(other_module) != is_transposed(module):
                raise TorchdkmError(
                    f"prepare: {key_of(name, param)} ({type(module).__name__}) and {key_of(other_name, other_param)} "
                    f"({type(other_module).__name__}) are one tensor read in transposed layouts; torchdkm cannot "
                    "cluster it for both: exclude both with name rules set to None"
                )
        result.tied[(name, param)] = sharing
        shared = {(n, p) for n, _, p in sharing}
        result.skipped = [s for s in result.skipped if (s.name, s.param) not in shared]
        result.skipped += [
            Skipped(n, p, getattr(m, p).numel(), dense_copy_reason(m, key_of(name, param))) for n, m, p in dense
        ]
    result.chosen = chosen


def keeps_dense_copy(holder: tuple[str, nn.Module, str], config: DKMConfig) -> bool:
    """A holder of a clustered tied tensor that cannot share it: a rule excludes it, or it is recurrent."""
    name, module, _ = holder
    recurrent = any(t.__name__ in UNSUPPORTED_WHY for t in type(module).__mro__)
    return recurrent or config.excludes(name, module)


def dense_copy_reason(module: nn.Module, owner: str) -> str:
    recurrent = any(t.__name__ in UNSUPPORTED_WHY for t in type(module).__mro__)
    why = "a recurrent module caches its weights" if recurrent else "a rule excludes this module"
    return f"tied to {owner}, which is clustered, but {why}: it keeps a dense copy (the tensor is stored twice)"


def key_of(name: str, param: str) -> str:
    return f"{name}.{param}" if name else param


def describe(layer: LayerConfig) -> str:
    """A rule's fields that differ from the defaults, ``bits=4, dim=1`` always."""
    default = LayerConfig()
    fields = {k: v for k, v in layer.to_dict().items() if k in ("bits", "dim") or v != getattr(default, k)}
    return ", ".join(f"{k}={v}" for k, v in fields.items())


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
