"""Reliability II (#17): no silent wrong result on the paths real users take.

Each test is one class of defect: it failed (silently wrong, or with torch's raw
error) before the fix. The silent ones assert exact zeros outside the masks in
the weights and in the optimizer state after training.
"""

from __future__ import annotations

import copy
import io
import pickle
import warnings
from typing import Any

import pytest
import torch
from conftest import check_invariants, small_batches, small_mlp
from expecttest import assert_expected_inline
from torch import Tensor, nn

import sparsetorch as st

RIGL = {
    "sparsity": 0.75,
    "distribution": "uniform",
    "total_steps": 1000,
    "update_interval": 2,
    "drop_fraction": 0.5,
}


def loss(model: nn.Module, x: Tensor, y: Tensor) -> Tensor:
    return nn.functional.cross_entropy(model(x), y)


def outside(sparsifier: st.Sparsifier, tensors: dict[str, Tensor]) -> int:
    """Nonzeros outside the masks in ``tensors`` (``tensor_fqn -> tensor``)."""
    return sum(
        int(t[~sparsifier.masks[fqn]].count_nonzero()) for fqn, t in tensors.items()
    )


# -- 1. no-optimizer mode, manual sparsifier.step() ---------------------------------


@pytest.mark.parametrize(
    "make",
    [
        lambda ps: torch.optim.SGD(ps, lr=0.05, momentum=0.9),
        lambda ps: torch.optim.Adam(ps, lr=0.01),
    ],
    ids=["sgd-momentum", "adam"],
)
def test_manual_stepping_without_an_optimizer_keeps_state_zero_outside(
    make: Any,
) -> None:
    torch.manual_seed(0)
    model = small_mlp()
    sparsifier = st.sparsify(model, None, policy="rigl", **RIGL)
    optimizer = make(model.parameters())  # never given to sparsetorch
    for x, y in small_batches(8):
        optimizer.zero_grad()
        loss(model, x, y).backward()
        optimizer.step()
        sparsifier.step()
        check_invariants(sparsifier, optimizer, model=model)
    assert sparsifier.update_count == 4
    assert sparsifier.optimizers == [optimizer]  # attached at its first step


def test_sparsifier_step_while_the_optimizer_counts_raises() -> None:
    torch.manual_seed(0)
    model = small_mlp()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    sparsifier = st.sparsify(model, optimizer, policy="rigl", **RIGL)
    with pytest.raises(RuntimeError) as info:
        sparsifier.step()
    assert_expected_inline(
        str(info.value),
        """\
sparsifier.step() counts a step by hand, but this sparsifier already counts the steps of its optimizer (SGD): each step would count twice.
Remove the sparsifier.step() call: optimizer.step() advances the sparsifier.""",
    )
    assert sparsifier.step_count == 0


# -- 2. warm start from a dense run ---------------------------------------------------


def dense_run(steps: int = 3) -> tuple[dict[str, Any], dict[str, Any]]:
    """A dense model and SGD-momentum state after ``steps`` steps."""
    torch.manual_seed(0)
    model = small_mlp()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    for x, y in small_batches(steps):
        optimizer.zero_grad()
        loss(model, x, y).backward()
        optimizer.step()
    return copy.deepcopy(model.state_dict()), copy.deepcopy(optimizer.state_dict())


@pytest.mark.parametrize("order", ["model-first", "optimizer-first", "before-sparsify"])
def test_warm_start_from_a_dense_run_ends_masked(order: str) -> None:
    weights, state = dense_run()
    torch.manual_seed(1)
    model = small_mlp()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    if order == "before-sparsify":
        model.load_state_dict(weights)
        optimizer.load_state_dict(state)
    sparsifier = st.sparsify(model, optimizer, policy="rigl", **RIGL)
    if order == "model-first":
        model.load_state_dict(weights)
        optimizer.load_state_dict(state)
    elif order == "optimizer-first":
        optimizer.load_state_dict(state)
        model.load_state_dict(weights)
    params = sparsifier.topology.params
    momentum = {f: optimizer.state[p]["momentum_buffer"] for f, p in params.items()}
    assert outside(sparsifier, momentum) == 0  # right after the load
    # The active momentum is the dense run's, exactly.
    dense_momentum = state["state"][0]["momentum_buffer"]
    mask = sparsifier.masks["0.weight"]
    assert torch.equal(momentum["0.weight"][mask], dense_momentum[mask])
    for x, y in small_batches(6):
        optimizer.zero_grad()
        loss(model, x, y).backward()
        optimizer.step()
        check_invariants(sparsifier, optimizer, model=model)
    assert sparsifier.update_count == 3


