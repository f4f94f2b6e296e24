"""SNFS, GMP and SNIP: each checked against its paper's definition, in plain torch.

Every reference below recomputes an update from the definition (magnitudes,
gradients and momenta taken with plain tensors and autograd on an un-sparsified
copy), never with sparsetorch's helpers, and compares the masks exactly. Then
the invariants every policy keeps: exact counts at every step, zeros outside
the masks in weights and optimizer state, exact resume in every load order,
identical ranks under DDP.
"""

from __future__ import annotations

import io
import itertools
import math
from fractions import Fraction
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from conftest import check_invariants, cnn, exit_worker, mlp, spawn_ranks
from expecttest import assert_expected_inline
from torch import Tensor, nn

import sparsetorch as st
from sparsetorch.policies import GMP, SNFS, SNIP

# -- helpers ---------------------------------------------------------------------


def batches(n: int, size: int = 8, seed: int = 5) -> list[tuple[Tensor, Tensor]]:
    """``n`` fixed batches for ``mlp()`` (20 features, 4 classes)."""
    g = torch.Generator().manual_seed(seed)
    return [
        (torch.randn(size, 20, generator=g), torch.randint(0, 4, (size,), generator=g))
        for _ in range(n)
    ]


def step(model: nn.Module, optimizer: torch.optim.Optimizer, x: Tensor, y: Tensor):
    optimizer.zero_grad()
    F.cross_entropy(model(x), y).backward()
    optimizer.step()


def plain_loss(
    weights: list[Tensor], biases: list[Tensor], x: Tensor, y: Tensor
) -> Tensor:
    """``mlp()``'s loss as a function of its weight tensors (ReLU between)."""
    h = x
    for i, (w, b) in enumerate(zip(weights, biases, strict=True)):
        h = F.linear(h, w, b)
        if i < len(weights) - 1:
            h = torch.relu(h)
    return F.cross_entropy(h, y)


def dense_grads(
    weights: list[Tensor], biases: list[Tensor], x: Tensor, y: Tensor
) -> list[Tensor]:
    """The gradient of the loss with respect to each (effective) weight."""
    leaves = [w.detach().clone().requires_grad_(True) for w in weights]
    loss = plain_loss(leaves, [b.detach() for b in biases], x, y)
    return list(torch.autograd.grad(loss, leaves))


def top(scores: Tensor, k: int, among: Tensor) -> Tensor:
    """A flat bool mask of the ``k`` highest ``scores`` at the positions ``among``."""
    flat = scores.flatten().double().clone()
    flat[~among.flatten()] = -math.inf
    chosen = torch.zeros(flat.numel(), dtype=torch.bool)
    chosen[torch.sort(flat, descending=True, stable=True).indices[:k]] = True
    return chosen & among.flatten()


def assert_top(chosen: Tensor, scores: Tensor, k: int, among: Tensor) -> None:
    """``chosen`` is ``k`` of the highest ``scores`` at ``among``, ties at the
    cut (dead ReLU units give many zero gradients) drawn at random."""
    chosen, scores, among = chosen.flatten(), scores.flatten(), among.flatten()
    assert int((chosen & ~among).sum()) == 0 and int(chosen.sum()) == k
    if k == 0:
        return
    cut = scores[among].sort(descending=True).values[k - 1]
    assert bool(chosen[among & (scores > cut)].all())
    assert bool((scores[chosen] >= cut).all())


LINEARS = ["0.weight", "2.weight", "4.weight"]


def mlp_params(model: nn.Module) -> tuple[list[Tensor], list[Tensor]]:
    modules = [model.get_submodule(f.split(".")[0]) for f in LINEARS]
    return (
        [m.weight.detach().clone() for m in modules],
        [m.bias.detach().clone() for m in modules],
    )


# -- the update rule with n_grow ---------------------------------------------------


@pytest.mark.parametrize("n_drop,n_grow", [(3, 0), (3, 7), (5, 2), (0, 4)])
def test_update_mask_drops_n_drop_and_grows_n_grow(n_drop: int, n_grow: int) -> None:
    g = torch.Generator().manual_seed(0)
    mask = torch.rand(40, generator=g) < 0.5
    weight = torch.randn(40, generator=g) * mask
    grad = torch.randn(40, generator=g)
    new = st.policies.update_mask(
        st.RigL(), weight, mask, grad, n_drop, torch.Generator(), n_grow=n_grow
    )
    kept = top(weight.abs(), int(mask.sum()) - n_drop, mask)
    grown = top(grad.abs(), n_grow, ~kept)
    assert torch.equal(new, kept | grown)
    assert int(new.sum()) == int(mask.sum()) - n_drop + n_grow


