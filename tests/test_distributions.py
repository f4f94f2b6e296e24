"""Allocation of a global sparsity among tensors."""

from __future__ import annotations

import math

import pytest
from expecttest import assert_expected_inline
from torch import nn

import sparsetorch as st
from sparsetorch.distributions import active_count, allocate


def test_erk_matches_independent_computation() -> None:
    # conv (16, 3, 3, 3): 432 weights, raw score 25/432; fc (10, 1024): 10240 weights,
    # raw score 1034/10240. Active budget 10% of 10672 = 1067.2 = eps * (25 + 1034).
    shapes = {"conv": (16, 3, 3, 3), "fc": (10, 1024)}
    eps = 1067.2 / (25 + 1034)
    expected = {"conv": 1 - eps * 25 / 432, "fc": 1 - eps * 1034 / 10240}
    got = allocate(shapes, 0.9, "erk")
    assert got.keys() == expected.keys()
    for name in expected:
        assert math.isclose(got[name], expected[name], rel_tol=1e-12)


def test_erk_makes_a_layer_dense_when_its_density_would_exceed_one() -> None:
    # conv1 (8, 1, 3, 3): 72 weights, raw 15/72; fc (64, 512): 32768 weights, raw
    # 576/32768. At 50%: eps = 16420 / (15 + 576) would give conv1 density 5.3 > 1,
    # so conv1 is dense and fc takes the rest: 16420 - 72 = 16348 active weights.
    shapes = {"conv1": (8, 1, 3, 3), "fc": (64, 512)}
    got = allocate(shapes, 0.5, "erk")
    assert got["conv1"] == 0.0
    assert math.isclose(got["fc"], 1 - 16348 / 32768, rel_tol=1e-12)


def test_erk_on_a_model_hits_the_requested_total_within_one_weight_per_tensor() -> None:
    model = nn.Sequential(
        nn.Conv2d(1, 8, 3), nn.Conv2d(8, 16, 3), nn.Flatten(), nn.Linear(16 * 4, 10)
    )
    sparsifier = st.sparsify(model, policy="static", sparsity=0.8, distribution="erk")
    numel = sum(m.numel() for m in sparsifier.masks.values())
    active = sum(int(m.sum()) for m in sparsifier.masks.values())
    assert abs(active - 0.2 * numel) <= len(sparsifier.masks)
    for fqn, mask in sparsifier.masks.items():
        assert int(mask.sum()) == active_count(
            mask.numel(), sparsifier.topology.sparsities[fqn]
        )


def test_er_ignores_kernel_dimensions() -> None:
    shapes = {"conv": (32, 16, 3, 3), "fc": (10, 512)}
    raw = {"conv": 48 / 512, "fc": 522 / 5120}
    eps = 0.3 * (4608 + 5120) / (raw["conv"] * 4608 + raw["fc"] * 5120)
    got = allocate(shapes, 0.7, "er")
    for name in shapes:
        assert math.isclose(got[name], 1 - eps * raw[name], rel_tol=1e-12)


def test_uniform_gives_every_tensor_the_same_sparsity() -> None:
    assert allocate({"a": (3, 3), "b": (5,)}, 0.6, "uniform") == {"a": 0.6, "b": 0.6}


def test_active_count_rounds_and_keeps_at_least_one() -> None:
    assert [active_count(10, s) for s in (0.0, 0.25, 0.5, 0.95, 0.99)] == [
        10,
        8,
        5,
        1,
        1,
    ]


def test_dict_distribution_must_name_exactly_the_selected_tensors() -> None:
    with pytest.raises(ValueError) as error:
        allocate(
            {"a.weight": (2, 2), "b.weight": (2, 2)},
            0.5,
            {"a.weight": 0.5, "c.weight": 0.1},
        )
    assert_expected_inline(
        str(error.value),
        """\
The distribution dict must give a sparsity for exactly the selected tensors.
selected but missing from the dict: ['b.weight']
in the dict but not selected: ['c.weight']
Fix the dict keys, or select the tensors with include=/exclude=.""",
    )


def test_dict_distribution_checks_each_value() -> None:
    with pytest.raises(ValueError) as error:
        allocate({"a": (2, 2)}, 0.5, {"a": 1.0})
    assert_expected_inline(
        str(error.value), """Sparsity for 'a' must be in [0, 1), got 1.0."""
    )


def test_unknown_distribution_lists_the_known_ones() -> None:
    with pytest.raises(ValueError) as error:
        allocate({"a": (2, 2)}, 0.5, "ERK")
    assert_expected_inline(
        str(error.value),
        """\
Unknown distribution 'ERK'.
Known distributions: ['er', 'erk', 'uniform'], or a dict {tensor_fqn: sparsity}.""",
    )


def test_dict_distribution_sets_each_tensor() -> None:
    model = nn.Sequential(nn.Linear(10, 10), nn.Linear(10, 10))
    sparsifier = st.sparsify(
        model, policy="static", distribution={"0.weight": 0.5, "1.weight": 0.9}
    )
    assert [int(m.sum()) for m in sparsifier.masks.values()] == [50, 10]
    assert math.isclose(sparsifier.sparsity, 0.7)
