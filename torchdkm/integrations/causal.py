"""Compressing a causal language model: distillation on the teacher's next-token distribution, and perplexity.

The student (the DKM-prepared copy) learns to predict what the teacher (the
original) predicts, token by token: the loss is the KL divergence from the
teacher's next-token distribution to the student's, averaged over every
position of fixed-length token windows cut from plain text (one passage per
line, joined by the end-of-text token).  This needs no labels and keeps the
whole distribution, not only the top token (eDKM trains LLaMA this way).  An
optional hidden-state term adds the mean squared error of the last hidden
states, for models whose logits alone give a weak signal early in training.
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterator

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from ..errors import TorchdkmError
from .distill import train_mode


def is_causal_lm(model: nn.Module) -> bool:
    """Whether ``model`` is a transformers causal LM (``*ForCausalLM``, ``*LMHeadModel``)."""
    name = type(model).__name__
    return name.endswith("ForCausalLM") or name.endswith("LMHeadModel")


def token_windows(tokenizer, passages: list[str], length: int) -> Tensor:
    """``(windows, length)`` token ids: the passages, joined by the end-of-text token, cut into windows."""
    if length < 2:
        raise TorchdkmError(f"token windows need at least 2 tokens, got length={length}")
    separator = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else tokenizer.sep_token_id
    ids: list[int] = []
    for passage in passages:
        ids.extend(tokenizer(passage, add_special_tokens=False)["input_ids"])
        if separator is not None:
            ids.append(separator)
    count = len(ids) // length
    if count == 0:
        raise TorchdkmError(f"the text holds {len(ids)} tokens, fewer than one window of {length}")
    return torch.tensor(ids[: count * length], dtype=torch.long).view(count, length)


def spread(windows: Tensor, count: int) -> Tensor:
    """``count`` of ``windows`` evenly spread over them (all of them if fewer): a calibration from the whole text."""
    return windows[:: max(1, len(windows) // count)][:count]


def window_losses(model: nn.Module, windows: Tensor) -> Iterator[Tensor]:
    """The next-token loss of each window in turn (what :func:`torchdkm.plan_to_size` needs for its Fisher)."""
    for window in windows:
        yield model(input_ids=window[None], labels=window[None]).loss


def kl_next_token(student_logits: Tensor, teacher_logits: Tensor) -> Tensor:
    """Mean over positions of KL(teacher || student) of the next-token distributions."""
    teacher = torch.log_softmax(teacher_logits.float(), -1)
    student = torch.log_softmax(student_logits.float(), -1)
    return (teacher.exp() * (teacher - student)).sum(-1).mean()


@torch.no_grad()
def perplexity(model: nn.Module, windows: Tensor, batch_size: int = 4) -> float:
    """exp of the mean next-token cross-entropy over every window (each predicts its tokens 2..L)."""
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    for start in range(0, len(windows), batch_size):
        batch = windows[start : start + batch_size]
        logits = model(input_ids=batch).logits[:, :-1].float()
        target = batch[:, 1:]
        total += float(nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), target.reshape(-1), reduction="sum"))
        count += target.numel()
    model.train(was_training)
    return math.exp(total / count)


def distill_causal(
    student: nn.Module,
    teacher: nn.Module,
    windows: Tensor,
    *,
    epochs: int = 1,
    batch_size: int = 4,
    lr: float = 1e-4,
    max_steps: int | None = None,
    seed: int = 0,
    hidden_weight: float = 0.0,
    progress: bool = True,
) -> list[float]:
    """Train ``student`` to match ``teacher``'s next-token distributions on ``windows``; returns the step losses."""
    if epochs < 1 or batch_size < 1 or (max_steps is not None and max_steps < 1) or hidden_weight < 0:
        raise TorchdkmError("distill: epochs, batch_size and max_steps must be >= 1, hidden_weight >= 0")
    per_epoch = math.ceil(len(windows) / batch_size)
    steps = epochs * per_epoch if max_steps is None else min(max_steps, epochs * per_epoch)
    teacher.eval()
    train_mode(student)
    optimizer = torch.optim.Adam([p for p in student.parameters() if p.requires_grad], lr=lr)
    generator = torch.Generator().manual_seed(seed)
    losses: list[float] = []
    tokens = windows.shape[1]
    bar = tqdm(total=steps, unit="step", desc="distilling", disable=not progress, dynamic_ncols=True)
    started = time.perf_counter()
    with bar:
        for step in range(steps):
            if step % per_epoch == 0:
                order = torch.randperm(len(windows), generator=generator)
            batch = windows[order[(step % per_epoch) * batch_size :][:batch_size]]
            want_hidden = hidden_weight > 0
            with torch.no_grad():
                target = teacher(input_ids=batch, output_hidden_states=want_hidden)
            out = student(input_ids=batch, output_hidden_states=want_hidden)
            loss = kl_next_token(out.logits, target.logits)
            if want_hidden:
                loss = loss + hidden_weight * nn.functional.mse_loss(out.hidden_states[-1], target.hidden_states[-1])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            losses.append(loss.item())
            rate = (step + 1) * len(batch) * tokens / (time.perf_counter() - started)
            bar.set_postfix(loss=f"{losses[-1]:.3g}", tok_s=f"{rate:.0f}")
            bar.update(1)
    student.eval()
    return losses


__all__ = ["distill_causal", "is_causal_lm", "kl_next_token", "perplexity", "token_windows", "window_losses"]
