"""What sparsetorch communicates under ``torch.distributed``: only at updates.

* ``sparsify`` broadcasts the initial masks and the generator state from rank 0,
  so every rank starts from the same topology and draws the same random numbers.
* At an update, the captured dense gradients are all-reduced to their mean over
  ranks, in fp32 buckets (4 bytes per masked weight). Every rank then computes
  the same new masks from the same weights, gradients and generator: masks are
  never sent again.
* Also at an update, :func:`check_ranks_agree` all-reduces a 64-byte checksum
  of the masks and masked weights, and stops every rank if they differ.
* Between updates sparsetorch sends nothing. The masks are buffers of
  :class:`~sparsetorch.MaskParametrization`, so :func:`keep_masks_local` names
  them in DistributedDataParallel's ignore list: DDP's per-forward buffer
  broadcast (``broadcast_buffers=True``) leaves them out.
* A model already wrapped in DDP is sparsified through its ``.module``
  (:func:`unwrap`), and DDP's reducer is rebuilt over the parametrized weights
  (:func:`rebuild_reducer`).

See ``docs/distributed.md``.
"""

from __future__ import annotations

import sys
from collections.abc import Iterable, Mapping, Sequence

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel
from torch.nn.utils import parametrize

__all__ = [
    "BUCKET_NUMEL",
    "any_rank",
    "average_",
    "broadcast_",
    "check_params_unsharded",
    "check_ranks_agree",
    "check_unsharded",
    "check_unwrapped",
    "checksum",
    "keep_masks_local",
    "rebuild_reducer",
    "unwrap",
    "world_size",
]

#: Elements per all-reduce at an update (fp32: 25 MiB, DDP's default bucket).
BUCKET_NUMEL = 25 * 2**20 // 4


