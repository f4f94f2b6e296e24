"""FSDP2 (``fully_shard``): masks sharded like their weights, updates on shards.

``sparsify`` runs on the whole model; ``fully_shard`` then turns each stored
weight into a DTensor sharded on dim 0 (FSDP2's default placement).
:func:`adopt_sharding` follows it (before the next forward, optimizer step or
sparsifier call): each mask becomes a DTensor with its weight's mesh and
placements, keeping only this rank's rows, and the gradient hooks move to the
sharded weight, where FSDP calls them after each reduce-scatter.

An update selects exactly what the unsharded update selects, at any world size
(:func:`top_sharded`): the ``k``-th highest score over all shards is found by a
radix select over the scores' bit patterns, one all-reduced 256-bin histogram
per byte (4 rounds for float32 scores, 2 KiB each), instead of gathering whole
tensors. Scores above it are chosen; the tied ones are numbered in flat order
across ranks and drawn with the same generator call as the unsharded update.
Random growth (SET) draws the same stream as the unsharded update and keeps
this shard's part (:func:`sparsetorch.policies.base.random_scores`).

See ``docs/distributed.md`` for the communication and memory per update.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist
from torch import Tensor

from sparsetorch import _distributed
from sparsetorch._stash import Stash
from sparsetorch.parametrization import local
from sparsetorch.policies import base

if TYPE_CHECKING:
    from sparsetorch.topology import Topology

__all__ = [
    "Shard",
    "adopt_sharding",
    "like_rows",
    "local_rows",
    "shard_of",
    "sum_over_ranks",
    "top_sharded",
    "update_sharded",
]

_BINS = 256


def _dtensor_module() -> Any:
    import sys

    return sys.modules.get("torch.distributed.tensor")


@dataclass(frozen=True)
class Shard:
    """Where this rank's shard of a dim-0-sharded tensor lies in its flat order."""

    offset: int  #: flat position of the shard's first element
    total: int  #: elements in the whole tensor
    group: Any  #: the process group of the mesh


def shard_of(fqn: str, param: Tensor) -> Shard:
    """The shard of a DTensor parameter; raises for placements other than FSDP2's.

    Raises:
        RuntimeError: the mesh has more than one dimension (HSDP, 2-D
            parallelism) or the placement is not ``Shard(0)``.
    """
    module = _dtensor_module()
    placements = tuple(param.placements)  # type: ignore[attr-defined]
    mesh = param.device_mesh  # type: ignore[attr-defined]
    if mesh.ndim != 1 or placements != (module.Shard(0),):
        raise RuntimeError(
            f"{fqn!r} is a DTensor with placements {placements} on a "
            f"{mesh.ndim}-D mesh; sparsetorch supports FSDP2's default, Shard(0) "
            "on a 1-D mesh.\nShard with fully_shard(module) on a 1-D mesh (no "
            "shard_placement_fn, no HSDP or tensor parallelism), or leave this "
            f"tensor dense: exclude=[{fqn!r}]."
        )
    rows = param.shape[0]
    world, rank = mesh.size(), mesh.get_local_rank()
    per_rank = math.ceil(rows / world)  # torch.chunk's split, as FSDP2's
    first = min(rank * per_rank, rows)
    shard = local(param)
    row = math.prod(param.shape[1:])
    assert shard.shape[0] == max(0, min(per_rank, rows - first)), (fqn, shard.shape)
    return Shard(first * row, param.numel(), mesh.get_group())


