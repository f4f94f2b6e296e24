"""Policies and the update rule: reference results computed independently."""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import ClassVar

import pytest
import torch
from expecttest import assert_expected_inline
from torch import Tensor, nn

import sparsetorch as st
from sparsetorch.policies import POLICIES, Policy, RigL, update_mask


def one_layer_rigl(
    policy: str | Policy = "rigl", seed: int = 0
) -> tuple[nn.Linear, st.Sparsifier, torch.optim.Optimizer]:
    layer = nn.Linear(12, 10)
    optimizer = torch.optim.SGD(layer.parameters(), lr=0.0)
    sparsifier = st.sparsify(
        layer,
        optimizer,
        policy=policy,
        sparsity=0.7,
        update_interval=1,
        end_step=10,
        drop_fraction=0.5,
        drop_schedule="constant",
        seed=seed,
    )
    return layer, sparsifier, optimizer


def test_rigl_update_matches_reference() -> None:
    layer, sparsifier, optimizer = one_layer_rigl()
    mask = sparsifier.masks["weight"].clone()
    weight = sparsifier.topology.params["weight"].detach().clone()
    x = torch.randn(32, 12)

    # Independent dense gradient w.r.t. the effective weight.
    w = weight.clone().requires_grad_(True)
    (x @ w.T + layer.bias.detach()).sin().sum().backward()
    assert w.grad is not None
    n_active = int(mask.sum())
    n_drop = int(n_active * 0.5)
    active = mask.flatten().nonzero().flatten().tolist()
    by_magnitude = sorted(active, key=lambda i: -abs(weight.flatten()[i].item()))
    kept = set(by_magnitude[: n_active - n_drop])
    candidates = [i for i in range(mask.numel()) if i not in kept]
    by_grad = sorted(candidates, key=lambda i: -abs(w.grad.flatten()[i].item()))
    expected = torch.zeros(mask.numel(), dtype=torch.bool)
    expected[sorted(kept | set(by_grad[:n_drop]))] = True

    optimizer.zero_grad()
    layer(x).sin().sum().backward()
    optimizer.step()  # lr=0: only the update changes anything
    assert sparsifier.update_count == 1
    assert torch.equal(sparsifier.masks["weight"].flatten(), expected)


def test_set_keeps_the_largest_and_grows_as_many_at_random() -> None:
    layer, sparsifier, optimizer = one_layer_rigl("set")
    old = sparsifier.masks["weight"].clone()
    weight = sparsifier.topology.params["weight"].detach().clone()
    n_active = int(old.sum())
    n_drop = int(n_active * 0.5)
    threshold = weight.abs()[old].sort(descending=True).values[n_active - n_drop - 1]
    optimizer.zero_grad()
    layer(torch.randn(4, 12)).sum().backward()
    optimizer.step()
    new = sparsifier.masks["weight"]
    assert int(new.sum()) == n_active
    survivors = old & new
    # Every weight with |w| >= the kept threshold survives.
    assert torch.all(new[old & (weight.abs() >= threshold)])
    assert int((new & ~old).sum()) == int((old & ~new).sum())
    assert int(survivors.sum()) >= n_active - n_drop


def test_update_drops_and_grows_the_same_number() -> None:
    w = torch.randn(50)
    m = torch.zeros(50, dtype=torch.bool)
    m[:20] = True
    w = w * m
    g = torch.randn(50)
    new = update_mask(RigL(), w, m, g, 7, torch.Generator().manual_seed(3))
    assert int(new.sum()) == 20
    dropped, grown = m & ~new, new & ~m
    assert int(dropped.sum()) == int(grown.sum())
    assert not torch.any(dropped & grown)


