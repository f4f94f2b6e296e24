"""The mask parametrization registered on every sparsified weight."""

from __future__ import annotations

import functools
import sys
import types
import weakref
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

from sparsetorch._stash import Stash

_np: types.ModuleType | None
try:
    import numpy as _np
except ImportError:  # pragma: no cover - torch works without numpy
    _np = None

__all__ = ["MaskParametrization"]

# dtypes that numpy multiplies by a uint8 mask without changing them.
_NUMPY_DTYPES = (torch.float32, torch.float64, torch.float16)


def local(tensor: Tensor) -> Tensor:
    """The local shard of a DTensor (FSDP2's sharded parameters), else ``tensor``.

    The shard shares the DTensor's memory: writing it writes the DTensor.
    """
    dtensor = sys.modules.get("torch.distributed.tensor")
    if dtensor is not None and isinstance(tensor, dtensor.DTensor):
        return tensor._local_tensor  # type: ignore[no-any-return]
    return tensor


def _mask_(tensor: Tensor, mask: Tensor) -> None:
    """``tensor *= mask`` in place, for a bool ``mask`` of ``tensor``'s shape.

    DTensors (FSDP2's shards) are masked shard by shard, with the mask's shard.

    On the CPU numpy does it in one pass, converting the mask in small cached
    blocks. ``torch.mul_`` with a bool or uint8 mask first converts the whole
    mask into a weight-sized float temporary (fresh memory: page faults every
    time), which made masking the gradient 3-5x slower than a float multiply.
    """
    tensor, mask = local(tensor), local(mask)
    if (
        _np is not None
        and tensor.device.type == "cpu"
        and tensor.dtype in _NUMPY_DTYPES
        and tensor.layout == torch.strided
        and tensor.is_contiguous()
        and mask.is_contiguous()
        and not tensor.is_conj()
        and not tensor.is_neg()
    ):
        target = tensor.detach()  # the same memory and version counter
        array = target.numpy()
        _np.multiply(array, mask.numpy().view(_np.uint8), out=array)
        torch.autograd.graph.increment_version(target)
    else:
        with torch.no_grad():
            tensor.mul_(mask.view(torch.uint8))


