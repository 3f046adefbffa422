"""Shared fixtures: a fixed seed, single-threaded torch and a few small models.

The suite runs on tiny tensors, where torch's intra-op thread pool costs far
more than the arithmetic (a softmax over 18 values: ~300 us with 2 threads on a
busy 2-core machine, ~1 us with one), so every test runs single-threaded; the
previous thread count is restored after each test.
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

SEED = 0


@pytest.fixture(autouse=True)
def _seed_and_single_thread():
    """Every test starts from the same random state, on one intra-op thread."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    torch.manual_seed(SEED)
    yield
    torch.set_num_threads(threads)


class ConvNet(nn.Module):
    """Conv2d + Linear, the shapes of the paper's ``cv:`` / ``fc:`` rules."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.conv2 = nn.Conv2d(8, 12, 3, padding=1)
        self.fc = nn.Linear(12 * 4 * 4, 20)
        self.head = nn.Linear(20, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.conv1(x))
        x = torch.nn.functional.max_pool2d(torch.relu(self.conv2(x)), 2)
        return self.head(torch.relu(self.fc(x.flatten(1))))


class MixedNet(nn.Module):
    """Every supported module type: Embedding, Conv1d, Conv3d, Linear (and a LayerNorm left alone)."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(50, 12)
        self.conv1d = nn.Conv1d(12, 10, 3, padding=1)
        self.conv3d = nn.Conv3d(2, 4, (2, 3, 3), padding=1)
        self.norm = nn.LayerNorm(10)
        self.fc = nn.Linear(10, 7)

    def forward(self, tokens: torch.Tensor, volume: torch.Tensor) -> torch.Tensor:
        h = self.emb(tokens).transpose(1, 2)  # (B, 12, L)
        h = torch.relu(self.conv1d(h)).mean(-1)  # (B, 10)
        v = self.conv3d(volume).mean(dim=(1, 2, 3, 4))  # (B,)
        return self.fc(self.norm(h + v[:, None]))


class TiedNet(nn.Module):
    """A language-model shape whose output layer shares the embedding matrix."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(40, 16)
        self.fc = nn.Linear(16, 16)
        self.out = nn.Linear(16, 40, bias=False)
        self.out.weight = self.emb.weight

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.out(torch.tanh(self.fc(self.emb(tokens))))


def _fresh(cls):
    def make(seed: int = 0):
        torch.manual_seed(seed)
        return cls()

    return make


@pytest.fixture
def make_convnet():
    """Factory: ``make_convnet(seed)`` builds a :class:`ConvNet` with seeded weights."""
    return _fresh(ConvNet)


@pytest.fixture
def make_mixednet():
    return _fresh(MixedNet)


@pytest.fixture
def make_tiednet():
    return _fresh(TiedNet)


@pytest.fixture
def conv_input():
    return torch.randn(4, 3, 8, 8, generator=torch.Generator().manual_seed(1))


@pytest.fixture
def mixed_input():
    g = torch.Generator().manual_seed(2)
    return torch.randint(0, 50, (3, 9), generator=g), torch.randn(3, 2, 3, 5, 5, generator=g)


@pytest.fixture
def clone():
    """``copy.deepcopy``, for comparing two routes from the same starting model."""
    return copy.deepcopy
