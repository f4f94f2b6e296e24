"""Sparsifier and sparsify(): the invariants of DESIGN.md, checkpoints, display."""

from __future__ import annotations

import io
import itertools
from collections.abc import Callable

import pytest
import torch
from conftest import batch, check_invariants, cnn, mlp, train_step
from expecttest import assert_expected_inline
from torch import nn

import sparsetorch as st

OPTIMIZERS: dict[str, Callable[[nn.Module], torch.optim.Optimizer]] = {
    "sgd": lambda m: torch.optim.SGD(m.parameters(), lr=0.05, momentum=0.9),
    "adam": lambda m: torch.optim.Adam(m.parameters(), lr=1e-3),
    "adamw-amsgrad": lambda m: torch.optim.AdamW(m.parameters(), lr=1e-3, amsgrad=True),
}


@pytest.mark.parametrize("policy", ["rigl", "set", "static"])
@pytest.mark.parametrize("opt", sorted(OPTIMIZERS))
@pytest.mark.parametrize("structure", [None, "constant-fan-in"])
def test_invariants_hold_after_every_step(
    policy: str, opt: str, structure: str | None
) -> None:
    model = cnn()
    optimizer = OPTIMIZERS[opt](model)
    sparsifier = st.sparsify(
        model,
        optimizer,
        policy=policy,
        sparsity=0.8,
        total_steps=40,
        update_interval=4,
        structure=structure,
    )
    x, y = batch(model)
    check_invariants(sparsifier, optimizer)
    for _ in range(30):
        train_step(model, optimizer, x, y)
        check_invariants(sparsifier, optimizer)
    assert sparsifier.update_count == (7 if policy != "static" else 0)


def test_total_active_matches_requested_sparsity_within_one_per_tensor() -> None:
    model = cnn()
    sparsifier = st.sparsify(model, policy="static", sparsity=0.9, distribution="erk")
    numel = sum(m.numel() for m in sparsifier.masks.values())
    active = sum(int(m.sum()) for m in sparsifier.masks.values())
    assert abs(active - 0.1 * numel) <= len(sparsifier.masks)


def test_masks_change_only_at_scheduled_steps() -> None:
    model = mlp()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    sparsifier = st.sparsify(
        model,
        optimizer,
        sparsity=0.7,
        update_interval=3,
        begin_step=5,
        end_step=20,
        drop_schedule="constant",
    )
    x, y = batch(model)
    changed_at = []
    for step in range(1, 31):
        before = {k: m.clone() for k, m in sparsifier.masks.items()}
        train_step(model, optimizer, x, y)
        if any(not torch.equal(before[k], m) for k, m in sparsifier.masks.items()):
            changed_at.append(step)
    assert changed_at == [6, 9, 12, 15, 18]


def test_dense_gradient_is_kept_only_for_the_update_step() -> None:
    model = mlp()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    sparsifier = st.sparsify(
        model, optimizer, sparsity=0.7, update_interval=4, end_step=20
    )
    x, y = batch(model)
    parametrizations = sparsifier.topology.parametrizations.values()
    for step in range(1, 13):
        optimizer.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        captured = [p.dense_grad is not None for p in parametrizations]
        assert all(captured) == (step % 4 == 0), step
        assert any(captured) == (step % 4 == 0), step
        optimizer.step()
        assert all(p.dense_grad is None for p in parametrizations)


def test_grown_weights_start_at_grow_init_with_reset_optimizer_state() -> None:
    model = mlp()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    sparsifier = st.sparsify(
        model, optimizer, sparsity=0.7, update_interval=5, end_step=50, grow_init=0.25
    )
    x, y = batch(model)
    for _ in range(5):
        before = {k: m.clone() for k, m in sparsifier.masks.items()}
        train_step(model, optimizer, x, y)
    assert sparsifier.update_count == 1
    total_grown = 0
    for fqn, mask in sparsifier.masks.items():
        param = sparsifier.topology.params[fqn]
        grown, dropped = mask & ~before[fqn], before[fqn] & ~mask
        assert int(grown.sum()) == int(dropped.sum())
        total_grown += int(grown.sum())
        assert torch.all(param[grown] == 0.25)
        assert torch.all(optimizer.state[param]["momentum_buffer"][grown] == 0)
    assert total_grown > 0


