"""Sparse execution: same results as mask mode, same state, compressed compute."""

from __future__ import annotations

import copy
import io
import os
import pathlib
import warnings

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from conftest import check_invariants, exit_worker, mlp, train_step
from expecttest import assert_expected_inline
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP

import sparsetorch as st
from sparsetorch import execution as execution_module
from sparsetorch.execution import (
    SparseExecution,
    SparseLinear,
    _choose_kernels,
    executions,
    export_sparse,
    sparse_is_faster,
)
from sparsetorch.policies import base as policies_base

# Float rounding: the sparse kernels sum in another order than dense BLAS.
TOL = {"rtol": 1e-5, "atol": 1e-6}


def wide_mlp() -> nn.Sequential:
    """Linear layers wide enough for real sparsity (and one without bias)."""
    return nn.Sequential(
        nn.Linear(48, 64), nn.ReLU(), nn.Linear(64, 64, bias=False), nn.Tanh(),
        nn.Linear(64, 10),
    )  # fmt: skip


def data(n: int = 32, steps: int = 1, seed: int = 7) -> list[tuple[torch.Tensor, ...]]:
    g = torch.Generator().manual_seed(seed)
    return [
        (torch.randn(n, 48, generator=g), torch.randint(0, 10, (n,), generator=g))
        for _ in range(steps)
    ]


def pair(
    *, policy: str = "rigl", sparsity: float = 0.9, opt: str = "sgd", **kwargs: object
) -> dict[str, tuple[nn.Module, torch.optim.Optimizer, st.Sparsifier]]:
    """The same model, optimizer and sparsifier in mask and in sparse mode."""
    out = {}
    for execution in ("mask", "sparse"):
        torch.manual_seed(0)
        model = wide_mlp()
        optimizer: torch.optim.Optimizer
        if opt == "sgd":
            optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
        else:
            optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
        sparsifier = st.sparsify(
            model,
            optimizer,
            policy=policy,
            sparsity=sparsity,
            distribution="uniform",
            total_steps=1000,
            update_interval=5,
            execution=execution,
            **kwargs,  # type: ignore[arg-type]
        )
        out[execution] = (model, optimizer, sparsifier)
    return out


# -- same results as mask mode ----------------------------------------------------------


def test_sparse_forward_and_gradients_match_mask_mode() -> None:
    runs = pair(policy="static")
    ((x, y),) = data()
    grads = {}
    for execution, (model, _, _) in runs.items():
        xi = x.clone().requires_grad_(True)
        out = model(xi)
        nn.functional.cross_entropy(out, y).backward()
        grads[execution] = (
            out,
            xi.grad,
            {n: p.grad for n, p in model.named_parameters()},
        )
    (out_m, gx_m, g_m), (out_s, gx_s, g_s) = grads["mask"], grads["sparse"]
    torch.testing.assert_close(out_s, out_m, **TOL)
    torch.testing.assert_close(gx_s, gx_m, **TOL)
    assert g_s.keys() == g_m.keys()
    for name in g_m:
        torch.testing.assert_close(g_s[name], g_m[name], **TOL)
    sparsifier = runs["sparse"][2]
    for fqn, param in sparsifier.topology.params.items():  # exactly zero outside
        assert param.grad is not None
        assert torch.all(param.grad[~sparsifier.masks[fqn]] == 0)
        assert int(torch.count_nonzero(param.grad)) <= int(sparsifier.masks[fqn].sum())


@pytest.mark.parametrize("opt", ["sgd", "adam"])
def test_rigl_training_matches_mask_mode_masks_and_weights(opt: str) -> None:
    runs = pair(opt=opt)
    batches = data(steps=22)
    for x, y in batches:
        for model, optimizer, sparsifier in runs.values():
            train_step(model, optimizer, x, y)
            check_invariants(sparsifier, optimizer, grads=True)
    (mm, _, sm), (ms, _, ss) = runs["mask"], runs["sparse"]
    assert sm.update_count == ss.update_count == 4
    for fqn in sm.masks:
        assert torch.equal(sm.masks[fqn], ss.masks[fqn]), fqn
    assert list(ms.state_dict()) == list(mm.state_dict())
    for key, value in mm.state_dict().items():
        torch.testing.assert_close(ms.state_dict()[key], value, rtol=1e-4, atol=1e-5)


