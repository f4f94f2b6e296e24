"""Mask structure: N:M and constant fan-in (SRigL), for any policy.

Reference updates are computed here from the definitions (plain Python over
flat positions), independently of sparsetorch's vectorised selection.
"""

from __future__ import annotations

import io
import itertools
import math
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import (
    assert_same,
    check_invariants,
    exit_worker,
    small_sparse,
    spawn_ranks,
    train_step,
)
from expecttest import assert_expected_inline
from hypothesis import given, settings
from hypothesis import strategies as hs
from test_properties import PROFILE, same
from torch import Tensor, nn
from torch.nn import functional as F

import sparsetorch as st
from sparsetorch._checkpoint import encode_mask
from sparsetorch.condensed import CondensedLinear
from sparsetorch.execution import SparseLinear
from sparsetorch.policies import RigL
from sparsetorch.structure import (
    NM,
    ConstantFanIn,
    Layout,
    check_mask,
    initial_mask,
    make_structure,
    update_structured,
)

# -- names, objects and refusals ---------------------------------------------------


def test_names_resolve_to_structure_objects() -> None:
    assert make_structure("2:4") == NM(2, 4)
    assert make_structure("1:16") == NM(1, 16)
    assert make_structure("constant-fan-in") == ConstantFanIn()
    assert make_structure(None) is None
    structure = ConstantFanIn(ablation=0.3)
    assert make_structure(structure) is structure


def test_unknown_structure_name_is_refused() -> None:
    with pytest.raises(ValueError) as info:
        make_structure("fan-in")
    assert_expected_inline(
        str(info.value),
        """\
Unknown structure 'fan-in'.
Known structures: 'N:M' (e.g. '2:4'), 'constant-fan-in', or a Structure object (NM(2, 4), ConstantFanIn(ablation=0.3)).""",
    )
    with pytest.raises(TypeError, match="structure must be None, a name"):
        make_structure(4)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="within NM and ConstantFanIn only"):
        make_structure(st.Structure())


def test_bad_structure_values_are_refused() -> None:
    with pytest.raises(ValueError) as info:
        NM(4, 4)
    assert_expected_inline(
        str(info.value),
        """\
NM needs 1 <= n < m, got n=4, m=4.
Example: NM(2, 4), or structure="2:4".""",
    )
    with pytest.raises(ValueError, match="ablation must be in"):
        ConstantFanIn(ablation=1.5)
    with pytest.raises(TypeError, match="n must be an int"):
        NM(2.0, 4)  # type: ignore[arg-type]


def mlp(*widths: int) -> nn.Sequential:
    torch.manual_seed(0)
    layers: list[nn.Module] = []
    for n_in, n_out in itertools.pairwise(widths):
        layers += [nn.Linear(n_in, n_out), nn.Tanh()]
    return nn.Sequential(*layers[:-1])


def test_nm_refuses_a_sparsity_it_cannot_have_and_leaves_the_model() -> None:
    model = mlp(8, 8, 4)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError) as info:
        st.sparsify(model, policy="static", structure="2:4", sparsity=0.9)
    assert_expected_inline(
        str(info.value),
        """\
2:4 sparsity fixes every layer's sparsity at 1 - 2/4 = 0.5, but the requested sparsity and distribution give {'0.weight': 0.9143, '2.weight': 0.8714}.
Pass sparsity=0.5, distribution="uniform".""",
    )
    with pytest.raises(ValueError, match="fixes every layer's sparsity"):
        st.sparsify(model, policy="static", structure="2:4", sparsity=0.5)  # erk
    assert same(model.state_dict(), before)
    assert not any(hasattr(m, "parametrizations") for m in model.modules())


def test_nm_refuses_rows_that_are_not_whole_groups() -> None:
    with pytest.raises(ValueError) as info:
        st.sparsify(
            mlp(6, 8),
            policy="static",
            structure="2:4",
            sparsity=0.5,
            distribution="uniform",
        )
    assert_expected_inline(
        str(info.value),
        """\
Cannot make '0.weight' 2:4 sparse: its rows hold 6 inputs (shape (8, 6)), not a multiple of 4.
Leave it dense: exclude=['0.weight'], or use another structure.""",
    )


def test_conv_transpose_is_refused() -> None:
    model = nn.Sequential(nn.ConvTranspose2d(4, 4, 3))
    with pytest.raises(ValueError) as info:
        st.sparsify(model, policy="static", structure="constant-fan-in")
    assert_expected_inline(
        str(info.value),
        """\
Cannot give '0.weight' (shape (4, 4, 3, 3)) a structure: it is a ConvTranspose weight, whose rows are not its output units.
Leave it dense: exclude=['0.weight'], or sparsify it without structure=.""",
    )


