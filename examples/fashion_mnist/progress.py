"""Progress bars (tqdm when installed) and the running training loss."""

from __future__ import annotations

import sys
from typing import Any

import torch


def tqdm_class() -> Any:
    """tqdm's class, or ``None`` when tqdm (an optional extra) is missing."""
    try:
        from tqdm.auto import tqdm
    except ImportError:
        return None
    return tqdm


def progress_bar(total: int, label: str, unit: str = "step", position: int = 0) -> Any:
    """A tqdm bar that leaves no line behind, or ``None`` without tqdm."""
    tqdm = tqdm_class()
    if tqdm is None:
        return None
    return tqdm(
        total=total, desc=label, leave=False, unit=unit, position=position, disable=None
    )


def say(message: str) -> None:
    """Prints a line without breaking the progress bars."""
    tqdm = tqdm_class()
    if tqdm is None:
        print(message, flush=True)
    else:
        tqdm.write(message)
        sys.stdout.flush()


class Meter:
    """Mean training loss and accuracy over each window of 50 steps, and a bar.

    Sums stay tensors between windows, so the loop never waits on ``float()``.
    """

    WINDOW = 50

    def __init__(self, total: int, label: str, position: int, *, enabled: bool):
        self.total = total
        self.bar = progress_bar(total, label, position=position) if enabled else None
        self.loss_sum = torch.zeros(())
        self.correct_sum = torch.zeros((), dtype=torch.int64)
        self.seen = 0
        self.last_loss = float("nan")

    def add(
        self,
        step: int,
        loss: torch.Tensor,
        logits: torch.Tensor,
        y: torch.Tensor,
        lr: float,
    ) -> None:
        """Accounts for one step's batch; refreshes the bar every window."""
        self.loss_sum += loss.detach()
        self.correct_sum += (logits.detach().argmax(1) == y).sum()
        self.seen += y.shape[0]
        if step % self.WINDOW != 0 and step != self.total:
            return
        if step % self.WINDOW == 0:
            self.last_loss = float(self.loss_sum) / self.WINDOW
        if self.bar is not None:
            self.bar.set_postfix(
                loss=f"{self.last_loss:.3f}",
                acc=f"{float(self.correct_sum) / max(1, self.seen):.3f}",
                lr=f"{lr:.3g}",
                refresh=False,
            )
            self.bar.update(step - self.bar.n)
        self.loss_sum.zero_()
        self.correct_sum.zero_()
        self.seen = 0

    def close(self) -> None:
        """Removes the bar."""
        if self.bar is not None:
            self.bar.close()
