"""Sparse training on Fashion-MNIST: dense vs static vs SET vs RigL.

With no flags it runs the comparison sweep (dense, and static / SET / RigL at 90% and
98% sparsity with ERK and uniform allocation, all layers sparse, 3 seeds) on
LeNet-300-100 at a budget of about 10-12 minutes on 2 CPU cores, prints a results table
and one sparsifier's ``summary()``, and writes ``results.json``, ``results.md`` and
PNG plots to ``--out``. ``--quick`` runs the same grid for one seed and two epochs on
a slice of the data, in well under a minute.

Examples::

    python examples/fashion_mnist.py                        # the default sweep
    python examples/fashion_mnist.py --quick                # smoke test
    python examples/fashion_mnist.py --policy rigl --sparsity 0.98 --seeds 1
    python examples/fashion_mnist.py --peer                 # add rigl-torch rows
    python examples/fashion_mnist.py --holdout 5000         # tune on a val split

The data comes from :mod:`fashion_mnist_data` (no torchvision needed). Every run of
one invocation uses the same recipe: SGD with Nesterov momentum 0.9 (torch's fused
kernel), a short linear warm-up then cosine decay of the learning rate, and the same
number of steps. The defaults were chosen on a validation split (``--holdout
10000``), never on the test set: batch size and learning rate for the dense
baseline; epochs and weight decay for dense and RigL together; update interval, drop
fraction and the sparsity-aware initialisation for the sparse policies.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import multiprocessing
import os
import platform
import shlex
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from concurrent.futures import Future, ProcessPoolExecutor, as_completed
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NoReturn

import torch
from _rigl_torch_peer import PeerUnavailableError
from fashion_mnist_data import FashionMNIST, FashionMNISTError, iterate_batches
from fashion_mnist_data import load_fashion_mnist as _load_data
from torch import nn
from torch.nn import functional as F

POLICIES = ("dense", "static", "set", "rigl", "rigl-torch")
SPARSE_POLICIES = ("static", "set", "rigl")
DISTRIBUTIONS = ("erk", "uniform", "er", "uniform-first-dense")
PEER_DISTRIBUTIONS = ("uniform", "uniform-first-dense")
MODELS = ("lenet", "cnn")

DEFAULT_POLICIES = ("dense", "static", "set", "rigl")
DEFAULT_SPARSITIES = (0.9, 0.98)
DEFAULT_DISTRIBUTIONS = ("erk", "uniform")
# The default sweep's budget: 13 configurations x 3 seeds in about 10-12 minutes on
# 2 cores, two runs at a time.
DEFAULT_EPOCHS = 24
# --quick: one seed, a slice of the data, and updates often enough to happen
QUICK_TRAIN, QUICK_TEST, QUICK_EPOCHS, QUICK_INTERVAL = 12_000, 2_000, 2, 25
PROG = "fashion_mnist.py"
# What was tried to close RigL's gap to dense; every report links to it
GAP_NOTES = Path(__file__).resolve().parent.parent / "docs" / "results" / "gap.md"


class UsageError(ValueError):
    """A command-line value that cannot work; the message names the fix."""


# --------------------------------------------------------------------------- models


class LeNet300100(nn.Module):
    """The fully connected LeNet-300-100: 784-300-100-10 with ReLU."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(28 * 28, 300)
        self.fc2 = nn.Linear(300, 100)
        self.fc3 = nn.Linear(100, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Maps ``(N, 1, 28, 28)`` images to ``(N, 10)`` logits."""
        x = x.flatten(1)
        x = F.relu(self.fc1(x))
        x = F.relu(self.fc2(x))
        out: torch.Tensor = self.fc3(x)
        return out


class SmallCNN(nn.Module):
    """A small CNN: two 3x3 conv + max-pool stages, then two linear layers."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 16, 3, padding=1)
        self.conv2 = nn.Conv2d(16, 32, 3, padding=1)
        self.fc1 = nn.Linear(32 * 7 * 7, 128)
        self.fc2 = nn.Linear(128, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Maps ``(N, 1, 28, 28)`` images to ``(N, 10)`` logits."""
        x = F.max_pool2d(F.relu(self.conv1(x)), 2)
        x = F.max_pool2d(F.relu(self.conv2(x)), 2)
        x = F.relu(self.fc1(x.flatten(1)))
        out: torch.Tensor = self.fc2(x)
        return out


def build_model(name: str) -> nn.Module:
    """Returns a freshly initialised ``"lenet"`` or ``"cnn"``."""
    if name == "lenet":
        return LeNet300100()
    if name == "cnn":
        return SmallCNN()
    raise UsageError(f"unknown model {name!r}: use one of {', '.join(MODELS)}")


def prunable_weights(model: nn.Module) -> dict[str, int]:
    """Names and sizes of the weights a sparsifier may mask (Linear / Conv)."""
    kinds = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)
    return {
        f"{name}.weight" if name else "weight": module.weight.numel()
        for name, module in model.named_modules()
        if isinstance(module, kinds)
    }


# --------------------------------------------------------------------------- recipe


@dataclass(frozen=True)
class Recipe:
    """The training budget and hyper-parameters shared by every run."""

    epochs: int
    batch_size: int = 128
    lr: float = 0.1
    momentum: float = 0.9
    weight_decay: float = 1e-3
    warmup_epochs: float = 0.5
    update_interval: int = 200
    drop_fraction: float = 0.5
    end_fraction: float = 0.75
    sparse_init: str = "scaled"


@dataclass(frozen=True)
class RunSpec:
    """One training run."""

    model: str
    policy: str
    sparsity: float
    distribution: str
    seed: int

    @property
    def key(self) -> tuple[str, str, float, str]:
        """Identifies the configuration, i.e. the run without its seed."""
        return (self.model, self.policy, self.sparsity, self.distribution)


@dataclass
class RunResult:
    """What one run measured."""

    spec: RunSpec
    test_accuracy: float
    train_loss: float
    overall_sparsity: float
    layer_density: dict[str, float]
    wall_s: float
    steps: int
    # (step, fraction of active weights newly grown at that step, ITOP rate after)
    mask_events: list[tuple[int, float, float]] = field(default_factory=list)
    summary: str = ""


def lr_at(step: int, total: int, recipe: Recipe, steps_per_epoch: int) -> float:
    """Linear warm-up to ``recipe.lr``, then cosine decay to 0 at ``total``."""
    warmup = max(1, int(recipe.warmup_epochs * steps_per_epoch))
    if step < warmup:
        return recipe.lr * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return 0.5 * recipe.lr * (1.0 + math.cos(math.pi * progress))


# --------------------------------------------------------------------- mask tracking


class MaskTracker:
    """Follows the masks during training: per-update change and ITOP rate.

    The in-time over-parameterisation rate (Liu et al., 2021) is the fraction of the
    sparse tensors' weights that have been active at some point of training.

    Args:
        masks: the live masks at the start of training.
    """

    def __init__(self, masks: Mapping[str, torch.Tensor]) -> None:
        self.previous = {k: m.detach().clone() for k, m in masks.items()}
        self.ever = {k: m.detach().clone() for k, m in masks.items()}
        self.numel = sum(m.numel() for m in masks.values())
        self.events: list[tuple[int, float, float]] = [(0, 0.0, self.itop())]

    def itop(self) -> float:
        """Fraction of the sparse weights ever active so far."""
        if self.numel == 0:
            return 0.0
        return sum(int(e.sum()) for e in self.ever.values()) / self.numel

    def update(self, step: int, masks: Mapping[str, torch.Tensor]) -> None:
        """Compares ``masks`` with the last snapshot; records a change if any."""
        grown = 0
        changed = False
        for key, mask in masks.items():
            before = self.previous[key]
            if torch.equal(mask, before):
                continue
            changed = True
            grown += int((mask & ~before).sum())
            self.ever[key] |= mask
            self.previous[key] = mask.detach().clone()
        if changed:
            total_active = sum(int(m.sum()) for m in self.previous.values())
            self.events.append((step, grown / max(1, total_active), self.itop()))


# ------------------------------------------------------------------------- training


def _import_sparsetorch() -> Any:
    """Imports sparsetorch, falling back to the checkout this example lives in."""
    try:
        import sparsetorch
    except ImportError:
        root = Path(__file__).resolve().parent.parent
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


def _first_weight(model: nn.Module) -> str:
    return next(iter(prunable_weights(model)))


def train_one(
    spec: RunSpec,
    recipe: Recipe,
    data: FashionMNIST,
    *,
    progress: bool,
    label: str = "",
    position: int = 0,
) -> RunResult:
    """Trains one model under one policy and returns its measurements.

    Args:
        spec: model, policy, sparsity, distribution and seed.
        recipe: the shared budget and hyper-parameters.
        data: train and evaluation tensors.
        progress: whether to show a tqdm bar (when tqdm is importable).
        label: prefix for the progress bar.
        position: the bar's line on the terminal (one per parallel run).

    Returns:
        The run's accuracy, sparsity, per-layer density and mask history.
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
        fused=True,  # one pass over each weight instead of five: 1 ms off each step
    )
    n_train = data.train_x.shape[0]
    steps_per_epoch = n_train // recipe.batch_size
    if steps_per_epoch == 0:
        raise UsageError(
            f"{n_train} training examples make no batch of {recipe.batch_size}: "
            "pass a smaller --batch-size or more data"
        )
    total_steps = recipe.epochs * steps_per_epoch
    end_step = max(1, int(recipe.end_fraction * total_steps))

    weights = {name: model.get_parameter(name) for name in prunable_weights(model)}
    masks: Callable[[], Mapping[str, torch.Tensor]] | None = None
    summary: Callable[[], str] = str
    gate: Callable[[], bool] | None = None
    if spec.policy in SPARSE_POLICIES:
        st = _import_sparsetorch()
        first_dense = spec.distribution == "uniform-first-dense"
        sparsifier = st.sparsify(
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
            exclude=[_first_weight(model)] if first_dense else None,
            grow_init="zeros",
            seed=spec.seed,
        )

        def masks() -> Mapping[str, torch.Tensor]:
            return sparsifier.masks  # type: ignore[no-any-return]

        summary = sparsifier.summary
    elif spec.policy == "rigl-torch":
        from _rigl_torch_peer import RigLTorchPeer

        peer = RigLTorchPeer(
            model,
            optimizer,
            sparsity=spec.sparsity,
            end_step=end_step,
            update_interval=recipe.update_interval,
            drop_fraction=recipe.drop_fraction,
            first_layer_dense=spec.distribution == "uniform-first-dense",
        )

        def masks() -> Mapping[str, torch.Tensor]:
            return peer.masks

        summary = peer.summary
        gate = peer
    if masks is not None and recipe.sparse_init == "scaled":
        _rescale_sparse_init(weights, masks())
    tracker = MaskTracker(masks()) if masks is not None else None

    bar = _progress_bar(total_steps, label, position=position) if progress else None
    generator = torch.Generator().manual_seed(spec.seed)
    step = 0
    loss_sum = torch.zeros(())
    correct_sum = torch.zeros((), dtype=torch.int64)
    seen = 0
    last_loss = float("nan")
    for _epoch in range(recipe.epochs):
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
            if gate is None or gate():
                optimizer.step()
            step += 1
            # sparsetorch and rigl-torch both rewire the masks only on multiples of
            # the update interval; comparing them every step took 0.2 ms of a 3 ms step
            if (
                tracker is not None
                and masks is not None
                and step % recipe.update_interval == 0
            ):
                tracker.update(step, masks())
            loss_sum += loss.detach()
            correct_sum += (logits.detach().argmax(1) == y).sum()
            seen += y.shape[0]
            if step % 50 == 0 or step == total_steps:
                last_loss = float(loss_sum) / 50 if step % 50 == 0 else last_loss
                if bar is not None:
                    bar.set_postfix(
                        loss=f"{last_loss:.3f}",
                        acc=f"{float(correct_sum) / max(1, seen):.3f}",
                        lr=f"{lr:.3g}",
                        refresh=False,
                    )
                    bar.update(step - bar.n)
                loss_sum.zero_()
                correct_sum.zero_()
                seen = 0
    if bar is not None:
        bar.close()
    accuracy = evaluate(model, data.test_x, data.test_y)
    final_masks = dict(masks()) if masks is not None else {}
    sparsity, density = overall_sparsity(model, final_masks)
    return RunResult(
        spec=spec,
        test_accuracy=accuracy,
        train_loss=last_loss,
        overall_sparsity=sparsity,
        layer_density=density,
        wall_s=time.perf_counter() - start_time,
        steps=total_steps,
        mask_events=tracker.events if tracker is not None else [],
        summary=summary(),
    )


@torch.no_grad()
def _rescale_sparse_init(
    weights: Mapping[str, torch.Tensor], masks: Mapping[str, torch.Tensor]
) -> None:
    """Multiplies each sparse weight by ``1 / sqrt(density)``.

    A layer that keeps a fraction ``d`` of its inputs has its pre-activation
    variance cut by ``d`` under the default (dense) initialisation; the rescale
    restores the dense network's signal scale at step 0 (sparsity-aware
    initialisation, as in Evci et al., 2022). It is part of the recipe, applied
    the same way to every sparse policy, sparsetorch's and rigl-torch's alike.
    """
    for name, mask in masks.items():
        active = int(mask.sum())
        if 0 < active < mask.numel():
            weights[name].mul_(math.sqrt(mask.numel() / active))


def _tqdm() -> Any:
    """tqdm's class, or ``None`` when tqdm (an optional extra) is missing."""
    try:
        from tqdm.auto import tqdm
    except ImportError:
        return None
    return tqdm


def _progress_bar(total: int, label: str, unit: str = "step", position: int = 0) -> Any:
    tqdm = _tqdm()
    if tqdm is None:
        return None
    return tqdm(
        total=total,
        desc=label,
        leave=False,
        unit=unit,
        position=position,
        disable=None,
    )


def _say(message: str) -> None:
    tqdm = _tqdm()
    if tqdm is None:
        print(message, flush=True)
    else:
        tqdm.write(message)
        sys.stdout.flush()


# --------------------------------------------------------------------------- sweep


@dataclass(frozen=True)
class DataRequest:
    """Where a sweep's data comes from and which part of it the runs see."""

    data_dir: str | None
    holdout: int
    n_train: int | None
    n_test: int | None

    def load(self, *, download: bool) -> FashionMNIST:
        """Loads and verifies the files, then splits and slices them."""
        data = _load_data(self.data_dir, download=download)
        if self.holdout:
            data = data.holdout(self.holdout)
        return data.subset(self.n_train, self.n_test)


def usable_cores() -> int:
    """The CPU cores this process may run on."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


# A worker process's copy of the data and its progress bar's line, set once by
# _worker_start.
_worker_data: FashionMNIST | None = None
_worker_line = 0


def _worker_start(
    request: DataRequest, threads: int, lines: Any, bar_lock: Any
) -> None:
    global _worker_data, _worker_line
    torch.set_num_threads(threads)
    with lines.get_lock():
        lines.value += 1
        _worker_line = lines.value
    if bar_lock is not None:
        _tqdm().set_lock(bar_lock)
    _worker_data = request.load(download=False)


def _worker_train(
    spec: RunSpec, recipe: Recipe, progress: bool, label: str
) -> RunResult:
    assert _worker_data is not None, "_worker_start did not run"
    return train_one(
        spec,
        recipe,
        _worker_data,
        progress=progress,
        label=label,
        position=_worker_line,
    )


def train_grid(
    grid: Sequence[RunSpec],
    recipe: Recipe,
    data: FashionMNIST,
    request: DataRequest,
    *,
    jobs: int,
    threads: int,
    progress: bool,
) -> list[RunResult]:
    """Trains every run of the grid, ``jobs`` at a time, in grid order.

    With ``jobs > 1`` the runs go to that many worker processes (spawned, so
    nothing of the parent's torch state is forked), each loading ``request`` once
    from ``data.source``. A run's result does not depend on ``jobs``: each run
    seeds its own model, data order and masks.

    Args:
        grid: the runs.
        recipe: the shared budget and hyper-parameters.
        data: the data, as ``request`` loaded it in this process.
        request: how ``data`` was loaded, for the workers to do the same.
        jobs: runs trained at once.
        threads: torch intra-op threads per run.
        progress: whether to show progress bars.

    Returns:
        One result per run, in the order of ``grid``.
    """

    def label(index: int, spec: RunSpec) -> str:
        return (
            f"[{index}/{len(grid)}] {spec.model} {spec.policy} {spec.distribution} "
            f"s={spec.sparsity:g} seed={spec.seed}"
        )

    def done(index: int, result: RunResult) -> None:
        _say(
            f"{label(index, result.spec)}: acc {100 * result.test_accuracy:.2f}%, "
            f"overall sparsity {result.overall_sparsity:.4f}, {result.wall_s:.1f}s"
        )

    results: dict[int, RunResult] = {}
    if jobs == 1:
        for index, spec in enumerate(grid, 1):
            results[index] = train_one(
                spec, recipe, data, progress=progress, label=label(index, spec)
            )
            done(index, results[index])
        return list(results.values())
    # the workers read the directory the parent's data came from
    request = dataclasses.replace(request, data_dir=str(data.source))
    context = multiprocessing.get_context("spawn")
    tqdm = _tqdm() if progress else None
    bar_lock = None
    if tqdm is not None:
        # one lock for every process's bars: the runs' bars on lines 1..jobs,
        # the count of finished runs on line 0
        bar_lock = context.RLock()
        tqdm.set_lock(bar_lock)
    bar = _progress_bar(len(grid), "runs", "run") if progress else None
    pool = ProcessPoolExecutor(
        max_workers=jobs,
        mp_context=context,
        initializer=_worker_start,
        initargs=(request, threads, context.Value("i", 0), bar_lock),
    )
    try:
        pending: dict[Future[RunResult], int] = {
            pool.submit(
                _worker_train, spec, recipe, progress, label(index, spec)
            ): index
            for index, spec in enumerate(grid, 1)
        }
        for future in as_completed(pending):
            index = pending[future]
            results[index] = future.result()
            done(index, results[index])
            if bar is not None:
                bar.update()
    finally:
        pool.shutdown(cancel_futures=True)
        if bar is not None:
            bar.close()
    return [results[index] for index in sorted(results)]


def build_grid(
    models: Sequence[str],
    policies: Sequence[str],
    sparsities: Sequence[float],
    distributions: Sequence[str],
    seeds: Sequence[int],
    *,
    explicit_distribution: bool,
) -> list[RunSpec]:
    """Expands the command line into runs: dense once, sparse per grid point.

    Args:
        models: model names.
        policies: policy names; ``"dense"`` ignores sparsity and distribution.
        sparsities: target sparsities of the sparse policies.
        distributions: sparsity allocations of the sparse policies.
        seeds: the seeds every configuration is run with.
        explicit_distribution: whether the user chose the distributions; if so a
            peer run with a distribution rigl-torch lacks is an error, otherwise it
            is skipped.

    Returns:
        The runs, configuration-major and seed-minor.

    Raises:
        UsageError: on an unusable combination.
    """
    configs: list[tuple[str, str, float, str]] = []
    for model in models:
        for policy in policies:
            if policy == "dense":
                configs.append((model, policy, 0.0, "-"))
                continue
            for sparsity in sparsities:
                for dist in distributions:
                    if policy == "rigl-torch" and dist not in PEER_DISTRIBUTIONS:
                        if explicit_distribution:
                            raise UsageError(
                                f"rigl-torch has no {dist!r} distribution: use "
                                f"--distribution {' or '.join(PEER_DISTRIBUTIONS)}"
                            )
                        continue
                    configs.append((model, policy, sparsity, dist))
    return [RunSpec(m, p, s, d, seed) for (m, p, s, d) in configs for seed in seeds]


@dataclass
class Row:
    """One configuration aggregated over its seeds."""

    model: str
    policy: str
    distribution: str
    target_sparsity: float
    overall_sparsity: float
    accuracies: list[float]
    wall_s: float

    @property
    def mean(self) -> float:
        """Mean test accuracy over seeds."""
        return statistics.fmean(self.accuracies)

    @property
    def std(self) -> float:
        """Sample standard deviation over seeds (0 for one seed)."""
        return statistics.stdev(self.accuracies) if len(self.accuracies) > 1 else 0.0


def aggregate(results: Iterable[RunResult]) -> list[Row]:
    """Groups runs by configuration, in first-seen order."""
    rows: dict[tuple[str, str, float, str], Row] = {}
    for r in results:
        row = rows.get(r.spec.key)
        if row is None:
            row = rows[r.spec.key] = Row(
                r.spec.model,
                r.spec.policy,
                r.spec.distribution,
                r.spec.sparsity,
                0.0,
                [],
                0.0,
            )
        row.accuracies.append(r.test_accuracy)
        row.overall_sparsity += r.overall_sparsity
        row.wall_s += r.wall_s
    for row in rows.values():
        row.overall_sparsity /= len(row.accuracies)
        row.wall_s /= len(row.accuracies)
    return list(rows.values())


def format_table(
    rows: Sequence[Row], *, markdown: bool = False, evaluated_on: str = "test"
) -> str:
    """Renders the results table as aligned text or as Markdown.

    Args:
        rows: the aggregated configurations.
        markdown: Markdown table instead of aligned plain text.
        evaluated_on: what the accuracy was measured on, for the header.

    Returns:
        The table, one line per row.
    """
    dense = {r.model: r.mean for r in rows if r.policy == "dense"}
    header = [
        "model",
        "policy",
        "distribution",
        "target sparsity",
        "overall sparsity",
        f"{evaluated_on.split()[0]} acc % (mean ± std)",
        "vs dense",
        "seeds",
        "s/run",
    ]
    body = [
        [
            r.model,
            r.policy,
            r.distribution,
            f"{r.target_sparsity:.2f}",
            f"{r.overall_sparsity:.4f}",
            f"{100 * r.mean:.2f} ± {100 * r.std:.2f}",
            f"{100 * (r.mean - dense[r.model]):+.2f}"
            if r.model in dense and r.policy != "dense"
            else "",
            str(len(r.accuracies)),
            f"{r.wall_s:.1f}",
        ]
        for r in rows
    ]
    if markdown:
        lines = ["| " + " | ".join(header) + " |"]
        lines.append("|" + "|".join("---" for _ in header) + "|")
        lines += ["| " + " | ".join(cells) + " |" for cells in body]
        return "\n".join(lines)
    widths = [max(len(row[i]) for row in [header, *body]) for i in range(len(header))]
    return "\n".join(
        "  ".join(cell.ljust(w) for cell, w in zip(cells, widths, strict=True)).rstrip()
        for cells in [header, *body]
    )


def machine_description() -> str:
    """One line naming the CPU, core count, OS, Python and torch."""
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return (
        f"{cpu}, {os.cpu_count()} cores (torch threads: {torch.get_num_threads()}), "
        f"{platform.system()} {platform.release()}, Python "
        f"{platform.python_version()}, torch {torch.__version__}"
    )


def _difference(a: Row, b: Row) -> str:
    """``a - b`` in points with its standard error over seeds."""
    return f"{100 * (a.mean - b.mean):+.2f} ± {100 * _se(a, b):.2f} s.e."


def _se(a: Row, b: Row) -> float:
    """Standard error of ``a.mean - b.mean`` over seeds."""
    return math.sqrt(a.std**2 / len(a.accuracies) + b.std**2 / len(b.accuracies))


def _peer_checks(rows: Sequence[Row]) -> list[tuple[str, bool, str]]:
    """sparsetorch's RigL against rigl-torch's, for one model.

    At each overall sparsity rigl-torch ran: each library's best RigL row there
    (rigl-torch only has uniform allocations; sparsetorch also has ERK), when
    sparsetorch ran more than one allocation; and, allocation by allocation, that
    the two implementations of the same algorithm agree: sparsetorch no worse by
    more than twice the standard error of the difference.
    """
    groups: dict[float, list[Row]] = {}
    for row in rows:
        if row.policy in ("rigl", "rigl-torch"):
            groups.setdefault(round(row.overall_sparsity, 3), []).append(row)
    checks: list[tuple[str, bool, str]] = []
    model = rows[0].model if rows else ""
    for group in groups.values():
        ours = [r for r in group if r.policy == "rigl"]
        peers = [r for r in group if r.policy == "rigl-torch"]
        if not ours or not peers:
            continue
        best = max(ours, key=lambda r: r.mean)
        peer = max(peers, key=lambda r: r.mean)
        if len(ours) > 1:  # else the same-allocation claim below says it all
            checks.append(
                (
                    f"{model}: sparsetorch RigL >= rigl-torch at overall sparsity "
                    f"{peer.overall_sparsity:.4f}, best allocation of each",
                    best.mean >= peer.mean,
                    f"sparsetorch {best.distribution} {100 * best.mean:.2f} ± "
                    f"{100 * best.std:.2f}, rigl-torch {peer.distribution} "
                    f"{100 * peer.mean:.2f} ± {100 * peer.std:.2f}: "
                    f"{_difference(best, peer)}",
                )
            )
        by_dist = {r.distribution: r for r in ours}
        for peer in peers:
            same = by_dist.get(peer.distribution)
            if same is None:
                continue
            checks.append(
                (
                    f"{model}: same allocation ({peer.distribution}, overall "
                    f"{peer.overall_sparsity:.4f}): sparsetorch RigL no worse than "
                    "rigl-torch beyond 2 s.e.",
                    same.mean - peer.mean >= -2 * _se(same, peer),
                    f"sparsetorch {100 * same.mean:.2f} ± {100 * same.std:.2f}, "
                    f"rigl-torch {100 * peer.mean:.2f} ± {100 * peer.std:.2f}: "
                    f"{_difference(same, peer)}",
                )
            )
    return checks


def acceptance_checks(rows: Sequence[Row]) -> list[tuple[str, bool, str]]:
    """Evaluates the comparisons the sweep is meant to show, on the means.

    The evidence gives the difference of the means with its standard error, so a
    claim that holds or fails by less than the seed noise reads as such.

    Returns:
        ``(claim, holds, evidence)`` for each claim whose rows are present.
    """
    by_key = {(r.model, r.policy, r.target_sparsity, r.distribution): r for r in rows}
    checks: list[tuple[str, bool, str]] = []
    models = sorted({r.model for r in rows})
    # claims about "all layers sparse" skip rigl-torch's first-layer-dense variant
    dists = sorted(
        {r.distribution for r in rows} - {"-", "uniform-first-dense"},
        key=DISTRIBUTIONS.index,
    )
    for model in models:
        dense = by_key.get((model, "dense", 0.0, "-"))
        for dist in dists:
            rigl90 = by_key.get((model, "rigl", 0.9, dist))
            if dense is not None and rigl90 is not None:
                gap = 100 * (dense.mean - rigl90.mean)
                checks.append(
                    (
                        f"{model}: RigL 90% {dist} within 0.5 points of dense",
                        gap <= 0.5,
                        f"RigL {100 * rigl90.mean:.2f}, dense {100 * dense.mean:.2f}: "
                        f"{_difference(rigl90, dense)}",
                    )
                )
            rigl98 = by_key.get((model, "rigl", 0.98, dist))
            for other in ("set", "static"):
                row = by_key.get((model, other, 0.98, dist))
                if rigl98 is not None and row is not None:
                    checks.append(
                        (
                            f"{model}: RigL 98% {dist} ahead of {other}",
                            rigl98.mean > row.mean,
                            f"RigL {100 * rigl98.mean:.2f}, {other} "
                            f"{100 * row.mean:.2f}: {_difference(rigl98, row)}",
                        )
                    )
        checks += _peer_checks([r for r in rows if r.model == model])
    return checks


# -------------------------------------------------------------------------- output


def result_to_json(r: RunResult) -> dict[str, Any]:
    """A JSON-ready record of one run."""
    record = dataclasses.asdict(r)
    record["spec"] = dataclasses.asdict(r.spec)
    return record


def result_from_json(record: Mapping[str, Any]) -> RunResult:
    """Inverse of :func:`result_to_json`."""
    fields = dict(record)
    fields["spec"] = RunSpec(**fields["spec"])
    fields["mask_events"] = [tuple(e) for e in fields.get("mask_events", [])]
    return RunResult(**fields)


def write_outputs(
    results: Sequence[RunResult],
    meta: Mapping[str, Any],
    out_dir: Path,
    report: Path,
    *,
    plots: bool,
) -> list[Path]:
    """Writes results.json, the PNG plots and the Markdown report.

    Returns:
        The paths of the plots written (none when matplotlib is missing).
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    rows = aggregate(results)
    payload = {
        **meta,
        "rows": [{**dataclasses.asdict(r), "mean": r.mean, "std": r.std} for r in rows],
        "runs": [result_to_json(r) for r in results],
    }
    (out_dir / "results.json").write_text(json.dumps(payload, indent=1) + "\n")
    pictures: list[Path] = []
    if plots:
        from _fashion_mnist_report import write_plots

        pictures = write_plots(results, rows, out_dir)
    from _fashion_mnist_report import render_markdown

    report.parent.mkdir(parents=True, exist_ok=True)
    report.write_text(
        render_markdown(
            results,
            rows,
            meta,
            table=format_table(
                rows, markdown=True, evaluated_on=meta.get("evaluated_on", "test")
            ),
            checks=acceptance_checks(rows),
            pictures=[os.path.relpath(p, report.parent) for p in pictures],
            json_path=os.path.relpath(out_dir / "results.json", report.parent),
            gap_path=os.path.relpath(GAP_NOTES, report.parent),
        )
    )
    return pictures


# ----------------------------------------------------------------------------- CLI


class _OneLineParser(argparse.ArgumentParser):
    """An argument parser whose errors are one line (no usage block)."""

    def error(self, message: str) -> NoReturn:
        """Prints ``PROG: error: MESSAGE`` and exits with status 2."""
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def _one_of(what: str, allowed: Sequence[str]) -> Callable[[str], str]:
    """An argparse ``type`` that accepts only ``allowed`` and names them if not."""

    def check(value: str) -> str:
        if value not in allowed:
            raise argparse.ArgumentTypeError(
                f"unknown {what} {value!r}: use one of {', '.join(allowed)}"
            )
        return value

    return check


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    """Parses the command line."""
    parser = _OneLineParser(
        prog=PROG,
        description=(
            "Dense vs static vs SET vs RigL on Fashion-MNIST (no torchvision). With "
            "no flags: the full comparison sweep (~10-12 min on 2 CPU cores)."
        ),
    )
    parser.add_argument(
        "--model",
        nargs="+",
        type=_one_of("model", MODELS),
        default=["lenet"],
        metavar="{" + ",".join(MODELS) + "}",
    )
    parser.add_argument(
        "--policy",
        nargs="+",
        type=_one_of("policy", POLICIES),
        metavar="{" + ",".join(POLICIES) + "}",
        default=None,
        help="policies to compare (default: dense static set rigl)",
    )
    parser.add_argument(
        "--sparsity",
        nargs="+",
        type=float,
        default=None,
        help="target sparsities of the sparse policies (default: 0.9 0.98)",
    )
    parser.add_argument(
        "--distribution",
        nargs="+",
        type=_one_of("distribution", DISTRIBUTIONS),
        metavar="{" + ",".join(DISTRIBUTIONS) + "}",
        default=None,
        help=(
            "sparsity allocation (default: erk uniform); uniform-first-dense is "
            "rigl-torch's 'uniform', which keeps the first layer dense"
        ),
    )
    parser.add_argument(
        "--epochs", type=int, default=None, help=f"default: {DEFAULT_EPOCHS}"
    )
    parser.add_argument("--seed", type=int, default=0, help="first seed")
    parser.add_argument(
        "--seeds", type=int, default=None, help="number of seeds (default: 3)"
    )
    parser.add_argument(
        "--out", type=Path, default=Path("runs/fashion_mnist"), help="output dir"
    )
    parser.add_argument(
        "--report",
        type=Path,
        default=None,
        help="Markdown report path (default: OUT/results.md)",
    )
    parser.add_argument(
        "--data-dir",
        default=None,
        help="directory with the four IDX .gz files (default: see fashion_mnist_data)",
    )
    parser.add_argument(
        "--no-download", action="store_true", help="never download the data"
    )
    parser.add_argument(
        "--quick",
        action="store_true",
        help=(
            f"smoke test: 1 seed, {QUICK_EPOCHS} epochs on {QUICK_TRAIN} train / "
            f"{QUICK_TEST} test examples, update interval {QUICK_INTERVAL}"
        ),
    )
    parser.add_argument(
        "--peer",
        action="store_true",
        help="add rigl-torch 0.5.2 rows (pip install rigl-torch==0.5.2 --no-deps)",
    )
    parser.add_argument(
        "--holdout",
        type=int,
        default=0,
        help="evaluate on the last N training examples instead of the test set",
    )
    parser.add_argument("--train-subset", type=int, default=None)
    parser.add_argument("--test-subset", type=int, default=None)
    defaults = Recipe(epochs=DEFAULT_EPOCHS)
    parser.add_argument("--batch-size", type=int, default=defaults.batch_size)
    parser.add_argument("--lr", type=float, default=defaults.lr)
    parser.add_argument("--weight-decay", type=float, default=defaults.weight_decay)
    parser.add_argument(
        "--update-interval",
        type=int,
        default=None,
        help=f"steps between topology updates (default: {defaults.update_interval})",
    )
    parser.add_argument("--drop-fraction", type=float, default=defaults.drop_fraction)
    parser.add_argument(
        "--end-fraction",
        type=float,
        default=defaults.end_fraction,
        help="fraction of training after which masks freeze",
    )
    parser.add_argument(
        "--sparse-init",
        type=_one_of("sparse init", ("scaled", "default")),
        metavar="{scaled,default}",
        default=defaults.sparse_init,
        help="scale sparse weights by 1/sqrt(density) at the start (default: scaled)",
    )
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help=(
            "torch intra-op threads (default: 1; models this small gain little from "
            "more, and one thread keeps the sweep steady on a busy machine)"
        ),
    )
    parser.add_argument(
        "--jobs",
        type=int,
        default=None,
        help=(
            "runs trained at once, each in its own process (default: the usable "
            "CPU cores divided by --threads); results do not depend on it"
        ),
    )
    parser.add_argument("--no-progress", action="store_true")
    parser.add_argument("--no-plots", action="store_true")
    parser.add_argument(
        "--from-json",
        type=Path,
        default=None,
        help="re-render table, plots and report from a results.json; no training",
    )
    return parser.parse_args(argv)


def _check_args(args: argparse.Namespace) -> None:
    for value in args.sparsity or ():
        if not 0.0 < value < 1.0:
            raise UsageError(
                f"--sparsity {value} is out of range: pass a fraction of zeros in "
                "(0, 1), e.g. 0.9"
            )
    for name in ("epochs", "seeds", "batch_size", "update_interval", "threads", "jobs"):
        value = getattr(args, name)
        if value is not None and value < 1:
            flag = "--" + name.replace("_", "-")
            raise UsageError(f"{flag} {value} must be at least 1")
    if not 0.0 <= args.drop_fraction <= 1.0:
        raise UsageError(f"--drop-fraction {args.drop_fraction} must be in [0, 1]")
    if not 0.0 < args.end_fraction <= 1.0:
        raise UsageError(f"--end-fraction {args.end_fraction} must be in (0, 1]")


def run(argv: Sequence[str] | None = None) -> int:
    """Runs the command line; returns the exit status."""
    args = parse_args(argv)
    _check_args(args)
    out_dir: Path = args.out
    report: Path = args.report or out_dir / "results.md"
    if args.from_json is not None:
        meta = json.loads(args.from_json.read_text())
        loaded = [result_from_json(r) for r in meta.pop("runs")]
        meta.pop("rows", None)
        pictures = write_outputs(loaded, meta, out_dir, report, plots=not args.no_plots)
        print(format_table(aggregate(loaded), evaluated_on=meta["evaluated_on"]))
        print(f"wrote {out_dir / 'results.json'}, {report}, {len(pictures)} plots")
        return 0

    policies = list(args.policy or DEFAULT_POLICIES)
    if args.peer and "rigl-torch" not in policies:
        policies.append("rigl-torch")
    seeds = range(args.seed, args.seed + (args.seeds or (1 if args.quick else 3)))
    epochs = args.epochs or (QUICK_EPOCHS if args.quick else DEFAULT_EPOCHS)
    interval = args.update_interval or (
        QUICK_INTERVAL if args.quick else Recipe(epochs=1).update_interval
    )
    sparsities = args.sparsity or DEFAULT_SPARSITIES
    grid = build_grid(
        args.model,
        policies,
        sparsities,
        args.distribution or DEFAULT_DISTRIBUTIONS,
        seeds,
        explicit_distribution=args.distribution is not None,
    )
    if "rigl-torch" in policies and args.distribution is None:
        # rigl-torch's native 'uniform' keeps the first layer dense: compare it
        # with sparsetorch's RigL under the same allocation
        grid += build_grid(
            args.model,
            [p for p in ("rigl", "rigl-torch") if p in policies],
            sparsities,
            ["uniform-first-dense"],
            seeds,
            explicit_distribution=True,
        )
    if any(s.policy in SPARSE_POLICIES for s in grid):
        _import_sparsetorch()
    if any(s.policy == "rigl-torch" for s in grid):
        from _rigl_torch_peer import _import_rigl_scheduler

        _import_rigl_scheduler()

    recipe = Recipe(
        epochs=epochs,
        batch_size=args.batch_size,
        lr=args.lr,
        weight_decay=args.weight_decay,
        update_interval=interval,
        drop_fraction=args.drop_fraction,
        end_fraction=args.end_fraction,
        sparse_init=args.sparse_init,
    )
    torch.set_num_threads(args.threads)
    request = DataRequest(
        args.data_dir,
        args.holdout,
        args.train_subset or (QUICK_TRAIN if args.quick else None),
        args.test_subset or (QUICK_TEST if args.quick else None),
    )
    data = request.load(download=not args.no_download)
    jobs = min(len(grid), args.jobs or max(1, usable_cores() // args.threads))
    evaluation = "validation (holdout)" if args.holdout else "test"
    _say(
        f"Fashion-MNIST from {data.source}: {data.train_x.shape[0]} train, "
        f"{data.test_x.shape[0]} {evaluation}; {len(grid)} runs, {jobs} at a time, "
        f"{recipe}"
    )

    started = time.perf_counter()
    results = train_grid(
        grid,
        recipe,
        data,
        request,
        jobs=jobs,
        threads=args.threads,
        progress=not args.no_progress,
    )
    wall = time.perf_counter() - started

    rows = aggregate(results)
    print()
    print(format_table(rows, evaluated_on=evaluation))
    checks = acceptance_checks(rows)
    if checks:
        print()
        for claim, holds, evidence in checks:
            print(f"[{'ok' if holds else 'MISS'}] {claim}: {evidence}")
    shown = next((r for r in reversed(results) if r.summary), None)
    if shown is not None:
        s = shown.spec
        print(
            f"\nsummary() of {s.model} {s.policy} {s.distribution} "
            f"s={s.sparsity:g} seed={s.seed}:\n{shown.summary}"
        )
    meta = {
        "command": "python " + shlex.join([_shown_path(), *(argv or sys.argv[1:])]),
        "machine": machine_description(),
        "sparsetorch": _source_version(),
        "wall_time_s": round(wall, 1),
        "jobs": jobs,
        "evaluated_on": evaluation,
        "n_train": data.train_x.shape[0],
        "n_eval": data.test_x.shape[0],
        "recipe": dataclasses.asdict(recipe),
        "date": time.strftime("%Y-%m-%d %H:%M %Z"),
    }
    pictures = write_outputs(results, meta, out_dir, report, plots=not args.no_plots)
    print(
        f"\nwall time {wall:.0f}s; wrote {out_dir / 'results.json'}, {report}"
        + (f" and {len(pictures)} plots" if pictures else "")
    )
    return 0


def _source_version() -> str:
    """sparsetorch's version and, in a git checkout, its commit."""
    try:
        st = _import_sparsetorch()
        version = str(getattr(st, "__version__", "?"))
    except UsageError:
        version = "not installed"
    root = Path(__file__).resolve().parent.parent
    try:
        commit = subprocess.run(
            ["git", "-C", str(root), "describe", "--always", "--dirty"],
            capture_output=True,
            text=True,
            timeout=10,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return version
    return f"{version} (git {commit})"


def _shown_path() -> str:
    path = Path(sys.argv[0])
    try:
        return str(path.resolve().relative_to(Path.cwd()))
    except ValueError:
        return str(path)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point: runs, and turns known errors into one-line messages."""
    try:
        return run(argv)
    except (FashionMNISTError, UsageError, PeerUnavailableError) as exc:
        print(f"{PROG}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
