r"""Mask dynamics: how much each topology update changes, and the ITOP rate.

The :class:`~sparsetorch.Sparsifier` records every update right before it
writes the new masks:

* **mask change**: the share of the active weights that the update grew (active
  after it, not before), per tensor and over all masked tensors:

  .. math::
      \text{change} = \frac{\sum_l |M_l^{new} \setminus M_l^{old}|}
                           {\sum_l |M_l^{new}|}

* **ITOP rate** (in-time over-parameterization, Liu et al. 2021,
  https://arxiv.org/abs/2102.02887): the share of the masked tensors' weights
  that have been active at some point of the run,

  .. math::
      R = \frac{\sum_l |\bigcup_t M_l^t|}{\sum_l N_l}

  It keeps one more bool per masked weight (the union of all masks), so it is
  opt-in: :meth:`~sparsetorch.Sparsifier.track_itop`. The union is saved in
  :meth:`~sparsetorch.Sparsifier.state_dict` and restored on load.

Recording an update costs one device sync (the update itself syncs several
times) and keeps a few Python ints; reading the metrics reads those ints.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from sparsetorch._checkpoint import decode_mask, encode_mask

__all__ = ["MaskMetrics", "MaskUpdate"]


@dataclass(frozen=True)
class MaskUpdate:
    """One recorded topology update, over all masked tensors.

    Attributes:
        step: the optimizer step after which it ran.
        grown: weights active after the update and not before.
        active: active weights after the update.
        ever_active: weights active at some point so far, or ``None`` when
            ITOP is not tracked.
        numel: weights of the masked tensors.
    """

    step: int
    grown: int
    active: int
    ever_active: int | None
    numel: int

    @property
    def mask_change(self) -> float:
        """``grown / active``."""
        return self.grown / self.active if self.active else 0.0

    @property
    def itop(self) -> float | None:
        """``ever_active / numel``, or ``None`` when ITOP is not tracked."""
        if self.ever_active is None:
            return None
        return self.ever_active / self.numel


class MaskMetrics:
    """Mask change per update and the ITOP rate of one sparsifier's masks.

    Args:
        masks: ``tensor_fqn -> mask``, the live masks.

    Example::

        >>> old = {"w": torch.tensor([True, True, False, False])}
        >>> metrics = MaskMetrics(old)
        >>> metrics.track_itop(old)
        >>> metrics.record(100, old, {"w": torch.tensor([True, False, True, False])})
        >>> metrics.total_mask_change(), metrics.total_itop()
        (0.5, 0.75)
        >>> metrics.history
        [MaskUpdate(step=100, grown=1, active=2, ever_active=3, numel=4)]
    """

    def __init__(self, masks: Mapping[str, Tensor]) -> None:
        self.numel = {fqn: mask.numel() for fqn, mask in masks.items()}
        #: ``tensor_fqn -> union of every mask so far`` when ITOP is tracked.
        self.ever: dict[str, Tensor] | None = None
        #: ``tensor_fqn -> (grown, active)`` of the last update.
        self._last: dict[str, tuple[int, int]] = {}
        #: ``(step, grown, active, ever active or None)`` of every update.
        self._history: list[tuple[int, int, int, int | None]] = []
        #: ``tensor_fqn -> weights ever active``, kept from the last recording so
        #: that reading the ITOP rate at every step costs no pass over the masks.
        self._ever_counts: dict[str, int] = {}

    # -- recording ----------------------------------------------------------------

    def track_itop(
        self,
        masks: Mapping[str, Tensor],
        reduce: Callable[[Tensor], Tensor] | None = None,
    ) -> None:
        """Start the union of masks from ``masks`` (no-op if already tracking)."""
        if self.ever is None:
            self.ever = {fqn: mask.detach().clone() for fqn, mask in masks.items()}
            self._count_ever(reduce)

    def _count_ever(self, reduce: Callable[[Tensor], Tensor] | None) -> None:
        ever = self.ever or {}
        counts = _ints([union.sum() for union in ever.values()], reduce)
        self._ever_counts = dict(zip(ever, counts, strict=True))

    @torch.no_grad()
    def record(
        self,
        step: int,
        old: Mapping[str, Tensor],
        new: Mapping[str, Tensor],
        reduce: Callable[[Tensor], Tensor] | None = None,
    ) -> None:
        """Record an update from the masks before (``old``) and the changed ones.

        Args:
            step: the step the update runs after.
            old: every ``tensor_fqn -> mask`` before the update.
            new: ``tensor_fqn -> new mask`` of the tensors the update changes
                (the others keep their masks).
            reduce: sums a tensor of counts over ranks, when the masks are
                FSDP2 shards (``old`` and ``new`` then hold this rank's shards).
        """
        flat: list[Tensor] = []  # grown and active of each tensor, then the unions
        for fqn, before in old.items():
            after = new.get(fqn)
            if after is None:
                flat += [before.new_zeros((), dtype=torch.long), before.sum()]
                continue
            flat += [(after & ~before).sum(), after.sum()]
            if self.ever is not None:
                union = self.ever[fqn]
                if union.device != after.device:  # the model moved since then
                    union = self.ever[fqn] = union.to(after.device)
                union |= after
        if self.ever is not None:
            flat += [union.sum() for union in self.ever.values()]
        values = iter(_ints(flat, reduce))
        counts = {fqn: (next(values), next(values)) for fqn in old}
        self._last = counts
        ever = None
        if self.ever is not None:
            self._ever_counts = {fqn: next(values) for fqn in self.ever}
            ever = sum(self._ever_counts.values())
        grown = sum(g for g, _ in counts.values())
        active = sum(a for _, a in counts.values())
        self._history.append((step, grown, active, ever))

    # -- reading ------------------------------------------------------------------

    @property
    def history(self) -> list[MaskUpdate]:
        """Every recorded update, oldest first."""
        numel = sum(self.numel.values())
        return [MaskUpdate(*row, numel) for row in self._history]

    def mask_change(self) -> dict[str, float]:
        """``tensor_fqn -> share grown`` by the last update (0 before any)."""
        return {
            fqn: (grown / active if active else 0.0)
            for fqn, (grown, active) in self._last.items()
        } or dict.fromkeys(self.numel, 0.0)

    def total_mask_change(self) -> float:
        """The share of all active weights grown by the last update (0 before any)."""
        grown = sum(g for g, _ in self._last.values())
        active = sum(a for _, a in self._last.values())
        return grown / active if active else 0.0

    def itop(self) -> dict[str, float] | None:
        """``tensor_fqn -> ITOP rate``, or ``None`` when not tracked."""
        if self.ever is None:
            return None
        return {fqn: c / self.numel[fqn] for fqn, c in self._ever_counts.items()}

    def total_itop(self) -> float | None:
        """The ITOP rate over all masked tensors, or ``None`` when not tracked."""
        if self.ever is None:
            return None
        return sum(self._ever_counts.values()) / sum(self.numel.values())

    # -- checkpoints --------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """Plain data: the history, the last update's counts, the union masks."""
        history = self.history
        state: dict[str, Any] = {
            "history": [
                [
                    u.step,
                    u.grown,
                    u.active,
                    -1 if u.ever_active is None else u.ever_active,
                ]
                for u in history
            ],
            "last": {fqn: [int(g), int(a)] for fqn, (g, a) in self._last.items()},
        }
        if self.ever is not None:
            state["ever_active"] = {fqn: encode_mask(e) for fqn, e in self.ever.items()}
        return state

    def check_state(self, state: object, masks: Mapping[str, Tensor]) -> dict[str, Any]:
        """Check a :meth:`state_dict` against ``masks``; return it decoded.

        Nothing changes. Raises :class:`ValueError` / :class:`TypeError`
        naming what does not fit.
        """
        if not isinstance(state, Mapping):
            raise TypeError(
                "The sparsifier checkpoint's 'metrics' must be a dict, got "
                f"{type(state).__name__}."
            )
        history = state.get("history", [])
        if not isinstance(history, list) or not all(
            isinstance(row, (list, tuple))
            and len(row) == 4
            and all(isinstance(v, int) and not isinstance(v, bool) for v in row)
            for row in history
        ):
            raise ValueError(
                "The sparsifier checkpoint's metrics history must be a list of "
                "[step, grown, active, ever_active] ints."
            )
        last = state.get("last", {})
        if not isinstance(last, Mapping) or not set(last) <= set(masks):
            raise ValueError(
                "The sparsifier checkpoint's metrics name tensors this sparsifier "
                f"does not have: {last!r}."
            )
        ever = state.get("ever_active")
        decoded = None
        if ever is not None:
            if not isinstance(ever, Mapping) or set(ever) != set(masks):
                raise ValueError(
                    "The sparsifier checkpoint's ITOP masks ('ever_active') do not "
                    f"name this sparsifier's tensors {sorted(masks)}."
                )
            decoded = {}
            for fqn, mask in masks.items():
                entry = ever[fqn]
                target = entry.get("active", -1) if isinstance(entry, Mapping) else -1
                if isinstance(target, bool) or not isinstance(target, int):
                    target = -1
                decoded[fqn] = decode_mask(
                    entry, f"ever_active[{fqn!r}]", tuple(mask.shape), target
                )
        return {"history": history, "last": dict(last), "ever": decoded}

    def load_checked(
        self,
        state: Mapping[str, Any] | None,
        masks: Mapping[str, Tensor],
        reduce: Callable[[Tensor], Tensor] | None = None,
    ) -> None:
        """Restore what :meth:`check_state` returned (``None``: an old checkpoint).

        A checkpoint without ITOP masks restarts the union from ``masks`` when
        ITOP is tracked; one with them turns tracking on. ``reduce``: as in
        :meth:`record` (``masks`` are then this rank's shards).
        """
        if state is None:
            self._history, self._last = [], {}
        else:
            self._history = [
                (step, grown, active, None if ever < 0 else ever)
                for step, grown, active, ever in state["history"]
            ]
            self._last = {f: (int(g), int(a)) for f, (g, a) in state["last"].items()}
        if state is not None and state["ever"] is not None:
            self.ever = {
                fqn: state["ever"][fqn].to(mask.device) | mask
                for fqn, mask in masks.items()
            }
        elif self.ever is not None:
            self.ever = {f: m.detach().clone() for f, m in masks.items()}
        self._count_ever(reduce)


def _ints(counts: list[Tensor], reduce: Callable[[Tensor], Tensor] | None) -> list[int]:
    """``counts`` (0-dim tensors) as ints: one device sync (and one collective).

    ``reduce`` sums the stacked counts over ranks (FSDP2 shards).
    """
    if not counts:
        return []
    if reduce is None and len({c.device for c in counts}) > 1:
        return [int(c) for c in counts]  # a model over several devices
    stacked = torch.stack([c.long() for c in counts])
    if reduce is not None:
        stacked = reduce(stacked)
    return [int(v) for v in stacked.tolist()]
