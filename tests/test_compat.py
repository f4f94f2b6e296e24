"""RigLScheduler: the rigl-torch drop-in."""

from __future__ import annotations

import importlib.util
import math
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from conftest import batch, check_invariants, cnn, mlp
from expecttest import assert_expected_inline
from torch import nn

from sparsetorch import RigLScheduler

DATA = Path(__file__).parent / "data"
_spec = importlib.util.spec_from_file_location(
    "make_rigl_torch_checkpoint", DATA / "make_rigl_torch_checkpoint.py"
)
assert _spec is not None and _spec.loader is not None
_make_rigl = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_make_rigl)


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


def test_uniform_keeps_the_first_layer_dense_and_rigl_torch_counts() -> None:
    pruner = _cnn_pruner(ignore_linear_layers=False)
    assert list(pruner.masks) == ["3.weight", "6.weight"]
    # rigl-torch keeps n - int(0.9 * n): 576 - 518 and 512 - 460 (not round()).
    assert [int(m.sum()) for m in pruner.masks.values()] == [58, 52]
    assert pruner.S == [0, 0.9, 0.9]


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


# -- rigl-torch's attributes, with its meaning -----------------------------------------


def _rigl_fixture() -> dict[str, Any]:
    return torch.load(DATA / "rigl_torch_checkpoint.pt", weights_only=True)


def test_resuming_a_real_rigl_torch_checkpoint_continues_its_run() -> None:
    # tests/data/rigl_torch_checkpoint.pt was written by rigl-torch 0.5.2 with
    # tests/data/make_rigl_torch_checkpoint.py: 7 calls, then 3 more.
    saved = _rigl_fixture()
    model, optimizer = _make_rigl.build()
    model.load_state_dict(saved["model"])
    optimizer.load_state_dict(saved["optimizer"])
    pruner = RigLScheduler(
        model, optimizer, state_dict=saved["pruner"], **_make_rigl.SETTINGS
    )
    assert (pruner.step, pruner.rigl_steps) == (7, 2)
    for ours, theirs in zip(
        pruner.backward_masks, saved["pruner"]["backward_masks"], strict=True
    ):
        assert (ours is None) == (theirs is None)
        assert ours is None or torch.equal(ours, theirs)
    for x, y in _make_rigl.batches(_make_rigl.CONTINUED_TO)[_make_rigl.SAVED_AT :]:
        _make_rigl.train_call(model, optimizer, pruner, x, y)
        check_invariants(pruner.sparsifier, optimizer, grads=True)
    continued = saved["continued"]
    assert (pruner.step, pruner.rigl_steps) == (10, 3)
    for ours, theirs in zip(
        pruner.backward_masks, continued["backward_masks"], strict=True
    ):
        assert ours is None or torch.equal(ours, theirs)
    for key, value in model.state_dict().items():
        assert torch.equal(value, continued["model"][key]), key


def _layers_model() -> nn.Sequential:
    """Every kind of layer rigl-torch's W lists or skips."""
    return nn.Sequential(
        nn.Embedding(10, 8),  # a layer (has .weight), kept dense here
        nn.Linear(8, 8),
        nn.Sequential(nn.LayerNorm(8), nn.Conv1d(8, 8, 1)),  # looked inside
        nn.BatchNorm2d(8),  # never a layer
        nn.BatchNorm1d(8),
        nn.Linear(8, 4),
    )


