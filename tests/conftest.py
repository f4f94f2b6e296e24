"""Shared fixtures and helpers: a fixed seed, tiny deterministic models, invariants."""

from __future__ import annotations

import os
import socket
import sys
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.multiprocessing as mp
from torch import Tensor, nn

import sparsetorch as st
from sparsetorch.structure import check_mask

# Tiny models: threads only add contention on small CI machines.
torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _seed() -> Iterator[None]:
    torch.manual_seed(0)
    yield


def mlp() -> nn.Sequential:
    """784-like MLP in miniature: 20-32-16-4."""
    return nn.Sequential(
        nn.Linear(20, 32), nn.ReLU(), nn.Linear(32, 16), nn.ReLU(), nn.Linear(16, 4)
    )


def cnn() -> nn.Sequential:
    """Conv + BatchNorm + Linear on 3x8x8 inputs, 4 classes."""
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        nn.Conv2d(8, 8, 3, stride=2, padding=1),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(8 * 4 * 4, 4),
    )


def batch(model: nn.Module, n: int = 16) -> tuple[torch.Tensor, torch.Tensor]:
    """A fixed random batch for ``mlp()`` or ``cnn()``."""
    first = next(m for m in model.modules() if isinstance(m, (nn.Linear, nn.Conv2d)))
    shape = (n, 20) if isinstance(first, nn.Linear) else (n, 3, 8, 8)
    g = torch.Generator().manual_seed(1234)
    return torch.randn(shape, generator=g), torch.randint(0, 4, (n,), generator=g)


def train_step(
    model: nn.Module, optimizer: torch.optim.Optimizer, x: Tensor, y: Tensor
) -> Tensor:
    """One cross-entropy training step; returns the (detached) logits."""
    optimizer.zero_grad()
    out = model(x)
    nn.functional.cross_entropy(out, y).backward()
    optimizer.step()
    return out.detach()


def effective(model: nn.Module, fqn: str) -> Tensor:
    """The tensor the module computes with, read the way its forward reads it."""
    module_fqn, _, name = fqn.rpartition(".")
    module = model.get_submodule(module_fqn)
    if isinstance(module, nn.RNNBase):
        return module._flat_weights[module._flat_weights_names.index(name)]
    return getattr(module, name)  # type: ignore[no-any-return]


def check_invariants(
    sparsifier: st.Sparsifier,
    optimizer: torch.optim.Optimizer,
    *,
    model: nn.Module | None = None,
    dense_keys: list[str] | None = None,
    grads: bool = False,
) -> None:
    """The invariants of DESIGN.md, for every masked tensor.

    Always: exact active counts (the mask holds its target), zeros outside the
    mask in the stored weight and in every optimizer state tensor of the
    weight's shape. With ``model``: zeros outside the mask in the weight the
    module computes with (:func:`effective`). With ``grads``: zeros outside the
    mask in ``.grad`` (where there is one). With ``dense_keys``:
    ``model.state_dict()`` has exactly those keys, in that order.
    """
    targets = sparsifier.topology.targets
    for fqn, mask in sparsifier.masks.items():
        param = sparsifier.topology.params[fqn]
        assert int(mask.sum()) == targets[fqn], (fqn, "active count")
        assert int(param[~mask].count_nonzero()) == 0, (fqn, "stored weight")
        if model is not None:
            outside = effective(model, fqn)[~mask]
            assert int(outside.count_nonzero()) == 0, (fqn, "effective weight")
        if grads and param.grad is not None:
            assert int(param.grad[~mask].count_nonzero()) == 0, (fqn, "grad")
        for key, state in optimizer.state[param].items():
            if isinstance(state, Tensor) and state.shape == param.shape:
                assert int(state[~mask].count_nonzero()) == 0, (fqn, key)
    for fqn, layout in sparsifier.topology.layouts.items():  # structure= kept
        mask = sparsifier.masks[fqn]
        dense = bool(mask.all())  # SNIP before prune_at_init
        assert dense or check_mask(mask, layout), (fqn, "structure")
    if dense_keys is not None:
        assert model is not None, "dense_keys needs the model"
        assert list(model.state_dict()) == dense_keys


# -- a small classifier (12 features, 6 classes) trained in a plain loop ------------


def small_mlp(activation: type[nn.Module] = nn.ReLU) -> nn.Sequential:
    """12-24-6 MLP."""
    return nn.Sequential(nn.Linear(12, 24), activation(), nn.Linear(24, 6))


