"""The Accelerate recipe: sparsify before ``prepare``, checkpoint with Accelerate.

    sparsifier = st.sparsify(model, optimizer, ...)
    model, optimizer, scheduler = accelerator.prepare(model, optimizer, scheduler)
    accelerator.register_for_checkpointing(sparsifier)

``accelerator.save_state`` / ``load_state`` then resume bit-exactly, in one
process and in 2 processes on gloo.
"""

from __future__ import annotations

import os
import traceback
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from accelerate import Accelerator
from accelerate.state import AcceleratorState
from conftest import assert_same, exit_worker, spawn_ranks
from torch import Tensor, nn

import sparsetorch as st

STEPS, SAVE_AT = 8, 4  # updates at steps 2, 4 (end_step 6); saved after step 4


@pytest.fixture(autouse=True)
def _fresh_accelerate_state() -> Iterator[None]:
    AcceleratorState._reset_state(True)
    yield
    AcceleratorState._reset_state(True)


def build(
    seed: int = 0, **accelerator_args: Any
) -> tuple[Accelerator, nn.Module, Any, Any, st.Sparsifier]:
    """The recipe, in its order: sparsify, then prepare, then register."""
    accelerator = Accelerator(cpu=True, **accelerator_args)
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(20, 32), nn.ReLU(), nn.Linear(32, 4))
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.01, weight_decay=0.1)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=3, gamma=0.5)
    sparsifier = st.sparsify(
        model, optimizer, sparsity=0.8, update_interval=2, total_steps=STEPS
    )
    model, optimizer, scheduler = accelerator.prepare(model, optimizer, scheduler)
    accelerator.register_for_checkpointing(sparsifier)
    return accelerator, model, optimizer, scheduler, sparsifier


def batch(step: int, micro: int, rank: int) -> tuple[Tensor, Tensor]:
    g = torch.Generator().manual_seed(1000 * step + 10 * micro + rank)
    return torch.randn(8, 20, generator=g), torch.randint(0, 4, (8,), generator=g)


def train(
    run: tuple[Accelerator, nn.Module, Any, Any, st.Sparsifier],
    steps: range,
    *,
    save_to: Path | None = None,
) -> None:
    accelerator, model, optimizer, scheduler, _ = run
    accumulate = accelerator.gradient_accumulation_steps
    for step in steps:
        for micro in range(accumulate):
            with accelerator.accumulate(model):
                x, y = batch(step, micro, accelerator.process_index)
                accelerator.backward(F.cross_entropy(model(x), y))
                if accelerator.sync_gradients:
                    accelerator.clip_grad_norm_(model.parameters(), 0.5)
                optimizer.step()
                scheduler.step()
                optimizer.zero_grad()
        if save_to is not None and step + 1 == SAVE_AT:
            accelerator.save_state(str(save_to))


def snapshot(run: tuple[Accelerator, nn.Module, Any, Any, st.Sparsifier]) -> Any:
    accelerator, model, optimizer, scheduler, sparsifier = run
    for fqn, mask in sparsifier.masks.items():  # zeros outside the masks
        param = sparsifier.topology.params[fqn]
        assert int(param[~mask].count_nonzero()) == 0
        for value in optimizer.optimizer.state[param].values():
            if isinstance(value, Tensor) and value.shape == mask.shape:
                assert int(value[~mask].count_nonzero()) == 0
    return {
        "weights": {
            k: v.clone()
            for k, v in accelerator.unwrap_model(model).state_dict().items()
        },
        "masks": {k: v.clone() for k, v in sparsifier.masks.items()},
        "optimizer": optimizer.state_dict()["state"],
        "lr": scheduler.get_last_lr(),
        "steps": [sparsifier.step_count, sparsifier.update_count],
    }


def resume_twice(tmp: Path, **args: Any) -> tuple[Any, Any]:
    """(uninterrupted, resumed from the state saved after step SAVE_AT)."""
    run = build(**args)
    train(run, range(STEPS), save_to=tmp / "state")
    uninterrupted = snapshot(run)
    AcceleratorState._reset_state(True)
    run = build(seed=1, **args)  # other initial weights and masks: all replaced
    run[0].load_state(str(tmp / "state"))
    train(run, range(SAVE_AT, STEPS))
    return uninterrupted, snapshot(run)


