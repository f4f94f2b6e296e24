"""Policies decide which weights an update drops and which it grows.

A policy is a small frozen dataclass whose fields are its hyperparameters. It
scores positions; the framework (:func:`update_mask`) does the rest: it drops the
``n_drop`` lowest-scoring *active* weights and grows the ``n_grow``
highest-scoring positions among all positions not kept (a weight dropped in this
update may be grown back, as in google-research/rigl). Ties are broken by the
update's seeded :class:`torch.Generator`, never by position. How many each
tensor drops and grows is the policy's :meth:`Policy.update_counts`: by default
``int(active * drop_fraction)`` of each (the count stays); SNFS moves regrowth
between tensors, GMP only prunes.

Write your own policy by subclassing :class:`Policy`::

    @register_policy("my-policy")
    @dataclass(frozen=True, kw_only=True)
    class Momentum(Policy):
        needs_grad: ClassVar[bool] = True

        def grow_score(self, weight, mask, grad, generator=None):
            return grad.abs() + 0.1 * weight.abs()
"""

from __future__ import annotations

import contextvars
import types
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar, TypeVar

import torch
from torch import Tensor

if TYPE_CHECKING:
    from sparsetorch.schedule import Schedule
    from sparsetorch.structure import Layout

_np: types.ModuleType | None
try:
    import numpy as _np
except ImportError:  # pragma: no cover - torch works without numpy
    _np = None

_NUMPY_DTYPES = (torch.float32, torch.float64)

__all__ = [
    "POLICIES",
    "CountContext",
    "Policy",
    "make_policy",
    "random_scores",
    "register_policy",
    "update_mask",
]


