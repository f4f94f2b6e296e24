"""What sparsetorch communicates under ``torch.distributed``: only at updates."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.distributed as dist
from torch import Tensor

__all__ = ["average_", "broadcast_"]


def _world_size() -> int:
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size()
    return 1


def average_(tensors: Sequence[Tensor]) -> None:
    """All-reduce ``tensors`` in place to their mean over ranks (no-op alone)."""
    world = _world_size()
    if world == 1 or not tensors:
        return
    flat = torch.cat([t.flatten().float() for t in tensors])
    dist.all_reduce(flat)
    flat /= world
    offset = 0
    for t in tensors:
        n = t.numel()
        t.copy_(flat[offset : offset + n].view_as(t))
        offset += n


def broadcast_(tensors: Sequence[Tensor], src: int = 0) -> None:
    """Broadcast ``tensors`` in place from rank ``src`` (no-op alone)."""
    if _world_size() == 1:
        return
    for t in tensors:
        if t.dtype == torch.bool:
            buf = t.to(torch.uint8)
            dist.broadcast(buf, src)
            t.copy_(buf.bool())
        else:
            dist.broadcast(t, src)
