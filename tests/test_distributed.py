"""torch.distributed on CPU: 2 processes on gloo, DDP and FSDP2 (``fully_shard``).

One ``torch.multiprocessing.spawn`` of 2 ranks runs every scenario below (process
start-up dominates the cost on a small machine); each scenario saves plain
results that the tests compare across ranks and against a single-process run
on the same global batch.
"""

from __future__ import annotations

import os
import subprocess
import sys
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from conftest import exit_worker, small_mlp, small_sparse, train_step
from expecttest import assert_expected_inline
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel as DDP

import sparsetorch as st

WORLD = 2
STEPS = 6  # updates at steps 2, 4, 6
LOCAL = 16  # samples per rank per step; the global batch is WORLD * LOCAL

pytestmark = pytest.mark.skipif(
    not dist.is_available() or not dist.is_gloo_available(),
    reason="needs torch.distributed with gloo",
)


# -- what every rank (and the single-process reference) trains ----------------------


def _sparse(
    policy: str = "rigl", seed: int = 0
) -> tuple[nn.Module, torch.optim.Optimizer, st.Sparsifier]:
    return small_sparse(
        lambda m: torch.optim.SGD(m.parameters(), lr=0.1, momentum=0.9),
        policy=policy,
        total_steps=100,
        seed=seed,
    )


def _global_batch(step: int) -> tuple[Tensor, Tensor]:
    g = torch.Generator().manual_seed(100 + step)
    return torch.randn(WORLD * LOCAL, 12, generator=g), torch.randint(
        0, 6, (WORLD * LOCAL,), generator=g
    )


def _local_batch(step: int, rank: int) -> tuple[Tensor, Tensor]:
    x, y = _global_batch(step)
    return x[rank * LOCAL : (rank + 1) * LOCAL], y[rank * LOCAL : (rank + 1) * LOCAL]


def _masks(sparsifier: st.Sparsifier) -> dict[str, Tensor]:
    return {fqn: m.clone() for fqn, m in sparsifier.masks.items()}