def test_dense_state_into_an_optimizer_built_after_sparsify_is_rekeyed() -> None:
    """An optimizer built after sparsify lists each bias before its weight."""
    weights, state = dense_run()
    torch.manual_seed(1)
    model = small_mlp()
    sparsifier = st.sparsify(model, policy="rigl", **RIGL)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    sparsifier.attach_optimizer(optimizer)
    model.load_state_dict(weights)
    optimizer.load_state_dict(state)  # saved in the dense order
    weight = sparsifier.topology.params["0.weight"]
    mask = sparsifier.masks["0.weight"]
    momentum = optimizer.state[weight]["momentum_buffer"]
    assert momentum.shape == weight.shape
    assert torch.equal(momentum, state["state"][0]["momentum_buffer"] * mask)
    assert torch.equal(
        optimizer.state[model[0].bias]["momentum_buffer"],
        state["state"][1]["momentum_buffer"],
    )
    for x, y in small_batches(4):
        optimizer.zero_grad()
        loss(model, x, y).backward()
        optimizer.step()
        check_invariants(sparsifier, optimizer, model=model)


def test_resume_into_an_optimizer_built_after_sparsify_is_bit_exact() -> None:
    batches = small_batches(8)

    def hooked() -> tuple[nn.Module, torch.optim.Optimizer, st.Sparsifier]:
        torch.manual_seed(0)
        model = small_mlp()
        optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
        return model, optimizer, st.sparsify(model, optimizer, **RIGL)

    def run(model: nn.Module, optimizer: torch.optim.Optimizer, steps: range) -> None:
        for k in steps:
            optimizer.zero_grad()
            loss(model, *batches[k]).backward()
            optimizer.step()

    model, optimizer, sparsifier = hooked()
    run(model, optimizer, range(3))
    buffer = io.BytesIO()
    torch.save(
        {
            "model": model.state_dict(),
            "optimizer": optimizer.state_dict(),
            "sparsity": sparsifier.state_dict(),
        },
        buffer,
    )
    run(model, optimizer, range(3, 8))

    buffer.seek(0)
    saved = torch.load(buffer, weights_only=True)
    torch.manual_seed(5)
    late = small_mlp()
    late_sparsifier = st.sparsify(late, policy="rigl", seed=9, **RIGL)
    late_optimizer = torch.optim.SGD(late.parameters(), lr=0.05, momentum=0.9)
    late_sparsifier.attach_optimizer(late_optimizer)
    late_optimizer.load_state_dict(saved["optimizer"])
    late.load_state_dict(saved["model"])
    late_sparsifier.load_state_dict(saved["sparsity"])
    run(late, late_optimizer, range(3, 8))
    for key, value in model.state_dict().items():
        assert torch.equal(late.state_dict()[key], value), key
    params = dict(model.named_parameters())
    late_params = dict(late.named_parameters())
    for name, p in params.items():
        for key, value in optimizer.state[p].items():
            assert torch.equal(late_optimizer.state[late_params[name]][key], value)
    assert late_sparsifier.step_count == sparsifier.step_count == 8
    for fqn, mask in sparsifier.masks.items():
        assert torch.equal(late_sparsifier.masks[fqn], mask)


