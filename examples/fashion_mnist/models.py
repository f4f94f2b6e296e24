"""The main job's two models: LeNet-300-100 (fully connected) and LeNet-5 (conv)."""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

MODELS = ("lenet300", "lenet5")
TITLES = {"lenet300": "LeNet-300-100", "lenet5": "LeNet-5"}
# the layers a sparsifier masks (biases stay dense)
PRUNABLE = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)


class LeNet300100(nn.Module):
    """The fully connected LeNet-300-100: 784-300-100-10 with ReLU."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(28 * 28, 300)
        self.fc2 = nn.Linear(300, 100)
        self.fc3 = nn.Linear(100, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Maps ``(N, 1, 28, 28)`` images to ``(N, 10)`` logits."""
        x = F.relu(self.fc1(x.flatten(1)))
        x = F.relu(self.fc2(x))
        out: torch.Tensor = self.fc3(x)
        return out


class LeNet5(nn.Module):
    """LeNet-5 (LeCun et al. 1998) with ReLU and max-pooling.

    conv 5x5 (6) - pool - conv 5x5 (16) - pool - 400-120-84-10: 61,470 prunable
    weights, 2,572 of them in the two conv layers.
    """

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 6, 5, padding=2)  # (6, 1, 5, 5)
        self.conv2 = nn.Conv2d(6, 16, 5)  # (16, 6, 5, 5)
        self.fc1 = nn.Linear(16 * 5 * 5, 120)
        self.fc2 = nn.Linear(120, 84)
        self.fc3 = nn.Linear(84, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Maps ``(N, 1, 28, 28)`` images to ``(N, 10)`` logits."""
        x = F.max_pool2d(F.relu(self.conv1(x)), 2)  # (N, 6, 14, 14)
        x = F.max_pool2d(F.relu(self.conv2(x)), 2)  # (N, 16, 5, 5)
        x = F.relu(self.fc1(x.flatten(1)))
        x = F.relu(self.fc2(x))
        out: torch.Tensor = self.fc3(x)
        return out


def build_model(name: str) -> nn.Module:
    """Returns a freshly initialised model by its name in :data:`MODELS`."""
    if name == "lenet300":
        return LeNet300100()
    if name == "lenet5":
        return LeNet5()
    raise ValueError(f"unknown model {name!r}: use one of {', '.join(MODELS)}")


def prunable_weights(model: nn.Module) -> dict[str, int]:
    """Names and sizes of the weights a sparsifier may mask (Linear / Conv)."""
    return {
        f"{name}.weight" if name else "weight": module.weight.numel()
        for name, module in model.named_modules()
        if isinstance(module, PRUNABLE)
    }