def test_capture_step_gives_mask_modes_dense_gradient() -> None:
    runs = pair()
    for x, y in data(steps=4):  # the 5th step captures: arm it, don't update yet
        for model, optimizer, _ in runs.values():
            train_step(model, optimizer, x, y)
    captured = {}
    ((x, y),) = data(seed=3)
    for execution, (model, optimizer, sparsifier) in runs.items():
        optimizer.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        parametrizations = sparsifier.topology.parametrizations
        assert all(p.capturing for p in parametrizations.values())
        captured[execution] = {f: p.dense_grad for f, p in parametrizations.items()}
        check_invariants(sparsifier, optimizer, grads=True)  # .grad itself is masked
    for fqn, dense in captured["mask"].items():
        assert dense is not None and bool((dense != 0).any())
        torch.testing.assert_close(captured["sparse"][fqn], dense, **TOL)


def test_gradient_accumulation_over_two_backwards_is_masked() -> None:
    runs = pair(policy="static")
    (x, y), (x2, y2) = data(steps=2)
    for model, optimizer, _ in runs.values():
        optimizer.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        nn.functional.cross_entropy(model(x2), y2).backward()
    sm, ss = runs["mask"][2], runs["sparse"][2]
    for fqn, param in ss.topology.params.items():
        assert param.grad is not None
        assert torch.all(param.grad[~ss.masks[fqn]] == 0)
        torch.testing.assert_close(param.grad, sm.topology.params[fqn].grad, **TOL)


def test_grad_set_to_zero_instead_of_none_still_masked() -> None:
    runs = pair(policy="static")
    for x, y in data(steps=3):
        for model, optimizer, _ in runs.values():
            optimizer.zero_grad(set_to_none=False)
            nn.functional.cross_entropy(model(x), y).backward()
            optimizer.step()
    (mm, _, _), (ms, opt_s, ss) = runs["mask"], runs["sparse"]
    check_invariants(ss, opt_s, grads=True)
    for key, value in mm.state_dict().items():
        torch.testing.assert_close(ms.state_dict()[key], value, **TOL)


def test_gradient_memory_is_reused_only_when_nobody_holds_it() -> None:
    runs = pair(policy="static")
    model, optimizer, sparsifier = runs["sparse"]
    param = sparsifier.topology.params["2.weight"]
    (x, y), (x2, y2), (x3, y3) = data(steps=3)
    train_step(model, optimizer, x, y)
    first = param.grad
    assert first is not None
    kept, kept_values = first, first.clone()  # the user holds on to a gradient
    train_step(model, optimizer, x2, y2)
    assert param.grad is not None
    assert param.grad.data_ptr() != kept.data_ptr()  # new memory: kept is intact
    assert torch.equal(kept, kept_values)
    del kept, first
    second_ptr = param.grad.data_ptr()
    train_step(model, optimizer, x3, y3)  # nobody holds the last one: reused
    assert param.grad.data_ptr() == second_ptr
    mask_model, mask_optimizer, _ = runs["mask"]
    for xb, yb in ((x, y), (x2, y2), (x3, y3)):
        train_step(mask_model, mask_optimizer, xb, yb)
    check_invariants(sparsifier, optimizer, grads=True)
    for key, value in mask_model.state_dict().items():
        torch.testing.assert_close(model.state_dict()[key], value, **TOL)
    torch.testing.assert_close(
        param.grad, runs["mask"][2].topology.params["2.weight"].grad, **TOL
    )


def test_a_write_into_the_gradient_after_a_step_does_not_leak_into_the_next() -> None:
    runs = pair(policy="static")
    for x, y in data(steps=3):
        for model, optimizer, sparsifier in runs.values():
            train_step(model, optimizer, x, y)
            check_invariants(sparsifier, optimizer, grads=True)
            for param in sparsifier.topology.params.values():
                assert param.grad is not None
                param.grad.add_(1.0)  # dense: outside the masks too
    (mm, _, sm), (ms, _, ss) = runs["mask"], runs["sparse"]
    for key, value in mm.state_dict().items():
        torch.testing.assert_close(ms.state_dict()[key], value, **TOL)
    for fqn, param in ss.topology.params.items():  # the last step's, plus 1
        torch.testing.assert_close(param.grad, sm.topology.params[fqn].grad, **TOL)


