"""Which runs a sweep makes, and training them in a pool of worker processes."""

from __future__ import annotations

import dataclasses
import multiprocessing
import os
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ProcessPoolExecutor, as_completed
from dataclasses import dataclass
from typing import Any

import torch
from fashion_mnist_data import FashionMNIST, load_fashion_mnist

from .config import Recipe, RunResult, RunSpec, UsageError
from .progress import progress_bar, say, tqdm_class
from .train import train_one

# The methods of the RigL paper's comparison, at its two sparsities, ERK allocation
METHODS = ("static", "set", "snfs", "rigl", "snip", "gmp")
SPARSITIES = (0.9, 0.98)
PEER_DISTRIBUTIONS = ("uniform", "uniform-first-dense")


def method_rows(model: str, sparsities: Sequence[float] = SPARSITIES) -> list[RunSpec]:
    """Dense, and every method of :data:`METHODS` at each sparsity, ERK."""
    rows = [RunSpec(model, "dense", 0.0, "-", 0)]
    rows += [
        RunSpec(model, policy, sparsity, "erk", 0)
        for policy in METHODS
        for sparsity in sparsities
    ]
    return rows


def default_rows() -> list[RunSpec]:
    """The default run: the method comparison on LeNet-300-100 (13 rows)."""
    return method_rows("lenet300")


def full_rows() -> list[RunSpec]:
    """``--full``: the default rows, longer RigL, structured RigL, and LeNet-5.

    * RigL 2x and 5x (the same recipe with 2x / 5x the steps) at 90% and 98%;
    * RigL 2:4 (every group of 4 input weights keeps 2: 50% in every layer) next
      to unstructured RigL at 50%, uniform (the same density in every layer), and
      constant-fan-in RigL (SRigL) at 90% ERK next to the RigL 90% ERK row;
    * the method comparison and RigL 2x on LeNet-5, whose conv layers are sparse
      too.
    """
    rows = default_rows()
    for length in (2, 5):
        rows += [
            RunSpec("lenet300", "rigl", s, "erk", 0, length=length) for s in SPARSITIES
        ]
    rows += [
        RunSpec("lenet300", "rigl", 0.5, "uniform", 0, structure="2:4"),
        RunSpec("lenet300", "rigl", 0.5, "uniform", 0),
        RunSpec("lenet300", "rigl", 0.9, "erk", 0, structure="fan-in"),
    ]
    rows += method_rows("lenet5")
    rows += [RunSpec("lenet5", "rigl", s, "erk", 0, length=2) for s in SPARSITIES]
    return rows


def with_seeds(rows: Sequence[RunSpec], seeds: Sequence[int]) -> list[RunSpec]:
    """Every row once per seed: configuration-major, seed-minor."""
    return [dataclasses.replace(row, seed=seed) for row in rows for seed in seeds]


def build_grid(
    models: Sequence[str],
    policies: Sequence[str],
    sparsities: Sequence[float],
    distributions: Sequence[str],
    structures: Sequence[str] = ("none",),
    lengths: Sequence[int] = (1,),
    *,
    explicit_distribution: bool,
) -> list[RunSpec]:
    """The rows of a grid given on the command line: dense once, sparse per point.

    Args:
        models: model names.
        policies: policy names; ``"dense"`` ignores sparsity, distribution and
            structure.
        sparsities: target sparsities of the sparse policies.
        distributions: sparsity allocations of the sparse policies.
        structures: mask structures of the sparse policies.
        lengths: training-length multipliers.
        explicit_distribution: whether the user chose the distributions; if so a
            peer run with a distribution rigl-torch lacks is an error, otherwise it
            is skipped.

    Raises:
        UsageError: on an unusable combination.
    """
    rows: list[RunSpec] = []
    for model in models:
        for policy in policies:
            for length in lengths:
                if policy == "dense":
                    rows.append(RunSpec(model, policy, 0.0, "-", 0, length=length))
                    continue
                for structure in structures:
                    if structure != "none" and policy == "rigl-torch":
                        raise UsageError(
                            f"rigl-torch has no structure {structure!r}: use "
                            "--structure none"
                        )
                    for sparsity in sparsities:
                        if structure == "2:4" and sparsity != 0.5:
                            raise UsageError(
                                f"--structure 2:4 keeps 2 of every 4 weights, "
                                f"sparsity 0.5, not {sparsity:g}: pass --sparsity 0.5"
                            )
                        for dist in distributions:
                            if (
                                policy == "rigl-torch"
                                and dist not in PEER_DISTRIBUTIONS
                            ):
                                if explicit_distribution:
                                    raise UsageError(
                                        f"rigl-torch has no {dist!r} distribution: "
                                        "use --distribution "
                                        f"{' or '.join(PEER_DISTRIBUTIONS)}"
                                    )
                                continue
                            rows.append(
                                RunSpec(
                                    model, policy, sparsity, dist, 0, structure, length
                                )
                            )
    return rows