def test_ties_are_broken_by_the_generator_not_by_position() -> None:
    w = torch.ones(100)
    m = torch.ones(100, dtype=torch.bool)
    picks = set()
    for seed in range(5):
        new = update_mask(
            RigL(), w, m, torch.zeros(100), 50, torch.Generator().manual_seed(seed)
        )
        picks.add(tuple(new.nonzero().flatten().tolist()))
    # All scores tie: RigL regrows every dropped weight (all positions are
    # candidates with equal score) or keeps a random subset; never "the first 50".
    assert all(p != tuple(range(50)) for p in picks)
    w2 = torch.ones(100)
    m2 = torch.zeros(100, dtype=torch.bool)
    m2[::2] = True
    firsts = {
        tuple(
            update_mask(
                RigL(),
                w2 * m2,
                m2,
                torch.zeros(100),
                10,
                torch.Generator().manual_seed(seed),
            )
            .nonzero()
            .flatten()
            .tolist()
        )
        for seed in range(5)
    }
    assert len(firsts) == 5


def test_same_generator_state_gives_the_same_update() -> None:
    w, g = torch.randn(64), torch.randn(64)
    m = torch.rand(64) > 0.5
    w = w * m
    a = update_mask(st.SET(), w, m, g, 5, torch.Generator().manual_seed(9))
    b = update_mask(st.SET(), w, m, g, 5, torch.Generator().manual_seed(9))
    assert torch.equal(a, b)


@dataclass(frozen=True, kw_only=True)
class GrowFirst(Policy):
    """Grows the lowest-index candidates: lets a test predict the result."""

    needs_grad: ClassVar[bool] = False

    def grow_score(
        self,
        weight: Tensor,
        mask: Tensor,
        grad: Tensor | None,
        generator: torch.Generator | None = None,
    ) -> Tensor:
        return -torch.arange(weight.numel(), dtype=weight.dtype).view_as(weight)


def test_a_user_policy_decides_growth() -> None:
    w = torch.tensor([0.0, 0.0, 0.0, 0.5, 0.1, 0.9])
    m = torch.tensor([False, False, False, True, True, True])
    new = update_mask(GrowFirst(), w, m, None, 1, torch.Generator())
    assert new.tolist() == [True, False, False, True, False, True]


def test_a_user_policy_works_through_sparsify() -> None:
    model = nn.Linear(6, 4)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    sparsifier = st.sparsify(
        model, opt, policy=GrowFirst(), sparsity=0.5, end_step=3, update_interval=1
    )
    for _ in range(2):
        opt.zero_grad()
        model(torch.randn(2, 6)).sum().backward()
        opt.step()
    assert sparsifier.update_count == 2
    assert int(sparsifier.masks["weight"].sum()) == 12


def test_registry_knows_the_builtin_policies() -> None:
    assert sorted(POLICIES) == ["gmp", "rigl", "set", "snfs", "snip", "static"]


def test_unknown_policy_lists_the_known_ones() -> None:
    with pytest.raises(ValueError) as error:
        st.sparsify(nn.Linear(2, 2), policy="RigL")
    assert_expected_inline(
        str(error.value),
        """\
Unknown policy 'RigL'.
Known policies: ['gmp', 'rigl', 'set', 'snfs', 'snip', 'static'], or a Policy object.""",
    )


def test_policy_of_the_wrong_type() -> None:
    with pytest.raises(TypeError) as error:
        st.sparsify(nn.Linear(2, 2), policy=RigL)  # type: ignore[arg-type]
    assert_expected_inline(
        str(error.value),
        """policy must be a name or a sparsetorch.policies.Policy, got type.""",
    )


def test_nan_gradient_skips_the_update_with_a_warning() -> None:
    layer, sparsifier, optimizer = one_layer_rigl()
    before = sparsifier.masks["weight"].clone()
    optimizer.zero_grad()
    layer(torch.full((2, 12), float("nan"))).sum().backward()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        optimizer.step()
    assert sparsifier.update_count == 0
    assert torch.equal(sparsifier.masks["weight"], before)
    assert_expected_inline(
        str(caught[0].message),
        """Skipped the topology update at step 1: RigL.drop_score gave 36 NaN/inf value(s); the update would pick them silently.""",
    )
