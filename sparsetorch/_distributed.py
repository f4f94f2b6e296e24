"""What sparsetorch communicates under ``torch.distributed``: only at updates.

* ``sparsify`` broadcasts the initial masks and the generator state from rank 0,
  so every rank starts from the same topology and draws the same random numbers.
* At an update, the captured dense gradients are all-reduced to their mean over
  ranks, in fp32 buckets (4 bytes per masked weight). Every rank then computes
  the same new masks from the same weights, gradients and generator: masks are
  never sent again.
* Between updates sparsetorch sends nothing. The masks are buffers of
  :class:`~sparsetorch.MaskParametrization`, so :func:`keep_masks_local` names
  them in DistributedDataParallel's ignore list: DDP's per-forward buffer
  broadcast (``broadcast_buffers=True``) leaves them out.

See ``docs/distributed.md``.
"""

from __future__ import annotations

import sys
from collections.abc import Iterable, Mapping, Sequence

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel

__all__ = [
    "BUCKET_NUMEL",
    "average_",
    "broadcast_",
    "check_params_unsharded",
    "check_unsharded",
    "check_unwrapped",
    "keep_masks_local",
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


# -- wrappers -------------------------------------------------------------------


def check_unwrapped(model: nn.Module) -> None:
    """Raise unless ``model`` can be sparsified in this process group.

    Raises:
        RuntimeError: ``model`` is wrapped in DistributedDataParallel (sparsify
            first, then wrap), or sharded by FSDP (not supported).
    """
    if isinstance(model, DistributedDataParallel):
        raise RuntimeError(
            "Cannot sparsify a model already wrapped in DistributedDataParallel.\n"
            "Registering the masks re-creates each weight's gradient accumulator, "
            "which DDP hooked when it was built, so DDP would stop all-reducing "
            "those gradients.\n"
            "Sparsify first, then wrap: sparsifier = sparsify(model, optimizer, "
            "...); model = DistributedDataParallel(model)."
        )
    check_unsharded(model.named_modules(), model.named_parameters())


def keep_masks_local(model: nn.Module, masks: Iterable[Tensor]) -> list[str]:
    """Keep the mask buffers out of DistributedDataParallel's buffer broadcast.

    DDP broadcasts every module buffer from rank 0 before each forward
    (``broadcast_buffers=True``, the default). The masks are identical on every
    rank and change only at updates, which every rank computes alike, so they
    are added to ``model._ddp_params_and_buffers_to_ignore``, the list a
    ``DistributedDataParallel(model)`` built afterwards reads.

    Returns:
        The buffer names (relative to ``model``) added to the ignore list.
    """
    ids = {id(m) for m in masks}
    names = [name for name, b in model.named_buffers() if id(b) in ids]
    ignored = list(getattr(model, "_ddp_params_and_buffers_to_ignore", ()))
    ignored += [n for n in names if n not in ignored]
    ignore = DistributedDataParallel._set_params_and_buffers_to_ignore_for_model
    ignore(model, ignored)  # type: ignore[no-untyped-call]
    return names


def check_unsharded(
    modules: Iterable[tuple[str, nn.Module]], params: Iterable[tuple[str, Tensor]]
) -> None:
    """Raise if a module is FSDP-wrapped or a parameter is a sharded DTensor.

    Raises:
        RuntimeError: naming the module or parameter, why, and what works.
    """
    fsdp = sys.modules.get("torch.distributed.fsdp")
    if fsdp is not None:
        wrappers = (fsdp.FSDPModule, fsdp.FullyShardedDataParallel)
        for name, module in modules:
            if isinstance(module, wrappers):
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


def check_params_unsharded(params: Mapping[str, Tensor]) -> None:
    """:func:`check_unsharded` for the stored weights of a topology."""
    check_unsharded((), params.items())


def _sharded_message(what: str) -> str:
    return (
        f"sparsetorch does not support sharded parameters (FSDP, fully_shard, "
        f"DTensor): {what}.\n"
        "Its masks, topology updates (a top-k over each whole weight) and "
        "optimizer-state resets work on whole local tensors, and a sharded weight "
        "exists whole only inside FSDP's forward and backward (an all-gathered "
        "copy that FSDP discards, so writes to it are lost).\n"
        "Train with DistributedDataParallel instead: sparsify(model, ...), then "
        "DistributedDataParallel(model). See docs/distributed.md."
    )
