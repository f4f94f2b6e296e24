"""The static policy: masks never change."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor

from sparsetorch.policies.base import Policy, register_policy

__all__ = ["Static"]


@register_policy("static")
@dataclass(frozen=True, kw_only=True)
class Static(Policy):
    """Keep the initial random mask for the whole run.

    Example::

        >>> Static()
        Static()
    """

    dynamic: ClassVar[bool] = False

    def grow_score(
        self,
        weight: Tensor,
        mask: Tensor,
        grad: Tensor | None,
        generator: torch.Generator | None = None,
    ) -> Tensor:
        """Prefer the current mask: a static policy never moves a weight."""
        return mask.to(weight.dtype)