@torch.no_grad()
def adopt_sharding(
    topology: Topology,
    stash: Stash | None = None,
    check_first: Callable[[], None] | None = None,
) -> bool:
    """Shard the masks of weights that ``fully_shard`` sharded since the last call.

    Cheap when nothing changed: one identity check per tensor. Returns whether
    the topology is sharded. ``stash`` keeps what masking a stale (loaded)
    shard cuts (:meth:`~sparsetorch.MaskParametrization.remask_shard`).
    ``check_first`` runs before the first mask is sharded; if it raises (or
    this does), nothing has changed.

    Raises:
        RuntimeError: a placement other than FSDP2's ``Shard(0)`` on a 1-D mesh,
            or only some of the masked weights are sharded.
    """
    module = _dtensor_module()
    entries = topology._entries
    if module is None:
        return False
    plain, follow = [], []
    for fqn, entry in entries.items():
        # (``entry.param`` by dict lookups: this runs before every optimizer step)
        plists = entry.module._modules["parametrizations"]
        plist = plists._modules[entry.tensor_name]  # type: ignore[union-attr]
        param = plist._parameters["original"]  # type: ignore[union-attr]
        p = entry.parametrization
        if not isinstance(param, module.DTensor):
            plain.append(fqn)
            continue
        current = None if p._param is None else p._param()
        if not (p.sharded and current is param and not p.stale):
            follow.append((fqn, p, param))
    sharded = len(plain) < len(entries)
    if sharded and plain:
        raise RuntimeError(
            f"Some masked weights are sharded by FSDP2 and others are not: {plain} "
            "are whole.\nApply fully_shard to every module holding a masked "
            "weight (fully_shard(model) on the root covers the rest), or leave "
            f"them dense: exclude={plain}."
        )
    new = [(fqn, param) for fqn, p, param in follow if not p.sharded]
    for fqn, param in new:
        shard_of(fqn, param)  # (raises for placements other than FSDP2's)
    if new and check_first is not None:
        check_first()
    for fqn, p, param in follow:
        if not p.sharded:
            rows = local_rows(fqn, p.mask, param).to(local(param).device)
            p.mask = like_rows(rows, param)  # (CPU offload: where the shard is)
            p.release()
            p.active = None
            p.sharded = True
        p.stash = stash
        p.attach(param)
        p.remask_shard()
    return sharded


# -- selection on shards ------------------------------------------------------------


def _keys(scores: Tensor) -> tuple[Tensor, int]:
    """Integers ordered as the float ``scores`` (``-0.0`` counts as ``0.0``)."""
    scores = scores.float() if scores.element_size() < 4 else scores
    scores = scores + 0.0  # -0.0 -> +0.0: equal scores must get equal keys
    if scores.dtype == torch.float64:
        bits, width = scores.view(torch.int64), 64
        flip = torch.iinfo(torch.int64).max
    else:
        bits, width = scores.float().view(torch.int32), 32
        flip = torch.iinfo(torch.int32).max
    # Negative floats order backwards by their bits: flip all but the sign bit.
    return torch.where(bits < 0, bits ^ flip, bits), width


#: What this rank sent in the collectives of updates on shards (calls, bytes):
#: measured by ``examples/fsdp.py`` for ``docs/distributed.md``.
TRAFFIC = {"calls": 0, "bytes": 0}


def _count(tensor: Tensor) -> None:
    TRAFFIC["calls"] += 1
    TRAFFIC["bytes"] += tensor.numel() * tensor.element_size()


def _sendable(tensor: Tensor) -> Tensor:
    """``tensor`` where the backend can send it (CUDA under NCCL)."""
    device = _distributed._comm_device()
    return tensor if device is None else tensor.to(device)


def _all_reduce(tensor: Tensor, group: Any) -> Tensor:
    """Sum ``tensor`` over ``group``'s ranks; the result is where ``tensor`` was."""
    _count(tensor)
    sent = _sendable(tensor)
    dist.all_reduce(sent, group=group)
    return sent.to(tensor.device)


def top_sharded(
    scores: Tensor, k: int, generator: torch.Generator, shard: Shard
) -> Tensor:
    """This shard's positions of the ``k`` highest scores over all shards.

    The same set as :func:`sparsetorch.policies.base._top` on the whole tensor,
    and the same generator calls: every score above the ``k``-th highest value
    is chosen, and among those equal to it (numbered in flat order over the
    shards) as many as are still needed are drawn with one ``randperm``, only
    when more tie than there are places. Collective: every rank of
    ``shard.group`` calls it with the same ``k`` and generator state.

    Args:
        scores: this shard's 1-D scores.
        k: how many to choose over the whole tensor.
        generator: CPU generator, in the same state on every rank.
        shard: the shard and its process group.

    Returns:
        Sorted local positions (``int64``).
    """
    n = _all_reduce(torch.tensor([scores.numel()]), shard.group).item()
    if k <= 0:
        return torch.zeros(0, dtype=torch.long, device=scores.device)
    if k >= n:
        return torch.arange(scores.numel(), device=scores.device)
    keys, width = _keys(scores.detach())
    positions = torch.arange(keys.numel(), device=keys.device)
    chosen: list[Tensor] = []
    needed = k
    tied_total = 0
    for shift in range(width - 8, -1, -8):
        # The top byte holds the sign: shifted arithmetically, it runs -128..127.
        top = shift == width - 8
        buckets = (keys >> shift) + 128 if top else (keys >> shift) & 0xFF
        hist = _all_reduce(torch.bincount(buckets, minlength=_BINS), shard.group)
        from_top = hist.flip(0).cumsum(0)
        j = _BINS - 1 - int(torch.searchsorted(from_top, needed))
        needed -= int(from_top[_BINS - 1 - j]) - int(hist[j])
        above = buckets > j
        chosen.append(positions[above])
        inside = buckets == j
        keys, positions = keys[inside], positions[inside]
        tied_total = int(hist[j])
    # `positions` now holds this shard's scores equal to the k-th highest one.
    if tied_total > needed:
        mine = _sendable(torch.tensor([positions.numel()]))
        counts = [torch.zeros_like(mine) for _ in range(_world(shard))]
        _count(mine)
        dist.all_gather(counts, mine, group=shard.group)
        start = sum(int(c) for c in counts[: dist.get_rank(shard.group)])
        draw = torch.randperm(tied_total, generator=generator)[:needed]
        draw = draw.to(positions.device)
        ours = draw[(draw >= start) & (draw < start + positions.numel())] - start
        positions = positions[ours]
    chosen.append(positions)
    return torch.sort(torch.cat(chosen)).values


