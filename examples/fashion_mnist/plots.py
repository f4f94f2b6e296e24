"""The sweep's figures; matplotlib is optional (the ``examples`` extra).

Without matplotlib :func:`write_plots` writes nothing and says so once.
"""

from __future__ import annotations

import math
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .config import RunResult
from .models import TITLES
from .report import Row

COLORS = {
    "dense": "black",
    "static": "tab:gray",
    "set": "tab:orange",
    "snfs": "tab:purple",
    "rigl": "tab:blue",
    "snip": "tab:brown",
    "gmp": "tab:green",
    "rigl-torch": "tab:red",
}
MARKERS = {1: "o", 2: "s", 5: "D"}


def _pyplot() -> Any:
    try:
        import matplotlib
    except ImportError:
        print(
            "note: matplotlib is not installed, no plots written: "
            "pip install matplotlib -c constraints.txt",
            file=sys.stderr,
        )
        return None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _main_rows(rows: Sequence[Row], model: str) -> list[Row]:
    """The model's rows of the method comparison: ERK, 1x, unstructured."""
    return [
        r
        for r in rows
        if r.model == model
        and r.length == 1
        and r.structure == "none"
        and r.distribution == "erk"
    ]


def _first_seed(results: Sequence[RunResult]) -> list[RunResult]:
    """The run with the lowest seed of each configuration, in grid order."""
    chosen: dict[tuple[Any, ...], RunResult] = {}
    for r in results:
        if r.spec.key not in chosen or r.spec.seed < chosen[r.spec.key].spec.seed:
            chosen[r.spec.key] = r
    return list(chosen.values())


def write_plots(
    results: Sequence[RunResult], rows: Sequence[Row], out_dir: Path
) -> list[Path]:
    """Writes the PNG figures into ``out_dir``.

    * ``accuracy_vs_sparsity.png``: mean ± std accuracy of each method against
      its sparsity (ERK), dense as a band: the RigL paper's first view;
    * ``accuracy_vs_flops.png``: the same rows, and the longer and structured
      RigL runs, against their training FLOPs relative to dense training: the
      paper's second view;
    * ``layer_density.png``: each layer's final density under the policies that
      choose it (RigL keeps ERK's; SNFS moves it; SNIP and GMP pick it);
    * ``mask_dynamics.png``: share of the active weights replaced at each update
      and the in-time over-parameterisation rate, from ``Sparsifier.metrics()``.

    Returns:
        The files written; empty when matplotlib is missing.
    """
    plt = _pyplot()
    if plt is None:
        return []
    out_dir.mkdir(parents=True, exist_ok=True)
    written = [
        _accuracy_plot(plt, rows, out_dir / "accuracy_vs_sparsity.png"),
        _flops_plot(plt, rows, out_dir / "accuracy_vs_flops.png"),
        _density_plot(plt, results, out_dir / "layer_density.png"),
        _dynamics_plot(plt, results, out_dir / "mask_dynamics.png"),
    ]
    return [p for p in written if p is not None]


def _models(rows: Sequence[Row]) -> list[str]:
    return list(dict.fromkeys(r.model for r in rows))


def _dense(rows: Sequence[Row], model: str) -> Row | None:
    return next(
        (r for r in rows if r.model == model and r.policy == "dense" and r.length == 1),
        None,
    )


def _dense_band(ax: Any, dense: Row | None, shown: Sequence[Row]) -> float:
    """Draws dense's mean ± std as a band; returns the panel's floor.

    The floor sits a point below the lowest mean of ``shown``, but no more than
    15 points below dense: a run that collapsed is drawn on the floor instead.
    """
    if dense is None:
        return -math.inf
    lo, hi = 100 * (dense.mean - dense.std), 100 * (dense.mean + dense.std)
    ax.axhspan(lo, hi, color="black", alpha=0.1)
    ax.axhline(
        100 * dense.mean, color="black", lw=1, label=f"dense {100 * dense.mean:.2f}"
    )
    lowest = min((100 * r.mean for r in shown), default=100 * dense.mean)
    return max(lowest - 1.0, 100 * dense.mean - 15.0)


