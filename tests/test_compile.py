"""torch.compile: a sparsified model compiles once, trains, and matches eager.

Masks change in place (``mask.copy_``) and the forward hands the stored weight
through, so a topology update changes no guard: the compiled graph is reused.
Most tests use the ``aot_eager`` backend (dynamo and AOT autograd, which is where
parametrizations and hooks could break or recompile, without inductor's C++ build
time); one test runs inductor, the default backend.
"""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import check_invariants, train_step
from torch import Tensor, nn
from torch._dynamo.testing import CompileCounterWithBackend

import sparsetorch as st


@pytest.fixture(autouse=True)
def _fresh_dynamo() -> None:
    torch._dynamo.reset()


def tiny() -> nn.Sequential:
    return nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))


def sparsified(
    model: nn.Module, policy: str = "rigl"
) -> tuple[st.Sparsifier, torch.optim.Optimizer]:
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    sparsifier = st.sparsify(
        model,
        optimizer,
        policy=policy,
        sparsity=0.75,
        distribution="uniform",
        update_interval=3,
        end_step=100,
        drop_fraction=0.3,
        drop_schedule="constant",
    )
    return sparsifier, optimizer


def batches(n: int) -> list[tuple[Tensor, Tensor]]:
    g = torch.Generator().manual_seed(1)
    return [
        (torch.randn(5, 8, generator=g), torch.randint(0, 4, (5,), generator=g))
        for _ in range(n)
    ]


def test_compiled_model_updates_masks_in_place_without_recompiling() -> None:
    model = tiny()
    sparsifier, optimizer = sparsified(model)
    counter = CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(model, backend=counter)
    buffers = {fqn: m.data_ptr() for fqn, m in sparsifier.masks.items()}
    initial = {fqn: m.clone() for fqn, m in sparsifier.masks.items()}
    data = batches(12)
    train_step(compiled, optimizer, *data[0])
    assert counter.frame_count == 1
    changed = 0
    with torch._dynamo.config.patch(error_on_recompile=True):
        for x, y in data[1:]:
            before = {fqn: m.clone() for fqn, m in sparsifier.masks.items()}
            train_step(compiled, optimizer, x, y)
            changed += any(
                not torch.equal(before[fqn], m) for fqn, m in sparsifier.masks.items()
            )
    assert sparsifier.update_count == 4  # after steps 3, 6, 9 and 12
    assert changed == 4
    assert counter.frame_count == 1
    assert {fqn: m.data_ptr() for fqn, m in sparsifier.masks.items()} == buffers
    assert any(not torch.equal(initial[f], m) for f, m in sparsifier.masks.items())
    params = sparsifier.topology.params.values()
    assert all("momentum_buffer" in optimizer.state[p] for p in params)
    check_invariants(sparsifier, optimizer)  # the momentum buffers masked too


def test_compiled_training_matches_eager_exactly() -> None:
    model = tiny()
    reference = copy.deepcopy(model)
    sparsifier, optimizer = sparsified(model)
    ref_sparsifier, ref_optimizer = sparsified(reference)
    compiled = torch.compile(model, backend="aot_eager")
    for x, y in batches(10):
        out = train_step(compiled, optimizer, x, y)
        ref_out = train_step(reference, ref_optimizer, x, y)
        assert torch.equal(out, ref_out)
    assert sparsifier.update_count == ref_sparsifier.update_count == 3
    for fqn, mask in sparsifier.masks.items():
        assert torch.equal(mask, ref_sparsifier.masks[fqn])
        assert torch.equal(
            sparsifier.topology.params[fqn], ref_sparsifier.topology.params[fqn]
        )


def test_compiled_model_captures_the_dense_gradient_only_before_an_update() -> None:
    model = tiny()
    sparsifier, optimizer = sparsified(model)
    compiled = torch.compile(model, backend="aot_eager")
    parametrizations = list(sparsifier.topology.parametrizations.values())
    kept = []
    for x, y in batches(3):
        optimizer.zero_grad()
        nn.functional.cross_entropy(compiled(x), y).backward()
        kept.append(all(p.dense_grad is not None for p in parametrizations))
        optimizer.step()
    assert kept == [False, False, True]  # the update is after step 3
    assert all(p.dense_grad is None for p in parametrizations)
    assert sparsifier.update_count == 1


def test_loading_a_state_dict_into_a_compiled_model_masks_it() -> None:
    model = tiny()
    sparsifier, optimizer = sparsified(model)
    counter = CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(model, backend=counter)
    x, y = batches(1)[0]
    train_step(compiled, optimizer, x, y)
    dense = {k: torch.randn_like(v) for k, v in model.state_dict().items()}
    model.load_state_dict(dense)
    compiled(x)  # the first forward re-masks the loaded weights
    for fqn, mask in sparsifier.masks.items():
        param = sparsifier.topology.params[fqn]
        assert torch.equal(param, dense[fqn] * mask)
    assert counter.frame_count == 2  # one graph with the re-masking, once
    with torch._dynamo.config.patch(error_on_recompile=True):
        for x, y in batches(4):
            train_step(compiled, optimizer, x, y)
    assert counter.frame_count == 2


@pytest.mark.slow
def test_inductor_trains_through_three_updates_like_eager() -> None:
    model = tiny()
    reference = copy.deepcopy(model)
    sparsifier, optimizer = sparsified(model)
    ref_sparsifier, ref_optimizer = sparsified(reference)
    counter = CompileCounterWithBackend("inductor")
    compiled = torch.compile(model, backend=counter)
    for x, y in batches(10):
        out = train_step(compiled, optimizer, x, y)
        ref_out = train_step(reference, ref_optimizer, x, y)
        torch.testing.assert_close(out, ref_out, rtol=1e-5, atol=1e-6)
    assert counter.frame_count == 1
    assert sparsifier.update_count == 3
    for fqn, mask in sparsifier.masks.items():
        assert torch.equal(mask, ref_sparsifier.masks[fqn])
    params = sparsifier.topology.params.values()
    assert all("momentum_buffer" in optimizer.state[p] for p in params)
    check_invariants(sparsifier, optimizer)  # the momentum buffers masked too


def test_auto_execution_compiles_to_one_graph_of_plain_calls() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(512, 512), nn.ReLU(), nn.Linear(512, 10))
    eager = copy.deepcopy(model)
    runs = []
    for m, execution in ((model, "auto"), (eager, "mask")):
        optimizer = torch.optim.SGD(m.parameters(), lr=0.1, momentum=0.9)
        sparsifier = st.sparsify(
            m, optimizer, policy="rigl", sparsity=0.9, distribution="uniform",
            update_interval=3, end_step=100, execution=execution,
        )  # fmt: skip
        runs.append((m, optimizer, sparsifier))
    counter = CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(model, backend=counter, fullgraph=True)
    g = torch.Generator().manual_seed(2)
    for _ in range(10):
        x = torch.randn(32, 512, generator=g)
        y = torch.randint(0, 10, (32,), generator=g)
        for forward, (_, optimizer, sparsifier) in zip(
            (compiled, eager), runs, strict=True
        ):
            optimizer.zero_grad()
            nn.functional.cross_entropy(forward(x), y).backward()
            optimizer.step()
            check_invariants(sparsifier, optimizer, grads=True)
    assert runs[0][2].update_count == runs[1][2].update_count == 3
    assert counter.frame_count == 1  # fullgraph: no break, no recompile
    for key, value in eager.state_dict().items():
        torch.testing.assert_close(model.state_dict()[key], value)