def test_weights_loaded_first_then_sparsify_then_masks_keep_every_weight() -> None:
    """Frameworks resume in this order: no trained weight may be lost."""
    torch.manual_seed(0)
    model = small_mlp()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    sparsifier = st.sparsify(model, optimizer, **RIGL)
    for x, y in small_batches(5):
        optimizer.zero_grad()
        loss(model, x, y).backward()
        optimizer.step()
    saved = copy.deepcopy(
        {
            "model": model.state_dict(),
            "optimizer": optimizer.state_dict(),
            "sparsity": sparsifier.state_dict(),
        }
    )
    fresh = small_mlp()
    fresh_optimizer = torch.optim.SGD(fresh.parameters(), lr=0.05, momentum=0.9)
    fresh.load_state_dict(saved["model"])
    fresh_optimizer.load_state_dict(saved["optimizer"])
    resumed = st.sparsify(fresh, fresh_optimizer, seed=3, **RIGL)
    resumed.load_state_dict(saved["sparsity"])
    for key, value in saved["model"].items():
        assert torch.equal(fresh.state_dict()[key], value), key
    for p, q in zip(model.parameters(), fresh.parameters(), strict=True):
        assert torch.equal(
            fresh_optimizer.state[q]["momentum_buffer"],
            optimizer.state[p]["momentum_buffer"],
        )


# -- 3. nn.Linear subclasses with their own forward ------------------------------------


class Scaled(nn.Linear):
    def forward(self, x: Tensor) -> Tensor:
        return 2 * super().forward(x) + 1


@pytest.mark.parametrize("execution", ["sparse", "auto"])
def test_linear_subclass_with_its_own_forward_keeps_it(execution: str) -> None:
    torch.manual_seed(0)
    model = nn.Sequential(Scaled(64, 64), nn.ReLU(), nn.Linear(64, 8))
    sparsifier = st.sparsify(model, policy="static", sparsity=0.9, execution=execution)
    x = torch.randn(4, 64)
    first = model[0]
    expected = 2 * nn.functional.linear(x, first.weight, first.bias) + 1
    assert torch.equal(first(x), expected)
    assert "forward" not in first.__dict__
    assert_expected_inline(
        sparsifier.summary().splitlines()[-1],
        """mask mode: 0.weight (Scaled overrides forward)""",
    )


def test_instance_forward_is_respected_by_sparse_execution() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 64))
    model[0].forward = lambda x: torch.zeros(x.shape[0], 3)  # type: ignore[method-assign]
    sparsifier = st.sparsify(model, policy="static", sparsity=0.9, execution="sparse")
    assert model(torch.randn(2, 64)).shape == (2, 3)
    assert sparsifier.summary().splitlines()[-1] == (
        "mask mode: 0.weight (the instance has its own forward)"
    )


# -- 4. torch.func between forward and backward --------------------------------------


def test_functional_call_between_forward_and_backward_leaves_grads_masked() -> None:
    torch.manual_seed(0)
    model = small_mlp()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    sparsifier = st.sparsify(model, optimizer, **RIGL)
    teacher = {k: torch.randn_like(v) for k, v in model.named_parameters()}
    for x, y in small_batches(6):
        optimizer.zero_grad()
        out = model(x)
        with torch.no_grad():  # a teacher pass through the same module
            t = torch.func.functional_call(model, teacher, (x,))
        # The teacher's weights go through the masks too.
        w = teacher["0.parametrizations.weight.original"] * sparsifier.masks["0.weight"]
        hidden = torch.relu(nn.functional.linear(x, w, teacher["0.bias"]))
        w2 = (
            teacher["2.parametrizations.weight.original"] * sparsifier.masks["2.weight"]
        )
        assert torch.allclose(t, nn.functional.linear(hidden, w2, teacher["2.bias"]))
        nn.functional.cross_entropy(out, y).backward()
        check_invariants(sparsifier, optimizer, model=model, grads=True)
        optimizer.step()
        check_invariants(sparsifier, optimizer, model=model)
    assert sparsifier.update_count == 3


def test_torch_func_grad_gives_masked_gradients() -> None:
    torch.manual_seed(0)
    model = small_mlp()
    sparsifier = st.sparsify(model, policy="static", sparsity=0.75)
    params = {k: v.detach() for k, v in model.named_parameters()}
    x, y = small_batches(1)[0]
    grads = torch.func.grad(
        lambda p: nn.functional.cross_entropy(
            torch.func.functional_call(model, p, (x,)), y
        )
    )(params)
    for fqn in sparsifier.masks:
        key = fqn.replace(".weight", ".parametrizations.weight.original")
        assert int(grads[key][~sparsifier.masks[fqn]].count_nonzero()) == 0


