"""Compact, checked encoding of masks in sparsifier checkpoints.

Format version 2 stores each mask as whichever is smaller:

* ``"bits"``: the flat mask packed 8 positions per byte (``torch.uint8``, most
  significant bit first, zero padding): ``ceil(numel / 8)`` bytes, whatever the
  sparsity;
* ``"indices"``: the sorted flat positions of the active weights, in the
  smallest signed integer dtype that holds ``numel - 1``: ``active * 2`` bytes
  (``int16``) or ``active * 4`` bytes (``int32``).

Indices win below a density of 1/16 (``int16``) or 1/32 (``int32``): at 99%
sparsity, not at 90% (docs/reliability.md has the measurements). Version 1
stored plain bool masks (1 byte per weight); it is still read.

Every entry is checked before anything is loaded: a corrupted or foreign mask is
a :class:`ValueError` / :class:`TypeError` naming the tensor.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor

__all__ = [
    "DCP_VERSION",
    "FORMAT_VERSION",
    "READABLE_VERSIONS",
    "check_version",
    "decode_mask",
    "encode_mask",
    "pack_rows",
    "same",
    "stored_counts",
    "stored_policy_state",
    "unpack_rows",
]

FORMAT_VERSION = 2
READABLE_VERSIONS = (1, 2, 3)  # 3: the DCP layout (Sparsifier.state_dict(sharded=True))

_BIT_WEIGHTS = torch.tensor([128, 64, 32, 16, 8, 4, 2, 1], dtype=torch.uint8)
_SHIFTS = torch.arange(7, -1, -1, dtype=torch.uint8)
_INDEX_DTYPES = (torch.int16, torch.int32, torch.int64)


def index_dtype(numel: int) -> torch.dtype:
    """The smallest signed integer dtype holding every flat position of ``numel``."""
    for dtype in _INDEX_DTYPES:
        if numel - 1 <= torch.iinfo(dtype).max:
            return dtype
    raise ValueError(f"A tensor of {numel} elements has positions beyond int64.")


def encode_mask(mask: Tensor) -> dict[str, Any]:
    """The version-2 checkpoint entry of a bool mask (plain data, CPU tensors).

    Example::

        >>> mask = torch.tensor([True, False, False, True, True])
        >>> entry = encode_mask(mask)
        >>> entry["encoding"], entry["data"]
        ('bits', tensor([152], dtype=torch.uint8))
        >>> torch.equal(decode_mask(entry, "w", (5,), target=3), mask)
        True
    """
    flat = mask.detach().flatten().cpu()  # (numel,)
    numel, active = flat.numel(), int(flat.sum())
    dtype = index_dtype(numel)
    index_bytes = active * torch.tensor([], dtype=dtype).element_size()
    if index_bytes < math.ceil(numel / 8):
        data = flat.nonzero().flatten().to(dtype)  # (active,), sorted
        encoding = "indices"
    else:
        padded = torch.cat([flat, flat.new_zeros((-numel) % 8)])
        data = (padded.view(-1, 8).to(torch.uint8) * _BIT_WEIGHTS).sum(
            1, dtype=torch.uint8
        )  # (ceil(numel / 8),)
        encoding = "bits"
    return {
        "shape": list(mask.shape),
        "active": active,
        "encoding": encoding,
        "data": data,
    }


def decode_mask(
    entry: object, fqn: str, shape: tuple[int, ...], target: int, version: int = 2
) -> Tensor:
    """Check a checkpoint entry against the live mask and return it as a bool mask.

    Args:
        entry: the checkpoint's value for ``fqn``: a bool tensor (version 1) or
            an :func:`encode_mask` dict (version 2).
        fqn: the tensor's name, for messages.
        shape: the live mask's shape.
        target: the live mask's exact active count.
        version: the checkpoint's format version.

    Returns:
        A CPU bool tensor of ``shape`` with exactly ``target`` active weights.

    Raises:
        TypeError: the entry or its data has the wrong type or dtype.
        ValueError: wrong shape, size, count, or out-of-range positions.
    """
    if version == 1:
        mask = _check_tensor(entry, fqn, "mask")
        if mask.dtype != torch.bool:
            raise TypeError(
                f"Mask {fqn!r} in the checkpoint must be a bool tensor, got "
                f"{mask.dtype}."
            )
        _check_shape(fqn, tuple(mask.shape), shape)
        mask = mask.cpu()
    else:
        mask = _decode_v2(entry, fqn, shape)
    active = int(mask.sum())
    if active != target:
        raise ValueError(
            f"Mask {fqn!r} has {active} active weights in the checkpoint, but this "
            f"sparsifier targets {target}.\nBuild the sparsifier with the "
            "checkpoint's sparsity and distribution."
        )
    return mask


def _decode_v2(entry: object, fqn: str, shape: tuple[int, ...]) -> Tensor:
    if not isinstance(entry, Mapping):
        raise TypeError(
            f"Mask {fqn!r} in a format_version 2 checkpoint must be a dict with "
            f"keys ['active', 'data', 'encoding', 'shape'], got "
            f"{type(entry).__name__}."
        )
    missing = sorted({"active", "data", "encoding", "shape"} - set(entry))
    if missing:
        raise ValueError(f"Mask {fqn!r} in the checkpoint lacks the keys {missing}.")
    stored = entry["shape"]
    if not isinstance(stored, (list, tuple)) or not all(
        isinstance(d, int) and not isinstance(d, bool) for d in stored
    ):
        raise TypeError(
            f"Mask {fqn!r}: the checkpoint's shape must be a list of ints, got "
            f"{stored!r}."
        )
    _check_shape(fqn, tuple(stored), shape)
    numel = math.prod(shape)
    data = _check_tensor(entry["data"], fqn, "data")
    if data.dim() != 1:
        raise ValueError(
            f"Mask {fqn!r}: the checkpoint's data must be 1-D, got shape "
            f"{tuple(data.shape)}."
        )
    data = data.cpu()
    encoding = entry["encoding"]
    if encoding == "bits":
        if data.dtype != torch.uint8:
            raise TypeError(
                f"Mask {fqn!r}: bit-packed data must be torch.uint8, got {data.dtype}."
            )
        if data.numel() != math.ceil(numel / 8):
            raise ValueError(
                f"Mask {fqn!r}: bit-packed data has {data.numel()} bytes, but a "
                f"mask of shape {shape} needs {math.ceil(numel / 8)}."
            )
        bits = ((data.unsqueeze(1) >> _SHIFTS) & 1).flatten().bool()
        if bool(bits[numel:].any()):
            raise ValueError(f"Mask {fqn!r}: the padding bits are not zero.")
        mask = bits[:numel]
    elif encoding == "indices":
        if data.dtype not in _INDEX_DTYPES:
            raise TypeError(
                f"Mask {fqn!r}: indices must be int16, int32 or int64, got "
                f"{data.dtype}."
            )
        index = data.long()
        if index.numel() and (
            int(index.min()) < 0
            or int(index.max()) >= numel
            or not bool((index[1:] > index[:-1]).all())
        ):
            raise ValueError(
                f"Mask {fqn!r}: indices must be strictly increasing positions in "
                f"[0, {numel}); the checkpoint's are not."
            )
        mask = torch.zeros(numel, dtype=torch.bool)
        mask[index] = True
    else:
        raise ValueError(
            f"Mask {fqn!r} has unknown encoding {encoding!r}; this sparsetorch "
            "reads 'bits' and 'indices'."
        )
    if entry["active"] != int(mask.sum()):
        raise ValueError(
            f"Mask {fqn!r} says it has {entry['active']!r} active weights but its "
            f"data has {int(mask.sum())}: the checkpoint is corrupted."
        )
    return mask.view(shape)


def _check_tensor(value: object, fqn: str, what: str) -> Tensor:
    if not isinstance(value, Tensor):
        raise TypeError(
            f"Mask {fqn!r}: the checkpoint's {what} must be a tensor, got "
            f"{type(value).__name__}."
        )
    return value


def _check_shape(fqn: str, stored: tuple[int, ...], shape: tuple[int, ...]) -> None:
    if stored != shape:
        raise ValueError(
            f"Mask {fqn!r} has shape {stored} in the checkpoint but the weight has "
            f"shape {shape}."
        )


# -- the layout torch.distributed.checkpoint reshards (FSDP2) ----------------------

#: ``format_version`` of :func:`to_dcp_layout`'s dicts.
DCP_VERSION = 3


def pack_rows(mask: Tensor) -> Tensor:
    """Each row of a bool mask bit-packed (``uint8``, most significant bit first).

    Shape ``(rows, ceil(row_numel / 8))``, zero-padded per row: rows stay whole,
    so a mask sharded on dim 0 packs shard by shard and
    ``torch.distributed.checkpoint`` reshards the packed rows like the weight's.

    Example::

        >>> pack_rows(torch.tensor([[True, False, True], [False, False, True]]))
        tensor([[160],
                [ 32]], dtype=torch.uint8)
    """
    shape = tuple(mask.shape) or (1,)
    rows = mask.reshape(shape[0], math.prod(shape[1:])).cpu()
    padded = torch.cat([rows, rows.new_zeros(rows.shape[0], (-rows.shape[1]) % 8)], 1)
    packed = padded.view(rows.shape[0], padded.shape[1] // 8, 8).to(torch.uint8)
    packed *= _BIT_WEIGHTS
    return packed.sum(2, dtype=torch.uint8)  # (rows, ceil(row_numel / 8))


def unpack_rows(data: object, fqn: str, shape: tuple[int, ...]) -> Tensor:
    """The bool mask of ``shape`` (rows of a shard, or a whole tensor) from
    :func:`pack_rows`, checked.

    Raises:
        TypeError: ``data`` is not a ``uint8`` tensor.
        ValueError: its shape does not fit, or a padding bit is set.
    """
    data = _check_tensor(data, fqn, "data")
    if data.dtype != torch.uint8:
        raise TypeError(
            f"Mask {fqn!r}: row-packed data must be torch.uint8, got {data.dtype}."
        )
    rows = shape[0] if shape else 1
    row_numel = math.prod(shape[1:]) if shape else 1
    expected = (rows, math.ceil(row_numel / 8))
    if tuple(data.shape) != expected:
        raise ValueError(
            f"Mask {fqn!r}: row-packed data has shape {tuple(data.shape)}, but "
            f"rows of shape {shape} need {expected}: the checkpoint is from "
            "another model."
        )
    bits = ((data.cpu().unsqueeze(2) >> _SHIFTS) & 1).bool()
    bits = bits.view(rows, expected[1] * 8)
    if bool(bits[:, row_numel:].any()):
        raise ValueError(
            f"Mask {fqn!r}: the padding bits are not zero: the checkpoint is corrupted."
        )
    return bits[:, :row_numel].reshape(shape)


# -- checks of a whole sparsifier checkpoint ----------------------------------------


def check_version(state_dict: Mapping[str, Any]) -> int:
    """The checkpoint's format version, if this sparsetorch reads it."""
    if "format_version" not in state_dict:
        hint = (
            "It looks like a rigl-torch RigLScheduler state dict: pass it to "
            "sparsetorch.RigLScheduler(..., state_dict=...), which converts it."
            if "backward_masks" in state_dict
            else "Pass the dict made by sparsifier.state_dict()."
        )
        raise ValueError(
            "Not a sparsifier checkpoint: it has no 'format_version' "
            f"(keys: {sorted(map(str, state_dict))}).\n{hint}"
        )
    version = state_dict["format_version"]
    if isinstance(version, int) and version > max(READABLE_VERSIONS):
        raise ValueError(
            f"The sparsifier checkpoint has format_version {version}, newer than "
            f"this sparsetorch reads (versions {list(READABLE_VERSIONS)}).\n"
            "Upgrade sparsetorch to load it."
        )
    if (
        isinstance(version, bool)
        or not isinstance(version, int)
        or version not in READABLE_VERSIONS
    ):
        raise ValueError(
            f"Unknown sparsifier checkpoint format_version {version!r}; this "
            f"sparsetorch reads versions {list(READABLE_VERSIONS)}."
        )
    return version


