"""Values that masking zeroed, kept until the tensors are next written.

``sparsify`` masks the stored weights right away, and attaching or loading an
optimizer masks its state right away, so every tensor is zero outside the masks
as soon as the call returns. A checkpoint's masks loaded next
(``sparsifier.load_state_dict``: "weights first, then sparsify, then the
sparsifier state", the order frameworks resume in) must not lose the trained
values those first masks cut: the :class:`Stash` keeps them, and puts them back
before the loaded masks are applied, for every tensor nothing has written since
(its version counter says so). The next optimizer step or topology update drops
it.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

__all__ = ["Stash"]


class Stash:
    """The values outside a mask of tensors masked in place, until they change."""

    def __init__(self) -> None:
        self._entries: list[tuple[Tensor, Tensor, Tensor, int]] = []

    def __bool__(self) -> bool:
        return bool(self._entries)

    @torch.no_grad()
    def keep(self, tensor: Tensor, keep: Tensor, reset: Callable[[], Any]) -> None:
        """Run ``reset`` (which rewrites ``tensor`` outside ``keep``), saving what
        it overwrites."""
        lost = ~keep
        values = tensor[lost]  # a copy: boolean indexing gathers
        reset()
        if bool(values.any()):
            self._entries.append((tensor, lost, values, tensor._version))

    @torch.no_grad()
    def restore(self) -> None:
        """Put the saved values back where nothing wrote since, and forget all."""
        for tensor, lost, values, version in self._entries:
            if tensor._version == version:
                tensor[lost] = values
        self._entries = []

    def clear(self) -> None:
        """Forget the saved values (the tensors have moved on)."""
        self._entries = []