def test_maml_with_computed_weights_trains_masked() -> None:
    torch.manual_seed(0)
    model = small_mlp()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    sparsifier = st.sparsify(model, optimizer, **RIGL)
    for x, y in small_batches(4):
        optimizer.zero_grad()
        params = dict(model.named_parameters())
        inner = torch.autograd.grad(
            loss(model, x, y), list(params.values()), create_graph=True
        )
        fast = {k: v - 0.1 * g for (k, v), g in zip(params.items(), inner, strict=True)}
        out = torch.func.functional_call(model, fast, (x,))
        nn.functional.cross_entropy(out, y).backward()
        check_invariants(sparsifier, optimizer, model=model, grads=True)
        optimizer.step()
        check_invariants(sparsifier, optimizer, model=model)


def test_assigning_a_sparsified_weight_raises_with_the_stored_name() -> None:
    model = nn.Sequential(nn.Linear(4, 4))
    st.sparsify(model, policy="static", sparsity=0.5)
    before = model[0].weight.clone()
    with pytest.raises(RuntimeError, match=r"parametrizations.<name>.original"):
        torch.func.functional_call(
            model, {"0.weight": torch.ones(4, 4)}, (torch.ones(1, 4),)
        )
    assert torch.equal(model[0].weight, before)


@pytest.mark.parametrize("transform", ["vmap", "jit.trace"])
def test_vmap_and_jit_trace_under_sparse_execution_run_the_plain_call(
    transform: str,
) -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 4))
    st.sparsify(model, policy="static", sparsity=0.9, execution="sparse")
    x = torch.randn(5, 3, 64)
    expected = torch.stack([model(xi) for xi in x])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if transform == "vmap":
            got = torch.func.vmap(model)(x)
        else:
            traced = torch.jit.trace(model, x[0])
            got = torch.stack([traced(xi) for xi in x])
    assert torch.allclose(got, expected, atol=1e-6)


# -- 5. and 6. schedules that never update, copies ------------------------------------


def test_a_dynamic_schedule_that_never_updates_warns() -> None:
    model = small_mlp()
    with pytest.warns(UserWarning) as record:
        st.sparsify(model, policy="rigl", total_steps=50)
    assert_expected_inline(
        str(record[0].message),
        """\
total_steps=50 leaves no step for topology updates: they stop at end_step=37, but the first update would come at step 100 (update_interval=100, begin_step=0), so the masks never change.
Pass a smaller update_interval, or a larger total_steps or end_step; for a fixed mask, say policy="static".""",
    )
    assert record[0].filename == __file__


def test_set_total_steps_moves_the_end_and_warns_when_nothing_updates() -> None:
    model = small_mlp()
    sparsifier = st.sparsify(model, policy="set", total_steps=1000)
    sparsifier.set_total_steps(4000)
    assert sparsifier.schedule.end_step == 3000
    with pytest.warns(UserWarning, match="leaves no step"):
        sparsifier.set_total_steps(100)


def test_copying_or_pickling_a_sparsifier_raises() -> None:
    model = small_mlp()
    sparsifier = st.sparsify(model, policy="static", sparsity=0.5)
    with pytest.raises(TypeError, match="cannot be copied"):
        copy.deepcopy(sparsifier)
    with pytest.raises(TypeError, match="cannot be pickled"):
        pickle.dumps(sparsifier)
    copied = copy.deepcopy(model)  # the model still copies, masks and all
    x = torch.randn(2, 12)
    assert torch.equal(copied(x), model(x))


def test_a_deep_copied_model_masks_its_own_gradients() -> None:
    torch.manual_seed(0)
    model = small_mlp()
    sparsifier = st.sparsify(model, policy="static", sparsity=0.75)
    copied = copy.deepcopy(model)
    x, y = small_batches(1)[0]
    loss(copied, x, y).backward()
    mask = sparsifier.masks["0.weight"]
    grad = copied[0].parametrizations.weight.original.grad
    assert grad is not None and int(grad[~mask].count_nonzero()) == 0
    assert model[0].parametrizations.weight.original.grad is None


# -- tensors that get no gradient ----------------------------------------------------