def test_gmp_prunes_alone_with_update_mask() -> None:
    weight = torch.tensor([0.5, -0.1, 0.0, 0.0, 2.0, 0.3])
    mask = torch.tensor([True, True, False, False, True, True])
    new = st.policies.update_mask(
        GMP(), weight, mask, None, 2, torch.Generator(), n_grow=0
    )
    assert new.tolist() == [True, False, False, False, True, False]


# -- GMP --------------------------------------------------------------------------


def test_gmp_prunes_the_smallest_magnitudes_along_the_cubic() -> None:
    """Zhu & Gupta 2017, eq. (1): s_t = s_f + (s_i - s_f)(1 - (t - t0)/(n dt))^3."""
    layer = nn.Linear(12, 10)
    w0 = layer.weight.detach().clone()
    optimizer = torch.optim.SGD(layer.parameters(), lr=0.0)  # the weights stay
    sparsifier = st.sparsify(
        layer,
        optimizer,
        policy="gmp",
        sparsity=0.8,
        distribution="uniform",
        update_interval=2,
        end_step=9,  # pruning steps 2, 4, 6, 8: t0 = 0, t_n = 8
    )
    expected = torch.ones(120, dtype=torch.bool)  # dense at the start
    assert torch.equal(sparsifier.masks["weight"].flatten(), expected)
    for k in range(1, 11):
        optimizer.zero_grad()
        layer(torch.randn(3, 12)).sum().backward()
        optimizer.step()
        if k in (2, 4, 6, 8):
            s = 0.8 + (0.0 - 0.8) * (1 - k / 8) ** 3
            expected = top(w0.abs(), round((1 - s) * 120), expected.view(10, 12))
        assert torch.equal(sparsifier.masks["weight"].flatten(), expected), k
    assert int(expected.sum()) == 24  # exactly 80% at the last pruning step


def test_gmp_counts_are_exact_at_every_step_of_the_schedule() -> None:
    torch.manual_seed(0)
    model = cnn()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    sparsifier = st.sparsify(
        model,
        optimizer,
        policy=GMP(initial_sparsity=0.3),
        sparsity=0.9,
        distribution="erk",
        update_interval=3,
        begin_step=2,
        end_step=20,  # pruning steps 3, 6, ..., 18: t0 = 2, t_n = 18
    )
    final = sparsifier.topology.sparsities
    numel = {fqn: m.numel() for fqn, m in sparsifier.masks.items()}

    def expected(k: int) -> dict[str, int]:
        t = min(k - k % 3, 18)
        progress = 0.0 if k < 3 else (t - 2) / (18 - 2)
        counts = {}
        for fqn, s_f in final.items():
            s_i = min(0.3, s_f)
            s = s_f + (s_i - s_f) * (1 - progress) ** 3
            counts[fqn] = max(1, round((1 - s) * numel[fqn]))
        return counts

    assert sparsifier.topology.targets == expected(0)
    x, y = torch.randn(4, 3, 8, 8), torch.randint(0, 4, (4,))
    seen = []
    for k in range(1, 25):
        step(model, optimizer, x, y)
        assert sparsifier.topology.targets == expected(k), k
        assert sparsifier.targets_at(k) == expected(k), k
        check_invariants(sparsifier, optimizer, model=model, grads=True)
        seen.append(sum(expected(k).values()))
    assert seen == sorted(seen, reverse=True) and len(set(seen)) == 7
    assert sparsifier.topology.targets == sparsifier.topology.final_targets


def test_gmp_schedule_table() -> None:
    model = nn.Sequential(nn.Linear(10, 10))
    sparsifier = st.sparsify(
        model,
        policy="gmp",
        sparsity=0.9,
        distribution="uniform",
        update_interval=10,
        end_step=51,
    )
    rows = [
        f"{k:>3}  {sparsifier.targets_at(k)['0.weight']:>3}" for k in range(0, 61, 10)
    ]
    assert_expected_inline(
        "\n".join(rows),
        """\
  0  100
 10   56
 20   29
 30   16
 40   11
 50   10
 60   10""",
    )


def test_gmp_never_grows() -> None:
    torch.manual_seed(0)
    model = mlp()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    sparsifier = st.sparsify(
        model, optimizer, policy="gmp", sparsity=0.8, update_interval=1, end_step=8
    )
    for x, y in batches(10):
        before = {f: m.clone() for f, m in sparsifier.masks.items()}
        step(model, optimizer, x, y)
        for fqn, mask in sparsifier.masks.items():
            assert not bool((mask & ~before[fqn]).any()), fqn


