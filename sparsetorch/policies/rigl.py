"""RigL: magnitude drop, gradient growth (Evci et al. 2020)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor

from sparsetorch.policies.base import Policy, register_policy

__all__ = ["RigL"]


@register_policy("rigl")
@dataclass(frozen=True, kw_only=True)
class RigL(Policy):
    """Rigging the Lottery: drop the smallest ``|w|``, grow the largest ``|grad|``.

    Evci et al. 2020, "Rigging the Lottery: Making All Tickets Winners",
    https://arxiv.org/abs/1911.11134. The gradient is the dense gradient of the
    loss with respect to the effective weight, captured in the backward pass(es)
    of the update step.

    Example::

        >>> RigL()
        RigL()
    """

    needs_grad: ClassVar[bool] = True

    def grow_score(
        self,
        weight: Tensor,
        mask: Tensor,
        grad: Tensor | None,
        generator: torch.Generator | None = None,
    ) -> Tensor:
        """``|grad|``."""
        if grad is None:
            raise RuntimeError(
                "RigL needs the dense gradient at an update, but none was captured.\n"
                "Run a backward pass before the optimizer step that updates."
            )
        return grad.abs()