class Branchy(nn.Module):
    """Two experts; ``route`` picks which ones run."""

    def __init__(self) -> None:
        super().__init__()
        self.inp = nn.Linear(12, 16)
        self.a = nn.Linear(16, 6)
        self.b = nn.Linear(16, 6)
        self.route = "a"

    def forward(self, x: Tensor) -> Tensor:
        h = torch.relu(self.inp(x))
        return self.a(h) if self.route == "a" else self.a(h) + self.b(h)


def test_an_expert_without_gradient_sits_out_the_update() -> None:
    torch.manual_seed(0)
    model = Branchy()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    sparsifier = st.sparsify(model, optimizer, **RIGL)
    before = sparsifier.masks["b.weight"].clone()
    for x, y in small_batches(4):  # b never runs
        optimizer.zero_grad()
        loss(model, x, y).backward()
        optimizer.step()
        check_invariants(sparsifier, optimizer, model=model)
    assert sparsifier.update_count == 2
    assert torch.equal(sparsifier.masks["b.weight"], before)
    assert sparsifier.missed_updates == {"b.weight": 2}
    assert_expected_inline(
        sparsifier.summary().splitlines()[-1],
        """not updated: b.weight sat out 2 update(s) (no gradient, or frozen)""",
    )
    model.route = "ab"
    for x, y in small_batches(2):
        optimizer.zero_grad()
        loss(model, x, y).backward()
        optimizer.step()
    assert not torch.equal(sparsifier.masks["b.weight"], before)


def test_a_layer_frozen_after_sparsify_keeps_its_weights_under_set() -> None:
    torch.manual_seed(0)
    model = small_mlp()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    sparsifier = st.sparsify(model, optimizer, policy="set", **RIGL)
    model[0].parametrizations.weight.original.requires_grad_(False)
    weight = model[0].weight.clone()
    for x, y in small_batches(4):
        optimizer.zero_grad()
        loss(model, x, y).backward()
        optimizer.step()
    assert torch.equal(model[0].weight, weight)
    assert sparsifier.missed_updates == {"0.weight": 2}


def test_update_by_hand_needs_captured_gradients() -> None:
    torch.manual_seed(0)
    model = small_mlp()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    sparsifier = st.sparsify(model, optimizer, **{**RIGL, "update_interval": 10})
    masks = {f: m.clone() for f, m in sparsifier.masks.items()}
    x, y = small_batches(1)[0]
    loss(model, x, y).backward()
    with pytest.raises(RuntimeError) as info:
        sparsifier.update()
    assert_expected_inline(
        str(info.value),
        """\
RigL grows where the dense gradient is largest, which sparsetorch keeps only in the backward pass before a scheduled update (the next is at step 10); none was kept for this one.
To update by hand, call sparsifier.capture_dense_grads() before the backward pass, then sparsifier.update().""",
    )
    assert all(torch.equal(sparsifier.masks[f], m) for f, m in masks.items())
    sparsifier.capture_dense_grads()
    optimizer.zero_grad()
    loss(model, x, y).backward()
    assert sparsifier.update()
    assert sparsifier.update_count == 1
    assert not all(torch.equal(sparsifier.masks[f], m) for f, m in masks.items())


# -- uninitialized, empty, removed -----------------------------------------------------


def test_lazy_linear_asks_for_a_forward_first_and_changes_nothing() -> None:
    model = nn.Sequential(nn.LazyLinear(8), nn.ReLU(), nn.Linear(8, 2))
    with pytest.raises(ValueError) as info:
        st.sparsify(model, policy="static", sparsity=0.5)
    assert_expected_inline(
        str(info.value),
        """\
'0.weight' is not initialized yet (lazy modules such as nn.LazyLinear learn their shapes at the first forward).
Run the model once on a batch, then sparsify: model(example_input); sparsify(model, ...).""",
    )
    assert not hasattr(model[2], "parametrizations")
    model(torch.randn(2, 5))
    sparsifier = st.sparsify(
        model, policy="static", sparsity=0.5, distribution="uniform"
    )
    assert int(sparsifier.masks["0.weight"].sum()) == 20


