"""Sparse training in the Hugging Face Trainer: :class:`SparseTrainingCallback`.

One line makes the Trainer's model sparse::

    trainer = Trainer(model, args, train_dataset=...,
                      callbacks=[SparseTrainingCallback(sparsity=0.9)])

The callback follows the Trainer's order of events:

1. ``on_init_end`` (end of ``Trainer.__init__``): :func:`sparsetorch.sparsify`
   the model, before ``train`` loads a checkpoint's weights and before
   Accelerate wraps the model in ``DistributedDataParallel``. Under DDP every
   rank starts from rank 0's masks.
2. ``train(resume_from_checkpoint=...)`` loads the weights into the sparsified
   model, builds the optimizer, wraps the model and loads the optimizer and
   scheduler states; none of them is masked before the next step.
3. ``on_train_begin``: the torch optimizer inside the Trainer's (Accelerate's
   ``AcceleratedOptimizer``) is attached
   (:meth:`sparsetorch.Sparsifier.attach_optimizer`): its steps advance the
   sparsifier.
   The run length is the Trainer's ``max_steps``. On resume, the sparsifier
   state saved in the checkpoint folder is loaded: masks, step count and
   generator state, so the run continues as if it had never stopped.
4. ``on_save``: the sparsifier state is written next to the Trainer's own
   files, as ``checkpoint-N/sparsifier.pt``.

Why a callback reads ``output_dir/checkpoint-<global_step>``: a
``TrainerCallback`` is not told the ``resume_from_checkpoint`` path, but the
Trainer saves every checkpoint there and restores ``global_step`` from it
before ``on_train_begin``. To never load masks that belong to other weights,
the file also holds a checksum of the masked weights, compared with the
weights the Trainer just loaded. See ``docs/integrations.md``.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor
from transformers import (
    TrainerCallback,
    TrainerControl,
    TrainerState,
    TrainingArguments,
)
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

from sparsetorch import _distributed
from sparsetorch.integrations._common import SparsifyArguments
from sparsetorch.policies.base import Policy
from sparsetorch.sparsifier import Sparsifier
from sparsetorch.structure import Structure
from sparsetorch.topology import named_tensors

__all__ = ["SPARSIFIER_NAME", "SparseTrainingCallback"]

#: The sparsifier state's file in each ``checkpoint-N`` folder.
SPARSIFIER_NAME = "sparsifier.pt"


class SparseTrainingCallback(SparsifyArguments, TrainerCallback):
    r"""Train the Hugging Face ``Trainer``'s model sparse, checkpoints included.

    The arguments are those of :func:`sparsetorch.sparsify` (see there), except
    the model and optimizer, which come from the Trainer.

    The Trainer's checkpoints (``save_strategy``) hold the sparsifier state as
    ``checkpoint-N/sparsifier.pt``, and ``trainer.train(resume_from_checkpoint=
    True)`` (or a ``checkpoint-N`` folder of ``output_dir``) resumes exactly as
    if the run had not stopped: masks, weights, optimizer state, step count.
    It works under DDP (``torchrun``; ranks keep identical masks), with
    ``gradient_accumulation_steps`` (it counts optimizer steps, not batches),
    ``max_grad_norm``, ``bf16``, ``activation_checkpointing`` and
    ``load_best_model_at_end`` (the best checkpoint's masks come back with its
    weights). Under ``fp16``, a step the gradient scaler skips is not counted.
    ``model.save_pretrained`` writes the dense model's keys with masked values:
    ``from_pretrained`` loads them into the plain model class.

    With the default selection, an output layer tied to the input embedding
    (GPT-2's ``lm_head``, BERT's decoder) stays dense and is listed in
    ``sparsifier.summary()``; GPT-2's ``Conv1D`` layers are sparsified.

    Each time the Trainer logs (``logging_steps``), the callback adds
    :meth:`sparsetorch.Sparsifier.metrics` to the logs: ``sparsity/sparsity``,
    ``sparsity/mask_change`` (the share of active weights the last topology
    update grew), ``sparsity/updates`` and, with ``itop=True``,
    ``sparsity/itop`` (the share of masked weights ever active, Liu et al.
    2021). They reach ``trainer.state.log_history`` and the callbacks after
    this one (the console printer among them). The Trainer calls its
    ``report_to`` integrations (TensorBoard, W&B, ...) before the callbacks
    passed to it; to send the metrics there too, move this callback first:
    ``trainer.callback_handler.callbacks.insert(0,
    trainer.pop_callback(callback))``.

    Args:
        policy: ``"rigl"``, ``"set"``, ``"static"`` or a
            :class:`~sparsetorch.Policy`. Default: ``"rigl"``.
        sparsity: fraction of zeros over all selected weights. Default: ``0.9``.
        distribution: ``"uniform"``, ``"er"``, ``"erk"`` or
            ``{tensor_fqn: sparsity}``. Default: ``"erk"``.
        total_steps: optimizer steps in the whole run. Default: ``None`` (the
            Trainer's ``max_steps``, known at ``on_train_begin``).
        update_interval: optimizer steps between updates. Default: ``100``.
        drop_fraction: fraction of active weights dropped at ``begin_step``.
            Default: ``0.3``.
        drop_schedule: ``"cosine"``, ``"linear"`` or ``"constant"``.
            Default: ``"cosine"``.
        begin_step: first step that may update. Default: ``0``.
        end_step: no update at or after this step. Default: ``None``
            (``int(0.75 * total_steps)``).
        include: fnmatch globs over the model's ``tensor_fqn`` selecting the
            tensors. Default: ``None`` (the weights of ``nn.Linear``,
            ``nn.Conv*`` and ``Conv1D``).
        exclude: fnmatch globs removed from the selection. Default: ``None``.
        grow_init: value of newly grown weights. Default: ``"zeros"``.
        seed: seed of the mask generator. Default: ``0``.
        execution: ``"mask"``, ``"sparse"`` or ``"auto"``. Default: ``"mask"``.
        structure: ``None``, ``"N:M"`` (e.g. ``"2:4"``), ``"constant-fan-in"``
            or a :mod:`sparsetorch.structure` object. Default: ``None``.
        log_metrics: add the metrics above to the Trainer's logs.
            Default: ``True``.
        itop: track the ITOP rate (one more bool per masked weight, saved
            with the sparsifier state). Default: ``False``.

    Raises:
        ValueError: at ``on_init_end``, the arguments as
            :func:`sparsetorch.sparsify` raises them (the model is unchanged).
        RuntimeError: at ``on_train_begin``, the Trainer's model is not the one
            this callback sparsified and the run is distributed (``model_init``
            under DDP), or a resumed checkpoint has no matching sparsifier state.

    Example::

        >>> import tempfile
        >>> import torch
        >>> from transformers import Trainer, TrainingArguments
        >>> from sparsetorch.integrations.transformers import SparseTrainingCallback
        >>> model = torch.nn.Sequential(torch.nn.Linear(8, 8))
        >>> callback = SparseTrainingCallback(policy="static", sparsity=0.75)
        >>> args = TrainingArguments(tempfile.mkdtemp(), use_cpu=True, report_to=[])
        >>> trainer = Trainer(model, args, callbacks=[callback])
        >>> int(callback.sparsifier.masks["0.weight"].sum())
        16
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
        self._run_steps: int | None = total_steps  # the schedule's total_steps

    @property
    def sparsifier(self) -> Sparsifier | None:
        """The :class:`~sparsetorch.Sparsifier`, once the Trainer is built."""
        return self._sparsifier

    # -- the Trainer's order of events -------------------------------------------

    def on_init_end(
        self,
        args: TrainingArguments,
        state: TrainerState,
        control: TrainerControl,
        **kwargs: Any,
    ) -> None:
        """Sparsify the model, before weights load and Accelerate wraps it."""
        if self._sparsifier is None:
            self._sparsifier = self._sparsify_model(kwargs["model"])
            if self.itop:
                self._sparsifier.track_itop()

    def on_train_begin(
        self,
        args: TrainingArguments,
        state: TrainerState,
        control: TrainerControl,
        **kwargs: Any,
    ) -> None:
        """Attach the optimizer, fix the run length, load a resumed checkpoint."""
        model = kwargs["model"]
        sparsifier = self._sparsifier
        late = sparsifier is None or sparsifier.topology.model is not model
        if late and _distributed.world_size() > 1:
            # Added after __init__ (trainer.add_callback), or a new model from
            # model_init: the Trainer has wrapped it already.
            raise RuntimeError(
                "SparseTrainingCallback must sparsify the model before the "
                "Trainer wraps it in DistributedDataParallel, at the end of "
                "Trainer.__init__, but the Trainer now trains another model "
                f"({type(model).__name__}: added with trainer.add_callback, "
                "or built by model_init).\nPass the callback to the Trainer "
                "that trains it, Trainer(model, ..., callbacks=[...]), "
                "without model_init."
            )
        saved = None
        if state.global_step > 0:  # resumed: the Trainer restored trainer_state
            # The stored weights the Trainer loaded, before anything masks them.
            weights = dict(named_tensors(model))
            saved = _read(_checkpoint_folder(args, state), weights, resumed=True)
        if sparsifier is None or late:
            sparsifier = self._sparsifier = self._sparsify_model(model)
            if self.itop:
                sparsifier.track_itop()
        sparsifier.attach_optimizer(kwargs["optimizer"])  # AcceleratedOptimizer
        if self.total_steps is None and self.end_step is None:
            # On resume, the checkpoint's run length: training for more steps
            # after a resume does not stretch the schedule already under way.
            run = saved["total_steps"] if saved is not None else None
            self._run_steps = run if run is not None else state.max_steps
            sparsifier.set_total_steps(self._run_steps)
        if sparsifier.total_steps is None and state.max_steps > 0:
            sparsifier.total_steps = state.max_steps  # for sparsifier.flops()
        if saved is not None:
            sparsifier.load_state_dict(saved["sparsifier"])

    def on_log(
        self,
        args: TrainingArguments,
        state: TrainerState,
        control: TrainerControl,
        logs: dict[str, float] | None = None,
        **kwargs: Any,
    ) -> None:
        """Add the sparsifier's metrics to the logs and to the log history."""
        if self._sparsifier is None or not self.log_metrics or logs is None:
            return
        metrics = self._sparsifier.metrics()
        logs.update(metrics)
        history = state.log_history
        if history and history[-1].get("step") == state.global_step:
            history[-1].update(metrics)  # the Trainer's copy of these logs

    def on_save(
        self,
        args: TrainingArguments,
        state: TrainerState,
        control: TrainerControl,
        **kwargs: Any,
    ) -> None:
        """Write the sparsifier state into the checkpoint just saved."""
        if self._sparsifier is None or not args.should_save:
            return
        folder = _checkpoint_folder(args, state)
        if not os.path.isdir(folder):
            raise RuntimeError(
                f"SparseTrainingCallback found no checkpoint folder {folder} to "
                "save the sparsifier state into. Hyperparameter search "
                "(trainer.hyperparameter_search) saves elsewhere and is not "
                "supported."
            )
        sparsifier = self._sparsifier
        torch.save(
            {
                "sparsifier": sparsifier.state_dict(),
                "checksums": _checksums(sparsifier),
                "total_steps": self._run_steps,
            },
            os.path.join(folder, SPARSIFIER_NAME),
        )

    def on_train_end(
        self,
        args: TrainingArguments,
        state: TrainerState,
        control: TrainerControl,
        **kwargs: Any,
    ) -> None:
        """With ``load_best_model_at_end``, restore the best checkpoint's masks."""
        best = state.best_model_checkpoint
        if self._sparsifier is not None and args.load_best_model_at_end and best:
            weights = dict(named_tensors(kwargs["model"]))
            saved = _read(best, weights, resumed=False)
            self._sparsifier.load_state_dict(saved["sparsifier"])

    # -- helpers ------------------------------------------------------------------


def _read(
    folder: str, weights: Mapping[str, Tensor], *, resumed: bool
) -> dict[str, Any]:
    """``folder``'s saved sparsifier state, after checking it fits ``weights``.

    ``weights`` (``tensor_fqn -> stored tensor``) are those the Trainer has
    just loaded from ``folder``, before anything masks them. Nothing changes.
    """
    path = os.path.join(folder, SPARSIFIER_NAME)
    if not os.path.isfile(path):
        how = (
            "The Trainer resumed at this step; the callback reads the "
            "sparsifier state from output_dir/checkpoint-<global_step>, where "
            "the Trainer saves it. Resume with resume_from_checkpoint=True or "
            "a checkpoint folder of output_dir (copy it there), saved by a "
            "run with this callback."
            if resumed
            else "Its weights were saved by a run without this callback."
        )
        raise RuntimeError(
            f"SparseTrainingCallback found no sparsifier state {path}.\n{how}"
        )
    saved: dict[str, Any] = torch.load(path, map_location="cpu", weights_only=True)
    differ = sorted(
        fqn
        for fqn, value in saved["checksums"].items()
        if fqn not in weights or _bit_sum(weights[fqn].detach()) != value
    )
    if differ:
        raise RuntimeError(
            f"The sparsifier state {path} was saved with other weights than "
            f"those the Trainer loaded (they differ in {differ}), so its "
            "masks would cut trained weights.\nResume from the checkpoint "
            "folder in args.output_dir that this run saved: "
            "resume_from_checkpoint=True."
        )
    return saved


def _checkpoint_folder(args: TrainingArguments, state: TrainerState) -> str:
    """Where ``Trainer._save_checkpoint`` writes the checkpoint of this step."""
    # output_dir is None only before TrainingArguments.__post_init__ sets it.
    root = str(args.output_dir)
    return os.path.join(root, f"{PREFIX_CHECKPOINT_DIR}-{state.global_step}")


def _checksums(sparsifier: Sparsifier) -> dict[str, int]:
    """An exact fingerprint of each masked weight's nonzero values, as saved.

    The sum of their bit patterns as integers (:func:`_bit_sum`): independent
    of summation order, so of the device, and equal for the saved (masked)
    weights and their loaded copy, whose values outside the saved masks are
    zeros of either sign.
    """
    with torch.no_grad():
        return {
            fqn: _bit_sum(weight.detach() * sparsifier.masks[fqn])
            for fqn, weight in sparsifier.topology.params.items()
        }


def _bit_sum(values: Tensor) -> int:
    """The sum of the nonzero values' bit patterns, as integers (exact)."""
    size = values.element_size()
    bits = {1: torch.int8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[size]
    flat = values.flatten()
    pattern = flat.view(bits).to(torch.int64)
    return int(torch.where(flat != 0, pattern, 0).sum())