def _accuracy_plot(plt: Any, rows: Sequence[Row], path: Path) -> Path | None:
    """One panel per model: accuracy against target sparsity, one line per method.

    Points far below dense are drawn at the panel's floor, their value beside them.
    """
    models = [
        m
        for m in _models(rows)
        if any(r.policy != "dense" for r in _main_rows(rows, m))
    ]
    if not models:
        return None
    fig, axes = plt.subplots(
        1, len(models), figsize=(6 * len(models), 4.8), squeeze=False
    )
    for ax, model in zip(axes[0], models, strict=True):
        mine = [r for r in _main_rows(rows, model) if r.policy != "dense"]
        floor = _dense_band(ax, _dense(rows, model), mine)
        sparsities = sorted({r.target_sparsity for r in mine})
        policies = list(dict.fromkeys(r.policy for r in mine))
        labels: list[tuple[float, float, str, str]] = []
        for i, policy in enumerate(policies):
            pts = sorted(
                (r for r in mine if r.policy == policy), key=lambda r: r.target_sparsity
            )
            # a small horizontal offset per policy keeps the error bars apart
            xs = [
                sparsities.index(r.target_sparsity) + 0.04 * (i - len(policies) / 2)
                for r in pts
            ]
            ys = [max(100 * r.mean, floor) for r in pts]
            ax.errorbar(
                xs,
                ys,
                yerr=[100 * r.std if 100 * r.mean > floor else 0 for r in pts],
                color=COLORS.get(policy, "tab:cyan"),
                marker="o",
                capsize=3,
                label=pts[0].method,
            )
            labels += [
                (
                    x,
                    y,
                    f"{100 * r.mean:.2f}"
                    + (" (off scale)" if y > 100 * r.mean else ""),
                    COLORS.get(policy, "tab:cyan"),
                )
                for x, y, r in zip(xs, ys, pts, strict=True)
            ]
        _place_labels(ax, labels)
        ax.set_xticks(range(len(sparsities)), [f"{100 * s:g}%" for s in sparsities])
        ax.set_xlim(-0.4, len(sparsities) - 0.3)
        if floor > -math.inf:
            ax.set_ylim(bottom=floor - 0.3)
        ax.set_xlabel("target sparsity (ERK allocation, all layers sparse)")
        ax.set_ylabel("test accuracy (%), mean ± std over seeds")
        ax.set_title(TITLES.get(model, model))
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, loc="lower left")
    return _save(plt, fig, path)


def _flops_plot(plt: Any, rows: Sequence[Row], path: Path) -> Path | None:
    """One panel per model: accuracy against training FLOPs (x dense, log scale).

    Filled markers are rows below 95% sparsity, open ones 98%; RigL's 1x,
    2x and 5x runs at one sparsity are joined by a line.
    """
    models = [
        m
        for m in _models(rows)
        if any(
            r.train_flops is not None and r.policy != "dense"
            for r in rows
            if r.model == m
        )
    ]
    if not models:
        return None
    fig, axes = plt.subplots(
        1, len(models), figsize=(6.5 * len(models), 5), squeeze=False
    )
    for ax, model in zip(axes[0], models, strict=True):
        mine = [r for r in rows if r.model == model and r.train_flops is not None]
        floor = _dense_band(ax, _dense(rows, model), mine)
        sparsities = sorted({r.target_sparsity for r in mine if r.policy != "dense"})
        for r in mine:
            if r.policy == "dense":
                continue
            color = COLORS.get(r.policy, "tab:cyan")
            filled = r.target_sparsity < 0.95
            y = max(100 * r.mean, floor)
            ax.errorbar(
                [r.train_flops],
                [y],
                yerr=[100 * r.std if y == 100 * r.mean else 0],
                color=color,
                marker=MARKERS.get(r.length, "o") if r.structure == "none" else "^",
                mfc=color if filled else "white",
                capsize=2,
                ls="none",
            )
            ax.annotate(
                r.name + ("" if y == 100 * r.mean else f" ({100 * r.mean:.1f})"),
                (r.train_flops, y),
                xytext=(4, 2),
                textcoords="offset points",
                fontsize=6,
                color=color,
            )
        for s in sparsities:
            line = sorted(
                (
                    r
                    for r in mine
                    if r.policy == "rigl"
                    and r.structure == "none"
                    and r.distribution == "erk"
                    and r.target_sparsity == s
                ),
                key=lambda r: r.length,
            )
            if len(line) > 1:
                ax.plot(
                    [r.train_flops for r in line],
                    [100 * r.mean for r in line],
                    color=COLORS["rigl"],
                    lw=0.8,
                    alpha=0.6,
                )
        ax.set_xscale("log")
        ticks = [
            t
            for t in (0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0)
            if min(r.train_flops or 1 for r in mine) / 1.5
            <= t
            <= max(r.train_flops or 1 for r in mine) * 1.5
        ]
        ax.set_xticks(ticks, [f"{t:g}x" for t in ticks])
        ax.minorticks_off()
        if floor > -math.inf:
            ax.set_ylim(bottom=floor - 0.3)
        ax.set_xlabel("training FLOPs relative to dense training (1x), log scale")
        ax.set_ylabel("test accuracy (%), mean ± std over seeds")
        ax.set_title(
            f"{TITLES.get(model, model)}: filled <95% sparsity, open 98%; "
            "o 1x, s 2x, D 5x, ^ structured",
            fontsize=9,
        )
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=7, loc="lower right")
    return _save(plt, fig, path)


