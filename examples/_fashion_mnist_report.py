"""Plots and the Markdown report of the Fashion-MNIST sweep.

matplotlib is optional (the ``examples`` extra): without it :func:`write_plots`
writes nothing and says so once.
"""

from __future__ import annotations

import math
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from fashion_mnist import Row, RunResult

_POLICY_COLOR = {
    "dense": "black",
    "static": "tab:gray",
    "set": "tab:orange",
    "rigl": "tab:blue",
    "rigl-torch": "tab:red",
}
_DIST_STYLE = {
    "erk": ("-", "o"),
    "uniform": ("--", "s"),
    "er": (":", "^"),
    "uniform-first-dense": ("-.", "D"),
}


def _style(policy: str, distribution: str) -> dict[str, Any]:
    """Colour by policy, line style and marker by distribution."""
    ls, marker = _DIST_STYLE.get(distribution, (":", "x"))
    return {"color": _POLICY_COLOR.get(policy, "tab:green"), "ls": ls, "marker": marker}


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


def _first_seed(results: Sequence[RunResult]) -> dict[tuple[Any, ...], RunResult]:
    """The run with the lowest seed of each configuration."""
    chosen: dict[tuple[Any, ...], RunResult] = {}
    for r in results:
        if r.spec.key not in chosen or r.spec.seed < chosen[r.spec.key].spec.seed:
            chosen[r.spec.key] = r
    return chosen


def write_plots(
    results: Sequence[RunResult], rows: Sequence[Row], out_dir: Path
) -> list[Path]:
    """Writes the three PNG figures into ``out_dir``.

    * ``accuracy_vs_sparsity.png``: mean ± std test accuracy against overall
      sparsity, one line per policy and distribution, dense as a band.
    * ``layer_density.png``: density of each layer's final mask, per distribution
      and target sparsity (RigL runs, lowest seed).
    * ``mask_dynamics.png``: fraction of the active weights replaced at each
      topology update, and the in-time over-parameterisation rate, over training.

    Returns:
        The files written; empty when matplotlib is missing.
    """
    plt = _pyplot()
    if plt is None:
        return []
    out_dir.mkdir(parents=True, exist_ok=True)
    written = [
        _accuracy_plot(plt, rows, out_dir / "accuracy_vs_sparsity.png"),
        _density_plot(plt, results, out_dir / "layer_density.png"),
        _dynamics_plot(plt, results, out_dir / "mask_dynamics.png"),
    ]
    return [p for p in written if p is not None]


def _accuracy_plot(plt: Any, rows: Sequence[Row], path: Path) -> Path | None:
    """One panel per (model, distribution): accuracy against target sparsity.

    rigl-torch's first-layer-dense rows are left out (their overall sparsity is
    about 11%, not comparable here; the table has them). Points far below dense
    are drawn at the panel's floor with their value written next to them.
    """
    panels = sorted(
        {
            (r.model, r.distribution)
            for r in rows
            if r.policy != "dense" and r.distribution != "uniform-first-dense"
        }
    )
    if not panels:
        return None
    fig, axes = plt.subplots(
        1, len(panels), figsize=(5 * len(panels), 4.5), squeeze=False
    )
    for ax, (model, dist) in zip(axes[0], panels, strict=True):
        dense = next(
            (r for r in rows if r.model == model and r.policy == "dense"), None
        )
        mine = [r for r in rows if r.model == model and r.distribution == dist]
        floor = -math.inf
        if dense is not None:
            lo, hi = 100 * (dense.mean - dense.std), 100 * (dense.mean + dense.std)
            ax.axhspan(lo, hi, color="black", alpha=0.1)
            ax.axhline(
                100 * dense.mean,
                color="black",
                lw=1,
                label=f"dense {100 * dense.mean:.2f}",
            )
            floor = 100 * dense.mean - 5.0
        sparsities = sorted({r.target_sparsity for r in mine})
        labels: list[tuple[float, float, str, str]] = []
        for policy in sorted({r.policy for r in mine}):
            pts = sorted(
                (r for r in mine if r.policy == policy), key=lambda r: r.target_sparsity
            )
            xs = [sparsities.index(r.target_sparsity) for r in pts]
            ys = [max(100 * r.mean, floor) for r in pts]
            ax.errorbar(
                xs,
                ys,
                yerr=[100 * r.std if 100 * r.mean > floor else 0 for r in pts],
                **_style(policy, dist),
                capsize=3,
                label=policy,
            )
            labels += [
                (
                    x,
                    y,
                    f"{100 * r.mean:.2f}"
                    + (" (off scale)" if y > 100 * r.mean else ""),
                    _POLICY_COLOR.get(policy, "tab:green"),
                )
                for x, y, r in zip(xs, ys, pts, strict=True)
            ]
        _place_labels(ax, labels)
        ax.set_xticks(range(len(sparsities)), [f"{100 * s:g}%" for s in sparsities])
        ax.set_xlim(-0.4, len(sparsities) - 0.4)
        if floor > -math.inf:
            ax.set_ylim(bottom=floor - 0.3)
        ax.set_xlabel("target sparsity (all layers sparse)")
        ax.set_ylabel("test accuracy (%), mean ± std over seeds")
        ax.set_title(f"{model}, {dist} allocation")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
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
    gap = 0.045 * (ymax - ymin)
    for x in sorted({label[0] for label in labels}):
        column = sorted((lb for lb in labels if lb[0] == x), key=lambda lb: -lb[1])
        last = math.inf
        for _x, y, text, color in column:
            place = min(y, last - gap)
            ax.annotate(
                text,
                (x, y),
                xytext=(x + 0.06, place),
                textcoords="data",
                fontsize=6,
                color=color,
                va="center",
            )
            last = place