def test_gmp_rejects_a_bad_initial_sparsity() -> None:
    with pytest.raises(ValueError) as error:
        GMP(initial_sparsity=1.0)
    assert_expected_inline(
        str(error.value),
        """\
initial_sparsity must be in [0, 1), got 1.0.
It is the sparsity GMP starts from: 0.0 starts dense.""",
    )


# -- SNFS -------------------------------------------------------------------------


def reference_regrowth(
    removed: int, means: dict[str, float], free: dict[str, int]
) -> dict[str, int]:
    """Dettmers & Zettlemoyer 2019, Algorithm 1: regrowth in proportion to the
    mean momentum magnitude, capped at the free positions, rounded exactly."""
    grow = dict.fromkeys(means, 0)
    left = Fraction(removed)
    open_ = [f for f in means if free[f] > 0]
    while True:
        total = sum(Fraction(means[f]) for f in open_)
        share = {f: left * Fraction(means[f]) / total for f in open_}
        over = [f for f in open_ if share[f] >= free[f]]
        if not over:
            break
        for f in over:
            grow[f] = free[f]
            left -= free[f]
        open_ = [f for f in open_ if f not in over]
    for f in open_:
        grow[f] = math.floor(share[f])
    extra = removed - sum(grow.values())
    by_remainder = sorted(open_, key=lambda f: (-(share[f] - grow[f]), open_.index(f)))
    for f in by_remainder[:extra]:
        grow[f] += 1
    return grow


def snfs_reference_test(sparsity: float, seed: int) -> dict[str, int]:
    """One SNFS update at step 3 against the paper; returns the new counts."""
    torch.manual_seed(seed)
    model = mlp()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.0)  # the weights stay
    sparsifier = st.sparsify(
        model,
        optimizer,
        policy=SNFS(momentum=0.8),
        sparsity=sparsity,
        distribution="uniform",
        update_interval=3,
        end_step=10,
        drop_fraction=0.5,
        drop_schedule="constant",
        seed=seed,
    )
    masks = [sparsifier.masks[f].clone() for f in LINEARS]
    weights, biases = mlp_params(model)  # zero outside the masks
    momentum = [torch.zeros_like(w) for w in weights]
    data = batches(3, seed=seed)
    for x, y in data:  # M_t = 0.8 M_{t-1} + 0.2 g_t, from the dense gradients
        for m, g in zip(momentum, dense_grads(weights, biases, x, y), strict=True):
            m.mul_(0.8).add_(g, alpha=0.2)
    for x, y in data:
        step(model, optimizer, x, y)
    assert sparsifier.update_count == 1

    active = {f: int(m.sum()) for f, m in zip(LINEARS, masks, strict=True)}
    drop = {f: int(n * 0.5) for f, n in active.items()}
    means = {
        f: float(m.abs()[mask].double().mean())
        for f, m, mask in zip(LINEARS, momentum, masks, strict=True)
    }
    free = {f: masks[i].numel() - active[f] + drop[f] for i, f in enumerate(LINEARS)}
    grow = reference_regrowth(sum(drop.values()), means, free)
    for i, fqn in enumerate(LINEARS):
        new = sparsifier.masks[fqn].flatten()
        kept = top(weights[i].abs(), active[fqn] - drop[fqn], masks[i])
        assert torch.equal(new & kept, kept), fqn  # the largest |w| stay
        assert_top(new & ~kept, momentum[i].abs(), grow[fqn], ~kept)
    assert sum(sparsifier.topology.targets.values()) == sum(active.values())
    return sparsifier.topology.targets


def test_snfs_update_matches_the_paper() -> None:
    counts = snfs_reference_test(sparsity=0.9, seed=0)
    assert counts != {"0.weight": 64, "2.weight": 51, "4.weight": 6}  # they moved


def test_snfs_update_matches_the_paper_when_a_layer_fills_up() -> None:
    # At 50% the output layer (64 weights) gets more than its free positions.
    counts = snfs_reference_test(sparsity=0.5, seed=1)
    assert counts["4.weight"] == 64


def test_snfs_keeps_the_total_while_per_layer_counts_move() -> None:
    torch.manual_seed(0)
    model = mlp()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    sparsifier = st.sparsify(
        model,
        optimizer,
        policy="snfs",
        sparsity=0.8,
        update_interval=2,
        end_step=30,
        drop_fraction=0.5,
    )
    start = sparsifier.topology.targets
    total = sum(start.values())
    history = []
    for k, (x, y) in enumerate(batches(30), start=1):
        step(model, optimizer, x, y)
        counts = sparsifier.topology.targets
        assert sum(counts.values()) == total, k
        assert sparsifier.targets_at(k) == counts
        check_invariants(sparsifier, optimizer, model=model, grads=True)
        history.append(counts)
    assert sparsifier.update_count == 14
    moved = {fqn for counts in history for fqn in counts if counts[fqn] != start[fqn]}
    assert moved == set(LINEARS)


