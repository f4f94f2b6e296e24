"""Quickstart: train a small MLP with RigL at 90% sparsity on synthetic data.

Run: ``python examples/quickstart.py`` (a few seconds on a CPU).
"""

from __future__ import annotations

import os
import tempfile

import torch
import torch.nn.functional as F
from torch import nn

import sparsetorch as st


def main() -> None:
    torch.manual_seed(0)
    # A teacher network labels random inputs: a learnable task with no download.
    teacher = nn.Sequential(nn.Linear(64, 32), nn.Tanh(), nn.Linear(32, 10))
    x = torch.randn(4096, 64)
    with torch.no_grad():
        y = teacher(x).argmax(1)

    model = nn.Sequential(
        nn.Linear(64, 256),
        nn.ReLU(),
        nn.Linear(256, 256),
        nn.ReLU(),
        nn.Linear(256, 10),
    )
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    epochs, batch_size = 10, 128
    steps = epochs * (len(x) // batch_size)
    sparsifier = st.sparsify(
        model,
        optimizer,
        policy="rigl",
        sparsity=0.9,
        total_steps=steps,
        update_interval=20,
    )
    for epoch in range(epochs):
        order = torch.randperm(len(x))
        for i in range(0, len(x) - batch_size + 1, batch_size):
            idx = order[i : i + batch_size]
            optimizer.zero_grad()
            loss = F.cross_entropy(model(x[idx]), y[idx])
            loss.backward()
            optimizer.step()  # the topology updates in here
        with torch.no_grad():
            accuracy = (model(x).argmax(1) == y).float().mean().item()
        print(f"epoch {epoch + 1:2d}  loss {loss.item():.3f}  accuracy {accuracy:.3f}")
    print(sparsifier)
    torch.save(
        {"model": model.state_dict(), "sparsity": sparsifier.state_dict()},
        os.path.join(tempfile.gettempdir(), "sparsetorch-quickstart.pt"),
    )


if __name__ == "__main__":
    main()