def test_w_lists_rigl_torch_layers_and_the_attributes_follow_it() -> None:
    model = _layers_model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    pruner = RigLScheduler(
        model, optimizer, 0.25, T_end=10, delta=2, ignore_linear_layers=False
    )
    params = pruner.sparsifier.topology.params
    assert list(pruner.masks) == ["1.weight", "2.1.weight", "5.weight"]
    expected_w = [
        model[0].weight,
        params["1.weight"],
        model[2][0].weight,
        params["2.1.weight"],
        model[4].weight,
        params["5.weight"],
    ]
    assert len(pruner.W) == len(expected_w)
    assert all(w is e for w, e in zip(pruner.W, expected_w, strict=True))
    assert pruner.N == [80, 64, 8, 64, 8, 32]
    assert pruner.S == [0, 0.75, 0, 0.75, 0, 0.75]
    assert pruner._linear_layers_mask == [0, 1, 0, 0, 0, 1]
    masks = pruner.backward_masks
    assert [m is None for m in masks] == [True, False, True, False, True, False]
    assert masks[1] is pruner.masks["1.weight"]  # live, not copies
    assert [int(m.sum()) for m in masks if m is not None] == [16, 16, 8]
    assert pruner.model is model and pruner.optimizer is optimizer
    assert (pruner.delta, pruner.delta_T, pruner.T_end, pruner.alpha) == (2, 2, 10, 0.3)
    assert (pruner.dense_allocation, pruner.grad_accumulation_n) == (0.25, 1)
    assert not pruner.static_topo and not pruner.ignore_linear_layers
    assert pruner.sparsity_distribution == "uniform"


@pytest.mark.parametrize("static_topo", [0, 1])
@pytest.mark.parametrize("zero_grad", [True, False])
def test_rigl_torch_loop_keeps_zeros_in_weights_gradients_and_momentum(
    static_topo: int, zero_grad: bool
) -> None:
    # What rigl-torch's own tests check, through its attributes; its elements
    # test never calls zero_grad, so gradients accumulate across RigL steps.
    model = cnn()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    pruner = RigLScheduler(
        model, optimizer, 0.1, T_end=11, delta=3, static_topo=static_topo
    )
    x, y = batch(model)
    for _ in range(8):
        if zero_grad:
            optimizer.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        if pruner():
            optimizer.step()
        for w, s, n, mask in zip(
            pruner.W, pruner.S, pruner.N, pruner.backward_masks, strict=True
        ):
            assert "momentum_buffer" in optimizer.state[w]
            if mask is None:
                assert s == 0
                continue
            assert int((~mask).sum()) == int(s * n)
            assert w.grad is not None
            for tensor in (w, w.grad, optimizer.state[w]["momentum_buffer"]):
                assert int(tensor[~mask].count_nonzero()) == 0
    assert pruner.rigl_steps == (0 if static_topo else 2)  # steps 3 and 6


def test_attributes_are_read_only_views() -> None:
    pruner = _cnn_pruner(ignore_linear_layers=False)
    for name in ("W", "S", "N", "backward_masks", "step", "T_end", "delta", "model"):
        with pytest.raises(AttributeError):
            setattr(pruner, name, None)


def test_backward_hook_objects_hold_the_dense_gradient_before_an_update() -> None:
    model = mlp()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.0)  # the same gradient
    pruner = RigLScheduler(
        model,
        optimizer,
        0.3,
        T_end=50,
        delta=4,
        ignore_linear_layers=False,
        grad_accumulation_n=2,
    )
    x, y = batch(model)
    grads = []
    for _ in range(4):
        optimizer.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        hooks = pruner.backward_hook_objects
        assert hooks[0] is None  # the dense first layer
        assert hooks[1] is not None
        assert hooks[1].layer == 1 and hooks[1].scheduler is pruner
        grads.append(hooks[1].dense_grad)
        if pruner():
            optimizer.step()
    # Kept in the 2 passes before the update at step 4, as their mean (rigl-torch
    # sums grad / grad_accumulation_n): g / 2, then (g + g) / 2.
    assert grads[0] is None and grads[1] is None
    assert grads[2] is not None and grads[3] is not None
    assert torch.equal(grads[3], grads[2] * 2)
    mask = pruner.backward_masks[1]
    assert mask is not None and int(grads[3][~mask].count_nonzero()) > 0  # dense