def test_a_policy_of_ones_own_that_moves_counts_is_refused() -> None:
    class Shrinking(RigL):
        def update_counts(self, context: Any) -> dict[str, tuple[int, int]]:
            return {fqn: (2, 1) for fqn in context.masks}

    with pytest.raises(ValueError) as info:
        st.sparsify(mlp(8, 4), structure="2:4", policy=Shrinking(), end_step=5)
    assert_expected_inline(
        str(info.value),
        """\
policy Shrinking cannot keep structure=NM(n=2, m=4): it overrides update_counts, so its counts need not be the multiples of rows or groups a structure holds.
Use policy='rigl', 'set' or 'static' with a structure, or Shrinking without one.""",
    )


@pytest.mark.parametrize("structure", ["2:4", "constant-fan-in"])
def test_snip_keeps_each_groups_quota_of_highest_sensitivity(structure: str) -> None:
    model = mlp(8, 16, 4)
    sparsifier = st.sparsify(
        model,
        policy=st.SNIP(global_threshold=False),
        structure=structure,
        sparsity=0.5,
        distribution="uniform",
    )
    assert all(bool(m.all()) for m in sparsifier.masks.values())  # dense until
    weights = {f: p.detach().clone() for f, p in sparsifier.topology.params.items()}
    x = torch.randn(32, 8, generator=torch.Generator().manual_seed(0))
    w0, w1 = weights["0.weight"].requires_grad_(), weights["2.weight"].requires_grad_()
    loss = F.linear(torch.tanh(F.linear(x, w0, model[0].bias)), w1, model[2].bias)
    g0, g1 = torch.autograd.grad(loss.square().mean(), [w0, w1])
    sparsifier.prune_at_init(lambda b: model(b).square().mean(), [x])
    group = 4 if structure == "2:4" else None
    for fqn, w, g in (("0.weight", w0, g0), ("2.weight", w1, g1)):
        score = (w * g).abs().detach()
        size = group or score.shape[1]  # a 4-group, or a whole row
        quota = 2 if group else size // 2
        expected = torch.zeros(score.numel(), dtype=torch.bool)
        for start in range(0, score.numel(), size):
            part = score.flatten()[start : start + size].tolist()
            best = sorted(range(size), key=lambda i: part[i], reverse=True)[:quota]
            for i in best:
                expected[start + i] = True
        assert torch.equal(sparsifier.masks[fqn].flatten(), expected), fqn
    check_invariants(sparsifier, torch.optim.SGD(model.parameters(), lr=0.1))


def test_snip_with_its_global_threshold_is_refused() -> None:
    with pytest.raises(ValueError) as info:
        st.sparsify(mlp(8, 4), policy="snip", structure="2:4", sparsity=0.5)
    assert_expected_inline(
        str(info.value),
        """\
policy SNIP cannot keep structure=NM(n=2, m=4): its global threshold chooses each layer's count from the scores, and a structure fixes it; SNIP(global_threshold=False) keeps each group's quota.
Use policy='rigl', 'set' or 'static' with a structure, or SNIP without one.""",
    )


def test_count_changing_policies_are_refused() -> None:
    policies = st.policies.POLICIES
    for name in ("gmp", "snfs"):
        with pytest.raises(ValueError, match=f"policy {policies[name].__name__}"):
            st.sparsify(mlp(8, 4), structure="constant-fan-in", policy=name, end_step=5)


# -- initial masks and counts --------------------------------------------------------


def rows_of(mask: Tensor) -> Tensor:
    return mask.reshape(mask.shape[0], -1)


def test_initial_nm_masks_keep_n_of_every_m_inputs() -> None:
    model = nn.Sequential(nn.Linear(16, 12), nn.Tanh(), nn.Conv1d(3, 4, 4))
    sparsifier = st.sparsify(
        model,
        policy="static",
        structure="1:4",
        sparsity=0.75,
        distribution="uniform",
    )
    for fqn, mask in sparsifier.masks.items():
        groups = rows_of(mask).reshape(-1, 4).sum(1)
        assert torch.equal(groups, torch.ones_like(groups)), fqn
        assert int(mask.sum()) == sparsifier.topology.targets[fqn] == mask.numel() // 4


