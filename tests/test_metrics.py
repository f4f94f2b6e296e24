"""Mask dynamics (sparsetorch/metrics.py): mask change per update and the ITOP rate.

Reference values are computed here from the definitions, apart from the library:
mask change = weights active after an update and not before, over the active
weights after it; ITOP (Liu et al. 2021) = weights ever active over all weights
of the masked tensors.
"""

from __future__ import annotations

import io
from typing import Any

import pytest
import torch
from conftest import batch, mlp, train_step
from expecttest import assert_expected_inline
from torch import Tensor, nn

import sparsetorch as st
from sparsetorch.metrics import MaskMetrics, MaskUpdate


def test_record_counts_grown_and_active_exactly() -> None:
    a_old = torch.tensor([[1, 1, 0], [0, 1, 0]], dtype=torch.bool)
    a_new = torch.tensor([[1, 0, 1], [0, 1, 1]], dtype=torch.bool)
    b = torch.tensor([1, 0, 0, 1], dtype=torch.bool)
    metrics = MaskMetrics({"a": a_old, "b": b})
    assert metrics.total_mask_change() == 0.0
    assert metrics.total_itop() is None
    metrics.track_itop({"a": a_old, "b": b})
    assert metrics.total_itop() == 5 / 10
    metrics.record(5, {"a": a_old, "b": b}, {"a": a_new})
    # a: grown (0, 2) and (1, 2): 2 of 4 active; b unchanged: 0 of 2
    assert metrics.mask_change() == {"a": 2 / 4, "b": 0.0}
    assert metrics.total_mask_change() == 2 / 6
    # ever active: a 5 of 6 (all but (1, 0)), b 2 of 4
    assert metrics.itop() == {"a": 5 / 6, "b": 2 / 4}
    assert metrics.total_itop() == 7 / 10
    assert metrics.history == [MaskUpdate(5, 2, 6, 7, 10)]
    assert (metrics.history[0].mask_change, metrics.history[0].itop) == (1 / 3, 0.7)


def test_record_leaves_the_masks_it_reads_unchanged() -> None:
    old = {"a": torch.tensor([True, False])}
    new = {"a": torch.tensor([False, True])}
    copies = {k: v.clone() for k, v in (*old.items(), *new.items())}
    metrics = MaskMetrics(old)
    metrics.track_itop(old)
    metrics.record(1, old, new)
    assert torch.equal(old["a"], torch.tensor([True, False]))
    assert torch.equal(new["a"], copies["a"])
    assert torch.equal(metrics.ever["a"], torch.tensor([True, True]))  # type: ignore[index]


class Reference:
    """Mask change and ITOP from snapshots of the masks around each step."""

    def __init__(self, masks: dict[str, Tensor]) -> None:
        self.ever = {f: m.clone() for f, m in masks.items()}
        self.numel = sum(m.numel() for m in masks.values())
        self.history: list[tuple[int, float, float]] = []

    def after_update(
        self, step: int, before: dict[str, Tensor], after: dict[str, Tensor]
    ) -> None:
        grown = sum(int((after[f] & ~before[f]).sum()) for f in after)
        active = sum(int(m.sum()) for m in after.values())
        self.ever = {f: self.ever[f] | after[f] for f in after}
        itop = sum(int(e.sum()) for e in self.ever.values()) / self.numel
        self.history.append((step, grown / active, itop))


def run(
    sparsifier: st.Sparsifier,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    steps: range,
    reference: Reference | None = None,
) -> None:
    x, y = batch(model)
    for step in steps:
        before = {f: m.clone() for f, m in sparsifier.masks.items()}
        updates = sparsifier.update_count
        train_step(model, optimizer, x[step % 4 :: 4], y[step % 4 :: 4])
        if reference is not None and sparsifier.update_count != updates:
            after = {f: m.clone() for f, m in sparsifier.masks.items()}
            reference.after_update(step + 1, before, after)