@dataclass(frozen=True)
class DataRequest:
    """Where a sweep's data comes from and which part of it the runs see."""

    data_dir: str | None
    holdout: int
    n_train: int | None
    n_test: int | None

    def load(self, *, download: bool) -> FashionMNIST:
        """Loads and verifies the files, then splits and slices them."""
        data = load_fashion_mnist(self.data_dir, download=download)
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
        tqdm_class().set_lock(bar_lock)
    _worker_data = request.load(download=False)


def _worker_train(
    spec: RunSpec, recipe: Recipe, progress: bool, label: str
) -> RunResult:
    if _worker_data is None:
        raise RuntimeError("_worker_start did not run")
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
    recipes: dict[str, Recipe],
    data: FashionMNIST,
    request: DataRequest,
    *,
    jobs: int,
    threads: int,
    progress: bool,
    on_result: Callable[[RunResult], None] | None = None,
) -> list[RunResult]:
    """Trains every run of the grid, ``jobs`` at a time; results in grid order.

    With ``jobs > 1`` the runs go to that many worker processes (spawned, so
    nothing of the parent's torch state is forked), each loading ``request`` once
    from ``data.source``. A run's result does not depend on ``jobs``: each run
    seeds its own model, data order and masks. The longest runs start first, so
    the pool does not end on one long run.

    Args:
        grid: the runs.
        recipes: each model's budget and hyper-parameters.
        data: the data, as ``request`` loaded it in this process.
        request: how ``data`` was loaded, for the workers to do the same.
        jobs: runs trained at once.
        threads: torch intra-op threads per run.
        progress: whether to show progress bars.
        on_result: called with each result as it arrives (the journal).
    """

    def label(index: int, spec: RunSpec) -> str:
        return (
            f"[{index}/{len(grid)}] {spec.model} {spec.method} {spec.distribution} "
            f"s={spec.sparsity:g} seed={spec.seed}"
        )

    def done(index: int, result: RunResult) -> None:
        if on_result is not None:
            on_result(result)
        say(
            f"{label(index, result.spec)}: acc {100 * result.test_accuracy:.2f}%, "
            f"overall sparsity {result.overall_sparsity:.4f}, {result.wall_s:.1f}s"
        )

    results: dict[int, RunResult] = {}
    if jobs == 1:
        for index, spec in enumerate(grid, 1):
            results[index] = train_one(
                spec,
                recipes[spec.model],
                data,
                progress=progress,
                label=label(index, spec),
            )
            done(index, results[index])
        return list(results.values())
    # the workers read the directory the parent's data came from
    request = dataclasses.replace(request, data_dir=str(data.source))
    context = multiprocessing.get_context("spawn")
    tqdm = tqdm_class() if progress else None
    bar_lock = None
    if tqdm is not None:
        # one lock for every process's bars: the runs' bars on lines 1..jobs,
        # the count of finished runs on line 0
        bar_lock = context.RLock()
        tqdm.set_lock(bar_lock)
    bar = progress_bar(len(grid), "runs", "run") if progress else None

    def cost(item: tuple[int, RunSpec]) -> float:
        spec = item[1]
        return -spec.length * recipes[spec.model].epochs * _COST.get(spec.model, 1.0)

    pool = ProcessPoolExecutor(
        max_workers=jobs,
        mp_context=context,
        initializer=_worker_start,
        initargs=(request, threads, context.Value("i", 0), bar_lock),
    )
    try:
        pending: dict[Future[RunResult], int] = {
            pool.submit(
                _worker_train,
                spec,
                recipes[spec.model],
                progress,
                label(index, spec),
            ): index
            for index, spec in sorted(enumerate(grid, 1), key=cost)
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


# Seconds per epoch relative to LeNet-300-100, for ordering the runs (measured on
# 2 cores, one thread per run)
_COST = {"lenet300": 1.0, "lenet5": 4.5}