def _save(plt: Any, fig: Any, path: Path) -> Path:
    """Lays out, writes and closes ``fig``; returns ``path``."""
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _place_labels(ax: Any, labels: Sequence[tuple[float, float, str, str]]) -> None:
    """Writes value labels right of their points, spread so none overlap."""
    ymin, ymax = ax.get_ylim()
    gap = 0.04 * (ymax - ymin)
    for x in sorted({round(label[0]) for label in labels}):
        column = sorted(
            (lb for lb in labels if round(lb[0]) == x), key=lambda lb: -lb[1]
        )
        last = math.inf
        for _x, y, text, color in column:
            place = min(y, last - gap)
            ax.annotate(
                text,
                (_x, y),
                xytext=(x + 0.15, place),
                textcoords="data",
                fontsize=6,
                color=color,
                va="center",
            )
            last = place


DENSITY_POLICIES = ("rigl", "snfs", "snip", "gmp", "rigl-torch")


def _density_plot(plt: Any, results: Sequence[RunResult], path: Path) -> Path | None:
    """Per model and sparsity: each layer's final density under each policy."""
    chosen = [
        r
        for r in _first_seed(results)
        if r.spec.policy in DENSITY_POLICIES
        and r.spec.length == 1
        and r.spec.structure == "none"
        and r.spec.sparsity >= 0.9
    ]
    panels = list(dict.fromkeys((r.spec.model, r.spec.sparsity) for r in chosen))
    if not panels:
        return None
    cols = min(2, len(panels))
    rows = math.ceil(len(panels) / cols)
    fig, axes = plt.subplots(
        rows, cols, figsize=(5.5 * cols, 4.2 * rows), squeeze=False
    )
    for ax in axes.flat[len(panels) :]:
        ax.axis("off")
    for ax, (model, sparsity) in zip(axes.flat, panels, strict=False):
        runs = [
            r for r in chosen if (r.spec.model, r.spec.sparsity) == (model, sparsity)
        ]
        layers = list(runs[0].layer_density)
        width = 0.8 / len(runs)
        for i, r in enumerate(runs):
            xs = [j + (i - (len(runs) - 1) / 2) * width for j in range(len(layers))]
            heights = [r.layer_density.get(name, float("nan")) for name in layers]
            ax.bar(
                xs,
                heights,
                width=width,
                color=COLORS.get(r.spec.policy),
                label=f"{r.spec.method} ({r.spec.distribution})",
            )
        ax.set_xticks(
            range(len(layers)), [n.removesuffix(".weight") for n in layers], fontsize=8
        )
        ax.set_yscale("log")
        ax.set_ylim(0.003, 1.5)
        ax.set_ylabel("density of the final mask (log scale)")
        ax.set_title(
            f"{TITLES.get(model, model)}, sparsity {100 * sparsity:g}% (seed 0)",
            fontsize=9,
        )
        ax.grid(alpha=0.3, axis="y")
        ax.legend(fontsize=6)
    return _save(plt, fig, path)


def _dynamics_plot(plt: Any, results: Sequence[RunResult], path: Path) -> Path | None:
    """Per model and sparsity: mask change per update and ITOP rate over training."""
    chosen = [
        r
        for r in _first_seed(results)
        if len(r.mask_events) > 1 and r.spec.structure == "none" and r.spec.length == 1
    ]
    panels = list(dict.fromkeys((r.spec.model, r.spec.sparsity) for r in chosen))
    if not panels:
        return None
    fig, axes = plt.subplots(
        2, len(panels), figsize=(5.5 * len(panels), 7), squeeze=False
    )
    for col, (model, sparsity) in enumerate(panels):
        for r in (
            r for r in chosen if (r.spec.model, r.spec.sparsity) == (model, sparsity)
        ):
            color = COLORS.get(r.spec.policy, "tab:cyan")
            updates = [(s, f) for s, f, _ in r.mask_events if s > 0]
            axes[0][col].plot(
                [s for s, _ in updates],
                [100 * f for _, f in updates],
                color=color,
                marker="o",
                ms=2,
                lw=1,
                label=r.spec.method,
            )
            steps = [s for s, _, _ in r.mask_events] + [r.steps]
            itop = [i for _, _, i in r.mask_events] + [r.mask_events[-1][2]]
            axes[1][col].step(
                steps,
                [100 * i for i in itop],
                where="post",
                color=color,
                label=r.spec.method,
            )
        title = f"{TITLES.get(model, model)}, sparsity {100 * sparsity:g}%"
        axes[0][col].set_title(f"mask change per update, {title}", fontsize=9)
        axes[0][col].set_ylabel("active weights newly grown (%)")
        axes[1][col].set_title(f"in-time over-parameterisation, {title}", fontsize=9)
        axes[1][col].set_ylabel("weights ever active (%)")
        for ax in axes[:, col]:
            ax.set_xlabel("optimizer step")
            ax.grid(alpha=0.3)
            ax.legend(fontsize=7)
    return _save(plt, fig, path)