@dataclass(frozen=True, kw_only=True)
class Policy:
    """Base class of grow/drop policies.

    Class attributes:
        needs_grad: whether :meth:`grow_score` uses the dense gradient. Only then
            does sparsetorch capture it (at the step before an update).
        dynamic: whether the policy ever changes a mask. A static policy needs
            no ``total_steps``.
        dense_grad_every_step: whether the policy reads the dense gradient of
            every step, not only the step before an update (SNFS folds each
            one into a running average: :meth:`accumulate_grad`). Then the
            dense gradient is captured in every backward pass.
    """

    needs_grad: ClassVar[bool] = False
    dynamic: ClassVar[bool] = True
    dense_grad_every_step: ClassVar[bool] = False

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
            The update overwrites the other positions of a tensor it gets here
            (it copies ``weight``, ``mask`` or ``grad`` and views of them
            first), so return a new tensor, not one you keep.
        """
        raise NotImplementedError(f"{type(self).__name__} must implement grow_score().")

    def initial_sparsities(self, sparsities: Mapping[str, float]) -> dict[str, float]:
        """The sparsity of each tensor's initial (random) mask.

        Args:
            sparsities: ``tensor_fqn -> sparsity`` as allocated: the run's target.

        Returns:
            ``tensor_fqn -> sparsity`` of the mask drawn at ``sparsify``.
            Default: the allocated sparsities (the run starts at its target).
            A dense-to-sparse policy (GMP) starts lower; SNIP starts dense.
        """
        return dict(sparsities)

    def update_counts(self, context: CountContext) -> dict[str, tuple[int, int]]:
        """How many weights each tensor drops and grows in this update.

        Args:
            context: the step, the drop fraction and the per-tensor counts.

        Returns:
            ``tensor_fqn -> (n_drop, n_grow)``; a tensor left out keeps its
            mask. Default: ``int(active * drop_fraction)`` dropped and as many
            grown, for every tensor not in ``context.skip``.
        """
        fraction = context.drop_fraction
        return {
            fqn: (int(n * fraction), int(n * fraction))
            for fqn, n in context.active.items()
            if fqn not in context.skip
        }

    def active_counts_at(self, context: CountContext) -> dict[str, int]:
        """The active count of each tensor the schedule holds after ``context.step``.

        Default: the current counts (a policy that drops and grows as many
        keeps them). GMP returns its cubic schedule.
        """
        return dict(context.active)

    def accumulate_grad(self, running: Tensor | None, grad: Tensor) -> Tensor:
        """Fold one step's dense gradient into the running signal of one tensor.

        Called after every optimizer step for policies with
        :attr:`dense_grad_every_step`; the result is kept by the sparsifier
        (and in its checkpoints) and passed to :meth:`grow_score` as ``grad``.

        Args:
            running: the signal so far (``None`` before the first gradient);
                it may be updated in place and returned.
            grad: this step's dense gradient (do not keep it: it is released).

        Returns:
            The new running signal.
        """
        raise NotImplementedError(
            f"{type(self).__name__} sets dense_grad_every_step and must implement "
            "accumulate_grad()."
        )


@dataclass(frozen=True, kw_only=True)
class CountContext:
    """What a policy reads to decide per-tensor counts (:meth:`Policy.update_counts`).

    Attributes:
        step: the optimizer step (the update runs right after it).
        schedule: the sparsifier's schedule (when updates happen).
        numels: ``tensor_fqn -> number of elements``.
        sparsities: ``tensor_fqn -> sparsity`` as allocated (the target).
        targets: ``tensor_fqn -> active count`` as allocated (the target).
        active: ``tensor_fqn -> active count`` now.
        drop_fraction: the schedule's drop fraction at ``step``.
        masks: ``tensor_fqn -> mask`` before the update (empty outside one).
        signals: ``tensor_fqn -> the tensor passed to grow_score as grad``
            (the dense gradient, or the running signal of a policy with
            ``dense_grad_every_step``; empty outside an update).
        skip: tensors that sit this update out (no gradient, or frozen).
    """

    step: int
    schedule: Schedule
    numels: Mapping[str, int]
    sparsities: Mapping[str, float]
    targets: Mapping[str, int]
    active: Mapping[str, int]
    drop_fraction: float = 0.0
    masks: Mapping[str, Tensor] = field(default_factory=dict)
    signals: Mapping[str, Tensor | None] = field(default_factory=dict)
    skip: frozenset[str] = frozenset()


def check_fraction(name: str, value: object, meaning: str) -> None:
    """Raise unless ``value``, a policy's field ``name``, is a float in [0, 1).

    Raises:
        TypeError: not a float (or int).
        ValueError: outside [0, 1); ``meaning`` says what the field is.
    """
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a float, got {value!r}.")
    if not 0.0 <= value < 1.0:
        raise ValueError(f"{name} must be in [0, 1), got {value!r}.\n{meaning}")


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


# Above this many scores, a CPU top-k first narrows the candidates to those above
# a threshold estimated from a fixed sample of positions, so that the exact
# selection runs on a few times k scores instead of all of them.
_NARROW_MIN = 1 << 16
_SAMPLE = 1 << 14
_SPREAD = 2654435761  # a prime near 2**32 / golden ratio: spreads sample positions


def _on_numpy(t: Tensor) -> bool:
    """Whether the CPU fast path (numpy, sharing ``t``'s memory) can read ``t``."""
    return (
        _np is not None
        and t.device.type == "cpu"
        and t.dtype in _NUMPY_DTYPES
        and t.is_contiguous()
        and not t.requires_grad
        and not t.is_conj()
        and not t.is_neg()
    )


def _nonzero(flat: Tensor) -> Tensor:
    """Positions of the ``True`` entries of the 1-D bool ``flat``, ascending."""
    if _np is not None and flat.device.type == "cpu" and flat.is_contiguous():
        return torch.from_numpy(_np.flatnonzero(flat.numpy()))
    return flat.nonzero().flatten()


def _top(scores: Tensor, k: int, generator: torch.Generator) -> Tensor:
    """Positions of the ``k`` highest of the 1-D ``scores``; ties drawn at random.

    Every score above the ``k``-th highest value is chosen; among the scores
    equal to it, as many as are still needed are drawn with ``generator`` (only
    when there are more of them than places), so ties never fall to position.
    On the CPU the selection runs in numpy (its partition is several times
    faster than ``torch.topk`` there); the chosen set is the same.
    """
    n = scores.numel()
    if k >= n or k <= 0:
        return torch.arange(max(0, min(k, n)), device=scores.device)
    if _on_numpy(scores):
        return torch.from_numpy(_top_numpy(scores.numpy(), k, generator))
    pool: Tensor | None = None  # positions of the scores that can reach the top k
    values = scores
    if scores.device.type == "cpu" and n >= _NARROW_MIN and 4 * k <= n:
        sample = scores[
            torch.arange(_SAMPLE, device=scores.device).mul_(_SPREAD).remainder_(n)
        ]
        rank = min(_SAMPLE, (k * _SAMPLE * 5) // (4 * n) + 32)
        floor = torch.kthvalue(sample, _SAMPLE - rank + 1).values
        candidates = (scores >= floor).nonzero().flatten()
        # At least k scores reach `floor`, so it is at most the k-th highest value:
        # every score that can be chosen, ties included, is among the candidates.
        if candidates.numel() >= k:
            pool, values = candidates, scores[candidates]
    top_values, chosen = torch.topk(values, k, sorted=False)
    threshold = top_values.min()
    above = top_values > threshold
    tied = (values == threshold).nonzero().flatten()
    places = k - int(above.sum())
    if tied.numel() > places:
        draw = torch.randperm(tied.numel(), generator=generator)[:places]
        chosen = torch.cat([chosen[above], tied[draw.to(tied.device)]])
    return chosen if pool is None else pool[chosen]


def _top_numpy(scores: Any, k: int, generator: torch.Generator) -> Any:
    """:func:`_top` on a numpy array: the same narrowing, cut and tie draw.

    The positions come back ascending (they are found by comparing with the
    ``k``-th highest value), so that the gathers and scatters that use them
    walk memory in order.
    """
    assert _np is not None
    n = scores.size
    pool = None
    values = scores
    if n >= _NARROW_MIN and 4 * k <= n:
        sample = scores[_np.arange(_SAMPLE, dtype=_np.int64) * _SPREAD % n]
        rank = min(_SAMPLE, (k * _SAMPLE * 5) // (4 * n) + 32)
        floor = _np.partition(sample, _SAMPLE - rank)[_SAMPLE - rank]
        candidates = _np.flatnonzero(scores >= floor)
        if candidates.size >= k:
            pool, values = candidates, scores[candidates]
    threshold = _np.partition(values, values.size - k)[values.size - k]
    chosen = _np.flatnonzero(values >= threshold)
    if chosen.size > k:  # more scores tie at the threshold than there are places
        tied = chosen[values[chosen] == threshold]
        places = k - (chosen.size - tied.size)
        draw = torch.randperm(tied.size, generator=generator)[:places].numpy()
        chosen = _np.sort(
            _np.concatenate([chosen[values[chosen] > threshold], tied[draw]])
        )
    return chosen if pool is None else pool[chosen]


def update_mask(
    policy: Policy,
    weight: Tensor,
    mask: Tensor,
    grad: Tensor | None,
    n_drop: int,
    generator: torch.Generator,
    *,
    n_active: int | None = None,
    n_grow: int | None = None,
) -> Tensor:
    """Compute the mask after one update: drop ``n_drop`` active, grow ``n_grow``.

    The ``n_drop`` active weights of lowest :meth:`~Policy.drop_score` are
    dropped; then the ``n_grow`` positions of highest :meth:`~Policy.grow_score`
    among all positions not kept (including the ones just dropped) are grown.
    Ties at either cut are drawn with ``generator``. The work is one top-k over
    the active weights and one over the candidates for growth; no permutation of
    the whole tensor is drawn.

    Args:
        policy: scores what to drop and what to grow.
        weight: the effective weight, zero outside ``mask``.
        mask: the current bool mask.
        grad: the dense gradient, or ``None``.
        n_drop: how many active weights to drop (and grow); at most the number
            of active weights.
        generator: CPU generator for tie-breaking and random growth.
        n_active: the number of active weights in ``mask``, when the caller
            knows it (it saves a device sync). Default: ``None`` (counted).
        n_grow: how many positions to grow; at most the number of positions
            not kept. Default: ``None`` (``n_drop``: the count stays).

    Returns:
        A new bool mask with ``n_grow - n_drop`` more active weights than
        ``mask`` (exactly as many by default).

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
    return _update_mask(
        policy, weight, mask, grad, n_drop, generator, n_active=n_active, n_grow=n_grow
    )[0]


def _update_mask(
    policy: Policy,
    weight: Tensor,
    mask: Tensor,
    grad: Tensor | None,
    n_drop: int,
    generator: torch.Generator,
    *,
    n_active: int | None = None,
    active: Tensor | None = None,
    positions: bool = False,
    structure: Layout | None = None,
    n_grow: int | None = None,
    select: Callable[[Tensor, int, torch.Generator], Tensor] | None = None,
    check_finite: Callable[..., None] | None = None,
) -> tuple[Tensor, Tensor | None]:
    """:func:`update_mask`, given and giving the sorted active positions.

    ``active``: the sorted flat positions of ``mask``'s active entries, when the
    caller knows them (sparse execution keeps them); else they are searched.
    With ``positions``, also returns the new mask's sorted active positions
    (else ``None``). ``structure``: the tensor's
    :class:`~sparsetorch.structure.Layout`, whose groups the update keeps
    (:func:`sparsetorch.structure.update_structured`). Default: ``None``
    (unstructured). ``n_grow``: as in :func:`update_mask`. ``select`` and
    ``check_finite`` replace :func:`_top` and :func:`_check_finite` (FSDP2
    shards: ``sparsetorch._fsdp`` selects over all ranks; ``n_active`` then
    counts the whole tensor and ``active`` this shard's positions).
    """
    select = _top if select is None else select
    check_finite = _check_finite if check_finite is None else check_finite
    if structure is not None and n_drop > 0:
        from sparsetorch.structure import update_structured

        if n_grow is not None and n_grow != n_drop:
            raise RuntimeError(
                f"A structured update regrows what each group dropped, but "
                f"{type(policy).__name__} asked to drop {n_drop} and grow {n_grow}."
                "\nsparsify refuses such policies with a structure."
            )
        new = update_structured(
            policy, weight, mask, grad, n_drop, generator, structure
        )
        return new, _nonzero(new.flatten()) if positions else None
    if n_grow is None:
        n_grow = n_drop
    if n_drop == 0 and n_grow == 0:
        new = mask.clone()
        return new, _nonzero(new.flatten()) if positions else None
    name = type(policy).__name__
    flat = mask.flatten()
    if active is not None:
        active = active.long()
    elif n_active is None or flat.device.type == "cpu":
        active = _nonzero(flat)  # no sync to avoid on the CPU
    else:
        active = torch.nonzero_static(flat, size=n_active).flatten()
    # Dropping the n_drop lowest drop scores keeps the others: choose those.
    if type(policy).drop_score is Policy.drop_score:  # |w|, read where active only
        drop = weight.flatten()[active].abs()  # (n_active,)
    else:
        drop = policy.drop_score(weight, mask).flatten()[active]
    check_finite(drop, "drop", name)
    n_keep = (active.numel() if n_active is None else n_active) - n_drop
    kept = active[select(drop, n_keep, generator)]
    if n_grow == 0:  # pruning only (GMP): no growth scores are read or drawn
        grown = kept.new_empty(0)
    else:
        grow = policy.grow_score(weight, mask, grad, generator).flatten()
        if not grow.is_floating_point() or _shares_memory(grow, weight, mask, grad):
            grow = grow.float() if not grow.is_floating_point() else grow.clone()
        check_finite(grow, "grow", name, skip=kept)
        grown = select(grow.index_fill_(0, kept, float("-inf")), n_grow, generator)
    new = torch.zeros_like(flat)
    new.index_fill_(0, kept, True)
    new.index_fill_(0, grown, True)
    return new.view_as(mask), _merge(kept, grown) if positions else None


def _merge(a: Tensor, b: Tensor) -> Tensor:
    """The sorted union of two disjoint position tensors.

    On the CPU both come sorted from :func:`_top` (numpy's selection returns
    positions in order), and numpy's stable sort merges two sorted runs in one
    linear pass.
    """
    if _np is not None and a.device.type == b.device.type == "cpu":
        both = _np.concatenate([a.numpy(), b.numpy()])
        return torch.from_numpy(_np.sort(both, kind="stable"))
    return torch.sort(torch.cat([a, b])).values


def _shares_memory(scores: Tensor, *tensors: Tensor | None) -> bool:
    ptr = scores.untyped_storage().data_ptr()
    return any(t is not None and t.untyped_storage().data_ptr() == ptr for t in tensors)


def _check_finite(
    scores: Tensor, kind: str, policy: str, skip: Tensor | None = None
) -> None:
    """Raise if ``scores`` has a NaN or inf outside the positions ``skip``."""
    if bool(torch.isfinite(scores.sum())):
        return  # no NaN/inf (a sum that merely overflows is checked in full below)
    bad = ~torch.isfinite(scores)
    if skip is not None:
        bad[skip] = False  # never read by the update
    count = int(bad.sum())
    if count:
        raise FloatingPointError(
            f"{policy}.{kind}_score gave {count} NaN/inf value(s); the update would "
            "pick them silently."
        )


#: ``(flat offset, numel of the whole tensor)`` while an update scores one shard
#: of an FSDP2-sharded weight (set by ``sparsetorch._fsdp``); ``None`` otherwise.
SHARD: contextvars.ContextVar[tuple[int, int] | None] = contextvars.ContextVar(
    "sparsetorch_shard", default=None
)

_RANDOM_CHUNK = 1 << 20


def random_scores(weight: Tensor, generator: torch.Generator | None) -> Tensor:
    """Uniform random scores of ``weight``'s shape, drawn on the CPU.

    Use it in :meth:`Policy.grow_score` for random growth: on a shard of an
    FSDP2-sharded weight it draws the same numbers the whole tensor would get
    (the generator's whole stream for the tensor, in chunks, keeping this
    shard's part), so that the masks are the same at any world size.
    """
    shard = SHARD.get()
    if shard is None:
        return torch.rand(weight.shape, generator=generator).to(weight.device)
    offset, total = shard
    out = torch.empty(weight.numel())
    end = offset + weight.numel()
    for start in range(0, total, _RANDOM_CHUNK):
        chunk = torch.rand(min(_RANDOM_CHUNK, total - start), generator=generator)
        lo, hi = max(start, offset), min(start + chunk.numel(), end)
        if lo < hi:
            out[lo - offset : hi - offset] = chunk[lo - start : hi - start]
    return out.view(weight.shape).to(weight.device)