def _density_plot(plt: Any, results: Sequence[RunResult], path: Path) -> Path | None:
    chosen = [
        r
        for r in _first_seed(results).values()
        if r.spec.policy in ("rigl", "rigl-torch")
    ]
    if not chosen:
        return None
    sparsities = sorted({r.spec.sparsity for r in chosen})
    fig, axes = plt.subplots(
        1, len(sparsities), figsize=(6 * len(sparsities), 4), squeeze=False
    )
    for ax, sparsity in zip(axes[0], sparsities, strict=True):
        runs = [r for r in chosen if r.spec.sparsity == sparsity]
        layers = list(runs[0].layer_density)
        width = 0.8 / len(runs)
        for i, r in enumerate(runs):
            xs = [j + (i - (len(runs) - 1) / 2) * width for j in range(len(layers))]
            heights = [r.layer_density.get(name, float("nan")) for name in layers]
            bars = ax.bar(
                xs,
                heights,
                width=width,
                label=f"{r.spec.model} {r.spec.policy} ({r.spec.distribution})",
            )
            ax.bar_label(bars, [f"{h:.3f}" for h in heights], fontsize=6)
        ax.set_xticks(range(len(layers)), layers, fontsize=8)
        ax.set_yscale("log")
        ax.set_ylim(0.005, 2.0)
        ax.set_ylabel("density of final mask (log scale)")
        ax.set_title(
            f"per-layer density, target sparsity {sparsity:g}\n"
            "(static and SET start from the same allocation as RigL)",
            fontsize=9,
        )
        ax.grid(alpha=0.3, axis="y")
        ax.legend(fontsize=7)
    return _save(plt, fig, path)


def _dynamics_plot(plt: Any, results: Sequence[RunResult], path: Path) -> Path | None:
    chosen = [r for r in _first_seed(results).values() if r.mask_events]
    if not chosen:
        return None
    sparsities = sorted({r.spec.sparsity for r in chosen})
    fig, axes = plt.subplots(
        2, len(sparsities), figsize=(6 * len(sparsities), 7), squeeze=False
    )
    for col, sparsity in enumerate(sparsities):
        for r in (r for r in chosen if r.spec.sparsity == sparsity):
            style = _style(r.spec.policy, r.spec.distribution)
            label = f"{r.spec.model} {r.spec.policy} ({r.spec.distribution})"
            updates = [(s, f) for s, f, _ in r.mask_events if s > 0]
            if updates:
                axes[0][col].plot(
                    [s for s, _ in updates],
                    [100 * f for _, f in updates],
                    **style,
                    ms=3,
                    label=label,
                )
            steps = [s for s, _, _ in r.mask_events] + [r.steps]
            itop = [i for _, _, i in r.mask_events] + [r.mask_events[-1][2]]
            axes[1][col].step(
                steps,
                [100 * i for i in itop],
                where="post",
                color=style["color"],
                ls=style["ls"],
                label=label,
            )
        axes[0][col].set_title(f"mask change per update, target sparsity {sparsity:g}")
        axes[0][col].set_ylabel("active weights replaced (%)")
        axes[1][col].set_title(f"in-time over-parameterisation, sparsity {sparsity:g}")
        axes[1][col].set_ylabel("weights ever active (%)")
        for ax in axes[:, col]:
            ax.set_xlabel("optimizer step")
            ax.grid(alpha=0.3)
            ax.legend(fontsize=7)
    return _save(plt, fig, path)