def test_initial_fan_in_masks_give_every_row_round_density_times_fan_in() -> None:
    model = nn.Sequential(
        nn.Conv2d(3, 8, 3), nn.Flatten(), nn.Linear(8 * 4 * 4, 10), nn.Linear(10, 5)
    )
    sparsifier = st.sparsify(
        model, policy="static", structure="constant-fan-in", sparsity=0.9
    )
    allocated = st.allocate(
        {fqn: tuple(m.shape) for fqn, m in sparsifier.masks.items()}, 0.9, "erk"
    )
    for fqn, mask in sparsifier.masks.items():
        fan_in = rows_of(mask).shape[1]
        k = max(1, round((1 - allocated[fqn]) * fan_in))
        assert torch.equal(rows_of(mask).sum(1), torch.full((mask.shape[0],), k)), fqn
        assert sparsifier.topology.targets[fqn] == mask.shape[0] * k
    assert_expected_inline(
        sparsifier.summary(),
        """\
tensor    shape         target  actual     active      numel
0.weight  (8, 3, 3, 3)  0.9284  0.9259         16        216
2.weight  (10, 128)     0.9020  0.8984        130       1280
3.weight  (5, 10)       0.7272  0.7000         15         50
total                   0.9000  0.8959        161       1546
structure: ConstantFanIn(ablation=0.0)""",
    )


def test_hf_conv1d_rows_are_its_columns() -> None:
    class Conv1D(nn.Module):  # transformers.pytorch_utils.Conv1D's layout
        def __init__(self, nf: int, nx: int) -> None:
            super().__init__()
            self.weight = nn.Parameter(torch.randn(nx, nf))  # (in, out)
            self.bias = nn.Parameter(torch.zeros(nf))

        def forward(self, x: Tensor) -> Tensor:
            return x @ self.weight + self.bias

    Conv1D.__module__ = "transformers.pytorch_utils"
    Conv1D.__qualname__ = "Conv1D"
    model = nn.Sequential(Conv1D(8, 16), Conv1D(4, 8))
    sparsifier = st.sparsify(
        model, policy="static", structure="2:4", sparsity=0.5, distribution="uniform"
    )
    mask = sparsifier.masks["0.weight"]  # (16 in, 8 out)
    per_output = mask.t().reshape(8, 4, 4).sum(2)
    assert torch.equal(per_output, torch.full((8, 4), 2))
    layout = sparsifier.topology.layouts["0.weight"]
    assert (layout.rows, layout.cols, layout.transposed) == (8, 16, True)


def test_unstructured_initial_masks_are_the_plain_random_draw() -> None:
    """structure=None draws exactly what sparsetorch drew before structures."""
    sparsifier = st.sparsify(mlp(8, 16, 4), policy="static", sparsity=0.7, seed=3)
    g = torch.Generator().manual_seed(3)
    for fqn, mask in sparsifier.masks.items():
        target = sparsifier.topology.targets[fqn]
        expected = torch.zeros(mask.numel(), dtype=torch.bool)
        expected[torch.randperm(mask.numel(), generator=g)[:target]] = True
        assert torch.equal(mask.flatten(), expected), fqn


# -- reference updates: one update, from the definitions -----------------------------


def reference_update(
    w: list[float],
    g: list[float],
    mask: list[bool],
    n_drop: int,
    groups: list[tuple[list[int], int]],
) -> list[bool]:
    """Drop the ``n_drop`` smallest ``|w|`` (tensor-wide); each group regrows to its
    quota by largest ``|g|`` among its positions not kept."""
    active = [p for p, m in enumerate(mask) if m]
    kept = set(
        sorted(active, key=lambda p: abs(w[p]), reverse=True)[: len(active) - n_drop]
    )
    new = set(kept)
    for positions, quota in groups:
        candidates = [p for p in positions if p not in kept]
        need = quota - sum(p in kept for p in positions)
        new |= set(sorted(candidates, key=lambda p: abs(g[p]), reverse=True)[:need])
    return [p in new for p in range(len(mask))]


def test_rigl_update_of_a_2_4_layer_matches_the_definition() -> None:
    torch.manual_seed(3)
    layer = nn.Linear(8, 4, bias=False)
    optimizer = torch.optim.SGD(layer.parameters(), lr=0.0)
    sparsifier = st.sparsify(
        layer,
        optimizer,
        policy="rigl",
        structure="2:4",
        sparsity=0.5,
        distribution="uniform",
        total_steps=100,
        update_interval=1,
        drop_fraction=0.5,
        drop_schedule="constant",
    )
    mask = sparsifier.masks["weight"].clone()
    w = layer.weight.detach().clone()
    x, c = torch.randn(3, 8), torch.randn(3, 4)
    optimizer.zero_grad()
    (layer(x) * c).sum().backward()
    optimizer.step()  # step 1 updates
    assert sparsifier.update_count == 1
    grad = c.t() @ x  # d/dW of sum(c * (x W^T)), the dense gradient
    groups = [(list(range(4 * i, 4 * i + 4)), 2) for i in range(8)]
    expected = reference_update(
        w.flatten().tolist(),
        grad.flatten().tolist(),
        mask.flatten().tolist(),
        8,
        groups,
    )
    new = sparsifier.masks["weight"]
    assert new.flatten().tolist() == expected
    assert not torch.equal(new, mask)  # the update changed something


