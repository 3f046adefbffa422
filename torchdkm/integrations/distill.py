"""Fine-tuning a DKM-prepared text encoder by distillation from its original.

No labels are needed: the student (the prepared copy) learns to reproduce the
teacher's (the original's) outputs on plain sentences, the loss being the mean
squared error over real (unpadded) tokens.  This is what lets ``torchdkm
compress`` work on any Hugging Face model with only a text file, or with the
small built-in sample when the user has no data at hand.
"""

from __future__ import annotations

import math
import os
from importlib import resources
from pathlib import Path

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from ..errors import TorchdkmError
from ..nn.parametrization import DKMParametrization

DEMO_DATA = "sentences.txt"


def read_sentences(path: str | os.PathLike | None = None) -> list[str]:
    """Non-empty lines of ``path`` (UTF-8), or the built-in sample of English sentences."""
    if path is None:
        text = resources.files(__package__).joinpath("data", DEMO_DATA).read_text(encoding="utf-8")
    else:
        path = Path(path)
        if not path.is_file():
            raise TorchdkmError(f"{path}: no such file")
        text = path.read_text(encoding="utf-8")
    sentences = [line.strip() for line in text.splitlines() if line.strip()]
    if not sentences:
        raise TorchdkmError(f"{path}: no sentences (expected one sentence per line)")
    return sentences


def masked_mse(student: Tensor, teacher: Tensor, mask: Tensor | None) -> Tensor:
    """MSE over real tokens for ``(batch, tokens, features)`` outputs, plain MSE otherwise."""
    if mask is None or student.dim() != 3:
        return nn.functional.mse_loss(student, teacher)
    weight = mask.to(student.dtype).unsqueeze(-1)
    return ((student - teacher) ** 2 * weight).sum() / (weight.sum() * student.shape[-1]).clamp_min(1)


def train_mode(student: nn.Module) -> None:
    """DKM layers in training mode, everything else (dropout) in eval mode.

    DKM clusters softly only in training mode; dropout would make the student
    chase a noisy copy of a deterministic teacher.
    """
    student.eval()
    for module in student.modules():
        if isinstance(module, DKMParametrization):
            module.train()


def distill(
    student: nn.Module,
    teacher: nn.Module,
    tokenizer,
    sentences: list[str],
    *,
    epochs: int = 1,
    batch_size: int = 16,
    lr: float = 1e-4,
    max_length: int = 128,
    max_steps: int | None = None,
    seed: int = 0,
    progress: bool = True,
) -> list[float]:
    """Train ``student`` (DKM-prepared) to match ``teacher`` on ``sentences``; returns the step losses."""
    if epochs < 1 or batch_size < 1 or (max_steps is not None and max_steps < 1):
        raise TorchdkmError("distill: epochs, batch_size and max_steps must be >= 1")
    if not sentences:
        raise TorchdkmError("distill: no sentences to train on")
    per_epoch = math.ceil(len(sentences) / batch_size)
    steps = epochs * per_epoch if max_steps is None else min(max_steps, epochs * per_epoch)
    teacher.eval()
    train_mode(student)
    params = [p for p in student.parameters() if p.requires_grad]
    optimizer = torch.optim.Adam(params, lr=lr)
    generator = torch.Generator().manual_seed(seed)
    total = sum(min(batch_size, len(sentences) - (s % per_epoch) * batch_size) for s in range(steps))
    losses: list[float] = []
    bar = tqdm(total=total, unit="sent", desc="distilling", disable=not progress, dynamic_ncols=True)
    with bar:
        for step in range(steps):
            if step % per_epoch == 0:
                order = torch.randperm(len(sentences), generator=generator).tolist()
            chunk = order[(step % per_epoch) * batch_size :][:batch_size]
            batch = tokenizer(
                [sentences[i] for i in chunk],
                padding=True,
                truncation=True,
                max_length=max_length,
                return_tensors="pt",
            )
            with torch.no_grad():
                target = teacher(**batch)[0]
            loss = masked_mse(student(**batch)[0], target, batch.get("attention_mask"))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            losses.append(loss.item())
            bar.update(len(chunk))
            bar.set_postfix(loss=f"{losses[-1]:.3g}", epoch=step // per_epoch + 1)
    student.eval()
    return losses
