"""Hugging Face Trainer on Fashion-MNIST: a small ViT, dense vs RigL at 90% sparsity.

The sparse run is the dense run plus ``callbacks=[SparseTrainingCallback(...)]``:
same model config, same Trainer arguments (AdamW, linear warmup and decay).

Run::

    python examples/hf_vit_fashion_mnist.py --policy rigl    # 2-3 min of one core
    python examples/hf_vit_fashion_mnist.py --policy dense
    python examples/hf_vit_fashion_mnist.py --quick          # a slice: smoke test

The data comes from :mod:`fashion_mnist_data` (beside this file; no torchvision).
"""

from __future__ import annotations

import argparse
import tempfile

import numpy as np
import torch
from fashion_mnist_data import load_fashion_mnist
from torch import Tensor
from transformers import (
    Trainer,
    TrainingArguments,
    ViTConfig,
    ViTForImageClassification,
)

from sparsetorch.integrations.transformers import SparseTrainingCallback


class Images(torch.utils.data.Dataset[dict[str, Tensor]]):
    """In-memory images as the ``{"pixel_values", "labels"}`` dicts ViT takes."""

    def __init__(self, x: Tensor, y: Tensor) -> None:
        self.x, self.y = x, y

    def __len__(self) -> int:
        return len(self.y)

    def __getitem__(self, i: int) -> dict[str, Tensor]:
        return {"pixel_values": self.x[i], "labels": self.y[i]}


def accuracy(prediction: tuple[np.ndarray, np.ndarray]) -> dict[str, float]:
    logits, labels = prediction
    return {"accuracy": float((logits.argmax(-1) == labels).mean())}


def main(argv: list[str] | None = None) -> dict[str, float]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--policy", default="rigl", choices=["dense", "rigl", "set", "static"]
    )
    parser.add_argument("--sparsity", type=float, default=0.9)
    parser.add_argument("--epochs", type=float, default=5.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--data-dir", default=None)
    parser.add_argument(
        "--output-dir", default=None, help="checkpoints (default: none kept)"
    )
    parser.add_argument(
        "--quick", action="store_true", help="1000 images, 1 epoch, update every 2"
    )
    args = parser.parse_args(argv)

    torch.set_num_threads(1)  # tiny matrices: one thread beats two contending
    data = load_fashion_mnist(args.data_dir)
    if args.quick:
        data, args.epochs = data.subset(1000, 500), 1.0
    torch.manual_seed(args.seed)
    model = ViTForImageClassification(
        ViTConfig(
            image_size=28,
            patch_size=7,
            num_channels=1,  # 16 patches + [CLS]
            hidden_size=64,
            num_hidden_layers=4,
            num_attention_heads=4,
            intermediate_size=128,
            num_labels=10,
        )
    )
    callbacks = []
    if args.policy != "dense":
        callbacks.append(
            SparseTrainingCallback(
                policy=args.policy,
                sparsity=args.sparsity,
                update_interval=2 if args.quick else 100,
                exclude=["classifier.weight"],  # the 10-way head stays dense
            )
        )
    training = TrainingArguments(
        args.output_dir or tempfile.mkdtemp(),
        num_train_epochs=args.epochs,
        per_device_train_batch_size=128,
        per_device_eval_batch_size=1000,
        learning_rate=2e-3,
        weight_decay=0.05,
        warmup_steps=0.05,
        lr_scheduler_type="linear",
        eval_strategy="epoch",
        save_strategy="epoch" if args.output_dir else "no",
        logging_strategy="epoch",
        use_cpu=True,
        report_to=[],
        disable_tqdm=True,
        seed=args.seed,
    )
    trainer = Trainer(
        model,
        training,
        callbacks=callbacks,
        compute_metrics=accuracy,
        train_dataset=Images(data.train_x, data.train_y),
        eval_dataset=Images(data.test_x, data.test_y),
    )
    trainer.train()
    metrics = trainer.evaluate()
    if callbacks:
        print(callbacks[0].sparsifier)
    print(f"{args.policy}: test accuracy {metrics['eval_accuracy']:.4f}")
    return metrics


if __name__ == "__main__":
    main()
