r"""GMP: gradual magnitude pruning, dense to sparse (Zhu & Gupta 2017)."""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

import torch
from torch import Tensor

from sparsetorch.distributions import active_count
from sparsetorch.policies.base import (
    CountContext,
    Policy,
    check_fraction,
    register_policy,
)
from sparsetorch.schedule import Schedule

__all__ = ["GMP", "pruning_steps"]


@register_policy("gmp")
@dataclass(frozen=True, kw_only=True)
class GMP(Policy):
    r"""Gradual magnitude pruning: start dense, prune the smallest ``|w|`` on a cubic.

    Zhu & Gupta 2017, "To prune, or not to prune: exploring the efficacy of
    pruning for model compression", https://arxiv.org/abs/1710.01878. Each
    tensor starts at sparsity :math:`s_i` (``initial_sparsity``, capped at its
    allocated sparsity :math:`s_f`) and, at every update step :math:`t` of the
    schedule (every ``update_interval`` steps in ``[begin_step, end_step)``),
    keeps its largest-magnitude active weights at the sparsity

    .. math::
        s_t = s_f + (s_i - s_f) \left(1 - \frac{t - t_0}{t_n - t_0}\right)^3

    with :math:`t_0` = ``begin_step`` and :math:`t_n` the last update step
    before ``end_step``, so that :math:`s_f` is reached exactly there. The
    count is ``active_count(numel, s_t)`` (exact at every step); nothing is
    grown, and ``drop_fraction`` is not used. :math:`s_f` is each tensor's share
    of ``sparsity`` under ``distribution``, so ERK and the others apply.

    Args:
        initial_sparsity: :math:`s_i`, in ``[0, 1)``. Default: ``0.0`` (dense).
            Above ``0``, the initial mask is random, as every other policy's in
            sparsetorch (Zhu & Gupta start dense).

    Raises:
        ValueError: ``initial_sparsity`` outside ``[0, 1)``.
        TypeError: ``initial_sparsity`` is not a float.

    Example::

        >>> import torch
        >>> import sparsetorch as st
        >>> model = torch.nn.Sequential(torch.nn.Linear(10, 10))
        >>> sparsifier = st.sparsify(model, policy=GMP(), sparsity=0.9,
        ...                          distribution="uniform", end_step=31,
        ...                          update_interval=10)
        >>> int(sparsifier.masks["0.weight"].sum())
        100
        >>> [sparsifier.targets_at(k)["0.weight"] for k in (9, 10, 20, 30)]
        [100, 37, 13, 10]
    """

    initial_sparsity: float = 0.0

    def __post_init__(self) -> None:
        check_fraction(
            "initial_sparsity",
            self.initial_sparsity,
            "It is the sparsity GMP starts from: 0.0 starts dense.",
        )

    def initial_sparsities(self, sparsities: Mapping[str, float]) -> dict[str, float]:
        """``min(initial_sparsity, s_f)`` per tensor: pruning never grows."""
        return {fqn: min(self.initial_sparsity, s) for fqn, s in sparsities.items()}

    def sparsity_at(self, step: int, schedule: Schedule, final: float) -> float:
        """The sparsity :math:`s_t` of a tensor with final sparsity ``final``.

        Held from the last update step at or before ``step`` (the initial
        sparsity before the first).

        Example::

            >>> from sparsetorch.schedule import Schedule
            >>> s = Schedule(update_interval=10, end_step=31)
            >>> [round(GMP().sparsity_at(k, s, 0.9), 4) for k in (0, 10, 25, 30)]
            [0.0, 0.6333, 0.8667, 0.9]
        """
        start = min(self.initial_sparsity, final)
        steps = pruning_steps(schedule)
        if steps is None or step < steps[0]:
            return start
        last = steps[1]
        t = min(step - step % schedule.update_interval, last)
        t0 = schedule.begin_step
        progress = 1.0 if last == t0 else (t - t0) / (last - t0)
        return final + (start - final) * (1.0 - progress) ** 3

    def active_counts_at(self, context: CountContext) -> dict[str, int]:
        """``active_count(numel, s_t)`` per tensor, after ``context.step``."""
        return {
            fqn: active_count(
                numel,
                self.sparsity_at(
                    context.step, context.schedule, context.sparsities[fqn]
                ),
            )
            for fqn, numel in context.numels.items()
        }

    def update_counts(self, context: CountContext) -> dict[str, tuple[int, int]]:
        """Drop down to the schedule's count; grow nothing."""
        targets = self.active_counts_at(context)
        return {
            fqn: (max(0, n - targets[fqn]), 0)
            for fqn, n in context.active.items()
            if fqn not in context.skip
        }

    def grow_score(
        self,
        weight: Tensor,
        mask: Tensor,
        grad: Tensor | None,
        generator: torch.Generator | None = None,
    ) -> Tensor:
        """Prefer the current mask: not read, GMP's updates grow nothing.

        (Called with ``n_grow=n_drop`` by hand, the update regrows what it
        dropped: no change.)
        """
        return mask.to(weight.dtype)


def pruning_steps(schedule: Schedule) -> tuple[int, int] | None:
    """The first and last update steps of ``schedule`` (``None`` if it has none).

    Example::

        >>> pruning_steps(Schedule(update_interval=10, begin_step=5, end_step=41))
        (10, 40)
    """
    if schedule.end_step is None:
        return None
    interval = schedule.update_interval
    first = math.ceil(max(schedule.begin_step, 1) / interval) * interval
    last = (schedule.end_step - 1) // interval * interval
    return (first, last) if first <= last else None