def test_weight_used_elsewhere_gets_its_dense_gradient_masked() -> None:
    """A second, dense use of the stored weight adds an unmasked contribution."""
    model = nn.Sequential(nn.Linear(16, 16))
    sparsifier = st.sparsify(model, policy="static", sparsity=0.75, execution="sparse")
    x = torch.randn(4, 16)
    (model(x).sum() + model[0].weight.sum()).backward()
    mask = sparsifier.masks["0.weight"]
    grad = sparsifier.topology.params["0.weight"].grad
    assert grad is not None and torch.all(grad[~mask] == 0)
    assert torch.all(grad[mask] != 0)


def test_three_dim_input_float64_and_eval_mode() -> None:
    torch.manual_seed(0)
    layers = {e: nn.Linear(12, 8).double() for e in ("mask", "sparse")}
    layers["sparse"].load_state_dict(layers["mask"].state_dict())
    for execution, layer in layers.items():
        st.sparsify(layer, policy="static", sparsity=0.5, execution=execution)
    x = torch.randn(2, 5, 12, dtype=torch.float64)
    out = {e: layer(x) for e, layer in layers.items()}
    assert out["sparse"].shape == (2, 5, 8) and out["sparse"].is_contiguous()
    torch.testing.assert_close(out["sparse"], out["mask"])
    with torch.no_grad():
        eval_out = layers["sparse"].eval()(x)
    assert not eval_out.requires_grad
    torch.testing.assert_close(eval_out, out["mask"].detach())


def test_sparse_falls_back_to_mask_compute_under_autocast_with_one_warning() -> None:
    runs = pair(policy="static")
    ((x, _),) = data()
    out = {}
    for execution, (model, _, _) in runs.items():
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            with torch.autocast("cpu", dtype=torch.bfloat16):
                out[execution] = model(x)
                model(x)
        if execution == "sparse":
            messages = [str(w.message) for w in caught]
            assert len(messages) == 3  # once per layer, not per call
            assert_expected_inline(
                messages[0],
                """execution='sparse': autocast is enabled, so this layer computes in mask mode (same results, dense speed).""",
            )
    assert torch.equal(out["sparse"], out["mask"])


# -- the compressed structure -------------------------------------------------------------


def forwards(sparsifier: st.Sparsifier) -> list[SparseExecution]:
    model = sparsifier.topology.model
    found = [m.__dict__.get("forward") for m in model.modules()]
    return [f for f in found if isinstance(f, SparseExecution)]


def test_structure_is_rebuilt_once_per_update_not_per_step() -> None:
    runs = pair()
    model, optimizer, sparsifier = runs["sparse"]
    for x, y in data(steps=12):
        train_step(model, optimizer, x, y)
    assert sparsifier.update_count == 2
    assert [f.rebuilds for f in forwards(sparsifier)] == [3, 3, 3]  # start + 2
    assert [f.sparse_calls for f in forwards(sparsifier)] == [12, 12, 12]


def test_sparsifier_load_state_dict_switches_structure_and_matches_mask_mode() -> None:
    runs = pair()
    for x, y in data(steps=6):  # one update: masks differ from a fresh run's
        for model, optimizer, _ in runs.values():
            train_step(model, optimizer, x, y)
    buffer = io.BytesIO()
    torch.save(
        {
            "model": runs["mask"][0].state_dict(),
            "sparsity": runs["mask"][2].state_dict(),
        },
        buffer,
    )
    fresh = pair()
    buffer.seek(0)
    checkpoint = torch.load(buffer, weights_only=True)
    for model, _, sparsifier in fresh.values():
        model.load_state_dict(checkpoint["model"])
        sparsifier.load_state_dict(checkpoint["sparsity"])
    ((x, _),) = data(seed=11)
    expected = runs["mask"][0](x)
    for model, _, _ in fresh.values():
        torch.testing.assert_close(model(x), expected, **TOL)
    assert [f.rebuilds for f in forwards(fresh["sparse"][2])] == [1, 1, 1]


def test_dense_state_dict_loaded_alone_is_masked_before_use() -> None:
    runs = pair(policy="static")
    torch.manual_seed(5)
    dense = wide_mlp().state_dict()  # no zeros
    ((x, _),) = data()
    out = {}
    for execution, (model, _, sparsifier) in runs.items():
        model.load_state_dict(dense)
        out[execution] = model(x)
        for fqn, param in sparsifier.topology.params.items():
            assert torch.all(param[~sparsifier.masks[fqn]] == 0)
    torch.testing.assert_close(out["sparse"], out["mask"], **TOL)