def test_rigl_update_of_a_constant_fan_in_layer_matches_the_definition() -> None:
    g = torch.Generator().manual_seed(5)
    rows, cols, k = 6, 10, 3
    mask = torch.zeros(rows, cols, dtype=torch.bool)
    for r in range(rows):
        mask[r, torch.randperm(cols, generator=g)[:k]] = True
    w = torch.randn(rows, cols, generator=g) * mask
    grad = torch.randn(rows, cols, generator=g)
    layout = Layout(ConstantFanIn(), False, rows, cols, fan_in=k, ablate=False)
    n_drop = 7
    new = update_structured(RigL(), w, mask, grad, n_drop, torch.Generator(), layout)
    groups = [(list(range(cols * r, cols * r + cols)), k) for r in range(rows)]
    expected = reference_update(
        w.flatten().tolist(),
        grad.flatten().tolist(),
        mask.flatten().tolist(),
        n_drop,
        groups,
    )
    assert new.flatten().tolist() == expected
    assert not torch.equal(new, mask)


def test_ties_at_a_group_cut_are_drawn_with_the_generator_not_by_position() -> None:
    rows, cols, k = 8, 16, 4
    mask = torch.zeros(rows, cols, dtype=torch.bool)
    mask[:, :k] = True
    w = torch.arange(1.0, 1.0 + rows * cols).view(rows, cols) * mask
    grad = torch.zeros(rows, cols)  # every candidate ties
    layout = Layout(ConstantFanIn(), False, rows, cols, fan_in=k, ablate=False)

    def update(seed: int) -> Tensor:
        g = torch.Generator().manual_seed(seed)
        return update_structured(RigL(), w, mask, grad, 16, g, layout)

    first, again, other = update(0), update(0), update(1)
    assert torch.equal(first, again)  # the generator decides
    assert not torch.equal(first, other)
    for new in (first, other):
        assert check_mask(new, layout)
        kept = new & mask  # the 16 smallest |w| (rows 0-3) were dropped
        assert torch.equal(kept[4:], mask[4:])
    grown = first[:4] & ~mask[:4]
    assert not torch.equal(grown, (~mask[:4]).cumsum(1).le(4) & ~mask[:4])


def reference_ablation(
    w: Tensor, g: Tensor, mask: Tensor, n_drop: int, gamma: float, k0: int
) -> list[list[bool]]:
    """SRigL's update with neuron ablation, from the paper's definition."""
    rows, cols = w.shape
    flat = [(r, c) for r in range(rows) for c in range(cols)]
    active = [p for p in flat if mask[p]]
    kept = sorted(active, key=lambda p: abs(float(w[p])), reverse=True)
    kept = kept[: len(active) - n_drop]
    top_grad = sorted(flat, key=lambda p: abs(float(g[p])), reverse=True)[:n_drop]
    salient = set(kept) | set(top_grad)
    threshold = max(1, math.floor(gamma * k0))
    alive = [
        r
        for r in range(rows)
        if sum((r, c) in salient for c in range(cols)) >= threshold
    ]
    k = rows * k0 // len(alive)
    new = [[False] * cols for _ in range(rows)]
    for r in alive:
        mine = sorted(
            (p for p in kept if p[0] == r), key=lambda p: abs(float(w[p])), reverse=True
        )
        mine = mine[:k]
        others = [(r, c) for c in range(cols) if (r, c) not in mine]
        grown = sorted(others, key=lambda p: abs(float(g[p])), reverse=True)[
            : k - len(mine)
        ]
        for _, c in mine + grown:
            new[r][c] = True
    return new


def test_srigl_update_with_neuron_ablation_matches_the_definition() -> None:
    g = torch.Generator().manual_seed(11)
    rows, cols, k0 = 6, 12, 4
    mask = torch.zeros(rows, cols, dtype=torch.bool)
    for r in range(rows):
        mask[r, torch.randperm(cols, generator=g)[:k0]] = True
    scale = torch.ones(rows, 1)
    scale[1] = scale[4] = 1e-3  # two rows with small weights and gradients
    w = torch.randn(rows, cols, generator=g) * mask * scale
    grad = torch.randn(rows, cols, generator=g) * scale
    gamma, n_drop = 0.75, 8
    layout = Layout(ConstantFanIn(ablation=gamma), False, rows, cols, k0, ablate=True)
    new = update_structured(RigL(), w, mask, grad, n_drop, torch.Generator(), layout)
    expected = reference_ablation(w, grad, mask, n_drop, gamma, k0)
    assert new.tolist() == expected
    counts = new.sum(1).tolist()
    assert_expected_inline(str(counts), """[6, 0, 6, 6, 0, 6]""")  # 24 // 4 = 6 each
    assert check_mask(new, layout)


