"""``RigLScheduler``: a drop-in replacement for the ``rigl-torch`` class.

Change the import line and nothing else::

    # from rigl_torch.RigL import RigLScheduler
    from sparsetorch import RigLScheduler

What carries over from rigl-torch 0.5.2 (see ``docs/migration.md``): its
arguments with the types it accepts, its ``if pruner(): optimizer.step()``
protocol and schedule, its layer list and per-layer active counts, the
attributes its scripts read (``W``, ``backward_masks``, ``S``, ``N``, ...) as
read-only views, a model already wrapped in ``DistributedDataParallel``, and its
checkpoints (``pruner.state_dict()`` saved by rigl-torch, passed back as
``state_dict=``).
"""

from __future__ import annotations

import dataclasses
import math
import warnings
from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor, nn

from sparsetorch import _distributed, _rigl_torch
from sparsetorch._checkpoint import encode_mask
from sparsetorch.api import _check_optimizer_holds, sparsify
from sparsetorch.schedule import Schedule
from sparsetorch.sparsifier import Sparsifier
from sparsetorch.topology import named_tensors, select_tensors

__all__ = ["RigLScheduler"]


class RigLScheduler:
    """RigL with the constructor, calling protocol and attributes of ``rigl-torch``.

    In the training loop, ``if pruner(): optimizer.step()``: each call counts a
    step; on a RigL step (``step % delta == 0 and step < T_end``) the topology
    is updated from this step's gradients and the call returns ``False``, so the
    optimizer step is skipped, exactly as in ``rigl-torch``. The drop fraction
    is ``alpha / 2 * (1 + cos(pi * step / T_end))``. Built on
    :func:`sparsetorch.sparsify`.

    The layers are rigl-torch's: every module that is an ``nn.Linear`` or has a
    ``weight`` (except ``nn.BatchNorm2d``), in model order, without looking
    inside such a module (:attr:`W`). Of these, the ones
    :func:`sparsetorch.sparsify` selects by default (``nn.Linear`` and
    ``nn.Conv*``) are sparsified, by rigl-torch's rules:

    * ``sparsity_distribution="uniform"``: the first layer stays dense, the
      others keep ``n - int((1 - dense_allocation) * n)`` of their ``n``
      weights, rigl-torch's count;
    * ``"ERK"``: Erdős–Rényi-Kernel over all sparsified layers (an extension:
      rigl-torch accepts only ``"uniform"``);
    * ``ignore_linear_layers=True``: ``nn.Linear`` layers stay dense.

    Unlike rigl-torch, the other layers of :attr:`W` (norms, embeddings) stay
    dense, unless a rigl-torch checkpoint sparsified them.

    A model already wrapped in ``DistributedDataParallel`` works as in
    rigl-torch: pass the wrapper; its gradient reduction is rebuilt over the
    masked weights.

    Args:
        model: the model, sparsified in place (a ``DistributedDataParallel``
            wrapper is sparsified through its ``.module``).
        optimizer: its optimizer; state is reset where masks change.
        dense_allocation: fraction of weights kept, in ``(0, 1]``. ``1`` keeps the
            model dense (with a warning). Default: ``1``.
        T_end: step at which updates stop (an int, or a float as rigl-torch
            accepts). Required unless ``static_topo``.
        sparsity_distribution: ``"uniform"`` or ``"ERK"``. Default: ``"uniform"``.
        ignore_linear_layers: keep ``nn.Linear`` layers dense (``True``/``False``
            or ``1``/``0``). Default: ``True``.
        delta: steps between updates (an int, or an integral float).
            Default: ``100``.
        alpha: initial drop fraction, cosine-decayed to 0 at ``T_end``.
            Default: ``0.3``.
        static_topo: never update the masks (``True``/``False`` or ``1``/``0``,
            as an argparse int). Default: ``False``.
        grad_accumulation_n: number of backward passes (one per call) whose
            dense gradients are summed for growth. Default: ``1``.
        state_dict: a checkpoint to resume from: this class's
            :meth:`state_dict`, or a rigl-torch ``RigLScheduler.state_dict()``
            (its hyperparameters, masks and counts are adopted, as rigl-torch
            does). Default: ``None``.

    Numbers may be Python or numpy scalars.

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
        >>> pruner.S, pruner.N
        ([0, 0.75], [128, 32])
        >>> [None if m is None else int(m.sum()) for m in pruner.backward_masks]
        [None, 8]
    """

    def __init__(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        dense_allocation: float = 1,
        T_end: float | None = None,
        sparsity_distribution: str = "uniform",
        ignore_linear_layers: bool = True,
        delta: int = 100,
        alpha: float = 0.3,
        static_topo: bool = False,
        grad_accumulation_n: int = 1,
        state_dict: Mapping[str, Any] | None = None,
    ) -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be an nn.Module, got {type(model).__name__}.")
        if not isinstance(optimizer, torch.optim.Optimizer):
            raise TypeError(
                "optimizer must be the model's torch.optim.Optimizer, got "
                f"{type(optimizer).__name__}."
            )
        if state_dict is not None and not isinstance(state_dict, Mapping):
            raise TypeError(
                "state_dict must be a dict from RigLScheduler.state_dict() (this "
                f"class's or rigl-torch's) or None, got {type(state_dict).__name__}."
            )
        inner, _ = _distributed.unwrap(model)
        layers = _rigl_torch.layers(inner)
        given = {
            "dense_allocation": dense_allocation,
            "T_end": T_end,
            "sparsity_distribution": sparsity_distribution,
            "ignore_linear_layers": ignore_linear_layers,
            "delta": delta,
            "alpha": alpha,
            "static_topo": static_topo,
            "grad_accumulation_n": grad_accumulation_n,
        }
        foreign = state_dict is not None and _rigl_torch.is_checkpoint(state_dict)
        masks: dict[str, Tensor] = {}
        if foreign:
            assert state_dict is not None
            settings, masks, targets = _rigl_torch.read_checkpoint(state_dict, layers)
            changed = sorted(k for k, v in settings.items() if v != given[k])
            if changed:
                warnings.warn(
                    "The rigl-torch checkpoint's settings replace the arguments, "
                    "as in rigl-torch: "
                    + ", ".join(
                        f"{k}={settings[k]!r} (not {given[k]!r})" for k in changed
                    )
                    + ".",
                    UserWarning,
                    stacklevel=2,
                )
            given.update(settings)
        self._settings = _rigl_torch.check_arguments(**given)
        dense = self._settings["dense_allocation"]
        uniform = self._settings["sparsity_distribution"] == "uniform"
        selectable = set(select_tensors(inner))
        if foreign:
            include = list(masks)
            self._S = targets
        else:
            include = []
            for i, (fqn, _, is_linear) in enumerate(layers):
                if fqn not in selectable:
                    continue  # a norm or embedding: dense (rigl-torch masks it)
                if i == 0 and uniform and len(layers) > 1:
                    continue
                if is_linear and self._settings["ignore_linear_layers"]:
                    continue
                include.append(fqn)
            # rigl-torch's S: 1 - dense_allocation where sparse (ERK: below).
            self._S = {fqn: 1 - dense for fqn in include}
        if not include:
            raise ValueError(
                "RigLScheduler found nothing to sparsify: "
                f"ignore_linear_layers={self._settings['ignore_linear_layers']} and "
                f"sparsity_distribution={self._settings['sparsity_distribution']!r} "
                f"keep every layer of {[fqn for fqn, _, _ in layers]} dense.\n"
                "Pass ignore_linear_layers=False."
            )
        if dense == 1 and not foreign:
            warnings.warn(
                "RigLScheduler with dense_allocation=1 keeps the model dense "
                "(rigl-torch's default). Pass dense_allocation=0.1 for 90% "
                "sparsity.",
                UserWarning,
                stacklevel=2,
            )
        self._layers = layers
        self._model = model
        self._optimizer = optimizer
        tensors = dict(named_tensors(inner))
        _check_optimizer_holds(
            optimizer,
            {fqn: tensors[fqn] for fqn in include if tensors[fqn].requires_grad},
        )
        distribution: str | dict[str, float]
        if foreign:
            distribution = {
                fqn: (mask.numel() - int(mask.sum())) / mask.numel()
                for fqn, mask in masks.items()
            }
        elif uniform:
            # rigl-torch's count: int((1 - dense_allocation) * n) zeros.
            distribution = {
                fqn: int((1 - dense) * tensors[fqn].numel()) / tensors[fqn].numel()
                for fqn in include
            }
        else:
            distribution = "erk"
        # Kept to undo sparsify() if the state_dict does not fit: the weights and
        # their optimizer state, which sparsify and remove() mask.
        dense_copy = (
            None
            if state_dict is None
            else {fqn: tensors[fqn].detach().clone() for fqn in include}
        )
        state_copy = (
            None
            if state_dict is None
            else {
                fqn: {
                    k: v.clone()
                    for k, v in optimizer.state.get(tensors[fqn], {}).items()
                    if isinstance(v, Tensor)
                }
                for fqn in include
            }
        )
        static = self._settings["static_topo"]
        t_end = self._settings["T_end"]
        self.sparsifier: Sparsifier = sparsify(
            model,
            None,
            policy="static" if static else "rigl",
            sparsity=1.0 - dense,
            distribution=distribution,
            end_step=None if t_end is None else math.ceil(t_end),
            update_interval=self._settings["delta"],
            drop_fraction=self._settings["alpha"],
            include=[glob_escape(fqn) for fqn in include],
        )
        if not uniform and not foreign:
            self._S = dict(self.sparsifier.topology.sparsities)
        if isinstance(t_end, float) and not t_end.is_integer() and not static:
            self.sparsifier.schedule = _FloatEndSchedule(
                **dataclasses.asdict(self.sparsifier.schedule), t_end=t_end
            )
        self.sparsifier.optimizer = optimizer
        if self._settings["grad_accumulation_n"] > 1:
            self.sparsifier.capture_steps = self._settings["grad_accumulation_n"]
        if dense_copy is not None and state_copy is not None and state_dict is not None:
            try:
                self.load_state_dict(state_dict)
            except (TypeError, ValueError):
                self.sparsifier.remove()
                with torch.no_grad():
                    for fqn, value in dense_copy.items():
                        tensors[fqn].copy_(value)
                        state = optimizer.state.get(tensors[fqn], {})
                        for key, saved in state_copy[fqn].items():
                            state[key].copy_(saved)
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

    # -- rigl-torch's attributes, read-only ----------------------------------------

    @property
    def model(self) -> nn.Module:
        """The model as passed (a ``DistributedDataParallel`` wrapper stays one)."""
        return self._model

    @property
    def optimizer(self) -> torch.optim.Optimizer:
        """The optimizer as passed."""
        return self._optimizer

    @property
    def W(self) -> list[Tensor]:
        """rigl-torch's layer list: each layer's weight, in model order.

        Sparsified weights are the stored parameters (the tensors the optimizer
        holds, zero outside their masks); dense layers' weights as they are.
        """
        params = self.sparsifier.topology.params
        return [
            params.get(fqn, _rigl_torch.weight(module))
            for fqn, module, _ in self._layers
        ]

    @property
    def N(self) -> list[int]:
        """Number of weights of each layer of :attr:`W`."""
        return [w.numel() for w in self.W]

    @property
    def S(self) -> list[float]:
        """Target sparsity of each layer of :attr:`W` (``0`` where dense).

        As in rigl-torch, a layer keeps ``N - int(S * N)`` weights.
        """
        return [
            self._S[fqn] if self._S.get(fqn, 0) > 0 else 0 for fqn, _, _ in self._layers
        ]

    @property
    def backward_masks(self) -> list[Tensor | None]:
        """The live bool mask of each layer of :attr:`W`; ``None`` where dense."""
        masks = self.sparsifier.masks
        return [
            masks[fqn] if s > 0 else None
            for (fqn, _, _), s in zip(self._layers, self.S, strict=True)
        ]

    @property
    def backward_hook_objects(self) -> list[_DenseGrad | None]:
        """Per layer of :attr:`W`, an object whose ``dense_grad`` is the gradient
        RigL grows from (averaged over ``grad_accumulation_n`` passes, as in
        rigl-torch), or ``None`` outside the passes before an update; ``None``
        where the layer is dense."""
        parametrizations = self.sparsifier.topology.parametrizations
        return [
            None if mask is None else _DenseGrad(i, self, parametrizations[fqn])
            for i, ((fqn, _, _), mask) in enumerate(
                zip(self._layers, self.backward_masks, strict=True)
            )
        ]

    @property
    def _linear_layers_mask(self) -> list[int]:
        """``1`` for each layer of :attr:`W` that is an ``nn.Linear``, else ``0``."""
        return [int(is_linear) for _, _, is_linear in self._layers]

    @property
    def step(self) -> int:
        """Calls so far."""
        return self.sparsifier.step_count

    @property
    def rigl_steps(self) -> int:
        """Topology updates so far."""
        return self.sparsifier.update_count

    @property
    def dense_allocation(self) -> float:
        """The fraction of weights kept, as passed."""
        return float(self._settings["dense_allocation"])

    @property
    def T_end(self) -> float | None:
        """The step at which updates stop."""
        return self._settings["T_end"]  # type: ignore[no-any-return]

    @property
    def delta(self) -> int:
        """Steps between updates (rigl-torch also calls it :attr:`delta_T`)."""
        return int(self._settings["delta"])

    @property
    def delta_T(self) -> int:
        """rigl-torch's name of :attr:`delta`."""
        return self.delta

    @property
    def alpha(self) -> float:
        """The initial drop fraction."""
        return float(self._settings["alpha"])

    @property
    def static_topo(self) -> bool:
        """Whether the masks never change."""
        return bool(self._settings["static_topo"])

    @property
    def ignore_linear_layers(self) -> bool:
        """Whether ``nn.Linear`` layers stay dense."""
        return bool(self._settings["ignore_linear_layers"])

    @property
    def sparsity_distribution(self) -> str:
        """``"uniform"`` or ``"ERK"``, as passed."""
        return str(self._settings["sparsity_distribution"])

    @property
    def grad_accumulation_n(self) -> int:
        """Backward passes whose dense gradients RigL grows from."""
        return int(self._settings["grad_accumulation_n"])

    @property
    def masks(self) -> dict[str, Tensor]:
        """``tensor_fqn -> live bool mask`` of the sparsified tensors."""
        return self.sparsifier.masks

    # -- rigl-torch's methods --------------------------------------------------------

    def cosine_annealing(self) -> float:
        """The drop fraction an update at the current step uses."""
        return self.sparsifier.schedule.drop_fraction_at(self.step)

    def apply_mask_to_weights(self) -> None:
        """Zero the weights (and optimizer state) outside the masks."""
        self.sparsifier.apply_masks()

    def reset_momentum(self) -> None:
        """Zero the optimizer state (and weights) outside the masks."""
        self.sparsifier.apply_masks()

    @torch.no_grad()
    def apply_mask_to_gradients(self) -> None:
        """Zero the gradients outside the masks (sparsetorch keeps them so)."""
        params = self.sparsifier.topology.params
        for fqn, mask in self.masks.items():
            grad = params[fqn].grad
            if grad is not None:
                grad.mul_(mask)

    # -- checkpoints -------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """The sparsifier's state dict (masks, step, generator state)."""
        return self.sparsifier.state_dict()

    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        """Resume from :meth:`state_dict`, or from a rigl-torch checkpoint.

        A rigl-torch checkpoint must have this scheduler's settings here (pass
        it to the constructor as ``state_dict=`` to adopt its settings).

        Raises:
            ValueError: the checkpoint does not fit this model or scheduler.
            TypeError: it is not a dict, or holds values of the wrong type.
        """
        if not isinstance(state_dict, Mapping):
            raise TypeError(
                "RigLScheduler.load_state_dict takes a dict from "
                f"RigLScheduler.state_dict(), got {type(state_dict).__name__}."
            )
        if not _rigl_torch.is_checkpoint(state_dict):
            self.sparsifier.load_state_dict(state_dict)
            return
        settings, masks, _ = _rigl_torch.read_checkpoint(state_dict, self._layers)
        mismatched = sorted(
            k
            for k, v in _rigl_torch.check_arguments(
                **{**self._settings, **settings}
            ).items()
            if v != self._settings[k]
        )
        if mismatched or set(masks) != set(self.masks):
            lines = [
                f"{k}: checkpoint {settings[k]!r}, this scheduler {self._settings[k]!r}"
                for k in mismatched
            ]
            if set(masks) != set(self.masks):
                lines.append(
                    f"sparse layers: checkpoint {sorted(masks)}, this scheduler "
                    f"{sorted(self.masks)}"
                )
            raise ValueError(
                "The rigl-torch checkpoint was made with other settings:\n"
                + "\n".join(lines)
                + "\nPass it to the constructor instead: RigLScheduler(model, "
                "optimizer, ..., state_dict=checkpoint) adopts its settings."
            )
        ours = self.sparsifier.state_dict()
        ours["step"] = _rigl_torch.count(state_dict, "step")
        ours["updates"] = _rigl_torch.count(state_dict, "rigl_steps")
        ours["masks"] = {fqn: encode_mask(mask) for fqn, mask in masks.items()}
        self.sparsifier.load_state_dict(ours)

    def __str__(self) -> str:
        return (
            f"RigLScheduler(step={self.step}, rigl_steps={self.rigl_steps}, "
            f"delta={self.delta}, T_end={self.T_end}, alpha={self.alpha})\n"
            f"{self.sparsifier.summary()}"
        )