def test_state_dict_keys_and_values_are_mask_modes() -> None:
    runs = pair(policy="static")
    mask_sd, sparse_sd = (m.state_dict() for m, _, _ in runs.values())
    assert list(sparse_sd) == list(mask_sd) == list(wide_mlp().state_dict())
    for key in mask_sd:
        assert torch.equal(sparse_sd[key], mask_sd[key])


def test_deepcopy_of_a_sparse_model_trains_on_its_own() -> None:
    runs = pair(policy="static")
    model = runs["sparse"][0]
    clone = copy.deepcopy(model)
    ((x, y),) = data()
    torch.testing.assert_close(clone(x), model(x))
    nn.functional.cross_entropy(clone(x), y).backward()
    assert all(p.grad is None for p in model.parameters())
    clone_fwd = [m.__dict__.get("forward") for m in clone.modules()]
    assert sum(isinstance(f, SparseExecution) for f in clone_fwd) == 3
    assert all(f.module is not m for f in clone_fwd if f for m in model.modules())


# -- switching modes -------------------------------------------------------------------


def test_executions_and_set_execution_round_trip() -> None:
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.Flatten(), nn.Linear(4 * 6 * 6, 5))
    sparsifier = st.sparsify(model, policy="static", sparsity=0.5, execution="sparse")
    assert sparsifier.execution == "sparse"
    assert executions(sparsifier.topology) == {"0.weight": "mask", "2.weight": "sparse"}
    sparsifier.set_execution("auto")  # too small for any AUTO_RULES row
    assert executions(sparsifier.topology) == {"0.weight": "mask", "2.weight": "mask"}
    sparsifier.set_execution("mask")
    assert "forward" not in model[2].__dict__
    assert executions(sparsifier.topology) == {"0.weight": "mask", "2.weight": "mask"}


def test_remove_restores_the_plain_module() -> None:
    model = mlp()
    sparsifier = st.sparsify(model, policy="static", sparsity=0.5, execution="sparse")
    x = torch.randn(3, 20)
    before = model(x)
    sparsifier.remove()
    assert all(type(m) is nn.Linear for m in model if not isinstance(m, nn.ReLU))
    assert all("forward" not in m.__dict__ for m in model.modules())
    torch.testing.assert_close(model(x), before, **TOL)
    torch.save(model, io.BytesIO())  # a plain model pickles


def test_unknown_execution_raises_and_leaves_the_model_unchanged() -> None:
    model = mlp()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError) as error:
        st.sparsify(model, sparsity=0.5, total_steps=10, execution="csr")
    assert_expected_inline(
        str(error.value),
        """\
Unknown execution 'csr'.
Known executions: ['auto', 'mask', 'sparse'] ('mask': dense compute on masked weights, 'sparse': compressed weights, 'auto': sparse where it is faster).""",
    )
    with pytest.raises(TypeError) as type_error:
        st.sparsify(model, sparsity=0.5, total_steps=10, execution=None)  # type: ignore[arg-type]
    assert_expected_inline(
        str(type_error.value),
        """execution must be a string, one of ['mask', 'sparse', 'auto'], got None.""",
    )
    assert not any(hasattr(m, "parametrizations") for m in model.modules())
    for key, value in model.state_dict().items():
        assert torch.equal(value, before[key])


def test_sparse_execution_repr() -> None:
    model = nn.Sequential(nn.Linear(8, 8))
    sparsifier = st.sparsify(model, policy="static", sparsity=0.5, execution="sparse")
    model(torch.randn(2, 8))
    (forward,) = forwards(sparsifier)
    assert_expected_inline(
        repr(forward),
        """SparseExecution(mode='sparse', sparse_calls=1, dense_calls=0, rebuilds=1)""",
    )


# -- auto ---------------------------------------------------------------------------------


def test_auto_runs_sparse_only_where_the_cost_model_says_so() -> None:
    model = nn.Sequential(nn.Linear(1024, 512), nn.ReLU(), nn.Linear(512, 16))
    sparsifier = st.sparsify(
        model, policy="static", distribution={"0.weight": 0.97, "2.weight": 0.97},
        execution="auto",
    )  # fmt: skip
    (big,) = forwards(sparsifier)  # the small layer keeps its plain forward
    assert executions(sparsifier.topology) == {"0.weight": "auto", "2.weight": "mask"}
    model(torch.randn(128, 1024)).sum().backward()  # training, 128 rows: sparse
    with torch.no_grad():
        model(torch.randn(128, 1024))  # inference, 128 rows: sparse
    model(torch.randn(8, 1024)).sum().backward()  # training, 8 rows: mask
    assert (big.sparse_calls, big.dense_calls, big.rebuilds) == (2, 1, 1)