def test_methods_rigl_torch_scripts_call() -> None:
    pruner = _cnn_pruner(ignore_linear_layers=False, delta=2)
    assert pruner.cosine_annealing() == pytest.approx(0.3)
    w = pruner.W[1]
    with torch.no_grad():
        w.fill_(1.0)  # written outside the mask by hand
    w.grad = torch.ones_like(w)
    pruner.apply_mask_to_weights()
    pruner.apply_mask_to_gradients()
    mask = pruner.backward_masks[1]
    assert mask is not None
    assert int(w.count_nonzero()) == int(mask.sum()) == int(w.grad.count_nonzero())
    pruner.reset_momentum()  # no state yet: nothing to do


@pytest.mark.parametrize(
    ("options", "expected"),
    [
        ({"static_topo": 0}, (False, 10, 2)),  # argparse ints, as its MNIST example
        ({"static_topo": 1}, (True, 10, 2)),
        ({"static_topo": np.bool_(False)}, (False, 10, 2)),
        ({"ignore_linear_layers": 0}, (False, 10, 2)),
        ({"T_end": 10.0}, (False, 10, 2)),
        ({"T_end": np.int64(10)}, (False, 10, 2)),
        ({"delta": 2.0}, (False, 10, 2)),
        ({"delta": np.int32(2)}, (False, 10, 2)),
        ({"dense_allocation": np.float32(0.25)}, (False, 10, 2)),
        ({"alpha": np.float64(0.3)}, (False, 10, 2)),
        ({"grad_accumulation_n": np.int64(1)}, (False, 10, 2)),
    ],
)
def test_accepts_the_argument_types_rigl_torch_accepts(
    options: dict[str, Any], expected: tuple[bool, int, int]
) -> None:
    model = mlp()
    settings: dict[str, Any] = {
        "dense_allocation": 0.25,
        "T_end": 10,
        "delta": 2,
        "ignore_linear_layers": False,
        **options,
    }
    pruner = RigLScheduler(
        model, torch.optim.SGD(model.parameters(), lr=0.1), **settings
    )
    assert (pruner.static_topo, pruner.T_end, pruner.delta) == expected
    assert type(pruner.T_end) is int and type(pruner.delta) is int


def test_a_fractional_t_end_follows_rigl_torch_schedule() -> None:
    model = mlp()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    pruner = RigLScheduler(
        model, optimizer, 0.3, T_end=7.5, delta=2, ignore_linear_layers=False
    )
    x, y = batch(model)
    skipped, fractions = [], []
    for _ in range(10):
        optimizer.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        fractions.append(pruner.sparsifier.schedule.drop_fraction_at(pruner.step + 1))
        if pruner():
            optimizer.step()
        else:
            skipped.append(pruner.step)
    assert skipped == [2, 4, 6]  # step % 2 == 0 and step < 7.5
    expected = [0.15 * (1 + math.cos(k * math.pi / 7.5)) for k in range(1, 11)]
    assert fractions[:7] == pytest.approx(expected[:7], abs=0, rel=1e-15)


@pytest.mark.parametrize(
    ("options", "error"),
    [
        ({"static_topo": 2}, "static_topo must be True or False (or 1 or 0), got 2."),
        ({"ignore_linear_layers": "no"}, "ignore_linear_layers must be True or"),
        ({"delta": 2.5}, "delta must be an int, got 2.5."),
        ({"T_end": "10"}, "T_end must be a float, got '10'."),
        ({"dense_allocation": True}, "dense_allocation must be a float, got True."),
    ],
)
def test_still_refuses_what_rigl_torch_would_misbehave_on(
    options: dict[str, Any], error: str
) -> None:
    model = mlp()
    settings = {"dense_allocation": 0.25, "T_end": 10, "delta": 2, **options}
    with pytest.raises(TypeError) as caught:
        RigLScheduler(model, torch.optim.SGD(model.parameters(), lr=0.1), **settings)
    assert str(caught.value).startswith(error)
    assert not any(hasattr(m, "parametrizations") for m in model.modules())


# -- rigl-torch checkpoints -------------------------------------------------------------


