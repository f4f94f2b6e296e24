"""Policies decide which weights an update drops and which it grows.

A policy is a small frozen dataclass whose fields are its hyperparameters. It
scores positions; the framework (:func:`update_mask`) does the rest: it drops the
``n_drop`` lowest-scoring *active* weights and grows the ``n_drop``
highest-scoring positions among all positions not kept (a weight dropped in this
update may be grown back, as in google-research/rigl). Ties are broken by the
update's seeded :class:`torch.Generator`, never by position.

Write your own policy by subclassing :class:`Policy`::

    @register_policy("my-policy")
    @dataclass(frozen=True, kw_only=True)
    class Momentum(Policy):
        needs_grad: ClassVar[bool] = True

        def grow_score(self, weight, mask, grad, generator=None):
            return grad.abs() + 0.1 * weight.abs()
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import ClassVar, TypeVar

import torch
from torch import Tensor

__all__ = ["POLICIES", "Policy", "make_policy", "register_policy", "update_mask"]


@dataclass(frozen=True, kw_only=True)
class Policy:
    """Base class of grow/drop policies.

    Class attributes:
        needs_grad: whether :meth:`grow_score` uses the dense gradient. Only then
            does sparsetorch capture it (at the step before an update).
        dynamic: whether the policy ever changes a mask. A static policy needs
            no ``total_steps``.
    """

    needs_grad: ClassVar[bool] = False
    dynamic: ClassVar[bool] = True

    def drop_score(self, weight: Tensor, mask: Tensor) -> Tensor:
        """Score active weights; the lowest are dropped. Default: ``|weight|``.

        Args:
            weight: the effective weight (zero outside ``mask``).
            mask: the bool mask before the update.

        Returns:
            A tensor of ``weight``'s shape; only active positions are read.
        """
        return weight.abs()

    def grow_score(
        self,
        weight: Tensor,
        mask: Tensor,
        grad: Tensor | None,
        generator: torch.Generator | None = None,
    ) -> Tensor:
        """Score growth candidates; the highest are grown.

        Args:
            weight: the effective weight (zero outside ``mask``).
            mask: the bool mask before the update.
            grad: the dense gradient with respect to the effective weight, or
                ``None`` when :attr:`needs_grad` is false.
            generator: CPU generator for random scores; draw from it in a fixed
                order so that a resumed run draws the same numbers.

        Returns:
            A tensor of ``weight``'s shape; only candidate positions are read.
        """
        raise NotImplementedError(f"{type(self).__name__} must implement grow_score().")


POLICIES: dict[str, type[Policy]] = {}

P = TypeVar("P", bound=type[Policy])


def register_policy(name: str) -> Callable[[P], P]:
    """Register a policy class under ``name`` so that ``policy=name`` finds it."""

    def decorator(cls: P) -> P:
        if name in POLICIES:
            raise ValueError(
                f"A policy named {name!r} is already registered "
                f"({POLICIES[name].__name__}). Pick another name."
            )
        POLICIES[name] = cls
        return cls

    return decorator


def make_policy(policy: str | Policy) -> Policy:
    """Resolve a registered name or pass a policy object through.

    Raises:
        ValueError: unknown name (the message lists the known ones).
        TypeError: neither a string nor a :class:`Policy`.
    """
    if isinstance(policy, Policy):
        return policy
    if isinstance(policy, str):
        if policy not in POLICIES:
            raise ValueError(
                f"Unknown policy {policy!r}.\n"
                f"Known policies: {sorted(POLICIES)}, or a Policy object."
            )
        return POLICIES[policy]()
    raise TypeError(
        f"policy must be a name or a sparsetorch.policies.Policy, got "
        f"{type(policy).__name__}."
    )


def _top(scores: Tensor, eligible: Tensor, k: int, perm: Tensor) -> Tensor:
    """Bool mask of the ``k`` highest ``scores`` among ``eligible`` positions.

    ``perm`` is a random permutation of the flat positions: ``topk`` runs on the
    permuted scores, so ties fall to the permutation, not to the position.
    """
    chosen = torch.zeros(scores.numel(), dtype=torch.bool, device=scores.device)
    if k > 0:
        permuted = scores.flatten()[perm].masked_fill(
            ~eligible.flatten()[perm], float("-inf")
        )
        chosen[perm[torch.topk(permuted, k, sorted=False).indices]] = True
    return chosen.view_as(scores)


def update_mask(
    policy: Policy,
    weight: Tensor,
    mask: Tensor,
    grad: Tensor | None,
    n_drop: int,
    generator: torch.Generator,
) -> Tensor:
    """Compute the mask after one update: drop ``n_drop`` active, grow ``n_drop``.

    Args:
        policy: scores what to drop and what to grow.
        weight: the effective weight, zero outside ``mask``.
        mask: the current bool mask.
        grad: the dense gradient, or ``None``.
        n_drop: how many active weights to drop (and grow); at most the number
            of active weights.
        generator: CPU generator for tie-breaking and random growth.

    Returns:
        A new bool mask with exactly as many active weights as ``mask``.

    Raises:
        FloatingPointError: a score read by the update is NaN or infinite.

    Example::

        >>> from sparsetorch.policies import RigL
        >>> w = torch.tensor([0.5, -0.1, 0.0, 0.0, 2.0])
        >>> m = torch.tensor([True, True, False, False, True])
        >>> g = torch.tensor([0.0, 0.0, 3.0, 1.0, 0.0])
        >>> update_mask(RigL(), w, m, g, 1, torch.Generator().manual_seed(0))
        tensor([ True, False,  True, False,  True])
    """
    if n_drop == 0:
        return mask.clone()
    n = mask.numel()
    perm = torch.randperm(n, generator=generator).to(mask.device)
    drop = policy.drop_score(weight, mask)
    _check_finite(drop, mask, "drop", type(policy).__name__)
    dropped = _top(-drop, mask, n_drop, perm)
    kept = mask & ~dropped
    grow = policy.grow_score(weight, mask, grad, generator)
    _check_finite(grow, ~kept, "grow", type(policy).__name__)
    grown = _top(grow, ~kept, n_drop, perm)
    return kept | grown


def _check_finite(scores: Tensor, where: Tensor, kind: str, policy: str) -> None:
    if not bool(torch.isfinite(scores.masked_fill(~where, 0)).all()):
        bad = int((~torch.isfinite(scores) & where).sum())
        raise FloatingPointError(
            f"{policy}.{kind}_score gave {bad} NaN/inf value(s); the update would "
            "pick them silently."
        )
