"""SNIP: one-shot masks at init by connection sensitivity (Lee et al. 2019)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor

from sparsetorch.policies.base import Policy, register_policy

__all__ = ["SNIP"]


@register_policy("snip")
@dataclass(frozen=True, kw_only=True)
class SNIP(Policy):
    r"""Single-shot network pruning: keep the largest ``|w * dL/dw|`` at init.

    Lee et al. 2019, "SNIP: Single-shot Network Pruning based on Connection
    Sensitivity", https://arxiv.org/abs/1810.02340. The masks are chosen once,
    before training, by :meth:`Sparsifier.prune_at_init
    <sparsetorch.Sparsifier.prune_at_init>` from the connection sensitivity

    .. math::
        s_j = \left| w_j \, \frac{\partial L}{\partial w_j} \right|

    at the initial (dense) weights, with the gradient of the loss summed over
    the batches given (one batch in the paper; several act as one larger
    batch); the masks then stay fixed. The model is dense from ``sparsify``
    until then, and training refuses to start before it.

    Args:
        global_threshold: keep the ``K`` highest sensitivities over all
            tensors together, as the paper does (``K``: the total active
            count the distribution allocates, so the overall sparsity is
            ``sparsity``; each tensor's own count follows from the scores).
            ``False``: keep each tensor's count from ``distribution``.
            Default: ``True``.

    Example::

        >>> import torch
        >>> import sparsetorch as st
        >>> model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(),
        ...                             torch.nn.Linear(16, 4))
        >>> sparsifier = st.sparsify(model, policy="snip", sparsity=0.75)
        >>> x, y = torch.randn(32, 8), torch.randint(0, 4, (32,))
        >>> loss = torch.nn.functional.cross_entropy
        >>> sparsifier.prune_at_init(lambda b: loss(model(b[0]), b[1]), [(x, y)])
        >>> sum(sparsifier.topology.targets.values())
        48
    """

    dynamic: ClassVar[bool] = False

    global_threshold: bool = True

    def __post_init__(self) -> None:
        if not isinstance(self.global_threshold, bool):
            raise TypeError(
                f"global_threshold must be True or False, got "
                f"{self.global_threshold!r}."
            )

    def initial_sparsities(self, sparsities: Mapping[str, float]) -> dict[str, float]:
        """Dense: the sensitivities are measured on the whole network."""
        return dict.fromkeys(sparsities, 0.0)

    def saliency(self, weight: Tensor, grad: Tensor) -> Tensor:
        """The connection sensitivity ``|weight * grad|``."""
        return (weight.detach() * grad).abs()

    def grow_score(
        self,
        weight: Tensor,
        mask: Tensor,
        grad: Tensor | None,
        generator: torch.Generator | None = None,
    ) -> Tensor:
        """Prefer the current mask: after pruning at init, masks never move."""
        return mask.to(weight.dtype)
