"""Aggregation over seeds, the results table, the comparisons, JSON and Markdown."""

from __future__ import annotations

import dataclasses
import json
import math
import os
import platform
import statistics
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .config import RunResult, method_name, result_to_json

# What was tried to close RigL's gap to dense (historical); every report links to it
GAP_NOTES = Path(__file__).resolve().parents[2] / "docs" / "results" / "gap.md"
# a difference counts as a lead when it exceeds this many standard errors
SE_RULE = 2.0


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
    structure: str = "none"
    length: int = 1
    train_flops: float | None = None
    inference_flops: float | None = None

    @property
    def mean(self) -> float:
        """Mean test accuracy over seeds."""
        return statistics.fmean(self.accuracies)

    @property
    def std(self) -> float:
        """Sample standard deviation over seeds (0 for one seed)."""
        return statistics.stdev(self.accuracies) if len(self.accuracies) > 1 else 0.0

    @property
    def method(self) -> str:
        """The policy's name with its variant, e.g. ``"RigL 2x"``."""
        return method_name(self.policy, self.structure, self.length)

    @property
    def name(self) -> str:
        """The method with its sparsity, e.g. ``"RigL 2x 90%"``."""
        if self.policy == "dense":
            return self.method
        name = f"{self.method} {100 * self.target_sparsity:g}%"
        if self.distribution != "erk":
            name += f" {self.distribution}"
        return name


def aggregate(results: Iterable[RunResult]) -> list[Row]:
    """Groups runs by configuration, in first-seen order."""
    groups: dict[tuple[Any, ...], list[RunResult]] = {}
    for r in results:
        groups.setdefault(r.spec.key, []).append(r)
    rows = []
    for runs in groups.values():
        s = runs[0].spec
        rows.append(
            Row(
                s.model,
                s.policy,
                s.distribution,
                s.sparsity,
                statistics.fmean(r.overall_sparsity for r in runs),
                [r.test_accuracy for r in runs],
                statistics.fmean(r.wall_s for r in runs),
                s.structure,
                s.length,
                _mean_or_none([r.train_flops for r in runs]),
                _mean_or_none([r.inference_flops for r in runs]),
            )
        )
    return rows


def _mean_or_none(values: Sequence[float | None]) -> float | None:
    known = [v for v in values if v is not None and not math.isnan(v)]
    return statistics.fmean(known) if known else None


