"""Gradient accumulation and mixed precision (autocast, GradScaler) on CPU."""

from __future__ import annotations

import warnings
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from conftest import (
    check_invariants,
    plain_copy,
    small_batches,
    small_sparse,
    train_small_in_dtype,
    train_step,
)
from torch import Tensor, nn

import sparsetorch as st


def _dense_grads(sparsifier: st.Sparsifier) -> dict[str, Tensor]:
    grads = {}
    for fqn, p in sparsifier.topology.parametrizations.items():
        assert p.dense_grad is not None, fqn
        grads[fqn] = p.dense_grad.clone()
    return grads


def _assert_dense_grads_are_the_full_batch_grads(
    sparsifier: st.Sparsifier, model: nn.Module, x: Tensor, y: Tensor
) -> None:
    """The captured dense gradients equal a plain model's gradient on ``(x, y)``."""
    plain = plain_copy(model)
    F.cross_entropy(plain(x), y).backward()
    for fqn, grad in _dense_grads(sparsifier).items():
        reference = plain.get_parameter(fqn).grad
        assert reference is not None
        torch.testing.assert_close(grad, reference, rtol=0, atol=1e-6)


def _assert_same_weights(a: nn.Module, b: nn.Module, *, atol: float = 0.0) -> None:
    """Same keys; bit-exact values (or within ``atol``)."""
    sa, sb = a.state_dict(), b.state_dict()
    assert list(sa) == list(sb)
    for key in sa:
        if atol:
            torch.testing.assert_close(sa[key], sb[key], rtol=0, atol=atol)
        else:
            assert torch.equal(sa[key], sb[key]), key


def _micro_batches(model: nn.Module, x: Tensor, y: Tensor, n: int) -> None:
    for xs, ys in zip(x.chunk(n), y.chunk(n), strict=True):
        (F.cross_entropy(model(xs), ys) / n).backward()


# -- gradient accumulation ----------------------------------------------------------


def test_dense_grad_over_micro_batches_equals_full_batch_grad_and_gives_same_masks():
    (x0, y0), (x, y) = small_batches(2)
    acc_model, acc_opt, acc = small_sparse()
    full_model, full_opt, full = small_sparse()
    for model, opt in ((acc_model, acc_opt), (full_model, full_opt)):
        # step 1; step 2 updates, so its backward passes capture
        train_step(model, opt, x0, y0)

    acc_opt.zero_grad()
    _micro_batches(acc_model, x, y, 4)
    full_opt.zero_grad()
    F.cross_entropy(full_model(x), y).backward()

    # Independent reference: a plain dense model holding the effective weights.
    plain = plain_copy(full_model)
    F.cross_entropy(plain(x), y).backward()
    acc_grads, full_grads = _dense_grads(acc), _dense_grads(full)
    for fqn in ("0.weight", "2.weight"):
        reference = plain.get_parameter(fqn).grad
        assert reference is not None
        assert torch.equal(full_grads[fqn], reference)
        assert int(reference.count_nonzero()) > int(acc.masks[fqn].sum())  # dense
        torch.testing.assert_close(acc_grads[fqn], reference, rtol=0, atol=1e-6)

    before = {fqn: m.clone() for fqn, m in acc.masks.items()}
    acc_opt.step()
    full_opt.step()
    assert (acc.step_count, acc.update_count) == (full.step_count, full.update_count)
    assert (acc.update_count, acc.step_count) == (1, 2)
    for fqn in acc.masks:
        assert torch.equal(acc.masks[fqn], full.masks[fqn])
        assert not torch.equal(acc.masks[fqn], before[fqn])
    _assert_same_weights(acc_model, full_model, atol=1e-6)
    check_invariants(acc, acc_opt, grads=True)


def test_updates_once_per_update_interval_optimizer_steps_with_micro_batches():
    model, optimizer, sparsifier = small_sparse(update_interval=3)
    changed_at = []
    for x, y in small_batches(9):
        before = {fqn: m.clone() for fqn, m in sparsifier.masks.items()}
        optimizer.zero_grad()
        _micro_batches(model, x, y, 4)
        optimizer.step()
        if any(not torch.equal(m, before[f]) for f, m in sparsifier.masks.items()):
            changed_at.append(sparsifier.step_count)
        check_invariants(sparsifier, optimizer, grads=True)
    assert changed_at == [3, 6, 9]
    assert (sparsifier.step_count, sparsifier.update_count) == (9, 3)


