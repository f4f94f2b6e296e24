"""Write ``rigl_torch_checkpoint.pt``: a checkpoint made by rigl-torch 0.5.2 itself.

rigl-torch's ``RigLScheduler`` trains a small MLP for 7 calls (updates at calls
3 and 6) and its ``state_dict()`` is saved with the model's and optimizer's,
as rigl-torch's ImageNet example saves them; then rigl-torch goes on for 3
more calls (the third updates) and the masks and weights it reaches are saved
too, so that ``tests/test_compat.py`` can resume the same run with
``sparsetorch.RigLScheduler`` and compare. Generated once; regenerate with::

    pip install rigl-torch==0.5.2 --no-deps
    python tests/data/make_rigl_torch_checkpoint.py
"""

from __future__ import annotations

import importlib.util
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

ROOT = Path(__file__).resolve().parents[2]
SETTINGS = {
    "dense_allocation": 0.25,
    "T_end": 20,
    "delta": 3,
    "alpha": 0.3,
    "ignore_linear_layers": False,
}
SAVED_AT, CONTINUED_TO = 7, 10


def build() -> tuple[nn.Module, torch.optim.Optimizer]:
    """The fixture's model and optimizer (the test rebuilds them the same way)."""
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Linear(12, 24), nn.ReLU(), nn.Linear(24, 16), nn.ReLU(), nn.Linear(16, 6)
    )
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    return model, optimizer


def batches(n: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The fixture's data: ``n`` fixed batches of 8 samples."""
    g = torch.Generator().manual_seed(1)
    return [
        (torch.randn(8, 12, generator=g), torch.randint(0, 6, (8,), generator=g))
        for _ in range(n)
    ]


def train_call(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    pruner: Callable[[], bool],
    x: torch.Tensor,
    y: torch.Tensor,
) -> None:
    """One call of rigl-torch's loop: ``if pruner(): optimizer.step()``."""
    optimizer.zero_grad()
    nn.functional.cross_entropy(model(x), y).backward()
    if pruner():
        optimizer.step()


def main() -> None:
    spec = importlib.util.spec_from_file_location(
        "_rigl_torch_peer", ROOT / "examples" / "_rigl_torch_peer.py"
    )
    assert spec is not None and spec.loader is not None
    peer = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(peer)
    rigl_torch_scheduler = peer._import_rigl_scheduler()  # torchvision stubbed

    model, optimizer = build()
    pruner = rigl_torch_scheduler(model, optimizer, **SETTINGS)
    data = batches(CONTINUED_TO)
    for x, y in data[:SAVED_AT]:
        train_call(model, optimizer, pruner, x, y)
    saved = {
        "model": {k: v.clone() for k, v in model.state_dict().items()},
        "optimizer": optimizer.state_dict(),
        "pruner": pruner.state_dict(),
    }
    saved = torch.utils._pytree.tree_map_only(torch.Tensor, torch.clone, saved)
    for x, y in data[SAVED_AT:]:
        train_call(model, optimizer, pruner, x, y)
    saved["continued"] = {
        "step": pruner.step,
        "rigl_steps": pruner.rigl_steps,
        "backward_masks": [
            None if m is None else m.clone() for m in pruner.backward_masks
        ],
        "model": model.state_dict(),
    }
    torch.save(saved, Path(__file__).with_name("rigl_torch_checkpoint.pt"))


if __name__ == "__main__":
    main()
