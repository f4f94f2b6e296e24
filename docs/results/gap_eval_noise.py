"""How precisely one 10000-image evaluation set measures RigL's gap to dense.

Trains dense and RigL ERK 90% (the example's recipe) on the first 50000 training
images for seeds 0-2, then scores the same models on the validation split (the last
10000 training images) and on the test set. For each split it prints the gap and
its standard error over the evaluation images: the part of the uncertainty that
more seeds do not remove, because every seed is scored on the same images.

    python docs/results/gap_eval_noise.py    # about 3 minutes on one core
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "examples"))
from fashion_mnist import config, train
from fashion_mnist_data import load_fashion_mnist

SEEDS = (0, 1, 2)
RUNS = (("dense", 0.0, "-"), ("rigl", 0.9, "erk"))


def main() -> None:
    torch.set_num_threads(1)
    full = load_fashion_mnist(None, download=False)
    data = full.holdout(10000)
    splits = {"validation": data.test_x, "test": full.test_x}
    labels = {"validation": data.test_y, "test": full.test_y}
    correct: dict[tuple[str, str, int], torch.Tensor] = {}
    scored = train.evaluate
    run: tuple[str, int] = ("", 0)

    def score_both_splits(
        model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor
    ) -> float:
        with torch.no_grad():
            model.eval()
            for split, images in splits.items():
                hits = model(images).argmax(1) == labels[split]
                correct[(split, *run)] = hits.float()
        return scored(model, x, y)

    train.evaluate = score_both_splits  # type: ignore[assignment]
    recipe = config.RECIPES["lenet300"]
    for seed in SEEDS:
        for policy, sparsity, distribution in RUNS:
            run = (policy, seed)
            spec = config.RunSpec("lenet300", policy, sparsity, distribution, seed)
            train.train_one(spec, recipe, data, progress=False)
    for split in splits:
        # per image: dense's hit minus RigL's, averaged over the seeds
        diff = torch.stack(
            [correct[(split, "dense", s)] - correct[(split, "rigl", s)] for s in SEEDS]
        ).mean(0)
        gap = -100 * diff.mean()
        se = 100 * diff.std() / diff.numel() ** 0.5
        print(f"{split:>10}: RigL - dense {gap:+.2f} ± {se:.2f} (s.e. over images)")


if __name__ == "__main__":
    main()
