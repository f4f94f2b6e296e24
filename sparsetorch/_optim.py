"""Optimizer state kept in step with the masks: resets, wrappers, parameter order.

Every per-parameter state tensor of a masked weight's shape is reset outside the
mask: to zero for most of torch.optim's state (momentum, Adam's moments, ...), and
to its initial value where that is not zero (:data:`INITIAL_STATE`), so that a
weight grown later starts exactly as a fresh one would. The table of what each
optimizer keeps is in ``docs/reliability.md``.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import torch
from torch import Tensor

from sparsetorch._stash import Stash
from sparsetorch.parametrization import _mask_, local

__all__ = [
    "INITIAL_STATE",
    "NON_ELEMENTWISE",
    "fix_state_order",
    "is_state_init_step",
    "param_groups_of",
    "reset_state",
    "unwrap_optimizer",
]

#: ``(optimizer class, state key) -> initial value from the param group``, for
#: the state tensors that do not start at zero.
INITIAL_STATE: dict[tuple[type[torch.optim.Optimizer], str], Callable[[Any], float]] = {
    (torch.optim.Rprop, "step_size"): lambda group: float(group["lr"]),
    (torch.optim.Adagrad, "sum"): lambda group: float(
        group["initial_accumulator_value"]
    ),
}

#: Optimizers whose update of a weight reads other weights' state (Muon
#: orthogonalizes the whole momentum matrix): they write outside the masks at
#: every step, so sparsetorch re-masks the weights they step right after.
NON_ELEMENTWISE: tuple[type[torch.optim.Optimizer], ...] = tuple(
    cls for cls in (getattr(torch.optim, "Muon", None),) if cls is not None
)


def unwrap_optimizer(optimizer: object) -> torch.optim.Optimizer:
    """The torch optimizer inside a framework's wrapper (or ``optimizer`` itself).

    Follows ``.optimizer`` (Accelerate's ``AcceleratedOptimizer``, Hugging Face's
    wrappers) and ``._optimizer`` (Lightning's ``LightningOptimizer``).

    Raises:
        TypeError: no ``torch.optim.Optimizer`` is found.
    """
    seen = optimizer
    for _ in range(8):  # wrappers of wrappers, never a cycle
        # A wrapper may itself subclass Optimizer (AcceleratedOptimizer does)
        # without holding the state: prefer the optimizer it wraps.
        inner = getattr(seen, "optimizer", None)
        if not isinstance(inner, torch.optim.Optimizer):
            inner = getattr(seen, "_optimizer", None)
        if isinstance(inner, torch.optim.Optimizer) or (
            inner is not None and not isinstance(seen, torch.optim.Optimizer)
        ):
            seen = inner
            continue
        if isinstance(seen, torch.optim.Optimizer):
            return seen
        break
    raise TypeError(
        f"Expected a torch.optim.Optimizer (or a wrapper holding one as "
        f".optimizer or ._optimizer), got {type(optimizer).__name__}."
    )


def is_state_init_step(optimizer: torch.optim.Optimizer) -> bool:
    """Whether the step about to run only creates the optimizer's state.

    ``torch.distributed.checkpoint``'s ``get_optimizer_state_dict`` and
    ``set_optimizer_state_dict`` fill in the state of an optimizer that has none
    by one ``step()`` with every gradient zero and every learning rate 0 (so
    do frameworks built on them, such as Lightning's ModelParallelStrategy
    when it restores a checkpoint). That is not a training step: sparsetorch
    neither counts it nor lets it end anything a load is still to finish.
    """
    if optimizer.state:
        return False
    groups = optimizer.param_groups
    if not all(float(g.get("lr", 1.0)) == 0.0 for g in groups):
        return False
    grads = [p.grad for g in groups for p in g["params"] if p.grad is not None]
    return bool(grads) and not any(bool(local(grad).any()) for grad in grads)


def param_groups_of(optimizer: torch.optim.Optimizer) -> dict[int, dict[str, Any]]:
    """``id(param) -> its param group``."""
    return {id(p): g for g in optimizer.param_groups for p in g["params"]}


def reset_state(
    optimizer: torch.optim.Optimizer,
    param: Tensor,
    keep: Tensor,
    group: Mapping[str, Any] | None = None,
    stash: Stash | None = None,
) -> None:
    """Reset ``param``'s state tensors of its shape outside ``keep``, in place.

    Floating-point state is multiplied by the mask (one pass, and the sign of
    zeros stays what an uninterrupted run has, so resumes are bit-exact); state
    whose initial value is not zero (:data:`INITIAL_STATE`) gets that value.
    With ``stash``, the overwritten values are kept there.
    """
    state = optimizer.state.get(param)
    if not state:
        return
    if group is None:
        group = param_groups_of(optimizer)[id(param)]
    keep = local(keep)  # FSDP2: the shards of the state, masked with the mask's
    for key, value in state.items():
        if not isinstance(value, Tensor) or value.shape != param.shape:
            continue
        value = local(value)
        initial = INITIAL_STATE.get((type(optimizer), key))
        reset: Callable[[], Any]
        if initial is not None:
            fill = initial(group)
            reset = functools.partial(value.masked_fill_, ~keep, fill)
        elif value.is_floating_point():
            reset = functools.partial(_mask_, value, keep)
        else:
            reset = functools.partial(value.masked_fill_, ~keep, 0)
        if stash is None:
            reset()
        else:
            stash.keep(value, keep, reset)


def fix_state_order(
    optimizer: torch.optim.Optimizer, orders: Iterable[list[Tensor]]
) -> bool:
    """Re-key state loaded by position from an optimizer whose parameters were in
    another order.

    ``torch.optim.Optimizer.load_state_dict`` pairs saved and current parameters
    by position. An optimizer built over ``model.parameters()`` before
    ``sparsify`` lists a layer's weight before its bias; one built after lists
    the bias first (the weight moved into ``parametrizations``). When a state
    tensor does not fit its parameter's shape, each candidate order of
    ``orders`` (the model's parameters, in the order of another construction)
    is tried per param group; the first under which every state fits is used.

    A group that fits no order is left as loaded (optimizers whose state has
    other shapes than the parameters', such as Adafactor's factored moments,
    are never re-keyed).

    Returns:
        Whether the state was re-keyed.
    """
    fixed = False
    candidates = [list(o) for o in orders]
    for group in optimizer.param_groups:
        params = list(group["params"])
        if all(_fits(optimizer.state.get(p), p) for p in params):
            continue
        states = [optimizer.state.get(p) for p in params]
        members = {id(p) for p in params}
        for order in candidates:
            ranked = [p for p in order if id(p) in members]
            if len(ranked) != len(params):
                continue
            # The group's position i was saved for the i-th parameter of the
            # other construction, in that construction's order.
            if all(_fits(s, p) for s, p in zip(states, ranked, strict=True)):
                for p in params:
                    optimizer.state.pop(p, None)
                for s, p in zip(states, ranked, strict=True):
                    if s is not None:
                        optimizer.state[p] = s
                fixed = True
                break
    return fixed


def _fits(state: Mapping[str, Any] | None, param: Tensor) -> bool:
    """Whether every tensor of ``state`` is a scalar or has ``param``'s shape."""
    if not state:
        return True
    return all(
        not isinstance(v, Tensor) or v.dim() == 0 or v.shape == param.shape
        for v in state.values()
    )
