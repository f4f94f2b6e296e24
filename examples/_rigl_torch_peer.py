"""Benchmark-only adapter around rigl-torch 0.5.2's ``RigLScheduler``.

rigl-torch is a peer implementation of RigL that the Fashion-MNIST example can run
on the same model, data, recipe and seeds as sparsetorch (``--peer`` or
``--policy rigl-torch``). It is not a dependency of sparsetorch; install it with
``pip install rigl-torch==0.5.2 --no-deps``.

Two things need care:

* ``rigl_torch.util`` imports torchvision at module level, only to test
  ``isinstance(m, torchvision.models.resnet.Bottleneck | BasicBlock)``.
  torchvision cannot be installed next to every torch build, so while rigl-torch is
  imported a stub ``torchvision.models.resnet`` with two dummy classes stands in
  (no object is ever an instance of them, which is right for the models here), and
  ``sys.modules`` is restored afterwards so the stub leaks to no other code.
* rigl-torch's ``'uniform'`` distribution keeps the first weighted layer dense.
  With ``first_layer_dense=False`` the adapter hands rigl-torch a holder module
  whose first weighted layer is a one-element dummy, so the dummy is the layer kept
  dense and every real layer gets the requested sparsity; rigl-torch's algorithm
  itself is unchanged.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import sys
import types
from typing import Any

import torch
from torch import nn

__all__ = ["PEER_VERSION", "PeerUnavailableError", "RigLTorchPeer"]

PEER_VERSION = "0.5.2"
_INSTALL = f"pip install rigl-torch=={PEER_VERSION} --no-deps"


class PeerUnavailableError(RuntimeError):
    """rigl-torch cannot be imported or is not the version this adapter knows."""


def _torchvision_stub() -> dict[str, types.ModuleType]:
    """Builds the three stub modules rigl-torch's ``util`` needs."""

    class Bottleneck(nn.Module):
        """Placeholder: no model here contains torchvision ResNet blocks."""

    class BasicBlock(nn.Module):
        """Placeholder: no model here contains torchvision ResNet blocks."""

    root = types.ModuleType("torchvision")
    models = types.ModuleType("torchvision.models")
    resnet = types.ModuleType("torchvision.models.resnet")
    resnet.Bottleneck = Bottleneck  # type: ignore[attr-defined]
    resnet.BasicBlock = BasicBlock  # type: ignore[attr-defined]
    models.resnet = resnet  # type: ignore[attr-defined]
    root.models = models  # type: ignore[attr-defined]
    return {
        "torchvision": root,
        "torchvision.models": models,
        "torchvision.models.resnet": resnet,
    }


def _import_rigl_scheduler() -> Any:
    """Imports ``rigl_torch.RigL.RigLScheduler`` with torchvision stubbed."""
    try:
        version = importlib.metadata.version("rigl-torch")
    except importlib.metadata.PackageNotFoundError:
        raise PeerUnavailableError(
            f"the rigl-torch peer is not installed: run `{_INSTALL}`"
        ) from None
    if version != PEER_VERSION:
        raise PeerUnavailableError(
            f"rigl-torch {version} is installed but the peer adapter was written for "
            f"{PEER_VERSION}: run `{_INSTALL}`"
        )
    if "rigl_torch.RigL" in sys.modules:
        return sys.modules["rigl_torch.RigL"].RigLScheduler
    stub = _torchvision_stub()
    saved = {name: sys.modules.get(name) for name in stub}
    sys.modules.update(stub)
    try:
        module = importlib.import_module("rigl_torch.RigL")
    finally:
        for name, previous in saved.items():
            if previous is None:
                sys.modules.pop(name, None)
            else:
                sys.modules[name] = previous
    return module.RigLScheduler


class _DenseFirst(nn.Module):
    """One-element stand-in that rigl-torch's 'uniform' keeps dense."""

    def __init__(self) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(1), requires_grad=False)


