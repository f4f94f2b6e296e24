"""The command line: parse, build the grid, train it, print and write the report."""

from __future__ import annotations

import argparse
import dataclasses
import json
import shlex
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import NoReturn

import torch
from _rigl_torch_peer import PeerUnavailableError
from fashion_mnist_data import FashionMNISTError

from .config import (
    DISTRIBUTIONS,
    POLICIES,
    RECIPES,
    SPARSE_POLICIES,
    STRUCTURES,
    Recipe,
    RunSpec,
    UsageError,
    result_from_json,
)
from .grid import (
    SPARSITIES,
    DataRequest,
    build_grid,
    default_rows,
    full_rows,
    train_grid,
    usable_cores,
    with_seeds,
)
from .journal import Journal
from .models import MODELS
from .progress import say
from .report import (
    aggregate,
    comparisons,
    format_table,
    machine_description,
    peer_checks,
    write_outputs,
)
from .train import import_sparsetorch

PROG = "fashion_mnist"
# --quick: one seed, a slice of the data, and updates often enough to happen
QUICK_TRAIN, QUICK_TEST, QUICK_EPOCHS, QUICK_INTERVAL = 6_000, 1_000, 2, 25
# the recipe fields a flag may set for every model
RECIPE_FLAGS = (
    "epochs",
    "batch_size",
    "lr",
    "weight_decay",
    "update_interval",
    "drop_fraction",
    "end_fraction",
    "sparse_init",
)


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


