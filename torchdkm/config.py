"""Typed configuration: what to cluster, and how, for every layer of a model.

A :class:`LayerConfig` says how one weight is clustered.  A :class:`DKMConfig`
holds rules that pick a ``LayerConfig`` for each module: a global rule, rules by
module type and rules by module-name pattern.  The most specific rule wins:
name beats type beats global; an exact name beats a glob pattern and a longer
pattern beats a shorter one; a class name beats a shorthand group (``Conv2d``
beats ``cv``).  A rule is a ``LayerConfig`` (replaces what is below it), a dict
of fields (updates what is below it) or ``None`` (leave the module alone).

The paper's shorthand parses directly: ``DKMConfig.parse("cv:6/6, fc:6/4")``
clusters conv weights with 6-bit indices over 6-dim vectors and linear weights
with 6-bit indices over 4-dim vectors.
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
from dataclasses import dataclass, field
from typing import Any

from torch import nn

from .errors import TorchdkmError
from .matching import SUPPORTED_TYPES, TYPE_GROUPS, matching_rules, name_matches

CONFIG_VERSION = 1

CLUSTER_DTYPES = ("auto", "exact", "float16", "bfloat16")


@dataclass(frozen=True)
class LayerConfig:
    """How one weight tensor is clustered.

    bits: index bits per vector; the LUT holds ``k = 2**bits`` centroids (1..8).
    dim: values per vector (>= 1); a weight costs ``bits / dim`` bits.  Vectors
        are cut from each group's weights (its output channels, flattened) in
        memory order, that is along the input-channel / kernel axes
        (``in_features`` for Linear, ``in_channels x kernel`` for ConvNd,
        ``embedding_dim`` for Embedding); when a channel's weight count is not
        a multiple of ``dim`` a vector continues into the next channel.
    tau: softmax temperature *relative to the layer's margin*: the mean, over
        weight vectors, of (squared distance to the second-nearest centroid)
        minus (squared distance to the nearest), i.e. the logit gap that
        decides an assignment.  The absolute temperature is ``tau * margin``,
        recomputed every step, so one value means about the same sharpness
        whatever the layer's weight scale, vector length or bit width.  Smaller
        is closer to hard k-means; the default keeps the train/export gap
        (``report``) under 1% in the demo at every setting.
    max_iters: cap on DKM iterations per forward pass.
    tol: the iterations stop when no centroid moves more than
        ``tol * sqrt(margin)``.
    group_size: output channels that share one LUT (``None``: one LUT for the
        whole tensor).  A last group with fewer channels is allowed.
    param: name of the parameter to cluster (``"weight"`` means ``in_proj_weight``
        for ``MultiheadAttention``).  A ConvTranspose weight is
        ``(in_channels, out_channels / groups, *kernel)``: its first axis, the
        one ``group_size`` counts, holds input channels.
    min_numel: weights with fewer values stay uncompressed (``prepare`` lists
        them in its warning), unless a rule names their module exactly.
    cluster_dtype: ``"float16"`` / ``"bfloat16"`` clusters the scalar weights
        (``dim == 1``) rounded to that 16-bit dtype, uniquified: the attention
        is computed once per distinct 16-bit value (at most 65,536), so a step
        costs about as much as a few passes over the weight.  ``"exact"``
        clusters the exact values.  ``"auto"`` (default): a 16-bit model is
        uniquified in its own dtype (lossless), float32 weights in float16
        (bfloat16 if they exceed float16's range), float64 and vectors
        (``dim > 1``) exactly.  Gradients pass the rounding straight through,
        and ``finalize`` always snaps the exact weights.
    chunk_mb: budget in MiB for the attention map computed at one time; larger
        layers are processed in chunks so peak memory stays bounded.
    top_m: on the exact path (vectors, float64, ``cluster_dtype="exact"``)
        each vector's attention covers only its ``top_m`` nearest centroids,
        renormalised, or its nearest alone where the others provably carry
        less than the float resolution (:mod:`torchdkm.cluster.sparse`): a
        step costs a few passes over a ``k x vectors`` map instead of ~40.
        The mass left out is bounded, and below float resolution for Gaussian
        weights when ``top_m >= dim + 1`` (cells meet ``dim + 1`` at a time).
        ``None``, or ``top_m >= 2**bits``, computes the full attention.
    shard_attention: under ``torch.distributed`` (world size > 1), split the
        full attention of the exact path by rows across the ranks, each rank
        computing ``1 / world`` of it and all-reducing the sums (eDKM's idea);
        every rank gets the same result as unsharded, to float rounding.  It
        uses the full (not top-m) attention, where memory is the bottleneck.
    scale_block: per-block normalisation (``None``: off).  Each output channel
        is cut into blocks of ``scale_block`` consecutive weights along the
        input axis (the axis vectors run along; the last block of a row may be
        shorter; ``0``: one block per row, coremltools' per-channel scale), and
        each block is divided by its own scale (its largest magnitude, or half
        its range with ``scale_offset``), stored in float16.  The LUT is learned
        on the normalised weights, so one LUT serves blocks whose scales differ
        by orders of magnitude (outlier-heavy language-model weights).  The
        scales are derived from the weights at every step, not learned: the
        gradient reaches the weights through the normalisation as well.
        Decoded weight: ``LUT[index] * scale (+ offset)``.  A multiple of ``dim``.
    scale_offset: with ``scale_block``, also subtract each block's midpoint
        (``(max + min) / 2``, float16) before scaling: asymmetric blocks.
    straight_through: ``s`` in ``A C + s (W - stopgrad(W))``: the same value,
        plus each weight's own gradient, which lets weights change cluster at
        1 bit per weight and below, where DKM's reaches them mostly through
        centroids shared with half the layer.  ``None`` (default): ``1`` at
        ``bits / dim <= 1``, else ``0`` (DKM's gradient alone); see README.
    grad_terms: the gradient through the centroids: ``0`` exact (the engine's
        implicit solve); ``n`` the first ``n`` terms of its Neumann series, the
        gradient of ``n`` iterations unrolled from the settled centroids (as
        coremltools differentiates).  ``None`` (default): ``1`` for vectors at
        ``bits <= dim`` (Fashion-MNIST: -0.03 to +1.71 points; README), else ``0``.
    """

    bits: int = 4
    dim: int = 1
    tau: float = 0.005
    max_iters: int = 5
    tol: float = 1e-3
    group_size: int | None = None
    param: str = "weight"
    min_numel: int = 256
    cluster_dtype: str = "auto"
    chunk_mb: float = 64.0
    top_m: int | None = 4
    shard_attention: bool = False
    scale_block: int | None = None
    scale_offset: bool = False
    straight_through: float | None = None
    grad_terms: int | None = None

    def __post_init__(self) -> None:
        self.validate()

    @property
    def k(self) -> int:
        """Number of centroids."""
        return 2**self.bits

    @property
    def bits_per_weight(self) -> float:
        return self.bits / self.dim

    @property
    def through(self) -> float:
        """The straight-through weight in effect (``straight_through``, or its automatic value)."""
        return float(self.straight_through if self.straight_through is not None else self.bits <= self.dim)

    @property
    def terms(self) -> int:
        """The backward's Neumann terms in effect (``grad_terms``, or its automatic value; 0: the exact solve)."""
        return self.grad_terms if self.grad_terms is not None else int(1 < self.dim and self.bits <= self.dim)

    def validate(self, where: str = "LayerConfig") -> None:
        """Raise :class:`TorchdkmError` naming the first bad field."""

        def bad(name: str, why: str) -> TorchdkmError:
            value = getattr(self, name)
            return TorchdkmError(f"{where}: {name}={value!r} is invalid: {why}")

        if not _is_int(self.bits) or not 1 <= self.bits <= 8:
            raise bad("bits", "index bits must be an integer from 1 to 8")
        if not _is_int(self.dim) or self.dim < 1:
            raise bad("dim", "vector length must be an integer >= 1")
        if not _is_real(self.tau) or not math.isfinite(self.tau) or self.tau <= 0:
            raise bad("tau", "temperature must be a finite number > 0")
        if not _is_int(self.max_iters) or self.max_iters < 1:
            raise bad("max_iters", "must be an integer >= 1")
        if not _is_real(self.tol) or not math.isfinite(self.tol) or self.tol < 0:
            raise bad("tol", "must be a finite number >= 0")
        if self.group_size is not None and (not _is_int(self.group_size) or self.group_size < 1):
            raise bad("group_size", "must be None or an integer >= 1")
        if not isinstance(self.param, str) or not self.param:
            raise bad("param", "must be a parameter name")
        if not _is_int(self.min_numel) or self.min_numel < 0:
            raise bad("min_numel", "must be an integer >= 0")
        if self.cluster_dtype not in CLUSTER_DTYPES:
            raise bad("cluster_dtype", f"must be one of {CLUSTER_DTYPES}")
        if not _is_real(self.chunk_mb) or not math.isfinite(self.chunk_mb) or self.chunk_mb <= 0:
            raise bad("chunk_mb", "must be a number > 0")
        if not isinstance(self.shard_attention, bool):
            raise bad("shard_attention", "must be True or False")
        if self.top_m is not None and (not _is_int(self.top_m) or self.top_m < 1):
            raise bad("top_m", "must be None or an integer >= 1")
        if self.scale_block is not None and (not _is_int(self.scale_block) or self.scale_block < 0):
            raise bad("scale_block", "must be None, 0 (one block per row) or a block length >= 1")
        if self.scale_block and self.scale_block % self.dim:
            raise bad("scale_block", f"must be a multiple of dim={self.dim}, so that no vector straddles two blocks")
        if not isinstance(self.scale_offset, bool):
            raise bad("scale_offset", "must be True or False")
        if self.scale_offset and self.scale_block is None:
            raise bad("scale_offset", "needs scale_block (offsets are per block)")
        st = self.straight_through
        if st is not None and (not _is_real(st) or not math.isfinite(st) or st < 0):
            raise bad("straight_through", "must be None (automatic) or a finite number >= 0")
        if self.grad_terms is not None and (not _is_int(self.grad_terms) or self.grad_terms < 0):
            raise bad("grad_terms", "must be None (automatic), 0 (the exact gradient) or an integer >= 1")

    def replace(self, **changes: Any) -> LayerConfig:
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any], where: str = "LayerConfig") -> LayerConfig:
        if not isinstance(data, dict):
            raise TorchdkmError(f"{where}: expected a dict of fields, got {type(data).__name__}")
        _check_keys(data, _LAYER_FIELDS, where)
        try:
            return cls(**data)
        except TorchdkmError as err:
            raise TorchdkmError(str(err).replace("LayerConfig", where, 1)) from None


_LAYER_FIELDS = tuple(f.name for f in dataclasses.fields(LayerConfig))
Rule = LayerConfig | dict | None


@dataclass
class DKMConfig:
    """Rules that choose a :class:`LayerConfig` for each module of a model.

    default: the global rule, applied to every supported module (Linear,
        Conv1d/2d/3d, Embedding) that no other rule names; ``None`` leaves
        unnamed modules alone.
    by_type: module class name (``"Linear"``, ``"Conv2d"``, matched along the
        class hierarchy) or shorthand group (``"fc"``, ``"cv"``, ``"emb"``).
    by_name: qualified module names (``"encoder.layer.0.attention.self.query"``)
        or glob patterns (``"encoder.*.query"``).  Every name rule must match
        at least one module, so a typo is an error, not a silent no-op.
    """

    default: Rule = None
    by_type: dict[str, Rule] = field(default_factory=dict)
    by_name: dict[str, Rule] = field(default_factory=dict)
    version: int = CONFIG_VERSION

    def __post_init__(self) -> None:
        self.default = _as_rule(self.default, "default")
        if not isinstance(self.by_type, dict) or not isinstance(self.by_name, dict):
            raise TorchdkmError("DKMConfig: by_type and by_name must be dicts")
        self.by_type = {k: _as_rule(v, f"by_type[{k!r}]") for k, v in self.by_type.items()}
        self.by_name = {k: _as_rule(v, f"by_name[{k!r}]") for k, v in self.by_name.items()}
        for key in self.by_type:
            if key not in TYPE_GROUPS and key not in SUPPORTED_TYPES:
                raise TorchdkmError(
                    f"DKMConfig: by_type key {key!r} is not a supported module type; "
                    f"use one of {sorted(TYPE_GROUPS) + list(SUPPORTED_TYPES)}"
                )
        if not _is_int(self.version) or self.version != CONFIG_VERSION:
            raise TorchdkmError(f"DKMConfig: version={self.version!r} is not supported (this is {CONFIG_VERSION})")

    # -- construction -----------------------------------------------------
    @classmethod
    def parse(cls, text: str, **fields: Any) -> DKMConfig:
        """Build a config from the paper's shorthand.

        ``"cv:6/6, fc:6/4"``: rules separated by commas, each
        ``KEY:BITS[/DIM][@GROUP][#BLOCK[a]]``.  KEY is ``cv``/``conv``,
        ``fc``/``linear``, ``emb``, a class name (``Conv2d``), ``*``/``all`` for
        the global rule, or a module-name pattern.  ``@GROUP`` sets
        ``group_size``; ``#BLOCK`` sets ``scale_block`` (``#row`` one scale per
        output channel) and a trailing ``a`` ``scale_offset``: ``"fc:3/1#32a"``
        is 3-bit indices into one LUT, asymmetric blocks of 32.  ``KEY:none`` leaves the
        matching modules uncompressed (``"*:4/1, lm_head:none"``).  Extra keyword arguments
        (``tau=0.02``, ``min_numel=0``...) apply to every rule.
        """
        if not isinstance(text, str) or not text.strip():
            raise TorchdkmError(f"DKMConfig.parse: empty config string {text!r}")
        config = cls()
        for position, part in enumerate(text.split(","), 1):
            part = part.strip()
            if not part:
                raise TorchdkmError(
                    f"DKMConfig.parse: rule {position} of {text!r} is empty (a trailing or doubled comma?)"
                )
            skip = _SKIP_RE.fullmatch(part)
            if skip is not None:
                config._add(skip.group(1), None)
                continue
            match = _RULE_RE.fullmatch(part)
            if match is None:
                raise TorchdkmError(
                    f"DKMConfig.parse: cannot read rule {part!r}; expected KEY:BITS[/DIM][@GROUP][#BLOCK[a]] "
                    "as in 'cv:6/6, fc:6/4'"
                )
            key, bits, dim, group, block, offset = match.groups()
            values = dict(fields, bits=int(bits), dim=int(dim or 1))
            if group:
                values["group_size"] = int(group)
            if block:
                values["scale_block"] = 0 if block.lower() == "row" else int(block)
                values["scale_offset"] = bool(offset)
            config._add(key, LayerConfig.from_dict(values, where=f"rule {part!r}"))
        return config

    def _add(self, key: str, rule: Rule) -> None:
        if key in ("*", "all"):
            self.default = rule
        elif key in TYPE_GROUPS or key in SUPPORTED_TYPES:
            self.by_type[key] = rule
        else:
            self.by_name[key] = rule

    def to_dict(self) -> dict[str, Any]:
        def dump(rule: Rule) -> Any:
            return rule.to_dict() if isinstance(rule, LayerConfig) else rule

        return {
            "version": self.version,
            "default": dump(self.default),
            "by_type": {k: dump(v) for k, v in self.by_type.items()},
            "by_name": {k: dump(v) for k, v in self.by_name.items()},
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> DKMConfig:
        if not isinstance(data, dict):
            raise TorchdkmError(f"DKMConfig: expected a dict, got {type(data).__name__}")
        _check_keys(data, ("version", "default", "by_type", "by_name"), "DKMConfig")
        for key in ("by_type", "by_name"):
            if data.get(key) is not None and not isinstance(data[key], dict):
                raise TorchdkmError(f"DKMConfig: {key} must be a dict, got {type(data[key]).__name__}")
        return cls(
            default=data.get("default"),
            by_type=dict(data.get("by_type") or {}),
            by_name=dict(data.get("by_name") or {}),
            version=data.get("version", CONFIG_VERSION),
        )

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> DKMConfig:
        try:
            data = json.loads(text)
        except json.JSONDecodeError as err:
            raise TorchdkmError(f"DKMConfig: invalid JSON: {err}") from None
        return cls.from_dict(data)

    # -- resolution -------------------------------------------------------
    def resolve(self, name: str, module: nn.Module, *, any_type: bool = False) -> LayerConfig | None:
        """The config for one module, or ``None`` if it stays uncompressed.

        The global rule covers supported classes only; ``any_type=True`` applies
        it to every module, so ``prepare`` can name the weights it leaves dense.
        """
        layers = self._matching(name, module, any_type)
        if not layers or layers[-1] is None:
            return None
        merged: LayerConfig | None = None
        for rule in layers:
            if rule is None:
                merged = None
            elif isinstance(rule, LayerConfig):
                merged = rule
            else:
                base = merged if merged is not None else LayerConfig()
                merged = LayerConfig.from_dict({**base.to_dict(), **rule}, where=f"rule for {name!r}")
        return merged

    def excludes(self, name: str, module: nn.Module) -> bool:
        """Whether a rule that matches the module says ``None`` (``"lm_head:none"``), not merely no rule matching.

        ``prepare`` tells the two apart for tied weights: a module no rule covers
        shares the clustered tensor of its tie; one a rule excludes keeps a dense copy.
        """
        layers = self._matching(name, module, any_type=False)
        return bool(layers) and layers[-1] is None

    def _matching(self, name: str, module: nn.Module, any_type: bool) -> list[Rule]:
        """The rules that match a module, least specific first."""
        return matching_rules(self.default, self.by_type, self.by_name, name, module, any_type)

    def name_patterns_matching_nothing(self, names: list[str]) -> list[str]:
        """Name rules that match none of ``names`` (used to reject typos)."""
        return [p for p in self.by_name if not any(name_matches(p, n) for n in names)]


_SKIP_RE = re.compile(r"\s*([^:\s]+)\s*:\s*(?:none|off|-)\s*", re.IGNORECASE)
_RULE_RE = re.compile(
    r"\s*([^:\s]+)\s*:\s*(\d+)\s*(?:/\s*(\d+))?\s*(?:@\s*(\d+))?\s*(?:#\s*(\d+|row)(a?))?\s*", re.IGNORECASE
)


def _as_rule(rule: Any, where: str) -> Rule:
    if rule is None or isinstance(rule, LayerConfig):
        return rule
    if isinstance(rule, dict):
        _check_keys(rule, _LAYER_FIELDS, f"DKMConfig.{where}")
        LayerConfig.from_dict({**LayerConfig().to_dict(), **rule}, where=f"DKMConfig.{where}")
        return dict(rule)
    raise TorchdkmError(f"DKMConfig.{where}: a rule must be a LayerConfig, a dict or None, got {type(rule).__name__}")


def _check_keys(data: dict, allowed: tuple[str, ...], where: str) -> None:
    for key in data:
        if key not in allowed:
            raise TorchdkmError(f"{where}: unknown key {key!r}; allowed keys are {list(allowed)}")


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_real(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)
