r"""How a global sparsity is shared out among tensors: pure functions of the shapes.

``uniform`` gives every tensor the same sparsity. ``er`` and ``erk`` are the
Erdős–Rényi allocations of Mocanu et al. 2018 and Evci et al. 2020
(https://arxiv.org/abs/1911.11134), in PyTorch's weight layout
``(out, in, *kernel)``: each tensor's density is proportional to a raw score

.. math::
    \text{erk}: \frac{\sum_i n_i}{\prod_i n_i} \qquad
    \text{er}: \frac{n_\text{in} + n_\text{out}}{n_\text{in} \, n_\text{out}}

scaled by one factor so that the total number of active weights matches the
requested sparsity. A tensor whose density would exceed 1 is made dense and the
factor is solved again over the rest, as in google-research/rigl.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence

__all__ = [
    "DISTRIBUTIONS",
    "active_count",
    "allocate",
    "erdos_renyi",
    "erdos_renyi_kernel",
    "uniform",
]

Shapes = Mapping[str, Sequence[int]]


def uniform(shapes: Shapes, sparsity: float) -> dict[str, float]:
    """Give every tensor the same sparsity.

    Example::

        >>> uniform({"a": (4, 4), "b": (2, 8)}, 0.75)
        {'a': 0.75, 'b': 0.75}
    """
    return {name: sparsity for name in shapes}


def _scaled(shapes: Shapes, sparsity: float, raw: dict[str, float]) -> dict[str, float]:
    """Scale raw density scores so the total active count matches ``sparsity``."""
    numel = {name: math.prod(shape) for name, shape in shapes.items()}
    dense: set[str] = set()
    while True:
        # Active weights left for the non-dense tensors once the dense ones are full.
        budget = sum((1.0 - sparsity) * n for n in numel.values())
        budget -= sum(numel[name] for name in dense)
        divisor = sum(raw[name] * numel[name] for name in numel if name not in dense)
        if divisor <= 0:
            break
        eps = budget / divisor
        sparse = [name for name in numel if name not in dense]
        highest = max(raw[name] for name in sparse)
        if highest * eps <= 1.0:
            break
        dense.update(name for name in sparse if raw[name] == highest)
        if len(dense) == len(numel):
            break
    return {
        name: 0.0 if name in dense else max(0.0, 1.0 - eps * raw[name])
        for name in numel
    }


def erdos_renyi_kernel(shapes: Shapes, sparsity: float) -> dict[str, float]:
    """ERK: density proportional to ``sum(shape) / prod(shape)``.

    Example::

        >>> s = erdos_renyi_kernel({"conv": (16, 3, 3, 3), "fc": (10, 1024)}, 0.9)
        >>> {name: round(value, 4) for name, value in s.items()}
        {'conv': 0.9417, 'fc': 0.8982}
    """
    raw = {name: sum(shape) / math.prod(shape) for name, shape in shapes.items()}
    return _scaled(shapes, sparsity, raw)


def erdos_renyi(shapes: Shapes, sparsity: float) -> dict[str, float]:
    """ER: density proportional to ``(n_in + n_out) / (n_in * n_out)``.

    ``n_out, n_in = shape[0], shape[1]``: kernel dimensions are ignored, as in
    google-research/rigl. A 1-D tensor counts as ``n_out = n_in = shape[0]``.

    Example::

        >>> s = erdos_renyi({"a": (100, 100), "b": (10, 100)}, 0.5)
        >>> {name: round(value, 4) for name, value in s.items()}
        {'a': 0.55, 'b': 0.0}
    """
    raw = {}
    for name, shape in shapes.items():
        n_out, n_in = (shape[0], shape[1]) if len(shape) > 1 else (shape[0], shape[0])
        raw[name] = (n_in + n_out) / (n_in * n_out)
    return _scaled(shapes, sparsity, raw)


DISTRIBUTIONS: dict[str, Callable[[Shapes, float], dict[str, float]]] = {
    "uniform": uniform,
    "er": erdos_renyi,
    "erk": erdos_renyi_kernel,
}


def allocate(
    shapes: Shapes, sparsity: float, distribution: str | Mapping[str, float]
) -> dict[str, float]:
    """Per-tensor sparsity for a named distribution or an explicit mapping.

    Args:
        shapes: ``tensor_fqn -> shape`` of the tensors to sparsify.
        sparsity: overall fraction of zeros, in ``[0, 1)``.
        distribution: ``"uniform"``, ``"er"``, ``"erk"``, or a mapping
            ``tensor_fqn -> sparsity`` that must name exactly the tensors in
            ``shapes``.

    Raises:
        ValueError: unknown distribution name, or a mapping that does not match.
        TypeError: ``distribution`` is neither a string nor a mapping.
    """
    if isinstance(distribution, str):
        if distribution not in DISTRIBUTIONS:
            raise ValueError(
                f"Unknown distribution {distribution!r}.\n"
                f"Known distributions: {sorted(DISTRIBUTIONS)}, "
                "or a dict {tensor_fqn: sparsity}."
            )
        return DISTRIBUTIONS[distribution](shapes, sparsity)
    if not isinstance(distribution, Mapping):
        raise TypeError(
            "distribution must be a name or a dict {tensor_fqn: sparsity}, "
            f"got {type(distribution).__name__}."
        )
    missing = sorted(set(shapes) - set(distribution))
    unknown = sorted(set(distribution) - set(shapes))
    if missing or unknown:
        raise ValueError(
            "The distribution dict must give a sparsity for exactly the selected "
            "tensors.\n"
            f"selected but missing from the dict: {missing}\n"
            f"in the dict but not selected: {unknown}\n"
            "Fix the dict keys, or select the tensors with include=/exclude=."
        )
    result = {}
    for name in shapes:
        value = distribution[name]
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise TypeError(f"Sparsity for {name!r} must be a float, got {value!r}.")
        if not 0.0 <= value < 1.0:
            raise ValueError(f"Sparsity for {name!r} must be in [0, 1), got {value!r}.")
        result[name] = float(value)
    return result


def active_count(numel: int, sparsity: float) -> int:
    """Exact number of active weights: ``round((1 - sparsity) * numel)``, at least 1.

    Example::

        >>> active_count(1000, 0.9), active_count(10, 0.99)
        (100, 1)
    """
    return max(1, min(numel, round((1.0 - sparsity) * numel)))
