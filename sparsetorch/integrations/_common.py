"""What the framework callbacks share: ``sparsify``'s arguments and the call."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from torch import nn

from sparsetorch.api import sparsify
from sparsetorch.policies.base import Policy
from sparsetorch.sparsifier import Sparsifier
from sparsetorch.structure import Structure

__all__ = ["LENGTH_NOT_YET_KNOWN", "SparsifyArguments"]

#: ``total_steps`` given to ``sparsify`` until the framework knows the run
#: length; the callback's ``set_total_steps`` replaces it before the first step.
LENGTH_NOT_YET_KNOWN = 2**62


class SparsifyArguments:
    """A callback holding the keyword arguments of :func:`sparsetorch.sparsify`.

    Each callback takes them explicitly in its ``__init__`` (a misspelled option
    fails there) and stores them under their own names; :meth:`_sparsify_model`
    makes the one call.
    """

    policy: str | Policy
    sparsity: float
    distribution: str | Mapping[str, float]
    total_steps: int | None
    update_interval: int
    drop_fraction: float
    drop_schedule: str
    begin_step: int
    end_step: int | None
    include: Sequence[str] | None
    exclude: Sequence[str] | None
    grow_init: str | float
    seed: int
    execution: str
    structure: str | Structure | None

    def _sparsify_model(self, model: nn.Module) -> Sparsifier:
        """``sparsify(model)`` with these arguments, before an optimizer exists."""
        total_steps = self.total_steps
        if total_steps is None and self.end_step is None:
            total_steps = LENGTH_NOT_YET_KNOWN
        sparsifier = sparsify(
            model,
            None,
            policy=self.policy,
            sparsity=self.sparsity,
            distribution=self.distribution,
            total_steps=total_steps,
            update_interval=self.update_interval,
            drop_fraction=self.drop_fraction,
            drop_schedule=self.drop_schedule,
            begin_step=self.begin_step,
            end_step=self.end_step,
            include=self.include,
            exclude=self.exclude,
            grow_init=self.grow_init,
            seed=self.seed,
            execution=self.execution,
            structure=self.structure,
        )
        if total_steps == LENGTH_NOT_YET_KNOWN:
            sparsifier.total_steps = None  # not a length: set at fit start
        return sparsifier