def test_meta_parameters_are_refused() -> None:
    with torch.device("meta"):
        model = nn.Sequential(nn.Linear(4, 4))
    with pytest.raises(ValueError, match="meta device"):
        st.sparsify(model, policy="static", sparsity=0.5)


def test_a_zero_size_layer_is_skipped_with_a_note() -> None:
    model = nn.Sequential(nn.Linear(8, 0), nn.Linear(0, 4), nn.Linear(8, 4))
    sparsifier = st.sparsify(model, policy="static", sparsity=0.5)
    assert list(sparsifier.masks) == ["2.weight"]
    assert_expected_inline(
        str(sparsifier.summary()),
        """\
tensor    shape   target  actual     active      numel
2.weight  (4, 8)  0.5000  0.5000         16         32
total             0.5000  0.5000         16         32
skipped: 0.weight (no elements, dense)
skipped: 1.weight (no elements, dense)""",
    )


def test_print_after_remove_and_other_calls_after_remove() -> None:
    model = small_mlp()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    sparsifier = st.sparsify(model, optimizer, **RIGL)
    sparsifier.remove()
    assert_expected_inline(repr(sparsifier), """Sparsifier(removed)""")
    assert_expected_inline(
        sparsifier.summary(),
        """(removed: the masks are baked into the model's weights)""",
    )
    with pytest.raises(RuntimeError, match="was removed"):
        sparsifier.update()
    x, y = small_batches(1)[0]
    loss(model, x, y).backward()
    optimizer.step()  # a plain model now: no hook of sparsetorch's runs
    assert sparsifier.step_count == 0


# -- smaller promises ------------------------------------------------------------------


def test_strict_false_reports_the_dense_names() -> None:
    model = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 2))
    st.sparsify(model, policy="static", sparsity=0.5)
    state = model.state_dict()
    del state["0.weight"]
    state["extra"] = torch.zeros(1)
    result = model.load_state_dict(state, strict=False)
    assert result.missing_keys == ["0.weight"]
    assert result.unexpected_keys == ["extra"]
    with pytest.raises(RuntimeError) as info:
        model.load_state_dict(state)
    assert '"0.weight"' in str(info.value)
    assert "parametrizations" not in str(info.value)


def test_rprop_grown_weights_restart_with_the_initial_step_size() -> None:
    torch.manual_seed(0)
    model = small_mlp()
    optimizer = torch.optim.Rprop(model.parameters(), lr=0.01)
    sparsifier = st.sparsify(model, optimizer, **RIGL)
    for x, y in small_batches(4):
        before = {f: m.clone() for f, m in sparsifier.masks.items()}
        optimizer.zero_grad()
        loss(model, x, y).backward()
        optimizer.step()
        for fqn, p in sparsifier.topology.params.items():
            mask = sparsifier.masks[fqn]
            step_size = optimizer.state[p]["step_size"]
            assert torch.equal(
                step_size[~mask], torch.full_like(step_size[~mask], 0.01)
            )
            grown = mask & ~before[fqn]
            assert torch.equal(
                step_size[grown], torch.full_like(step_size[grown], 0.01)
            )
            assert int(optimizer.state[p]["prev"][~mask].count_nonzero()) == 0
    assert sparsifier.update_count == 2


def test_adagrad_state_outside_masks_is_its_initial_value() -> None:
    torch.manual_seed(0)
    model = small_mlp()
    optimizer = torch.optim.Adagrad(
        model.parameters(), lr=0.01, initial_accumulator_value=0.1
    )
    sparsifier = st.sparsify(model, optimizer, **RIGL)
    for x, y in small_batches(4):
        optimizer.zero_grad()
        loss(model, x, y).backward()
        optimizer.step()
        for fqn, p in sparsifier.topology.params.items():
            acc = optimizer.state[p]["sum"][~sparsifier.masks[fqn]]
            assert torch.equal(acc, torch.full_like(acc, 0.1))
    assert sparsifier.update_count == 2


@pytest.mark.skipif(not hasattr(torch.optim, "Muon"), reason="torch without Muon")
def test_muon_writes_outside_the_masks_and_is_remasked() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Linear(12, 24, bias=False), nn.ReLU(), nn.Linear(24, 6, bias=False)
    )
    optimizer = torch.optim.Muon(model.parameters(), lr=0.02)
    sparsifier = st.sparsify(model, optimizer, **RIGL)
    for x, y in small_batches(4):
        optimizer.zero_grad()
        loss(model, x, y).backward()
        optimizer.step()
        check_invariants(sparsifier, optimizer, model=model)
    assert sparsifier.update_count == 2


