"""rigl-torch 0.5.2's conventions, for :class:`sparsetorch.RigLScheduler`.

Which layers it lists (``W``), how it checks and coerces its constructor's
arguments, and how its ``RigLScheduler.state_dict()`` is laid out and read.
Written from rigl-torch's documented behaviour; no code of it is used.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn

__all__ = [
    "check_arguments",
    "count",
    "is_checkpoint",
    "layers",
    "read_checkpoint",
    "weight",
]

_DISTRIBUTIONS = {"uniform": "uniform", "ERK": "erk", "erk": "erk"}

#: The keys of a rigl-torch ``RigLScheduler.state_dict()``.
_KEYS = frozenset(
    {
        "dense_allocation",
        "S",
        "N",
        "hyperparams",
        "step",
        "rigl_steps",
        "backward_masks",
        "_linear_layers_mask",
    }
)
#: rigl-torch's hyperparameter names -> RigLScheduler's argument names.
_HYPERPARAMS = {
    "delta_T": "delta",
    "alpha": "alpha",
    "T_end": "T_end",
    "ignore_linear_layers": "ignore_linear_layers",
    "static_topo": "static_topo",
    "sparsity_distribution": "sparsity_distribution",
    "grad_accumulation_n": "grad_accumulation_n",
}


def layers(model: nn.Module) -> list[tuple[str, nn.Module, bool]]:
    """``(tensor_fqn, module, is_linear)`` of each layer rigl-torch lists in ``W``.

    rigl-torch walks the modules in order, starting with the model itself: an
    ``nn.Linear``, or any module with a ``weight`` other than
    ``nn.BatchNorm2d``, is a layer (and is not looked inside); any other module
    is looked inside. Modules whose ``weight`` is not a tensor are skipped
    (rigl-torch fails on them).
    """
    found: list[tuple[str, nn.Module, bool]] = []

    def visit(name: str, module: nn.Module) -> None:
        is_linear = isinstance(module, nn.Linear)
        if is_linear or (
            hasattr(module, "weight") and type(module) is not nn.BatchNorm2d
        ):
            if isinstance(getattr(module, "weight", None), Tensor):
                found.append(
                    (f"{name}.weight" if name else "weight", module, is_linear)
                )
            return
        for child_name, child in module.named_children():
            visit(f"{name}.{child_name}" if name else child_name, child)

    visit("", model)
    return found


def weight(module: nn.Module) -> Tensor:
    """The ``weight`` of a module :func:`layers` listed."""
    value = module.weight
    assert isinstance(value, Tensor)  # layers() lists only these
    return value


def is_checkpoint(state_dict: Mapping[str, Any]) -> bool:
    """Whether ``state_dict`` is rigl-torch's (it has no ``format_version``)."""
    return "format_version" not in state_dict and "backward_masks" in state_dict


def read_checkpoint(
    state_dict: Mapping[str, Any], model_layers: Sequence[tuple[str, nn.Module, bool]]
) -> tuple[dict[str, Any], dict[str, Tensor], dict[str, float]]:
    """The settings, masks and sparsities of a rigl-torch ``state_dict()``.

    Returns:
        ``(settings, masks, sparsities)``: the constructor arguments it was
        made with, and ``tensor_fqn -> bool mask`` and ``tensor_fqn -> S`` of
        its sparse layers.

    Raises:
        ValueError: a key is missing, or it was made for another model.
        TypeError: a value has the wrong type.
    """
    missing = sorted(_KEYS - set(state_dict))
    if missing:
        raise ValueError(
            f"The rigl-torch checkpoint lacks the keys {missing}: it is truncated "
            "or not made by rigl-torch's RigLScheduler.state_dict()."
        )
    hyperparams = state_dict["hyperparams"]
    if not isinstance(hyperparams, Mapping):
        raise TypeError(
            "The rigl-torch checkpoint's 'hyperparams' must be a dict, got "
            f"{type(hyperparams).__name__}."
        )
    absent = sorted(set(_HYPERPARAMS) - set(hyperparams))
    if absent:
        raise ValueError(f"The rigl-torch checkpoint's 'hyperparams' lacks {absent}.")
    settings = {ours: hyperparams[theirs] for theirs, ours in _HYPERPARAMS.items()}
    settings["dense_allocation"] = state_dict["dense_allocation"]
    numels = [weight(module).numel() for _, module, _ in model_layers]
    stored = state_dict["N"]
    if not isinstance(stored, Sequence) or list(stored) != numels:
        raise ValueError(
            "The rigl-torch checkpoint is from another model: its layers' sizes "
            f"N are {stored!r}, this model's are {numels} (layers "
            f"{[fqn for fqn, _, _ in model_layers]})."
        )
    backward_masks = state_dict["backward_masks"]
    if not isinstance(backward_masks, Sequence) or len(backward_masks) != len(
        model_layers
    ):
        raise ValueError(
            "The rigl-torch checkpoint's 'backward_masks' must be a list with one "
            f"entry per layer ({len(model_layers)}), got {backward_masks!r:.200}."
        )
    targets = state_dict["S"]
    if not isinstance(targets, Sequence) or len(targets) != len(model_layers):
        raise ValueError(
            "The rigl-torch checkpoint's 'S' must be a list with one sparsity per "
            f"layer ({len(model_layers)}), got {targets!r:.200}."
        )
    masks, sparsities = {}, {}
    for (fqn, module, _), mask, target in zip(
        model_layers, backward_masks, targets, strict=True
    ):
        if mask is None:
            continue
        if not isinstance(mask, Tensor):
            raise TypeError(
                f"The rigl-torch checkpoint's mask of {fqn!r} must be a tensor or "
                f"None, got {type(mask).__name__}."
            )
        shape = tuple(weight(module).shape)
        if tuple(mask.shape) != shape:
            raise ValueError(
                f"The rigl-torch checkpoint's mask of {fqn!r} has shape "
                f"{tuple(mask.shape)}, the weight {shape}."
            )
        if mask.dtype != torch.bool and not bool(((mask == 0) | (mask == 1)).all()):
            raise ValueError(
                f"The rigl-torch checkpoint's mask of {fqn!r} holds values other "
                "than 0 and 1."
            )
        mask = mask.detach().to("cpu", torch.bool)
        sparsity = _as_real(f"The rigl-torch checkpoint's S of {fqn!r}", target)
        numel = mask.numel()
        keep = numel - int(sparsity * numel)  # rigl-torch's count
        if int(mask.sum()) != keep:
            raise ValueError(
                f"The rigl-torch checkpoint's mask of {fqn!r} has {int(mask.sum())} "
                f"active weights, but its S={sparsity!r} keeps {numel} - "
                f"int({sparsity!r} * {numel}) = {keep}: it is corrupted."
            )
        masks[fqn], sparsities[fqn] = mask, sparsity
    count(state_dict, "step")
    count(state_dict, "rigl_steps")
    return settings, masks, sparsities


