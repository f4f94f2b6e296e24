"""Write ``sparsifier_v1.pt``: a format_version 1 sparsifier checkpoint.

Generated once with sparsetorch at commit 302c3b5 (the last commit writing
format_version 1, plain bool masks); kept so that tests can check that newer
versions still read it. Regenerating it needs that commit:

    git worktree add /tmp/st-v1 302c3b5
    PYTHONPATH=/tmp/st-v1 python tests/data/make_sparsifier_v1.py
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

import sparsetorch as st


def build() -> tuple[nn.Module, torch.optim.Optimizer]:
    """The fixture's model and optimizer (the test rebuilds them the same way)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    return model, optimizer


def main() -> None:
    model, optimizer = build()
    sparsifier = st.sparsify(
        model,
        optimizer,
        sparsity=0.75,
        distribution="uniform",
        total_steps=40,
        update_interval=5,
        seed=3,
    )
    data = torch.Generator().manual_seed(1)
    for _ in range(12):
        optimizer.zero_grad()
        model(torch.randn(4, 8, generator=data)).square().sum().backward()
        optimizer.step()
    state = sparsifier.state_dict()
    assert state["format_version"] == 1
    torch.save(
        {"sparsifier": state, "model": model.state_dict()},
        Path(__file__).with_name("sparsifier_v1.pt"),
    )


if __name__ == "__main__":
    main()
