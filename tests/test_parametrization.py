"""MaskParametrization: pass-through forward, masked gradients, dense capture."""

from __future__ import annotations

import copy

import pytest
import torch
from expecttest import assert_expected_inline
from torch import nn
from torch.nn.utils import parametrize

from sparsetorch import MaskParametrization


def masked_linear(mask: torch.Tensor) -> tuple[nn.Linear, MaskParametrization]:
    layer = nn.Linear(mask.shape[1], mask.shape[0])
    with torch.no_grad():
        layer.weight.mul_(mask)
    p = MaskParametrization(mask)
    parametrize.register_parametrization(layer, "weight", p)
    p.attach(layer.parametrizations.weight.original)
    return layer, p


def original(layer: nn.Module) -> torch.Tensor:
    return layer.parametrizations.weight.original


def test_forward_hands_the_stored_weight_through_without_a_copy() -> None:
    layer, _ = masked_linear(torch.rand(4, 6) > 0.5)
    assert layer.weight.data_ptr() == original(layer).data_ptr()


def test_gradient_reaching_the_stored_weight_is_masked() -> None:
    mask = torch.rand(4, 6) > 0.5
    layer, _ = masked_linear(mask)
    layer(torch.randn(3, 6)).pow(2).sum().backward()
    grad = original(layer).grad
    assert grad is not None
    assert torch.all(grad[~mask] == 0)
    assert torch.all(grad[mask] != 0)


def test_dense_gradient_is_kept_only_while_capturing() -> None:
    layer, p = masked_linear(torch.rand(4, 6) > 0.5)
    x = torch.randn(3, 6)
    layer(x).sum().backward()
    assert p.dense_grad is None
    p.capturing = True
    layer.zero_grad()
    layer(x).sum().backward()
    assert p.dense_grad is not None
    p.release()
    assert p.dense_grad is None


def dense_reference(layer: nn.Linear, x: torch.Tensor) -> torch.Tensor:
    w = layer.weight.detach().clone().requires_grad_(True)
    (x @ w.T + layer.bias.detach()).pow(2).sum().backward()
    assert w.grad is not None
    return w.grad


def test_dense_gradient_sums_over_micro_batches() -> None:
    layer, p = masked_linear(torch.rand(4, 6) > 0.5)
    x = torch.randn(8, 6)
    p.capturing = True
    layer.zero_grad()
    for chunk in x.chunk(4):
        layer(chunk).pow(2).sum().backward()
    assert p.dense_grad is not None
    torch.testing.assert_close(p.dense_grad, dense_reference(layer, x))


@pytest.mark.parametrize("set_to_none", [True, False])
def test_dense_gradient_restarts_when_grad_is_reset(set_to_none: bool) -> None:
    layer, p = masked_linear(torch.rand(4, 6) > 0.5)
    p.capturing = True
    stale = torch.full((3, 6), 1e6)
    layer(stale).pow(2).sum().backward()  # e.g. a step GradScaler skipped
    layer.zero_grad(set_to_none=set_to_none)
    x = torch.randn(3, 6)
    layer(x).pow(2).sum().backward()
    assert p.dense_grad is not None
    torch.testing.assert_close(p.dense_grad, dense_reference(layer, x))


def test_stale_weight_is_masked_before_use() -> None:
    mask = torch.rand(4, 6) > 0.5
    layer, p = masked_linear(mask)
    with torch.no_grad():
        original(layer).fill_(1.0)
    p.stale = True
    assert torch.equal(layer.weight, mask.float())
    assert not p.stale


def test_deep_copy_masks_the_gradients_of_its_own_weight() -> None:
    mask = torch.rand(4, 6) > 0.5
    layer, _ = masked_linear(mask)
    twin = copy.deepcopy(layer)
    assert original(twin) is not original(layer)
    twin(torch.randn(3, 6)).sum().backward()
    grad = original(twin).grad
    assert grad is not None and torch.all(grad[~mask] == 0)
    assert original(layer).grad is None


def test_mask_must_be_bool() -> None:
    with pytest.raises(TypeError) as error:
        MaskParametrization(torch.ones(2, 2))
    assert_expected_inline(
        str(error.value),
        """\
MaskParametrization needs a torch.bool mask, got torch.float32.
Pass `mask.bool()`.""",
    )


def test_repr_shows_active_count() -> None:
    _, p = masked_linear(torch.tensor([[True, False], [False, False]]))
    assert_expected_inline(repr(p), """MaskParametrization(shape=(2, 2), active=1/4)""")
