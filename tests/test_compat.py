"""RigLScheduler: the rigl-torch drop-in."""

from __future__ import annotations

import warnings
from typing import Any

import pytest
import torch
from conftest import batch, check_invariants, cnn, mlp
from expecttest import assert_expected_inline
from torch import nn

from sparsetorch import RigLScheduler


@pytest.mark.parametrize("make", [cnn, mlp])
def test_the_three_line_usage_trains(make: type[nn.Module]) -> None:
    model = make()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    pruner = RigLScheduler(
        model,
        optimizer,
        dense_allocation=0.2,
        T_end=40,
        delta=5,
        ignore_linear_layers=False,
    )
    x, y = batch(model)
    returned = []
    for _ in range(50):
        optimizer.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        ok = pruner()
        returned.append(ok)
        if ok:
            optimizer.step()
        check_invariants(pruner.sparsifier, optimizer)
    assert [i + 1 for i, ok in enumerate(returned) if not ok] == [
        5,
        10,
        15,
        20,
        25,
        30,
        35,
    ]
    assert (pruner.step, pruner.rigl_steps) == (50, 7)


def _cnn_pruner(**options: Any) -> RigLScheduler:
    """``RigLScheduler`` on conftest's ``cnn`` at 10% density, ``T_end=10``."""
    model = cnn()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    return RigLScheduler(model, optimizer, dense_allocation=0.1, T_end=10, **options)


def test_uniform_keeps_the_first_layer_dense() -> None:
    pruner = _cnn_pruner(ignore_linear_layers=False)
    assert list(pruner.masks) == ["3.weight", "6.weight"]
    assert all(
        abs(s - 0.9) < 1e-12 for s in pruner.sparsifier.topology.sparsities.values()
    )


def test_ignore_linear_layers_keeps_linear_dense() -> None:
    pruner = _cnn_pruner(sparsity_distribution="ERK")
    assert list(pruner.masks) == ["0.weight", "3.weight"]


def test_erk_works() -> None:
    pruner = _cnn_pruner(sparsity_distribution="ERK", ignore_linear_layers=False)
    sparsities = pruner.sparsifier.topology.sparsities
    assert len(set(sparsities.values())) == 3


def test_t_end_is_required() -> None:
    model = cnn()
    with pytest.raises(ValueError) as error:
        RigLScheduler(model, torch.optim.SGD(model.parameters(), lr=0.1), 0.1)
    assert_expected_inline(
        str(error.value),
        """\
RigLScheduler needs T_end, the step at which topology updates stop (rigl-torch crashes without it).
A common choice: T_end = int(0.75 * epochs * len(loader)).""",
    )
    assert not any(hasattr(m, "parametrizations") for m in model.modules())


@pytest.mark.parametrize("dense_allocation", [0, -0.5, 1.5])
def test_dense_allocation_out_of_range(dense_allocation: float) -> None:
    model = cnn()
    with pytest.raises(ValueError, match=r"dense_allocation must be in \(0, 1\]"):
        RigLScheduler(
            model,
            torch.optim.SGD(model.parameters(), lr=0.1),
            dense_allocation,
            T_end=10,
        )


def test_dense_allocation_one_keeps_the_model_dense_with_a_warning() -> None:
    model = cnn()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        pruner = RigLScheduler(
            model, torch.optim.SGD(model.parameters(), lr=0.1), T_end=10
        )
    assert "keeps the model dense" in str(caught[0].message)
    assert all(bool(m.all()) for m in pruner.masks.values())


def test_nothing_left_to_sparsify_is_a_clear_error() -> None:
    model = mlp()
    with pytest.raises(ValueError) as error:
        RigLScheduler(model, torch.optim.SGD(model.parameters(), lr=0.1), 0.1, T_end=10)
    assert_expected_inline(
        str(error.value),
        """\
RigLScheduler found nothing to sparsify: ignore_linear_layers=True and sparsity_distribution='uniform' keep every layer of ['0.weight', '2.weight', '4.weight'] dense.
Pass ignore_linear_layers=False.""",
    )


def test_grad_accumulation_n_sums_gradients_of_the_last_calls() -> None:
    model = mlp()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.0)
    pruner = RigLScheduler(
        model,
        optimizer,
        0.3,
        T_end=50,
        delta=10,
        ignore_linear_layers=False,
        grad_accumulation_n=3,
    )
    x, y = batch(model)
    parametrization = pruner.sparsifier.topology.parametrizations["2.weight"]
    for step in range(1, 10):
        optimizer.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        assert (parametrization.dense_grad is not None) == (step >= 8), step
        pruner()
    single = parametrization.dense_grad.clone()  # two passes summed (steps 8, 9)
    optimizer.zero_grad()
    nn.functional.cross_entropy(model(x), y).backward()
    assert parametrization.dense_grad is not None
    torch.testing.assert_close(parametrization.dense_grad, single * 1.5)


def test_state_dict_round_trip() -> None:
    model = cnn()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    pruner = RigLScheduler(
        model, optimizer, 0.2, T_end=20, delta=2, ignore_linear_layers=False
    )
    x, y = batch(model)
    for _ in range(4):
        optimizer.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        if pruner():
            optimizer.step()
    state = pruner.state_dict()
    twin = cnn()
    twin.load_state_dict(model.state_dict())
    resumed = RigLScheduler(
        twin,
        torch.optim.SGD(twin.parameters(), lr=0.1),
        0.2,
        T_end=20,
        delta=2,
        ignore_linear_layers=False,
        state_dict=state,
    )
    assert resumed.step == 4
    assert all(torch.equal(resumed.masks[k], m) for k, m in pruner.masks.items())