@pytest.mark.parametrize("set_to_none", [True, False])
def test_zero_grad_restarts_the_dense_grad_sum(set_to_none: bool):
    (x0, y0), (x, y) = small_batches(2)
    model, optimizer, sparsifier = small_sparse()
    train_step(model, optimizer, x0, y0)
    # A backward pass that zero_grad discards: the capture must forget it too.
    (100 * F.cross_entropy(model(x0), y0)).backward()
    optimizer.zero_grad(set_to_none=set_to_none)
    _micro_batches(model, x, y, 4)

    _assert_dense_grads_are_the_full_batch_grads(sparsifier, model, x, y)


def test_dense_grad_sum_survives_grad_overwritten_between_micro_batches():
    # DDP without no_sync() writes the all-reduced gradient into .grad after each
    # backward pass; that is not a reset, so the sum must go on.
    (x0, y0), (x, y) = small_batches(2)
    model, optimizer, sparsifier = small_sparse()
    train_step(model, optimizer, x0, y0)
    optimizer.zero_grad()
    for xs, ys in zip(x.chunk(4), y.chunk(4), strict=True):
        (F.cross_entropy(model(xs), ys) / 4).backward()
        with torch.no_grad():
            for param in sparsifier.topology.params.values():
                assert param.grad is not None
                param.grad.copy_(param.grad.clone())  # bumps ._version

    _assert_dense_grads_are_the_full_batch_grads(sparsifier, model, x, y)


# -- mixed precision ----------------------------------------------------------------


def _train_with_scaler(
    *, inject_inf_at: int | None, enabled: bool = True
) -> tuple[nn.Module, st.Sparsifier, list[tuple[str, int, int, float]]]:
    model, optimizer, sparsifier = small_sparse(update_interval=3)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**16, enabled=enabled)
    log: list[tuple[str, int, int, float]] = []
    for i, (x, y) in enumerate(small_batches(7)):
        if i == inject_inf_at:
            masks = {fqn: m.clone() for fqn, m in sparsifier.masks.items()}
            optimizer.zero_grad()
            loss = F.cross_entropy(model(x), y) * float("inf")
            scaler.scale(loss).backward()
            scaler.step(optimizer)  # skipped: the gradients are not finite
            scaler.update()
            log.append(("skipped", sparsifier.step_count, sparsifier.update_count, 0.0))
            assert all(torch.equal(m, masks[f]) for f, m in sparsifier.masks.items())
            # (.grad is NaN there: masking multiplies, and inf * 0 is NaN.)
            check_invariants(sparsifier, optimizer)
        optimizer.zero_grad()
        scaler.scale(F.cross_entropy(model(x), y)).backward()
        scaler.step(optimizer)
        scaler.update()
        log.append(
            ("step", sparsifier.step_count, sparsifier.update_count, scaler.get_scale())
        )
        check_invariants(sparsifier, optimizer, grads=True)
    return model, sparsifier, log


def test_grad_scaler_skipped_step_delays_the_update_and_loses_nothing():
    # Step 3 updates; its first try has inf gradients (the dense ones captured
    # for RigL too). The scaler skips the optimizer step, so the step is not
    # counted and the update waits for the retry, which captures afresh.
    model, sparsifier, log = _train_with_scaler(inject_inf_at=2)
    assert log == [
        ("step", 1, 0, 65536.0),
        ("step", 2, 0, 65536.0),
        ("skipped", 2, 0, 0.0),
        ("step", 3, 1, 32768.0),
        ("step", 4, 1, 32768.0),
        ("step", 5, 1, 32768.0),
        ("step", 6, 2, 32768.0),
        ("step", 7, 2, 32768.0),
    ]
    reference_model, reference, _ = _train_with_scaler(inject_inf_at=None)
    for fqn, mask in sparsifier.masks.items():
        assert torch.equal(mask, reference.masks[fqn])
    # Bit-exact: the scale is a power of two, so the skip changes no value.
    _assert_same_weights(model, reference_model)


def test_grad_scaler_training_is_bit_exact_with_unscaled_training():
    scaled_model, scaled, _ = _train_with_scaler(inject_inf_at=None)
    plain_model, plain, _ = _train_with_scaler(inject_inf_at=None, enabled=False)
    assert scaled.update_count == plain.update_count == 2
    for fqn, mask in scaled.masks.items():
        assert torch.equal(mask, plain.masks[fqn])
    _assert_same_weights(scaled_model, plain_model)