def world_size() -> int:
    """The default process group's size, or 1 outside ``torch.distributed``."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size()
    return 1


def average_(tensors: Sequence[Tensor], bucket_numel: int = BUCKET_NUMEL) -> None:
    """All-reduce ``tensors`` in place to their mean over ranks (no-op alone).

    The tensors are summed in fp32, whatever their dtype, in buckets of at most
    ``bucket_numel`` elements (a larger tensor is its own bucket), so at most one
    bucket's worth of extra memory is used. Every rank must pass tensors of the
    same shapes in the same order.
    """
    world = world_size()
    if world == 1 or not tensors:
        return
    bucket: list[Tensor] = []
    numel = 0
    for t in tensors:
        if bucket and numel + t.numel() > bucket_numel:
            _average_bucket(bucket, world)
            bucket, numel = [], 0
        bucket.append(t)
        numel += t.numel()
    _average_bucket(bucket, world)


def _average_bucket(tensors: list[Tensor], world: int) -> None:
    if len(tensors) == 1 and tensors[0].dtype == torch.float32:
        (t,) = tensors
        flat = t if t.is_contiguous() else t.contiguous()
        dist.all_reduce(flat)
        flat /= world
        if flat is not t:
            t.copy_(flat)
        return
    flat = torch.cat([t.detach().flatten().float() for t in tensors])
    dist.all_reduce(flat)
    flat /= world
    offset = 0
    for t in tensors:
        n = t.numel()
        t.copy_(flat[offset : offset + n].view_as(t))
        offset += n


def any_rank(flags: Sequence[bool]) -> list[bool]:
    """For each flag, whether it is true on any rank (itself alone).

    One all-reduce of ``len(flags)`` bytes; every rank must pass as many flags.
    """
    if world_size() == 1 or not flags:
        return list(flags)
    device = _comm_device()
    t = torch.tensor([int(f) for f in flags], dtype=torch.uint8, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return [bool(v) for v in t.tolist()]


def broadcast_(tensors: Sequence[Tensor], src: int = 0) -> None:
    """Broadcast ``tensors`` in place from rank ``src`` (no-op alone).

    Bool tensors travel as uint8. Under a CUDA-only backend (NCCL), CPU tensors
    (the generator state) travel through the current CUDA device.
    """
    if world_size() == 1:
        return
    device = _comm_device()
    for t in tensors:
        buf = t
        if t.dtype == torch.bool:
            buf = t.to(torch.uint8)
        if device is not None and buf.device.type == "cpu":
            buf = buf.to(device)
        dist.broadcast(buf, src)
        if buf is not t:
            t.copy_(buf)


def _comm_device() -> torch.device | None:
    """Where CPU tensors must go to be sent: a CUDA device under NCCL alone."""
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return None


# -- the guard against diverging ranks -----------------------------------------

_INT_OF_SIZE = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


#: Odd 64-bit multipliers (as signed int64) of the position hashes.
_MIX = (0x9E3779B97F4A7C15 - 2**64, 0xC2B2AE3D27D4EB4F - 2**64)


def _mix(positions: Tensor, k: int) -> Tensor:
    """A fixed scrambling of int64 ``positions`` (wrapping multiply, xor-shift)."""
    x = positions * k
    return (x ^ (x >> 32)) * k


def checksum(masks: Sequence[Tensor], weights: Sequence[Tensor]) -> Tensor:
    """Four int64 sums identifying ``masks`` and ``weights``: exact and cheap.

    The masks are read as one set of active positions, numbered across all
    masks in order: its size, and the sums of two scramblings of each
    position. The weights give the sum, over tensors ``i``, of ``2i + 1``
    times the sum of their elements' bit patterns read as integers. Integer
    sums wrap around identically on every rank and do not depend on the
    order of summation (unlike a float sum), so equal tensors give equal sums
    on any device and number of threads; tensors that differ almost surely
    give different ones.

    Example::

        >>> mask = torch.tensor([[True, False], [False, True]])
        >>> checksum([mask], [torch.zeros(2, 2)])[[0, 3]].tolist()
        [2, 0]
        >>> torch.equal(checksum([mask], [torch.zeros(2, 2)]),
        ...             checksum([mask.T.flip(0)], [torch.zeros(2, 2)]))
        False
    """
    sums = []
    offset = 0
    for mask in masks:
        p = mask.reshape(-1).nonzero().view(-1) + offset  # (n_active,) int64
        offset += mask.numel()
        sums.append(
            torch.stack([p.new_tensor(p.numel()), *(_mix(p, k).sum() for k in _MIX)])
        )
    total = torch.zeros(4, dtype=torch.int64)
    if sums:
        total[:3] = torch.stack(sums).sum(0).cpu()
    for i, weight in enumerate(weights):
        bits = weight.detach().contiguous().view(_INT_OF_SIZE[weight.element_size()])
        total[3] += int(bits.sum(dtype=torch.int64)) * (2 * i + 1)
    return total


def check_ranks_agree(
    masks: Mapping[str, Tensor], weights: Mapping[str, Tensor], step: int
) -> None:
    """Raise if the masks or the masked weights differ between ranks (no-op alone).

    Called at every topology update. One all-reduce of 8 int64 (64 bytes): the
    :func:`checksum` and its negation, reduced with ``MAX``, give every rank
    the largest and the smallest checksum, so every rank reaches the same
    verdict and raises together (none is left waiting in a collective).

    Raises:
        RuntimeError: they differ; the message names the usual cause (DDP not
            all-reducing the masked gradients, ``find_unused_parameters``) and
            the order that works.
    """
    if world_size() == 1 or not masks:
        return
    mine = checksum(list(masks.values()), [weights[fqn] for fqn in masks])
    device = _comm_device()
    both = torch.cat([mine, -mine])
    reduced = both if device is None else both.to(device)
    dist.all_reduce(reduced, op=dist.ReduceOp.MAX)
    reduced = reduced.cpu()
    high, low = reduced[:4], -reduced[4:]
    if torch.equal(high, low):
        return
    what = "masks" if not torch.equal(high[:3], low[:3]) else "masked weights"
    raise RuntimeError(
        f"The {what} differ between ranks at the topology update of step {step}: "
        "the ranks no longer train the same model.\n"
        f"checksum on rank {dist.get_rank()}: {mine.tolist()}; largest over "
        f"ranks: {high.tolist()}; smallest: {low.tolist()}\n"
        "Usually DistributedDataParallel did not all-reduce the masked weights' "
        "gradients, so each rank's weights (and then its masks) drifted: the "
        "model was wrapped in DistributedDataParallel before sparsify() was "
        "called on the inner module (a Lightning or Accelerate model, say). "
        "find_unused_parameters=True does not fix that: it only silences DDP's "
        "error, and each rank keeps its own gradients.\n"
        "Use one of the orders that work: sparsifier = sparsify(model, "
        "optimizer, ...), then model = DistributedDataParallel(model); or pass "
        "the wrapper itself: sparsify(ddp_model, optimizer, ...). Every rank "
        "must also load the same checkpoint."
    )


# -- wrappers -------------------------------------------------------------------


def unwrap(model: nn.Module) -> tuple[nn.Module, DistributedDataParallel | None]:
    """The module to sparsify, and the DistributedDataParallel around it if any.

    A model already wrapped in DDP is sparsified through ``model.module``;
    :func:`keep_masks_local` then rebuilds DDP's reducer (see
    :func:`rebuild_reducer`). Checks everything before anything changes.

    Raises:
        RuntimeError: a DDP option whose gradient reduction sparsetorch cannot
            rebuild after wrapping, a DDP or FSDP wrapper inside the model, or
            sharded parameters. Nothing has changed.
    """
    ddp = None
    if isinstance(model, DistributedDataParallel):
        _check_rebuildable(model)
        ddp, model = model, model.module
    check_unwrapped(model)
    return model, ddp


def _check_rebuildable(ddp: DistributedDataParallel) -> None:
    unsupported = [
        (option, why)
        for option, why, used in (
            (
                "mixed_precision",
                "it keeps low-precision copies of the parameters",
                ddp.mixed_precision is not None,
            ),
            (
                "delay_all_reduce_named_params",
                "it reduces those parameters outside the reducer",
                bool(ddp._delay_all_reduce_params),
            ),
            (
                "the Python reducer (compiled autograd)",
                "it reduces outside the C++ reducer",
                bool(getattr(ddp, "_use_python_reducer", False)),
            ),
        )
        if used
    ]
    if unsupported:
        option, why = unsupported[0]
        raise RuntimeError(
            "Cannot sparsify this DistributedDataParallel model after wrapping: "
            f"it uses {option}, and {why}, which sparsetorch cannot re-hook.\n"
            "Sparsify first, then wrap: sparsifier = sparsify(model, optimizer, "
            "...); model = DistributedDataParallel(model, ...)."
        )


def check_unwrapped(model: nn.Module) -> None:
    """Raise unless ``model`` (a DDP wrapper's ``.module``, say) can be sparsified.

    Raises:
        RuntimeError: a submodule of ``model`` is wrapped in
            DistributedDataParallel (pass the wrapper itself, or sparsify before
            wrapping), or ``model`` is sharded by FSDP (not supported).
    """
    for name, module in model.named_modules():
        if isinstance(module, DistributedDataParallel):
            raise RuntimeError(
                f"Cannot sparsify a model holding a DistributedDataParallel "
                f"wrapper ({name or '<root>'!r}): sparsetorch rebuilds the "
                "gradient reduction only of the wrapper passed to sparsify "
                "itself.\nPass that wrapper to sparsify(ddp_model, ...), or "
                "sparsify before wrapping: sparsifier = sparsify(model, "
                "optimizer, ...); model = DistributedDataParallel(model)."
            )
    check_unsharded(model.named_modules(), model.named_parameters())


def keep_masks_local(
    model: nn.Module,
    masks: Iterable[Tensor],
    ddp: DistributedDataParallel | None = None,
) -> list[str]:
    """Keep the mask buffers out of DistributedDataParallel's buffer broadcast.

    DDP broadcasts every module buffer from rank 0 before each forward
    (``broadcast_buffers=True``, the default). The masks are identical on every
    rank and change only at updates, which every rank computes alike, so they
    are added to ``model._ddp_params_and_buffers_to_ignore``, the list a
    ``DistributedDataParallel(model)`` built afterwards reads. With ``ddp``,
    the wrapper already around ``model``, its reducer is rebuilt as well
    (:func:`rebuild_reducer`).

    Returns:
        The buffer names (relative to ``model``) added to the ignore list.
    """
    ids = {id(m) for m in masks}
    names = [name for name, b in model.named_buffers() if id(b) in ids]
    ignored = list(getattr(model, "_ddp_params_and_buffers_to_ignore", ()))
    ignored += [n for n in names if n not in ignored]
    ignore = DistributedDataParallel._set_params_and_buffers_to_ignore_for_model
    ignore(model, ignored)  # type: ignore[no-untyped-call]
    if ddp is not None:
        rebuild_reducer(ddp)
    return names


def rebuild_reducer(ddp: DistributedDataParallel) -> None:
    """Make ``ddp`` all-reduce the gradients of weights sparsified after wrapping.

    DDP's reducer hooks each parameter's gradient accumulator when it is built.
    Registering a parametrization calls ``original.set_(original)``, which
    gives the parameter a new accumulator (the parameter object stays the
    same), so the old hooks never fire again: DDP would wait for those
    gradients forever ("Expected to have finished reduction in the prior
    iteration") or, with ``find_unused_parameters=True``, treat them as unused
    and leave each rank with its own gradients. This builds a new reducer over
    the parametrized model the way DDP does when it is unpickled, with the
    ignore list carried over to the parameters' new names plus the mask
    buffers (so they are not broadcast), ``static_graph`` and the
    communication hooks registered with ``register_comm_hook``.

    Every rank must call it, before the next forward. A model that nothing was
    registered on since wrapping keeps working: the reducer is rebuilt over
    the same parameters.
    """
    module = ddp.module
    ignore = set(ddp.parameters_to_ignore)
    ignore |= set(getattr(module, "_ddp_params_and_buffers_to_ignore", ()))
    for module_fqn, child in module.named_modules():
        if not isinstance(child, parametrize.ParametrizationList):
            continue
        # DDP names parameters f"{module_name}.{param_name}" (".weight" at the
        # root) and named_parameters() "weight": carry either spelling over.
        owner, _, tensor_name = module_fqn.rpartition(".parametrizations.")
        if not owner and module_fqn.startswith("parametrizations."):
            tensor_name = module_fqn.removeprefix("parametrizations.")
        old = {f"{owner}.{tensor_name}", f"{owner}.{tensor_name}".lstrip(".")}
        if ignore & old:
            ignore |= {f"{module_fqn}.original", f"{module_fqn}.original".lstrip(".")}
    ddp.parameters_to_ignore = ignore
    ddp._remove_autograd_hooks()  # type: ignore[no-untyped-call]
    parameters, expect_sparse = ddp._build_params_for_reducer()  # type: ignore[no-untyped-call]
    names = ddp._build_debug_param_to_name_mapping(parameters)  # type: ignore[no-untyped-call]
    ddp._ddp_init_helper(  # type: ignore[no-untyped-call]
        parameters, expect_sparse, names, ddp.static_graph
    )
    if ddp.static_graph:
        ddp._static_graph_delay_allreduce_enqueued = False
        ddp.reducer._set_static_graph()
        assert ddp.logger is not None
        ddp.logger._set_static_graph()
    for hook, state in ddp._comm_hooks:
        dist._register_comm_hook(ddp.reducer, state, hook)  # type: ignore[attr-defined]
    ddp._has_rebuilt_buckets = False


def check_unsharded(
    modules: Iterable[tuple[str, nn.Module]], params: Iterable[tuple[str, Tensor]]
) -> None:
    """Raise if a module is FSDP-wrapped or a parameter is a sharded DTensor.

    For :func:`~sparsetorch.sparsify`: a model is sparsified whole, then sharded.

    Raises:
        RuntimeError: naming the module or parameter, why, and what works.
    """
    fsdp = sys.modules.get("torch.distributed.fsdp")
    if fsdp is not None:
        for name, module in modules:
            if isinstance(module, fsdp.FullyShardedDataParallel):
                raise RuntimeError(
                    f"Module {name or '<root>'!r} is wrapped in FSDP1 "
                    "(FullyShardedDataParallel), whose flat parameters sparsetorch "
                    "cannot mask.\nUse FSDP2: sparsify(model, ...) first, then "
                    "fully_shard(...) on its blocks and on the root. See "
                    "docs/distributed.md."
                )
            if isinstance(module, fsdp.FSDPModule):
                raise RuntimeError(
                    _sharded_message(
                        f"module {name or '<root>'!r} is a {type(module).__name__}"
                    )
                )
    tensor = sys.modules.get("torch.distributed.tensor")
    if tensor is not None:
        for name, param in params:
            if isinstance(param, tensor.DTensor):
                raise RuntimeError(
                    _sharded_message(
                        f"parameter {name!r} is a DTensor "
                        f"(placements {tuple(param.placements)})"
                    )
                )


def check_params_unsharded(params: Mapping[str, Tensor], what: str) -> None:
    """Raise if FSDP2 sharded the stored weights: ``what`` needs them whole."""
    tensor = sys.modules.get("torch.distributed.tensor")
    if tensor is None:
        return
    sharded = [fqn for fqn, p in params.items() if isinstance(p, tensor.DTensor)]
    if sharded:
        raise RuntimeError(
            f"{what} needs whole weights, but FSDP2 shards {sharded}.\nGather a "
            "full state dict instead: get_model_state_dict(model, options="
            "StateDictOptions(full_state_dict=True)) gives the dense keys, zero "
            "outside the masks; load it into an unsharded copy of the model."
        )


def _sharded_message(what: str) -> str:
    return (
        f"Cannot sparsify a model FSDP already shards: {what}.\n"
        "sparsify() registers its masks on whole weights, and fully_shard then "
        "shards them with their weights; FSDP2 holds references to the modules' "
        "parameters that a later parametrization would bypass.\nCall "
        "sparsify(model, ...) first, then fully_shard(...) on its blocks and "
        "on the root, then build the optimizer and "
        "sparsifier.attach_optimizer(optimizer). See docs/distributed.md."
    )
