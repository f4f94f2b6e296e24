"""FSDP2 (``fully_shard``) on CPU: 2 and 4 processes on gloo.

Every scenario trains the same model on the same data as a single process does
(each rank takes its slice of the global batch) and compares the full masks,
gathered for the test only: they must be identical, and the weights equal to
float64 rounding. After every optimizer step, the weight shards, gradient
shards and optimizer state shards must be zero outside the mask shards.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist
from conftest import assert_same, exit_worker, spawn_ranks
from expecttest import assert_expected_inline
from torch import Tensor, nn

import sparsetorch as st
from sparsetorch import _fsdp

STEPS = 12  # updates at steps 2, 4, 6, 8 (end_step = 9)
BATCH = 8


def build(seed: int = 0) -> nn.Sequential:
    """Two hidden layers and a 5-row head: on 4 ranks its last shard is empty."""
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Linear(8, 12), nn.ReLU(), nn.Linear(12, 12), nn.ReLU(), nn.Linear(12, 5)
    ).double()


def sparsified(
    model: nn.Module, policy: str = "rigl", sparsity: float = 0.75, seed: int = 0
) -> st.Sparsifier:
    """The run's sparsifier: updates at steps 2, 4, 6 and 8."""
    return st.sparsify(
        model,
        policy=policy,
        sparsity=sparsity,
        distribution="uniform",
        total_steps=STEPS,
        update_interval=2,
        seed=seed,
    )


def batch(step: int, world: int, rank: int, micro: int = 0, micros: int = 1):
    """This rank's slice of micro-batch ``micro`` of the global batch of ``step``."""
    g = torch.Generator().manual_seed(1000 + step)
    x = torch.randn(BATCH, 8, generator=g, dtype=torch.float64)
    y = torch.randn(BATCH, 5, generator=g, dtype=torch.float64)
    size = BATCH // micros
    x, y = x[micro * size : (micro + 1) * size], y[micro * size : (micro + 1) * size]
    n = size // world
    return x[rank * n : (rank + 1) * n], y[rank * n : (rank + 1) * n]


def shard(model: nn.Module, *, reshard_after_forward: bool = True, **kwargs: Any):
    from torch.distributed.fsdp import fully_shard

    for layer in (model[0], model[2], model[4]):
        fully_shard(layer, reshard_after_forward=reshard_after_forward, **kwargs)
    fully_shard(model, reshard_after_forward=reshard_after_forward, **kwargs)


def local(t: Tensor) -> Tensor:
    return t.to_local() if hasattr(t, "to_local") else t  # type: ignore[no-any-return]


def full(t: Tensor) -> Tensor:
    t = t.detach()
    return (t.full_tensor() if hasattr(t, "full_tensor") else t).clone()  # type: ignore[no-any-return]


def outside(sparsifier: st.Sparsifier, optimizer: torch.optim.Optimizer) -> int:
    """Nonzeros outside the masks in this rank's weight, gradient and state shards."""
    count = 0
    for fqn, param in sparsifier.topology.params.items():
        off = ~local(sparsifier.masks[fqn])
        tensors = [param, param.grad, *optimizer.state[param].values()]
        for t in tensors:
            if isinstance(t, Tensor) and t.shape == param.shape:
                count += int(local(t)[off].count_nonzero())
    return count


def train(
    world: int,
    rank: int,
    policy: str,
    *,
    micros: int = 1,
    steps: range = range(STEPS),
    setup: Callable[[nn.Module], None] | None = None,
    model: nn.Module | None = None,
    sparsifier: st.Sparsifier | None = None,
    optimizer: torch.optim.Optimizer | None = None,
    itop: bool = False,
) -> tuple[nn.Module, st.Sparsifier, torch.optim.Optimizer, list[int]]:
    """Train (or continue) one run; return it and the nonzeros outside per step."""
    if model is None:
        model = build()
        sparsifier = sparsified(model, policy)
        if world > 1:
            (setup or shard)(model)
        optimizer = torch.optim.AdamW(model.parameters(), lr=0.05, weight_decay=0.1)
        sparsifier.attach_optimizer(optimizer)
        if itop:  # on the shards' masks
            sparsifier.track_itop()
    assert sparsifier is not None and optimizer is not None
    leaks = []
    for step in steps:
        optimizer.zero_grad()
        for micro in range(micros):
            x, y = batch(step, world, rank, micro, micros)
            (((model(x) - y) ** 2).mean() / micros).backward()
        optimizer.step()
        leaks.append(outside(sparsifier, optimizer))
    return model, sparsifier, optimizer, leaks