def _rigl_torch_state(
    model: nn.Module, masks: list[torch.Tensor | None], **hyperparams: Any
) -> dict[str, Any]:
    """A checkpoint in rigl-torch 0.5.2's ``RigLScheduler.state_dict()`` format."""
    weights = [m.weight for m in model.modules() if isinstance(m, nn.Linear)]
    settings = {
        "delta_T": 2,
        "alpha": 0.3,
        "T_end": 20,
        "ignore_linear_layers": False,
        "static_topo": False,
        "sparsity_distribution": "uniform",
        "grad_accumulation_n": 1,
        **hyperparams,
    }
    return {
        "dense_allocation": 0.25,
        "S": [0 if m is None else 0.75 for m in masks],
        "N": [w.numel() for w in weights],
        "hyperparams": settings,
        "step": 6,
        "rigl_steps": 3,
        "backward_masks": masks,
        "_linear_layers_mask": [1] * len(weights),
    }


def _random_masks(model: nn.Module) -> list[torch.Tensor | None]:
    """rigl-torch's uniform masks for ``mlp()``: first layer dense, then 25%."""
    g = torch.Generator().manual_seed(5)
    masks: list[torch.Tensor | None] = [None]
    for layer in (model[2], model[4]):
        n = layer.weight.numel()
        keep = n - int(0.75 * n)
        flat = torch.zeros(n, dtype=torch.bool)
        flat[torch.randperm(n, generator=g)[:keep]] = True
        masks.append(flat.view_as(layer.weight))
    return masks


def test_a_rigl_torch_checkpoint_passed_as_state_dict_is_converted() -> None:
    model = mlp()
    masks = _random_masks(model)
    state = _rigl_torch_state(model, masks)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    pruner = RigLScheduler(
        model,
        optimizer,
        0.25,
        T_end=20,
        delta=2,
        ignore_linear_layers=False,
        state_dict=state,
    )
    assert (pruner.step, pruner.rigl_steps) == (6, 3)
    for ours, theirs in zip(pruner.backward_masks, masks, strict=True):
        assert (ours is None) == (theirs is None)
        assert ours is None or torch.equal(ours, theirs)
    x, y = batch(model)
    skipped = []
    for _ in range(4):
        optimizer.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        if pruner():
            optimizer.step()
        else:
            skipped.append(pruner.step)
        check_invariants(pruner.sparsifier, optimizer, model=model, grads=True)
    assert skipped == [8, 10] and pruner.rigl_steps == 5
    # Our own checkpoint of the converted run resumes with the same arguments.
    twin = mlp()
    twin.load_state_dict(model.state_dict())
    resumed = RigLScheduler(
        twin,
        torch.optim.SGD(twin.parameters(), lr=0.1, momentum=0.9),
        0.25,
        T_end=20,
        delta=2,
        ignore_linear_layers=False,
        state_dict=pruner.state_dict(),
    )
    assert resumed.step == 10
    assert all(torch.equal(resumed.masks[k], m) for k, m in pruner.masks.items())


def test_a_rigl_torch_checkpoint_brings_its_settings_as_in_rigl_torch() -> None:
    model = mlp()
    state = _rigl_torch_state(model, _random_masks(model), delta_T=4, alpha=0.5)
    with pytest.warns(UserWarning) as caught:
        pruner = RigLScheduler(
            model,
            torch.optim.SGD(model.parameters(), lr=0.1),
            0.25,
            T_end=20,
            ignore_linear_layers=False,
            state_dict=state,
        )
    assert_expected_inline(
        str(caught[0].message),
        """The rigl-torch checkpoint's settings replace the arguments, as in rigl-torch: alpha=0.5 (not 0.3), delta=4 (not 100).""",
    )
    assert (pruner.delta, pruner.alpha, pruner.sparsifier.schedule.update_interval) == (
        4,
        0.5,
        4,
    )


