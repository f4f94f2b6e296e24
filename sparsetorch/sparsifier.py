"""Sparsifier: counts optimizer steps and runs topology updates on schedule."""

from __future__ import annotations

import dataclasses
import io
import math
import warnings
import weakref
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.optim.optimizer import register_optimizer_step_pre_hook

from sparsetorch import _distributed, _fsdp, _optim
from sparsetorch._checkpoint import (
    DCP_VERSION,
    FORMAT_VERSION,
    check_version,
    decode_mask,
    encode_mask,
    pack_rows,
    same,
    stored_counts,
    stored_policy_state,
    unpack_rows,
)
from sparsetorch._stash import Stash
from sparsetorch.execution import export_sparse, mask_mode_reasons, set_execution
from sparsetorch.flops import FlopsReport, SizeRecorder, flops_report
from sparsetorch.metrics import MaskMetrics, MaskUpdate
from sparsetorch.parametrization import _mask_, local
from sparsetorch.policies.base import CountContext, Policy, _update_mask
from sparsetorch.policies.snip import SNIP, sensitivity_masks
from sparsetorch.schedule import Schedule
from sparsetorch.structure import (
    check_loaded_mask,
    structure_notes,
    structure_settings,
)
from sparsetorch.topology import Topology

__all__ = ["Sparsifier"]

#: Every sparsifier not yet removed: the global optimizer step pre-hook
#: (:func:`_adopt_unattached`) looks here for the masks of the weights an
#: optimizer steps.
_LIVE: weakref.WeakSet[Sparsifier] = weakref.WeakSet()
_GLOBAL_HOOK: Any = None


class _Attached:
    """One optimizer whose state a sparsifier keeps in step with the masks."""

    def __init__(self, optimizer: torch.optim.Optimizer, counts: bool) -> None:
        self.optimizer = optimizer
        self.counts = counts
        self.handles: list[Any] = []

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()
        self.handles = []