def _world(shard: Shard) -> int:
    return dist.get_world_size(shard.group)


@contextmanager
def _random_scores_for(shard: Shard) -> Iterator[None]:
    token = base.SHARD.set((shard.offset, shard.total))
    try:
        yield
    finally:
        base.SHARD.reset(token)


def update_sharded(
    policy: base.Policy,
    weight: Tensor,
    mask: Tensor,
    grad: Tensor | None,
    n_drop: int,
    generator: torch.Generator,
    shard: Shard,
    *,
    n_active: int,
    n_grow: int | None = None,
) -> Tensor:
    """:func:`sparsetorch.policies.base.update_mask` on this rank's shard.

    ``weight`` and ``mask`` are the local shards, ``grad`` the local shard of
    the dense gradient; ``n_active``, ``n_drop`` and ``n_grow`` count over the
    whole tensor. Returns the new local mask shard: together, the shards are
    the unsharded update's mask.

    Raises:
        FloatingPointError: a score read by the update is NaN or infinite on
            any rank (raised on every rank).
    """
    with _random_scores_for(shard):
        new, _ = base._update_mask(
            policy,
            weight,
            mask,
            grad,
            n_drop,
            generator,
            n_active=n_active,
            active=base._nonzero(mask.flatten()),
            n_grow=n_grow,
            select=functools.partial(top_sharded, shard=shard),
            check_finite=functools.partial(_check_finite_everywhere, shard=shard),
        )
    return new


def _check_finite_everywhere(
    scores: Tensor, kind: str, policy: str, skip: Tensor | None = None, *, shard: Shard
) -> None:
    """:func:`base._check_finite` over all shards: every rank raises or none."""
    bad = ~torch.isfinite(scores)
    if skip is not None:
        bad[skip] = False
    count = _all_reduce(bad.sum().view(1), shard.group).item()
    if count:
        raise FloatingPointError(
            f"{policy}.{kind}_score gave {count} NaN/inf value(s); the update would "
            "pick them silently."
        )


def sum_over_ranks(counts: Tensor) -> Tensor:
    """``counts`` summed over every rank (the shards' counts: the whole tensor's)."""
    return _all_reduce(counts.clone(), None)


def local_rows(fqn: str, whole: Tensor, param: Tensor) -> Tensor:
    """This rank's rows of ``whole``, a tensor of the sharded ``param``'s shape."""
    shard = shard_of(fqn, param)
    rows = local(param).shape[0]
    first = shard.offset // max(1, math.prod(param.shape[1:]))
    return whole[first : first + rows].clone()


def like_rows(packed: Tensor, param: Tensor) -> Tensor:
    """``packed`` (this shard's rows of a per-row encoding) as a DTensor sharded
    like ``param``: ``torch.distributed.checkpoint`` then reshards it by rows."""
    module = _dtensor_module()
    rows = param.shape[0]
    shape = (rows, *packed.shape[1:])
    return module.DTensor.from_local(  # type: ignore[no-any-return]
        packed,
        param.device_mesh,  # type: ignore[attr-defined]
        param.placements,  # type: ignore[attr-defined]
        shape=torch.Size(shape),
        stride=torch.empty(shape, device="meta").stride(),
        run_check=False,
    )
