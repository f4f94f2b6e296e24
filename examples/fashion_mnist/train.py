"""One training run: build the model, sparsify it, train, measure.

The loop in :func:`train_one` is the ordinary PyTorch loop; the one
``sparsetorch.sparsify`` call (and SNIP's ``prune_at_init``) is in
:meth:`SparseRun.start`, and what the sweep measures beyond accuracy comes from
the sparsifier afterwards: ``summary()``, ``mask_history`` (mask change and ITOP
rate at every update, with ``track_itop()`` on) and ``flops()``.
"""

from __future__ import annotations

import math
import sys
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from fashion_mnist_data import FashionMNIST, iterate_batches
from torch import nn
from torch.nn import functional as F

from .config import SPARSE_POLICIES, Recipe, RunResult, RunSpec, UsageError, lr_at
from .models import build_model, prunable_weights
from .progress import Meter

# SRigL's neuron ablation threshold (gamma_sal, Lasby et al. 2023) for "fan-in"
FAN_IN_ABLATION = 0.3


def train_one(
    spec: RunSpec,
    recipe: Recipe,
    data: FashionMNIST,
    *,
    progress: bool,
    label: str = "",
    position: int = 0,
) -> RunResult:
    """Trains one model under one policy and returns what it measured.

    Args:
        spec: model, policy, sparsity, distribution, structure, length and seed.
        recipe: the model's budget and hyper-parameters.
        data: train and evaluation tensors.
        progress: whether to show a tqdm bar (when tqdm is importable).
        label: prefix for the progress bar.
        position: the bar's line on the terminal (one per parallel run).
    """
    start_time = time.perf_counter()
    torch.manual_seed(spec.seed)
    model = build_model(spec.model)
    optimizer = torch.optim.SGD(
        model.parameters(),
        lr=recipe.lr,
        momentum=recipe.momentum,
        nesterov=True,
        weight_decay=recipe.weight_decay,
        fused=True,  # one pass over each weight instead of five
    )
    steps_per_epoch = data.train_x.shape[0] // recipe.batch_size
    if steps_per_epoch == 0:
        raise UsageError(
            f"{data.train_x.shape[0]} training examples make no batch of "
            f"{recipe.batch_size}: pass a smaller --batch-size or more data"
        )
    total_steps = spec.length * recipe.epochs * steps_per_epoch
    generator = torch.Generator().manual_seed(spec.seed)
    sparse = SparseRun.start(spec, recipe, model, optimizer, total_steps, data)

    meter = Meter(total_steps, label, position, enabled=progress)
    step = 0
    for _epoch in range(spec.length * recipe.epochs):
        for x, y in iterate_batches(
            data.train_x, data.train_y, recipe.batch_size, generator
        ):
            lr = lr_at(step, total_steps, recipe, steps_per_epoch)
            for group in optimizer.param_groups:
                group["lr"] = lr
            logits = model(x)
            loss = F.cross_entropy(logits, y)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()  # type: ignore[no-untyped-call]
            if sparse.gate():  # rigl-torch's protocol; always True for sparsetorch
                optimizer.step()  # sparsetorch updates the masks in here
            step += 1
            meter.add(step, loss, logits, y, lr)
    meter.close()

    accuracy = evaluate(model, data.test_x, data.test_y)
    sparsity, density = overall_sparsity(model, sparse.masks())
    train_flops, inference_flops = sparse.flops(spec.length)
    return RunResult(
        spec=spec,
        test_accuracy=accuracy,
        train_loss=meter.last_loss,
        overall_sparsity=sparsity,
        layer_density=density,
        wall_s=time.perf_counter() - start_time,
        steps=total_steps,
        train_flops=train_flops,
        inference_flops=inference_flops,
        mask_events=sparse.mask_events(),
        summary=sparse.summary(),
    )


