"""Sparsifier: counts optimizer steps and runs topology updates on schedule."""

from __future__ import annotations

import dataclasses
import math
import warnings
from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor, nn

from sparsetorch import _distributed
from sparsetorch._checkpoint import (
    FORMAT_VERSION,
    READABLE_VERSIONS,
    decode_mask,
    encode_mask,
)
from sparsetorch.execution import export_sparse, set_execution
from sparsetorch.policies.base import Policy, _update_mask
from sparsetorch.schedule import Schedule
from sparsetorch.topology import Topology

__all__ = ["Sparsifier"]


class Sparsifier:
    """The handle returned by :func:`sparsetorch.sparsify`.

    Counts optimizer steps ``k = 1, 2, ...`` (through a step post-hook on the
    optimizer, or through :meth:`step` when there is none) and, after every step
    the :class:`~sparsetorch.Schedule` marks, updates each mask with the policy:
    ``int(n_active * drop_fraction_at(k))`` weights are dropped and as many grown.
    Dropped and grown positions start from zero in the stored weight (grown ones
    at ``grow_init``) and in every optimizer state tensor.

    Args:
        topology: the masked tensors.
        policy: decides what to drop and grow.
        schedule: decides when, and how much.
        optimizer: the optimizer training the model; its state is reset where
            masks change and its steps are counted. Default: ``None`` (count
            with :meth:`step`).
        generator: CPU generator for updates (its state is checkpointed).
        sparsity: the requested overall sparsity, for the summary.
        grow_init: value of newly grown weights. Default: ``0.0``.
        count_optimizer_steps: count steps through the optimizer's step
            post-hook. Default: ``True`` when an optimizer is given.
        skipped: ``tensor_fqn -> reason`` of selected tensors left dense
            (frozen ones), listed under the summary. Default: ``None``.
    """

    def __init__(
        self,
        topology: Topology,
        policy: Policy,
        schedule: Schedule,
        *,
        optimizer: torch.optim.Optimizer | None = None,
        generator: torch.Generator,
        sparsity: float,
        grow_init: float = 0.0,
        count_optimizer_steps: bool | None = None,
        skipped: Mapping[str, str] | None = None,
    ) -> None:
        self.topology = topology
        self.skipped = dict(skipped or {})
        self.policy = policy
        self.schedule = schedule
        self.optimizer = optimizer
        self.generator = generator
        self.sparsity = sparsity
        self.grow_init = grow_init
        self.step_count = 0
        self.update_count = 0
        self.capture_steps = 1
        self.execution = "mask"
        self._hook = None
        if count_optimizer_steps is None:
            count_optimizer_steps = optimizer is not None
        if count_optimizer_steps:
            if optimizer is None:
                raise ValueError("count_optimizer_steps=True needs an optimizer.")
            self._hook = optimizer.register_step_post_hook(self._on_optimizer_step)
        self._arm()

    # -- stepping -----------------------------------------------------------------

    @property
    def masks(self) -> dict[str, Tensor]:
        """``tensor_fqn -> mask``: the live bool buffers (read them, don't write)."""
        return self.topology.masks

    def step(self) -> bool:
        """Count one optimizer step; update the topology if the schedule says so.

        Called for you after every ``optimizer.step()`` when ``sparsify`` was
        given the optimizer; call it yourself otherwise.

        Returns:
            Whether the topology was updated.
        """
        self.step_count += 1
        updated = False
        if self.policy.dynamic and self.schedule.is_update_step(self.step_count):
            updated = self.update()
        self._arm()
        return updated

    def _on_optimizer_step(
        self, optimizer: torch.optim.Optimizer, args: Any, kwargs: Any
    ) -> None:
        self.step()

    def _arm(self) -> None:
        """Capture dense gradients only in the backward passes before an update.

        That is the next step's, or the next ``capture_steps`` steps' when
        gradients are summed over several steps (``RigLScheduler``'s
        ``grad_accumulation_n``).
        """
        capture = (
            self.policy.dynamic
            and self.policy.needs_grad
            and any(
                self.schedule.is_update_step(self.step_count + i)
                for i in range(1, self.capture_steps + 1)
            )
        )
        across = self.capture_steps > 1
        for p in self.topology.parametrizations.values():
            if p.capturing and not capture:
                p.release()
            # Set only what changes: this runs every step, and nn.Module's
            # __setattr__ costs microseconds per call.
            if p.capturing != capture:
                p.capturing = capture
            if p.accumulate_across_steps != across:
                p.accumulate_across_steps = across

    @torch.no_grad()
    def update(self) -> bool:
        """Run one topology update now, with the drop fraction of the current step.

        Returns:
            ``False`` when the update was skipped because a weight or gradient
            was NaN or infinite (a warning says which); ``True`` otherwise.

        Raises:
            RuntimeError: the weights were sharded (FSDP) after sparsifying.
        """
        fraction = self.schedule.drop_fraction_at(self.step_count)
        weights = self.topology.params
        _distributed.check_params_unsharded(weights)
        parametrizations = self.topology.parametrizations
        grads = {
            fqn: p.dense_grad if self.policy.needs_grad else None
            for fqn, p in parametrizations.items()
        }
        _distributed.average_([g for g in grads.values() if g is not None])
        new_masks = {}
        positions = {}  # the new masks' active positions, where they are kept
        targets = self.topology.targets  # == each mask's active count, no sync
        try:
            for fqn, mask in self.masks.items():
                n_active = targets[fqn]
                n_drop = int(n_active * fraction)
                if n_drop == 0 or n_active == mask.numel():
                    continue
                p = parametrizations[fqn]
                new_masks[fqn], positions[fqn] = _update_mask(
                    self.policy,
                    weights[fqn],
                    mask,
                    grads[fqn],
                    n_drop,
                    self.generator,
                    n_active=n_active,
                    active=p.active_positions(),
                    positions=p.active is not None,  # kept under sparse execution
                )
        except FloatingPointError as error:
            warnings.warn(
                f"Skipped the topology update at step {self.step_count}: {error}",
                RuntimeWarning,
                stacklevel=2,
            )
            return False
        finally:
            for p in parametrizations.values():
                p.release()
        self.topology.apply(new_masks, self.optimizer, self.grow_init)
        for fqn, found in positions.items():
            if found is not None:
                parametrizations[fqn].keep_active_positions(found)
        if new_masks and isinstance(self.optimizer, torch.optim.LBFGS):
            _restart_lbfgs(self.optimizer)
        self.update_count += 1
        return True

    # -- checkpoints --------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """Plain data and tensors: loads with ``torch.load(..., weights_only=True)``.

        Holds the masks, the step and update counts, the generator state, and the
        settings (policy, schedule, per-tensor sparsity) for checking on load.
        Format version 2: each mask is stored bit-packed or as the positions of
        its active weights, whichever is smaller (see ``docs/reliability.md``).

        Example::

            >>> import torch
            >>> import sparsetorch as st
            >>> model = torch.nn.Sequential(torch.nn.Linear(100, 100))
            >>> state = st.sparsify(model, policy="static", sparsity=0.99).state_dict()
            >>> state["format_version"], state["masks"]["0.weight"]["encoding"]
            (2, 'indices')
            >>> state["masks"]["0.weight"]["data"].dtype
            torch.int16
        """
        return {
            "format_version": FORMAT_VERSION,
            "step": self.step_count,
            "updates": self.update_count,
            "generator": self.generator.get_state(),
            "masks": {fqn: encode_mask(m) for fqn, m in self.masks.items()},
            "settings": self._settings(),
        }

    def _settings(self) -> dict[str, Any]:
        return {
            "policy": type(self.policy).__name__,
            "policy_fields": dataclasses.asdict(self.policy),
            "schedule": dataclasses.asdict(self.schedule),
            "sparsities": self.topology.sparsities,
            "grow_init": self.grow_init,
        }

    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        """Restore masks, step count and generator state from :meth:`state_dict`.

        Reads format versions 1 (plain bool masks) and 2. Everything is checked
        before anything changes: a checkpoint that does not fit raises and leaves
        the model, optimizer and sparsifier as they were. Then the stored
        weights are re-masked with the loaded masks and the optimizer state is
        zeroed outside them. Model, optimizer and sparsifier state dicts may be
        loaded in any order before the next step.

        Raises:
            ValueError: the checkpoint is from an unknown or newer format version,
                another model, or other settings, or a mask is corrupted (wrong
                shape, size or active count).
            TypeError: the checkpoint is not a dict, or a mask has the wrong type.
            RuntimeError: the weights were sharded (FSDP) after sparsifying.
        """
        _distributed.check_params_unsharded(self.topology.params)
        if not isinstance(state_dict, Mapping):
            raise TypeError(
                "Sparsifier.load_state_dict takes the dict made by "
                f"sparsifier.state_dict(), got {type(state_dict).__name__}.\n"
                'Load the file first: torch.load(path, weights_only=True)["sparsity"].'
            )
        version = _check_version(state_dict)
        missing = sorted(
            {"step", "updates", "generator", "masks", "settings"} - set(state_dict)
        )
        if missing:
            raise ValueError(
                f"The sparsifier checkpoint lacks the keys {missing}: it is "
                "truncated or not made by sparsifier.state_dict()."
            )
        counts = {k: state_dict[k] for k in ("step", "updates")}
        for key, value in counts.items():
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(
                    f"The sparsifier checkpoint's {key!r} must be an int >= 0, got "
                    f"{value!r}."
                )
        generator_state = state_dict["generator"]
        try:
            torch.Generator().set_state(generator_state)
        except (TypeError, RuntimeError) as error:
            raise ValueError(
                "The sparsifier checkpoint's generator state is not a CPU "
                f"torch.Generator state: {error}"
            ) from error
        masks = state_dict["masks"]
        if not isinstance(masks, Mapping):
            raise TypeError(
                "The sparsifier checkpoint's 'masks' must be a dict "
                f"{{tensor_fqn: mask}}, got {type(masks).__name__}."
            )
        mine = self.masks
        if set(masks) != set(mine):
            raise ValueError(
                "The checkpoint's tensors do not match this sparsifier's.\n"
                f"missing from the checkpoint: {sorted(set(mine) - set(masks))}\n"
                f"unexpected in the checkpoint: {sorted(set(masks) - set(mine))}"
            )
        settings = state_dict["settings"]
        if not isinstance(settings, Mapping):
            raise TypeError(
                "The sparsifier checkpoint's 'settings' must be a dict, got "
                f"{type(settings).__name__}."
            )
        current = self._settings()
        mismatched = sorted(
            key for key, value in current.items() if not _same(settings.get(key), value)
        )
        if mismatched:
            lines = "\n".join(
                f"{key}: checkpoint {settings.get(key)!r}, "
                f"this sparsifier {current[key]!r}"
                for key in mismatched
            )
            raise ValueError(
                "The checkpoint was made with other settings:\n"
                f"{lines}\nBuild the sparsifier with the checkpoint's settings."
            )
        targets = self.topology.targets
        loaded = {
            fqn: decode_mask(
                masks[fqn], fqn, tuple(mask.shape), targets[fqn], version=version
            )
            for fqn, mask in mine.items()
        }
        # Everything is checked: from here on state changes.
        with torch.no_grad():
            for fqn, mask in loaded.items():
                mine[fqn].copy_(mask)
        self.topology.apply_masks(self.optimizer)
        self.generator.set_state(generator_state)
        self.step_count = counts["step"]
        self.update_count = counts["updates"]
        self._arm()

    # -- lifecycle and display ----------------------------------------------------

    def apply_masks(self) -> None:
        """Zero the stored weights and optimizer state outside the current masks.

        sparsetorch keeps them zero on every path it controls. Call this after
        writing a masked weight yourself, e.g. ``nn.init.normal_(layer.weight)``,
        which writes through to the stored weight.

        Example::

            >>> import torch
            >>> import sparsetorch as st
            >>> layer = torch.nn.Linear(4, 4)
            >>> sparsifier = st.sparsify(layer, policy="static", sparsity=0.5)
            >>> _ = torch.nn.init.ones_(layer.weight)
            >>> sparsifier.apply_masks()
            >>> int(layer.weight.count_nonzero())
            8
        """
        self.topology.apply_masks(self.optimizer)

    def remove(self) -> None:
        """Bake the masks into the weights and remove every parametrization and hook.

        The model becomes a plain model with zeros, whose parameters are the same
        objects the optimizer holds. The sparsifier cannot be used afterwards.

        Raises:
            RuntimeError: the weights were sharded (FSDP) after sparsifying.
        """
        _distributed.check_params_unsharded(self.topology.params)
        if self._hook is not None:
            self._hook.remove()
            self._hook = None
        set_execution(self.topology, "mask")
        self.topology.remove()

    def set_execution(self, execution: str) -> None:
        """Switch the masked ``nn.Linear`` layers to ``execution``.

        ``"mask"`` computes densely on the masked weights; ``"sparse"`` on
        compressed weights; ``"auto"`` sparse where it is predicted faster (see
        ``docs/sparse_execution.md``). Other masked layers always compute in
        mask mode. Results agree up to float rounding in every mode.

        Raises:
            ValueError: unknown ``execution``.
            TypeError: ``execution`` is not a string.

        Example::

            >>> import torch
            >>> import sparsetorch as st
            >>> model = torch.nn.Sequential(torch.nn.Linear(64, 64))
            >>> sparsifier = st.sparsify(model, policy="static", sparsity=0.9)
            >>> sparsifier.set_execution("sparse")
            >>> sparsifier.execution, type(model[0].forward).__name__
            ('sparse', 'SparseExecution')
        """
        set_execution(self.topology, execution)
        self.execution = execution

    def export(self, *, execution: str = "auto", batch_size: int = 128) -> nn.Module:
        """An inference copy of the model with compressed ``nn.Linear`` weights.

        See :func:`sparsetorch.execution.export_sparse`; the model is unchanged.

        Raises:
            ValueError: unknown ``execution`` or ``batch_size < 1``.

        Example::

            >>> import torch
            >>> import sparsetorch as st
            >>> model = torch.nn.Sequential(torch.nn.Linear(64, 64))
            >>> sparsifier = st.sparsify(model, policy="static", sparsity=0.9)
            >>> sparsifier.export(execution="sparse")
            Sequential(
              (0): SparseLinear(in_features=64, out_features=64, nnz=410, bias=True)
            )
        """
        return export_sparse(
            self.topology.model, execution=execution, batch_size=batch_size
        )

    def next_update_step(self) -> int | None:
        """The first step after the current one whose update is scheduled."""
        s = self.schedule
        if not self.policy.dynamic or s.end_step is None:
            return None
        k = max(self.step_count + 1, s.begin_step)
        k = math.ceil(k / s.update_interval) * s.update_interval
        return k if k < s.end_step else None

    def summary(self) -> str:
        """A table, one line per tensor: shape, target and actual sparsity, counts."""
        rows = []
        total_active = total_numel = 0
        sparsities = self.topology.sparsities
        for fqn, mask in self.masks.items():
            active, numel = int(mask.sum()), mask.numel()
            total_active += active
            total_numel += numel
            shape = "(" + ", ".join(str(d) for d in mask.shape) + ")"
            rows.append(
                (fqn, shape, sparsities[fqn], 1 - active / numel, active, numel)
            )
        rows.append(
            (
                "total",
                "",
                self.sparsity,
                1 - total_active / total_numel,
                total_active,
                total_numel,
            )
        )
        width = max(len("tensor"), *(len(r[0]) for r in rows))
        swidth = max(len("shape"), *(len(r[1]) for r in rows))
        lines = [
            f"{'tensor':<{width}}  {'shape':<{swidth}}  target  actual"
            "     active      numel"
        ]
        for fqn, shape, target, actual, active, numel in rows:
            lines.append(
                f"{fqn:<{width}}  {shape:<{swidth}}  {target:.4f}  {actual:.4f}"
                f"  {active:>9}  {numel:>9}"
            )
        lines += [f"skipped: {fqn} ({why}, dense)" for fqn, why in self.skipped.items()]
        return "\n".join(lines)

    def __repr__(self) -> str:
        nxt = self.next_update_step()
        return (
            f"Sparsifier(policy={self.policy!r}, step={self.step_count}, "
            f"updates={self.update_count}, next_update="
            f"{'none' if nxt is None else nxt})\n{self.summary()}"
        )


def _check_version(state_dict: Mapping[str, Any]) -> int:
    """The checkpoint's format version, if this sparsetorch reads it."""
    if "format_version" not in state_dict:
        hint = (
            "It looks like a rigl-torch RigLScheduler state dict, which sparsetorch "
            "does not read: start from the model's weights instead."
            if "backward_masks" in state_dict
            else "Pass the dict made by sparsifier.state_dict()."
        )
        raise ValueError(
            "Not a sparsifier checkpoint: it has no 'format_version' "
            f"(keys: {sorted(map(str, state_dict))}).\n{hint}"
        )
    version = state_dict["format_version"]
    if isinstance(version, int) and version > FORMAT_VERSION:
        raise ValueError(
            f"The sparsifier checkpoint has format_version {version}, newer than "
            f"this sparsetorch reads (versions {list(READABLE_VERSIONS)}).\n"
            "Upgrade sparsetorch to load it."
        )
    if (
        isinstance(version, bool)
        or not isinstance(version, int)
        or version not in READABLE_VERSIONS
    ):
        raise ValueError(
            f"Unknown sparsifier checkpoint format_version {version!r}; this "
            f"sparsetorch reads versions {list(READABLE_VERSIONS)}."
        )
    return version


def _restart_lbfgs(optimizer: torch.optim.LBFGS) -> None:
    """Drop L-BFGS's curvature history after an update.

    The history is flat over all parameters and spans the dropped weights, so
    the next direction would write outside the masks. The next step starts
    afresh (steepest descent), as L-BFGS's first step does.
    """
    state = optimizer.state[optimizer.param_groups[0]["params"][0]]
    history = ("d", "t", "old_dirs", "old_stps", "ro", "H_diag", "prev_flat_grad")
    for key in (*history, "prev_loss"):
        state.pop(key, None)
    if "n_iter" in state:
        state["n_iter"] = 0


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, float) or isinstance(b, float):
        return (
            isinstance(a, (int, float))
            and isinstance(b, (int, float))
            and (math.isclose(a, b, rel_tol=1e-9, abs_tol=1e-12))
        )
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    return bool(a == b)
