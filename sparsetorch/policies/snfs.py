r"""SNFS: sparse momentum (Dettmers & Zettlemoyer 2019)."""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from fractions import Fraction
from typing import ClassVar

import torch
from torch import Tensor

from sparsetorch.policies.base import (
    CountContext,
    Policy,
    check_fraction,
    register_policy,
)

__all__ = ["SNFS", "redistribute"]


@register_policy("snfs")
@dataclass(frozen=True, kw_only=True)
class SNFS(Policy):
    r"""Sparse momentum: drop the smallest ``|w|``, regrow by momentum, across layers.

    Dettmers & Zettlemoyer 2019, "Sparse Networks from Scratch: Faster Training
    without Losing Performance", https://arxiv.org/abs/1907.04840. The
    *momentum* of a tensor is an exponential moving average of its dense
    gradient, folded after every optimizer step (so the dense gradient is
    captured in every backward pass, not only before updates):

    .. math::
        M_t = \beta M_{t-1} + (1 - \beta)\, g_t, \qquad M_0 = 0.

    An update (Algorithm 1 of the paper):

    1. *prune*: each tensor drops ``int(active * drop_fraction)`` of its
       active weights of smallest ``|w|`` (at least one stays);
    2. *redistribute*: the ``R`` weights dropped over all tensors are shared
       out in proportion to each tensor's mean ``|M|`` over its active weights
       (before the update): :func:`redistribute`, which caps a tensor at the
       positions it has free and hands the rounding leftovers out by largest
       remainder, so the total active count stays exactly the same;
    3. *regrow*: each tensor grows its share at the largest ``|M|`` among the
       positions not kept.

    Per-tensor densities move; the total does not. A tensor that never got a
    gradient sits the update out (it neither gives nor takes weights). Cost:
    the dense gradient is kept in every backward pass until the last update,
    and the momentum is one more weight-sized tensor per masked weight (in
    :attr:`Sparsifier.signals <sparsetorch.Sparsifier.signals>` and its
    checkpoints).

    Deviations from the authors' code (``sparse_learning``), each to keep
    sparsetorch's invariants exact: the momentum is this policy's own average
    of the dense gradient, not the optimizer's buffer (which sparsetorch keeps
    zero outside the mask); the drop count rounds down (``int``) as RigL's
    does here, not up; the redistribution is exact (their code caps a layer at
    99% of its free positions and corrects the total over later updates);
    their special rule for layers below 20% sparsity is not applied.

    Under a :class:`torch.amp.GradScaler` the folded gradients carry the loss
    scale of their step; while the scale is constant this changes no choice,
    but a scale change between two updates weighs the steps before and after
    it unevenly.

    Args:
        momentum: :math:`\beta`, in ``[0, 1)``. Default: ``0.9``.

    Raises:
        ValueError: ``momentum`` outside ``[0, 1)``.
        TypeError: ``momentum`` is not a float.

    Example::

        >>> import torch
        >>> import sparsetorch as st
        >>> model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(),
        ...                             torch.nn.Linear(16, 4))
        >>> opt = torch.optim.SGD(model.parameters(), lr=0.1)
        >>> sparsifier = st.sparsify(model, opt, policy="snfs", sparsity=0.75,
        ...                          distribution="uniform", update_interval=2,
        ...                          end_step=10, drop_fraction=0.5)
        >>> for _ in range(2):
        ...     opt.zero_grad()
        ...     model(torch.randn(4, 8)).square().sum().backward()
        ...     opt.step()
        >>> sum(sparsifier.topology.targets.values())
        48
    """

    needs_grad: ClassVar[bool] = True
    dense_grad_every_step: ClassVar[bool] = True

    momentum: float = 0.9

    def __post_init__(self) -> None:
        check_fraction(
            "momentum",
            self.momentum,
            "It is the decay of the moving average of the dense gradient (the "
            "paper uses 0.9).",
        )

    def accumulate_grad(self, running: Tensor | None, grad: Tensor) -> Tensor:
        """``M = momentum * M + (1 - momentum) * grad`` (in place after the first)."""
        if running is None:
            return grad.detach().mul(1.0 - self.momentum)
        return running.mul_(self.momentum).add_(grad, alpha=1.0 - self.momentum)

    def grow_score(
        self,
        weight: Tensor,
        mask: Tensor,
        grad: Tensor | None,
        generator: torch.Generator | None = None,
    ) -> Tensor:
        """``|M|``: the sparsifier passes the momentum as ``grad``."""
        if grad is None:
            raise RuntimeError(
                "SNFS grows where the momentum of the dense gradient is largest, "
                "but this tensor has none yet.\nRun a backward pass and an "
                "optimizer step before updating."
            )
        return grad.abs()

    def update_counts(self, context: CountContext) -> dict[str, tuple[int, int]]:
        """Drop by the fraction, regrow the total by mean momentum magnitude."""
        fraction = context.drop_fraction
        drops: dict[str, int] = {}
        means: dict[str, float] = {}
        for fqn, n in context.active.items():
            signal = context.signals.get(fqn)
            if fqn in context.skip or signal is None:
                continue
            drops[fqn] = min(int(n * fraction), max(n - 1, 0))
            means[fqn] = _mean_magnitude(signal, context.masks[fqn], n)
            if not math.isfinite(means[fqn]):
                raise FloatingPointError(
                    f"SNFS.grow_score gave a NaN/inf momentum for {fqn!r}; the "
                    "update would pick it silently."
                )
        free = {
            fqn: context.numels[fqn] - context.active[fqn] + d
            for fqn, d in drops.items()
        }
        grows = redistribute(sum(drops.values()), means, free, fallback=drops)
        return {fqn: (drops[fqn], grows[fqn]) for fqn in drops}