class MaskParametrization(nn.Module):
    r"""Keep a weight exactly zero outside a boolean mask.

    Registered with :func:`torch.nn.utils.parametrize.register_parametrization` on
    the weight it masks. The stored parameter (``parametrizations.weight.original``)
    is kept zero outside the mask by every path that writes it through
    sparsetorch (sparsifying, every topology update, loading a state dict), so the
    forward hands the stored tensor through unchanged: no second weight-sized
    tensor is made. The gradient is masked in place right after it is accumulated
    into ``original.grad``, so optimizers, gradient clipping and DDP only ever see
    the masked gradient.

    While :attr:`capturing` is set, the *dense* gradient (the gradient with respect
    to the effective weight, before masking) is also summed into
    :attr:`dense_grad`, over all backward passes of one optimizer step. RigL grows
    where it is largest. The sum restarts whenever ``original.grad`` was reset
    since the last capture (``zero_grad()``, or a step that a
    :class:`torch.amp.GradScaler` skipped), so it always matches the gradient the
    optimizer is about to use.

    Args:
        mask: boolean tensor of the weight's shape; ``True`` marks active weights.

    Example::

        >>> import torch
        >>> from torch.nn.utils import parametrize
        >>> layer = torch.nn.Linear(3, 2)
        >>> mask = torch.tensor([[True, False, True], [False, True, False]])
        >>> with torch.no_grad():
        ...     _ = layer.weight.mul_(mask)
        >>> p = MaskParametrization(mask)
        >>> _ = parametrize.register_parametrization(layer, "weight", p)
        >>> p.attach(layer.parametrizations.weight.original)
        >>> layer(torch.ones(1, 3)).sum().backward()
        >>> layer.parametrizations.weight.original.grad
        tensor([[1., 0., 1.],
                [0., 1., 0.]])
    """

    mask: Tensor

    def __init__(self, mask: Tensor) -> None:
        super().__init__()
        if mask.dtype != torch.bool:
            raise TypeError(
                f"MaskParametrization needs a torch.bool mask, got {mask.dtype}.\n"
                "Pass `mask.bool()`."
            )
        self.register_buffer("mask", mask, persistent=False)
        self.capturing = False
        self.accumulate_across_steps = False
        self.dense_grad: Tensor | None = None
        self.stale = False
        #: Set once FSDP2 sharded the stored weight (``sparsetorch._fsdp``):
        #: :attr:`mask` is then a DTensor sharded like it, the forward hands
        #: FSDP's all-gathered weight through (its shards are zero outside the
        #: mask), and the gradient is masked shard by shard after FSDP's
        #: reduce-scatter.
        self.sharded = False
        #: Keeps what :meth:`remask_shard` cuts, until the sparsifier's masks
        #: are loaded (set with :attr:`sharded`).
        self.stash: Stash | None = None
        self._param: weakref.ReferenceType[Tensor] | None = None
        self._handles: list[RemovableHandle] = []
        self._grad_token: tuple[weakref.ReferenceType[Tensor], int] | None = None
        self._masked_grad: tuple[int, int] | None = None
        #: The sorted flat positions of the mask's active entries, with the mask
        #: and version they describe; kept only while sparse execution holds a
        #: compressed structure of this mask (it shares that memory). An update
        #: refreshes them, so neither the update nor the next rebuild searches
        #: the mask. ``None`` otherwise: mask mode keeps nothing but the mask.
        self.active: tuple[weakref.ReferenceType[Tensor], int, Tensor] | None = None

    def active_positions(self) -> Tensor | None:
        """The sorted flat positions of the active entries, if known for this mask."""
        if self.active is None:
            return None
        of, version, positions = self.active
        mask = self.mask
        return positions if of() is mask and version == mask._version else None

    def keep_active_positions(self, positions: Tensor) -> None:
        """Record ``positions`` as the current mask's sorted active positions."""
        self.active = (weakref.ref(self.mask), self.mask._version, positions)

    def forward(self, X: Tensor) -> Tensor:
        if self.sharded or local(X) is not X:
            # FSDP's all-gathered copy of shards kept zero outside the mask, or
            # (module.weight read outside the forward) the sharded DTensor itself.
            return X
        if not torch.compiler.is_compiling():
            param = None if self._param is None else self._param()
            if X is not param:
                if param is not None or not _is_leaf_parameter(X):
                    # Another tensor stands in for the stored weight
                    # (torch.func.functional_call, a torch.func transform, MAML's
                    # computed weights): mask it out of place, so the output and
                    # the gradient reaching it are masked, and leave the hooks on
                    # the stored weight.
                    return X * self.mask
                self.attach(X)  # a copy's first forward: adopt its stored weight
        if self.stale:
            # Masks or a state dict were loaded since the masks were last applied.
            with torch.no_grad():
                X.mul_(self.mask)
            self.stale = False
        return X

    @torch.no_grad()
    def remask_shard(self) -> None:
        """Mask the stored weight's shard now (FSDP2), keeping what it cuts.

        Under FSDP2 the forward sees only FSDP's all-gathered copy, so a load
        cannot be masked there: the shard is masked as soon as it is loaded,
        and the values cut are kept in :attr:`stash`, which a
        ``sparsifier.load_state_dict`` next puts back before applying the
        loaded masks (so the load order does not matter).
        """
        param = None if self._param is None else self._param()
        if param is not None:
            weight, mask = local(param), local(self.mask)
            if self.stash is None:
                _mask_(weight, mask)
            else:
                self.stash.keep(weight, mask, functools.partial(_mask_, weight, mask))
        self.stale = False

    def right_inverse(self, value: Tensor) -> Tensor:
        """Refuse ``module.weight = tensor`` on a sparsified weight (once attached).

        Registration calls this once, before :meth:`attach`: then the value
        passes through.
        """
        if self._param is None:
            return value
        raise RuntimeError(
            "Cannot assign a new tensor to a sparsified weight (module.weight = "
            "tensor, or torch.func.functional_call under the weight's dense "
            "name): sparsetorch keeps the stored weight and its mask in step.\n"
            "Write into it in place instead (with torch.no_grad(): "
            "module.weight.copy_(tensor), then sparsifier.apply_masks()); for "
            "functional_call, pass the tensor under the stored name "
            "'<module>.parametrizations.<name>.original' (the key in "
            "model.named_parameters())."
        )

    def attach(self, param: Tensor) -> None:
        """Install the gradient hooks on ``param``, the stored weight.

        Called when sparsifying, by a copy (:func:`copy.deepcopy`) for its own
        stored weight, and after ``load_state_dict(..., assign=True)`` put a new
        tensor in place of the stored weight.
        """
        self.detach()
        self._param = weakref.ref(param)
        if param.requires_grad:
            ref = weakref.ref(self)
            self._handles = [
                param.register_hook(_CaptureHook(ref)),  # type: ignore[no-untyped-call]
                param.register_post_accumulate_grad_hook(  # type: ignore[no-untyped-call]
                    _MaskGradHook(ref)
                ),
            ]

    def detach(self) -> None:
        """Remove the gradient hooks installed by :meth:`attach`."""
        for handle in self._handles:
            handle.remove()
        self._handles = []
        self._param = None
        self.release()

    def mark_grad_masked(self, grad: Tensor | None) -> None:
        """Say that ``grad``, about to be accumulated, is zero outside the mask.

        Sparse execution (``sparsetorch.execution``) computes the weight gradient
        only at active positions. If ``.grad`` is exactly that tensor when the
        post-accumulate hook runs next (same memory, not written since: nothing
        else was summed into it), the hook skips its masking pass; otherwise it
        masks as always. ``None`` forgets a mark whose gradient was never
        accumulated (the layer's next forward does that).
        """
        self._masked_grad = None if grad is None else (grad.data_ptr(), grad._version)

    def release(self) -> None:
        """Drop the captured dense gradient."""
        self.dense_grad = None
        self._grad_token = None

    def extra_repr(self) -> str:
        mask = local(self.mask)
        active = int(mask.sum())
        if self.sharded:
            return (
                f"shape={tuple(self.mask.shape)}, sharded, this shard: "
                f"active={active}/{mask.numel()}"
            )
        return f"shape={tuple(self.mask.shape)}, active={active}/{self.mask.numel()}"

    def __deepcopy__(self, memo: dict[int, Any]) -> MaskParametrization:
        replica = MaskParametrization(self.mask.clone())
        memo[id(self)] = replica
        replica.stale = self.stale
        replica.training = self.training
        # Copying a module copies its stored weight before this parametrization
        # (``_parameters`` precede ``_modules``): adopt that copy. A replica
        # copied on its own adopts the first leaf weight it is called with.
        param = None if self._param is None else self._param()
        copied = memo.get(id(param)) if param is not None else None
        if isinstance(copied, Tensor):
            replica.attach(copied)
        return replica


