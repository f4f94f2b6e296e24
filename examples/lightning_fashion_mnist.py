"""Lightning on Fashion-MNIST: dense vs RigL at 90% sparsity, one callback apart.

The sparse run is the dense run plus ``callbacks=[SparseTraining(...)]``: same
LightningModule, same optimizer and LR schedule from ``configure_optimizers``.
The metrics it logs (sparsity, mask change, ITOP rate) land in
``OUT/<run>/metrics.csv`` through Lightning's CSVLogger.

Run::

    python examples/lightning_fashion_mnist.py          # 10 epochs each
    python examples/lightning_fashion_mnist.py --quick  # a slice: smoke test

The data comes from :mod:`fashion_mnist_data` (beside this file; no torchvision).
"""

from __future__ import annotations

import argparse
import time

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from fashion_mnist_data import FashionMNIST, load_fashion_mnist
from lightning.pytorch.loggers import CSVLogger
from torch import Tensor, nn
from torch.utils.data import BatchSampler, DataLoader, RandomSampler, TensorDataset

from sparsetorch.integrations.lightning import SparseTraining


class LeNet300100(pl.LightningModule):
    """784-300-100-10 MLP; SGD with Nesterov momentum and a cosine learning rate."""

    def __init__(self, lr: float = 0.1, weight_decay: float = 1e-3) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.net = nn.Sequential(
            nn.Flatten(),
            nn.Linear(28 * 28, 300),
            nn.ReLU(),
            nn.Linear(300, 100),
            nn.ReLU(),
            nn.Linear(100, 10),
        )

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        x, y = batch
        loss = F.cross_entropy(self(x), y)
        self.log("train_loss", loss)
        return loss

    def test_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        x, y = batch
        self.log("test_acc", (self(x).argmax(1) == y).float().mean())

    def configure_optimizers(self) -> dict[str, object]:
        optimizer = torch.optim.SGD(
            self.parameters(),
            lr=self.hparams.lr,
            momentum=0.9,
            nesterov=True,
            weight_decay=self.hparams.weight_decay,
        )
        steps = int(self.trainer.estimated_stepping_batches)
        schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, steps)
        return {
            "optimizer": optimizer,
            "lr_scheduler": {"scheduler": schedule, "interval": "step"},
        }


def batches(x: Tensor, y: Tensor, batch_size: int, shuffle: bool) -> DataLoader:
    """Whole batches gathered with one index each (no per-example collation)."""
    data = TensorDataset(x, y)
    order = RandomSampler(data) if shuffle else range(len(data))
    sampler = BatchSampler(order, batch_size, drop_last=shuffle)
    return DataLoader(data, sampler=sampler, batch_size=None)


def train(
    data: FashionMNIST, epochs: int, callbacks: list[pl.Callback], name: str, out: str
) -> tuple[float, float]:
    """Fit a fresh LeNet-300-100; return its test accuracy and training seconds."""
    pl.seed_everything(0, verbose=False)  # same initial weights and batch order
    trainer = pl.Trainer(
        accelerator="cpu",
        max_epochs=epochs,
        callbacks=callbacks,
        logger=CSVLogger(out, name=name, version=0),
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    model = LeNet300100()
    start = time.perf_counter()
    trainer.fit(model, batches(data.train_x, data.train_y, 128, shuffle=True))
    seconds = time.perf_counter() - start
    test = batches(data.test_x, data.test_y, 1000, shuffle=False)
    (metrics,) = trainer.test(model, test, verbose=False)
    return metrics["test_acc"], seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--sparsity", type=float, default=0.9)
    parser.add_argument("--quick", action="store_true", help="4096 images, 2 epochs")
    parser.add_argument("--data-dir", default=None)
    parser.add_argument("--out", default="lightning_fashion_mnist")
    args = parser.parse_args()
    torch.set_num_threads(2)

    data = load_fashion_mnist(args.data_dir)
    interval = 100
    if args.quick:  # a slice of the data, and updates often enough to happen
        data, args.epochs, interval = data.subset(4096, 1000), 2, 5
    results = {"dense": train(data, args.epochs, [], "dense", args.out)}
    sparse = SparseTraining(
        policy="rigl", sparsity=args.sparsity, update_interval=interval, itop=True
    )
    name = f"rigl {args.sparsity:.0%}"
    results[name] = train(data, args.epochs, [sparse], "rigl", args.out)
    print(sparse.sparsifier)
    print(f"ITOP rate: {sparse.itop_rate:.3f}")
    print(f"\n{'run':<10} {'test accuracy':>13} {'train seconds':>13}")
    for name, (accuracy, seconds) in results.items():
        print(f"{name:<10} {accuracy:>13.4f} {seconds:>13.1f}")


if __name__ == "__main__":
    main()