class _DenseGrad:
    """rigl-torch's per-layer backward-hook object, reduced to what scripts read."""

    def __init__(self, layer: int, scheduler: RigLScheduler, parametrization: Any):
        self.layer = layer
        self.scheduler = scheduler
        self._parametrization = parametrization

    @property
    def dense_grad(self) -> Tensor | None:
        grad: Tensor | None = self._parametrization.dense_grad
        n = self.scheduler.grad_accumulation_n
        return grad if grad is None or n == 1 else grad / n


@dataclasses.dataclass(frozen=True, kw_only=True)
class _FloatEndSchedule(Schedule):
    """rigl-torch's schedule for a non-integral ``T_end``.

    Updates while ``step < t_end`` (``end_step = ceil(t_end)``), with the drop
    fraction ``drop_fraction / 2 * (1 + cos(step * pi / t_end))``.
    """

    t_end: float = 1.0

    def drop_fraction_at(self, step: int) -> float:
        step = min(max(step, 0), self.t_end)  # type: ignore[assignment]
        return self.drop_fraction / 2 * (1 + math.cos((step * math.pi) / self.t_end))


def glob_escape(name: str) -> str:
    """Escape fnmatch's special characters so ``name`` matches only itself."""
    return "".join(f"[{c}]" if c in "*?[]" else c for c in name)
