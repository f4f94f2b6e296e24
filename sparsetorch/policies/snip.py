"""SNIP: one-shot masks at init by connection sensitivity (Lee et al. 2019)."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

import torch
from torch import Tensor

from sparsetorch import _distributed
from sparsetorch.policies.base import Policy, _top, register_policy

if TYPE_CHECKING:
    from sparsetorch.topology import Topology

__all__ = ["SNIP", "sensitivity_masks"]


@register_policy("snip")
@dataclass(frozen=True, kw_only=True)
class SNIP(Policy):
    r"""Single-shot network pruning: keep the largest ``|w * dL/dw|`` at init.

    Lee et al. 2019, "SNIP: Single-shot Network Pruning based on Connection
    Sensitivity", https://arxiv.org/abs/1810.02340. The masks are chosen once,
    before training, by :meth:`Sparsifier.prune_at_init
    <sparsetorch.Sparsifier.prune_at_init>` from the connection sensitivity

    .. math::
        s_j = \left| w_j \, \frac{\partial L}{\partial w_j} \right|

    at the initial (dense) weights, with the gradient of the loss summed over
    the batches given (one batch in the paper; several act as one larger
    batch); the masks then stay fixed. The model is dense from ``sparsify``
    until then, and training refuses to start before it.

    Args:
        global_threshold: keep the ``K`` highest sensitivities over all
            tensors together, as the paper does (``K``: the total active
            count the distribution allocates, so the overall sparsity is
            ``sparsity``; each tensor's own count follows from the scores).
            ``False``: keep each tensor's count from ``distribution``.
            Default: ``True``.

    Example::

        >>> import torch
        >>> import sparsetorch as st
        >>> model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(),
        ...                             torch.nn.Linear(16, 4))
        >>> sparsifier = st.sparsify(model, policy="snip", sparsity=0.75)
        >>> x, y = torch.randn(32, 8), torch.randint(0, 4, (32,))
        >>> loss = torch.nn.functional.cross_entropy
        >>> sparsifier.prune_at_init(lambda b: loss(model(b[0]), b[1]), [(x, y)])
        >>> sum(sparsifier.topology.targets.values())
        48
    """

    dynamic: ClassVar[bool] = False

    global_threshold: bool = True

    def __post_init__(self) -> None:
        if not isinstance(self.global_threshold, bool):
            raise TypeError(
                f"global_threshold must be True or False, got "
                f"{self.global_threshold!r}."
            )

    def initial_sparsities(self, sparsities: Mapping[str, float]) -> dict[str, float]:
        """Dense: the sensitivities are measured on the whole network."""
        return dict.fromkeys(sparsities, 0.0)

    def saliency(self, weight: Tensor, grad: Tensor) -> Tensor:
        """The connection sensitivity ``|weight * grad|``."""
        return (weight.detach() * grad).abs()

    def grow_score(
        self,
        weight: Tensor,
        mask: Tensor,
        grad: Tensor | None,
        generator: torch.Generator | None = None,
    ) -> Tensor:
        """Prefer the current mask: after pruning at init, masks never move."""
        return mask.to(weight.dtype)


def sensitivity_masks(
    policy: SNIP,
    topology: Topology,
    loss_fn: Callable[[Any], Tensor],
    batches: Iterable[Any],
    generator: torch.Generator,
) -> dict[str, Tensor]:
    """SNIP's new masks: the highest ``|w * dL/dw|`` over ``batches``.

    The computation behind :meth:`Sparsifier.prune_at_init
    <sparsetorch.Sparsifier.prune_at_init>` (see there): the gradients are
    summed over the batches and averaged over ranks; the model's buffers are
    put back; nothing else changes.

    Raises:
        ValueError: ``batches`` is empty, or ``loss_fn`` gave no scalar.
    """
    from sparsetorch.structure import select_top

    params, masks = topology.params, topology.masks
    keep = {id(m) for m in masks.values()}
    buffers = [
        (b, b.detach().clone()) for b in topology.model.buffers() if id(b) not in keep
    ]
    grads: dict[str, Tensor] = {
        fqn: torch.zeros_like(p, memory_format=torch.contiguous_format)
        for fqn, p in params.items()
    }
    count = 0
    try:
        for batch in batches:
            loss = loss_fn(batch)
            if not isinstance(loss, Tensor) or loss.numel() != 1:
                raise ValueError(
                    "prune_at_init's loss_fn must return a scalar tensor, got "
                    f"{type(loss).__name__}"
                    f"{tuple(loss.shape) if isinstance(loss, Tensor) else ''}."
                )
            found = torch.autograd.grad(loss, list(params.values()), allow_unused=True)
            for grad, fqn in zip(found, params, strict=True):
                if grad is not None:
                    grads[fqn].add_(grad)
            count += 1
    finally:
        with torch.no_grad():
            for buffer, value in buffers:
                buffer.copy_(value)
    if count == 0:
        raise ValueError(
            "prune_at_init needs at least one batch; got none.\nPass e.g. "
            "[next(iter(loader))]."
        )
    _distributed.average_(list(grads.values()))
    with torch.no_grad():
        scores = {
            fqn: policy.saliency(params[fqn], grads[fqn]).flatten() for fqn in params
        }
    targets = topology.final_targets
    new_masks: dict[str, Tensor] = {}
    if policy.global_threshold:
        device = next(iter(scores.values())).device
        flat = torch.cat([s.float().to(device) for s in scores.values()])
        chosen = _top(flat, sum(targets.values()), generator)
        picked = torch.zeros(flat.numel(), dtype=torch.bool, device=device)
        picked[chosen] = True
        start = 0
        for fqn, score in scores.items():
            part = picked[start : start + score.numel()]
            start += score.numel()
            new_masks[fqn] = part.view_as(masks[fqn]).to(masks[fqn].device)
        return new_masks
    layouts = topology.layouts
    for fqn, score in scores.items():
        if fqn in layouts:  # each group's quota of highest scores
            new_masks[fqn] = select_top(
                score.view_as(masks[fqn]), layouts[fqn], generator
            )
            continue
        new = torch.zeros_like(score, dtype=torch.bool)
        new[_top(score, targets[fqn], generator)] = True
        new_masks[fqn] = new.view_as(masks[fqn])
    return new_masks