def small_sgd(model: nn.Module) -> torch.optim.Optimizer:
    return torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)


def small_sparse(
    make_optimizer: Callable[[nn.Module], torch.optim.Optimizer] = small_sgd,
    *,
    activation: type[nn.Module] = nn.ReLU,
    **sparsify_kwargs: Any,
) -> tuple[nn.Module, torch.optim.Optimizer, st.Sparsifier]:
    """A seeded ``small_mlp`` and its optimizer, sparsified.

    75% sparsity, uniform, RigL every 2 steps dropping half the active weights
    (``sparsify_kwargs`` override any of it).
    """
    torch.manual_seed(0)
    model = small_mlp(activation)
    optimizer = make_optimizer(model)
    settings: dict[str, Any] = {
        "sparsity": 0.75,
        "distribution": "uniform",
        "total_steps": 1000,
        "update_interval": 2,
        "drop_fraction": 0.5,
    }
    sparsifier = st.sparsify(model, optimizer, **{**settings, **sparsify_kwargs})
    return model, optimizer, sparsifier


def small_batches(n: int, size: int = 16) -> list[tuple[Tensor, Tensor]]:
    """``n`` fixed random batches for ``small_mlp``."""
    g = torch.Generator().manual_seed(1)
    return [
        (torch.randn(size, 12, generator=g), torch.randint(0, 6, (size,), generator=g))
        for _ in range(n)
    ]


def plain_copy(model: nn.Module, activation: type[nn.Module] = nn.ReLU) -> nn.Module:
    """An un-sparsified ``small_mlp`` holding ``model``'s effective weights."""
    plain = small_mlp(activation).to(next(iter(model.state_dict().values())).dtype)
    plain.load_state_dict(model.state_dict())
    return plain


def train_small_in_dtype(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    sparsifier: st.Sparsifier,
    dtype: torch.dtype,
    steps: int = 4,
) -> None:
    """Train a ``small_sparse`` model (``update_interval=2``) on ``dtype`` inputs.

    The outputs and the dense gradients captured before each update are
    ``dtype``; the invariants (``.grad`` too) hold after every step.
    """
    for x, y in small_batches(steps):
        optimizer.zero_grad()
        out = model(x.to(dtype))
        assert out.dtype == dtype
        nn.functional.cross_entropy(out, y).backward()
        if sparsifier.step_count % 2 == 1:  # the next step updates
            for p in sparsifier.topology.parametrizations.values():
                assert p.dense_grad is not None
                assert p.dense_grad.dtype == dtype
        optimizer.step()
        check_invariants(sparsifier, optimizer, grads=True)


def exit_worker() -> None:
    """End a spawned worker process now that its results are saved.

    ``os._exit`` skips the interpreter's teardown, where gloo's and DDP's
    threads, destroyed in an arbitrary order, sometimes abort the process
    ("terminate called without an active exception") on a loaded machine,
    turning a run whose results are all written into a failed spawn.
    """
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def spawn_ranks(
    worker: Callable[[int, str], None], out: Path, world: int = 2
) -> list[dict[str, Any]]:
    """Run ``worker(rank, out)`` in ``world`` processes, each with torchrun's
    environment variables (a free loopback port) and one thread, and load each
    rank's ``out/rank{r}.pt``."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_as_torchrun, args=(worker, port, str(out), world), nprocs=world)
    return [torch.load(out / f"rank{r}.pt", weights_only=True) for r in range(world)]


def _as_torchrun(
    rank: int, worker: Callable[[int, str], None], port: int, out: str, world: int
) -> None:
    os.environ.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        RANK=str(rank),
        LOCAL_RANK=str(rank),
        WORLD_SIZE=str(world),
        LOCAL_WORLD_SIZE=str(world),
    )
    torch.set_num_threads(1)
    worker(rank, out)


def assert_same(a: Any, b: Any, where: str = "") -> None:
    """Equal nested dicts / lists, tensors bit-equal (``torch.equal``)."""
    if isinstance(a, Tensor):
        assert isinstance(b, Tensor) and a.dtype == b.dtype, where
        assert torch.equal(a, b), where
    elif isinstance(a, Mapping):
        assert isinstance(b, Mapping) and list(a) == list(b), (where, list(a), list(b))
        for key in a:
            assert_same(a[key], b[key], f"{where}.{key}")
    elif isinstance(a, (list, tuple)):
        assert type(a) is type(b) and len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            assert_same(x, y, f"{where}[{i}]")
    else:
        assert a == b, (where, a, b)