def _weights(model: nn.Module) -> dict[str, Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


_ALL_REDUCE = dist.all_reduce


class _Spy:
    """Record what sparsetorch and DDP send through torch.distributed."""

    def __init__(self) -> None:
        self.all_reduces: list[tuple[str, int]] = []  # (dtype, numel)
        self.broadcasts: list[list[tuple[str, int]]] = []
        self._all_reduce = dist.all_reduce
        self._broadcast_coalesced = dist._broadcast_coalesced

    def __enter__(self) -> _Spy:
        def all_reduce(tensor: Tensor, *args: Any, **kwargs: Any) -> Any:
            self.all_reduces.append((str(tensor.dtype), tensor.numel()))
            return self._all_reduce(tensor, *args, **kwargs)

        def broadcast_coalesced(pg: Any, tensors: list[Tensor], *a: Any) -> Any:
            self.broadcasts.append([(str(t.dtype), t.numel()) for t in tensors])
            return self._broadcast_coalesced(pg, tensors, *a)

        dist.all_reduce = all_reduce
        dist._broadcast_coalesced = broadcast_coalesced
        return self

    def __exit__(self, *exc: object) -> None:
        dist.all_reduce = self._all_reduce
        dist._broadcast_coalesced = self._broadcast_coalesced


# -- scenarios (run on every rank) --------------------------------------------------


def _ddp_training(
    rank: int, out: str, micro: str, wrap_first: bool = False, **ddp_options: Any
) -> dict[str, Any]:
    """RigL under DDP for STEPS steps; ``micro``: "none", "sync" or "no_sync".

    ``wrap_first``: wrap the plain model in DDP (with ``ddp_options``), register
    the spy communication hook, then sparsify the wrapper, instead of
    sparsifying and then wrapping.
    """
    masks_by_param: dict[int, Tensor] = {}
    if wrap_first:
        torch.manual_seed(0)  # small_sparse's model and optimizer, wrapped first
        model = small_mlp()
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
        ddp = DDP(model, **ddp_options)
    else:
        model, optimizer, sparsifier = _sparse()
        ddp = DDP(model, **ddp_options)
    outside: list[int] = []  # DDP's view of each masked grad, outside the mask
    inside: list[int] = []
    if micro == "none":

        def spy_hook(state, bucket):  # type: ignore[no-untyped-def]
            # (No annotations: DDP checks them, and they are strings here.)
            for grad, param in zip(
                bucket.gradients(), bucket.parameters(), strict=True
            ):
                mask = masks_by_param.get(id(param))
                if mask is not None:
                    outside.append(int(grad[~mask].count_nonzero()))
                    inside.append(int(grad[mask].count_nonzero()))
            # DDP's own averaging, through the unspied all_reduce.
            buffer = bucket.buffer().div_(WORLD)
            work = _ALL_REDUCE(buffer, async_op=True)
            return work.get_future().then(lambda fut: fut.value()[0])

        ddp.register_comm_hook(None, spy_hook)
    if wrap_first:
        sparsifier = st.sparsify(
            ddp,
            optimizer,
            sparsity=0.75,
            distribution="uniform",
            total_steps=100,
            update_interval=2,
            drop_fraction=0.5,
        )
    masks_by_param.update(
        {id(p): sparsifier.masks[fqn] for fqn, p in sparsifier.topology.params.items()}
    )
    initial = _masks(sparsifier)
    masks, per_step_sizes = [], []
    with _Spy() as spy:
        for step in range(1, STEPS + 1):
            x, y = _local_batch(step, rank)
            optimizer.zero_grad()
            before = len(spy.all_reduces)
            if micro == "none":
                F.cross_entropy(ddp(x), y).backward()
            else:
                for i, (xs, ys) in enumerate(zip(x.chunk(2), y.chunk(2), strict=True)):
                    if micro == "no_sync" and i == 0:
                        with ddp.no_sync():
                            (F.cross_entropy(ddp(xs), ys) / 2).backward()
                    else:
                        (F.cross_entropy(ddp(xs), ys) / 2).backward()
            optimizer.step()
            per_step_sizes.append(spy.all_reduces[before:])
            masks.append(_masks(sparsifier))
    result = {
        "initial": initial,
        "masks": masks,
        "weights": _weights(model),
        "updates": sparsifier.update_count,
        "all_reduces_per_step": per_step_sizes,
        "buffer_broadcasts": len(spy.broadcasts),
        "ddp_buffers": sorted(ddp.named_module_buffers),
        "ignored": sorted(ddp.parameters_to_ignore),
        "grad_nonzeros_outside_masks": outside,
        "grad_nonzeros_inside_masks": inside,
    }
    if micro == "none" and not wrap_first:
        result.update(_checkpoint_resume(rank, out, ddp, model, optimizer, sparsifier))
    return result


def _checkpoint_resume(
    rank: int,
    out: str,
    ddp: DDP,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    sparsifier: st.Sparsifier,
) -> dict[str, Any]:
    """Rank 0 saves; every rank resumes a fresh model; compare with going on."""
    path = os.path.join(out, "checkpoint.pt")
    if rank == 0:
        torch.save(
            {
                "model": model.state_dict(),
                "optimizer": optimizer.state_dict(),
                "sparsity": sparsifier.state_dict(),
            },
            path,
        )
    dist.barrier()
    torch.manual_seed(1000 + rank)  # other weights and masks: the load must win
    fresh = small_mlp()
    fresh_opt = torch.optim.SGD(fresh.parameters(), lr=0.1, momentum=0.9)
    fresh_sp = st.sparsify(
        fresh,
        fresh_opt,
        sparsity=0.75,
        distribution="uniform",
        total_steps=100,
        update_interval=2,
        drop_fraction=0.5,
        seed=1000 + rank,
    )
    checkpoint = torch.load(path, weights_only=True)
    fresh.load_state_dict(checkpoint["model"])
    fresh_opt.load_state_dict(checkpoint["optimizer"])
    fresh_sp.load_state_dict(checkpoint["sparsity"])
    fresh_ddp = DDP(fresh)
    for step in (STEPS + 1, STEPS + 2):  # the second one updates
        x, y = _local_batch(step, rank)
        for m, opt in ((ddp, optimizer), (fresh_ddp, fresh_opt)):
            train_step(m, opt, x, y)
    return {
        "resumed_masks": _masks(fresh_sp),
        "resumed_weights": _weights(fresh),
        "resumed_updates": fresh_sp.update_count,
        "continued_masks": _masks(sparsifier),
        "continued_weights": _weights(model),
    }


def _set_with_rank_seeds(rank: int, out: str) -> dict[str, Any]:
    """SET grows at random: each rank seeds differently; rank 0's stream wins."""
    model, optimizer, sparsifier = _sparse(policy="set", seed=rank)
    initial = _masks(sparsifier)
    ddp = DDP(model)
    masks = []
    for step in range(1, 5):
        x, y = _local_batch(step, rank)
        train_step(ddp, optimizer, x, y)
        masks.append(_masks(sparsifier))
    return {"initial": initial, "masks": masks, "updates": sparsifier.update_count}


def _batchnorm_buffers(rank: int, out: str) -> dict[str, Any]:
    """DDP still broadcasts BatchNorm's buffers every forward, never the masks."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(12, 24), nn.BatchNorm1d(24), nn.Linear(24, 6))
    st.sparsify(model, policy="static", sparsity=0.5)
    ddp = DDP(model)
    with _Spy() as spy:
        for step in (1, 2):
            ddp(_local_batch(step, rank)[0]).sum().backward()
    return {
        "broadcasts": spy.broadcasts,
        "ddp_buffers": sorted(ddp.named_module_buffers),
    }


def _errors(rank: int, out: str) -> dict[str, Any]:
    from torch.distributed.fsdp import fully_shard

    messages = {}
    model = small_mlp()
    holder = nn.Sequential(DDP(model))  # a DDP inside another module
    try:
        st.sparsify(holder, policy="static")
    except RuntimeError as error:
        messages["ddp"] = str(error)
    messages["ddp_untouched"] = not hasattr(model[0], "parametrizations")

    sharded = small_mlp()
    fully_shard(sharded)
    try:
        st.sparsify(sharded, policy="static")
    except RuntimeError as error:
        messages["fsdp"] = str(error)
    messages["fsdp_untouched"] = not hasattr(sharded[0], "parametrizations")
    return messages


def _average_buckets(rank: int, out: str) -> dict[str, Any]:
    """``average_`` in buckets: in place, any dtype, contiguous or not."""
    g = torch.Generator().manual_seed(7)
    base = [
        torch.randn(3, 4, generator=g),  # 12: a bucket of its own (fp32, in place)
        torch.randn(5, generator=g).bfloat16(),  # 5 + 4: one bucket, via fp32
        torch.randn(4, generator=g),
        torch.randn(4, 3, generator=g).t(),  # non-contiguous, a bucket alone
        torch.randn(30, generator=g),  # larger than a bucket: alone
    ]
    tensors = [t * (rank + 1) for t in base]
    with _Spy() as spy:
        st._distributed.average_(tensors, bucket_numel=10)
    return {"base": base, "averaged": tensors, "all_reduces": spy.all_reduces}


def _rigl_scheduler_on_ddp(rank: int, out: str) -> dict[str, Any]:
    """rigl-torch's order: wrap in DDP, then build the RigLScheduler on the wrapper."""
    torch.manual_seed(0)
    model = small_mlp()
    ddp = DDP(model)
    optimizer = torch.optim.SGD(ddp.parameters(), lr=0.1, momentum=0.9)
    pruner = st.RigLScheduler(
        ddp, optimizer, 0.25, T_end=8, delta=2, ignore_linear_layers=False
    )
    masks, returned = [], []
    for step in range(1, STEPS + 1):
        x, y = _local_batch(step, rank)
        optimizer.zero_grad()
        F.cross_entropy(ddp(x), y).backward()
        returned.append(pruner())
        if returned[-1]:
            optimizer.step()
        masks.append({k: m.clone() for k, m in pruner.masks.items()})
    return {
        "masks": masks,
        "sparse_layers": [m is not None for m in pruner.backward_masks],
        "returned": returned,
        "weights": _weights(model),
        "model_is_wrapper": pruner.model is ddp,
        "W_are_inner_weights": [
            w is p
            for w, p in zip(
                pruner.W,
                (model[0].weight, model[2].parametrizations.weight.original),
                strict=True,
            )
        ],
        "ddp_buffers": sorted(ddp.named_module_buffers),
    }


def _rigl_scheduler_single_process() -> dict[str, Any]:
    torch.manual_seed(0)
    model = small_mlp()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    pruner = st.RigLScheduler(
        model, optimizer, 0.25, T_end=8, delta=2, ignore_linear_layers=False
    )
    masks = []
    for step in range(1, STEPS + 1):
        x, y = _global_batch(step)
        optimizer.zero_grad()
        F.cross_entropy(model(x), y).backward()
        if pruner():
            optimizer.step()
        masks.append({k: m.clone() for k, m in pruner.masks.items()})
    return {"masks": masks, "weights": _weights(model)}


def _guard_inner_module_sparsified(rank: int, out: str) -> dict[str, Any]:
    """The wrong order: wrapped, then the inner module sparsified.

    DDP's hooks on the masked weights are lost, and find_unused_parameters=True
    hides it: each rank keeps its own gradients until the guard stops the run
    at the first update.
    """
    torch.manual_seed(0)
    model = small_mlp()
    ddp = DDP(model, find_unused_parameters=True)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    sparsifier = st.sparsify(
        model,  # not the wrapper
        optimizer,
        sparsity=0.75,
        distribution="uniform",
        total_steps=100,
        update_interval=2,
        drop_fraction=0.5,
    )
    return _train_until_the_guard_stops(ddp, optimizer, sparsifier, rank)


def _train_until_the_guard_stops(
    ddp: nn.Module,
    optimizer: torch.optim.Optimizer,
    sparsifier: st.Sparsifier,
    rank: int,
) -> dict[str, Any]:
    """Train up to ``STEPS`` steps; the guard's message and the step it stopped at."""
    result: dict[str, Any] = {}
    for step in range(1, STEPS + 1):
        x, y = _local_batch(step, rank)
        try:
            train_step(ddp, optimizer, x, y)
        except RuntimeError as error:
            result["guard"] = str(error)
            break
    result["stopped_at"] = sparsifier.step_count
    return result


def _guard_one_rank_reseeds(rank: int, out: str) -> dict[str, Any]:
    """SET grows at random: rank 1 reseeds its generator after sparsify."""
    model, optimizer, sparsifier = _sparse(policy="set")
    ddp = DDP(model)
    if rank == 1:
        sparsifier.generator.manual_seed(1)
    return _train_until_the_guard_stops(ddp, optimizer, sparsifier, rank)


def _ignored_weight_stays_ignored(rank: int, out: str) -> dict[str, Any]:
    """A weight DDP was told to ignore is still ignored under its new name."""
    torch.manual_seed(0)
    model = small_mlp()
    DDP._set_params_and_buffers_to_ignore_for_model(model, ["2.weight"])
    ddp = DDP(model)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    st.sparsify(ddp, optimizer, policy="static", sparsity=0.5)
    for step in (1, 2):
        train_step(ddp, optimizer, *_local_batch(step, rank))
    return {"weights": _weights(model), "ignored": sorted(ddp.parameters_to_ignore)}


SCENARIOS: dict[str, Callable[[int, str], dict[str, Any]]] = {
    "ddp": lambda rank, out: _ddp_training(rank, out, "none"),
    "ddp_wrapped_first": lambda rank, out: _ddp_training(
        rank, out, "none", wrap_first=True
    ),
    "ddp_wrapped_first_unused": lambda rank, out: _ddp_training(
        rank, out, "none", wrap_first=True, find_unused_parameters=True
    ),
    "ddp_wrapped_first_static_graph": lambda rank, out: _ddp_training(
        rank, out, "none", wrap_first=True, static_graph=True
    ),
    "ddp_wrapped_first_no_sync": lambda rank, out: _ddp_training(
        rank, out, "no_sync", wrap_first=True
    ),
    "ddp_wrapped_first_bucket_view": lambda rank, out: _ddp_training(
        rank, out, "none", wrap_first=True, gradient_as_bucket_view=True
    ),
    "ddp_wrapped_first_ignored": _ignored_weight_stays_ignored,
    "rigl_scheduler_ddp": _rigl_scheduler_on_ddp,
    "guard_inner": _guard_inner_module_sparsified,
    "guard_reseeded": _guard_one_rank_reseeds,
    "ddp_accumulate_sync": lambda rank, out: _ddp_training(rank, out, "sync"),
    "ddp_accumulate_no_sync": lambda rank, out: _ddp_training(rank, out, "no_sync"),
    "set_rank_seeds": _set_with_rank_seeds,
    "batchnorm": _batchnorm_buffers,
    "errors": _errors,
    "average": _average_buckets,
}


def _worker(rank: int, out: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo",
        init_method=f"file://{out}/store",
        rank=rank,
        world_size=WORLD,
    )
    results: dict[str, Any] = {}
    try:
        for name, scenario in SCENARIOS.items():
            try:
                results[name] = scenario(rank, out)
            except Exception:  # reported by the test of that scenario
                results[name] = {"error": traceback.format_exc()}
            dist.barrier()
    finally:
        dist.destroy_process_group()
    torch.save(results, os.path.join(out, f"rank{rank}.pt"))
    exit_worker()


@pytest.fixture(scope="module")
def ranks(tmp_path_factory: pytest.TempPathFactory) -> list[dict[str, Any]]:
    out = tmp_path_factory.mktemp("distributed")
    mp.spawn(_worker, args=(str(out),), nprocs=WORLD, join=True)
    return [torch.load(out / f"rank{r}.pt", weights_only=True) for r in range(WORLD)]


def _scenario(ranks: list[dict[str, Any]], name: str) -> list[dict[str, Any]]:
    results = [r[name] for r in ranks]
    for rank, result in enumerate(results):
        assert "error" not in result, f"rank {rank}:\n{result.get('error')}"
    return results


@pytest.fixture(scope="module")
def single_process() -> dict[str, Any]:
    """The same training in one process on the global batch."""
    model, optimizer, sparsifier = _sparse()
    masks = []
    for step in range(1, STEPS + 1):
        x, y = _global_batch(step)
        train_step(model, optimizer, x, y)
        masks.append(_masks(sparsifier))
    return {
        "masks": masks,
        "weights": _weights(model),
        "updates": sparsifier.update_count,
    }


def _assert_same_masks(a: dict[str, Tensor], b: dict[str, Tensor]) -> None:
    assert list(a) == list(b)
    for fqn in a:
        assert torch.equal(a[fqn], b[fqn]), fqn


# -- DDP ----------------------------------------------------------------------------


WRAPPED_FIRST = [
    "ddp_wrapped_first",
    "ddp_wrapped_first_unused",
    "ddp_wrapped_first_static_graph",
    "ddp_wrapped_first_bucket_view",
    "ddp_wrapped_first_no_sync",
]


@pytest.mark.parametrize(
    "scenario",
    ["ddp", "ddp_accumulate_sync", "ddp_accumulate_no_sync", *WRAPPED_FIRST],
)
def test_ddp_ranks_hold_identical_masks_equal_to_single_process_run(
    ranks: list[dict[str, Any]], single_process: dict[str, Any], scenario: str
):
    r0, r1 = _scenario(ranks, scenario)
    _assert_same_masks(r0["initial"], r1["initial"])
    assert r0["updates"] == r1["updates"] == single_process["updates"] == 3
    for step in range(STEPS):
        _assert_same_masks(r0["masks"][step], r1["masks"][step])
        # RigL, same seed, same global batch: the same topology as one process.
        _assert_same_masks(r0["masks"][step], single_process["masks"][step])
    changed = [
        step + 1
        for step in range(1, STEPS)
        if any(
            not torch.equal(r0["masks"][step][f], r0["masks"][step - 1][f])
            for f in r0["masks"][step]
        )
    ]
    assert changed == [2, 4, 6]
    for key, value in r0["weights"].items():
        assert torch.equal(value, r1["weights"][key]), key
        torch.testing.assert_close(
            value, single_process["weights"][key], rtol=0, atol=1e-5
        )


@pytest.mark.parametrize(
    ("scenario", "reference"),
    [
        ("ddp_wrapped_first", "ddp"),
        ("ddp_wrapped_first_unused", "ddp"),
        ("ddp_wrapped_first_static_graph", "ddp"),
        ("ddp_wrapped_first_bucket_view", "ddp"),
        ("ddp_wrapped_first_no_sync", "ddp_accumulate_no_sync"),
    ],
)
def test_sparsifying_a_ddp_wrapped_model_equals_sparsify_then_wrap_bit_for_bit(
    ranks: list[dict[str, Any]], scenario: str, reference: str
):
    # The rebuilt reducer has the same parameters in the same buckets as the
    # reducer of a DDP built after sparsify: the same sums, bit for bit.
    for wrapped, expected in zip(
        _scenario(ranks, scenario), _scenario(ranks, reference), strict=True
    ):
        _assert_same_masks(wrapped["initial"], expected["initial"])
        for step in range(STEPS):
            _assert_same_masks(wrapped["masks"][step], expected["masks"][step])
        assert list(wrapped["weights"]) == list(expected["weights"])
        for key, value in wrapped["weights"].items():
            assert torch.equal(value, expected["weights"][key]), key


@pytest.mark.parametrize("scenario", ["ddp", *WRAPPED_FIRST])
def test_ddp_broadcasts_no_masks_between_or_at_updates(
    ranks: list[dict[str, Any]], scenario: str
):
    for result in _scenario(ranks, scenario):
        assert result["ddp_buffers"] == []
        assert result["ignored"] == [
            "0.parametrizations.weight.0.mask",
            "2.parametrizations.weight.0.mask",
        ]
        assert result["buffer_broadcasts"] == 0


def test_ddp_still_broadcasts_batchnorm_buffers_but_not_masks(
    ranks: list[dict[str, Any]],
):
    for result in _scenario(ranks, "batchnorm"):
        assert result["ddp_buffers"] == [
            "1.num_batches_tracked",
            "1.running_mean",
            "1.running_var",
        ]
        per_forward = [("torch.float32", 24), ("torch.float32", 24), ("torch.int64", 1)]
        assert result["broadcasts"] == [per_forward, per_forward]


def test_sparsetorch_all_reduces_4_bytes_per_masked_weight_per_update_only(
    ranks: list[dict[str, Any]],
):
    masked = 12 * 24 + 24 * 6
    for result in _scenario(ranks, "ddp"):
        sizes = result["all_reduces_per_step"]
        assert sizes[0::2] == [[]] * (STEPS // 2)  # nothing between updates
        for update in sizes[1::2]:
            # The dense gradients in one fp32 bucket, then the rank guard's
            # checksum: 8 int64 (64 bytes).
            assert [n for dtype, n in update if dtype == "torch.float32"] == [masked]
            assert [n for dtype, n in update if dtype == "torch.int64"] == [8]
            small = [
                (d, n) for d, n in update if d not in ("torch.float32", "torch.int64")
            ]
            assert sum(n for _, n in small) <= 8  # per-tensor flags, if any


def test_average_is_the_mean_over_ranks_in_fp32_buckets(ranks: list[dict[str, Any]]):
    for result in _scenario(ranks, "average"):
        # Buckets of <= 10 elements: [12], [5 bf16 + 4], [12 non-contiguous], [30].
        assert result["all_reduces"] == [
            ("torch.float32", 12),
            ("torch.float32", 9),
            ("torch.float32", 12),
            ("torch.float32", 30),
        ]
        for base, averaged in zip(result["base"], result["averaged"], strict=True):
            assert averaged.dtype == base.dtype
            assert averaged.shape == base.shape
            expected = (base.float() * 1 + base.float() * 2) / 2  # ranks 0 and 1
            torch.testing.assert_close(
                averaged.float(), expected.to(base.dtype).float()
            )


def test_ddp_all_reduces_masked_gradients(ranks: list[dict[str, Any]]):
    # sparsetorch's post-accumulate-grad hook masks .grad before DDP's reducer
    # copies it into the bucket: DDP sees zeros outside every mask.
    for result in _scenario(ranks, "ddp"):
        # 2 masked weights, STEPS steps and 2 after the checkpoint.
        assert result["grad_nonzeros_outside_masks"] == [0] * (2 * (STEPS + 2))
        assert min(result["grad_nonzeros_inside_masks"]) > 0


@pytest.mark.parametrize("scenario", WRAPPED_FIRST[:4])
def test_ddp_wrapped_before_sparsify_all_reduces_masked_gradients(
    ranks: list[dict[str, Any]], scenario: str
):
    # The communication hook was registered before sparsify: it survives the
    # reducer's rebuild and sees both masked weights at every step.
    for result in _scenario(ranks, scenario):
        assert result["grad_nonzeros_outside_masks"] == [0] * (2 * STEPS)
        assert min(result["grad_nonzeros_inside_masks"]) > 0


def test_a_weight_ddp_ignores_stays_ignored_after_sparsifying_the_wrapper(
    ranks: list[dict[str, Any]],
):
    r0, r1 = _scenario(ranks, "ddp_wrapped_first_ignored")
    assert r0["ignored"] == [
        "0.parametrizations.weight.0.mask",
        "2.parametrizations.weight.0.mask",
        "2.parametrizations.weight.original",
        "2.weight",
    ]
    # Each rank trains its own 2.weight on its own data; the rest is all-reduced.
    assert not torch.equal(r0["weights"]["2.weight"], r1["weights"]["2.weight"])
    for key in ("0.weight", "0.bias", "2.bias"):
        assert torch.equal(r0["weights"][key], r1["weights"][key]), key


def test_rigl_scheduler_on_a_ddp_wrapped_model_keeps_ranks_identical(
    ranks: list[dict[str, Any]],
):
    r0, r1 = _scenario(ranks, "rigl_scheduler_ddp")
    single = _rigl_scheduler_single_process()
    assert r0["returned"] == [True, False, True, False, True, False]
    assert r0["model_is_wrapper"] and r0["W_are_inner_weights"] == [True, True]
    assert r0["sparse_layers"] == [False, True]  # uniform: the first layer dense
    assert r0["ddp_buffers"] == []
    for step in range(STEPS):
        _assert_same_masks(r0["masks"][step], r1["masks"][step])
        _assert_same_masks(r0["masks"][step], single["masks"][step])
    assert not torch.equal(r0["masks"][-1]["2.weight"], r0["masks"][0]["2.weight"])
    for key, value in r0["weights"].items():
        assert torch.equal(value, r1["weights"][key]), key
        torch.testing.assert_close(value, single["weights"][key], rtol=0, atol=1e-5)


def test_rank_guard_stops_every_rank_when_the_inner_module_was_sparsified(
    ranks: list[dict[str, Any]],
):
    results = _scenario(ranks, "guard_inner")
    for result in results:
        assert result["stopped_at"] == 2  # at the first update
        assert result["guard"] is not None
    message = results[0]["guard"].splitlines()
    assert message[1].startswith("checksum on rank 0: ")
    del message[1]  # the checksums
    assert_expected_inline(
        "\n".join(message),
        """\
The masked weights differ between ranks at the topology update of step 2: the ranks no longer train the same model.
Usually DistributedDataParallel did not all-reduce the masked weights' gradients, so each rank's weights (and then its masks) drifted: the model was wrapped in DistributedDataParallel before sparsify() was called on the inner module (a Lightning or Accelerate model, say). find_unused_parameters=True does not fix that: it only silences DDP's error, and each rank keeps its own gradients.
Use one of the orders that work: sparsifier = sparsify(model, optimizer, ...), then model = DistributedDataParallel(model); or pass the wrapper itself: sparsify(ddp_model, optimizer, ...). Every rank must also load the same checkpoint.""",
    )


def test_rank_guard_stops_every_rank_when_their_masks_differ(
    ranks: list[dict[str, Any]],
):
    for result in _scenario(ranks, "guard_reseeded"):
        assert result["stopped_at"] == 2
        assert result["guard"] is not None
        assert result["guard"].startswith(
            "The masks differ between ranks at the topology update of step 2: "
            "the ranks no longer train the same model.\n"
        )


def test_checksum_tells_masks_and_weights_apart() -> None:
    checksum = st._distributed.checksum
    a = torch.tensor([[True, False], [False, True]])
    b = torch.tensor([[False, True], [True, False]])  # same count, other places
    w = torch.tensor([[0.5, 0.0], [0.0, -2.0]])
    sums = checksum([a, b], [w, w]).tolist()
    assert sums[0] == 4  # active weights
    assert sums[3] == 4 * int(w.view(torch.int32).sum())  # bits, (1 + 3) times
    assert sums != checksum([b, a], [w, w]).tolist()  # other positions
    assert sums != checksum([a, a], [w, w]).tolist()
    assert sums != checksum([a, b], [w, w.neg()]).tolist()  # other weights
    assert sums != checksum([a, b], [w, w.bfloat16()]).tolist()
    assert sums == checksum([a.clone(), b.clone()], [w.clone(), w.clone()]).tolist()


def test_checkpoint_saved_on_rank_0_resumes_every_rank_exactly(
    ranks: list[dict[str, Any]],
):
    for result in _scenario(ranks, "ddp"):
        assert result["resumed_updates"] == 4
        _assert_same_masks(result["resumed_masks"], result["continued_masks"])
        assert not all(
            torch.equal(result["resumed_masks"][f], result["masks"][-1][f])
            for f in result["masks"][-1]
        )  # the resumed run did update
        for key, value in result["resumed_weights"].items():
            assert torch.equal(value, result["continued_weights"][key]), key


def test_random_growth_is_identical_across_ranks_seeded_differently(
    ranks: list[dict[str, Any]],
):
    r0, r1 = _scenario(ranks, "set_rank_seeds")
    _, _, seed_0 = _sparse(policy="set", seed=0)
    _assert_same_masks(r0["initial"], seed_0.masks)  # rank 0's draw, everywhere
    _assert_same_masks(r1["initial"], seed_0.masks)
    assert r0["updates"] == r1["updates"] == 2
    for step in range(4):
        _assert_same_masks(r0["masks"][step], r1["masks"][step])
    assert not torch.equal(r0["masks"][-1]["0.weight"], r0["initial"]["0.weight"])


def test_sparsify_a_model_holding_a_ddp_inside_raises_and_changes_nothing(
    ranks: list[dict[str, Any]],
):
    result = _scenario(ranks, "errors")[0]
    assert result["ddp_untouched"]
    assert_expected_inline(
        result["ddp"],
        """\
Cannot sparsify a model holding a DistributedDataParallel wrapper ('0'): sparsetorch rebuilds the gradient reduction only of the wrapper passed to sparsify itself.
Pass that wrapper to sparsify(ddp_model, ...), or sparsify before wrapping: sparsifier = sparsify(model, optimizer, ...); model = DistributedDataParallel(model).""",
    )


# -- FSDP2 --------------------------------------------------------------------------


def test_sparsify_a_fully_sharded_model_raises_and_changes_nothing(
    ranks: list[dict[str, Any]],
):
    result = _scenario(ranks, "errors")[0]
    assert result["fsdp_untouched"]
    assert_expected_inline(
        result["fsdp"],
        """\
Cannot sparsify a model FSDP already shards: module '<root>' is a FSDPSequential.
sparsify() registers its masks on whole weights, and fully_shard then shards them with their weights; FSDP2 holds references to the modules' parameters that a later parametrization would bypass.
Call sparsify(model, ...) first, then fully_shard(...) on its blocks and on the root, then build the optimizer and sparsifier.attach_optimizer(optimizer). See docs/distributed.md.""",
    )


# -- the torchrun example -----------------------------------------------------------


def test_ddp_example_runs_under_torchrun_and_measures_the_bytes_per_update(
    tmp_path: Path,
):
    root = Path(__file__).resolve().parents[1]
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        f"--nproc_per_node={WORLD}",
        str(root / "examples" / "ddp.py"),
        "--steps=40",
        "--update-interval=10",
        "--hidden=32",
        "--accumulate=2",
        "--comm",
        f"--save={tmp_path / 'checkpoint.pt'}",
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(
        command, capture_output=True, text=True, timeout=120, env=env, cwd=tmp_path
    )
    assert done.returncode == 0, done.stderr[-3000:]
    lines = done.stdout.splitlines()
    assert "masks identical on 2 ranks: yes" in lines
    masked = 64 * 32 + 32 * 32 + 32 * 10  # updates at steps 10, 20 (end_step 30)
    (line,) = [line for line in lines if line.startswith("sparsetorch all-reduce: ")]
    total = int(line.split()[2].replace(",", ""))
    per_update = f"{total // 2:,}"
    assert line.endswith(
        f" B over 2 updates = {per_update} B per update = 4.02 B per masked "
        "weight per update"
    )
    # Per update: the dense gradients in fp32, the rank guard's 64 B, and one
    # byte per masked tensor saying whether it has a gradient, where sent.
    assert total - 2 * 4 * masked in (2 * 64, 2 * (64 + 3))
    checkpoint = torch.load(tmp_path / "checkpoint.pt", weights_only=True)
    assert checkpoint["sparsity"]["step"] == 40