def run(
    policy: str,
    steps: int,
    checkpoint_at: int | None = None,
    order: tuple[str, ...] = ("model", "optimizer", "sparsifier"),
) -> dict[str, torch.Tensor]:
    """Train ``steps`` steps; optionally checkpoint and resume in fresh objects."""

    def build() -> tuple[nn.Module, torch.optim.Optimizer, st.Sparsifier]:
        torch.manual_seed(0)
        model = cnn()
        optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
        sparsifier = st.sparsify(
            model,
            optimizer,
            policy=policy,
            sparsity=0.8,
            total_steps=40,
            update_interval=3,
            seed=7,
        )
        return model, optimizer, sparsifier

    model, optimizer, sparsifier = build()
    g = torch.Generator().manual_seed(5)
    data = [
        (torch.randn(8, 3, 8, 8, generator=g), torch.randint(0, 4, (8,), generator=g))
        for _ in range(steps)
    ]
    for i, (x, y) in enumerate(data):
        if i == checkpoint_at:
            buffer = io.BytesIO()
            torch.save(
                {
                    "model": model.state_dict(),
                    "optimizer": optimizer.state_dict(),
                    "sparsifier": sparsifier.state_dict(),
                },
                buffer,
            )
            buffer.seek(0)
            ckpt = torch.load(buffer, weights_only=True)
            model, optimizer, sparsifier = build()
            objects = {"model": model, "optimizer": optimizer, "sparsifier": sparsifier}
            for name in order:
                objects[name].load_state_dict(ckpt[name])  # type: ignore[attr-defined]
        train_step(model, optimizer, x, y)
    return {k: v.clone() for k, v in model.state_dict().items()} | {
        f"mask:{k}": m.clone() for k, m in sparsifier.masks.items()
    }


@pytest.mark.parametrize("policy", ["rigl", "set"])
def test_resume_is_bit_exact_in_every_load_order(policy: str) -> None:
    reference = run(policy, 20)
    for order in itertools.permutations(["model", "optimizer", "sparsifier"]):
        # Checkpoint at step 8: the next step (9) is an update step.
        resumed = run(policy, 20, checkpoint_at=8, order=order)
        assert resumed.keys() == reference.keys()
        for key in reference:
            assert torch.equal(resumed[key], reference[key]), (order, key)


def test_state_dict_is_plain_data() -> None:
    model = mlp()
    sparsifier = st.sparsify(model, policy="set", total_steps=10)
    buffer = io.BytesIO()
    torch.save(sparsifier.state_dict(), buffer)
    buffer.seek(0)
    state = torch.load(buffer, weights_only=True)
    assert sorted(state) == [
        "active",
        "format_version",
        "generator",
        "masks",
        "policy_state",
        "settings",
        "step",
        "updates",
    ]


def test_manual_step_without_optimizer() -> None:
    model = mlp()
    sparsifier = st.sparsify(model, policy="set", update_interval=2, end_step=10)
    assert [sparsifier.step() for _ in range(6)] == [False, True] * 3
    assert sparsifier.step_count == 6


def test_optimizer_built_before_sparsify_stays_valid() -> None:
    model = mlp()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    st.sparsify(model, optimizer, policy="static")
    x, y = batch(model)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    train_step(model, optimizer, x, y)
    assert any(not torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_summary_table() -> None:
    model = cnn()
    sparsifier = st.sparsify(model, policy="static", sparsity=0.9)
    assert_expected_inline(
        str(sparsifier),
        """\
Sparsifier(policy=Static(), step=0, updates=0, next_update=none)
tensor    shape         target  actual     active      numel
0.weight  (8, 3, 3, 3)  0.9400  0.9398         13        216
3.weight  (8, 8, 3, 3)  0.9709  0.9705         17        576
6.weight  (4, 128)      0.8034  0.8027        101        512
total                   0.9000  0.8995        131       1304""",
    )


def test_repr_names_the_next_update() -> None:
    model = mlp()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    sparsifier = st.sparsify(
        model,
        optimizer,
        sparsity=0.5,
        distribution="uniform",
        total_steps=100,
        update_interval=30,
    )
    assert_expected_inline(
        repr(sparsifier),
        """\
Sparsifier(policy=RigL(), step=0, updates=0, next_update=30)
tensor    shape     target  actual     active      numel
0.weight  (32, 20)  0.5000  0.5000        320        640
2.weight  (16, 32)  0.5000  0.5000        256        512
4.weight  (4, 16)   0.5000  0.5000         32         64
total               0.5000  0.5000        608       1216""",
    )


def assert_unchanged(model: nn.Module, before: dict[str, torch.Tensor]) -> None:
    assert list(model.state_dict()) == list(before)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    assert not any(hasattr(m, "parametrizations") for m in model.modules())


@pytest.mark.parametrize("sparsity", [-0.1, 1.0, 1.5])
def test_sparsity_out_of_range(sparsity: float) -> None:
    model = mlp()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match="sparsity must be in"):
        st.sparsify(model, policy="static", sparsity=sparsity)
    assert_unchanged(model, before)


