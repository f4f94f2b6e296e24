"""What keeps masked training cheap, held as exact facts rather than timings.

* The forward hands the stored weight through: no weight-sized copy.
* Between updates the only state beyond the dense model and optimizer is one
  bool mask (1 byte per masked weight); no dense gradient survives a step except
  the one captured for the next update, which the update releases.
* The fast update (one top-k over the active weights, one over the candidates,
  narrowed on the CPU by a sampled threshold) picks exactly the reference sets:
  drop the ``n_drop`` lowest ``|w|`` among the active weights, grow the
  ``n_drop`` highest scores among the positions not kept; ties at a cut are
  drawn by the generator.
"""

from __future__ import annotations

import pytest
import torch
from bench import live_bytes  # benchmarks/bench.py: its persistent-state measure
from torch import Tensor, nn

import sparsetorch as st
import sparsetorch.policies.base as policies_base
from sparsetorch.policies import RigL, update_mask
from sparsetorch.policies.base import _SAMPLE, _SPREAD, _top


@pytest.fixture(params=["numpy", "torch"])
def selection(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Run a test on the CPU fast path (numpy) and on the torch path (GPUs)."""
    if request.param == "torch":
        monkeypatch.setattr(policies_base, "_np", None)
    return str(request.param)


def mlp() -> nn.Sequential:
    return nn.Sequential(nn.Linear(20, 32), nn.ReLU(), nn.Linear(32, 4))


def step(model: nn.Module, optimizer: torch.optim.Optimizer, seed: int = 0) -> None:
    g = torch.Generator().manual_seed(seed)
    optimizer.zero_grad()
    model(torch.randn(8, 20, generator=g)).square().sum().backward()
    optimizer.step()


def test_forward_hands_the_stored_weight_through() -> None:
    model = mlp()
    st.sparsify(model, sparsity=0.9, distribution="uniform", policy="static")
    layer = model[0]
    assert layer.weight is layer.parametrizations.weight.original


def test_state_between_updates_is_one_byte_per_masked_weight() -> None:
    dense = mlp()
    sparse = mlp()
    dense_opt = torch.optim.SGD(dense.parameters(), lr=0.1, momentum=0.9)
    sparse_opt = torch.optim.SGD(sparse.parameters(), lr=0.1, momentum=0.9)
    sparsifier = st.sparsify(
        sparse, sparse_opt, sparsity=0.9, total_steps=100, update_interval=4
    )
    masked = sum(m.numel() for m in sparsifier.masks.values())
    extra = []
    for k in range(1, 10):
        step(dense, dense_opt, k)
        step(sparse, sparse_opt, k)
        extra.append(
            live_bytes(sparse, sparse_opt, sparsifier) - live_bytes(dense, dense_opt)
        )
    assert sparsifier.update_count == 2  # after steps 4 and 8
    assert masked == 20 * 32 + 32 * 4
    # The backward passes of steps 4 and 8 captured the dense gradient (4 bytes
    # per masked weight); the update inside their optimizer step released it.
    assert extra == [masked] * 9


def test_dense_gradient_lives_only_from_the_capturing_backward_to_the_update() -> None:
    model = mlp()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    sparsifier = st.sparsify(
        model, optimizer, sparsity=0.9, total_steps=100, update_interval=4
    )
    parametrizations = list(sparsifier.topology.parametrizations.values())
    masked = sum(m.numel() for m in sparsifier.masks.values())
    step(model, optimizer)  # step 1: the momentum buffers exist from here on
    x = torch.randn(8, 20)
    held = []
    for k in range(2, 10):
        optimizer.zero_grad()
        model(x).square().sum().backward()
        held.append(live_bytes(model, optimizer, sparsifier))
        assert all((p.dense_grad is not None) == (k % 4 == 0) for p in parametrizations)
        optimizer.step()
        assert all(p.dense_grad is None for p in parametrizations)
    assert sparsifier.update_count == 2
    extra = [h - held[0] for h in held]
    captured = 4 * masked  # float32 dense gradients, steps 4 and 8
    assert extra == [0, 0, captured, 0, 0, 0, captured, 0]


def test_gradient_is_masked_in_place_exactly() -> None:
    model = mlp()
    reference = mlp()
    reference.load_state_dict(model.state_dict())
    sparsifier = st.sparsify(model, sparsity=0.75, policy="static")
    x = torch.randn(8, 20)
    with torch.no_grad():
        for fqn, mask in sparsifier.masks.items():
            reference.get_parameter(fqn).mul_(mask)
    model(x).square().sum().backward()
    reference(x).square().sum().backward()
    for fqn, mask in sparsifier.masks.items():
        grad = sparsifier.topology.params[fqn].grad
        assert grad is not None
        expected = reference.get_parameter(fqn).grad
        assert expected is not None
        assert torch.equal(grad, expected * mask)


def reference_update(w: Tensor, m: Tensor, g: Tensor, n_drop: int) -> Tensor:
    """RigL by sorting, for scores without ties."""
    flat_w, flat_m, flat_g = w.flatten(), m.flatten(), g.flatten()
    active = flat_m.nonzero().flatten()
    order = flat_w[active].abs().argsort(descending=True)
    kept = active[order[: active.numel() - n_drop]]
    candidates = torch.ones_like(flat_m)
    candidates[kept] = False
    cand = candidates.nonzero().flatten()
    grown = cand[flat_g[cand].abs().argsort(descending=True)[:n_drop]]
    new = torch.zeros_like(flat_m)
    new[kept] = True
    new[grown] = True
    return new.view_as(m)


@pytest.mark.parametrize(
    ("shape", "density", "n_drop"),
    [
        ((40, 30), 0.2, 70),  # small: plain top-k
        ((300, 300), 0.1, 2700),  # over 2**16 weights: the narrowed top-k
        ((128, 64, 3, 3), 0.1, 500),  # a conv weight, narrowed
        ((300, 300), 0.5, 45000),  # half the tensor grows: plain top-k
    ],
)
def test_update_picks_exactly_the_reference_sets(
    shape: tuple[int, ...], density: float, n_drop: int, selection: str
) -> None:
    g = torch.Generator().manual_seed(7)
    n = torch.Size(shape).numel()
    m = torch.zeros(n, dtype=torch.bool)
    m[torch.randperm(n, generator=g)[: round(density * n)]] = True
    m = m.view(shape)
    w = torch.randn(shape, generator=g) * m
    grad = torch.randn(shape, generator=g)
    new = update_mask(RigL(), w, m, grad, n_drop, torch.Generator(), n_active=None)
    assert torch.equal(new, reference_update(w, m, grad, n_drop))
    same = update_mask(
        RigL(), w, m, grad, n_drop, torch.Generator(), n_active=int(m.sum())
    )
    assert torch.equal(same, new)


def test_narrowed_top_k_falls_back_when_the_sample_misleads(selection: str) -> None:
    n, k = 1 << 17, 3000
    scores = torch.rand(n, generator=torch.Generator().manual_seed(0))
    sampled = torch.arange(_SAMPLE).mul_(_SPREAD).remainder_(n)
    scores[sampled] += 10.0  # the sample sees only huge values: its floor is too high
    chosen = _top(scores, k, torch.Generator())
    assert chosen.numel() == k
    expected = scores.topk(k).indices
    assert set(chosen.tolist()) == set(expected.tolist())


def test_ties_at_the_cut_are_drawn_by_the_generator(selection: str) -> None:
    n, k = 1 << 17, 1000
    scores = torch.zeros(n)
    scores[:300] = 2.0  # always chosen
    scores[-5000:] = 1.0  # 700 of these 5000 tied scores are drawn
    picks = []
    for seed in (0, 0, 1):
        chosen = _top(scores, k, torch.Generator().manual_seed(seed))
        assert chosen.numel() == k
        assert chosen.unique().numel() == k
        assert set(range(300)) <= set(chosen.tolist())
        assert torch.all(scores[chosen] > 0)
        picks.append(set(chosen.tolist()))
    assert picks[0] == picks[1]
    assert picks[0] != picks[2]


def test_grow_scores_that_alias_the_gradient_are_left_alone(selection: str) -> None:
    class GradItself(RigL):
        def grow_score(
            self,
            weight: Tensor,
            mask: Tensor,
            grad: Tensor | None,
            generator: torch.Generator | None = None,
        ) -> Tensor:
            assert grad is not None
            return grad.view(-1)  # a view of the caller's tensor

    w = torch.randn(50)
    m = torch.zeros(50, dtype=torch.bool)
    m[::5] = True
    w = w * m
    grad = torch.rand(50)
    before = grad.clone()
    new = update_mask(GradItself(), w, m, grad, 4, torch.Generator())
    assert torch.equal(grad, before)
    assert int(new.sum()) == 10


def test_update_resets_adam_state_outside_the_kept_positions_only() -> None:
    model = mlp()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    sparsifier = st.sparsify(
        model, optimizer, sparsity=0.75, total_steps=100, update_interval=3
    )
    for k in range(1, 3):
        step(model, optimizer, k)
    fqn = "0.weight"
    param = sparsifier.topology.params[fqn]
    old = sparsifier.masks[fqn].clone()
    state = {key: v.clone() for key, v in optimizer.state[param].items()}
    step(model, optimizer, 3)  # steps, then updates
    assert sparsifier.update_count == 1
    new = sparsifier.masks[fqn]
    kept, grown = old & new, new & ~old
    assert int(grown.sum()) > 0
    for key in ("exp_avg", "exp_avg_sq"):
        value = optimizer.state[param][key]
        assert torch.count_nonzero(value[~kept]) == 0
        assert not torch.equal(value[kept], state[key][kept])  # it stepped first
    assert torch.count_nonzero(param[grown]) == 0
    assert torch.count_nonzero(param[~new]) == 0


@pytest.mark.parametrize("n", [5000, 1 << 17])
def test_numpy_and_torch_paths_choose_the_same_ties(
    n: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    g = torch.Generator().manual_seed(3)
    scores = torch.randint(0, 50, (n,), generator=g).float()  # ties everywhere
    k = n // 10
    fast = _top(scores, k, torch.Generator().manual_seed(5))
    monkeypatch.setattr(policies_base, "_np", None)
    plain = _top(scores, k, torch.Generator().manual_seed(5))
    assert fast.numel() == plain.numel() == k
    assert torch.equal(fast.sort().values, plain.sort().values)