# -- every update keeps the structure (property) --------------------------------------


STRUCTURES = {
    "2:4": (NM(2, 4), 0.5),
    "1:4": (NM(1, 4), 0.75),
    "fan-in": (ConstantFanIn(), None),
    "fan-in+ablation": (ConstantFanIn(ablation=0.9), None),
}


def structured_model(kind: str, widths: tuple[int, ...], seed: int) -> nn.Module:
    torch.manual_seed(seed)
    layers: list[nn.Module] = []
    pairs = list(itertools.pairwise(widths))
    if kind == "mlp":
        for n_in, n_out in pairs:
            layers += [nn.Linear(n_in, n_out), nn.Tanh()]
        return nn.Sequential(*layers)
    for c_in, c_out in pairs:
        layers += [nn.Conv2d(c_in, c_out, 3, padding=1), nn.Tanh()]
    return nn.Sequential(*layers, nn.Flatten(), nn.Linear(widths[-1] * 9, 4))


@settings(PROFILE, max_examples=100)
@given(
    kind=hs.sampled_from(["mlp", "cnn"]),
    depth=hs.integers(1, 3),
    units=hs.lists(hs.integers(1, 4), min_size=4, max_size=4),
    structure=hs.sampled_from(sorted(STRUCTURES)),
    sparsity=hs.floats(0.0, 0.98),
    distribution=hs.sampled_from(["uniform", "erk"]),
    policy=hs.sampled_from(["rigl", "set", "static"]),
    optimizer=hs.sampled_from(["sgd", "adamw"]),
    drop_fraction=hs.floats(0.05, 1.0),
    update_interval=hs.integers(1, 3),
    save_at=hs.integers(1, 6),
    seed=hs.integers(0, 2**16),
    load_order=hs.permutations(["model", "optimizer", "sparsity"]),
)
def test_every_update_keeps_the_structure_counts_and_zeros_and_resumes_exactly(
    kind: str,
    depth: int,
    units: list[int],
    structure: str,
    sparsity: float,
    distribution: str,
    policy: str,
    optimizer: str,
    drop_fraction: float,
    update_interval: int,
    save_at: int,
    seed: int,
    load_order: list[str],
) -> None:
    chosen, fixed = STRUCTURES[structure]
    widths = tuple(4 * u for u in units[: depth + 1])  # whole 4-groups per row
    if fixed is not None:
        sparsity, distribution = fixed, "uniform"
    total = 8

    def build(run_seed: int) -> tuple[nn.Module, torch.optim.Optimizer, st.Sparsifier]:
        model = structured_model(kind, widths, run_seed)
        opt: torch.optim.Optimizer = (
            torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
            if optimizer == "sgd"
            else torch.optim.AdamW(model.parameters(), lr=1e-2)
        )
        sparsifier = st.sparsify(
            model,
            opt,
            policy=policy,
            structure=chosen,
            sparsity=sparsity,
            distribution=distribution,
            total_steps=100,
            update_interval=update_interval,
            drop_fraction=drop_fraction,
            seed=run_seed,
        )
        return model, opt, sparsifier

    def batch(step: int) -> Tensor:
        g = torch.Generator().manual_seed(1000 * seed + step)
        shape = (4, widths[0]) if kind == "mlp" else (2, widths[0], 3, 3)
        return torch.randn(shape, generator=g)

    def train(
        model: nn.Module,
        opt: torch.optim.Optimizer,
        sparsifier: st.Sparsifier,
        steps: range,
    ) -> None:
        for k in steps:
            before = {fqn: m.clone() for fqn, m in sparsifier.masks.items()}
            opt.zero_grad()
            model(batch(k)).square().mean().backward()
            opt.step()
            check_invariants(sparsifier, opt, model=model)
            scheduled = policy != "static" and sparsifier.schedule.is_update_step(k)
            for fqn, layout in sparsifier.topology.layouts.items():
                mask = sparsifier.masks[fqn]
                assert check_mask(mask, layout), (k, fqn)
                grown = int((mask & ~before[fqn]).sum())
                dropped = int((before[fqn] & ~mask).sum())
                assert grown == dropped or layout.ablate, (k, fqn)
                assert scheduled or grown == dropped == 0, (k, fqn)

    model, opt, sparsifier = build(seed)
    assert len(sparsifier.topology.layouts) == len(sparsifier.masks)
    train(model, opt, sparsifier, range(1, save_at + 1))
    buffer = io.BytesIO()
    torch.save(
        {
            "model": model.state_dict(),
            "optimizer": opt.state_dict(),
            "sparsity": sparsifier.state_dict(),
        },
        buffer,
    )
    train(model, opt, sparsifier, range(save_at + 1, total + 1))
    buffer.seek(0)
    saved = torch.load(buffer, weights_only=True)
    resumed, resumed_opt, resumed_sparsifier = build(seed + 1)
    loaders = {
        "model": resumed.load_state_dict,
        "optimizer": resumed_opt.load_state_dict,
        "sparsity": resumed_sparsifier.load_state_dict,
    }
    for name in load_order:  # any order before the next step
        loaders[name](saved[name])
    train(resumed, resumed_opt, resumed_sparsifier, range(save_at + 1, total + 1))
    assert same(resumed.state_dict(), model.state_dict())
    assert same(resumed_opt.state_dict(), opt.state_dict())
    assert same(resumed_sparsifier.state_dict(), sparsifier.state_dict())