@torch.no_grad()
def evaluate(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    """Top-1 accuracy of ``model`` on ``(x, y)``, in batches of 2000."""
    model.eval()
    correct = 0
    for start in range(0, x.shape[0], 2000):
        logits = model(x[start : start + 2000])
        correct += int((logits.argmax(1) == y[start : start + 2000]).sum())
    model.train()
    return correct / x.shape[0]


def overall_sparsity(
    model: nn.Module, masks: Mapping[str, torch.Tensor]
) -> tuple[float, dict[str, float]]:
    """Overall sparsity of the prunable weights and each one's density.

    Weights without a mask count as dense.
    """
    sizes = prunable_weights(model)
    density: dict[str, float] = {}
    active = 0
    for name, numel in sizes.items():
        mask = masks.get(name)
        count = numel if mask is None else int(mask.sum())
        density[name] = count / numel
        active += count
    return 1.0 - active / sum(sizes.values()), density


class SparseRun:
    """The sparse side of one run: sparsetorch's sparsifier, the peer, or none."""

    def __init__(self) -> None:
        self.sparsifier: Any = None
        self.peer: Any = None
        self.start_itop = 0.0

    @classmethod
    def start(
        cls,
        spec: RunSpec,
        recipe: Recipe,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        total_steps: int,
        data: FashionMNIST,
    ) -> SparseRun:
        """Sparsifies ``model`` as ``spec`` says (or not, for dense)."""
        run = cls()
        end_step = max(1, int(recipe.end_fraction * total_steps))
        if spec.policy in SPARSE_POLICIES:
            st = import_sparsetorch()
            first_dense = spec.distribution == "uniform-first-dense"
            structure = {
                "none": None,
                "2:4": "2:4",
                "fan-in": st.ConstantFanIn(ablation=FAN_IN_ABLATION),
            }[spec.structure]
            run.sparsifier = st.sparsify(
                model,
                optimizer,
                policy=spec.policy,
                sparsity=spec.sparsity,
                distribution="uniform" if first_dense else spec.distribution,
                total_steps=total_steps,
                update_interval=recipe.update_interval,
                drop_fraction=recipe.drop_fraction,
                drop_schedule="cosine",
                end_step=end_step,
                exclude=[next(iter(prunable_weights(model)))] if first_dense else None,
                grow_init="zeros",
                seed=spec.seed,
                structure=structure,
            )
            if spec.policy == "snip":  # one-shot masks from one training batch
                order = torch.Generator().manual_seed(spec.seed)
                batch = next(iterate_batches(data.train_x, data.train_y, 128, order))
                run.sparsifier.prune_at_init(
                    lambda b: F.cross_entropy(model(b[0]), b[1]), [batch]
                )
            run.sparsifier.track_itop()
            run.start_itop = run.sparsifier.metrics()["sparsity/itop"]
        elif spec.policy == "rigl-torch":
            from _rigl_torch_peer import RigLTorchPeer

            run.peer = RigLTorchPeer(
                model,
                optimizer,
                sparsity=spec.sparsity,
                end_step=end_step,
                update_interval=recipe.update_interval,
                drop_fraction=recipe.drop_fraction,
                first_layer_dense=spec.distribution == "uniform-first-dense",
            )
        if recipe.sparse_init == "scaled":
            weights = {
                name: model.get_parameter(name) for name in prunable_weights(model)
            }
            rescale_sparse_init(weights, run.masks())
        return run

    def gate(self) -> bool:
        """Whether to step the optimizer (rigl-torch skips it on update steps)."""
        return self.peer is None or bool(self.peer())

    def masks(self) -> Mapping[str, torch.Tensor]:
        """The live masks (empty for a dense run)."""
        if self.sparsifier is not None:
            return self.sparsifier.masks  # type: ignore[no-any-return]
        if self.peer is not None:
            return self.peer.masks  # type: ignore[no-any-return]
        return {}

    def mask_events(self) -> list[tuple[int, float, float]]:
        """``(step, mask change, ITOP rate)`` at the start and after every update.

        From the sparsifier's ``mask_history``; empty for dense and the peer.
        """
        if self.sparsifier is None:
            return []
        history = self.sparsifier.mask_history
        return [(0, 0.0, self.start_itop)] + [
            (u.step, u.mask_change, u.itop) for u in history
        ]

    def flops(self, length: int) -> tuple[float | None, float | None]:
        """Training FLOPs relative to a 1x dense run, inference FLOPs ratio."""
        if self.peer is not None:
            return None, None
        if self.sparsifier is None:
            return float(length), 1.0
        report = self.sparsifier.flops()  # sizes from the first training forward
        return length * report.training_ratio, report.inference_ratio

    def summary(self) -> str:
        """The sparsifier's (or peer's) per-tensor table; empty for dense."""
        if self.sparsifier is not None:
            return str(self.sparsifier.summary())
        if self.peer is not None:
            return str(self.peer.summary())
        return ""


@torch.no_grad()
def rescale_sparse_init(
    weights: Mapping[str, torch.Tensor], masks: Mapping[str, torch.Tensor]
) -> None:
    """Multiplies each sparse weight by ``1 / sqrt(density)``.

    A layer that keeps a fraction ``d`` of its inputs has its pre-activation
    variance cut by ``d`` under the default (dense) initialisation; the rescale
    restores the dense network's signal scale at step 0 (sparsity-aware
    initialisation, as in Evci et al., 2022). It is part of the recipe, applied
    the same way to every sparse policy, sparsetorch's and rigl-torch's alike; a
    layer that starts dense (GMP) is left as it is.
    """
    for name, mask in masks.items():
        active = int(mask.sum())
        if 0 < active < mask.numel():
            weights[name].mul_(math.sqrt(mask.numel() / active))


def import_sparsetorch() -> Any:
    """Imports sparsetorch, falling back to the checkout this example lives in."""
    try:
        import sparsetorch
    except ImportError:
        root = Path(__file__).resolve().parents[2]
        if not (root / "sparsetorch" / "__init__.py").is_file():
            raise UsageError(
                "sparsetorch is not installed: run `pip install -e .` in the "
                "repository root"
            ) from None
        sys.path.insert(0, str(root))
        import sparsetorch
    if not hasattr(sparsetorch, "sparsify"):
        raise UsageError(
            f"the sparsetorch found at {sparsetorch.__path__} has no sparsify(): "
            "run `pip install -e .` in the repository root"
        )
    return sparsetorch