def stored_counts(
    state_dict: Mapping[str, Any],
    allocated: Mapping[str, int],
    masks: Mapping[str, Tensor],
) -> dict[str, int]:
    """The checkpoint's active count per tensor, checked.

    Checkpoints made before per-tensor counts could move (no ``"active"``
    key) held the allocated counts.
    """
    if "active" not in state_dict:
        return dict(allocated)
    active = state_dict["active"]
    if not isinstance(active, Mapping) or set(active) != set(masks):
        raise ValueError(
            "The sparsifier checkpoint's 'active' must be a dict {tensor_fqn: "
            f"active count}} over the masked tensors {sorted(masks)}, got "
            f"{active!r}."
        )
    for fqn, count in active.items():
        numel = masks[fqn].numel()
        if isinstance(count, bool) or not isinstance(count, int):
            raise TypeError(
                f"The sparsifier checkpoint's active count of {fqn!r} must be an "
                f"int, got {count!r}."
            )
        if not 0 <= count <= numel:
            raise ValueError(
                f"The sparsifier checkpoint's active count of {fqn!r} is {count}, "
                f"outside [0, {numel}]: the checkpoint is corrupted."
            )
    return {fqn: active[fqn] for fqn in masks}


def stored_policy_state(
    state_dict: Mapping[str, Any], params: Mapping[str, Tensor]
) -> tuple[dict[str, Tensor], bool]:
    """The checkpoint's policy state (running signals, SNIP's flag), checked."""
    state = state_dict.get("policy_state", {})
    if not isinstance(state, Mapping):
        raise TypeError(
            "The sparsifier checkpoint's 'policy_state' must be a dict, got "
            f"{type(state).__name__}."
        )
    signals = state.get("signals", {})
    pruned = state.get("pruned_at_init", False)
    if not isinstance(pruned, bool):
        raise TypeError(
            "The sparsifier checkpoint's 'pruned_at_init' must be True or False, "
            f"got {pruned!r}."
        )
    if not isinstance(signals, Mapping) or not set(signals) <= set(params):
        raise ValueError(
            "The sparsifier checkpoint's 'signals' must be a dict {tensor_fqn: "
            f"tensor}} over the masked tensors {sorted(params)}."
        )
    loaded = {}
    for fqn, signal in signals.items():
        param = params[fqn]
        if not isinstance(signal, Tensor) or signal.shape != param.shape:
            raise ValueError(
                f"The sparsifier checkpoint's signal for {fqn!r} must be a tensor "
                f"of shape {tuple(param.shape)}, got "
                f"{getattr(signal, 'shape', type(signal).__name__)}."
            )
        loaded[fqn] = signal.detach().to(param.device, copy=True)
    return loaded, pruned


def same(a: Any, b: Any) -> bool:
    if isinstance(a, float) or isinstance(b, float):
        return (
            isinstance(a, (int, float))
            and isinstance(b, (int, float))
            and (math.isclose(a, b, rel_tol=1e-9, abs_tol=1e-12))
        )
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
    return bool(a == b)