# -- checkpoints ------------------------------------------------------------------------


def test_a_checkpoint_of_another_structure_is_refused() -> None:
    def make(structure: str | None) -> st.Sparsifier:
        return st.sparsify(
            mlp(8, 8, 4),
            policy="static",
            structure=structure,
            sparsity=0.5,
            distribution="uniform",
        )

    state = make("2:4").state_dict()
    with pytest.raises(ValueError) as info:
        make(None).load_state_dict(state)
    assert_expected_inline(
        str(info.value),
        """\
The checkpoint was made with other settings:
structure: checkpoint {'name': 'NM', 'n': 2, 'm': 4}, this sparsifier None
Build the sparsifier with the checkpoint's settings.""",
    )
    with pytest.raises(ValueError, match="structure: checkpoint None"):
        make("2:4").load_state_dict(make(None).state_dict())


def test_a_checkpoint_mask_that_breaks_the_structure_is_refused() -> None:
    sparsifier = st.sparsify(
        mlp(8, 8, 4),
        policy="static",
        structure="2:4",
        sparsity=0.5,
        distribution="uniform",
    )
    state = sparsifier.state_dict()
    bad = torch.zeros(8, 8, dtype=torch.bool)
    bad[:, :4] = True  # 4 of the first group, 0 of the second: 32 active all the same
    state["masks"]["0.weight"] = encode_mask(bad)
    before = sparsifier.masks["0.weight"].clone()
    with pytest.raises(ValueError) as info:
        sparsifier.load_state_dict(state)
    assert_expected_inline(
        str(info.value),
        """\
Mask '0.weight' in the checkpoint does not meet the structure NM(n=2, m=4) (see sparsetorch.structure.check_mask).
The checkpoint was made with another structure, or the mask was edited.""",
    )
    assert torch.equal(sparsifier.masks["0.weight"], before)


def test_a_checkpoint_with_ablated_units_restores_their_counts() -> None:
    model, sparsifier = trained_fan_in_model(ablation=0.9)
    targets = sparsifier.topology.targets
    layouts = sparsifier.topology.layouts
    assert targets["2.weight"] < layouts["2.weight"].count  # 14 of 24 units, 8 each
    fresh_model = mlp(32, 48, 24, 10)
    fresh = st.sparsify(
        fresh_model,
        structure=ConstantFanIn(ablation=0.9),
        sparsity=0.9,
        total_steps=40,
        update_interval=4,
    )
    fresh_model.load_state_dict(model.state_dict())
    fresh.load_state_dict(sparsifier.state_dict())
    assert fresh.topology.targets == targets
    assert same(fresh.masks, sparsifier.masks)
    assert same(fresh.state_dict(), sparsifier.state_dict())
    notes = [
        line
        for line in fresh.summary().splitlines()
        if line.startswith(("structure", "ablated"))
    ]
    assert_expected_inline(
        "\n".join(notes),
        """\
structure: ConstantFanIn(ablation=0.9)
ablated: 0.weight 12 of 48 units (4 of 32 inputs each)
ablated: 2.weight 10 of 24 units (8 of 48 inputs each)""",
    )


# -- remove, export and the condensed layout --------------------------------------------


