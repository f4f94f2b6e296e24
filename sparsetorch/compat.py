"""``RigLScheduler``: a drop-in replacement for the ``rigl-torch`` class.

Change the import line and nothing else::

    # from rigl_torch.RigL import RigLScheduler
    from sparsetorch import RigLScheduler
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor, nn

from sparsetorch.api import _check_optimizer_holds, sparsify
from sparsetorch.sparsifier import Sparsifier
from sparsetorch.topology import named_tensors, select_tensors

__all__ = ["RigLScheduler"]

_DISTRIBUTIONS = {"uniform": "uniform", "ERK": "erk", "erk": "erk"}


class RigLScheduler:
    """RigL with the constructor and calling protocol of ``rigl-torch``.

    In the training loop, ``if pruner(): optimizer.step()``: each call counts a
    step; on a RigL step (``step % delta == 0 and step < T_end``) the topology
    is updated from this step's gradients and the call returns ``False``, so the
    optimizer step is skipped, exactly as in ``rigl-torch``. Built on
    :func:`sparsetorch.sparsify`, with rigl-torch's rules for which layers stay
    dense:

    * ``sparsity_distribution="uniform"``: the first sparsifiable layer stays
      dense, the others get sparsity ``1 - dense_allocation``;
    * ``"ERK"``: Erdős–Rényi-Kernel over all sparsified layers;
    * ``ignore_linear_layers=True``: ``nn.Linear`` layers stay dense.

    Sparsifiable layers are those :func:`sparsetorch.sparsify` selects by
    default (``nn.Linear`` and ``nn.Conv*`` weights); unlike ``rigl-torch``, norm
    layers and embeddings stay dense.

    Args:
        model: the model, sparsified in place.
        optimizer: its optimizer; state is reset where masks change.
        dense_allocation: fraction of weights kept, in ``(0, 1]``. ``1`` keeps the
            model dense (with a warning). Default: ``1``.
        T_end: step at which updates stop. Required unless ``static_topo``.
        sparsity_distribution: ``"uniform"`` or ``"ERK"``. Default: ``"uniform"``.
        ignore_linear_layers: keep ``nn.Linear`` layers dense. Default: ``True``.
        delta: steps between updates. Default: ``100``.
        alpha: initial drop fraction, cosine-decayed to 0 at ``T_end``.
            Default: ``0.3``.
        static_topo: never update the masks. Default: ``False``.
        grad_accumulation_n: number of backward passes (one per call) whose
            dense gradients are summed for growth. Default: ``1``.
        state_dict: a :meth:`state_dict` to resume from. Default: ``None``.

    Example::

        >>> import torch
        >>> from sparsetorch import RigLScheduler
        >>> model = torch.nn.Sequential(
        ...     torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 2))
        >>> optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
        >>> pruner = RigLScheduler(model, optimizer, dense_allocation=0.25,
        ...                        T_end=30, delta=10, ignore_linear_layers=False)
        >>> for _ in range(20):
        ...     optimizer.zero_grad()
        ...     model(torch.randn(4, 8)).sum().backward()
        ...     if pruner():
        ...         optimizer.step()
        >>> pruner.step, pruner.rigl_steps
        (20, 2)
    """

    def __init__(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        dense_allocation: float = 1,
        T_end: int | None = None,
        sparsity_distribution: str = "uniform",
        ignore_linear_layers: bool = True,
        delta: int = 100,
        alpha: float = 0.3,
        static_topo: bool = False,
        grad_accumulation_n: int = 1,
        state_dict: dict[str, Any] | None = None,
    ) -> None:
        _check_arguments(
            model,
            optimizer,
            dense_allocation=dense_allocation,
            T_end=T_end,
            sparsity_distribution=sparsity_distribution,
            ignore_linear_layers=ignore_linear_layers,
            delta=delta,
            alpha=alpha,
            static_topo=static_topo,
            grad_accumulation_n=grad_accumulation_n,
            state_dict=state_dict,
        )
        if dense_allocation == 1:
            warnings.warn(
                "RigLScheduler with dense_allocation=1 keeps the model dense "
                "(rigl-torch's default). Pass dense_allocation=0.1 for 90% "
                "sparsity.",
                UserWarning,
                stacklevel=2,
            )
        selected = select_tensors(model)
        dense = []
        if ignore_linear_layers:
            modules = dict(model.named_modules())
            dense = [
                fqn
                for fqn in selected
                if isinstance(modules[fqn.rpartition(".")[0]], nn.Linear)
            ]
        if sparsity_distribution == "uniform" and len(selected) > 1:
            dense.append(selected[0])
        include = [fqn for fqn in selected if fqn not in dense]
        if not include:
            raise ValueError(
                "RigLScheduler found nothing to sparsify: "
                f"ignore_linear_layers={ignore_linear_layers} and "
                f"sparsity_distribution={sparsity_distribution!r} keep every layer "
                f"of {selected} dense.\nPass ignore_linear_layers=False."
            )
        self.delta = delta
        self.alpha = alpha
        self.T_end = T_end
        self.dense_allocation = dense_allocation
        self.sparsity_distribution = sparsity_distribution
        self.ignore_linear_layers = ignore_linear_layers
        self.static_topo = static_topo
        self.grad_accumulation_n = grad_accumulation_n
        tensors = dict(named_tensors(model))
        _check_optimizer_holds(
            optimizer,
            {fqn: tensors[fqn] for fqn in include if tensors[fqn].requires_grad},
        )
        # Kept to undo sparsify() if the state_dict does not fit.
        dense_copy = (
            None
            if state_dict is None
            else {fqn: tensors[fqn].detach().clone() for fqn in include}
        )
        self.sparsifier: Sparsifier = sparsify(
            model,
            None,
            policy="static" if static_topo else "rigl",
            sparsity=1.0 - float(dense_allocation),
            distribution=_DISTRIBUTIONS[sparsity_distribution],
            end_step=T_end,
            update_interval=delta,
            drop_fraction=alpha,
            include=[glob_escape(fqn) for fqn in include],
        )
        self.sparsifier.optimizer = optimizer
        if grad_accumulation_n > 1:
            self.sparsifier.capture_steps = grad_accumulation_n
        if dense_copy is not None and state_dict is not None:
            try:
                self.load_state_dict(state_dict)
            except (TypeError, ValueError):
                self.sparsifier.remove()
                with torch.no_grad():
                    for fqn, value in dense_copy.items():
                        tensors[fqn].copy_(value)
                raise

    def __call__(self) -> bool:
        """Count a step; on a RigL step update the masks and return ``False``."""
        scheduled = (
            not self.static_topo
            and self.T_end is not None
            and self.sparsifier.schedule.is_update_step(self.sparsifier.step_count + 1)
        )
        self.sparsifier.step()
        return not scheduled

    @property
    def step(self) -> int:
        """Calls so far."""
        return self.sparsifier.step_count

    @property
    def rigl_steps(self) -> int:
        """Topology updates so far."""
        return self.sparsifier.update_count

    @property
    def masks(self) -> dict[str, Tensor]:
        """``tensor_fqn -> live bool mask`` of the sparsified tensors."""
        return self.sparsifier.masks

    def state_dict(self) -> dict[str, Any]:
        """The sparsifier's state dict (masks, step, generator state)."""
        return self.sparsifier.state_dict()

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Resume from :meth:`state_dict`."""
        self.sparsifier.load_state_dict(state_dict)

    def __str__(self) -> str:
        return (
            f"RigLScheduler(step={self.step}, rigl_steps={self.rigl_steps}, "
            f"delta={self.delta}, T_end={self.T_end}, alpha={self.alpha})\n"
            f"{self.sparsifier.summary()}"
        )


def _check_arguments(
    model: object,
    optimizer: object,
    *,
    dense_allocation: object,
    T_end: object,
    sparsity_distribution: object,
    ignore_linear_layers: object,
    delta: int,
    alpha: object,
    static_topo: object,
    grad_accumulation_n: int,
    state_dict: object,
) -> None:
    """Check every ``RigLScheduler`` argument before anything changes."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}.")
    if not isinstance(optimizer, torch.optim.Optimizer):
        raise TypeError(
            "optimizer must be the model's torch.optim.Optimizer, got "
            f"{type(optimizer).__name__}."
        )
    for name, value in (
        ("ignore_linear_layers", ignore_linear_layers),
        ("static_topo", static_topo),
    ):
        if not isinstance(value, bool):
            raise TypeError(f"{name} must be True or False, got {value!r}.")
    if isinstance(dense_allocation, bool) or not isinstance(
        dense_allocation, (int, float)
    ):
        raise TypeError(f"dense_allocation must be a float, got {dense_allocation!r}.")
    if not 0 < dense_allocation <= 1:
        raise ValueError(
            f"dense_allocation must be in (0, 1], got {dense_allocation!r}.\n"
            "It is the fraction of weights kept: 0.1 means 90% sparsity."
        )
    if not isinstance(sparsity_distribution, str):
        raise TypeError(
            "sparsity_distribution must be a name, got "
            f"{sparsity_distribution!r}.\nKnown: {sorted(_DISTRIBUTIONS)}."
        )
    if sparsity_distribution not in _DISTRIBUTIONS:
        raise ValueError(
            f"Unknown sparsity_distribution {sparsity_distribution!r}.\n"
            f"Known: {sorted(_DISTRIBUTIONS)}."
        )
    for name, value in (("delta", delta), ("grad_accumulation_n", grad_accumulation_n)):
        if isinstance(value, bool) or not isinstance(value, int):
            raise TypeError(f"{name} must be an int, got {value!r}.")
    if delta < 1:
        raise ValueError(f"delta must be an int >= 1, got {delta!r}.")
    if not 1 <= grad_accumulation_n < delta:
        raise ValueError(
            "grad_accumulation_n must be an int in [1, delta), got "
            f"{grad_accumulation_n!r} (delta={delta})."
        )
    if T_end is None and not static_topo:
        raise ValueError(
            "RigLScheduler needs T_end, the step at which topology updates "
            "stop (rigl-torch crashes without it).\nA common choice: "
            "T_end = int(0.75 * epochs * len(loader))."
        )
    if T_end is not None:
        if isinstance(T_end, bool) or not isinstance(T_end, int):
            raise TypeError(f"T_end must be an int, got {T_end!r}.")
        if T_end < 1:
            raise ValueError(
                f"T_end must be >= 1, got {T_end}: it is the step at which "
                "topology updates stop."
            )
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)):
        raise TypeError(f"alpha must be a float, got {alpha!r}.")
    if not 0 <= alpha <= 1:
        raise ValueError(
            f"alpha must be in [0, 1], got {alpha!r}: it is the fraction of "
            "active weights the first update drops."
        )
    if state_dict is not None and not isinstance(state_dict, Mapping):
        raise TypeError(
            "state_dict must be a dict from RigLScheduler.state_dict() or None, "
            f"got {type(state_dict).__name__}."
        )


def glob_escape(name: str) -> str:
    """Escape fnmatch's special characters so ``name`` matches only itself."""
    return "".join(f"[{c}]" if c in "*?[]" else c for c in name)
