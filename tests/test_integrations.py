"""sparsetorch in an ordinary training loop: the pieces around the optimizer."""

from __future__ import annotations

import copy
import warnings
from collections.abc import Callable
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from conftest import (
    check_invariants,
    plain_copy,
    small_batches,
    small_mlp,
    small_sgd,
    small_sparse,
    train_small_in_dtype,
    train_step,
)
from torch import Tensor, nn

import sparsetorch as st


def _sparse(
    make_optimizer: Callable[[nn.Module], torch.optim.Optimizer] = small_sgd,
    **sparsify_kwargs: Any,
) -> tuple[nn.Module, torch.optim.Optimizer, st.Sparsifier]:
    """conftest's ``small_sparse`` with Tanh."""
    return small_sparse(make_optimizer, activation=nn.Tanh, **sparsify_kwargs)


@pytest.mark.parametrize("made", ["before sparsify", "after sparsify"])
def test_lr_scheduler_and_sparsifier_both_count_every_step(made: str):
    torch.manual_seed(0)
    model = small_mlp(nn.Tanh)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    if made == "before sparsify":
        scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=2, gamma=0.5)
    sparsifier = st.sparsify(
        model, optimizer, total_steps=100, update_interval=3, distribution="uniform"
    )
    if made == "after sparsify":
        scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=2, gamma=0.5)
    lrs = []
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # e.g. "lr_scheduler.step() before optimizer"
        for x, y in small_batches(6):
            train_step(model, optimizer, x, y)
            scheduler.step()
            lrs.append(optimizer.param_groups[0]["lr"])
    assert lrs == [0.1, 0.05, 0.05, 0.025, 0.025, 0.0125]
    assert (sparsifier.step_count, sparsifier.update_count) == (6, 2)
    check_invariants(sparsifier, optimizer, grads=True)


def test_clip_grad_norm_sees_and_clips_the_masked_gradient():
    model, optimizer, sparsifier = _sparse()
    for x, y in small_batches(4):
        plain = plain_copy(model, nn.Tanh)
        F.cross_entropy(plain(x), y).backward()
        masks = {fqn: m.clone() for fqn, m in sparsifier.masks.items()}
        expected = torch.linalg.vector_norm(
            torch.cat(
                [
                    (p.grad * masks[n] if n in masks else p.grad).flatten()
                    for n, p in plain.named_parameters()
                    if p.grad is not None
                ]
            )
        )
        optimizer.zero_grad()
        F.cross_entropy(model(x), y).backward()
        total = nn.utils.clip_grad_norm_(model.parameters(), max_norm=0.1)
        torch.testing.assert_close(total, expected, rtol=1e-6, atol=0)
        assert float(total) > 0.1  # so it did clip
        clipped = torch.linalg.vector_norm(
            torch.cat(
                [p.grad.flatten() for p in model.parameters() if p.grad is not None]
            )
        )
        torch.testing.assert_close(clipped, torch.tensor(0.1), rtol=1e-5, atol=0)
        optimizer.step()
        check_invariants(sparsifier, optimizer, grads=True)
    assert sparsifier.update_count == 2


@pytest.mark.parametrize("set_to_none", [True, False])
def test_zero_grad_either_way_keeps_invariants_across_updates(set_to_none: bool):
    model, optimizer, sparsifier = _sparse()
    for x, y in small_batches(6):
        optimizer.zero_grad(set_to_none=set_to_none)
        F.cross_entropy(model(x), y).backward()
        optimizer.step()
        check_invariants(sparsifier, optimizer, grads=True)
    assert (sparsifier.step_count, sparsifier.update_count) == (6, 3)


