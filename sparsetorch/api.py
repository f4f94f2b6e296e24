"""``sparsify()``: the one-call entry point."""

from __future__ import annotations

import math
import warnings
from collections.abc import Mapping, Sequence

import torch
from torch import nn

from sparsetorch import _distributed
from sparsetorch._optim import unwrap_optimizer
from sparsetorch._stash import Stash
from sparsetorch.distributions import allocate
from sparsetorch.execution import check_execution
from sparsetorch.policies.base import Policy, make_policy
from sparsetorch.schedule import DROP_SCHEDULES, Schedule
from sparsetorch.sparsifier import Sparsifier, warn_if_never_updates
from sparsetorch.structure import Structure, check_policy, make_structure
from sparsetorch.topology import (
    Topology,
    check_materialized,
    named_tensors,
    select_tensors,
)

__all__ = ["sparsify"]


def sparsify(
    model: nn.Module,
    optimizer: torch.optim.Optimizer | None = None,
    *,
    policy: str | Policy = "rigl",
    sparsity: float = 0.9,
    distribution: str | Mapping[str, float] = "erk",
    total_steps: int | None = None,
    update_interval: int = 100,
    drop_fraction: float = 0.3,
    drop_schedule: str = "cosine",
    begin_step: int = 0,
    end_step: int | None = None,
    include: Sequence[str] | None = None,
    exclude: Sequence[str] | None = None,
    grow_init: str | float = "zeros",
    seed: int = 0,
    execution: str = "mask",
    structure: str | Structure | None = None,
) -> Sparsifier:
    r"""Make ``model`` sparse in place and return the handle that trains its topology.

    Every selected weight gets a :class:`~sparsetorch.MaskParametrization` with a
    random mask holding exactly ``round((1 - s) * numel)`` active weights, where
    ``s`` is the tensor's share of ``sparsity`` under ``distribution``. With an
    optimizer, the topology updates inside ``optimizer.step()`` every
    ``update_interval`` steps in ``[begin_step, end_step)``: the training loop
    does not change. Parameters keep their identity, so an optimizer built before
    ``sparsify`` stays valid, and ``model.state_dict()`` keeps the dense keys.

    Under ``torch.distributed``, call it on every rank: rank 0's initial masks
    and generator state are broadcast, and the masks are kept out of
    DistributedDataParallel's per-forward buffer broadcast. A model already
    wrapped in ``DistributedDataParallel`` can be passed as it is: it is
    sparsified through its ``.module`` and DDP's reducer is rebuilt (pass the
    wrapper, not ``.module``). Under FSDP2, sparsify the whole model, then
    ``fully_shard`` it and build the optimizer: the masks are sharded like
    their weights (see ``docs/distributed.md``).

    Args:
        model: the model to sparsify, changed in place.
        optimizer: the optimizer of ``model`` (a framework's wrapper of one is
            unwrapped). Its steps are counted and its state is reset where
            masks change. Default: ``None``: call ``sparsifier.step()`` after
            each optimizer step yourself, or attach one later with
            :meth:`~sparsetorch.Sparsifier.attach_optimizer`. An optimizer
            that steps masked weights without being attached is attached at
            its first step (its state is reset where masks change; its steps
            are not counted).
        policy: ``"rigl"``, ``"set"``, ``"static"``, ``"snfs"``, ``"gmp"``,
            ``"snip"`` or a :class:`~sparsetorch.policies.Policy` (the methods
            and their papers: ``docs/api.md``). GMP starts dense and prunes
            to ``sparsity``; SNIP is dense until
            :meth:`~sparsetorch.Sparsifier.prune_at_init`. Default: ``"rigl"``.
        sparsity: fraction of zeros over all selected weights, in ``[0, 1)``.
            Unused when ``distribution`` is a dict. Default: ``0.9``.
        distribution: ``"uniform"``, ``"er"``, ``"erk"`` or a dict
            ``{tensor_fqn: sparsity}`` naming exactly the selected tensors.
            Default: ``"erk"``.
        total_steps: optimizer steps in the whole run; ``end_step`` defaults to
            ``int(0.75 * total_steps)``. Default: ``None``.
        update_interval: optimizer steps between updates. Default: ``100``.
        drop_fraction: fraction of active weights dropped at ``begin_step``.
            Default: ``0.3``.
        drop_schedule: ``"cosine"``, ``"linear"`` or ``"constant"``.
            Default: ``"cosine"``.
        begin_step: first step that may update. Default: ``0``.
        end_step: no update at or after this step. Default: ``None``.
        include: fnmatch globs over ``tensor_fqn`` selecting the tensors.
            Default: ``None`` (the weights of ``nn.Linear`` and ``nn.Conv*``).
            A tensor shared by several modules (tied weights) is selected
            once, under its first name; frozen tensors (``requires_grad=False``)
            are skipped: they stay dense, with a warning, and
            :meth:`~sparsetorch.Sparsifier.summary` lists them.
        exclude: fnmatch globs removed from the selection. Default: ``None``.
        grow_init: value of newly grown weights: ``"zeros"`` or a float.
            Default: ``"zeros"``.
        seed: seed of the generator drawing initial masks, ties and random
            growth, an int in ``[-2**63, 2**64)``. Default: ``0``.
        execution: how masked ``nn.Linear`` layers compute: ``"mask"`` (dense
            compute on the masked weight), ``"sparse"`` (compressed weights:
            faster at high sparsity, see ``docs/sparse_execution.md``) or
            ``"auto"`` (each product of a call sparse only where predicted
            faster; an index of the active weights, 8-16 bytes each, is
            kept for the layers it may run sparse). Results agree up to
            float rounding; the stored weights, optimizer and state dicts are the
            same. Default: ``"mask"``.
        structure: a constraint every mask keeps, at initialisation and after
            every update, for any policy: ``"N:M"`` (e.g. ``"2:4"``: every
            ``M`` consecutive inputs of an output unit keep exactly ``N``;
            needs ``sparsity=1 - N/M``, ``distribution="uniform"``),
            ``"constant-fan-in"`` (every output unit keeps the same number
            of inputs, ``round(density * fan_in)`` at the density
            ``distribution`` gives the layer), or a
            :mod:`sparsetorch.structure` object (``NM(2, 4)``,
            ``ConstantFanIn(ablation=0.3)`` for SRigL's neuron ablation).
            See ``docs/api.md``. Default: ``None`` (unstructured).

    Returns:
        The :class:`~sparsetorch.Sparsifier`.

    Raises:
        ValueError: a value is out of range, a name is unknown, nothing is
            selected, the optimizer does not hold a selected tensor, or a
            dynamic policy has neither ``total_steps`` nor ``end_step``. The
            model and optimizer are left unchanged.
        TypeError: an argument has the wrong type. The model and optimizer are
            left unchanged.
        RuntimeError: the model holds a ``DistributedDataParallel`` inside
            another module, is a DDP wrapper using ``mixed_precision``,
            ``delay_all_reduce_named_params`` or the Python reducer, or is
            already sharded (``fully_shard`` before ``sparsify``, FSDP1). The
            model is left unchanged.

    Example::

        >>> import torch
        >>> import sparsetorch as st
        >>> model = torch.nn.Sequential(
        ...     torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 2))
        >>> opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
        >>> sparsifier = st.sparsify(model, opt, sparsity=0.75, total_steps=100,
        ...                          update_interval=10, distribution="uniform")
        >>> for _ in range(10):
        ...     opt.zero_grad()
        ...     model(torch.randn(4, 8)).sum().backward()
        ...     opt.step()
        >>> sparsifier.update_count
        1
        >>> print(sparsifier.summary())
        tensor    shape    target  actual     active      numel
        0.weight  (16, 8)  0.7500  0.7500         32        128
        2.weight  (2, 16)  0.7500  0.7500          8         32
        total              0.7500  0.7500         40        160
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}.")
    model, ddp = _distributed.unwrap(model)  # a DDP wrapper: its .module
    if optimizer is not None:
        try:  # a framework's wrapper (AcceleratedOptimizer): the optimizer inside
            optimizer = unwrap_optimizer(optimizer)
        except TypeError:
            raise TypeError(
                "optimizer must be a torch.optim.Optimizer (or a framework's "
                f"wrapper of one) or None, got {type(optimizer).__name__}."
            ) from None
    _check_sparsity(sparsity)
    check_execution(execution)
    policy = make_policy(policy)
    structure = make_structure(structure)
    check_policy(structure, policy)
    grow_value = _grow_value(grow_init)
    for name, value in (("total_steps", total_steps), ("seed", seed)):
        if (value is not None or name == "seed") and (
            isinstance(value, bool) or not isinstance(value, int)
        ):
            raise TypeError(f"{name} must be an int, got {value!r}.")
    if not -(2**63) <= seed < 2**64:
        raise ValueError(
            f"seed must be in [-2**63, 2**64) (torch.Generator's range), got {seed}."
        )
    if total_steps is not None and total_steps < 1:
        raise ValueError(f"total_steps must be >= 1, got {total_steps}.")
    if not isinstance(drop_schedule, str):
        raise TypeError(
            f"drop_schedule must be a name, got {drop_schedule!r}.\n"
            f"Known drop schedules: {sorted(DROP_SCHEDULES)}."
        )
    end_from_total = end_step is None and total_steps is not None and policy.dynamic
    if end_from_total:
        assert total_steps is not None
        end_step = int(0.75 * total_steps)
        if (
            isinstance(begin_step, int)
            and not isinstance(begin_step, bool)
            and end_step <= begin_step
        ):
            raise ValueError(
                f"total_steps={total_steps} leaves no step for topology updates: "
                f"end_step defaults to int(0.75 * total_steps) = {end_step}, which "
                f"must be greater than begin_step ({begin_step}).\n"
                "Pass a larger total_steps, or end_step= explicitly."
            )
    if policy.dynamic and end_step is None:
        raise ValueError(
            f"policy {type(policy).__name__} updates the topology, so it needs to "
            "know when to stop.\nPass total_steps=len(loader) * epochs (end_step "
            "defaults to 75% of it), or end_step=."
        )
    schedule = Schedule(
        update_interval=update_interval,
        begin_step=begin_step,
        end_step=end_step if policy.dynamic else None,
        drop_fraction=drop_fraction,
        drop_schedule=drop_schedule,
    )
    if policy.dynamic:
        warn_if_never_updates(
            schedule,
            f"total_steps={total_steps}" if end_from_total else f"end_step={end_step}",
            stacklevel=2,
        )
    tied: dict[str, str] = {}
    fqns = select_tensors(model, include, exclude, skipped=tied)
    tensors = dict(named_tensors(model))
    for fqn in fqns:
        check_materialized(fqn, tensors[fqn])
    empty = [fqn for fqn in fqns if tensors[fqn].numel() == 0]
    fqns = [fqn for fqn in fqns if fqn not in empty]
    if not fqns:
        raise ValueError(
            f"Nothing to sparsify: every selected tensor has no elements: {empty}."
        )
    frozen = [fqn for fqn in fqns if not tensors[fqn].requires_grad]
    if frozen and len(frozen) == len(fqns):
        raise ValueError(
            f"Nothing to sparsify: every selected tensor is frozen "
            f"(requires_grad=False): {frozen}.\n"
            "sparsetorch keeps the masked weights' gradients and optimizer "
            "state in step with the masks, so it sparsifies only trained "
            "tensors: call .requires_grad_(True) on them, or select others "
            'with include=["..."].'
        )
    fqns = [fqn for fqn in fqns if fqn not in frozen]
    shapes = {fqn: tuple(tensors[fqn].shape) for fqn in fqns}
    sparsities = allocate(shapes, sparsity, distribution)
    if optimizer is not None:
        _check_optimizer_holds(optimizer, {fqn: tensors[fqn] for fqn in fqns})

    generator = torch.Generator().manual_seed(seed)
    stash = Stash()
    topology = Topology(
        model,
        sparsities,
        generator,
        stash=stash,
        structure=structure,
        initial_sparsities=policy.initial_sparsities(sparsities),
    )
    if frozen:
        warnings.warn(
            f"Skipped {len(frozen)} frozen tensor(s) (requires_grad=False), which "
            f"stay dense: {frozen}.\nsparsifier.summary() lists them; unfreeze "
            "them before sparsify() to sparsify them.",
            UserWarning,
            stacklevel=2,
        )
    _distributed.broadcast_(list(topology.masks.values()))
    state = generator.get_state()
    _distributed.broadcast_([state])
    generator.set_state(state)
    _distributed.keep_masks_local(model, topology.masks.values(), ddp)
    overall = sparsity
    if not isinstance(distribution, str):
        numel = {fqn: math.prod(shape) for fqn, shape in shapes.items()}
        overall = sum(sparsities[f] * numel[f] for f in fqns) / sum(numel.values())
    sparsifier = Sparsifier(
        topology,
        policy,
        schedule,
        optimizer=optimizer,
        generator=generator,
        sparsity=overall,
        grow_init=grow_value,
        stash=stash,
        end_step_from_total=end_from_total,
        total_steps=total_steps,
        skipped={
            **tied,
            **{fqn: "no elements" for fqn in empty},
            **{fqn: "requires_grad=False" for fqn in frozen},
        },
    )
    sparsifier.set_execution(execution)
    return sparsifier


def _check_sparsity(sparsity: object) -> None:
    if isinstance(sparsity, bool) or not isinstance(sparsity, (int, float)):
        raise TypeError(f"sparsity must be a float, got {sparsity!r}.")
    if not 0.0 <= sparsity < 1.0:
        raise ValueError(
            f"sparsity must be in [0, 1), got {sparsity!r}.\n"
            "It is the fraction of zeros: 0.9 keeps 10% of the weights."
        )


def _grow_value(grow_init: object) -> float:
    if grow_init == "zeros":
        return 0.0
    if isinstance(grow_init, str):
        raise ValueError(f"Unknown grow_init {grow_init!r}: pass 'zeros' or a float.")
    if isinstance(grow_init, bool) or not isinstance(grow_init, (int, float)):
        raise TypeError(f"grow_init must be 'zeros' or a float, got {grow_init!r}.")
    if not math.isfinite(grow_init):
        raise ValueError(f"grow_init must be finite, got {grow_init!r}.")
    return float(grow_init)


def _check_optimizer_holds(
    optimizer: torch.optim.Optimizer, params: Mapping[str, torch.Tensor]
) -> None:
    held = {id(p) for group in optimizer.param_groups for p in group["params"]}
    missing = [fqn for fqn, p in params.items() if id(p) not in held]
    if missing:
        raise ValueError(
            f"The optimizer does not hold the parameters {missing}.\n"
            "Pass the optimizer built over model.parameters()."
        )