class Sparsifier:
    """The handle returned by :func:`sparsetorch.sparsify`.

    Counts optimizer steps ``k = 1, 2, ...`` (through a step post-hook on the
    optimizer, or through :meth:`step` when there is none) and, after every step
    the :class:`~sparsetorch.Schedule` marks, updates each mask with the policy:
    ``int(n_active * drop_fraction_at(k))`` weights are dropped and as many grown
    (the policy's ``update_counts`` decides: SNFS regrows across tensors, GMP
    only prunes).
    Dropped and grown positions start from zero in the stored weight (grown ones
    at ``grow_init``) and in every optimizer state tensor.

    Args:
        topology: the masked tensors.
        policy: decides what to drop and grow.
        schedule: decides when, and how much.
        optimizer: the optimizer training the model; its state is reset where
            masks change and its steps are counted. Default: ``None`` (count
            with :meth:`step`).
        generator: CPU generator for updates (its state is checkpointed).
        sparsity: the requested overall sparsity, for the summary.
        grow_init: value of newly grown weights. Default: ``0.0``.
        count_optimizer_steps: count steps through the optimizer's step
            post-hook. Default: ``True`` when an optimizer is given.
        skipped: ``tensor_fqn -> reason`` of selected tensors left dense
            (frozen ones), listed under the summary. Default: ``None``.
        stash: the values the topology's initial masks zeroed (see
            ``sparsetorch._stash``), restored if masks are loaded before
            anything writes the weights. Default: ``None``.
        end_step_from_total: ``schedule.end_step`` was derived from a
            ``total_steps``, so :meth:`set_total_steps` may move it.
            Default: ``False``.
        total_steps: optimizer steps in the whole run, when known (for
            :meth:`flops`). Default: ``None``.
    """

    def __init__(
        self,
        topology: Topology,
        policy: Policy,
        schedule: Schedule,
        *,
        optimizer: torch.optim.Optimizer | None = None,
        generator: torch.Generator,
        sparsity: float,
        grow_init: float = 0.0,
        count_optimizer_steps: bool | None = None,
        skipped: Mapping[str, str] | None = None,
        stash: Stash | None = None,
        end_step_from_total: bool = False,
        total_steps: int | None = None,
    ) -> None:
        if count_optimizer_steps and optimizer is None:
            raise ValueError("count_optimizer_steps=True needs an optimizer.")
        self.topology = topology
        self.skipped = dict(skipped or {})
        self.policy = policy
        self.schedule = schedule
        self.generator = generator
        self.sparsity = sparsity
        self.grow_init = grow_init
        self.step_count = 0
        self.update_count = 0
        self.capture_steps = 1
        self.execution = "mask"
        #: ``tensor_fqn -> updates it sat out`` for want of a gradient.
        self.missed_updates: dict[str, int] = {}
        #: ``tensor_fqn -> running signal`` of a policy with
        #: ``dense_grad_every_step`` (SNFS: the momentum of the dense gradient),
        #: folded after every step and passed to its ``grow_score``.
        self.signals: dict[str, Tensor] = {}
        #: Whether :meth:`prune_at_init` chose the masks (SNIP).
        self.pruned_at_init = False
        self._removed = False
        #: The optimizer whose step now is ``torch.distributed.checkpoint``
        #: initializing its state (not counted), if any.
        self._state_init_step: torch.optim.Optimizer | None = None
        #: Whether FSDP2 sharded the weights (``fully_shard`` after ``sparsify``):
        #: the masks are then DTensors sharded like them.
        self.sharded = False
        self._end_from_total = end_step_from_total
        self._attached: dict[int, _Attached] = {}
        self._unrelated: weakref.WeakKeyDictionary[torch.optim.Optimizer, int] = (
            weakref.WeakKeyDictionary()
        )
        self._capture_by_hand = False
        self._counted_by_hand = False  # sparsifier.step() since the last load
        self._stash = Stash() if stash is None else stash
        #: Optimizer steps in the whole run, when known: :meth:`flops` counts
        #: training over them. :meth:`set_total_steps` sets it.
        self.total_steps = total_steps
        # Layer sizes for flops(): the training forward after the first step.
        self._sizes = SizeRecorder(topology.model)
        self._flops_shown = False  # summary() shows FLOPs once flops() ran
        self._mask_metrics = MaskMetrics(topology.masks)
        if optimizer is not None:
            if count_optimizer_steps is None:
                count_optimizer_steps = True
            self.attach_optimizer(optimizer, count_steps=count_optimizer_steps)
        _LIVE.add(self)
        _install_global_hook()
        self._arm()

    # -- optimizers ---------------------------------------------------------------

    @property
    def optimizer(self) -> torch.optim.Optimizer | None:
        """The optimizer whose steps are counted, else the first one attached."""
        counting = [a for a in self._attached.values() if a.counts]
        chosen = counting or list(self._attached.values())
        return chosen[0].optimizer if chosen else None

    @optimizer.setter
    def optimizer(self, optimizer: torch.optim.Optimizer) -> None:
        self.attach_optimizer(optimizer, count_steps=False)

    @property
    def optimizers(self) -> list[torch.optim.Optimizer]:
        """Every optimizer whose state is kept in step with the masks."""
        return [a.optimizer for a in self._attached.values()]

    def attach_optimizer(self, optimizer: Any, *, count_steps: bool = True) -> None:
        """Keep ``optimizer``'s state in step with the masks (and count its steps).

        For an optimizer built after :func:`~sparsetorch.sparsify` (frameworks
        build it late). A framework's wrapper is unwrapped (Accelerate's
        ``AcceleratedOptimizer``, Lightning's ``LightningOptimizer``: whatever
        holds the torch optimizer as ``.optimizer`` or ``._optimizer``). Its
        state is reset outside the masks now, and so is the state every later
        ``optimizer.load_state_dict`` brings (a dense run's; a checkpoint saved
        with the parameters in another order is re-keyed first). Masks loaded
        before the next step (``sparsifier.load_state_dict``) restore what such
        a reset cut, so the load order does not matter. With ``count_steps``, each
        ``optimizer.step()`` advances the sparsifier, which updates the
        topology inside the call on scheduled steps.

        Any torch optimizer that steps masked weights without being attached
        is attached by sparsetorch before that step, with ``count_steps=False``.

        Args:
            optimizer: a ``torch.optim.Optimizer`` holding masked weights, or a
                wrapper of one.
            count_steps: count its steps (at most one optimizer does).
                Default: ``True``.

        Raises:
            TypeError: ``optimizer`` is not an optimizer or a wrapper of one.
            ValueError: it holds none of the masked weights, or (to count
                steps) not all the trained ones.
            RuntimeError: another optimizer already counts the steps, or the
                sparsifier was removed.

        Nothing changes when it raises.

        Example::

            >>> import torch
            >>> import sparsetorch as st
            >>> model = torch.nn.Sequential(torch.nn.Linear(8, 8))
            >>> sparsifier = st.sparsify(model, policy="static", sparsity=0.5)
            >>> opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
            >>> sparsifier.attach_optimizer(opt)
            >>> model(torch.randn(2, 8)).sum().backward()
            >>> opt.step()
            >>> sparsifier.step_count
            1
        """
        self._check_live()
        if not isinstance(count_steps, bool):
            raise TypeError(f"count_steps must be True or False, got {count_steps!r}.")
        optimizer = _optim.unwrap_optimizer(optimizer)
        params = self.topology.params
        held = {id(p) for group in optimizer.param_groups for p in group["params"]}
        mine = [fqn for fqn, p in params.items() if id(p) in held]
        if not mine:
            raise ValueError(
                f"The optimizer holds none of the masked weights {list(params)}.\n"
                "Pass the optimizer built over model.parameters()."
            )
        attached = self._attached.get(id(optimizer))
        counting = [a for a in self._attached.values() if a.counts]
        if count_steps and counting and counting[0].optimizer is not optimizer:
            raise RuntimeError(
                "This sparsifier already counts the steps of another optimizer "
                f"({type(counting[0].optimizer).__name__}); counting two would "
                "advance the schedule twice per step.\nAttach this one with "
                "count_steps=False."
            )
        if count_steps and self._manual_steps():
            raise RuntimeError(
                f"This sparsifier has counted {self.step_count} steps by hand "
                "(sparsifier.step()); counting the optimizer's steps as well "
                "would count each step twice.\nKeep calling sparsifier.step(), "
                "and attach with count_steps=False."
            )
        missing = [
            fqn for fqn, p in params.items() if id(p) not in held and p.requires_grad
        ]
        if count_steps and missing:
            raise ValueError(
                f"The optimizer does not hold the parameters {missing}.\n"
                "Pass the optimizer built over model.parameters()."
            )
        # Everything is checked: from here on state changes.
        if attached is None:
            attached = _Attached(optimizer, counts=False)
            attached.handles = [
                optimizer.register_step_pre_hook(self._before_optimizer_step),
                optimizer.register_load_state_dict_post_hook(
                    self._after_optimizer_load
                ),
            ]
            if isinstance(optimizer, _optim.NON_ELEMENTWISE):
                attached.handles.append(
                    optimizer.register_step_post_hook(self._remask_after_step)
                )
            self._attached[id(optimizer)] = attached
            self._unrelated.pop(optimizer, None)
            self._settle(optimizer)
        if count_steps and not attached.counts:
            attached.counts = True
            attached.handles.append(
                optimizer.register_step_post_hook(self._on_optimizer_step)
            )

    def _manual_steps(self) -> bool:
        return self._counted_by_hand and not any(
            a.counts for a in self._attached.values()
        )

    def _before_optimizer_step(
        self, optimizer: torch.optim.Optimizer, args: Any, kwargs: Any
    ) -> None:
        if _optim.is_state_init_step(optimizer):
            # torch.distributed.checkpoint filling in the state: not a step.
            self._state_init_step = optimizer
            return
        self._check_pruned_at_init()
        if self._stash:
            self._stash.clear()  # training moves on: nothing to restore any more

    def _settle(self, optimizer: torch.optim.Optimizer) -> None:
        """Re-key misordered loaded state, then reset it outside the masks."""
        _optim.fix_state_order(optimizer, self.topology.parameter_orders())
        groups = _optim.param_groups_of(optimizer)
        with torch.no_grad():
            for param, mask in zip(
                self.topology.params.values(), self.masks.values(), strict=True
            ):
                group = groups.get(id(param))
                if group is not None:
                    _optim.reset_state(optimizer, param, mask, group, self._stash)

    def _after_optimizer_load(self, optimizer: torch.optim.Optimizer) -> None:
        if id(optimizer) in self._attached:
            self._settle(optimizer)

    def _remask_after_step(
        self, optimizer: torch.optim.Optimizer, args: Any, kwargs: Any
    ) -> None:
        held = {id(p) for group in optimizer.param_groups for p in group["params"]}
        with torch.no_grad():
            for param, mask in zip(
                self.topology.params.values(), self.masks.values(), strict=True
            ):
                if id(param) in held:
                    _mask_(param, mask)

    def _adopt(self, optimizer: torch.optim.Optimizer) -> None:
        """Attach ``optimizer`` if it steps masked weights (global pre-hook)."""
        self._sync_sharding()
        if id(optimizer) in self._attached:
            return
        count = sum(len(g["params"]) for g in optimizer.param_groups)
        if self._unrelated.get(optimizer) == count:
            return
        params = {id(p) for p in self.topology.params.values()}
        if any(id(p) in params for g in optimizer.param_groups for p in g["params"]):
            self.attach_optimizer(optimizer, count_steps=False)
        else:
            self._unrelated[optimizer] = count

    def _detach_optimizers(self) -> None:
        for attached in self._attached.values():
            attached.remove()
        self._attached = {}

    # -- stepping -----------------------------------------------------------------

    @property
    def masks(self) -> dict[str, Tensor]:
        """``tensor_fqn -> mask``: the live bool buffers (read them, don't write)."""
        return self.topology.masks

    def step(self) -> bool:
        """Count one optimizer step; update the topology if the schedule says so.

        Called for you after every ``optimizer.step()`` when ``sparsify`` was
        given the optimizer (or :meth:`attach_optimizer` counts its steps);
        call it yourself otherwise, right after each optimizer step.

        Returns:
            Whether the topology was updated.

        Raises:
            RuntimeError: an optimizer already counts the steps (each would be
                counted twice), or the sparsifier was removed.
        """
        self._check_live()
        counting = [a for a in self._attached.values() if a.counts]
        if counting:
            raise RuntimeError(
                "sparsifier.step() counts a step by hand, but this sparsifier "
                "already counts the steps of its optimizer "
                f"({type(counting[0].optimizer).__name__}): each step would count "
                "twice.\nRemove the sparsifier.step() call: optimizer.step() "
                "advances the sparsifier."
            )
        self._check_pruned_at_init()
        self._counted_by_hand = True
        return self._count()

    def _check_pruned_at_init(self) -> None:
        if isinstance(self.policy, SNIP) and not self.pruned_at_init:
            raise RuntimeError(
                "SNIP chooses its masks from data before training, and the model "
                "is still dense.\nCall sparsifier.prune_at_init(loss_fn, batches) "
                "before the first optimizer step, e.g. sparsifier.prune_at_init("
                "lambda b: F.cross_entropy(model(b[0]), b[1]), [next(iter(loader))])."
            )

    def _count(self) -> bool:
        if self._stash:
            self._stash.clear()  # training moves on: nothing to restore any more
        self.step_count += 1
        self._sizes.after_step()
        if self.policy.dense_grad_every_step:
            self._fold_dense_grads()
        updated = False
        if self.policy.dynamic and self.schedule.is_update_step(self.step_count):
            updated = self.update()
        self._arm()
        return updated

    def _on_optimizer_step(
        self, optimizer: torch.optim.Optimizer, args: Any, kwargs: Any
    ) -> None:
        if self._state_init_step is optimizer:
            self._state_init_step = None
            return
        self._count()

    def _arm(self) -> None:
        """Capture dense gradients only in the backward passes before an update.

        That is the next step's, or the next ``capture_steps`` steps' when
        gradients are summed over several steps (``RigLScheduler``'s
        ``grad_accumulation_n``), or every backward pass until the next update
        after :meth:`capture_dense_grads`.
        """
        capture = self.policy.needs_grad and (
            self._capture_by_hand
            or (
                self.policy.dense_grad_every_step
                and self.next_update_step() is not None
            )
            or (
                self.policy.dynamic
                and any(
                    self.schedule.is_update_step(self.step_count + i)
                    for i in range(1, self.capture_steps + 1)
                )
            )
        )
        across = self.capture_steps > 1
        for p in self.topology.parametrizations.values():
            if p.capturing and not capture:
                p.release()
            # Set only what changes: this runs every step, and nn.Module's
            # __setattr__ costs microseconds per call.
            if p.capturing != capture:
                p.capturing = capture
            if p.accumulate_across_steps != across:
                p.accumulate_across_steps = across

    def capture_dense_grads(self) -> None:
        """Keep the dense gradient of the coming backward passes for :meth:`update`.

        sparsetorch captures the dense gradient (RigL grows where it is
        largest) only in the backward pass before a scheduled update. To call
        :meth:`update` by hand at another step, call this before that step's
        backward pass; capturing stops at the next update.

        Example::

            >>> import torch
            >>> import sparsetorch as st
            >>> model = torch.nn.Sequential(torch.nn.Linear(8, 8))
            >>> sparsifier = st.sparsify(model, policy="rigl", sparsity=0.5,
            ...                          total_steps=1000)
            >>> sparsifier.capture_dense_grads()
            >>> model(torch.randn(2, 8)).sum().backward()
            >>> sparsifier.update()
            True
        """
        self._check_live()
        self._capture_by_hand = True
        self._arm()

    def prune_at_init(
        self, loss_fn: Callable[[Any], Tensor], batches: Iterable[Any]
    ) -> None:
        r"""Choose SNIP's masks from the connection sensitivity ``|w * dL/dw|``.

        Lee et al. 2019 (https://arxiv.org/abs/1810.02340). Runs
        ``loss_fn(batch)`` and its gradient for every batch of ``batches``
        (summing the gradients: several batches act as one larger one), then
        keeps the weights of highest sensitivity: the top ``K`` over all
        tensors with ``SNIP(global_threshold=True)`` (``K`` = the total active
        count the distribution allocates), else each tensor's allocated count.
        Ties are drawn with the sparsifier's generator. The weights and
        optimizer state outside the masks are zeroed, as at any update; the
        masks then stay fixed. Call it once, after ``sparsify`` and before
        the first optimizer step. ``.grad`` and the model's buffers (BatchNorm
        statistics) are left as they were; the model stays in its mode
        (``train()`` or ``eval()``). Under ``torch.distributed`` the gradients
        are averaged over ranks (each rank may pass its own batches), so every
        rank chooses the same masks; call it before wrapping the model in
        ``DistributedDataParallel``, or have ``loss_fn`` call the wrapper's
        ``.module``.

        Args:
            loss_fn: maps one batch to a scalar loss, e.g.
                ``lambda b: F.cross_entropy(model(b[0]), b[1])``.
            batches: one or more batches (``[next(iter(loader))]``).

        Raises:
            RuntimeError: the policy is not :class:`~sparsetorch.policies.SNIP`,
                the masks were already chosen, training has started, or the
                weights are sharded.
            ValueError: ``batches`` is empty, or ``loss_fn`` gave no scalar.

        A tensor left with no active weight by the global threshold (the
        "layer collapse" SNIP is known for at extreme sparsity) is kept as
        the paper has it, with a warning.

        Example::

            >>> import torch
            >>> import sparsetorch as st
            >>> model = torch.nn.Sequential(torch.nn.Linear(8, 4))
            >>> sparsifier = st.sparsify(model, policy="snip", sparsity=0.5)
            >>> int(sparsifier.masks["0.weight"].sum())
            32
            >>> x = torch.randn(16, 8)
            >>> sparsifier.prune_at_init(lambda b: model(b).square().mean(), [x])
            >>> int(sparsifier.masks["0.weight"].sum())
            16
        """
        self._check_live()
        policy = self.policy
        if not isinstance(policy, SNIP):
            raise RuntimeError(
                "prune_at_init chooses SNIP's masks, but this sparsifier's policy "
                f'is {policy!r}.\nSparsify with policy="snip" to prune at '
                "initialisation."
            )
        if self.pruned_at_init:
            raise RuntimeError(
                "SNIP's masks were already chosen (prune_at_init ran, or a "
                "checkpoint was loaded); they stay fixed."
            )
        if self.step_count > 0:
            raise RuntimeError(
                f"prune_at_init must run before training, but {self.step_count} "
                "optimizer step(s) were counted."
            )
        params = self.topology.params
        _distributed.check_params_unsharded(params, "SNIP's prune_at_init")
        new_masks = sensitivity_masks(
            policy, self.topology, loss_fn, batches, self.generator
        )
        counts = {fqn: int(m.sum()) for fqn, m in new_masks.items()}
        empty = [fqn for fqn, n in counts.items() if n == 0]
        if empty:
            warnings.warn(
                f"SNIP's global threshold left {empty} with no active weight "
                "(layer collapse): no signal passes through them.\nUse a lower "
                "sparsity, or SNIP(global_threshold=False) for the "
                "distribution's per-tensor counts.",
                UserWarning,
                stacklevel=2,
            )
        self._stash.clear()
        self.topology.apply(new_masks, self.optimizers, 0.0, counts)
        self.pruned_at_init = True
        _distributed.check_ranks_agree(self.masks, self.topology.params, 0)
        if self.execution != "mask":
            set_execution(self.topology, self.execution)

    @torch.no_grad()
    def update(self) -> bool:
        """Run one topology update now, with the drop fraction of the current step.

        A tensor that got no gradient since the last update (an unused branch,
        a mixture-of-experts expert that got no tokens) keeps its mask when the
        policy grows by gradient, and a frozen tensor (``requires_grad=False``)
        always keeps it; :attr:`missed_updates` counts them and the summary
        lists them. The other tensors update.

        Returns:
            ``False`` when the update was skipped because a weight or gradient
            was NaN or infinite (a warning says which); ``True`` otherwise.

        Raises:
            RuntimeError: the weights were sharded (FSDP) after sparsifying;
                the policy needs dense gradients and none were captured (call
                :meth:`capture_dense_grads` before the backward pass of a
                manual update); the sparsifier was removed.
        """
        self._check_live()
        fraction = self.schedule.drop_fraction_at(self.step_count)
        weights = self.topology.params
        parametrizations = self.topology.parametrizations
        needs_grad = self.policy.needs_grad
        if needs_grad and not any(p.capturing for p in parametrizations.values()):
            raise RuntimeError(
                f"{type(self.policy).__name__} grows where the dense gradient is "
                "largest, which sparsetorch keeps only in the backward pass "
                "before a scheduled update (the next is at step "
                f"{self.next_update_step()}); none was kept for this one.\nTo "
                "update by hand, call sparsifier.capture_dense_grads() before "
                "the backward pass, then sparsifier.update()."
            )
        every_step = self.policy.dense_grad_every_step  # grows from a running signal
        grads = {
            fqn: (self.signals.get(fqn) if every_step else p.dense_grad)
            if needs_grad
            else None
            for fqn, p in parametrizations.items()
        }
        skip = {fqn for fqn, w in weights.items() if not w.requires_grad}
        if needs_grad and every_step:  # folded and averaged at every step
            skip |= {fqn for fqn, g in grads.items() if g is None}
        elif needs_grad:
            received = _distributed.any_rank([grads[fqn] is not None for fqn in grads])
            for (fqn, grad), anywhere in zip(grads.items(), received, strict=True):
                if not anywhere:
                    skip.add(fqn)
                elif grad is None:  # another rank has one: this rank adds zeros
                    grads[fqn] = torch.zeros_like(local(weights[fqn]))
        if not every_step and not self.sharded:  # FSDP reduce-scattered them
            _distributed.average_(
                [g for fqn, g in grads.items() if g is not None and fqn not in skip]
            )
        new_masks = {}
        positions = {}  # the new masks' active positions, where they are kept
        targets = self.topology.targets  # == each mask's active count, no sync
        layouts = self.topology.layouts  # structured tensors
        new_counts = {}
        try:
            counts = self._update_counts(fraction, grads, skip)  # (n_drop, n_grow)
            for fqn, mask in self.masks.items():
                n_active = targets[fqn]
                n_drop, n_grow = counts.get(fqn, (0, 0))
                if fqn in skip or (
                    n_drop == n_grow and (n_drop == 0 or n_active == mask.numel())
                ):
                    continue
                p = parametrizations[fqn]
                if self.sharded:
                    new_masks[fqn] = _fsdp.update_sharded(
                        self.policy,
                        local(weights[fqn]),
                        local(mask),
                        grads[fqn],
                        n_drop,
                        self.generator,
                        _fsdp.shard_of(fqn, weights[fqn]),
                        n_active=n_active,
                        n_grow=n_grow,
                    )
                    new_counts[fqn] = n_active - n_drop + n_grow
                    continue
                new_masks[fqn], positions[fqn] = _update_mask(
                    self.policy,
                    weights[fqn],
                    mask,
                    grads[fqn],
                    n_drop,
                    self.generator,
                    n_active=n_active,
                    active=p.active_positions(),
                    positions=p.active is not None,  # kept under sparse execution
                    structure=layouts.get(fqn),
                    n_grow=n_grow,
                )
                new_counts[fqn] = n_active - n_drop + n_grow
        except FloatingPointError as error:
            warnings.warn(
                f"Skipped the topology update at step {self.step_count}: {error}",
                RuntimeWarning,
                stacklevel=2,
            )
            return False
        finally:
            for p in parametrizations.values():
                p.release()
            self._capture_by_hand = False
            self._stash.clear()
        for fqn in skip:
            self.missed_updates[fqn] = self.missed_updates.get(fqn, 0) + 1
        if self.sharded:  # this shard's counts, summed over the ranks
            self._mask_metrics.record(
                self.step_count,
                {fqn: local(m) for fqn, m in self.masks.items()},
                new_masks,
                reduce=self._over_ranks(),
            )
        else:
            self._mask_metrics.record(self.step_count, self.masks, new_masks)
        self.topology.apply(new_masks, self.optimizers, self.grow_init, new_counts)
        for fqn, found in positions.items():
            if found is not None:
                parametrizations[fqn].keep_active_positions(found)
        if new_masks:
            for optimizer in self.optimizers:
                if isinstance(optimizer, torch.optim.LBFGS):
                    _restart_lbfgs(optimizer)
        if not self.sharded:  # (shards differ by design)
            _distributed.check_ranks_agree(
                self.masks, self.topology.params, self.step_count
            )
        self.update_count += 1
        return True

    def _context(self, step: int, **update: Any) -> CountContext:
        """The :class:`~sparsetorch.policies.base.CountContext` at ``step``."""
        return CountContext(
            step=step,
            schedule=self.schedule,
            numels={fqn: m.numel() for fqn, m in self.masks.items()},
            sparsities=self.topology.sparsities,
            targets=self.topology.final_targets,
            active=self.topology.targets,
            **update,
        )

    def _update_counts(
        self, fraction: float, grads: Mapping[str, Tensor | None], skip: set[str]
    ) -> dict[str, tuple[int, int]]:
        """Ask the policy how many weights each tensor drops and grows; check it."""
        context = self._context(
            self.step_count,
            drop_fraction=fraction,
            masks=self.masks,
            signals=grads,
            skip=frozenset(skip),
        )
        counts = self.policy.update_counts(context)
        for fqn, (n_drop, n_grow) in counts.items():
            n_active, numel = context.active[fqn], context.numels[fqn]
            free = numel - n_active + n_drop  # positions not kept
            if not (0 <= n_drop <= n_active and 0 <= n_grow <= free):
                raise ValueError(
                    f"{type(self.policy).__name__}.update_counts asked {fqn!r} to "
                    f"drop {n_drop} and grow {n_grow} weights, but it has "
                    f"{n_active} active of {numel}.\nA tensor drops at most its "
                    "active weights and grows at most the positions not kept."
                )
        return counts

    def targets_at(self, step: int) -> dict[str, int]:
        """The active count of each tensor that the schedule holds after ``step``.

        For GMP, its cubic schedule (the counts of the last pruning step at or
        before ``step``); for the other built-in policies, the current counts
        (SNFS moves them between tensors at its updates, keeping the total).

        Args:
            step: an optimizer step (``0``: before the first one).

        Returns:
            ``tensor_fqn -> active count``.

        Example::

            >>> import torch
            >>> import sparsetorch as st
            >>> model = torch.nn.Sequential(torch.nn.Linear(10, 10))
            >>> sparsifier = st.sparsify(model, policy="gmp", sparsity=0.9,
            ...                          distribution="uniform", end_step=31,
            ...                          update_interval=10)
            >>> [sparsifier.targets_at(k)["0.weight"] for k in (0, 10, 20, 30, 40)]
            [100, 37, 13, 10, 10]
        """
        if isinstance(step, bool) or not isinstance(step, int):
            raise TypeError(f"step must be an int, got {step!r}.")
        if step < 0:
            raise ValueError(f"step must be >= 0, got {step}.")
        return self.policy.active_counts_at(self._context(step))

    @torch.no_grad()
    def _fold_dense_grads(self) -> None:
        """Fold this step's dense gradients into the policy's running signals.

        For policies with ``dense_grad_every_step`` (SNFS). The gradients are
        averaged over ranks first, so every rank keeps the same signals; a
        tensor that got no gradient on any rank is left as it was.
        """
        parametrizations = self.topology.parametrizations
        if not any(p.capturing for p in parametrizations.values()):
            return
        grads = {fqn: p.dense_grad for fqn, p in parametrizations.items()}
        received = _distributed.any_rank([g is not None for g in grads.values()])
        weights = self.topology.params
        folded: dict[str, Tensor] = {}
        for (fqn, grad), anywhere in zip(grads.items(), received, strict=True):
            if anywhere:  # another rank has one: this rank adds zeros
                folded[fqn] = torch.zeros_like(weights[fqn]) if grad is None else grad
        _distributed.average_(list(folded.values()))
        for fqn, grad in folded.items():
            self.signals[fqn] = self.policy.accumulate_grad(self.signals.get(fqn), grad)
        for p in parametrizations.values():
            p.release()

    # -- checkpoints --------------------------------------------------------------

    def state_dict(self, *, sharded: bool | None = None) -> dict[str, Any]:
        """Plain data and tensors: loads with ``torch.load(..., weights_only=True)``.

        Holds the masks, the step and update counts, the generator state, and the
        settings (policy, schedule, per-tensor sparsity) for checking on load.
        Format version 2: each mask is stored bit-packed or as the positions of
        its active weights, whichever is smaller (see ``docs/reliability.md``).

        With ``sharded=False`` under FSDP2, the masks are gathered whole (call it
        on every rank), for a single-file checkpoint that loads anywhere.

        With ``sharded`` (the default when FSDP2 shards the weights), the layout
        that ``torch.distributed.checkpoint`` saves and reshards (format version
        3): each mask's rows bit-packed (``uint8``, ``ceil(row_numel / 8)``
        bytes per row), a DTensor sharded like its weight when the weights are
        sharded, and the rest of the state in one serialized entry. A run
        saved at one world size loads at any other, and unsharded
        (``state_dict(sharded=True)`` gives the template to load into):
        see ``docs/distributed.md``.

        Example::

            >>> import torch
            >>> import sparsetorch as st
            >>> model = torch.nn.Sequential(torch.nn.Linear(100, 100))
            >>> state = st.sparsify(model, policy="static", sparsity=0.99).state_dict()
            >>> state["format_version"], state["masks"]["0.weight"]["encoding"]
            (2, 'indices')
            >>> state["masks"]["0.weight"]["data"].dtype
            torch.int16
        """
        self._sync_sharding()
        if self.sharded if sharded is None else sharded:
            return self._dcp_layout()
        return self._state()

    def _state(self, masks: bool = True) -> dict[str, Any]:
        """Format version 2 (with ``masks``: under FSDP2, gathered whole, a
        collective; without: the DCP layout packs them itself)."""
        whole = self._whole_masks() if masks else {}
        state = {
            "format_version": FORMAT_VERSION,
            "step": self.step_count,
            "updates": self.update_count,
            "generator": self.generator.get_state(),
            "masks": {fqn: encode_mask(m) for fqn, m in whole.items()},
            "settings": self._settings(),
            **self._metrics_state(),
            "active": self.topology.targets,
            "policy_state": {
                "signals": {fqn: s.detach().clone() for fqn, s in self.signals.items()},
                "pruned_at_init": self.pruned_at_init,
            },
        }
        ever = self._mask_metrics.ever
        if masks and self.sharded and ever is not None:  # this rank's rows: gather
            params = self.topology.params
            state["metrics"]["ever_active"] = {
                fqn: encode_mask(_fsdp.like_rows(e, params[fqn]).full_tensor())  # type: ignore[attr-defined]
                for fqn, e in ever.items()
            }
        return state

    def _whole_masks(self) -> dict[str, Tensor]:
        """The masks, whole: gathered from every rank under FSDP2 (collective)."""
        if not self.sharded:
            return self.masks
        return {
            fqn: m.full_tensor()  # type: ignore[attr-defined]
            for fqn, m in self.masks.items()
        }

    def _packed(self, fqn: str, mask: Tensor) -> Tensor:
        """``mask``'s rows bit-packed, sharded like its weight when it is."""
        if not self.sharded:
            return pack_rows(mask)
        return _fsdp.like_rows(pack_rows(local(mask)), self.topology.params[fqn])

    def _dcp_layout(self) -> dict[str, Any]:
        """:meth:`state_dict` in the layout DCP reshards (format version 3)."""
        state = self._state(masks=False)
        del state["masks"]
        ever = self._mask_metrics.ever
        if "metrics" in state:  # the ITOP masks are stored packed, below
            state["metrics"].pop("ever_active", None)
        state["itop"] = ever is not None
        blob = io.BytesIO()
        torch.save(state, blob)
        out: dict[str, Any] = {
            "format_version": DCP_VERSION,
            "masks": {fqn: self._packed(fqn, m) for fqn, m in self.masks.items()},
            "state": blob.getvalue(),
        }
        if ever is not None:
            out["itop"] = {fqn: self._packed(fqn, e) for fqn, e in ever.items()}
        return out

    def _from_dcp_layout(
        self, state_dict: Mapping[str, Any]
    ) -> tuple[dict[str, Any], dict[str, Tensor] | None]:
        """A format-3 dict as the format-1 dict it holds (bool masks: this
        shard's when sharded, checked over all ranks), and the ITOP masks."""
        blob = state_dict.get("state")
        if not isinstance(blob, bytes):
            raise TypeError(
                "The sparsifier checkpoint (format_version 3) must hold its state "
                f"as bytes under 'state', got {type(blob).__name__}."
            )
        state = dict(torch.load(io.BytesIO(blob), weights_only=True))
        params = self.topology.params

        def unpack(entries: object, what: str) -> dict[str, Tensor]:
            if not isinstance(entries, Mapping) or set(entries) != set(params):
                raise ValueError(
                    f"The sparsifier checkpoint's {what} do not name this "
                    f"sparsifier's tensors {sorted(params)}: it is from another "
                    "model."
                )
            return {
                fqn: unpack_rows(
                    local(entries[fqn]), fqn, tuple(local(params[fqn]).shape)
                )
                for fqn in params
            }

        masks = unpack(state_dict.get("masks"), "masks")
        ever = unpack(state_dict["itop"], "ITOP masks") if state["itop"] else None
        if self.sharded:  # each rank holds rows: check the counts over all ranks
            counts = _fsdp.sum_over_ranks(
                torch.stack([m.sum() for m in masks.values()]).long()
            ).tolist()
            expected = stored_counts(state, self.topology.final_targets, params)
            for (fqn, count), want in zip(
                zip(masks, counts, strict=True), expected.values(), strict=True
            ):
                if count != want:
                    raise ValueError(
                        f"Mask {fqn!r} has {count} active weights over the "
                        f"checkpoint's shards, but {want} are expected: the "
                        "checkpoint is corrupted or from other settings."
                    )
        state["format_version"] = 1  # plain bool masks from here on
        state["masks"] = masks
        return state, ever

    def _metrics_state(self) -> dict[str, Any]:
        """``{"metrics": ...}`` once there is something to keep, else ``{}``."""
        metrics = self._mask_metrics
        if metrics.ever is None and not metrics.history:
            return {}
        return {"metrics": metrics.state_dict()}

    def _settings(self) -> dict[str, Any]:
        return {
            "policy": type(self.policy).__name__,
            "policy_fields": dataclasses.asdict(self.policy),
            "schedule": dataclasses.asdict(self.schedule),
            "sparsities": self.topology.sparsities,
            "grow_init": self.grow_init,
            "structure": structure_settings(self.topology.structure),
        }

    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        """Restore masks, step count and generator state from :meth:`state_dict`.

        Reads format versions 1 (plain bool masks) and 2. Everything is checked
        before anything changes: a checkpoint that does not fit raises and leaves
        the model, optimizer and sparsifier as they were. Then the stored
        weights are re-masked with the loaded masks and the optimizer state is
        zeroed outside them. Model, optimizer and sparsifier state dicts may be
        loaded in any order before the next step.

        Raises:
            ValueError: the checkpoint is from an unknown or newer format version,
                another model, or other settings, or a mask is corrupted (wrong
                shape, size or active count).
            TypeError: the checkpoint is not a dict, or a mask has the wrong type.
            RuntimeError: the weights were sharded (FSDP) after sparsifying.
        """
        self._check_live()
        if not isinstance(state_dict, Mapping):
            raise TypeError(
                "Sparsifier.load_state_dict takes the dict made by "
                f"sparsifier.state_dict(), got {type(state_dict).__name__}.\n"
                'Load the file first: torch.load(path, weights_only=True)["sparsity"].'
            )
        from_dcp = state_dict.get("format_version") == DCP_VERSION
        dcp_ever = None
        if from_dcp:
            state_dict, dcp_ever = self._from_dcp_layout(state_dict)
        version = check_version(state_dict)
        missing = sorted(
            {"step", "updates", "generator", "masks", "settings"} - set(state_dict)
        )
        if missing:
            raise ValueError(
                f"The sparsifier checkpoint lacks the keys {missing}: it is "
                "truncated or not made by sparsifier.state_dict()."
            )
        counts = {k: state_dict[k] for k in ("step", "updates")}
        for key, value in counts.items():
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(
                    f"The sparsifier checkpoint's {key!r} must be an int >= 0, got "
                    f"{value!r}."
                )
        generator_state = state_dict["generator"]
        try:
            torch.Generator().set_state(generator_state)
        except (TypeError, RuntimeError) as error:
            raise ValueError(
                "The sparsifier checkpoint's generator state is not a CPU "
                f"torch.Generator state: {error}"
            ) from error
        masks = state_dict["masks"]
        if not isinstance(masks, Mapping):
            raise TypeError(
                "The sparsifier checkpoint's 'masks' must be a dict "
                f"{{tensor_fqn: mask}}, got {type(masks).__name__}."
            )
        mine = self.masks
        if set(masks) != set(mine):
            raise ValueError(
                "The checkpoint's tensors do not match this sparsifier's.\n"
                f"missing from the checkpoint: {sorted(set(mine) - set(masks))}\n"
                f"unexpected in the checkpoint: {sorted(set(masks) - set(mine))}"
            )
        settings = state_dict["settings"]
        if not isinstance(settings, Mapping):
            raise TypeError(
                "The sparsifier checkpoint's 'settings' must be a dict, got "
                f"{type(settings).__name__}."
            )
        current = self._settings()
        mismatched = sorted(
            key for key, value in current.items() if not same(settings.get(key), value)
        )
        if mismatched:
            lines = "\n".join(
                f"{key}: checkpoint {settings.get(key)!r}, "
                f"this sparsifier {current[key]!r}"
                for key in mismatched
            )
            raise ValueError(
                "The checkpoint was made with other settings:\n"
                f"{lines}\nBuild the sparsifier with the checkpoint's settings."
            )
        targets = stored_counts(state_dict, self.topology.final_targets, mine)
        signals, pruned = stored_policy_state(state_dict, self.topology.params)
        layouts = self.topology.layouts
        params = self.topology.params
        if self.sharded and from_dcp:
            loaded = dict(masks)  # this rank's rows, checked over all ranks
        else:
            loaded = {
                fqn: decode_mask(
                    masks[fqn], fqn, tuple(mask.shape), targets[fqn], version=version
                )
                for fqn, mask in mine.items()
            }
            if self.sharded:  # a whole (unsharded) checkpoint: this rank's rows
                loaded = {
                    fqn: _fsdp.local_rows(fqn, m, params[fqn])
                    for fqn, m in loaded.items()
                }
        for fqn, layout in layouts.items():
            check_loaded_mask(fqn, loaded[fqn], layout)
        metrics = state_dict.get("metrics")
        if metrics is not None:
            metrics = self._mask_metrics.check_state(metrics, mine)
            if dcp_ever is not None:
                metrics["ever"] = dcp_ever
        # Everything is checked: from here on state changes.
        self._stash.restore()  # what the masks in place cut since the last write
        with torch.no_grad():
            for fqn, mask in loaded.items():
                local(mine[fqn]).copy_(mask)
        self.topology.set_targets(targets)
        self.signals = signals
        self.pruned_at_init = pruned
        self.apply_masks()
        self.generator.set_state(generator_state)
        self.step_count = counts["step"]
        self.update_count = counts["updates"]
        self._mask_metrics.load_checked(
            metrics,
            {fqn: local(m) for fqn, m in self.masks.items()},
            self._over_ranks(),
        )
        self._counted_by_hand = False  # a restored count, not one counted here
        self._arm()

    # -- lifecycle and display ----------------------------------------------------

    def apply_masks(self) -> None:
        """Zero the stored weights and optimizer state outside the current masks.

        sparsetorch keeps them zero on every path it controls. Call this after
        writing a masked weight yourself, e.g. ``nn.init.normal_(layer.weight)``,
        which writes through to the stored weight.

        Example::

            >>> import torch
            >>> import sparsetorch as st
            >>> layer = torch.nn.Linear(4, 4)
            >>> sparsifier = st.sparsify(layer, policy="static", sparsity=0.5)
            >>> _ = torch.nn.init.ones_(layer.weight)
            >>> sparsifier.apply_masks()
            >>> int(layer.weight.count_nonzero())
            8
        """
        self._check_live()
        self.topology.apply_masks()
        for optimizer in self.optimizers:
            self._settle(optimizer)
        self._stash.clear()

    def remove(self) -> None:
        """Bake the masks into the weights and remove every parametrization and hook.

        The model becomes a plain model with zeros, whose parameters are the same
        objects the optimizer holds. The sparsifier cannot be used afterwards.

        Raises:
            RuntimeError: the weights were sharded (FSDP) after sparsifying.
        """
        self._check_live()
        _distributed.check_params_unsharded(self.topology.params, "sparsifier.remove()")
        set_execution(self.topology, "mask")
        self.apply_masks()
        self._detach_optimizers()
        self._sizes.stop()
        self.topology.remove()
        self._removed = True
        _LIVE.discard(self)

    def _check_live(self) -> None:
        if self._removed:
            raise RuntimeError(
                "This sparsifier was removed (sparsifier.remove() baked the masks "
                "into a plain model).\nTo train sparse again, call sparsify() anew."
            )
        self._sync_sharding()

    def _over_ranks(self) -> Any:
        """Sums counts of mask shards over the ranks (FSDP2), else ``None``."""
        return _fsdp.sum_over_ranks if self.sharded else None

    def _sync_sharding(self) -> None:
        """Follow ``fully_shard`` (FSDP2): shard the masks like their weights."""
        if not self.sharded and not (dist.is_available() and dist.is_initialized()):
            return  # (no process group: nothing can shard; this runs every step)
        if (
            _fsdp.adopt_sharding(self.topology, self._stash, self._check_shardable)
            and not self.sharded
        ):
            self.sharded = True
            ever = self._mask_metrics.ever
            if ever is not None:  # the ITOP masks: this rank's rows too
                params = self.topology.params
                self._mask_metrics.ever = {
                    fqn: _fsdp.local_rows(fqn, e, params[fqn])
                    for fqn, e in ever.items()
                }

    def _check_shardable(self) -> None:
        """Raise, before any mask is sharded, what cannot run under FSDP2."""
        if self.topology.layouts:
            raise RuntimeError(
                "Structured masks (N:M, constant fan-in) are not supported "
                "under FSDP2 yet: an update selects within groups on whole "
                "rows, with its own tie draws.\nTrain unstructured masks "
                "under fully_shard, or structured ones with "
                "DistributedDataParallel."
            )
        if self.policy.dense_grad_every_step:
            raise RuntimeError(
                f"{type(self.policy).__name__} is not supported under FSDP2 "
                "yet (its running dense-gradient state is kept whole).\n"
                "Use RigL, SET or static masks under fully_shard, or train "
                "with DistributedDataParallel."
            )
        if self.execution != "mask":
            raise RuntimeError(
                f'execution="{self.execution}" computes with compressed '
                "whole weights, which FSDP2 shards.\nUnder fully_shard, "
                "train in mask mode (the default): "
                'sparsifier.set_execution("mask") before sharding.'
            )
        ids = {id(p) for p in self.topology.params.values()}
        for optimizer in self.optimizers:
            held = (p for g in optimizer.param_groups for p in g["params"])
            if not any(id(p) in ids for p in held):
                raise RuntimeError(
                    f"The attached {type(optimizer).__name__} holds the "
                    "weights from before fully_shard, which FSDP2 replaced "
                    "by sharded ones.\nBuild the optimizer after fully_shard "
                    "and attach it: sparsifier.attach_optimizer(optimizer)."
                )

    def set_execution(self, execution: str) -> None:
        """Switch the masked ``nn.Linear`` layers to ``execution``.

        ``"mask"`` computes densely on the masked weights; ``"sparse"`` on
        compressed weights; ``"auto"`` sparse where it is predicted faster (see
        ``docs/sparse_execution.md``). Other masked layers always compute in
        mask mode. Results agree up to float rounding in every mode.

        Raises:
            ValueError: unknown ``execution``.
            TypeError: ``execution`` is not a string.

        Example::

            >>> import torch
            >>> import sparsetorch as st
            >>> model = torch.nn.Sequential(torch.nn.Linear(64, 64))
            >>> sparsifier = st.sparsify(model, policy="static", sparsity=0.9)
            >>> sparsifier.set_execution("sparse")
            >>> sparsifier.execution, type(model[0].forward).__name__
            ('sparse', 'SparseExecution')
        """
        self._sync_sharding()
        if self.sharded and execution != "mask":
            raise RuntimeError(
                f"execution={execution!r} computes with compressed whole weights, "
                'which FSDP2 shards: under fully_shard only "mask" runs.'
            )
        set_execution(self.topology, execution)
        self.execution = execution

    def export(self, *, execution: str = "auto", batch_size: int = 128) -> nn.Module:
        """An inference copy of the model with compressed ``nn.Linear`` weights.

        See :func:`sparsetorch.execution.export_sparse`; the model is unchanged.

        Raises:
            ValueError: unknown ``execution`` or ``batch_size < 1``.

        Example::

            >>> import torch
            >>> import sparsetorch as st
            >>> model = torch.nn.Sequential(torch.nn.Linear(64, 64))
            >>> sparsifier = st.sparsify(model, policy="static", sparsity=0.9)
            >>> sparsifier.export(execution="sparse")
            Sequential(
              (0): SparseLinear(in_features=64, out_features=64, nnz=410, bias=True)
            )
        """
        _distributed.check_params_unsharded(self.topology.params, "sparsifier.export()")
        return export_sparse(
            self.topology.model, execution=execution, batch_size=batch_size
        )

    def next_update_step(self) -> int | None:
        """The first step after the current one whose update is scheduled."""
        s = self.schedule
        if not self.policy.dynamic or s.end_step is None:
            return None
        k = max(self.step_count + 1, s.begin_step)
        k = math.ceil(k / s.update_interval) * s.update_interval
        return k if k < s.end_step else None

    def set_total_steps(self, total_steps: int) -> None:
        """Set the run's length once it is known (frameworks know it at fit start).

        ``end_step`` becomes ``int(0.75 * total_steps)``, as with
        ``sparsify(..., total_steps=...)``, unless ``end_step`` was given
        explicitly to ``sparsify``.

        Raises:
            TypeError: ``total_steps`` is not an int.
            ValueError: ``total_steps < 1``.

        Warns when it leaves no step for an update of a dynamic policy.

        Example::

            >>> import torch
            >>> import sparsetorch as st
            >>> model = torch.nn.Sequential(torch.nn.Linear(8, 8))
            >>> sparsifier = st.sparsify(model, policy="set", total_steps=1000,
            ...                          update_interval=10)
            >>> sparsifier.set_total_steps(2000)
            >>> sparsifier.schedule.end_step
            1500
        """
        self._check_live()
        if isinstance(total_steps, bool) or not isinstance(total_steps, int):
            raise TypeError(f"total_steps must be an int, got {total_steps!r}.")
        if total_steps < 1:
            raise ValueError(f"total_steps must be >= 1, got {total_steps}.")
        self.total_steps = total_steps
        if not self.policy.dynamic or not self._end_from_total:
            return
        schedule = dataclasses.replace(self.schedule, end_step=int(0.75 * total_steps))
        warn_if_never_updates(schedule, f"total_steps={total_steps}", stacklevel=2)
        self.schedule = schedule
        self._arm()

    # -- FLOPs and mask dynamics --------------------------------------------------

    def flops(
        self, example_input: Any = None, *, total_steps: int | None = None
    ) -> FlopsReport:
        """Inference and training FLOPs relative to dense, per layer and in total.

        Follows the accounting of Evci et al. 2020 (see :mod:`sparsetorch.flops`):
        per example, a sparse forward costs :math:`f_S`, a dense one
        :math:`f_D`; a training step costs :math:`3 f_S`, or :math:`2 f_S +
        f_D` when its backward pass keeps the dense gradient (RigL before each
        update, SNFS at every step until the last update), with the active
        counts of that step (GMP's follow its schedule from dense). The layer
        sizes come from one forward pass: the first one in training mode after
        the first optimizer step (recorded automatically, then unhooked; not
        under ``torch.compile``), or one on ``example_input``. After the first
        call, :meth:`summary` shows a FLOPs line.

        Args:
            example_input: the model's input for one forward pass (run in eval
                mode under ``torch.no_grad()``; the training flags are
                restored): a tensor ``x`` (``model(x)``), a tuple
                (``model(*x)``) or a dict (``model(**x)``). Its leading
                dimension is the batch size the counts are divided by.
                Default: ``None`` (the recorded training forward).
            total_steps: optimizer steps of the run to count training over
                (a longer run, as the paper's "RigL 2x", is more steps).
                Default: ``None`` (:attr:`total_steps`, from ``sparsify`` or
                :meth:`set_total_steps`; without it, the training fields of
                the report are ``None``).

        Returns:
            A :class:`~sparsetorch.flops.FlopsReport`; ``print`` it for the
            table.

        Raises:
            RuntimeError: no forward pass was recorded and no
                ``example_input`` was given, or the sparsifier was removed.
            TypeError: ``total_steps`` is not an int.
            ValueError: ``total_steps < 1``.

        Example::

            >>> import torch
            >>> import sparsetorch as st
            >>> model = torch.nn.Sequential(
            ...     torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 4))
            >>> sparsifier = st.sparsify(model, policy="static", sparsity=0.75,
            ...                          distribution="uniform")
            >>> report = sparsifier.flops(torch.randn(2, 8), total_steps=100)
            >>> report.inference_ratio, report.training_ratio
            (0.25, 0.25)
            >>> print(report)
            Static, 100 steps (0 with a dense weight gradient), FLOPs per example
            weight    type    density   inference  x dense    training  x dense
            0.weight  Linear   0.2500  6.4000e+01   0.2500  1.9200e+04   0.2500
            2.weight  Linear   0.2500  3.2000e+01   0.2500  9.6000e+03   0.2500
            total              0.2500  9.6000e+01   0.2500  2.8800e+04   0.2500
        """
        self._check_live()
        if total_steps is not None:
            if isinstance(total_steps, bool) or not isinstance(total_steps, int):
                raise TypeError(f"total_steps must be an int, got {total_steps!r}.")
            if total_steps < 1:
                raise ValueError(f"total_steps must be >= 1, got {total_steps}.")
        if example_input is not None:
            self._sizes.measure(example_input)
        elif self._sizes.positions is None:
            raise RuntimeError(
                "sparsifier.flops() needs the layer sizes of one forward pass, and "
                "none was recorded yet (sparsetorch records the first forward in "
                "training mode after the first optimizer step, unless compiled)."
                "\nPass an input: "
                "sparsifier.flops(example_input=x), or call it after the first "
                "training step."
            )
        self._flops_shown = True
        return self._flops_report(
            self.total_steps if total_steps is None else total_steps
        )

    def _flops_report(self, total_steps: int | None) -> FlopsReport:
        return flops_report(self, self._sizes, total_steps=total_steps)

    def track_itop(self) -> None:
        """Track the ITOP rate: the share of masked weights ever active.

        The in-time over-parameterization rate of Liu et al. 2021
        (https://arxiv.org/abs/2102.02887) needs the union of all masks so
        far: one more bool per masked weight, as much memory as the masks, so
        it is opt-in. The union starts from the current masks (call this
        before training for the run's rate), is updated at every topology
        update, saved in :meth:`state_dict` and restored by
        :meth:`load_state_dict` (which also turns tracking on when the
        checkpoint has it). Calling it again changes nothing.

        Example::

            >>> import torch
            >>> import sparsetorch as st
            >>> model = torch.nn.Sequential(torch.nn.Linear(8, 8))
            >>> sparsifier = st.sparsify(model, policy="set", sparsity=0.75,
            ...                          total_steps=100, update_interval=10)
            >>> sparsifier.track_itop()
            >>> sparsifier.metrics()["sparsity/itop"]
            0.25
        """
        self._check_live()
        self._mask_metrics.track_itop(
            {fqn: local(m) for fqn, m in self.masks.items()}, self._over_ranks()
        )

    def metrics(self, *, per_tensor: bool = False) -> dict[str, float]:
        """Scalars for a logger: sparsity, mask change, updates, ITOP rate.

        * ``sparsity/sparsity``: the fraction of zeros over the masked weights.
        * ``sparsity/mask_change``: the share of the active weights that the
          last topology update grew (0 before the first; see
          :mod:`sparsetorch.metrics`).
        * ``sparsity/updates``: topology updates so far.
        * ``sparsity/itop`` (after :meth:`track_itop`): the share of the
          masked weights active at some point so far.

        Recorded at each update (one device sync); reading them costs
        nothing on the device.

        Args:
            per_tensor: also ``sparsity/mask_change/<tensor_fqn>`` and
                ``sparsity/itop/<tensor_fqn>``. Default: ``False``.

        Example::

            >>> import torch
            >>> import sparsetorch as st
            >>> model = torch.nn.Sequential(torch.nn.Linear(8, 8))
            >>> sparsifier = st.sparsify(model, policy="set", sparsity=0.75,
            ...                          total_steps=100, update_interval=10)
            >>> for name, value in sparsifier.metrics().items():
            ...     print(name, value)
            sparsity/sparsity 0.75
            sparsity/mask_change 0.0
            sparsity/updates 0.0
        """
        metrics = self._mask_metrics
        targets = self.topology.targets
        numel = sum(m.numel() for m in self.masks.values())
        out = {
            "sparsity/sparsity": 1.0 - sum(targets.values()) / numel,
            "sparsity/mask_change": metrics.total_mask_change(),
            "sparsity/updates": float(self.update_count),
        }
        itop = metrics.total_itop()
        if itop is not None:
            out["sparsity/itop"] = itop
        if per_tensor:
            for fqn, change in metrics.mask_change().items():
                out[f"sparsity/mask_change/{fqn}"] = change
            for fqn, rate in (metrics.itop() or {}).items():
                out[f"sparsity/itop/{fqn}"] = rate
        return out

    @property
    def mask_history(self) -> list[MaskUpdate]:
        """Every topology update so far: step, weights grown, ITOP, oldest first.

        Kept in :meth:`state_dict`, so a resumed run has the whole history.
        """
        return self._mask_metrics.history

    def summary(self) -> str:
        """A table, one line per tensor: shape, target and actual sparsity, counts.

        Notes follow the table: tensors left dense, tensors that sat out
        updates, and ``nn.Linear`` layers kept in mask mode under sparse
        execution.
        """
        if self._removed:
            return "(removed: the masks are baked into the model's weights)"
        rows = []
        total_active = total_numel = 0
        sparsities = self.topology.sparsities
        counts = self.topology.targets  # exact: under FSDP2, no collective
        for fqn, mask in self.masks.items():
            active = counts[fqn] if self.sharded else int(mask.sum())
            numel = mask.numel()
            total_active += active
            total_numel += numel
            shape = "(" + ", ".join(str(d) for d in mask.shape) + ")"
            rows.append(
                (fqn, shape, sparsities[fqn], 1 - active / numel, active, numel)
            )
        rows.append(
            (
                "total",
                "",
                self.sparsity,
                1 - total_active / total_numel,
                total_active,
                total_numel,
            )
        )
        width = max(len("tensor"), *(len(r[0]) for r in rows))
        swidth = max(len("shape"), *(len(r[1]) for r in rows))
        lines = [
            f"{'tensor':<{width}}  {'shape':<{swidth}}  target  actual"
            "     active      numel"
        ]
        for fqn, shape, target, actual, active, numel in rows:
            lines.append(
                f"{fqn:<{width}}  {shape:<{swidth}}  {target:.4f}  {actual:.4f}"
                f"  {active:>9}  {numel:>9}"
            )
        lines += [f"skipped: {fqn} ({why}, dense)" for fqn, why in self.skipped.items()]
        lines += structure_notes(
            self.topology.structure, self.topology.layouts, self.masks
        )
        lines += [
            f"not updated: {fqn} sat out {n} update(s) (no gradient, or frozen)"
            for fqn, n in self.missed_updates.items()
        ]
        if self.execution != "mask":
            lines += [
                f"mask mode: {fqn} ({why})"
                for fqn, why in mask_mode_reasons(self.topology).items()
            ]
        if self._flops_shown and self._sizes.positions is not None:
            lines.append(self._flops_report(self.total_steps).summary_line())
        itop = self._mask_metrics.total_itop()
        if itop is not None:
            lines.append(
                f"mask dynamics: {self.update_count} update(s), last mask change "
                f"{self._mask_metrics.total_mask_change():.4f}, ITOP rate {itop:.4f}"
            )
        return "\n".join(lines)

    def __deepcopy__(self, memo: dict[int, Any]) -> Sparsifier:
        raise TypeError(
            "A Sparsifier cannot be copied: it is bound to one model's masks and "
            "one optimizer's hooks, and a copy would silently stop counting "
            "steps.\nTo copy a sparse run, build a fresh model, load "
            "model.state_dict() into it (the dense keys), sparsify it with the "
            "same settings, and load this state: new = sparsify(fresh, "
            "fresh_optimizer, ...); new.load_state_dict(sparsifier.state_dict())."
        )

    def __reduce__(self) -> Any:
        raise TypeError(
            "A Sparsifier cannot be pickled: save sparsifier.state_dict() instead "
            "(it loads with torch.load(..., weights_only=True))."
        )

    def __repr__(self) -> str:
        if self._removed:
            return "Sparsifier(removed)"
        nxt = self.next_update_step()
        return (
            f"Sparsifier(policy={self.policy!r}, step={self.step_count}, "
            f"updates={self.update_count}, next_update="
            f"{'none' if nxt is None else nxt})\n{self.summary()}"
        )