def format_table(
    rows: Sequence[Row], *, markdown: bool = False, evaluated_on: str = "test"
) -> str:
    """Renders the results table as aligned text or as Markdown.

    Args:
        rows: the aggregated configurations.
        markdown: Markdown table instead of aligned plain text.
        evaluated_on: what the accuracy was measured on, for the header.
    """
    dense = {r.model: r.mean for r in rows if r.policy == "dense" and r.length == 1}
    header = [
        "model",
        "method",
        "distribution",
        "target sparsity",
        "overall sparsity",
        "train FLOPs",
        "infer FLOPs",
        f"{evaluated_on.split()[0]} acc % (mean ± std)",
        "vs dense",
        "seeds",
        "s/run",
    ]
    body = [
        [
            r.model,
            r.method,
            r.distribution,
            f"{r.target_sparsity:.2f}",
            f"{r.overall_sparsity:.4f}",
            _ratio(r.train_flops),
            _ratio(r.inference_flops),
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


def _ratio(value: float | None) -> str:
    return "?" if value is None else f"{value:.3f}x"


# ----------------------------------------------------------------- comparisons


@dataclass(frozen=True)
class Comparison:
    """``a`` against ``b`` on one model: the difference of the mean accuracies.

    The verdict follows one rule fixed before any test number was seen: a lead
    is a difference larger than :data:`SE_RULE` standard errors of the
    difference (Welch, seeds as samples); anything smaller is "within noise".
    """

    model: str
    a: Row
    b: Row

    @property
    def difference(self) -> float:
        """``a.mean - b.mean``, as a fraction."""
        return self.a.mean - self.b.mean

    @property
    def se(self) -> float:
        """Standard error of :attr:`difference` over seeds."""
        return _se(self.a, self.b)

    @property
    def verdict(self) -> str:
        """``"<a> ahead"``, ``"<b> ahead"``, ``"within noise"`` or ``"one seed"``."""
        if min(len(self.a.accuracies), len(self.b.accuracies)) < 2:
            return "one seed: no standard error"
        if self.difference > SE_RULE * self.se:
            return f"{self.a.name} ahead"
        if -self.difference > SE_RULE * self.se:
            return f"{self.b.name} ahead"
        return "within noise"

    def line(self) -> str:
        """One line: the comparison, the difference ± s.e. in points, the verdict."""
        return (
            f"{self.model}: {self.a.name} vs {self.b.name}: "
            f"{100 * self.a.mean:.2f} vs {100 * self.b.mean:.2f}, "
            f"{_difference(self.a, self.b)}: {self.verdict}"
        )


def comparisons(rows: Sequence[Row]) -> list[Comparison]:
    """The comparisons the sweep is run for, for each model, where both rows exist.

    * every method against RigL at the same sparsity (ERK, 1x, unstructured);
    * RigL against dense, at each sparsity and schedule length;
    * RigL 2x / 5x against RigL 1x at the same sparsity;
    * structured RigL against unstructured RigL at the same sparsity and
      allocation (2:4 vs 50% uniform; constant fan-in vs 90% ERK).
    """
    index = {
        (r.model, r.policy, r.target_sparsity, r.distribution, r.structure, r.length): r
        for r in rows
    }
    pairs: list[tuple[Row | None, Row | None]] = []
    for model in dict.fromkeys(r.model for r in rows):
        mine = [r for r in rows if r.model == model]
        sparsities = sorted({r.target_sparsity for r in mine if r.policy != "dense"})
        lengths = sorted({r.length for r in mine if r.policy == "rigl"})

        def rigl(s: float, length: int = 1) -> Row | None:
            return index.get((model, "rigl", s, "erk", "none", length))  # noqa: B023

        for s in sparsities:
            pairs += [
                (index.get((model, policy, s, "erk", "none", 1)), rigl(s))
                for policy in ("static", "set", "snfs", "snip", "gmp")
            ]
        dense = index.get((model, "dense", 0.0, "-", "none", 1))
        pairs += [(rigl(s, length), dense) for s in sparsities for length in lengths]
        pairs += [
            (rigl(s, length), rigl(s))
            for s in sparsities
            for length in lengths
            if length != 1
        ]
        pairs += [
            (
                r,
                index.get(
                    (model, "rigl", r.target_sparsity, r.distribution, "none", 1)
                ),
            )
            for r in mine
            if r.policy == "rigl" and r.structure != "none"
        ]
    return [
        Comparison(a.model, a, b) for a, b in pairs if a is not None and b is not None
    ]


def findings(items: Sequence[Comparison]) -> list[str]:
    """Plain sentences drawn from the comparisons by their verdicts alone."""
    lines = []
    others = [c for c in items if c.b.policy == "rigl" and c.a.policy != "rigl"]
    beats = [c for c in others if c.verdict == f"{c.a.name} ahead"]
    behind = [c for c in others if c.verdict == f"{c.b.name} ahead"]
    tied = [c for c in others if c.verdict == "within noise"]
    for title, group in (
        ("Ahead of RigL by more than 2 s.e.", beats),
        ("Behind RigL by more than 2 s.e.", behind),
        ("Within 2 s.e. of RigL", tied),
    ):
        names = [
            f"{c.a.name} on {c.model} ({100 * c.difference:+.2f} ± {100 * c.se:.2f})"
            for c in group
        ]
        lines.append(f"{title}: " + ("; ".join(names) if names else "none") + ".")
    return lines


def _difference(a: Row, b: Row) -> str:
    """``a - b`` in points with its standard error over seeds."""
    return f"{100 * (a.mean - b.mean):+.2f} ± {100 * _se(a, b):.2f} s.e."


def _se(a: Row, b: Row) -> float:
    """Standard error of ``a.mean - b.mean`` over seeds."""
    return math.sqrt(a.std**2 / len(a.accuracies) + b.std**2 / len(b.accuracies))


def peer_checks(rows: Sequence[Row]) -> list[tuple[str, bool, str]]:
    """sparsetorch's RigL against rigl-torch's, for each model.

    At each overall sparsity rigl-torch ran: each library's best RigL row there
    (rigl-torch only has uniform allocations; sparsetorch also has ERK), when
    sparsetorch ran more than one allocation; and, allocation by allocation, that
    the two implementations of the same algorithm agree: sparsetorch no worse by
    more than twice the standard error of the difference.

    Returns:
        ``(claim, holds, evidence)`` for each check whose rows are present.
    """
    checks: list[tuple[str, bool, str]] = []
    for model in dict.fromkeys(r.model for r in rows):
        groups: dict[float, list[Row]] = {}
        for row in rows:
            if (
                row.model == model
                and row.policy in ("rigl", "rigl-torch")
                and row.structure == "none"
                and row.length == 1
            ):
                groups.setdefault(round(row.overall_sparsity, 3), []).append(row)
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
                        f"{peer.overall_sparsity:.4f}): sparsetorch RigL no worse "
                        "than rigl-torch beyond 2 s.e.",
                        same.mean - peer.mean >= -2 * _se(same, peer),
                        f"sparsetorch {100 * same.mean:.2f} ± {100 * same.std:.2f}, "
                        f"rigl-torch {100 * peer.mean:.2f} ± {100 * peer.std:.2f}: "
                        f"{_difference(same, peer)}",
                    )
                )
    return checks


# ---------------------------------------------------------------------- output


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


def write_outputs(
    results: Sequence[RunResult],
    meta: Mapping[str, Any],
    out_dir: Path,
    report: Path,
    *,
    plots: bool,
    notes: str = "",
) -> list[Path]:
    """Writes results.json, the PNG plots and the Markdown report.

    ``notes`` (Markdown) goes into the report as "What the numbers show".

    Returns:
        The paths of the plots written (none when matplotlib is missing).
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    rows = aggregate(results)
    payload = {
        **meta,
        "rows": [
            {**dataclasses.asdict(r), "method": r.method, "mean": r.mean, "std": r.std}
            for r in rows
        ],
        "runs": [result_to_json(r) for r in results],
    }
    (out_dir / "results.json").write_text(json.dumps(payload, indent=1) + "\n")
    pictures: list[Path] = []
    if plots:
        from .plots import write_plots

        pictures = write_plots(results, rows, out_dir)
    from .markdown import render_markdown

    report.parent.mkdir(parents=True, exist_ok=True)
    report.write_text(
        render_markdown(
            results,
            rows,
            meta,
            table=format_table(
                rows, markdown=True, evaluated_on=meta.get("evaluated_on", "test")
            ),
            comparisons=comparisons(rows),
            peer=peer_checks(rows),
            pictures=[os.path.relpath(p, report.parent) for p in pictures],
            json_path=os.path.relpath(out_dir / "results.json", report.parent),
            gap_path=os.path.relpath(GAP_NOTES, report.parent),
            notes=notes,
        )
    )
    return pictures
