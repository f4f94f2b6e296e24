"""Shared fixtures: a fixed seed and tiny deterministic models."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch
from torch import nn

# Tiny models: threads only add contention on small CI machines.
torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _seed() -> Iterator[None]:
    torch.manual_seed(0)
    yield


def mlp() -> nn.Sequential:
    """784-like MLP in miniature: 20-32-16-4."""
    return nn.Sequential(
        nn.Linear(20, 32), nn.ReLU(), nn.Linear(32, 16), nn.ReLU(), nn.Linear(16, 4)
    )


def cnn() -> nn.Sequential:
    """Conv + BatchNorm + Linear on 3x8x8 inputs, 4 classes."""
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        nn.Conv2d(8, 8, 3, stride=2, padding=1),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(8 * 4 * 4, 4),
    )


def batch(model: nn.Module, n: int = 16) -> tuple[torch.Tensor, torch.Tensor]:
    """A fixed random batch for ``mlp()`` or ``cnn()``."""
    first = next(m for m in model.modules() if isinstance(m, (nn.Linear, nn.Conv2d)))
    shape = (n, 20) if isinstance(first, nn.Linear) else (n, 3, 8, 8)
    g = torch.Generator().manual_seed(1234)
    return torch.randn(shape, generator=g), torch.randint(0, 4, (n,), generator=g)


def train_step(
    model: nn.Module, optimizer: torch.optim.Optimizer, x: torch.Tensor, y: torch.Tensor
) -> None:
    optimizer.zero_grad()
    nn.functional.cross_entropy(model(x), y).backward()
    optimizer.step()
