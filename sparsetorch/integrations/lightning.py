"""Sparse training in Lightning: the :class:`SparseTraining` callback.

One line makes a ``LightningModule`` sparse::

    trainer = Trainer(callbacks=[SparseTraining(policy="rigl", sparsity=0.9)])

The callback follows the Trainer's own order of events:

1. ``setup("fit")``: :func:`sparsetorch.sparsify` the module, before the
   Trainer restores a checkpoint's weights and before the strategy wraps the
   module in ``DistributedDataParallel``. Under DDP every rank starts from rank
   0's masks.
2. Checkpoint restore (``fit(ckpt_path=...)``): the weights load into the
   sparsified module, then the callback's :meth:`~SparseTraining.load_state_dict`
   loads the sparsifier's masks, step count and generator state.
3. ``on_fit_start``: after ``configure_optimizers``, the optimizer holding the
   masked weights is attached (:meth:`sparsetorch.Sparsifier.attach_optimizer`);
   its steps advance the sparsifier. The run length comes from
   ``trainer.estimated_stepping_batches`` unless ``total_steps`` was given.
   The optimizer state the Trainer restores afterwards is masked before its next
   step.

The sparsifier's state travels in Lightning's checkpoint under
``checkpoint["callbacks"]["SparseTraining"]``; ``checkpoint["state_dict"]`` keeps
the dense model's keys with masked values, so it loads into the plain module.
See ``docs/integrations.md``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.callbacks import Callback
from torch import Tensor

from sparsetorch._checkpoint import encode_mask
from sparsetorch.integrations._common import SparsifyArguments
from sparsetorch.policies.base import Policy
from sparsetorch.sparsifier import Sparsifier
from sparsetorch.structure import Structure
from sparsetorch.topology import select_tensors

__all__ = ["SparseTraining"]

#: Strategies sparsetorch cannot follow: FSDP1 and DeepSpeed shard the weights
#: into flat parameters. (ModelParallelStrategy, FSDP2, works: the module is
#: sparsified whole in ``setup``, sharded in ``configure_model``, and the masks
#: follow the shards.)
_SHARDED_STRATEGIES = ("FSDPStrategy", "DeepSpeedStrategy")


class SparseTraining(SparsifyArguments, Callback):
    r"""Train a ``LightningModule`` sparse: masks, topology updates, checkpoints.

    The arguments are those of :func:`sparsetorch.sparsify` (see there), except
    the model and optimizer, which come from the Trainer, plus what to log.

    Lightning's own checkpoints (``ModelCheckpoint``,
    ``trainer.save_checkpoint``) hold the sparsifier state, and
    ``trainer.fit(model, ckpt_path=...)`` resumes exactly as if the run had not
    stopped: masks, weights, optimizer state and step count. The callback works
    with ``strategy="ddp"`` (ranks keep identical masks),
    ``accumulate_grad_batches`` (it counts optimizer steps, not batches),
    ``gradient_clip_val`` and mixed precision.

    Logged through the module's logger on every training step (``on_step``):

    * ``sparsity/sparsity``: fraction of zeros over the masked weights.
    * ``sparsity/mask_change``: fraction of the active weights that the last
      topology update replaced (0 before the first update).
    * ``sparsity/updates``: topology updates so far.
    * ``sparsity/itop`` (with ``itop=True``): the in-time over-parameterization
      rate of Liu et al. 2021 (https://arxiv.org/abs/2102.02887), the fraction of
      the masked weights that were active at some point of the run. It keeps one
      bool per masked weight (as much memory as the masks), checkpointed with the
      sparsifier.

    These are :meth:`sparsetorch.Sparsifier.metrics`, recorded by the
    sparsifier at each update (see :mod:`sparsetorch.metrics`).

    Args:
        policy: ``"rigl"``, ``"set"``, ``"static"`` or a
            :class:`~sparsetorch.Policy`. Default: ``"rigl"``.
        sparsity: fraction of zeros over all selected weights. Default: ``0.9``.
        distribution: ``"uniform"``, ``"er"``, ``"erk"`` or
            ``{tensor_fqn: sparsity}``. Default: ``"erk"``.
        total_steps: optimizer steps in the whole run. Default: ``None``
            (``trainer.estimated_stepping_batches``, which counts accumulation;
            restored from the checkpoint on resume).
        update_interval: optimizer steps between updates. Default: ``100``.
        drop_fraction: fraction of active weights dropped at ``begin_step``.
            Default: ``0.3``.
        drop_schedule: ``"cosine"``, ``"linear"`` or ``"constant"``.
            Default: ``"cosine"``.
        begin_step: first step that may update. Default: ``0``.
        end_step: no update at or after this step. Default: ``None``
            (``int(0.75 * total_steps)``).
        include: fnmatch globs over the module's ``tensor_fqn`` selecting the
            tensors. Default: ``None`` (``nn.Linear`` and ``nn.Conv*`` weights).
        exclude: fnmatch globs removed from the selection. Default: ``None``.
        grow_init: value of newly grown weights. Default: ``"zeros"``.
        seed: seed of the mask generator. Default: ``0``.
        execution: ``"mask"``, ``"sparse"`` or ``"auto"``. Default: ``"mask"``.
        structure: ``None``, ``"N:M"`` (e.g. ``"2:4"``), ``"constant-fan-in"``
            or a :mod:`sparsetorch.structure` object. Default: ``None``.
        log_metrics: log the metrics above with ``pl_module.log_dict``.
            Default: ``True``.
        itop: track and log the ITOP rate. Default: ``False``.

    Raises:
        RuntimeError: at ``setup``, under FSDP1 (``FSDPStrategy``), DeepSpeed
            or another strategy restoring checkpoints after setup
            (``ModelParallelStrategy``, FSDP2, works), or when this callback
            already trained another
            module; at ``on_fit_start``, when tensors appeared after ``setup``
            (built in ``configure_model``).
        ValueError: at ``setup``, the arguments as :func:`sparsetorch.sparsify`
            raises them; at ``on_fit_start``, no optimizer holds the masked
            weights, or the run length is unknown (an iterable dataset without
            ``max_steps``) and neither ``total_steps`` nor ``end_step`` was given.

    Example::

        >>> import lightning.pytorch as pl
        >>> from sparsetorch.integrations.lightning import SparseTraining
        >>> callback = SparseTraining(policy="rigl", sparsity=0.9, update_interval=50)
        >>> trainer = pl.Trainer(callbacks=[callback], logger=False,
        ...                      enable_progress_bar=False, enable_model_summary=False,
        ...                      enable_checkpointing=False)
        >>> callback.sparsifier is None  # until trainer.fit(model)
        True
    """

    def __init__(
        self,
        *,
        policy: str | Policy = "rigl",
        sparsity: float = 0.9,
        distribution: str | Mapping[str, float] = "erk",
        total_steps: int | None = None,
        update_interval: int = 100,
        drop_fraction: float = 0.3,
        drop_schedule: str = "cosine",
        begin_step: int = 0,
        end_step: int | None = None,
        include: Sequence[str] | None = None,
        exclude: Sequence[str] | None = None,
        grow_init: str | float = "zeros",
        seed: int = 0,
        execution: str = "mask",
        structure: str | Structure | None = None,
        log_metrics: bool = True,
        itop: bool = False,
    ) -> None:
        self.policy = policy
        self.sparsity = sparsity
        self.distribution = distribution
        self.total_steps = total_steps
        self.update_interval = update_interval
        self.drop_fraction = drop_fraction
        self.drop_schedule = drop_schedule
        self.begin_step = begin_step
        self.end_step = end_step
        self.include = include
        self.exclude = exclude
        self.grow_init = grow_init
        self.seed = seed
        self.execution = execution
        self.structure = structure
        self.log_metrics = log_metrics
        self.itop = itop
        self._sparsifier: Sparsifier | None = None
        self._module: pl.LightningModule | None = None
        self._run_steps: int | None = total_steps  # the schedule's total_steps

    # -- what users read ----------------------------------------------------------

    @property
    def sparsifier(self) -> Sparsifier | None:
        """The :class:`~sparsetorch.Sparsifier`, from ``setup("fit")`` on."""
        return self._sparsifier

    @property
    def itop_rate(self) -> float | None:
        """Fraction of the masked weights ever active (``None`` unless ``itop``)."""
        if self._sparsifier is None:
            return None
        return self._sparsifier.metrics().get("sparsity/itop")

    @property
    def mask_change(self) -> float:
        """Fraction of the active weights the last update grew (0 before any)."""
        if self._sparsifier is None:
            return 0.0
        return self._sparsifier.metrics()["sparsity/mask_change"]

    # -- the Trainer's order of events -------------------------------------------

    def setup(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str
    ) -> None:
        """Sparsify ``pl_module`` for ``fit``, before weights load and DDP wraps."""
        if stage != "fit":
            return  # validate / test / predict run the module as it is
        if self._sparsifier is not None:
            raise RuntimeError(
                "This SparseTraining callback already trains "
                f"{type(self._module).__name__}; a callback makes one fit "
                "sparse.\nFor another fit, pass a new SparseTraining to a new "
                "Trainer; to continue a run, resume it with "
                "trainer.fit(model, ckpt_path=...)."
            )
        strategy = type(trainer.strategy)
        names = {cls.__name__ for cls in strategy.__mro__}
        if names & set(_SHARDED_STRATEGIES) or (
            trainer.strategy.restore_checkpoint_after_setup
            and "ModelParallelStrategy" not in names
        ):
            raise RuntimeError(
                f"SparseTraining does not support the {strategy.__name__} "
                "strategy: it shards the weights or restores checkpoints after "
                "wrapping the module, and sparsetorch keeps whole local tensors "
                "whose masks must exist before the weights load.\n"
                'Use strategy="ddp" (or a single device); for FSDP2, '
                "ModelParallelStrategy with fully_shard in configure_model."
            )
        self._sparsifier = self._sparsify_model(pl_module)
        self._module = pl_module
        if self.itop:
            self._sparsifier.track_itop()

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Attach the optimizer from ``configure_optimizers``; fix the run length."""
        sparsifier = self._require_sparsifier("on_fit_start")
        self._check_nothing_new(pl_module, sparsifier)
        params = {id(p) for p in sparsifier.topology.params.values()}
        holding = [
            opt
            for opt in trainer.optimizers
            if any(id(p) in params for g in opt.param_groups for p in g["params"])
        ]
        if not holding:
            raise ValueError(
                "None of the optimizers returned by configure_optimizers holds the "
                f"masked weights {sorted(sparsifier.masks)}.\n"
                "Build the optimizer over self.parameters() in configure_optimizers."
            )
        # The first optimizer's steps advance the sparsifier; the others (a
        # second optimizer over part of the weights) get their state masked.
        for i, optimizer in enumerate(holding):
            sparsifier.attach_optimizer(optimizer, count_steps=i == 0)
        if (
            sparsifier.policy.dynamic
            and self._run_steps is None
            and self.end_step is None
        ):
            self._run_steps = _run_length(trainer)
            sparsifier.set_total_steps(self._run_steps)
        if sparsifier.total_steps is None:  # for sparsifier.flops()
            estimate = trainer.estimated_stepping_batches
            if estimate != float("inf") and estimate >= 1:
                sparsifier.total_steps = int(estimate)

    def on_train_batch_end(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
    ) -> None:
        """Log the metrics (:meth:`sparsetorch.Sparsifier.metrics`)."""
        self._require_sparsifier("on_train_batch_end")
        if self.log_metrics:
            pl_module.log_dict(self.metrics(), on_step=True, on_epoch=False)

    def metrics(self) -> dict[str, float]:
        """The logged metrics now (see the class docstring)."""
        return self._require_sparsifier("metrics").metrics()

    # -- checkpoints --------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """The sparsifier state (with the metrics' state) and the run length.

        Lightning stores it in ``checkpoint["callbacks"][self.state_key]``; it
        loads with ``torch.load(..., weights_only=True)``.
        """
        if self._sparsifier is None:
            return {}
        return {
            # Under ModelParallelStrategy (FSDP2) the masks are gathered whole:
            # Lightning saves the callbacks' state from rank 0 alone.
            "sparsifier": self._sparsifier.state_dict(sharded=False),
            "total_steps": self._run_steps,
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore the sparsifier after the checkpoint's weights were loaded.

        The Trainer calls it between ``setup`` and ``on_fit_start``, so the
        masks are the checkpoint's before DDP wraps the module and before the
        optimizer state is restored.
        """
        if self._sparsifier is None or not state_dict:
            return  # not fitting (validate / test), or a checkpoint without it
        sparsifier = self._sparsifier
        saved = _with_old_itop(state_dict)
        saved_steps = state_dict.get("total_steps")
        settable = sparsifier.policy.dynamic and self.end_step is None
        if settable and saved_steps is not None and saved_steps != self._run_steps:
            # The checkpoint's schedule, so that its settings match; then the
            # total_steps given to this callback, if any, extends the run.
            sparsifier.set_total_steps(saved_steps)
            sparsifier.load_state_dict(saved)
            if self.total_steps is not None:
                sparsifier.set_total_steps(self.total_steps)
            self._run_steps = self.total_steps or saved_steps
        else:
            sparsifier.load_state_dict(saved)

    # -- helpers ------------------------------------------------------------------

    def _require_sparsifier(self, hook: str) -> Sparsifier:
        if self._sparsifier is None:
            raise RuntimeError(
                f"SparseTraining.{hook} ran before setup('fit') sparsified the "
                "module. Pass the callback to the Trainer that fits: "
                "Trainer(callbacks=[SparseTraining(...)]).fit(model)."
            )
        return self._sparsifier

    def _check_nothing_new(
        self, pl_module: pl.LightningModule, sparsifier: Sparsifier
    ) -> None:
        """Refuse tensors that appeared after ``setup`` (``configure_model``)."""
        try:
            now = select_tensors(pl_module, self.include, self.exclude)
        except ValueError:
            return
        new = [fqn for fqn in now if fqn not in sparsifier.masks]
        new = [fqn for fqn in new if fqn not in sparsifier.skipped]
        if new:
            raise RuntimeError(
                f"The tensors {new} appeared after SparseTraining sparsified the "
                "module in setup('fit'), so they would train dense.\nBuild the "
                "layers in __init__ (or the module's setup), not in "
                "configure_model, or leave them out with exclude=[...]."
            )


def _with_old_itop(state_dict: Mapping[str, Any]) -> Mapping[str, Any]:
    """The sparsifier state, with the ITOP masks of an older callback checkpoint.

    Callbacks before ``sparsetorch.metrics`` kept them as ``"ever_active"``
    (``{tensor_fqn: bool tensor}``) in their own state.
    """
    saved: Mapping[str, Any] = state_dict["sparsifier"]
    ever = state_dict.get("ever_active")
    if ever is None or "metrics" in saved or not isinstance(ever, Mapping):
        return saved
    return {
        **saved,
        "metrics": {
            "history": [],
            "last": {},
            "ever_active": {
                fqn: encode_mask(mask) if isinstance(mask, Tensor) else mask
                for fqn, mask in ever.items()
            },
        },
    }


def _run_length(trainer: pl.Trainer) -> int:
    """``trainer.estimated_stepping_batches`` as an int, or a clear error."""
    estimate = trainer.estimated_stepping_batches
    if estimate == float("inf") or estimate < 1:
        raise ValueError(
            "SparseTraining needs the run length to schedule topology updates, "
            f"and the Trainer cannot estimate it (estimated_stepping_batches = "
            f"{estimate}: max_epochs=-1 or an iterable dataset, without "
            "max_steps).\nPass SparseTraining(total_steps=...) or "
            "SparseTraining(end_step=...), or Trainer(max_steps=...)."
        )
    return int(estimate)
