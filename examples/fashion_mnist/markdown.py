"""The results page: how it was made, the table, the comparisons, the figures."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from .config import RECIPE_CHOICE, RunResult
from .models import TITLES
from .report import SE_RULE, Comparison, Row, findings


def render_markdown(
    results: Sequence[RunResult],
    rows: Sequence[Row],
    meta: Mapping[str, Any],
    *,
    table: str,
    comparisons: Sequence[Comparison],
    peer: Sequence[tuple[str, bool, str]],
    pictures: Sequence[str],
    json_path: str,
    gap_path: str,
    notes: str = "",
) -> str:
    """The Markdown results page.

    ``pictures``, ``json_path`` and ``gap_path`` (docs/results/gap.md) are links
    relative to the page; ``notes`` (Markdown) is the "What the numbers show"
    section, written by a person after the sweep.
    """
    recipes: Mapping[str, Mapping[str, Any]] = meta.get("recipes", {})
    models = list(dict.fromkeys(r.model for r in rows))
    lines = [
        "# Fashion-MNIST results",
        "",
        "Accuracy on Fashion-MNIST of "
        + " and ".join(TITLES.get(m, m) for m in models)
        + " trained dense and sparse with sparsetorch's policies (all layers "
        "sparse, biases dense), mean ± sample std over seeds. Every row of a model "
        "has the same recipe; RigL 2x/5x rows run the same recipe for 2x/5x the "
        "steps. Produced by `examples/fashion_mnist/` (`bash "
        "examples/fashion_mnist.sh`); raw numbers in "
        f"[`{json_path}`]({json_path}).",
        "",
        f"- Command: `{meta.get('command', '?')}`",
        f"- Machine: {meta.get('machine', '?')}",
        f"- sparsetorch: {meta.get('sparsetorch', 'version not recorded')}",
        f"- Wall time: {meta.get('wall_time_s', 0) / 60:.1f} min for the "
        f"{len(results) - meta.get('resumed_runs', 0)} runs this command trained, "
        f"{meta.get('jobs', 1)} at a time ({meta.get('date', '')})"
        + (
            f"; {meta['resumed_runs']} more were kept from an earlier command's "
            "journal (`--resume`)"
            if meta.get("resumed_runs")
            else ""
        )
        + "; the machine was shared with other work, so wall times are indicative",
        f"- Data: {meta.get('n_train', '?')} training examples, evaluated on "
        f"{meta.get('n_eval', '?')} {meta.get('evaluated_on', 'test')} examples",
    ]
    if meta.get("rendered_from"):
        lines.append(
            f"- This page was rendered from `{meta['rendered_from']}` by "
            "`--from-json` (no training)"
        )
    if notes:
        lines += ["", "## What the numbers show", "", notes.strip()]
    lines += [
        "",
        "## Recipes",
        "",
        "| model | epochs | batch | lr (peak) | weight decay | update interval "
        "| drop fraction | masks frozen after |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for model in models:
        recipe = recipes.get(model, {})
        lines.append(
            f"| {TITLES.get(model, model)} | {recipe.get('epochs')} | "
            f"{recipe.get('batch_size')} | {recipe.get('lr')} | "
            f"{recipe.get('weight_decay')} | {recipe.get('update_interval')} | "
            f"{recipe.get('drop_fraction')} (cosine decay) | "
            f"{recipe.get('end_fraction')} of training |"
        )
    lines += [
        "",
        "Common to both: SGD with Nesterov momentum 0.9, linear warm-up for half an "
        "epoch then cosine decay to 0, grown weights start at zero, sparse weights "
        "scaled by 1/sqrt(layer density) at the start (sparsity-aware "
        "initialisation; a layer that starts dense, as under GMP, is not scaled).",
        "",
        "How each recipe was chosen, on a validation split (the last 10000 "
        "training images, `--holdout 10000`), never on the test set:",
        "",
    ]
    lines += [
        f"- {TITLES.get(m, m)}: {RECIPE_CHOICE[m]}"
        for m in models
        if m in RECIPE_CHOICE
    ]
    lines += [
        "",
        "Methods, as sparsetorch implements them (`sparsify(..., policy=...)`): "
        "static (random mask, fixed), SET (magnitude drop, random grow), SNFS "
        "(magnitude drop, grow by momentum, redistribution across layers by mean "
        "momentum), RigL (magnitude drop, grow by dense-gradient magnitude), SNIP "
        "(one-shot mask at initialisation from |w · dL/dw| on one training batch, "
        "then fixed), GMP (starts dense, magnitude pruning along the cubic schedule "
        "to the target by the time masks freeze, no regrowth). All use the ERK "
        "allocation of the target sparsity except where a row says otherwise; "
        "`2:4` keeps 2 of every 4 consecutive input weights of every layer (50% "
        "everywhere, so its unstructured neighbour is RigL 50% uniform); `fan-in` "
        "is SRigL (Lasby et al. 2023): RigL whose masks give every output neuron "
        "of a layer the same number of active inputs, under ERK's per-layer "
        "densities, with its neuron ablation (gamma_sal 0.3: a neuron with too few "
        "salient weights is dropped and its weights go to the others).",
        "",
        "*Train FLOPs* is a run's training FLOPs relative to training the dense "
        "model for the 1x recipe, and *infer FLOPs* one forward pass relative to "
        "dense, both from `Sparsifier.flops()`, which follows the RigL paper's "
        "accounting (sparse forward and backward, the dense gradient at RigL's "
        "update steps and at every SNFS step, GMP's dense start). *Overall "
        "sparsity* is measured on the final masks over all Linear/Conv weights.",
        "",
        table,
        "",
    ]
    if comparisons:
        lines += [
            "## Comparisons",
            "",
            "Each line: the two means, their difference in points ± its standard "
            "error over seeds (Welch), and the verdict of one rule fixed before the "
            f"sweep ran: a lead is a difference beyond {SE_RULE:g} standard errors, "
            "anything smaller is within noise. With 3 seeds the standard error is "
            "itself uncertain, so a lead near the threshold is weak evidence.",
            "",
        ]
        lines += [f"- {c.line()}" for c in comparisons]
        lines += ["", "Against RigL, across models and sparsities:", ""]
        lines += [f"- {line}" for line in findings(comparisons)]
        lines.append("")
    if peer:
        lines += ["## sparsetorch against rigl-torch", ""]
        lines += [
            f"- {'✅' if holds else '❌'} {claim}: {evidence}"
            for claim, holds, evidence in peer
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
            "weights that have been active at some point (Liu et al., 2021); both "
            "come from `Sparsifier.metrics()`.",
            "",
        ]
    lines += [
        f"What was tried earlier to close RigL's gap to dense on LeNet-300-100 at "
        f"90%, with the commands: [{gap_path}]({gap_path}).",
        "",
    ]
    shown: dict[tuple[Any, ...], RunResult] = {}
    for r in results:
        if r.summary and r.spec.key not in shown:
            shown[r.spec.key] = r
    if shown:
        lines += ["## Final masks (`summary()`, first seed)", ""]
        for r in shown.values():
            s = r.spec
            lines += [
                f"<details><summary>{s.model} {s.method} {s.distribution} "
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