def test_a_rigl_torch_checkpoint_of_another_model_raises_and_changes_nothing() -> None:
    model = mlp()
    state = _rigl_torch_state(model, _random_masks(model))
    state["N"] = [640, 512, 80]  # mlp() has a 16 -> 4 last layer, not 16 -> 5
    before = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(ValueError) as error:
        RigLScheduler(
            model,
            torch.optim.SGD(model.parameters(), lr=0.1),
            0.25,
            T_end=20,
            delta=2,
            state_dict=state,
        )
    assert_expected_inline(
        str(error.value),
        """The rigl-torch checkpoint is from another model: its layers' sizes N are [640, 512, 80], this model's are [640, 512, 64] (layers ['0.weight', '2.weight', '4.weight']).""",
    )
    assert not any(hasattr(m, "parametrizations") for m in model.modules())
    assert all(
        torch.equal(a, b) for a, b in zip(before, model.parameters(), strict=True)
    )


def test_a_corrupted_rigl_torch_mask_raises_and_restores_weights_and_state() -> None:
    model = mlp()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    model(torch.randn(4, 20)).sum().backward()
    optimizer.step()  # momentum everywhere
    masks = _random_masks(model)
    masks[2] = torch.ones_like(masks[2])  # not the count S says
    before = [p.detach().clone() for p in model.parameters()]
    momentum = [
        optimizer.state[p]["momentum_buffer"].clone() for p in model.parameters()
    ]
    with pytest.raises(ValueError) as error:
        RigLScheduler(
            model,
            optimizer,
            0.25,
            T_end=20,
            delta=2,
            ignore_linear_layers=False,
            state_dict=_rigl_torch_state(model, masks),
        )
    assert_expected_inline(
        str(error.value),
        """The rigl-torch checkpoint's mask of '4.weight' has 64 active weights, but its S=0.75 keeps 64 - int(0.75 * 64) = 16: it is corrupted.""",
    )
    assert not any(hasattr(m, "parametrizations") for m in model.modules())
    for p, weight, buffer in zip(model.parameters(), before, momentum, strict=True):
        assert torch.equal(p, weight)
        assert torch.equal(optimizer.state[p]["momentum_buffer"], buffer)


def test_load_state_dict_converts_a_rigl_torch_checkpoint_of_the_same_settings() -> (
    None
):
    model = mlp()
    masks = _random_masks(model)
    pruner = RigLScheduler(
        model,
        torch.optim.SGD(model.parameters(), lr=0.1),
        0.25,
        T_end=20,
        delta=2,
        ignore_linear_layers=False,
    )
    pruner.load_state_dict(_rigl_torch_state(model, masks))
    assert (pruner.step, pruner.rigl_steps) == (6, 3)
    assert torch.equal(pruner.backward_masks[2], masks[2])
    with pytest.raises(ValueError) as error:
        pruner.load_state_dict(_rigl_torch_state(model, masks, T_end=30))
    assert_expected_inline(
        str(error.value),
        """\
The rigl-torch checkpoint was made with other settings:
T_end: checkpoint 30, this scheduler 20
Pass it to the constructor instead: RigLScheduler(model, optimizer, ..., state_dict=checkpoint) adopts its settings.""",
    )


def test_a_checkpoint_that_fails_after_sparsifying_restores_weights_and_state() -> None:
    other = mlp()  # the same layers, another density: fails in load_state_dict
    state = RigLScheduler(
        other,
        torch.optim.SGD(other.parameters(), lr=0.1),
        0.5,
        T_end=20,
        delta=2,
        ignore_linear_layers=False,
    ).state_dict()
    model = mlp()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    model(torch.randn(4, 20)).sum().backward()
    optimizer.step()
    before = [p.detach().clone() for p in model.parameters()]
    momentum = [
        optimizer.state[p]["momentum_buffer"].clone() for p in model.parameters()
    ]
    with pytest.raises(ValueError, match="other settings"):
        RigLScheduler(
            model,
            optimizer,
            0.25,
            T_end=20,
            delta=2,
            ignore_linear_layers=False,
            state_dict=state,
        )
    assert not any(hasattr(m, "parametrizations") for m in model.modules())
    for p, weight, buffer in zip(model.parameters(), before, momentum, strict=True):
        assert torch.equal(p, weight)
        assert torch.equal(optimizer.state[p]["momentum_buffer"], buffer)