def test_autocast_bf16_captures_fp32_dense_grads_and_keeps_invariants():
    model, optimizer, sparsifier = small_sparse(update_interval=2)
    parametrizations = sparsifier.topology.parametrizations
    for step, (x, y) in enumerate(small_batches(4), start=1):
        optimizer.zero_grad()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            logits = model(x)
            assert logits.dtype == torch.bfloat16
            loss = F.cross_entropy(logits, y)
        loss.backward()
        if step % 2 == 0:  # the update steps: dense fp32 gradients captured
            for fqn, p in parametrizations.items():
                assert p.dense_grad is not None
                assert p.dense_grad.dtype == torch.float32
                assert bool(p.dense_grad.isfinite().all())
                inactive = p.dense_grad[~sparsifier.masks[fqn]]
                assert int(inactive.count_nonzero()) > 0
        optimizer.step()
        check_invariants(sparsifier, optimizer, grads=True)
    assert (sparsifier.step_count, sparsifier.update_count) == (4, 2)
    for p in parametrizations.values():
        assert p.dense_grad is None  # released after the update


def test_bf16_model_trains_with_bf16_dense_grads():
    model, optimizer, sparsifier = small_sparse(update_interval=2)
    model.to(torch.bfloat16)
    train_small_in_dtype(model, optimizer, sparsifier, torch.bfloat16)
    assert sparsifier.update_count == 2
    assert all(m.dtype == torch.bool for m in sparsifier.masks.values())


class _InfAt(torch.autograd.Function):
    """Identity on the weight; its backward puts an inf at one position."""

    position: tuple[int, int] = (0, 0)

    @staticmethod
    def forward(ctx: Any, weight: Tensor) -> Tensor:
        return weight.view_as(weight)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> Tensor:
        grad = grad.clone()
        grad[_InfAt.position] = float("inf")
        return grad


class _InjectInf(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(12, 6)

    def forward(self, x: Tensor) -> Tensor:
        return F.linear(x, _InfAt.apply(self.lin.weight), self.lin.bias)


@pytest.mark.parametrize("scaler_enabled", [True, False])
def test_inf_gradient_only_at_an_inactive_position(scaler_enabled: bool):
    torch.manual_seed(0)
    model = _InjectInf()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    sparsifier = st.sparsify(
        model, optimizer, sparsity=0.5, total_steps=100, update_interval=2
    )
    mask = sparsifier.masks["lin.weight"]
    row, col = (int(i) for i in (~mask).nonzero()[0])
    _InfAt.position = (row, col)
    scaler = torch.amp.GradScaler("cpu", enabled=scaler_enabled)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for x, _ in small_batches(2):
            optimizer.zero_grad()
            scaler.scale(model(x).sum()).backward()
            scaler.step(optimizer)
            scaler.update()
    weight = sparsifier.topology.params["lin.weight"]
    messages = [
        str(w.message).split(":")[0]
        for w in caught
        if str(w.message).startswith("Skipped")  # sparsetorch's own
    ]
    if scaler_enabled:
        # inf * 0 is NaN in the masked .grad, so the scaler sees it and skips.
        assert (sparsifier.step_count, sparsifier.update_count) == (0, 0)
        assert int((~weight.isfinite()).sum()) == 0
        assert messages == []
    else:
        # Documents today's behaviour (docs/amp_and_accumulation.md): the update
        # is skipped, and the NaN that masking makes of the inf reaches the
        # stored weight at that inactive position.
        assert (sparsifier.step_count, sparsifier.update_count) == (2, 0)
        assert messages == ["Skipped the topology update at step 2"]
        assert not bool(weight[row, col].isfinite())
        assert int((~weight.isfinite()).sum()) == 1


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_fp16_autocast_grad_scaler_skip_delays_the_update():
    model, optimizer, sparsifier = small_sparse(update_interval=3)
    model.cuda()
    scaler = torch.amp.GradScaler("cuda")
    for i, (x, y) in enumerate(small_batches(7)):
        x, y = x.cuda(), y.cuda()
        for inject in (True, False) if i == 2 else (False,):
            counts = (sparsifier.step_count, sparsifier.update_count)
            optimizer.zero_grad()
            with torch.autocast("cuda", dtype=torch.float16):
                loss = F.cross_entropy(model(x), y)
            scaler.scale(loss * float("inf") if inject else loss).backward()
            scaler.step(optimizer)
            scaler.update()
            if inject:  # skipped: not counted, no update
                assert (sparsifier.step_count, sparsifier.update_count) == counts
            check_invariants(sparsifier, optimizer, grads=not inject)
    assert sparsifier.step_count == 7
    assert sparsifier.update_count == 2
    assert all(m.device.type == "cuda" for m in sparsifier.masks.values())