def test_snfs_captures_the_dense_gradient_at_every_step_until_the_last_update() -> None:
    torch.manual_seed(0)
    model = mlp()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    sparsifier = st.sparsify(
        model, optimizer, policy="snfs", sparsity=0.8, update_interval=3, end_step=7
    )
    beta = 0.9
    expected = None
    for k, (x, y) in enumerate(batches(9), start=1):
        capturing = [p.capturing for p in sparsifier.topology.parametrizations.values()]
        assert capturing == [k <= 6] * 3, k  # the last update is at step 6
        weights, biases = mlp_params(model)
        grad = dense_grads(weights, biases, x, y)[0]
        if k <= 6:  # M_t = beta M_{t-1} + (1 - beta) g_t, M_0 = 0
            previous = torch.zeros_like(grad) if expected is None else expected
            expected = beta * previous + (1 - beta) * grad
        step(model, optimizer, x, y)
        assert expected is not None
        assert torch.allclose(sparsifier.signals["0.weight"], expected, atol=1e-7), k


class WithUnusedBranch(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.inp = nn.Linear(20, 16)
        self.out = nn.Linear(16, 4)
        self.unused = nn.Linear(16, 4)  # never in the forward: no gradient

    def forward(self, x: Tensor) -> Tensor:
        return self.out(torch.tanh(self.inp(x)))


def test_snfs_a_tensor_without_gradient_sits_out_and_the_others_keep_their_total() -> (
    None
):
    torch.manual_seed(0)
    model = WithUnusedBranch()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    sparsifier = st.sparsify(
        model,
        optimizer,
        policy="snfs",
        sparsity=0.7,
        distribution="uniform",
        update_interval=2,
        end_step=9,
        drop_fraction=0.5,
    )
    unused = sparsifier.masks["unused.weight"].clone()
    used = ["inp.weight", "out.weight"]
    total = sum(sparsifier.topology.targets[f] for f in used)
    for x, y in batches(8):
        step(model, optimizer, x, y)
        assert sum(sparsifier.topology.targets[f] for f in used) == total
        check_invariants(sparsifier, optimizer, model=model)
    assert sparsifier.update_count == 4
    assert torch.equal(sparsifier.masks["unused.weight"], unused)
    assert sparsifier.missed_updates == {"unused.weight": 4}
    assert sorted(sparsifier.signals) == used


def test_redistribute_caps_full_tensors_and_hands_out_leftovers_deterministically() -> (
    None
):
    from sparsetorch.policies.snfs import redistribute

    # Shares 10 * (1, 1, 1) / 3: one each by remainder, in order.
    assert redistribute(10, {"a": 1.0, "b": 1.0, "c": 1.0}, dict(a=9, b=9, c=9)) == {
        "a": 4,
        "b": 3,
        "c": 3,
    }
    # "b" is full at 1; the rest shares 9 as 1 : 2.
    assert redistribute(10, {"a": 1.0, "b": 5.0, "c": 2.0}, dict(a=9, b=1, c=9)) == {
        "a": 3,
        "b": 1,
        "c": 6,
    }
    # No momentum anywhere: each tensor regrows in proportion to its fallback.
    assert redistribute(
        6, {"a": 0.0, "b": 0.0}, dict(a=9, b=9), fallback={"a": 2, "b": 4}
    ) == {"a": 2, "b": 4}
    # Everything full but one.
    assert redistribute(7, {"a": 1.0, "b": 1e-9}, dict(a=3, b=4)) == {"a": 3, "b": 4}


def test_snfs_rejects_a_bad_momentum() -> None:
    with pytest.raises(ValueError) as error:
        SNFS(momentum=1.0)
    assert_expected_inline(
        str(error.value),
        """\
momentum must be in [0, 1), got 1.0.
It is the decay of the moving average of the dense gradient (the paper uses 0.9).""",
    )


# -- SNIP -------------------------------------------------------------------------


def snip_reference(
    model: nn.Module, data: list[tuple[Tensor, Tensor]], keep: dict[str, int] | int
) -> dict[str, Tensor]:
    """Lee et al. 2019, eq. (3)-(4): |w * dL/dw| summed over the batches."""
    weights, biases = mlp_params(model)
    grads = [torch.zeros_like(w) for w in weights]
    for x, y in data:
        for g, d in zip(grads, dense_grads(weights, biases, x, y), strict=True):
            g.add_(d)
    scores = [(w * g).abs() for w, g in zip(weights, grads, strict=True)]
    if isinstance(keep, int):  # one threshold over all layers
        flat = torch.cat([s.flatten() for s in scores])
        chosen = top(flat, keep, torch.ones_like(flat, dtype=torch.bool))
        parts = chosen.split([s.numel() for s in scores])
        return {f: p.view_as(s) for f, p, s in zip(LINEARS, parts, scores, strict=True)}
    return {
        f: top(s, keep[f], torch.ones_like(s, dtype=torch.bool)).view_as(s)
        for f, s in zip(LINEARS, scores, strict=True)
    }


def test_snip_keeps_the_highest_connection_sensitivities_over_all_layers() -> None:
    torch.manual_seed(0)
    model = mlp()
    data = batches(2)
    sparsifier = st.sparsify(model, policy="snip", sparsity=0.9, distribution="uniform")
    expected = snip_reference(model, data, keep=64 + 51 + 6)  # round(0.1 * numel)
    sparsifier.prune_at_init(lambda b: F.cross_entropy(model(b[0]), b[1]), data)
    for fqn in LINEARS:
        assert torch.equal(sparsifier.masks[fqn], expected[fqn]), fqn
    counts = sparsifier.topology.targets
    assert sum(counts.values()) == 121
    assert counts != {"0.weight": 64, "2.weight": 51, "4.weight": 6}


def test_snip_with_per_tensor_counts_from_the_distribution() -> None:
    torch.manual_seed(0)
    model = mlp()
    data = batches(3)
    sparsifier = st.sparsify(
        model,
        policy=SNIP(global_threshold=False),
        sparsity=0.9,
        distribution="uniform",
    )
    keep = {"0.weight": 64, "2.weight": 51, "4.weight": 6}
    expected = snip_reference(model, data, keep=keep)
    sparsifier.prune_at_init(lambda b: F.cross_entropy(model(b[0]), b[1]), data)
    for fqn in LINEARS:
        assert torch.equal(sparsifier.masks[fqn], expected[fqn]), fqn
    assert sparsifier.topology.targets == keep


def test_snip_leaves_grads_buffers_and_mode_alone_and_masks_stay_fixed() -> None:
    torch.manual_seed(0)
    model = cnn()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    sparsifier = st.sparsify(model, optimizer, policy="snip", sparsity=0.8)
    buffers = {  # BatchNorm's statistics (the masks are buffers too)
        k: v.clone() for k, v in model.named_buffers() if "parametrizations" not in k
    }
    x, y = torch.randn(6, 3, 8, 8), torch.randint(0, 4, (6,))
    sparsifier.prune_at_init(lambda b: F.cross_entropy(model(b[0]), b[1]), [(x, y)])
    assert model.training
    assert all(p.grad is None for p in model.parameters())
    for name, value in model.named_buffers():
        if name in buffers:
            assert torch.equal(value, buffers[name]), name
    masks = {f: m.clone() for f, m in sparsifier.masks.items()}
    check_invariants(sparsifier, optimizer, model=model)
    for _ in range(5):
        step(model, optimizer, x, y)
        check_invariants(sparsifier, optimizer, model=model, grads=True)
    assert sparsifier.update_count == 0
    for fqn, mask in sparsifier.masks.items():
        assert torch.equal(mask, masks[fqn]), fqn


def test_snip_refuses_to_train_before_pruning_and_to_prune_twice() -> None:
    model = mlp()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    sparsifier = st.sparsify(model, optimizer, policy="snip", sparsity=0.9)
    weights = {k: v.clone() for k, v in model.state_dict().items()}
    x, y = batches(1)[0]
    with pytest.raises(RuntimeError) as error:
        step(model, optimizer, x, y)
    assert_expected_inline(
        str(error.value),
        """\
SNIP chooses its masks from data before training, and the model is still dense.
Call sparsifier.prune_at_init(loss_fn, batches) before the first optimizer step, e.g. sparsifier.prune_at_init(lambda b: F.cross_entropy(model(b[0]), b[1]), [next(iter(loader))]).""",
    )
    for key, value in model.state_dict().items():  # the step did not happen
        assert torch.equal(value, weights[key]), key
    sparsifier.prune_at_init(lambda b: F.cross_entropy(model(b[0]), b[1]), [(x, y)])
    with pytest.raises(RuntimeError) as error:
        sparsifier.prune_at_init(lambda b: F.cross_entropy(model(b[0]), b[1]), [(x, y)])
    assert_expected_inline(
        str(error.value),
        """SNIP's masks were already chosen (prune_at_init ran, or a checkpoint was loaded); they stay fixed.""",
    )
    with pytest.raises(ValueError) as error:
        st.sparsify(mlp(), policy="snip").prune_at_init(lambda b: b, [])
    assert_expected_inline(
        str(error.value),
        """\
prune_at_init needs at least one batch; got none.
Pass e.g. [next(iter(loader))].""",
    )
    with pytest.raises(RuntimeError) as error:
        st.sparsify(mlp(), policy="static").prune_at_init(lambda b: b, [])
    assert_expected_inline(
        str(error.value),
        """\
prune_at_init chooses SNIP's masks, but this sparsifier's policy is Static().
Sparsify with policy="snip" to prune at initialisation.""",
    )


# -- every new policy: invariants, resume, checkpoints ------------------------------

POLICIES = ["snfs", "gmp", "snip"]


def build(
    policy: str, seed: int = 0, optimizer: str = "sgd"
) -> tuple[nn.Module, torch.optim.Optimizer, st.Sparsifier]:
    torch.manual_seed(seed)
    model = mlp()
    opt: torch.optim.Optimizer
    if optimizer == "sgd":
        opt = torch.optim.SGD(
            model.parameters(), lr=0.05, momentum=0.9, weight_decay=1e-3
        )
    elif optimizer == "adam-amsgrad":
        opt = torch.optim.Adam(model.parameters(), lr=1e-2, amsgrad=True)
    else:
        opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    sparsifier = st.sparsify(
        model,
        opt,
        policy=policy,
        sparsity=0.85,
        update_interval=3,
        end_step=14,
        drop_fraction=0.5,
        seed=seed,
    )
    return model, opt, sparsifier


def prune(model: nn.Module, sparsifier: st.Sparsifier) -> None:
    if sparsifier.policy == SNIP():
        data = batches(2, seed=11)
        sparsifier.prune_at_init(lambda b: F.cross_entropy(model(b[0]), b[1]), data)


@pytest.mark.parametrize("optimizer", ["sgd", "adamw", "adam-amsgrad"])
@pytest.mark.parametrize("policy", POLICIES)
def test_zeros_outside_the_masks_after_every_step(policy: str, optimizer: str) -> None:
    model, opt, sparsifier = build(policy, optimizer=optimizer)
    prune(model, sparsifier)
    dense_keys = list(mlp().state_dict())
    for k, (x, y) in enumerate(batches(16), start=1):
        before = sparsifier.topology.targets
        step(model, opt, x, y)
        check_invariants(
            sparsifier, opt, model=model, dense_keys=dense_keys, grads=True
        )
        after = sparsifier.topology.targets
        if not sparsifier.schedule.is_update_step(k) or policy == "snip":
            assert after == before, k
        if policy == "snfs":
            assert sum(after.values()) == sum(before.values()), k
    expected_updates = {"snfs": 4, "gmp": 4, "snip": 0}[policy]
    assert sparsifier.update_count == expected_updates


def roundtrip(state: dict[str, Any]) -> dict[str, Any]:
    buffer = io.BytesIO()
    torch.save(state, buffer)
    buffer.seek(0)
    loaded: dict[str, Any] = torch.load(buffer, weights_only=True)
    return loaded


def bit_equal(a: Any, b: Any, where: str = "") -> None:
    if isinstance(a, Tensor):
        assert isinstance(b, Tensor) and a.dtype == b.dtype, where
        assert torch.equal(a.view(-1).view(torch.uint8), b.view(-1).view(torch.uint8))
    elif isinstance(a, dict):
        assert isinstance(b, dict) and list(a) == list(b), (where, list(a), list(b))
        for key in a:
            bit_equal(a[key], b[key], f"{where}.{key}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            bit_equal(x, y, f"{where}[{i}]")
    else:
        assert a == b, (where, a, b)


@pytest.mark.parametrize(
    "order", list(itertools.permutations(["model", "optimizer", "sparsity"]))
)
@pytest.mark.parametrize("policy", POLICIES)
def test_resume_mid_run_is_bit_exact_in_every_load_order(
    policy: str, order: tuple[str, ...]
) -> None:
    data = batches(12)
    model, opt, sparsifier = build(policy)
    prune(model, sparsifier)
    for x, y in data[:4]:  # saved mid-interval: SNFS's momentum matters
        step(model, opt, x, y)
    saved = roundtrip(
        {
            "model": model.state_dict(),
            "optimizer": opt.state_dict(),
            "sparsity": sparsifier.state_dict(),
        }
    )
    for x, y in data[4:]:
        step(model, opt, x, y)

    resumed, resumed_opt, resumed_sparsifier = build(policy, seed=1)
    loaders = {
        "model": resumed.load_state_dict,
        "optimizer": resumed_opt.load_state_dict,
        "sparsity": resumed_sparsifier.load_state_dict,
    }
    for name in order:
        loaders[name](saved[name])
    assert resumed_sparsifier.step_count == 4
    for x, y in data[4:]:
        step(resumed, resumed_opt, x, y)
        check_invariants(resumed_sparsifier, resumed_opt, model=resumed)
    bit_equal(resumed.state_dict(), model.state_dict(), "model")
    bit_equal(resumed_opt.state_dict(), opt.state_dict(), "optimizer")
    bit_equal(resumed_sparsifier.state_dict(), sparsifier.state_dict(), "sparsity")


@pytest.mark.parametrize("pattern", ["late-optimizer", "weights-before-sparsify"])
@pytest.mark.parametrize("policy", POLICIES)
def test_resume_in_the_frameworks_orders_is_bit_exact(
    policy: str, pattern: str
) -> None:
    """The orders of tests/test_reliability.py: an optimizer built after
    sparsify and attached; weights and optimizer state loaded into the plain
    model before sparsify (how frameworks resume), then the masks."""
    data = batches(12)
    model, opt, sparsifier = build(policy)
    prune(model, sparsifier)
    for x, y in data[:4]:
        step(model, opt, x, y)
    saved = roundtrip(
        {
            "model": model.state_dict(),
            "optimizer": opt.state_dict(),
            "sparsity": sparsifier.state_dict(),
        }
    )
    for x, y in data[4:]:
        step(model, opt, x, y)

    torch.manual_seed(1)
    fresh = mlp()
    settings: dict[str, Any] = {
        "policy": policy,
        "sparsity": 0.85,
        "update_interval": 3,
        "end_step": 14,
        "drop_fraction": 0.5,
        "seed": 1,
    }

    def sgd() -> torch.optim.Optimizer:
        return torch.optim.SGD(
            fresh.parameters(), lr=0.05, momentum=0.9, weight_decay=1e-3
        )

    if pattern == "late-optimizer":
        resumed = st.sparsify(fresh, **settings)
        fresh_opt = sgd()
        resumed.attach_optimizer(fresh_opt)
        fresh_opt.load_state_dict(saved["optimizer"])
        fresh.load_state_dict(saved["model"])
    else:
        fresh_opt = sgd()
        fresh.load_state_dict(saved["model"])
        fresh_opt.load_state_dict(saved["optimizer"])
        resumed = st.sparsify(fresh, fresh_opt, **settings)
    resumed.load_state_dict(saved["sparsity"])
    for x, y in data[4:]:
        step(fresh, fresh_opt, x, y)
        check_invariants(resumed, fresh_opt, model=fresh)
    bit_equal(fresh.state_dict(), model.state_dict(), "model")
    # (an optimizer built after sparsify lists the weights after the biases)
    params, fresh_params = (
        dict(model.named_parameters()),
        dict(fresh.named_parameters()),
    )
    for name, param in params.items():
        bit_equal(fresh_opt.state[fresh_params[name]], opt.state[param], name)
    bit_equal(resumed.state_dict(), sparsifier.state_dict(), "sparsity")


def test_checkpoint_stores_current_counts_and_the_momentum() -> None:
    model, opt, sparsifier = build("snfs")
    for x, y in batches(4):
        step(model, opt, x, y)
    state = sparsifier.state_dict()
    assert state["active"] == sparsifier.topology.targets
    assert state["active"] != sparsifier.topology.final_targets  # moved at step 3
    assert sorted(state["policy_state"]["signals"]) == LINEARS
    for fqn, signal in state["policy_state"]["signals"].items():
        assert torch.equal(signal, sparsifier.signals[fqn])
        assert signal is not sparsifier.signals[fqn]


def test_a_checkpoint_without_counts_or_policy_state_still_loads() -> None:
    """Checkpoints written before counts could move: the allocated counts."""
    torch.manual_seed(0)
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    sparsifier = st.sparsify(
        model, opt, policy="rigl", sparsity=0.8, end_step=10, update_interval=2
    )
    old = roundtrip(sparsifier.state_dict())
    del old["active"], old["policy_state"]
    fresh = st.sparsify(
        mlp(), policy="rigl", sparsity=0.8, end_step=10, update_interval=2, seed=3
    )
    fresh.load_state_dict(old)
    for fqn, mask in sparsifier.masks.items():
        assert torch.equal(fresh.masks[fqn], mask)


def test_a_corrupted_count_is_refused_and_changes_nothing() -> None:
    model, opt, sparsifier = build("gmp")
    for x, y in batches(3):
        step(model, opt, x, y)
    state = roundtrip(sparsifier.state_dict())
    state["active"]["0.weight"] += 1
    _, _, fresh = build("gmp", seed=1)
    masks = {f: m.clone() for f, m in fresh.masks.items()}
    with pytest.raises(ValueError) as error:
        fresh.load_state_dict(state)
    assert_expected_inline(
        str(error.value),
        """\
Mask '0.weight' has 316 active weights in the checkpoint, but this sparsifier targets 317.
Build the sparsifier with the checkpoint's sparsity and distribution.""",
    )
    for fqn, mask in fresh.masks.items():
        assert torch.equal(mask, masks[fqn])
    state["active"]["0.weight"] = 10**6
    with pytest.raises(ValueError, match="outside"):
        fresh.load_state_dict(state)


# -- DDP: every rank holds the same masks -------------------------------------------


def _ddp_worker(rank: int, out: str) -> None:
    dist.init_process_group("gloo", rank=rank, world_size=2)
    results: dict[str, Any] = {}
    try:
        for policy in POLICIES:
            model, opt, sparsifier = build(policy, seed=rank)  # other seeds
            ddp = nn.parallel.DistributedDataParallel(model)
            if policy == "snip":  # each rank scores its own batch
                data = batches(1, seed=20 + rank)
                sparsifier.prune_at_init(
                    lambda b, net=model: F.cross_entropy(net(b[0]), b[1]), data
                )
            masks = []
            for x, y in batches(12, seed=30 + rank):  # each rank its own data
                step(ddp, opt, x, y)
                masks.append({f: m.clone() for f, m in sparsifier.masks.items()})
            results[policy] = {
                "masks": masks,
                "signals": dict(sparsifier.signals),
                "counts": sparsifier.topology.targets,
                "updates": sparsifier.update_count,
            }
    finally:
        dist.destroy_process_group()
    torch.save(results, Path(out) / f"rank{rank}.pt")
    exit_worker()


@pytest.mark.skipif(
    not dist.is_available() or not dist.is_gloo_available(),
    reason="needs torch.distributed with gloo",
)
def test_ddp_ranks_hold_identical_masks_counts_and_momentum(tmp_path: Path) -> None:
    ranks = spawn_ranks(_ddp_worker, tmp_path)
    for policy in POLICIES:
        a, b = ranks[0][policy], ranks[1][policy]
        assert a["updates"] == b["updates"] == (0 if policy == "snip" else 4)
        assert a["counts"] == b["counts"], policy
        for k, (ma, mb) in enumerate(zip(a["masks"], b["masks"], strict=True)):
            for fqn in ma:
                assert torch.equal(ma[fqn], mb[fqn]), (policy, k, fqn)
        assert list(a["signals"]) == list(b["signals"])
        for fqn in a["signals"]:
            assert torch.equal(a["signals"][fqn], b["signals"][fqn]), fqn
    assert ranks[0]["snfs"]["signals"]  # SNFS kept its momentum
    counts = ranks[0]["snfs"]["counts"]
    assert sum(counts.values()) == sum(build("snfs")[2].topology.final_targets.values())


@pytest.mark.parametrize("policy", POLICIES)
def test_sparse_execution_gives_the_same_masks_as_mask_mode(policy: str) -> None:
    """Counts that move (SNFS, GMP, SNIP) keep sparse execution's index right."""
    runs = []
    for execution in ("mask", "sparse"):
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 4))
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        sparsifier = st.sparsify(
            model,
            opt,
            policy=policy,
            sparsity=0.9,
            execution=execution,
            update_interval=2,
            end_step=12,
            drop_fraction=0.5,
        )
        g = torch.Generator().manual_seed(0)
        data = [
            (torch.randn(16, 64, generator=g), torch.randint(0, 4, (16,), generator=g))
            for _ in range(14)
        ]
        if policy == "snip":
            sparsifier.prune_at_init(
                lambda b, net=model: F.cross_entropy(net(b[0]), b[1]), data[:1]
            )
        for x, y in data:
            step(model, opt, x, y)
            check_invariants(sparsifier, opt, model=model)
        runs.append(({f: m.clone() for f, m in sparsifier.masks.items()}, model))
    (masks, model), (sparse_masks, sparse_model) = runs
    for fqn, mask in masks.items():
        assert torch.equal(sparse_masks[fqn], mask), fqn
    x = torch.randn(8, 64)
    torch.testing.assert_close(sparse_model(x), model(x), rtol=1e-5, atol=1e-5)