class RigLTorchPeer:
    """rigl-torch's ``RigLScheduler`` driven with sparsetorch's knobs.

    The training loop follows rigl-torch's protocol: after ``loss.backward()``
    call the peer, and step the optimizer only when it returns ``True``
    (on update steps rigl-torch rewires the masks instead of stepping).

    Args:
        model: the network; its ``nn.Linear`` / conv weights are made sparse.
        optimizer: the optimizer over ``model``'s parameters.
        sparsity: fraction of zeros in every sparse layer, in ``[0, 1)``.
        end_step: step after which the topology is frozen (rigl-torch ``T_end``).
        update_interval: steps between topology updates (rigl-torch ``delta``).
        drop_fraction: initial fraction of active weights replaced per update,
            cosine-annealed to 0 at ``end_step`` (rigl-torch ``alpha``).
        first_layer_dense: keep rigl-torch's native 'uniform' allocation, which
            leaves the first layer dense; ``False`` makes all layers sparse.

    Raises:
        PeerUnavailableError: if rigl-torch 0.5.2 is not installed.
        ValueError: if ``sparsity`` is outside ``[0, 1)``.
    """

    def __init__(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        *,
        sparsity: float,
        end_step: int,
        update_interval: int,
        drop_fraction: float,
        first_layer_dense: bool = False,
    ) -> None:
        if not 0.0 <= sparsity < 1.0:
            raise ValueError(
                f"rigl-torch sparsity must be in [0, 1), got {sparsity}; rigl-torch "
                "takes dense_allocation = 1 - sparsity, which must be in (0, 1]"
            )
        scheduler_cls = _import_rigl_scheduler()
        target: nn.Module = model
        if not first_layer_dense:
            target = nn.Module()
            target.add_module("dense_first", _DenseFirst())
            target.add_module("model", model)
        self.scheduler = scheduler_cls(
            target,
            optimizer,
            dense_allocation=1.0 - sparsity,
            T_end=end_step,
            delta=update_interval,
            alpha=drop_fraction,
            sparsity_distribution="uniform",
            ignore_linear_layers=False,
        )
        names = {id(p): name for name, p in model.named_parameters()}
        self._named: list[tuple[str, torch.Tensor, int]] = []
        for index, weight in enumerate(self.scheduler.W):
            if id(weight) in names:
                self._named.append((names[id(weight)], weight, index))

    def __call__(self) -> bool:
        """Advances rigl-torch one step; ``True`` means: step the optimizer now."""
        return bool(self.scheduler())

    @property
    def masks(self) -> dict[str, torch.Tensor]:
        """Live bool masks of the sparse weights, keyed by parameter name."""
        out: dict[str, torch.Tensor] = {}
        for name, _weight, index in self._named:
            mask = self.scheduler.backward_masks[index]
            if mask is not None:
                out[name] = mask
        return out

    def summary(self) -> str:
        """Per-tensor table of the masks: shape, sparsity, active count.

        (rigl-torch's own ``str()`` divides by zero on a model without conv
        layers, so the adapter formats the table itself.)
        """
        masks = self.masks
        rows = [("tensor", "shape", "sparsity", "active", "numel")]
        total_active = total = 0
        for name, weight, _index in self._named:
            mask = masks.get(name)
            active = weight.numel() if mask is None else int(mask.sum())
            total_active += active
            total += weight.numel()
            rows.append(
                (
                    name,
                    str(tuple(weight.shape)),
                    f"{1 - active / weight.numel():.4f}",
                    str(active),
                    str(weight.numel()),
                )
            )
        rows.append(
            (
                "total",
                "",
                f"{1 - total_active / max(1, total):.4f}",
                str(total_active),
                str(total),
            )
        )
        widths = [max(len(r[i]) for r in rows) for i in range(5)]
        return "\n".join(
            "  ".join(
                cell.rjust(w) if i >= 2 else cell.ljust(w)
                for i, (cell, w) in enumerate(zip(row, widths, strict=True))
            ).rstrip()
            for row in rows
        )