def gathered(sparsifier: st.Sparsifier) -> dict[str, Any]:
    return {
        "masks": {fqn: full(m) for fqn, m in sparsifier.masks.items()},
        "weights": {fqn: full(p) for fqn, p in sparsifier.topology.params.items()},
        "updates": sparsifier.update_count,
        "metrics": sparsifier.metrics(per_tensor=True),
        "history": [dataclasses.astuple(u) for u in sparsifier.mask_history],
    }


SCENARIOS: dict[str, dict[str, Any]] = {
    "rigl": {"policy": "rigl", "itop": True},
    "set": {"policy": "set"},
    "gmp": {"policy": "gmp"},  # dense to sparse: counts fall at every update
    # FSDP adds each micro-batch's reduce-scattered gradient to the shard: the
    # dense gradient RigL grows by must still be the sum over micro-batches.
    "rigl_accumulate": {"policy": "rigl", "micros": 2},
    "rigl_keep_unsharded": {
        "policy": "rigl",
        "setup": functools.partial(shard, reshard_after_forward=False),
    },
}


def _train_worker(rank: int, out: str) -> None:
    dist.init_process_group("gloo")
    world = dist.get_world_size()
    results = {}
    for name, kwargs in SCENARIOS.items():
        _, sparsifier, _, leaks = train(world, rank, **kwargs)
        results[name] = {**gathered(sparsifier), "leaks": leaks}
    torch.save(results, f"{out}/rank{rank}.pt")
    dist.destroy_process_group()
    exit_worker()


@pytest.fixture(scope="module")
def single() -> dict[str, Any]:
    return {
        name: gathered(train(1, 0, **kwargs)[1]) for name, kwargs in SCENARIOS.items()
    }


@pytest.mark.parametrize("world", [2, 4])
def test_masks_are_identical_to_one_process_at_any_world_size(
    world: int, single: dict[str, Any], tmp_path: Path
) -> None:
    ranks = spawn_ranks(_train_worker, tmp_path, world)
    for name, expected in single.items():
        for result in ranks:
            got = result[name]
            assert got["leaks"] == [0] * STEPS, name  # zeros outside, every step
            assert got["updates"] == expected["updates"] == 4, name
            # Mask change and ITOP: counted on shards, summed over the ranks.
            assert got["metrics"] == expected["metrics"], name
            assert got["history"] == expected["history"], name
            for fqn, mask in expected["masks"].items():
                assert torch.equal(got["masks"][fqn], mask), (name, fqn)
                torch.testing.assert_close(
                    got["weights"][fqn], expected["weights"][fqn], rtol=0, atol=1e-12
                )


# -- selection on shards ------------------------------------------------------------


