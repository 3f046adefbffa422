"""Size accounting, as the paper counts it: indices + LUTs + every tensor left uncompressed.

Works on a prepared model (sizes it would have once finalized, plus each
layer's train/export gap: the relative L2 distance between the soft weight
used in training and the hard weight ``finalize`` exports) and on a finalized
one.  The fp32 size counts every parameter and persistent buffer at 4 bytes
per value; the compressed size counts packed indices, LUTs in their stored
dtype and every other tensor at its stored size.  A tensor several modules
share (tied weights) is stored once and counted once: its first holder has the
row, the others are listed in ``Report.tied``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch import nn

from .nn.palettized import PaletteSpec, PalettizedMixin
from .nn.parametrization import dkm_parametrizations, original
from .pack import packed_size

#: ``str(report)`` names this many uncompressed tensors (the largest); ``Report.uncompressed`` has all.
UNCOMPRESSED_SHOWN = 12


@dataclass
class LayerRow:
    name: str
    shape: tuple[int, ...]
    bits: int
    dim: int
    groups: int
    index_bytes: int
    lut_bytes: int
    gap: float | None = None  # soft vs hard weight, relative L2 (prepared models only)
    scale_bytes: int = 0  # per-block scales and offsets (float16)

    @property
    def k(self) -> int:
        return 2**self.bits

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def bits_per_weight(self) -> float:
        return self.bits / self.dim

    @property
    def bytes(self) -> int:
        return self.index_bytes + self.lut_bytes + self.scale_bytes


@dataclass
class Report:
    layers: list[LayerRow] = field(default_factory=list)
    uncompressed: list[tuple[str, tuple[int, ...], int]] = field(default_factory=list)
    fp32_bytes: int = 0
    #: ``(name, same as)``: palettized tensors that are another row's tensor (tied weights), counted once.
    tied: list[tuple[str, str]] = field(default_factory=list)

    @property
    def compressed_bytes(self) -> int:
        return sum(r.bytes for r in self.layers) + sum(b for _, _, b in self.uncompressed)

    @property
    def factor(self) -> float:
        return self.fp32_bytes / max(self.compressed_bytes, 1)

    @property
    def bits_per_weight(self) -> float:
        """Index bits per clustered weight, averaged over the clustered weights (32 when none is)."""
        if not self.layers:
            return 32.0
        return sum(r.bits_per_weight * r.numel for r in self.layers) / sum(r.numel for r in self.layers)

    def to_dict(self) -> dict:
        return {
            "layers": [
                {**r.__dict__, "shape": list(r.shape), "k": r.k, "bits_per_weight": r.bits_per_weight}
                for r in self.layers
            ],
            "uncompressed": [{"name": n, "shape": list(s), "bytes": b} for n, s, b in self.uncompressed],
            "tied": [{"name": n, "same_as": o} for n, o in self.tied],
            "fp32_bytes": self.fp32_bytes,
            "compressed_bytes": self.compressed_bytes,
            "factor": self.factor,
        }

    def __str__(self) -> str:
        head = ("layer", "shape", "bits/dim", "k", "groups", "bits/w", "index B", "LUT B", "scale B", "gap %")
        rows = [
            (
                r.name,
                "x".join(map(str, r.shape)),
                f"{r.bits}/{r.dim}",
                str(r.k),
                str(r.groups),
                f"{r.bits_per_weight:.3g}",
                f"{r.index_bytes:,}",
                f"{r.lut_bytes:,}",
                f"{r.scale_bytes:,}",
                "-" if r.gap is None else f"{100 * r.gap:.2f}",
            )
            for r in self.layers
        ]
        widths = [max(len(str(x)) for x in col) for col in zip(head, *rows)]
        line = lambda cells: "  ".join(
            str(c).rjust(w) if i else str(c).ljust(w) for i, (c, w) in enumerate(zip(cells, widths))
        )  # noqa: E731
        out = [line(head), line(["-" * w for w in widths]), *map(line, rows)]
        out += [f"tied, counted once: {', '.join(f'{n} = {o}' for n, o in self.tied)}"] if self.tied else []
        out += self.uncompressed_lines()
        other = sum(b for _, _, b in self.uncompressed)
        out.append(
            f"uncompressed tensors: {len(self.uncompressed)} ({other:,} B)   "
            f"fp32 size: {self.fp32_bytes:,} B   compressed: {self.compressed_bytes:,} B   "
            f"factor: {self.factor:.2f}x"
        )
        return "\n".join(out)

    def uncompressed_lines(self, limit: int = UNCOMPRESSED_SHOWN) -> list[str]:
        """The dense tensors by name, largest first: where the bytes a config leaves behind are."""
        if not self.uncompressed:
            return []
        ranked = sorted(self.uncompressed, key=lambda t: -t[2])
        shown = ranked if len(ranked) <= limit + 1 else ranked[:limit]
        width = max(len(name) for name, _, _ in shown)
        out = [f"uncompressed, largest first ({self.percent_dense():.1f} % of the compressed size):"]
        out += [
            f"  {name.ljust(width)}  {'x'.join(map(str, shape)) or 'scalar':>12}  {size:>12,} B"
            for name, shape, size in shown
        ]
        if len(shown) < len(ranked):
            rest = ranked[len(shown) :]
            out.append(
                f"  ... {len(rest)} smaller tensors, {sum(t[2] for t in rest):,} B (Report.uncompressed lists all)"
            )
        return out

    def percent_dense(self) -> float:
        return 100 * sum(b for _, _, b in self.uncompressed) / max(self.compressed_bytes, 1)


def layer_row(name: str, spec: PaletteSpec, lut_itemsize: int, gap: float | None = None) -> LayerRow:
    layout = spec.layout
    return LayerRow(
        name=name,
        shape=spec.shape,
        bits=spec.bits,
        dim=spec.dim,
        groups=layout.groups,
        index_bytes=packed_size(spec.index_count, spec.bits),
        lut_bytes=layout.groups * 2**spec.bits * spec.dim * lut_itemsize,
        gap=gap,
        scale_bytes=0 if spec.scales is None else spec.scales.stored_bytes,
    )


@torch.no_grad()
def report(model: nn.Module, *, gap: bool = True, show: bool = True) -> Report:
    """Per-layer size table and totals; prints it unless ``show=False``."""
    result = Report()
    seen: set[int] = set()
    rows: dict[int, str] = {}  # a palette's indices buffer or a parametrization -> the row that counts it
    dkm = {(n, p): par for n, _, p, par in dkm_parametrizations(model)}
    for name, module in model.named_modules():
        if ".parametrizations" in f".{name}" or name.startswith("parametrizations"):
            continue
        prefix = f"{name}." if name else ""
        palette = module.palette if isinstance(module, PalettizedMixin) else {}
        for param, spec in palette.items():
            indices = getattr(module, f"{param}_indices")
            if id(indices) in rows:
                result.tied.append((prefix + param, rows[id(indices)]))
                continue
            rows[id(indices)] = prefix + param
            lut = getattr(module, f"{param}_lut")
            result.layers.append(layer_row(prefix + param, spec, lut.element_size()))
            result.fp32_bytes += 4 * math.prod(spec.shape)
        hidden = {f"{p}_{part}" for p in palette for part in ("indices", "lut", "scales", "offsets")}
        for param_name, tensor in _own_tensors(module):
            if param_name in hidden:
                continue
            # A DKM weight is exported palettized; another module that shares the tensor
            # (tied weights, that module excluded) keeps a dense copy, counted below.
            if (name, param_name) not in dkm:
                if id(tensor) in seen:
                    continue
                seen.add(id(tensor))
            if (name, param_name) in dkm:
                par = dkm[(name, param_name)]
                if id(par) in rows:
                    result.tied.append((prefix + param_name, rows[id(par)]))
                    continue
                rows[id(par)] = prefix + param_name
                weight = original(module, param_name)
                spec = par.spec(weight)
                distance = None
                if gap:
                    hard, centroids = par.export(weight)
                    soft = par.soft(weight, centroids)
                    distance = float((soft - hard).float().norm() / hard.float().norm().clamp_min(1e-30))
                result.layers.append(layer_row(prefix + param_name, spec, weight.element_size(), distance))
                result.fp32_bytes += 4 * weight.numel()
            else:
                result.uncompressed.append(
                    (prefix + param_name, tuple(tensor.shape), tensor.numel() * tensor.element_size())
                )
                result.fp32_bytes += 4 * tensor.numel()
    if show:
        print(result)
    return result


def _own_tensors(module: nn.Module):
    """A module's own parameters and persistent buffers; a parametrized weight by its name."""
    if hasattr(module, "parametrizations"):
        for param in module.parametrizations:
            yield param, original(module, param)
    for n, p in module._parameters.items():
        if p is not None:
            yield n, p
    for n, b in module._buffers.items():
        if b is not None and n not in module._non_persistent_buffers_set:
            yield n, b