def test_attach_optimizer_errors_change_nothing() -> None:
    model = small_mlp()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    sparsifier = st.sparsify(model, optimizer, **RIGL)
    other = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(RuntimeError, match="already counts the steps"):
        sparsifier.attach_optimizer(other)
    with pytest.raises(ValueError, match="holds none of the masked weights"):
        sparsifier.attach_optimizer(torch.optim.SGD(nn.Linear(2, 2).parameters(), lr=1))
    with pytest.raises(TypeError, match="got int"):
        sparsifier.attach_optimizer(3)
    assert sparsifier.optimizers == [optimizer]
    assert len(other._optimizer_step_pre_hooks) == 0


def test_attach_unwraps_framework_wrappers() -> None:
    class Wrapped:  # the shape of Accelerate's AcceleratedOptimizer
        def __init__(self, optimizer: torch.optim.Optimizer) -> None:
            self.optimizer = optimizer

    class Lightningish:  # and of Lightning's LightningOptimizer
        def __init__(self, optimizer: Any) -> None:
            self._optimizer = optimizer

    torch.manual_seed(0)
    model = small_mlp()
    sparsifier = st.sparsify(model, policy="rigl", **RIGL)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    sparsifier.attach_optimizer(Lightningish(Wrapped(optimizer)))
    assert sparsifier.optimizers == [optimizer]
    for x, y in small_batches(4):
        optimizer.zero_grad()
        loss(model, x, y).backward()
        optimizer.step()
    assert sparsifier.step_count == 4 and sparsifier.update_count == 2


def test_adafactor_keeps_weights_zero_outside_the_masks() -> None:
    torch.manual_seed(0)
    model = small_mlp()
    optimizer = torch.optim.Adafactor(model.parameters(), lr=1e-2)
    sparsifier = st.sparsify(model, optimizer, **RIGL)
    for x, y in small_batches(4):
        optimizer.zero_grad()
        loss(model, x, y).backward()
        optimizer.step()
        params = sparsifier.topology.params
        assert outside(sparsifier, dict(params)) == 0
    assert sparsifier.update_count == 2


def test_load_with_assign_moves_the_gradient_hooks_to_the_new_tensor() -> None:
    torch.manual_seed(0)
    model = small_mlp()
    sparsifier = st.sparsify(model, policy="static", sparsity=0.75)
    state = {k: v.clone() + 1 for k, v in model.state_dict().items()}
    model.load_state_dict(state, assign=True)
    stored = model[0].parametrizations.weight.original
    assert stored is sparsifier.topology.params["0.weight"]
    x, y = small_batches(1)[0]
    loss(model, x, y).backward()
    mask = sparsifier.masks["0.weight"]
    assert stored.grad is not None and int(stored.grad[~mask].count_nonzero()) == 0
    assert int(stored[~mask].count_nonzero()) == 0


def test_attach_to_count_after_a_restored_step_count_but_not_after_manual_steps() -> (
    None
):
    torch.manual_seed(0)
    model = small_mlp()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    sparsifier = st.sparsify(model, optimizer, **RIGL)
    for x, y in small_batches(3):
        optimizer.zero_grad()
        loss(model, x, y).backward()
        optimizer.step()
    state = sparsifier.state_dict()
    resumed = st.sparsify(small_mlp(), policy="rigl", **RIGL)
    resumed.load_state_dict(state)  # Lightning restores before it builds optimizers
    late = torch.optim.SGD(resumed.topology.model.parameters(), lr=0.05)
    resumed.attach_optimizer(late)  # counts on from step 3
    assert resumed.step_count == 3
    manual = st.sparsify(small_mlp(), policy="rigl", **RIGL)
    manual.step()
    with pytest.raises(RuntimeError, match="counted 1 steps by hand"):
        manual.attach_optimizer(
            torch.optim.SGD(manual.topology.model.parameters(), lr=0.1)
        )