def sparse_run(policy: str = "set") -> tuple[nn.Module, Any, st.Sparsifier]:
    model = mlp()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    sparsifier = st.sparsify(
        model,
        optimizer,
        policy=policy,
        sparsity=0.8,
        total_steps=40,
        update_interval=5,
        drop_fraction=0.5,
    )
    return model, optimizer, sparsifier


@pytest.mark.parametrize("policy", ["set", "rigl"])
def test_sparsifier_records_each_update_as_the_definitions_say(policy: str) -> None:
    model, optimizer, sparsifier = sparse_run(policy)
    sparsifier.track_itop()
    reference = Reference(dict(sparsifier.masks))
    run(sparsifier, model, optimizer, range(40), reference)
    history = sparsifier.mask_history
    assert sparsifier.update_count == 5  # after 5, 10, ..., 25 < end_step 30
    assert [(u.step, u.mask_change, u.itop) for u in history] == reference.history
    assert all(u.mask_change > 0 for u in history)
    metrics = sparsifier.metrics()
    assert metrics == {
        "sparsity/sparsity": 1 - sum(sparsifier.topology.targets.values()) / 1216,
        "sparsity/mask_change": reference.history[-1][1],
        "sparsity/updates": 5.0,
        "sparsity/itop": reference.history[-1][2],
    }


def test_per_tensor_metrics() -> None:
    model, optimizer, sparsifier = sparse_run()
    sparsifier.track_itop()
    initial = {f: m.clone() for f, m in sparsifier.masks.items()}
    run(sparsifier, model, optimizer, range(4))
    before = {f: m.clone() for f, m in sparsifier.masks.items()}
    run(sparsifier, model, optimizer, range(4, 5))  # the update after step 5
    masks = sparsifier.masks
    metrics = sparsifier.metrics(per_tensor=True)
    for fqn, mask in masks.items():
        grown = int((mask & ~before[fqn]).sum()) / int(mask.sum())
        ever = int((mask | initial[fqn]).sum()) / mask.numel()
        assert metrics[f"sparsity/mask_change/{fqn}"] == grown
        assert metrics[f"sparsity/itop/{fqn}"] == ever
    assert sorted(metrics) == sorted(
        [
            "sparsity/sparsity",
            "sparsity/mask_change",
            "sparsity/updates",
            "sparsity/itop",
            *(f"sparsity/{k}/{f}" for k in ("mask_change", "itop") for f in masks),
        ]
    )


def test_itop_is_opt_in_and_starts_from_the_current_masks() -> None:
    model, optimizer, sparsifier = sparse_run()
    assert "sparsity/itop" not in sparsifier.metrics()
    run(sparsifier, model, optimizer, range(5))
    sparsifier.track_itop()
    active = sum(int(m.sum()) for m in sparsifier.masks.values())
    assert sparsifier.metrics()["sparsity/itop"] == active / 1216
    sparsifier.track_itop()  # again: nothing restarts
    run(sparsifier, model, optimizer, range(5, 10))
    assert sparsifier.metrics()["sparsity/itop"] > active / 1216
    itop = sparsifier.metrics()["sparsity/itop"]
    sparsifier.track_itop()
    assert sparsifier.metrics()["sparsity/itop"] == itop


def test_static_policy_has_no_updates() -> None:
    model = mlp()
    sparsifier = st.sparsify(model, policy="static", sparsity=0.5)
    sparsifier.track_itop()
    assert sparsifier.metrics() == {
        "sparsity/sparsity": 0.5,
        "sparsity/mask_change": 0.0,
        "sparsity/updates": 0.0,
        "sparsity/itop": 0.5,
    }
    assert sparsifier.mask_history == []


# -- checkpoints ---------------------------------------------------------------------


def save(obj: Any) -> Any:
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=True)