def count(state_dict: Mapping[str, Any], key: str) -> int:
    value = state_dict[key]
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 0:
        raise ValueError(
            f"The rigl-torch checkpoint's {key!r} must be an int >= 0, got {value!r}."
        )
    return int(value)


def _as_flag(name: str, value: object) -> bool:
    """``True``/``False``, ``1``/``0`` (an argparse int) or a numpy bool."""
    if isinstance(value, (bool, numbers.Integral)) and value in (0, 1):
        return bool(value)
    if type(value).__module__ == "numpy" and type(value).__name__ in ("bool", "bool_"):
        return bool(value)
    raise TypeError(f"{name} must be True or False (or 1 or 0), got {value!r}.")


def _as_real(name: str, value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a float, got {value!r}.")
    return float(value)


def _as_int(name: str, value: object) -> int:
    """An int, or a float or numpy number holding one (``100.0``)."""
    if not isinstance(value, bool) and isinstance(value, numbers.Integral):
        return int(value)
    if (
        not isinstance(value, bool)
        and isinstance(value, numbers.Real)
        and float(value).is_integer()
    ):
        return int(float(value))
    raise TypeError(f"{name} must be an int, got {value!r}.")


def check_arguments(
    *,
    dense_allocation: object,
    T_end: object,
    sparsity_distribution: object,
    ignore_linear_layers: object,
    delta: object,
    alpha: object,
    static_topo: object,
    grad_accumulation_n: object,
) -> dict[str, Any]:
    """Check every ``RigLScheduler`` setting; return them as Python values."""
    flags = {
        "ignore_linear_layers": _as_flag("ignore_linear_layers", ignore_linear_layers),
        "static_topo": _as_flag("static_topo", static_topo),
    }
    dense = _as_real("dense_allocation", dense_allocation)
    if not 0 < dense <= 1:
        raise ValueError(
            f"dense_allocation must be in (0, 1], got {dense_allocation!r}.\n"
            "It is the fraction of weights kept: 0.1 means 90% sparsity."
        )
    if not isinstance(sparsity_distribution, str):
        raise TypeError(
            "sparsity_distribution must be a name, got "
            f"{sparsity_distribution!r}.\nKnown: {sorted(_DISTRIBUTIONS)}."
        )
    if sparsity_distribution not in _DISTRIBUTIONS:
        raise ValueError(
            f"Unknown sparsity_distribution {sparsity_distribution!r}.\n"
            f"Known: {sorted(_DISTRIBUTIONS)}."
        )
    interval = _as_int("delta", delta)
    accumulate = _as_int("grad_accumulation_n", grad_accumulation_n)
    if interval < 1:
        raise ValueError(f"delta must be an int >= 1, got {delta!r}.")
    if not 1 <= accumulate < interval:
        raise ValueError(
            "grad_accumulation_n must be an int in [1, delta), got "
            f"{grad_accumulation_n!r} (delta={delta!r})."
        )
    end: float | None = None
    if T_end is None and not flags["static_topo"]:
        raise ValueError(
            "RigLScheduler needs T_end, the step at which topology updates "
            "stop (rigl-torch crashes without it).\nA common choice: "
            "T_end = int(0.75 * epochs * len(loader))."
        )
    if T_end is not None:
        end = _as_real("T_end", T_end)
        if not math.isfinite(end) or end <= 0:
            raise ValueError(
                f"T_end must be > 0, got {T_end!r}: it is the step at which "
                "topology updates stop."
            )
        if end.is_integer():
            end = int(end)
    fraction = _as_real("alpha", alpha)
    if not 0 <= fraction <= 1:
        raise ValueError(
            f"alpha must be in [0, 1], got {alpha!r}: it is the fraction of "
            "active weights the first update drops."
        )
    return {
        "dense_allocation": dense,
        "T_end": end,
        "sparsity_distribution": sparsity_distribution,
        "delta": interval,
        "alpha": fraction,
        "grad_accumulation_n": accumulate,
        **flags,
    }