def _top_worker(rank: int, out: str) -> None:
    """:func:`_fsdp.top_sharded` on shards of fixed scores, ties included."""
    dist.init_process_group("gloo")
    world = dist.get_world_size()
    results = {}
    for name, scores in _score_cases().items():
        n = scores.numel()
        per = -(-n // world)
        lo, hi = min(rank * per, n), min((rank + 1) * per, n)
        shard = _fsdp.Shard(lo, n, None)
        for k in (0, 1, n // 3, n // 2, n - 1, n):
            g = torch.Generator().manual_seed(k)
            chosen = _fsdp.top_sharded(scores[lo:hi], k, g, shard) + lo
            results[f"{name}/{k}"] = (chosen, g.get_state())
    torch.save(results, f"{out}/rank{rank}.pt")
    dist.destroy_process_group()
    exit_worker()


def _score_cases() -> dict[str, Tensor]:
    g = torch.Generator().manual_seed(7)
    return {
        "distinct": torch.randn(37, generator=g),
        "ties": torch.randint(0, 3, (41,), generator=g).float(),
        "signs_and_zeros": torch.tensor([0.0, -0.0, -1.5, 2.0, -0.0, 0.0, 1e-30, -2.0]),
        "infinities": torch.tensor([float("-inf"), 1.0, float("-inf"), 3.0, 1.0, 0.0]),
        "float64": torch.randn(23, generator=g, dtype=torch.float64).round(decimals=1),
    }


def test_top_on_shards_selects_the_unsharded_top_with_the_same_tie_draws(
    tmp_path: Path,
) -> None:
    from sparsetorch.policies.base import _top

    ranks = spawn_ranks(_top_worker, tmp_path, 3)
    for name, scores in _score_cases().items():
        n = scores.numel()
        for k in (0, 1, n // 3, n // 2, n - 1, n):
            g = torch.Generator().manual_seed(k)
            expected = torch.sort(_top(scores.clone(), k, g)).values
            got = torch.cat([r[f"{name}/{k}"][0] for r in ranks])
            assert torch.equal(torch.sort(got).values, expected), (name, k)
            for r in ranks:  # the generator moved on exactly as unsharded
                assert torch.equal(r[f"{name}/{k}"][1], g.get_state()), (name, k)


# -- checkpoints with torch.distributed.checkpoint ----------------------------------

SAVE_AT = 5  # save after 5 steps (between updates 2 and 3)


def _dcp_state(model, optimizer, sparsifier) -> dict[str, Any]:
    from torch.distributed.checkpoint.state_dict import (
        get_model_state_dict,
        get_optimizer_state_dict,
    )

    return {
        "model": get_model_state_dict(model),
        "optim": get_optimizer_state_dict(model, optimizer),
        "sparsity": sparsifier.state_dict(sharded=True),
    }


def _dcp_load(model, optimizer, sparsifier, path: str) -> None:
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import (
        set_model_state_dict,
        set_optimizer_state_dict,
    )

    state = _dcp_state(model, optimizer, sparsifier)
    dcp.load(state, checkpoint_id=path)
    set_model_state_dict(model, state["model"])
    set_optimizer_state_dict(model, optimizer, state["optim"])
    sparsifier.load_state_dict(state["sparsity"])


def _full_state(model, optimizer, sparsifier) -> dict[str, Any]:
    """Everything a continuation depends on, whole (for the test only)."""
    return {
        **gathered(sparsifier),
        "optim": {
            fqn: {k: full(v) for k, v in optimizer.state[p].items()}
            for fqn, p in sparsifier.topology.params.items()
        },
        "step": sparsifier.step_count,
        "generator": sparsifier.generator.get_state(),
    }


def finish(world: int, rank: int, model, sparsifier, optimizer) -> list[int]:
    """Train a run from SAVE_AT to the end; the nonzeros outside per step."""
    steps = range(SAVE_AT, STEPS)
    return train(world, rank, "rigl", steps=steps, model=model,
                 sparsifier=sparsifier, optimizer=optimizer)[3]  # fmt: skip


def _save_worker(rank: int, out: str) -> None:
    """4 ranks: save at SAVE_AT, then run on to STEPS (the uninterrupted run)."""
    import torch.distributed.checkpoint as dcp

    dist.init_process_group("gloo")
    world = dist.get_world_size()
    model, sparsifier, optimizer, _ = train(world, rank, "rigl", steps=range(SAVE_AT))
    dcp.save(_dcp_state(model, optimizer, sparsifier), checkpoint_id=f"{out}/ckpt")
    saved = _full_state(model, optimizer, sparsifier)
    finish(world, rank, model, sparsifier, optimizer)
    torch.save({"saved": saved, "end": gathered(sparsifier)}, f"{out}/rank{rank}.pt")
    dist.destroy_process_group()
    exit_worker()


def _resume(world: int, rank: int, path: str) -> dict[str, Any]:
    model = build(seed=1)  # other weights: everything must come from the checkpoint
    sparsifier = sparsified(model, seed=5)
    if world > 1:
        shard(model)
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.05, weight_decay=0.1)
    sparsifier.attach_optimizer(optimizer)
    _dcp_load(model, optimizer, sparsifier, path)
    loaded = _full_state(model, optimizer, sparsifier)
    leaks = finish(world, rank, model, sparsifier, optimizer)
    # A whole (format 2) checkpoint: under FSDP2 the masks are gathered.
    whole = sparsifier.state_dict(sharded=False)
    return {
        "loaded": loaded,
        "end": gathered(sparsifier),
        "leaks": leaks,
        "whole": whole,
    }


def _resume_worker(rank: int, out: str) -> None:
    dist.init_process_group("gloo")
    result = _resume(dist.get_world_size(), rank, f"{out}/../saved/ckpt")
    # The whole checkpoint loads into a sharded run: each rank takes its rows.
    model = build()
    sparsifier = sparsified(model)
    shard(model)
    sparsifier.load_state_dict(result["whole"])
    result["from_whole"] = gathered(sparsifier)["masks"]
    # A corrupt shard: one bit flipped in rank 1's packed rows of one mask.
    model = build()
    sparsifier = sparsified(model)
    shard(model)
    state = {"sparsity": sparsifier.state_dict()}
    import torch.distributed.checkpoint as dcp

    dcp.load(state, checkpoint_id=f"{out}/../saved/ckpt")
    if rank == 1:
        local(state["sparsity"]["masks"]["2.weight"])[0, 0] ^= 1
    try:
        sparsifier.load_state_dict(state["sparsity"])
    except ValueError as error:
        result["corrupt"] = str(error)
    # Another sparsity: refused on the settings.
    other = build()
    sparsifier = sparsified(other, sparsity=0.5)
    shard(other)
    state = {"sparsity": sparsifier.state_dict()}
    try:
        dcp.load(state, checkpoint_id=f"{out}/../saved/ckpt")
        sparsifier.load_state_dict(state["sparsity"])
    except (ValueError, RuntimeError) as error:
        result["other_sparsity"] = str(error).splitlines()[0]
    torch.save(result, f"{out}/rank{rank}.pt")
    dist.destroy_process_group()
    exit_worker()


def test_saved_on_4_ranks_resumes_on_2_and_on_1_exactly(tmp_path: Path) -> None:
    (tmp_path / "saved").mkdir()
    (tmp_path / "resumed").mkdir()
    four = spawn_ranks(_save_worker, tmp_path / "saved", 4)
    saved, end = four[0]["saved"], four[0]["end"]
    two = spawn_ranks(_resume_worker, tmp_path / "resumed", 2)
    one = _resume(1, 0, str(tmp_path / "saved" / "ckpt"))
    for result in [*two, one]:
        # The loaded state is the saved one, bit for bit.
        assert_same_state(result["loaded"], saved)
        # The continuation: the same masks, weights to float64 rounding.
        assert result["leaks"] == [0] * (STEPS - SAVE_AT)
        assert result["end"]["updates"] == end["updates"] == 4
        for fqn, mask in end["masks"].items():
            assert torch.equal(result["end"]["masks"][fqn], mask), fqn
            torch.testing.assert_close(
                result["end"]["weights"][fqn], end["weights"][fqn], rtol=0, atol=1e-12
            )
    for result in two:
        assert_same(result["whole"], one["whole"])  # as one process saves it
        for fqn, mask in end["masks"].items():
            assert torch.equal(result["from_whole"][fqn], mask), fqn
        assert_expected_inline(
            result["corrupt"],
            """\
Mask '2.weight' has 37 active weights over the checkpoint's shards, but 36 are expected: the checkpoint is corrupted or from other settings.""",
        )
        assert_expected_inline(
            result["other_sparsity"], """The checkpoint was made with other settings:"""
        )


def assert_same_state(a: dict[str, Any], b: dict[str, Any]) -> None:
    for key in ("masks", "weights"):
        for fqn in b[key]:
            assert torch.equal(a[key][fqn], b[key][fqn]), (key, fqn)
    for fqn, state in b["optim"].items():
        for k, v in state.items():
            assert torch.equal(a["optim"][fqn][k], v), (fqn, k)
    assert a["step"] == b["step"] == SAVE_AT
    assert torch.equal(a["generator"], b["generator"])


# -- everything else under FSDP2 ----------------------------------------------------


class Checkpointed(nn.Module):
    """The test model with each hidden block under activation checkpointing."""

    def __init__(self, model: nn.Sequential) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: Tensor) -> Tensor:
        from torch.utils.checkpoint import checkpoint

        h = checkpoint(self.model[:2], x, use_reentrant=False)
        h = checkpoint(self.model[2:4], h, use_reentrant=False)
        return self.model[4](h)  # type: ignore[no-any-return]


def _variants_worker(rank: int, out: str) -> None:
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        get_model_state_dict,
    )
    from torch.distributed.fsdp import (
        CPUOffloadPolicy,
        FullyShardedDataParallel,
        MixedPrecisionPolicy,
        fully_shard,
    )

    dist.init_process_group("gloo")
    world = dist.get_world_size()
    results: dict[str, Any] = {}

    def run(name: str, make: Callable[[], nn.Module], **shard_kwargs: Any) -> None:
        torch.manual_seed(0)
        model = make()
        sparsifier = sparsified(model)
        inner = getattr(model, "model", model)
        for layer in (inner[0], inner[2], inner[4]):
            fully_shard(layer, **shard_kwargs)
        fully_shard(model, **shard_kwargs)
        optimizer = torch.optim.AdamW(model.parameters(), lr=0.05, weight_decay=0.1)
        leaks = []
        for step in range(STEPS):  # the optimizer is attached at its first step
            optimizer.zero_grad()
            x, y = batch(step, world, rank)
            ((model(x.to(torch.float64)) - y) ** 2).mean().backward()
            optimizer.step()
            sparsifier.step()  # counted by hand
            leaks.append(outside(sparsifier, optimizer))
        got = gathered(sparsifier)
        for key in ("masks", "weights"):  # the names in the plain model
            got[key] = {k.removeprefix("model."): v for k, v in got[key].items()}
        results[name] = {**got, "leaks": leaks}
        if name == "checkpointed":
            dense = get_model_state_dict(
                model, options=StateDictOptions(full_state_dict=True, cpu_offload=True)
            )
            results["full_state_dict"] = {k: v.clone() for k, v in dense.items()}

    run("checkpointed", lambda: Checkpointed(build()))
    run(
        "bf16",
        build,
        mp_policy=MixedPrecisionPolicy(
            param_dtype=torch.bfloat16, reduce_dtype=torch.float64
        ),
    )
    run("offload", build, offload_policy=CPUOffloadPolicy(pin_memory=False))

    errors: dict[str, str] = {}
    model = build()
    sparsifier = sparsified(model)
    early = torch.optim.AdamW(model.parameters())  # built before fully_shard
    sparsifier.attach_optimizer(early)
    shard(model)
    try:
        sparsifier.step()
    except RuntimeError as error:
        errors["optimizer_before_shard"] = str(error)
    model = build()
    sparsifier = st.sparsify(model, policy="static")
    shard(model)
    for what, call in {
        "remove": sparsifier.remove,
        "sparse_execution": lambda: sparsifier.set_execution("sparse"),
    }.items():
        try:
            call()
        except RuntimeError as error:
            errors[what] = str(error)
    sharded_first = build()
    shard(sharded_first)

    class CPUFSDP1(FullyShardedDataParallel):  # FSDP1 itself needs an accelerator
        def __init__(self, module: nn.Module) -> None:
            nn.Module.__init__(self)
            self.inner = module

    fsdp1 = CPUFSDP1(build())
    for what, target in {"sharded_first": sharded_first, "fsdp1": fsdp1}.items():
        try:
            st.sparsify(target, policy="static")
        except RuntimeError as error:
            errors[what] = str(error)
    results["errors"] = errors
    torch.save(results, f"{out}/rank{rank}.pt")
    dist.destroy_process_group()
    exit_worker()