@pytest.mark.parametrize("order", ["track_then_load", "load_only", "load_then_track"])
def test_resume_keeps_itop_and_the_history_exact(order: str) -> None:
    model, optimizer, sparsifier = sparse_run()
    sparsifier.track_itop()
    run(sparsifier, model, optimizer, range(13))
    checkpoint = save(
        {
            "model": model.state_dict(),
            "optimizer": optimizer.state_dict(),
            "sparsity": sparsifier.state_dict(),
        }
    )
    run(sparsifier, model, optimizer, range(13, 40))

    model2, optimizer2, sparsifier2 = sparse_run()
    if order == "track_then_load":
        sparsifier2.track_itop()
    model2.load_state_dict(checkpoint["model"])
    optimizer2.load_state_dict(checkpoint["optimizer"])
    sparsifier2.load_state_dict(checkpoint["sparsity"])
    if order == "load_then_track":
        sparsifier2.track_itop()  # already on: the checkpoint had ITOP masks
    run(sparsifier2, model2, optimizer2, range(13, 40))
    assert sparsifier2.metrics(per_tensor=True) == sparsifier.metrics(per_tensor=True)
    assert sparsifier2.mask_history == sparsifier.mask_history
    assert len(sparsifier.mask_history) == 5
    assert sparsifier.mask_history[-1].itop is not None


def test_checkpoint_without_metrics_still_loads() -> None:
    model, optimizer, sparsifier = sparse_run()
    run(sparsifier, model, optimizer, range(12))
    state = save(sparsifier.state_dict())
    assert set(state["metrics"]) == {"history", "last"}  # no ITOP masks: not tracked
    del state["metrics"]  # as saved before metrics existed
    _model2, _, sparsifier2 = sparse_run()
    sparsifier2.track_itop()
    sparsifier2.load_state_dict(state)
    active = sum(int(m.sum()) for m in sparsifier2.masks.values())
    assert sparsifier2.metrics() == {
        "sparsity/sparsity": sparsifier.metrics()["sparsity/sparsity"],
        "sparsity/mask_change": 0.0,
        "sparsity/updates": 2.0,
        "sparsity/itop": active / 1216,  # restarts from the loaded masks
    }
    assert sparsifier2.mask_history == []


def test_state_dict_has_metrics_only_once_there_is_something_to_keep() -> None:
    _model, _optimizer, sparsifier = sparse_run()
    assert "metrics" not in sparsifier.state_dict()
    sparsifier.track_itop()
    state = save(sparsifier.state_dict())
    assert sorted(state["metrics"]) == ["ever_active", "history", "last"]
    assert state["metrics"]["ever_active"]["0.weight"]["active"] == int(
        sparsifier.masks["0.weight"].sum()
    )


def test_corrupted_metrics_raise_and_change_nothing() -> None:
    model, optimizer, sparsifier = sparse_run()
    sparsifier.track_itop()
    run(sparsifier, model, optimizer, range(12))
    state = save(sparsifier.state_dict())
    _model2, _, sparsifier2 = sparse_run()
    masks = {f: m.clone() for f, m in sparsifier2.masks.items()}
    bad = dict(state, metrics=dict(state["metrics"], history=[[5, 1, 2]]))
    with pytest.raises(ValueError, match="history must be a list"):
        sparsifier2.load_state_dict(bad)
    shrunk = dict(state["metrics"]["ever_active"])
    shrunk["0.weight"] = dict(shrunk["0.weight"], shape=[2, 2])
    bad = dict(state, metrics=dict(state["metrics"], ever_active=shrunk))
    with pytest.raises(ValueError, match=r"ever_active\['0.weight'\]"):
        sparsifier2.load_state_dict(bad)
    assert all(torch.equal(m, masks[f]) for f, m in sparsifier2.masks.items())
    assert sparsifier2.step_count == 0
    assert "sparsity/itop" not in sparsifier2.metrics()  # not turned on


def test_summary_shows_mask_dynamics_when_itop_is_tracked() -> None:
    model, optimizer, sparsifier = sparse_run()
    run(sparsifier, model, optimizer, range(10))
    assert "ITOP" not in sparsifier.summary()
    sparsifier.track_itop()
    assert_expected_inline(
        sparsifier.summary().splitlines()[-1],
        """mask dynamics: 2 update(s), last mask change 0.3169, ITOP rate 0.1998""",
    )