def trained_fan_in_model(ablation: float = 0.0) -> tuple[nn.Module, st.Sparsifier]:
    model = mlp(32, 48, 24, 10)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    sparsifier = st.sparsify(
        model,
        optimizer,
        structure=ConstantFanIn(ablation=ablation),
        sparsity=0.9,
        total_steps=40,
        update_interval=4,
    )
    g = torch.Generator().manual_seed(0)
    for _ in range(12):
        optimizer.zero_grad()
        model(torch.randn(8, 32, generator=g)).square().mean().backward()
        optimizer.step()
    assert sparsifier.update_count == 3
    return model, sparsifier


def test_remove_keeps_the_structure() -> None:
    model, sparsifier = trained_fan_in_model()
    masks = {fqn: m.clone() for fqn, m in sparsifier.masks.items()}
    layouts = sparsifier.topology.layouts
    csr = st.export_sparse(model, execution="sparse")  # nonzeros only: within
    for fqn, mask in masks.items():
        layer = csr.get_submodule(fqn.removesuffix(".weight"))
        assert isinstance(layer, SparseLinear)
        pattern = layer.weight.to_dense() != 0
        assert not bool((pattern & ~mask).any()), fqn
    sparsifier.remove()
    for fqn, mask in masks.items():
        weight = model.get_parameter(fqn)
        assert check_mask(mask, layouts[fqn])
        assert int(weight[~mask].count_nonzero()) == 0, fqn


@pytest.mark.parametrize("ablation", [0.0, 0.9])
def test_condensed_export_computes_what_mask_mode_computes(ablation: float) -> None:
    model, sparsifier = trained_fan_in_model(ablation)
    exported = sparsifier.export(execution="condensed")
    layers = [m for m in exported.modules() if isinstance(m, CondensedLinear)]
    assert len(layers) == 3
    ablated = int((sparsifier.masks["0.weight"].sum(1) == 0).sum())
    assert (ablated > 0) == (ablation > 0)  # rows ablated: padded, still exact
    for fqn, layer in zip(sparsifier.masks, layers, strict=True):
        mask = sparsifier.masks[fqn]
        assert layer.fan_in == int(mask.sum(1).max())
        assert torch.equal(layer.dense_weight(), model.get_submodule(fqn[:-7]).weight)
    for x in (torch.randn(300, 32), torch.randn(32), torch.randn(2, 1, 32)):
        x.requires_grad_(True)  # gradients reach the input, as through the model
        expected = model(x)
        (grad,) = torch.autograd.grad(expected.sum(), x)
        got = exported(x)
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(
            torch.autograd.grad(got.sum(), x)[0], grad, rtol=1e-5, atol=1e-6
        )


def test_condensed_layer_keeps_masked_weights_that_are_zero() -> None:
    w = torch.tensor([[0.0, 2.0, 0.0, 1.0], [3.0, 0.0, 0.0, 4.0]])
    mask = torch.tensor([[True, True, False, True], [True, False, True, True]])
    layer = CondensedLinear(w, None, mask)
    assert_expected_inline(str(layer.indices.tolist()), """[[0, 1, 3], [0, 2, 3]]""")
    assert_expected_inline(
        str(layer.values.tolist()), """[[0.0, 2.0, 1.0], [3.0, 0.0, 4.0]]"""
    )
    x = torch.randn(2, 5, 4)
    torch.testing.assert_close(layer(x), F.linear(x, w))


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_structured_updates_on_cuda_equal_the_cpu_ones() -> None:
    g = torch.Generator().manual_seed(2)
    rows, cols = 64, 96
    for structure, fan_in in ((NM(2, 4), 48), (ConstantFanIn(), 12)):
        for ablate in (False, True) if fan_in == 12 else (False,):
            if ablate:
                structure = ConstantFanIn(ablation=0.75)
            layout = Layout(structure, False, rows, cols, fan_in, ablate=ablate)
            mask = initial_mask(layout, torch.Size((rows, cols)), g)
            w = torch.randn(rows, cols, generator=g) * mask
            grad = torch.randn(rows, cols, generator=g)
            cpu = update_structured(
                RigL(), w, mask, grad, 300, torch.Generator(), layout
            )
            cuda = update_structured(
                RigL(),
                w.cuda(),
                mask.cuda(),
                grad.cuda(),
                300,
                torch.Generator(),
                layout,
            )
            assert cuda.device.type == "cuda"
            assert torch.equal(cuda.cpu(), cpu), (structure, ablate)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_2_4_masks_export_to_semi_structured_sparse_tensors() -> None:
    from torch.sparse import to_sparse_semi_structured

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(128, 128), nn.ReLU(), nn.Linear(128, 64))
    model = model.half().cuda()
    sparsifier = st.sparsify(
        model, policy="static", structure="2:4", sparsity=0.5, distribution="uniform"
    )
    sparsifier.remove()
    x = torch.randn(64, 128, dtype=torch.half, device="cuda")
    expected = model(x)
    for layer in (model[0], model[2]):
        layer.weight = nn.Parameter(to_sparse_semi_structured(layer.weight.detach()))
    torch.testing.assert_close(model(x), expected, rtol=1e-2, atol=1e-2)