@pytest.fixture(scope="module")
def variants(tmp_path_factory: pytest.TempPathFactory) -> list[dict[str, Any]]:
    return spawn_ranks(_variants_worker, tmp_path_factory.mktemp("variants"), 2)


def test_activation_checkpointing_and_cpu_offload_give_the_same_masks(
    variants: list[dict[str, Any]], single: dict[str, Any]
) -> None:
    expected = single["rigl"]
    for result in variants:
        for name in ("checkpointed", "offload"):
            assert result[name]["leaks"] == [0] * STEPS
            for fqn, mask in expected["masks"].items():
                assert torch.equal(result[name]["masks"][fqn], mask), (name, fqn)
                torch.testing.assert_close(
                    result[name]["weights"][fqn],
                    expected["weights"][fqn],
                    rtol=0,
                    atol=1e-12,
                )


def test_mixed_precision_keeps_exact_counts_and_zeros_outside(
    variants: list[dict[str, Any]],
) -> None:
    for result in variants:
        bf16 = result["bf16"]
        assert bf16["leaks"] == [0] * STEPS
        assert bf16["updates"] == 4
        for fqn, mask in bf16["masks"].items():
            assert int(mask.sum()) == mask.numel() // 4, fqn
            assert int(bf16["weights"][fqn][~mask].count_nonzero()) == 0