def test_lbfgs_step_with_closure_counts_once_and_keeps_weights_masked():
    model, optimizer, sparsifier = _sparse(
        lambda m: torch.optim.LBFGS(m.parameters(), lr=0.5, max_iter=4, history_size=5)
    )
    (x, y), *_ = small_batches(1, size=64)
    calls = 0

    def closure() -> Tensor:
        nonlocal calls
        calls += 1
        optimizer.zero_grad()
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        return loss

    for step in range(1, 7):
        optimizer.step(closure)
        assert (sparsifier.step_count, sparsifier.update_count) == (step, step // 2)
        # L-BFGS's flat history spans dropped weights: it is restarted at each
        # update, or the next step would write outside the masks.
        check_invariants(sparsifier, optimizer, grads=True)
    assert calls == 24  # 4 closure calls per step, one count per step


def test_eval_and_no_grad_neither_capture_nor_change_masks():
    model, optimizer, sparsifier = _sparse()
    (x, y), (x2, y2) = small_batches(2)
    # step 1: the next step updates, so capturing is armed
    train_step(model, optimizer, x, y)
    parametrizations = sparsifier.topology.parametrizations
    assert all(p.capturing for p in parametrizations.values())
    masks = {fqn: m.clone() for fqn, m in sparsifier.masks.items()}

    model.eval()
    assert all(not p.training for p in parametrizations.values())
    with torch.no_grad():
        out = model(x2)
    assert torch.equal(out, plain_copy(model, nn.Tanh)(x2))
    assert all(p.dense_grad is None for p in parametrizations.values())
    model.train()

    optimizer.zero_grad()
    F.cross_entropy(model(x2), y2).backward()
    assert all(p.dense_grad is not None for p in parametrizations.values())
    assert all(torch.equal(m, masks[f]) for f, m in sparsifier.masks.items())
    optimizer.step()
    assert sparsifier.update_count == 1
    assert any(not torch.equal(m, masks[f]) for f, m in sparsifier.masks.items())
    check_invariants(sparsifier, optimizer, grads=True)


def test_to_float64_after_sparsify_keeps_masks_params_and_invariants():
    model, optimizer, sparsifier = _sparse()
    masks = dict(sparsifier.masks)
    params = {fqn: id(p) for fqn, p in sparsifier.topology.params.items()}
    model.to(torch.float64)
    assert all(sparsifier.masks[f] is m for f, m in masks.items())  # same buffers
    assert all(m.dtype == torch.bool for m in sparsifier.masks.values())
    assert {f: id(p) for f, p in sparsifier.topology.params.items()} == params
    held = {id(p) for group in optimizer.param_groups for p in group["params"]}
    assert set(params.values()) <= held
    train_small_in_dtype(model, optimizer, sparsifier, torch.float64)
    assert sparsifier.update_count == 2
    x, _ = small_batches(1)[0]
    assert torch.equal(model(x.double()), plain_copy(model, nn.Tanh)(x.double()))


def test_deepcopy_computes_the_same_outputs_and_trains_sparse():
    model, optimizer, sparsifier = _sparse()
    for x, y in small_batches(3):  # trained, with one update behind it
        train_step(model, optimizer, x, y)
    assert sparsifier.update_count == 1
    original = {k: v.clone() for k, v in model.state_dict().items()}
    replica = copy.deepcopy(model)
    (x, y), (x2, y2) = small_batches(2)
    assert torch.equal(replica(x), model(x))

    replica_masks = {
        fqn: replica.get_submodule(fqn.rpartition(".")[0]).parametrizations.weight[0]
        for fqn in sparsifier.masks
    }
    for fqn, p in replica_masks.items():
        assert torch.equal(p.mask, sparsifier.masks[fqn])
        assert p.mask is not sparsifier.masks[fqn]
    # Adam with weight decay: masked gradients keep dropped weights at zero.
    replica_opt = torch.optim.AdamW(replica.parameters(), lr=0.01, weight_decay=0.1)
    for _ in range(3):
        train_step(replica, replica_opt, x2, y2)
    for fqn, p in replica_masks.items():
        stored = replica.get_parameter(
            fqn.rpartition(".")[0] + ".parametrizations.weight.original"
        )
        assert stored.grad is not None
        assert int(stored.grad[~p.mask].count_nonzero()) == 0
        assert int(stored[~p.mask].count_nonzero()) == 0
        assert int(stored[p.mask].count_nonzero()) == int(p.mask.sum())  # trained
    # The original is untouched, and still trains with its own hooks.
    assert all(torch.equal(v, original[k]) for k, v in model.state_dict().items())
    train_step(model, optimizer, x2, y2)
    check_invariants(sparsifier, optimizer, grads=True)
