"""Which modules a rule names: the module classes torchdkm clusters, the shorthand groups, specificity.

:class:`~torchdkm.config.DKMConfig` keeps the rules; this module says which of
them match a module and which is the most specific: an exact name beats a glob
pattern and a longer pattern beats a shorter one; a class name (matched along
the class hierarchy, most derived first) beats a shorthand group (``Conv2d``
beats ``cv``).  :mod:`torchdkm.select` reads the same vocabulary to say why a
module is left dense.
"""

from __future__ import annotations

import fnmatch
from typing import Any

from torch import nn

#: Shorthand keys of the paper's notation and the module classes they cover.
_CONVS = ("Conv1d", "Conv2d", "Conv3d", "ConvTranspose1d", "ConvTranspose2d", "ConvTranspose3d")
TYPE_GROUPS: dict[str, tuple[str, ...]] = {
    "fc": ("Linear", "Conv1D"),
    "linear": ("Linear", "Conv1D"),
    "cv": _CONVS,
    "conv": _CONVS,
    "emb": ("Embedding",),
}
#: Module classes whose weights torchdkm can cluster and palettize.
SUPPORTED_TYPES: tuple[str, ...] = ("Linear", "Conv1D", *_CONVS, "Embedding", "MultiheadAttention")
#: Classes storing their weight ``(in, out)``, Linear's transpose (transformers' ``Conv1D``, GPT-2): clustered
#: through a transposed view, so groups count output channels and vectors run along the input axis as for Linear.
TRANSPOSED_TYPES: tuple[str, ...] = ("Conv1D",)
#: The tensor a rule's default ``param="weight"`` means in classes that name their weight otherwise.
WEIGHT_PARAMS: dict[str, str] = {"MultiheadAttention": "in_proj_weight"}
#: Module classes holding weight matrices that torchdkm leaves dense, and why (shown by ``prepare``).
UNSUPPORTED_WHY: dict[str, str] = {
    name: "recurrent layers are not supported: RNN modules cache their weights (_flat_weights) and read "
    "each several times per forward, which would run several DKM steps per training step"
    for name in ("RNNBase", "RNN", "LSTM", "GRU")
}
#: Returned by the ``most_specific_*`` functions when no rule matches (``None`` is a rule: "leave it alone").
MISSING = object()


def name_matches(pattern: str, name: str) -> bool:
    """Whether a name rule (an exact qualified name or a glob pattern) names module ``name``."""
    return pattern == name or fnmatch.fnmatchcase(name, pattern)


def most_specific_name_rule(rules: dict[str, Any], name: str) -> Any:
    """The exact name's rule, else the matching pattern with the most literal characters (or ``MISSING``)."""
    if name in rules:
        return rules[name]
    hits = [p for p in rules if fnmatch.fnmatchcase(name, p)]
    if not hits:
        return MISSING
    return rules[max(hits, key=lambda p: len(p.replace("*", "").replace("?", "")))]


def most_specific_type_rule(rules: dict[str, Any], type_names: list[str]) -> Any:
    """The rule of the most derived class named, else of a shorthand group holding one (or ``MISSING``)."""
    for type_name in type_names:  # most derived class first
        if type_name in rules:
            return rules[type_name]
    for key, members in TYPE_GROUPS.items():
        if key in rules and any(t in members for t in type_names):
            return rules[key]
    return MISSING


def matching_rules(default: Any, by_type: dict, by_name: dict, name: str, module: nn.Module, any_type: bool) -> list:
    """The rules that match a module, least specific first: the global rule (for a supported class, or any
    class with ``any_type``), then the most specific type rule, then the most specific name rule."""
    type_names = [t.__name__ for t in type(module).__mro__]
    supported = any_type or any(t in SUPPORTED_TYPES for t in type_names)
    layers = [default] if supported and default is not None else []
    for rule in (most_specific_type_rule(by_type, type_names), most_specific_name_rule(by_name, name)):
        if rule is not MISSING:
            layers.append(rule)
    return layers