def _choices(what: str, allowed: Sequence[str], **kwargs: object) -> dict[str, object]:
    return {
        "nargs": "+",
        "type": _one_of(what, allowed),
        "metavar": "{" + ",".join(allowed) + "}",
        "default": None,
        **kwargs,
    }


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    """Parses the command line."""
    parser = _OneLineParser(
        prog=PROG,
        description=(
            "Dense vs static, SET, SNFS, RigL, SNIP and GMP on Fashion-MNIST (no "
            "torchvision). With no flags: the method comparison on LeNet-300-100 "
            "(~10 min on 2 CPU cores); --full adds RigL 2x/5x, 2:4 and "
            "constant-fan-in RigL, and LeNet-5. Flags naming models, policies, "
            "sparsities, ... run the grid they span instead."
        ),
    )
    grid = parser.add_argument_group("grid (default: the preset rows)")
    grid.add_argument(
        "--full",
        action="store_true",
        help="every row of docs/results.md (~40 min on 2 cores)",
    )
    grid.add_argument("--model", **_choices("model", MODELS))  # type: ignore[arg-type]
    grid.add_argument(
        "--policy",
        **_choices("policy", POLICIES, help="default: dense and every sparse policy"),  # type: ignore[arg-type]
    )
    grid.add_argument(
        "--sparsity", nargs="+", type=float, default=None, help="default: 0.9 0.98"
    )
    grid.add_argument(
        "--distribution",
        **_choices(  # type: ignore[arg-type]
            "distribution",
            DISTRIBUTIONS,
            help=(
                "sparsity allocation (default: erk); uniform-first-dense is "
                "rigl-torch's 'uniform', which keeps the first layer dense"
            ),
        ),
    )
    grid.add_argument(
        "--structure",
        **_choices("structure", STRUCTURES, help="mask structure (default: none)"),  # type: ignore[arg-type]
    )
    grid.add_argument(
        "--length",
        nargs="+",
        type=int,
        default=None,
        help="training-length multipliers, e.g. 1 2 5 for RigL 1x/2x/5x (default: 1)",
    )
    grid.add_argument("--seed", type=int, default=0, help="first seed")
    grid.add_argument(
        "--seeds", type=int, default=None, help="number of seeds (default: 3)"
    )
    grid.add_argument(
        "--peer",
        action="store_true",
        help="add rigl-torch 0.5.2 rows (pip install rigl-torch==0.5.2 --no-deps)",
    )
    recipe = parser.add_argument_group(
        "recipe (default: each model's own, chosen on a validation split)"
    )
    recipe.add_argument("--epochs", type=int, default=None)
    recipe.add_argument("--batch-size", type=int, default=None)
    recipe.add_argument("--lr", type=float, default=None)
    recipe.add_argument("--weight-decay", type=float, default=None)
    recipe.add_argument(
        "--update-interval", type=int, default=None, help="steps between updates"
    )
    recipe.add_argument("--drop-fraction", type=float, default=None)
    recipe.add_argument(
        "--end-fraction",
        type=float,
        default=None,
        help="fraction of training after which masks freeze",
    )
    recipe.add_argument(
        "--sparse-init",
        type=_one_of("sparse init", ("scaled", "default")),
        metavar="{scaled,default}",
        default=None,
        help="scale sparse weights by 1/sqrt(density) at the start (default: scaled)",
    )
    data = parser.add_argument_group("data")
    data.add_argument(
        "--data-dir",
        default=None,
        help="directory with the four IDX .gz files (default: see fashion_mnist_data)",
    )
    data.add_argument(
        "--no-download", action="store_true", help="never download the data"
    )
    data.add_argument(
        "--holdout",
        type=int,
        default=0,
        help="evaluate on the last N training examples instead of the test set",
    )
    data.add_argument("--train-subset", type=int, default=None)
    data.add_argument("--test-subset", type=int, default=None)
    data.add_argument(
        "--quick",
        action="store_true",
        help=(
            f"smoke test: 1 seed, {QUICK_EPOCHS} epochs on {QUICK_TRAIN} train / "
            f"{QUICK_TEST} test examples, update interval {QUICK_INTERVAL}"
        ),
    )
    run = parser.add_argument_group("running and output")
    run.add_argument(
        "--threads",
        type=int,
        default=1,
        help=(
            "torch intra-op threads per run (default: 1; models this small gain "
            "little from more)"
        ),
    )
    run.add_argument(
        "--jobs",
        type=int,
        default=None,
        help=(
            "runs trained at once, each in its own process (default: the usable "
            "CPU cores divided by --threads); results do not depend on it"
        ),
    )
    run.add_argument(
        "--out", type=Path, default=Path("runs/fashion_mnist"), help="output dir"
    )
    run.add_argument(
        "--report",
        type=Path,
        default=None,
        help="Markdown report path (default: OUT/results.md)",
    )
    run.add_argument(
        "--resume",
        action="store_true",
        help=(
            "keep the runs OUT/runs.jsonl holds from an earlier, interrupted "
            "invocation with the same recipe and data; train only the rest"
        ),
    )
    run.add_argument("--no-progress", action="store_true")
    run.add_argument("--no-plots", action="store_true")
    run.add_argument(
        "--notes",
        type=Path,
        default=None,
        help="a Markdown file put into the report as 'What the numbers show'",
    )
    run.add_argument(
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
    for name in (
        "epochs",
        "seeds",
        "batch_size",
        "update_interval",
        "threads",
        "jobs",
    ):
        value = getattr(args, name)
        if value is not None and value < 1:
            flag = "--" + name.replace("_", "-")
            raise UsageError(f"{flag} {value} must be at least 1")
    for value in args.length or ():
        if value < 1:
            raise UsageError(f"--length {value} must be at least 1")
    if args.drop_fraction is not None and not 0.0 <= args.drop_fraction <= 1.0:
        raise UsageError(f"--drop-fraction {args.drop_fraction} must be in [0, 1]")
    if args.end_fraction is not None and not 0.0 < args.end_fraction <= 1.0:
        raise UsageError(f"--end-fraction {args.end_fraction} must be in (0, 1]")


def _grid_flags(args: argparse.Namespace) -> bool:
    names = ("model", "policy", "sparsity", "distribution", "structure", "length")
    return any(getattr(args, name) is not None for name in names)


def choose_rows(args: argparse.Namespace) -> list[RunSpec]:
    """The grid's rows (one per configuration, seed 0): a preset or the flags'."""
    if _grid_flags(args):
        if args.full:
            raise UsageError(
                "--full runs the preset rows: drop it, or drop --model / --policy / "
                "--sparsity / --distribution / --structure / --length"
            )
        policies = list(args.policy or ("dense", *SPARSE_POLICIES))
        if args.peer and "rigl-torch" not in policies:
            policies.append("rigl-torch")
        models = args.model or ["lenet300"]
        sparsities = args.sparsity or SPARSITIES
        rows = build_grid(
            models,
            policies,
            sparsities,
            args.distribution or ["erk"],
            args.structure or ["none"],
            args.length or [1],
            explicit_distribution=args.distribution is not None,
        )
    else:
        rows = full_rows() if args.full else default_rows()
        models = list(dict.fromkeys(r.model for r in rows))
        policies = ["rigl", "rigl-torch"] if args.peer else []
        sparsities = SPARSITIES
    if "rigl-torch" in policies and args.distribution is None:
        # rigl-torch's 'uniform' keeps the first layer dense (uniform-first-dense);
        # with a dummy first layer it makes every layer sparse (uniform): compare
        # it with sparsetorch's RigL under both allocations
        rows += build_grid(
            models,
            [p for p in ("rigl", "rigl-torch") if p in policies],
            sparsities,
            ["uniform", "uniform-first-dense"],
            explicit_distribution=True,
        )
        rows = list(dict.fromkeys(rows))
    return rows


def choose_recipes(args: argparse.Namespace) -> dict[str, Recipe]:
    """Each model's recipe, with the fields the flags (and ``--quick``) set."""
    changes = {
        name: getattr(args, name)
        for name in RECIPE_FLAGS
        if getattr(args, name) is not None
    }
    if args.quick:
        changes.setdefault("epochs", QUICK_EPOCHS)
        changes.setdefault("update_interval", QUICK_INTERVAL)
    return {
        model: dataclasses.replace(recipe, **changes)
        for model, recipe in RECIPES.items()
    }


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
        meta["rendered_from"] = str(args.from_json)
        pictures = write_outputs(
            loaded, meta, out_dir, report, plots=not args.no_plots, notes=_notes(args)
        )
        print(format_table(aggregate(loaded), evaluated_on=meta["evaluated_on"]))
        print(f"wrote {out_dir / 'results.json'}, {report}, {len(pictures)} plots")
        return 0

    seeds = range(args.seed, args.seed + (args.seeds or (1 if args.quick else 3)))
    grid = with_seeds(choose_rows(args), seeds)
    recipes = choose_recipes(args)
    if any(s.policy in SPARSE_POLICIES for s in grid):
        import_sparsetorch()
    if any(s.policy == "rigl-torch" for s in grid):
        from _rigl_torch_peer import _import_rigl_scheduler

        _import_rigl_scheduler()

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
    used = {s.model: recipes[s.model] for s in grid}
    say(
        f"Fashion-MNIST from {data.source}: {data.train_x.shape[0]} train, "
        f"{data.test_x.shape[0]} {evaluation}; {len(grid)} runs, {jobs} at a time"
    )
    for model, recipe in used.items():
        say(f"{model}: {recipe}")

    journal = Journal(out_dir / "runs.jsonl", request, recipes)
    kept = journal.load(grid) if args.resume else {}
    if kept:
        say(f"--resume: {len(kept)} runs kept from {journal.path}")
    else:
        journal.clear()
    started = time.perf_counter()
    trained = train_grid(
        [s for s in grid if s not in kept],
        recipes,
        data,
        request,
        jobs=jobs,
        threads=args.threads,
        progress=not args.no_progress,
        on_result=journal.append,
    )
    wall = time.perf_counter() - started
    by_spec = {**kept, **{r.spec: r for r in trained}}
    results = [by_spec[s] for s in grid]

    rows = aggregate(results)
    print()
    print(format_table(rows, evaluated_on=evaluation))
    lines = [c.line() for c in comparisons(rows)]
    lines += [f"[{'ok' if h else 'MISS'}] {c}: {e}" for c, h, e in peer_checks(rows)]
    if lines:
        print()
        print("\n".join(lines))
    shown = next((r for r in reversed(results) if r.summary), None)
    if shown is not None:
        s = shown.spec
        print(
            f"\nsummary() of {s.model} {s.method} {s.distribution} "
            f"s={s.sparsity:g} seed={s.seed}:\n{shown.summary}"
        )
    meta = {
        "command": "python " + shlex.join([_shown_path(), *_argv(argv)]),
        "machine": machine_description(),
        "sparsetorch": _source_version(),
        "wall_time_s": round(wall, 1),
        "resumed_runs": len(kept),
        "jobs": jobs,
        "evaluated_on": evaluation,
        "n_train": data.train_x.shape[0],
        "n_eval": data.test_x.shape[0],
        "recipes": {m: dataclasses.asdict(r) for m, r in used.items()},
        "date": time.strftime("%Y-%m-%d %H:%M %Z"),
    }
    pictures = write_outputs(
        results, meta, out_dir, report, plots=not args.no_plots, notes=_notes(args)
    )
    print(
        f"\nwall time {wall:.0f}s; wrote {out_dir / 'results.json'}, {report}"
        + (f" and {len(pictures)} plots" if pictures else "")
    )
    return 0


def _notes(args: argparse.Namespace) -> str:
    if args.notes is None:
        return ""
    try:
        return str(args.notes.read_text())
    except OSError as exc:
        raise UsageError(f"--notes {args.notes}: {exc.strerror}") from None


def _argv(argv: Sequence[str] | None) -> list[str]:
    return list(sys.argv[1:] if argv is None else argv)


def _shown_path() -> str:
    """This application's folder, relative to the working directory if inside it."""
    path = Path(__file__).resolve().parent
    try:
        return str(path.relative_to(Path.cwd()))
    except ValueError:
        return str(path)


def _source_version() -> str:
    """sparsetorch's version and, in a git checkout, its commit."""
    try:
        st = import_sparsetorch()
        version = str(getattr(st, "__version__", "?"))
    except UsageError:
        version = "not installed"
    root = Path(__file__).resolve().parents[2]
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


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point: runs, and turns known errors into one-line messages."""
    try:
        return run(argv)
    except (FashionMNISTError, UsageError, PeerUnavailableError) as exc:
        print(f"{PROG}: error: {exc}", file=sys.stderr)
        return 2