def test_cost_model_follows_the_measured_crossovers() -> None:
    # AUTO_RULES, measured in docs/sparse_execution.md: big layers at low density
    # win; small layers, higher density, small batches (more so in training) and
    # non-CPU devices do not.
    cases = {
        # (out, in, density, rows, training): sparse?
        (2048, 2048, 0.02, 128, True): True,
        (2048, 2048, 0.05, 128, True): True,
        (2048, 2048, 0.06, 128, True): False,
        (512, 512, 0.05, 128, True): True,
        (256, 512, 0.01, 128, True): False,  # below 2**18 weights
        (1024, 1024, 0.02, 64, True): True,
        (1024, 1024, 0.03, 64, True): False,
        (512, 1024, 0.01, 64, True): False,  # small batch needs 2**20 weights
        (2048, 2048, 0.01, 8, True): False,  # tiny batch: never in training
        (2048, 2048, 0.10, 16, False): True,
        (2048, 2048, 0.11, 16, False): False,
        (2048, 2048, 0.05, 1, False): True,
        (2048, 2048, 0.06, 1, False): False,
        (512, 512, 0.02, 1, False): True,
        (512, 512, 0.03, 1, False): False,
    }
    got = {
        case: sparse_is_faster(o, i, int(d * o * i), r, training=t)
        for case, (o, i, d, r, t) in zip(cases, cases, strict=True)
    }
    assert got == cases
    assert not sparse_is_faster(2048, 2048, 1000, 128, training=True, device="cuda")
    assert not sparse_is_faster(2048, 2048, 2048 * 2048, 128, training=False)


def test_auto_splits_a_call_into_sparse_products_and_a_dense_weight_gradient() -> None:
    # (out, in, density, rows, training) -> what runs: "sparse" (every product),
    # "products" (forward and input gradient sparse, weight gradient dense), "plain"
    cases = {
        (1024, 784, 0.10, 256, True): "products",  # W1's first layer
        (1024, 512, 0.10, 128, True): "products",
        (2048, 2048, 0.10, 128, True): "products",
        (2048, 2048, 0.10, 16, True): "products",
        (1024, 1024, 0.10, 16, True): "plain",  # small for 16 rows
        (512, 512, 0.10, 128, True): "plain",  # small
        (2048, 2048, 0.05, 128, True): "sparse",
        (2048, 2048, 0.10, 128, False): "sparse",  # inference: the forward
        (2048, 2048, 0.20, 128, True): "plain",
        (512, 512, 0.10, 8, True): "plain",  # too few rows
        (256, 512, 0.01, 128, True): "plain",  # too small
    }
    got = {
        case: _choose_kernels(o, i, round(d * o * i), r, training=t, device="cpu")
        for case, (o, i, d, r, t) in zip(cases, cases, strict=True)
    }
    assert got == cases
    on_gpu = _choose_kernels(2048, 2048, 1000, 128, training=True, device="cuda")
    assert on_gpu == "plain"


def big_runs(execution: str) -> tuple[nn.Module, torch.optim.Optimizer, st.Sparsifier]:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(1024, 512), nn.ReLU(), nn.Linear(512, 10))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    sparsifier = st.sparsify(
        model, optimizer, policy="rigl", sparsity=0.9, distribution="uniform",
        total_steps=1000, update_interval=4, execution=execution,
    )  # fmt: skip
    return model, optimizer, sparsifier