def test_full_state_dict_has_the_dense_keys_masked(
    variants: list[dict[str, Any]],
) -> None:
    dense = variants[0]["full_state_dict"]
    masks = variants[0]["checkpointed"]["masks"]
    assert list(dense) == [f"model.{k}" for k in build().state_dict()]
    for fqn, mask in masks.items():
        weight = dense[f"model.{fqn}"]
        assert torch.equal(weight, variants[0]["checkpointed"]["weights"][fqn])
        assert int(weight[~mask].count_nonzero()) == 0


def test_wrong_orders_and_fsdp1_raise_clear_errors(
    variants: list[dict[str, Any]],
) -> None:
    errors = variants[0]["errors"]
    assert_expected_inline(
        errors["optimizer_before_shard"],
        """\
The attached AdamW holds the weights from before fully_shard, which FSDP2 replaced by sharded ones.
Build the optimizer after fully_shard and attach it: sparsifier.attach_optimizer(optimizer).""",
    )
    assert_expected_inline(
        errors["remove"],
        """\
sparsifier.remove() needs whole weights, but FSDP2 shards ['0.weight', '2.weight', '4.weight'].
Gather a full state dict instead: get_model_state_dict(model, options=StateDictOptions(full_state_dict=True)) gives the dense keys, zero outside the masks; load it into an unsharded copy of the model.""",
    )
    assert_expected_inline(
        errors["sparse_execution"],
        """execution='sparse' computes with compressed whole weights, which FSDP2 shards: under fully_shard only "mask" runs.""",
    )
    assert_expected_inline(
        errors["sharded_first"],
        """\
Cannot sparsify a model FSDP already shards: module '<root>' is a FSDPSequential.
sparsify() registers its masks on whole weights, and fully_shard then shards them with their weights; FSDP2 holds references to the modules' parameters that a later parametrization would bypass.
Call sparsify(model, ...) first, then fully_shard(...) on its blocks and on the root, then build the optimizer and sparsifier.attach_optimizer(optimizer). See docs/distributed.md.""",
    )
    assert_expected_inline(
        errors["fsdp1"],
        """\
Module '<root>' is wrapped in FSDP1 (FullyShardedDataParallel), whose flat parameters sparsetorch cannot mask.
Use FSDP2: sparsify(model, ...) first, then fully_shard(...) on its blocks and on the root. See docs/distributed.md.""",
    )


