"""Reliability under DistributedDataParallel (2 gloo processes): a tensor that
gets a gradient on some ranks only (a mixture-of-experts expert that got no
tokens there) and an optimizer attached after ``sparsify``."""

from __future__ import annotations

import os
import traceback
from typing import Any

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from conftest import exit_worker
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel

import sparsetorch as st

WORLD = 2


class Experts(nn.Module):
    """Expert ``b`` runs only where ``use_b`` is set."""

    def __init__(self) -> None:
        super().__init__()
        self.inp = nn.Linear(8, 16)
        self.a = nn.Linear(16, 4)
        self.b = nn.Linear(16, 4)
        self.use_b = True

    def forward(self, x: Tensor) -> Tensor:
        h = torch.relu(self.inp(x))
        return self.a(h) + self.b(h) if self.use_b else self.a(h)


def _run(rank: int) -> dict[str, Any]:
    torch.manual_seed(0)
    model = Experts()
    sparsifier = st.sparsify(
        model,
        policy="rigl",
        sparsity=0.75,
        distribution="uniform",
        total_steps=1000,
        update_interval=2,
        drop_fraction=0.5,
    )
    ddp = DistributedDataParallel(model, find_unused_parameters=True)
    optimizer = torch.optim.SGD(ddp.parameters(), lr=0.05, momentum=0.9)
    sparsifier.attach_optimizer(optimizer)  # built after sparsify and the wrap
    b_before = sparsifier.masks["b.weight"].clone()
    g = torch.Generator().manual_seed(100 + rank)
    outside = []
    for step in range(1, 5):
        model.use_b = rank == 0 or step > 2  # rank 1's expert b idles at first
        x = torch.randn(4, 8, generator=g)
        optimizer.zero_grad()
        ddp(x).square().mean().backward()
        optimizer.step()
        for fqn, mask in sparsifier.masks.items():
            param = sparsifier.topology.params[fqn]
            outside.append(int(param[~mask].count_nonzero()))
            momentum = optimizer.state[param].get("momentum_buffer")
            if momentum is not None:
                outside.append(int(momentum[~mask].count_nonzero()))
    return {
        "masks": {f: m.clone() for f, m in sparsifier.masks.items()},
        "weights": {k: v.clone() for k, v in model.state_dict().items()},
        "b_changed": not torch.equal(sparsifier.masks["b.weight"], b_before),
        "updates": sparsifier.update_count,
        "missed": dict(sparsifier.missed_updates),
        "outside": sum(outside),
    }


def _worker(rank: int, out: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo", init_method=f"file://{out}/store", rank=rank, world_size=WORLD
    )
    try:
        result = _run(rank)
    except Exception:
        result = {"error": traceback.format_exc()}
    finally:
        dist.destroy_process_group()
    torch.save(result, os.path.join(out, f"rank{rank}.pt"))
    exit_worker()


@pytest.fixture(scope="module")
def ranks(tmp_path_factory: pytest.TempPathFactory) -> list[dict[str, Any]]:
    out = tmp_path_factory.mktemp("reliability_ddp")
    mp.spawn(_worker, args=(str(out),), nprocs=WORLD, join=True)
    results = [torch.load(out / f"rank{r}.pt", weights_only=True) for r in range(WORLD)]
    for rank, result in enumerate(results):
        assert "error" not in result, f"rank {rank}:\n{result.get('error')}"
    return results


def test_an_expert_idle_on_one_rank_updates_identically_on_every_rank(
    ranks: list[dict[str, Any]],
) -> None:
    zero, one = ranks
    assert zero["updates"] == one["updates"] == 2
    assert zero["b_changed"] and one["b_changed"]  # the other rank's gradient
    assert zero["missed"] == one["missed"] == {}
    for fqn, mask in zero["masks"].items():
        assert torch.equal(one["masks"][fqn], mask), fqn
    for key, value in zero["weights"].items():
        assert torch.equal(one["weights"][key], value), key
    assert zero["outside"] == one["outside"] == 0