def test_auto_sparse_products_with_dense_weight_gradient_match_mask_mode() -> None:
    # 1024x512 at 10% density, 128 rows: forward and input gradient sparse, the
    # weight gradient dense and masked by the hook (see the test above).
    runs = {e: big_runs(e) for e in ("mask", "auto")}
    g = torch.Generator().manual_seed(1)
    for _ in range(9):
        x = torch.randn(128, 1024, generator=g, requires_grad=True)
        y = torch.randint(0, 10, (128,), generator=g)
        grads = {}
        for execution, (model, optimizer, sparsifier) in runs.items():
            x.grad = None
            optimizer.zero_grad()
            nn.functional.cross_entropy(model(x), y).backward()
            grads[execution] = (x.grad, model[0].parametrizations.weight.original.grad)
            optimizer.step()
            check_invariants(sparsifier, optimizer, grads=True)
        for got, want in zip(grads["auto"], grads["mask"], strict=True):
            torch.testing.assert_close(got, want, **TOL)
    (mm, _, sm), (ma, _, sa) = runs["mask"], runs["auto"]
    assert sm.update_count == sa.update_count == 2
    for fqn in sm.masks:
        assert torch.equal(sm.masks[fqn], sa.masks[fqn]), fqn
    for key, value in mm.state_dict().items():
        torch.testing.assert_close(ma.state_dict()[key], value, rtol=1e-4, atol=1e-5)
    (big,) = forwards(sa)
    assert (big.sparse_calls, big.dense_calls, big.rebuilds) == (9, 0, 3)


@pytest.mark.filterwarnings("ignore:.*torch.jit.script.* is deprecated")  # torch's AD
def test_sparse_layers_support_double_backward_and_forward_ad() -> None:
    runs = {e: big_runs(e) for e in ("mask", "auto", "sparse")}
    x = torch.randn(128, 1024, requires_grad=True)
    penalties = {}
    for execution, (model, _, _) in runs.items():
        (gx,) = torch.autograd.grad(model(x).square().sum(), x, create_graph=True)
        penalty = gx.square().sum()
        penalty.backward()  # through the backward: a gradient penalty
        penalties[execution] = (penalty, model[0].parametrizations.weight.original.grad)
    for execution in ("auto", "sparse"):
        for got, want in zip(penalties[execution], penalties["mask"], strict=True):
            torch.testing.assert_close(got, want, **TOL)
    tangent = torch.randn(128, 1024)
    jvps = {}
    for execution, (model, _, _) in runs.items():
        with (
            (
                pytest.warns(RuntimeWarning, match="forward-mode AD is active")
                if execution == "sparse"
                else warnings.catch_warnings()
            ),
            torch.autograd.forward_ad.dual_level(),
        ):
            dual = torch.autograd.forward_ad.make_dual(x.detach(), tangent)
            jvps[execution] = torch.autograd.forward_ad.unpack_dual(model(dual)).tangent
    for execution in ("auto", "sparse"):
        torch.testing.assert_close(jvps[execution], jvps["mask"], **TOL)


# -- export ---------------------------------------------------------------------------------


def test_export_matches_the_model_and_leaves_it_unchanged() -> None:
    runs = pair()
    model, optimizer, sparsifier = runs["sparse"]
    for x, y in data(steps=6):
        train_step(model, optimizer, x, y)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    exported = sparsifier.export(execution="sparse")
    assert_expected_inline(
        str(exported),
        """\
Sequential(
  (0): SparseLinear(in_features=48, out_features=64, nnz=307, bias=True)
  (1): ReLU()
  (2): SparseLinear(in_features=64, out_features=64, nnz=410, bias=False)
  (3): Tanh()
  (4): SparseLinear(in_features=64, out_features=10, nnz=64, bias=True)
)""",
    )
    assert not exported.training
    ((x, y),) = data(seed=9)
    with torch.no_grad():
        torch.testing.assert_close(exported(x), model(x), **TOL)
    buffer = io.BytesIO()
    torch.save(exported, buffer)  # a plain module: pickles
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=False)
    torch.testing.assert_close(loaded(x), exported(x))
    for key, value in model.state_dict().items():
        assert torch.equal(value, before[key])
    train_step(model, optimizer, x, y)  # the original still trains sparse
    check_invariants(sparsifier, optimizer, grads=True)
    assert [f.sparse_calls for f in forwards(sparsifier)] == [8, 8, 8]


def test_export_keeps_conv_layers_dense_and_in_dense_order() -> None:
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.Flatten(), nn.Linear(4 * 6 * 6, 5))
    st.sparsify(model, policy="static", sparsity=0.5, distribution="uniform")
    exported = export_sparse(model, execution="sparse")
    assert type(exported[0]) is nn.Conv2d and isinstance(exported[2], SparseLinear)
    assert list(exported.state_dict()) == [
        "0.weight", "0.bias", "2.weight", "2.bias"
    ]  # fmt: skip
    assert int((exported[0].weight == 0).sum()) == 54
    x = torch.randn(2, 3, 8, 8)
    torch.testing.assert_close(exported(x), model(x), **TOL)
    assert type(model[0]).__name__ == "ParametrizedConv2d"  # the model is untouched