def _mean_magnitude(signal: Tensor, mask: Tensor, n_active: int) -> float:
    """Mean ``|signal|`` over the ``n_active`` positions of ``mask`` (float64)."""
    if n_active == 0:
        return 0.0
    total = signal.abs().mul(mask).sum(dtype=torch.float64)
    return float(total) / n_active


def redistribute(
    total: int,
    weights: Mapping[str, float],
    capacity: Mapping[str, int],
    *,
    fallback: Mapping[str, int] | None = None,
) -> dict[str, int]:
    """Share ``total`` items out in proportion to ``weights``, within ``capacity``.

    Water-filling: a tensor whose proportional share reaches its capacity
    gets its capacity, and the rest is shared again among the others, until
    every share fits. The real shares are then rounded down and the leftover
    items go one each by largest fractional part (ties: the order of
    ``weights``), so the result sums to ``total`` exactly. The arithmetic is
    exact (rationals), so the result depends on nothing but the inputs. When
    no tensor with room has a positive weight, ``fallback`` (SNFS: each
    tensor's own drop count) is used as the weights, then the capacities.

    Args:
        total: items to share; at most ``sum(capacity.values())``.
        weights: ``name -> weight >= 0``.
        capacity: ``name -> the most it may get``.
        fallback: weights to use when ``weights`` give no room a share.

    Returns:
        ``name -> count``, summing to ``total``, each within its capacity.

    Raises:
        ValueError: ``total`` exceeds the capacity.

    Example::

        >>> redistribute(10, {"a": 1.0, "b": 1.0, "c": 2.0}, {"a": 9, "b": 1, "c": 9})
        {'a': 3, 'b': 1, 'c': 6}
    """
    if total > sum(capacity.values()):
        raise ValueError(
            f"Cannot share {total} items within capacities {dict(capacity)}."
        )
    counts = {name: 0 for name in weights}
    remaining = total
    open_ = [name for name in weights if capacity[name] > 0]
    while remaining > 0:
        # Exact rationals: the shares, floors and remainders do not depend on
        # the order of float sums.
        chosen = {n: Fraction(weights[n]) for n in open_}
        if sum(chosen.values()) <= 0:
            chosen = {n: Fraction((fallback or {}).get(n, 0)) for n in open_}
            if sum(chosen.values()) <= 0:
                chosen = {n: Fraction(capacity[n]) for n in open_}
        scale = sum(chosen.values())
        shares = {n: remaining * chosen[n] / scale for n in open_}
        full = [n for n in open_ if shares[n] >= capacity[n] - counts[n]]
        if full:
            for n in full:
                remaining -= capacity[n] - counts[n]
                counts[n] = capacity[n]
            open_ = [n for n in open_ if n not in full]
            continue
        floors = {n: math.floor(shares[n]) for n in open_}
        for n in open_:
            counts[n] += floors[n]
        remaining -= sum(floors.values())
        order = sorted(
            range(len(open_)), key=lambda i: (-(shares[open_[i]] - floors[open_[i]]), i)
        )
        for i in order:
            if remaining == 0:
                break
            n = open_[i]
            if counts[n] < capacity[n]:
                counts[n] += 1
                remaining -= 1
        open_ = [n for n in open_ if counts[n] < capacity[n]]
    return counts
