"""SET: magnitude drop, random growth (Mocanu et al. 2018)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from sparsetorch.policies.base import Policy, random_scores, register_policy

__all__ = ["SET"]


@register_policy("set")
@dataclass(frozen=True, kw_only=True)
class SET(Policy):
    """Sparse Evolutionary Training: drop the smallest ``|w|``, grow at random.

    Mocanu et al. 2018, "Scalable training of artificial neural networks with
    adaptive sparse connectivity inspired by network science",
    https://arxiv.org/abs/1707.04780.

    Example::

        >>> SET()
        SET()
    """

    def grow_score(
        self,
        weight: Tensor,
        mask: Tensor,
        grad: Tensor | None,
        generator: torch.Generator | None = None,
    ) -> Tensor:
        """Uniform random scores, drawn on the CPU from ``generator``."""
        return random_scores(weight, generator)