def test_export_of_a_plain_model_uses_its_zeros_and_auto_skips_small_layers() -> None:
    model = nn.Sequential(nn.Linear(1024, 512), nn.Linear(512, 4))
    with torch.no_grad():
        for layer in model:
            layer.weight.mul_(torch.rand_like(layer.weight) < 0.02)
    auto = export_sparse(model)
    assert [type(m).__name__ for m in auto] == ["SparseLinear", "Linear"]
    assert [type(m).__name__ for m in export_sparse(model, execution="mask")] == [
        "Linear", "Linear"
    ]  # fmt: skip
    x = torch.randn(3, 1024)
    torch.testing.assert_close(auto(x), model(x), **TOL)


def test_export_rejects_bad_arguments() -> None:
    model = mlp()
    with pytest.raises(ValueError, match="Unknown execution 'fast'"):
        export_sparse(model, execution="fast")
    with pytest.raises(ValueError) as error:
        export_sparse(model, batch_size=0)
    assert_expected_inline(
        str(error.value), """batch_size must be an int >= 1, got 0."""
    )


def test_sparse_linear_rejects_a_non_matrix_weight() -> None:
    with pytest.raises(ValueError) as error:
        SparseLinear(torch.zeros(2, 3, 4), None)
    assert_expected_inline(
        str(error.value),
        """SparseLinear needs a dense 2-D weight, got shape (2, 3, 4) and layout torch.strided.""",
    )


# -- DistributedDataParallel ----------------------------------------------------------------


def _ddp_sparse_worker(rank: int, out: str) -> None:
    """Train in sparse mode under DDP (2 ranks, gloo) on halves of the batches."""
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo", init_method=f"file://{out}/store", rank=rank, world_size=2
    )
    try:
        runs = pair()
        model, optimizer, sparsifier = runs["sparse"]
        ddp = DDP(model)
        for x, y in data(steps=7):
            optimizer.zero_grad()
            half = slice(rank * 16, (rank + 1) * 16)
            nn.functional.cross_entropy(ddp(x[half]), y[half]).backward()
            optimizer.step()
        torch.save(
            {
                "masks": dict(sparsifier.masks),
                "weights": dict(model.state_dict()),
                "updates": sparsifier.update_count,
                "sparse_calls": [f.sparse_calls for f in forwards(sparsifier)],
            },
            os.path.join(out, f"rank{rank}.pt"),
        )
        del ddp  # its reducer's threads end before the process group does
        dist.barrier()
    finally:
        dist.destroy_process_group()
    exit_worker()


@pytest.mark.skipif(
    not dist.is_available() or not dist.is_gloo_available(), reason="needs gloo"
)
def test_ddp_sparse_ranks_match_a_single_process_mask_mode_run(
    tmp_path: pathlib.Path,
) -> None:
    mp.spawn(_ddp_sparse_worker, args=(str(tmp_path),), nprocs=2, join=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1)]
    model, optimizer, sparsifier = pair()["mask"]
    for x, y in data(steps=7):
        train_step(model, optimizer, x, y)
    assert sparsifier.update_count == 1
    for result in ranks:
        assert result["updates"] == 1
        assert result["sparse_calls"] == [7, 7, 7]
        for fqn, mask in sparsifier.masks.items():
            assert torch.equal(result["masks"][fqn], mask), fqn
        for key, value in model.state_dict().items():
            torch.testing.assert_close(result["weights"][key], value, **TOL)