def warn_if_never_updates(schedule: Schedule, source: str, stacklevel: int) -> None:
    """Warn when a dynamic ``schedule`` has no update step: a static mask."""
    if schedule.end_step is None:
        return
    first = max(schedule.begin_step, 1)
    first = math.ceil(first / schedule.update_interval) * schedule.update_interval
    if first >= schedule.end_step:
        warnings.warn(
            f"{source} leaves no step for topology updates: they stop at "
            f"end_step={schedule.end_step}, but the first update would come at "
            f"step {first} (update_interval={schedule.update_interval}, "
            f"begin_step={schedule.begin_step}), so the masks never change.\n"
            "Pass a smaller update_interval, or a larger total_steps or "
            'end_step; for a fixed mask, say policy="static".',
            UserWarning,
            stacklevel=stacklevel + 1,
        )


def _install_global_hook() -> None:
    global _GLOBAL_HOOK
    if _GLOBAL_HOOK is None:
        _GLOBAL_HOOK = register_optimizer_step_pre_hook(_adopt_unattached)


def _adopt_unattached(optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
    """Global optimizer step pre-hook: attach optimizers stepping masked weights."""
    for sparsifier in list(_LIVE):
        sparsifier._adopt(optimizer)


def _restart_lbfgs(optimizer: torch.optim.LBFGS) -> None:
    """Drop L-BFGS's curvature history after an update.

    The history is flat over all parameters and spans the dropped weights, so
    the next direction would write outside the masks. The next step starts
    afresh (steepest descent), as L-BFGS's first step does.
    """
    state = optimizer.state[optimizer.param_groups[0]["params"][0]]
    history = ("d", "t", "old_dirs", "old_stps", "ro", "H_diag", "prev_flat_grad")
    for key in (*history, "prev_loss"):
        state.pop(key, None)
    if "n_iter" in state:
        state["n_iter"] = 0
