"""Which axis should a weight's vectors run along?  k-means error of the Fashion-MNIST fp32 models' weights.

torchdkm cuts each output channel's weights into ``dim``-long vectors along the input axes
(``in_channels x kernel``, as the weight lies in memory); coremltools' ``DKMPalettizer`` (its
default ``vector_ch_axis=0``) runs them across output channels: the same input position of
``dim`` consecutive channels.  coremltools is ahead at 0.5 bit per weight on Fashion-MNIST and
digits; if its vectors were easier to cluster, that would be why.  This measures it without
training: every clustered weight (conv and linear, >= 256 values) of each fp32 model, k-means
(scikit-learn, 3 restarts) with ``2**bits`` centroids on its vectors cut each way, and the
relative error of the whole model's clustered weights, ``||W - Q(W)|| / ||W||``.

    python -m experiments.vector_axis        # needs out/fashion_<model>_s0.pt (make fashion-fp32)

Writes ``results/vector_axis.{json,md}``.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
from sklearn.cluster import KMeans
from torch import Tensor, nn

from experiments.common import RESULTS, environment, markdown_table
from experiments.fashion_fp32 import load_fp32

SETTINGS = ((4, 8), (4, 4), (2, 4))
AXES = ("input", "output")
MIN_NUMEL = 256


def cut(weight: Tensor, dim: int, axis: str) -> tuple[Tensor, Tensor]:
    """``(vectors (n, dim), rest)``: ``weight`` cut along ``axis``; ``rest``, the values left over at the end."""
    laid = weight if axis == "input" else weight.transpose(0, -1)  # coremltools: output channels last
    flat = laid.reshape(-1)
    whole = flat.numel() // dim * dim
    return flat[:whole].reshape(-1, dim), flat[whole:]


def joined(vectors: Tensor, rest: Tensor, weight: Tensor, axis: str) -> Tensor:
    """The inverse of :func:`cut`."""
    flat = torch.cat([vectors.reshape(-1), rest])
    if axis == "input":
        return flat.view_as(weight)
    return flat.view(weight.transpose(0, -1).shape).transpose(0, -1)


def clustered(weight: Tensor, bits: int, dim: int, axis: str, seed: int = 0) -> Tensor:
    """``weight`` with each of its vectors replaced by its k-means centroid (the values left over kept)."""
    vectors, rest = cut(weight.detach(), dim, axis)
    k = min(2**bits, vectors.shape[0])
    fit = KMeans(k, n_init=3, random_state=seed).fit(vectors.double().numpy())
    centroids = torch.from_numpy(fit.cluster_centers_[fit.labels_]).to(weight.dtype)
    return joined(centroids, rest, weight, axis)


def relative_error(model: nn.Module, bits: int, dim: int, axis: str) -> float:
    """``||W - Q(W)|| / ||W||`` over every clustered weight of ``model``."""
    error = total = 0.0
    for module in model.modules():
        if isinstance(module, (nn.Conv2d, nn.Linear)) and module.weight.numel() >= MIN_NUMEL:
            weight = module.weight.detach()
            error += float((weight - clustered(weight, bits, dim, axis)).square().sum())
            total += float(weight.square().sum())
    return (error / total) ** 0.5


def measure(models: dict[str, nn.Module]) -> list[dict]:
    rows = []
    for name, model in models.items():
        for bits, dim in SETTINGS:
            errors = {axis: relative_error(model, bits, dim, axis) for axis in AXES}
            rows.append({"model": name, "bits": bits, "dim": dim, **{f"{a}_error": e for a, e in errors.items()}})
            print(f"{name} {bits}/{dim}: input {errors['input']:.4f}  output {errors['output']:.4f}", flush=True)
    return rows


def write(rows: list[dict], out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "vector_axis.json").write_text(json.dumps({"environment": environment(), "rows": rows}, indent=1) + "\n")
    table = markdown_table(
        ("model", "setting", "bits/weight", "input axis (torchdkm)", "output axis (coremltools)", "output / input"),
        (
            (
                r["model"],
                f"{r['bits']}/{r['dim']}",
                f"{r['bits'] / r['dim']:g}",
                f"{r['input_error']:.4f}",
                f"{r['output_error']:.4f}",
                f"{r['output_error'] / r['input_error']:.3f}" if r["input_error"] > 0 else "-",
            )
            for r in rows
        ),
    )
    head = "# k-means relative weight error by vector axis (`python -m experiments.vector_axis`)\n\n"
    (out / "vector_axis.md").write_text(head + table + "\n")


def cli(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["mobilenet", "resnet"])
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    models = {name: load_fp32(name, 0) for name in args.models}
    if any(model is None for model in models.values()):
        return 1
    write(measure(models), args.out)
    return 0


if __name__ == "__main__":
    sys.exit(cli())