def render_markdown(
    results: Sequence[RunResult],
    rows: Sequence[Row],
    meta: Mapping[str, Any],
    *,
    table: str,
    checks: Sequence[tuple[str, bool, str]],
    pictures: Sequence[str],
    json_path: str,
    gap_path: str,
) -> str:
    """The results page: how it was made, the table, the claims, the figures.

    ``pictures``, ``json_path`` and ``gap_path`` (docs/results/gap.md) are links
    relative to the page.
    """
    recipe = meta.get("recipe", {})
    lines = [
        "# Fashion-MNIST results",
        "",
        "Test accuracy of LeNet-300-100 (784-300-100-10) on Fashion-MNIST trained "
        "dense and with sparsetorch's static, SET and RigL policies, all layers "
        "sparse, mean ± sample std over seeds. Every row has the same budget and "
        "recipe. Produced by `examples/fashion_mnist.py`; raw numbers in "
        f"[`{json_path}`]({json_path}).",
        "",
        f"- Command: `{meta.get('command', '?')}`",
        f"- Machine: {meta.get('machine', '?')}",
        f"- sparsetorch: {meta.get('sparsetorch', 'version not recorded')}",
        f"- Wall time: {meta.get('wall_time_s', 0) / 60:.1f} min for "
        f"{len(results)} runs, {meta.get('jobs', 1)} at a time "
        f"({meta.get('date', '')})",
        f"- Data: {meta.get('n_train', '?')} training examples, evaluated on "
        f"{meta.get('n_eval', '?')} {meta.get('evaluated_on', 'test')} examples",
        f"- Recipe: {recipe.get('epochs')} epochs, batch {recipe.get('batch_size')}, "
        f"SGD Nesterov momentum {recipe.get('momentum')}, lr {recipe.get('lr')} "
        f"(linear warm-up {recipe.get('warmup_epochs')} epoch, cosine to 0), weight "
        f"decay {recipe.get('weight_decay')}; topology update every "
        f"{recipe.get('update_interval')} steps, drop fraction "
        f"{recipe.get('drop_fraction')} cosine-annealed, masks frozen after "
        f"{recipe.get('end_fraction')} of training, new weights start at zero; "
        + (
            "sparse weights scaled by 1/sqrt(layer density) at the start "
            "(sparsity-aware initialisation)"
            if recipe.get("sparse_init") == "scaled"
            else "default (dense) initialisation"
        ),
        "",
        "How the recipe was chosen: on a validation split (the last 10000 training "
        "images, `--holdout 10000`), never on the test set. Batch size and learning "
        "rate were picked for the dense baseline; the update interval, drop "
        "fraction and sparsity-aware initialisation for RigL; epochs and weight "
        "decay as the pair with the best mean validation accuracy of dense and RigL "
        "ERK 90% over 6 seeds (both rose). Every row then uses the same values. "
        "Runs share the machine with other work, so wall times are indicative. What "
        "was tried to close RigL's gap to dense at 90%, with the commands: "
        f"[{gap_path}]({gap_path}).",
        "",
        "*Overall sparsity* is measured on the final masks over all Linear/Conv "
        "weights (biases are dense). `uniform-first-dense` is rigl-torch's "
        "'uniform' allocation, which keeps the first layer dense; rigl-torch "
        "rows with plain `uniform` make every layer sparse by giving rigl-torch a "
        "dummy first layer to keep dense (see `examples/_rigl_torch_peer.py`).",
        "",
        table,
        "",
    ]
    if checks:
        lines += ["## Claims checked on these numbers", ""]
        lines += [
            f"- {'✅' if holds else '❌'} {claim}: {evidence}"
            for claim, holds, evidence in checks
        ]
        lines.append("")
    if pictures:
        lines += ["## Figures", ""]
        lines += [f"![{Path(p).stem}]({p})" for p in pictures]
        lines += [
            "",
            "The mask-change panel shows, at each topology update, the share of the "
            "active weights that were newly grown; the in-time over-"
            "parameterisation (ITOP) rate is the share of the sparse layers' "
            "weights that have been active at some point (Liu et al., 2021). "
            "Static masks never change, so their ITOP rate stays at their density.",
            "",
        ]
    summaries = [r for r in _first_seed(results).values() if r.summary]
    if summaries:
        lines += ["## Final masks (`summary()`, lowest seed)", ""]
        for r in summaries:
            s = r.spec
            lines += [
                f"<details><summary>{s.model} {s.policy} {s.distribution} "
                f"sparsity {s.sparsity:g}</summary>",
                "",
                "```",
                r.summary,
                "```",
                "",
                "</details>",
                "",
            ]
    return "\n".join(lines)