def _is_leaf_parameter(tensor: Tensor) -> bool:
    return isinstance(tensor, nn.Parameter) and tensor.is_leaf


class _CaptureHook:
    """Tensor hook on the stored weight: sums the dense gradient while capturing."""

    def __init__(self, owner: weakref.ReferenceType[MaskParametrization]) -> None:
        self.owner = owner

    def __call__(self, grad: Tensor) -> None:
        owner = self.owner()
        if owner is None or not owner.capturing or owner._param is None:
            return
        param = owner._param()
        current = None if param is None else param.grad
        token = owner._grad_token
        fresh = owner.dense_grad is None or (
            not owner.accumulate_across_steps
            and (
                current is None
                or token is None
                or (
                    (token[0]() is not current or token[1] != current._version)
                    # Changed since our hook masked it: reset by zero_grad (all
                    # zeros), or overwritten by DDP's all-reduce (not zeros).
                    and not bool(current.any())
                )
            )
        )
        with torch.no_grad():
            if fresh:
                owner.dense_grad = grad.detach().clone()
            else:
                assert owner.dense_grad is not None
                owner.dense_grad.add_(grad)


class _MaskGradHook:
    """Post-accumulate-grad hook on the stored weight: masks ``.grad`` in place."""

    def __init__(self, owner: weakref.ReferenceType[MaskParametrization]) -> None:
        self.owner = owner

    def __call__(self, param: Tensor) -> None:
        owner = self.owner()
        if owner is None or param.grad is None:
            return
        if owner.sharded:
            _mask_sharded_grad(owner, param)
            return
        token = owner._masked_grad
        if token is not None:  # (nn.Module.__setattr__ is slow: only when needed)
            owner._masked_grad = None
        if token != (param.grad.data_ptr(), param.grad._version):
            # (else .grad is the masked gradient itself, untouched)
            _mask_(param.grad, owner.mask)
        if owner.capturing:
            owner._grad_token = (weakref.ref(param.grad), param.grad._version)


@torch.no_grad()
def _mask_sharded_grad(owner: MaskParametrization, param: Tensor) -> None:
    """Mask a gradient shard that FSDP2 reduce-scattered into ``param.grad``.

    FSDP adds each backward's reduce-scattered gradient to the shard already
    there, then calls this hook. While capturing, the dense gradient summed over
    the backward passes of the step is kept: after an accumulation the shard
    holds the masked sum of the earlier passes plus the whole new gradient, so
    the dense sum is that plus the earlier passes' sum outside the mask.
    """
    assert param.grad is not None
    grad, mask = local(param.grad), local(owner.mask)
    if owner.capturing:
        token, dense = owner._grad_token, owner.dense_grad
        if dense is None:
            owner.dense_grad = grad.clone()
        elif token is not None and token[0]() is grad and grad._version == token[1] + 1:
            dense.masked_fill_(mask, 0).add_(grad)  # FSDP added to our masked shard
        elif owner.accumulate_across_steps:  # a new step's gradient (zero_grad)
            dense.add_(grad)
        else:
            owner.dense_grad = grad.clone()
    _mask_(grad, mask)
    if owner.capturing:
        owner._grad_token = (weakref.ref(grad), grad._version)