@pytest.mark.parametrize(
    "args",
    [{}, {"gradient_accumulation_steps": 2, "mixed_precision": "bf16"}],
    ids=["plain", "accumulate-bf16"],
)
def test_save_state_load_state_resumes_bit_exact(tmp_path: Path, args: Any):
    uninterrupted, resumed = resume_twice(tmp_path, **args)
    assert uninterrupted["steps"] == [STEPS, 2]
    assert_same(resumed, uninterrupted)


def test_sparsify_after_prepare_attaches_the_inner_optimizer():
    """One process: prepare does not wrap the model, only the optimizer."""
    accelerator = Accelerator(cpu=True)
    model = nn.Sequential(nn.Linear(20, 32), nn.ReLU(), nn.Linear(32, 4))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    model, optimizer = accelerator.prepare(model, optimizer)
    sparsifier = st.sparsify(
        model, optimizer, sparsity=0.8, update_interval=2, total_steps=STEPS
    )
    assert sparsifier.optimizer is optimizer.optimizer
    x, y = batch(0, 0, 0)
    for _ in range(2):
        accelerator.backward(F.cross_entropy(model(x), y))
        optimizer.step()
        optimizer.zero_grad()
    assert (sparsifier.step_count, sparsifier.update_count) == (2, 1)


# -- 2 processes on gloo ------------------------------------------------------------


def _after_prepare(rank: int) -> dict[str, Any]:
    """sparsify on the DDP-wrapped model and the AcceleratedOptimizer."""
    accelerator = Accelerator(cpu=True)
    torch.manual_seed(rank)  # other weights on each rank: rank 0's must win
    model = nn.Sequential(nn.Linear(20, 32), nn.ReLU(), nn.Linear(32, 4))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    model, optimizer = accelerator.prepare(model, optimizer)
    assert type(model).__name__ == "DistributedDataParallel"
    sparsifier = st.sparsify(
        model, optimizer, sparsity=0.8, update_interval=2, total_steps=STEPS
    )
    for step in range(4):
        x, y = batch(step, 0, rank)
        accelerator.backward(F.cross_entropy(model(x), y))
        optimizer.step()
        optimizer.zero_grad()
    return {
        "weights": {k: v.clone() for k, v in model.module.state_dict().items()},
        "masks": {k: v.clone() for k, v in sparsifier.masks.items()},
        "steps": [sparsifier.step_count, sparsifier.update_count],
    }


def _ddp_worker(rank: int, out: str) -> None:
    results: dict[str, Any] = {}
    try:
        uninterrupted, resumed = resume_twice(Path(out), gradient_accumulation_steps=2)
        results["resume"] = {"uninterrupted": uninterrupted, "resumed": resumed}
    except Exception:  # reported by the test that reads it
        results["resume"] = {"error": traceback.format_exc()}
    torch.distributed.barrier()
    AcceleratorState._reset_state(True)
    try:
        results["after_prepare"] = _after_prepare(rank)
    except Exception:
        results["after_prepare"] = {"error": traceback.format_exc()}
    results["world"] = torch.distributed.get_world_size()
    torch.save(results, os.path.join(out, f"rank{rank}.pt"))
    torch.distributed.destroy_process_group()
    exit_worker()


@pytest.fixture(scope="module")
def ranks(tmp_path_factory: pytest.TempPathFactory) -> list[dict[str, Any]]:
    found = spawn_ranks(_ddp_worker, tmp_path_factory.mktemp("accelerate_ddp"))
    assert [r["world"] for r in found] == [2, 2]
    return found


def _scenario(ranks: list[dict[str, Any]], name: str) -> list[dict[str, Any]]:
    results = [r[name] for r in ranks]
    for rank, result in enumerate(results):
        assert "error" not in result, f"rank {rank}:\n{result.get('error')}"
    return results


def test_ddp_ranks_identical_and_resume_bit_exact(ranks: list[dict[str, Any]]):
    first, second = _scenario(ranks, "resume")
    assert first["uninterrupted"]["steps"] == [STEPS, 2]
    assert_same(first["uninterrupted"], second["uninterrupted"])
    assert_same(first["resumed"], second["resumed"])
    assert_same(first["resumed"], first["uninterrupted"])


def test_ddp_sparsify_after_prepare_keeps_ranks_identical(ranks: list[dict[str, Any]]):
    first, second = _scenario(ranks, "after_prepare")
    assert first["steps"] == [4, 2]
    assert_same(first, second)