def test_plan_is_the_same_with_and_without_numpy(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    mask = torch.rand(96, 70, generator=torch.Generator().manual_seed(0)) < 0.2
    with_numpy = execution_module._build_plan(mask)
    monkeypatch.setattr(policies_base, "_np", None)  # where the plan's search runs
    without = execution_module._build_plan(mask)
    weight = torch.randn(96, 70) * mask
    for plan in (with_numpy, without):
        values = weight.flatten()[plan.index]
        assert torch.equal(plan.csr(values).to_dense(), weight)
        assert torch.equal(plan.csr_t(values).to_dense(), weight.t())
    for field in ("index", "crow", "col"):
        assert torch.equal(getattr(with_numpy, field), getattr(without, field))
    assert with_numpy.transposed is not None and without.transposed is not None
    for a, b in zip(with_numpy.transposed, without.transposed, strict=True):
        assert torch.equal(a, b)


def test_first_layer_never_builds_the_transposed_structure() -> None:
    model, optimizer, sparsifier = big_runs("auto")
    for _ in range(2):
        optimizer.zero_grad()
        model(torch.randn(128, 1024)).sum().backward()  # the input needs no grad
        optimizer.step()
    (big,) = forwards(sparsifier)
    assert big.plan is not None and big.plan.transposed is None
    model(torch.randn(128, 1024, requires_grad=True)).sum().backward()
    assert big.plan.transposed is not None


def test_auto_sparse_products_take_sequence_inputs() -> None:
    runs = {e: big_runs(e) for e in ("mask", "auto")}
    x = torch.randn(2, 64, 1024)  # 128 rows: forward and input gradient sparse
    results = {}
    for execution, (model, _, _) in runs.items():
        xi = x.clone().requires_grad_(True)
        out = model(xi)
        out.square().sum().backward()
        weight = model[0].parametrizations.weight.original
        results[execution] = (out, xi.grad, weight.grad)
    for got, want in zip(results["auto"], results["mask"], strict=True):
        torch.testing.assert_close(got, want, **TOL)
    assert forwards(runs["auto"][2])[0].sparse_calls == 1


def test_tensor_subclass_inputs_take_the_plain_call() -> None:
    class Tagged(torch.Tensor):
        pass

    model, _, sparsifier = big_runs("sparse")
    x = torch.randn(128, 1024)
    with pytest.warns(RuntimeWarning, match="tensor subclass"):
        out = model(x.as_subclass(Tagged))
    assert [(f.sparse_calls, f.dense_calls) for f in forwards(sparsifier)] == [
        (0, 1),
        (0, 1),
    ]
    torch.testing.assert_close(out.as_subclass(torch.Tensor), model(x), **TOL)


def test_updates_reuse_the_kept_active_positions(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Sparse execution keeps each mask's sorted active positions with its
    # compressed structure; an update reads them instead of searching the mask,
    # and hands the new mask's positions to the next rebuild. They must always
    # be exactly the mask's, also after loading another topology.
    from sparsetorch.policies import base

    searched: list[int] = []
    search = base._nonzero

    def counting(flat: torch.Tensor) -> torch.Tensor:
        searched.append(flat.numel())
        return search(flat)

    monkeypatch.setattr(base, "_nonzero", counting)
    model, optimizer, sparsifier = big_runs("auto")
    reference = big_runs("mask")[2].state_dict()  # the same seed: other weights
    p = sparsifier.topology.parametrizations["0.weight"]
    (big,) = forwards(sparsifier)
    g = torch.Generator().manual_seed(3)

    def positions() -> torch.Tensor:
        return p.mask.flatten().nonzero().flatten()

    def step() -> None:
        optimizer.zero_grad()
        x = torch.randn(128, 1024, generator=g, requires_grad=True)
        model(x).square().mean().backward()
        assert big.plan is not None  # built for this forward
        assert torch.equal(big.plan.index.long(), positions())
        assert p.active_positions() is big.plan.index  # shared, not a copy
        updates = sparsifier.update_count
        optimizer.step()
        if sparsifier.update_count > updates:  # the update's, for the next rebuild
            found = p.active_positions()
            assert found is not None and torch.equal(found.long(), positions())

    for _ in range(9):
        step()
    assert sparsifier.update_count == 2
    assert 512 * 1024 not in searched  # neither update searched the big mask
    sparsifier.load_state_dict(reference)  # other masks: the kept positions are stale
    assert p.active_positions() is None
    step()
    mask_mode = big_runs("mask")[2]
    assert all(p.active is None for p in mask_mode.topology.parametrizations.values())


def test_kept_positions_are_void_once_the_mask_changes_or_is_replaced() -> None:
    p = st.MaskParametrization(torch.tensor([True, False, True]))
    positions = torch.tensor([0, 2])
    p.keep_active_positions(positions)
    assert p.active_positions() is positions
    p.mask[1] = True  # any in-place write
    assert p.active_positions() is None
    p.keep_active_positions(torch.tensor([0, 1, 2]))
    p.mask = p.mask.clone()  # a new tensor, as a device move makes
    assert p.active_positions() is None