def test_condensed_benchmark_runs_quick() -> None:
    """``benchmarks/condensed.py --quick`` prints its table (no timing asserted)."""
    script = Path(__file__).resolve().parents[1] / "benchmarks" / "condensed.py"
    done = subprocess.run(
        [sys.executable, str(script), "--quick"],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    rows = [line for line in done.stdout.splitlines() if line.startswith("| 64 x 64")]
    assert len(rows) == 2


def test_framework_callbacks_pass_the_structure_to_sparsify() -> None:
    """The Lightning and Transformers callbacks share ``SparsifyArguments``."""
    from sparsetorch.integrations._common import SparsifyArguments

    arguments = SparsifyArguments()
    for name, value in {
        "policy": "rigl",
        "sparsity": 0.5,
        "distribution": "uniform",
        "total_steps": 100,
        "update_interval": 10,
        "drop_fraction": 0.3,
        "drop_schedule": "cosine",
        "begin_step": 0,
        "end_step": None,
        "include": None,
        "exclude": None,
        "grow_init": "zeros",
        "seed": 0,
        "execution": "mask",
        "structure": "2:4",
    }.items():
        setattr(arguments, name, value)
    sparsifier = arguments._sparsify_model(mlp(8, 8, 4))
    assert sparsifier.topology.structure == NM(2, 4)


# -- DDP: every rank holds the same structured masks ----------------------------------

DDP_STRUCTURES: dict[str, tuple[Any, float]] = {
    "2:4": (NM(2, 4), 0.5),
    "srigl": (ConstantFanIn(ablation=0.7), 0.75),
}


def _global_batch(step: int) -> tuple[Tensor, Tensor]:
    g = torch.Generator().manual_seed(100 + step)
    return torch.randn(32, 12, generator=g), torch.randint(0, 6, (32,), generator=g)


def _structured_run(name: str, rank: int | None) -> dict[str, Any]:
    """RigL on ``small_mlp`` for 6 steps (updates at 2, 4, 6): one process on
    the global batch (``rank=None``), or one rank of 2 under DDP on its half."""
    from torch.nn.parallel import DistributedDataParallel as DDP

    structure, sparsity = DDP_STRUCTURES[name]
    model, optimizer, sparsifier = small_sparse(
        lambda m: torch.optim.SGD(m.parameters(), lr=0.1, momentum=0.9),
        structure=structure,
        sparsity=sparsity,
    )
    net: nn.Module = model if rank is None else DDP(model)
    masks = []
    for step in range(1, 7):
        x, y = _global_batch(step)
        if rank is not None:
            x, y = x[16 * rank : 16 * (rank + 1)], y[16 * rank : 16 * (rank + 1)]
        train_step(net, optimizer, x, y)
        masks.append({f: m.clone() for f, m in sparsifier.masks.items()})
    return {
        "masks": masks,
        "weights": {k: v.detach().clone() for k, v in model.state_dict().items()},
        "updates": sparsifier.update_count,
    }


def _ddp_worker(rank: int, out: str) -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo")
    try:
        results = {name: _structured_run(name, rank) for name in DDP_STRUCTURES}
    finally:
        dist.destroy_process_group()
    torch.save(results, os.path.join(out, f"rank{rank}.pt"))
    exit_worker()


def test_ddp_ranks_hold_identical_structured_masks_equal_to_one_process(
    tmp_path: Path,
) -> None:
    r0, r1 = spawn_ranks(_ddp_worker, tmp_path)
    for name in DDP_STRUCTURES:
        single = _structured_run(name, None)
        assert r0[name]["updates"] == r1[name]["updates"] == single["updates"] == 3
        assert_same(r0[name]["masks"], r1[name]["masks"], name)
        assert_same(r0[name]["masks"], single["masks"], name)
        assert_same(r0[name]["weights"], r1[name]["weights"], name)
        for key, value in r0[name]["weights"].items():
            torch.testing.assert_close(value, single["weights"][key], rtol=0, atol=1e-5)
    ablated = int((r0["srigl"]["masks"][-1]["0.weight"].sum(1) == 0).sum())
    assert ablated > 0  # the SRigL run did ablate units