def test_sparsity_error_message() -> None:
    with pytest.raises(ValueError) as error:
        st.sparsify(mlp(), sparsity=90)
    assert_expected_inline(
        str(error.value),
        """\
sparsity must be in [0, 1), got 90.
It is the fraction of zeros: 0.9 keeps 10% of the weights.""",
    )


def test_dynamic_policy_needs_total_steps() -> None:
    model = mlp()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError) as error:
        st.sparsify(model, policy="set")
    assert_expected_inline(
        str(error.value),
        """\
policy SET updates the topology, so it needs to know when to stop.
Pass total_steps=len(loader) * epochs (end_step defaults to 75% of it), or end_step=.""",
    )
    assert_unchanged(model, before)


def test_end_step_defaults_to_three_quarters_of_total_steps() -> None:
    sparsifier = st.sparsify(mlp(), policy="rigl", total_steps=1000)
    assert sparsifier.schedule.end_step == 750


def test_sparsifying_twice_raises_and_changes_nothing() -> None:
    model = mlp()
    sparsifier = st.sparsify(model, policy="static", sparsity=0.5)
    masks = {k: m.clone() for k, m in sparsifier.masks.items()}
    with pytest.raises(ValueError) as error:
        st.sparsify(model, policy="static", sparsity=0.9)
    assert_expected_inline(
        str(error.value),
        """\
'0.weight' is already sparsified: a model can be sparsified once.
Call sparsifier.remove() first, or keep using the existing sparsifier.""",
    )
    assert all(torch.equal(m, masks[k]) for k, m in sparsifier.masks.items())


def test_optimizer_that_does_not_hold_the_model() -> None:
    model = mlp()
    other = torch.optim.SGD(mlp().parameters(), lr=0.1)
    with pytest.raises(ValueError) as error:
        st.sparsify(model, other, policy="static")
    assert_expected_inline(
        str(error.value),
        """\
The optimizer does not hold the parameters ['0.weight', '2.weight', '4.weight'].
Pass the optimizer built over model.parameters().""",
    )


def test_checkpoint_with_other_tensors_or_counts_raises() -> None:
    a = st.sparsify(mlp(), policy="static", sparsity=0.5)
    b = st.sparsify(cnn(), policy="static", sparsity=0.5)
    with pytest.raises(ValueError) as error:
        a.load_state_dict(b.state_dict())
    assert_expected_inline(
        str(error.value),
        """\
The checkpoint's tensors do not match this sparsifier's.
missing from the checkpoint: ['2.weight', '4.weight']
unexpected in the checkpoint: ['3.weight', '6.weight']""",
    )
    c = st.sparsify(mlp(), policy="static", sparsity=0.9)
    with pytest.raises(ValueError) as error:
        a.load_state_dict(c.state_dict())
    assert_expected_inline(
        str(error.value),
        """\
The checkpoint was made with other settings:
sparsities: checkpoint {'0.weight': 0.9176666666666666, '2.weight': 0.905, '4.weight': 0.6833333333333335}, this sparsifier {'0.weight': 0.5579999999999999, '2.weight': 0.49, '4.weight': 0.0}
Build the sparsifier with the checkpoint's settings.""",
    )
    state = a.state_dict()
    state["masks"]["extra.weight"] = state["masks"]["0.weight"]
    with pytest.raises(ValueError) as error:
        a.load_state_dict(state)
    assert_expected_inline(
        str(error.value),
        """\
The checkpoint's tensors do not match this sparsifier's.
missing from the checkpoint: []
unexpected in the checkpoint: ['extra.weight']""",
    )


def test_apply_masks_clears_weights_and_optimizer_state_written_outside_the_masks() -> (
    None
):
    model = mlp()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    sparsifier = st.sparsify(model, optimizer, policy="static", sparsity=0.7)
    x, y = batch(model)
    train_step(model, optimizer, x, y)
    with torch.no_grad():
        for param in sparsifier.topology.params.values():
            param.fill_(1.0)  # e.g. nn.init on module.weight writes through
            optimizer.state[param]["momentum_buffer"].fill_(1.0)
    sparsifier.apply_masks()
    check_invariants(sparsifier, optimizer, model=model)
    for fqn, mask in sparsifier.masks.items():
        assert torch.all(sparsifier.topology.params[fqn][mask] == 1.0)