def test_fsdp_example_runs_under_torchrun_on_4_processes(tmp_path: Path) -> None:
    import subprocess
    import sys

    root = Path(__file__).resolve().parents[1]
    command = [
        sys.executable, "-m", "torch.distributed.run", "--standalone",
        "--nproc_per_node=4", str(root / "examples" / "fsdp.py"), "--steps", "30",
    ]  # fmt: skip
    done = subprocess.run(
        command, capture_output=True, text=True, timeout=300, cwd=tmp_path
    )
    assert done.returncode == 0, done.stderr[-3000:]
    lines = done.stdout.splitlines()
    assert "world size 4: 132992 parameters, 90112 masked" in lines
    table = lines[
        lines.index(
            "rank  local loss  updates  masks KiB  dense grads KiB  sent/update KiB"
        )
        + 1 :
    ][:4]
    for rank, line in enumerate(table):
        fields = line.split()
        # 90112 masks of 1 byte and fp32 dense gradients, a quarter on each rank.
        assert fields[0] == str(rank) and fields[2] == "2", line
        assert fields[3:5] == ["22.0", "88.0"], line
    assert lines[-1].endswith("masks restored on every shard: True")


def test_dcp_filling_in_the_optimizer_state_is_not_a_training_step() -> None:
    """``get_optimizer_state_dict`` steps an optimizer without state once (zero
    gradients, lr 0) to create it: not counted, and a load in progress survives."""
    from torch.distributed.checkpoint.state_dict import (
        get_optimizer_state_dict,
        set_optimizer_state_dict,
    )

    model, sparsifier, optimizer, _ = train(1, 0, "rigl", steps=range(SAVE_AT))
    saved = {
        "model": model.state_dict(),
        "optim": get_optimizer_state_dict(model, optimizer),
        "sparsity": sparsifier.state_dict(),
    }
    fresh = build(seed=1)
    resumed = sparsified(fresh, seed=5)
    fresh_optimizer = torch.optim.AdamW(fresh.parameters(), lr=0.05, weight_decay=0.1)
    resumed.attach_optimizer(fresh_optimizer)
    fresh.load_state_dict(saved["model"])  # weights first: masked, values kept
    template = get_optimizer_state_dict(fresh, fresh_optimizer)  # a fake step
    assert resumed.step_count == 0 and fresh_optimizer.state
    set_optimizer_state_dict(fresh, fresh_optimizer, saved["optim"])
    resumed.load_state_dict(saved["sparsity"])
    assert resumed.step_count == SAVE_AT and len(template["state"]) == 6
    for fqn, param in sparsifier.topology.params.items():
        assert torch.equal(resumed.topology.params[fqn], param), fqn
        assert torch.equal(resumed.masks[fqn], sparsifier.masks[fqn]), fqn
