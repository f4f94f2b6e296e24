r"""Mask structure: which masks are legal, for any policy.

A *structure* constrains where a tensor's active weights may sit. sparsetorch
applies it when it draws the initial masks and at every update, for any
policy: the policy still only scores what to drop and what to grow.

* :class:`NM` (``"2:4"``): every group of ``m`` consecutive weights along the
  input dimension keeps exactly ``n``. Density is ``n / m`` in every layer.
* :class:`ConstantFanIn` (``"constant-fan-in"``): every output unit (row)
  keeps the same number ``k`` of active weights, as in SRigL (Lasby et al.
  2023, "Dynamic Sparse Training with Structured Sparsity",
  https://arxiv.org/abs/2305.02299), optionally with its neuron ablation.

**Rows and the input dimension.** Every structured tensor is read as a 2-D
matrix of *rows* (one per output unit) by *columns* (the unit's inputs, its
fan-in):

* ``nn.Linear`` ``(out, in)``: row ``o`` is ``weight[o, :]``.
* ``nn.Conv{1,2,3}d`` ``(out, in / groups, *kernel)``: row ``o`` is
  ``weight[o].flatten()``, in PyTorch's memory order: input channel slowest,
  the last kernel dimension fastest (index ``(c * kh + i) * kw + j`` for a
  2-D kernel), which is the column order of ``F.unfold``. An N:M group is
  ``m`` consecutive entries of that row, so for a 3x3 kernel and ``m = 4``
  a group can span two input channels.
* Hugging Face ``Conv1D`` stores ``(in, out)``: row ``o`` is
  ``weight[:, o]``.
* Any other tensor of two or more dimensions chosen with ``include=``: row
  ``i`` is ``tensor[i].flatten()``.

``nn.ConvTranspose*`` weights (``(in, out / groups, *kernel)``) and 1-D
tensors are refused.

**Updates.** The ``n_drop`` active weights of lowest drop score are dropped
across the whole tensor, as in the unstructured update (and in SRigL); then
each group (an N:M group, or a row under constant fan-in) grows back exactly
as many as it lost, choosing its positions of highest grow score among those
not kept (a weight just dropped may be grown back). Ties at every cut are drawn
with the update's generator. So drops and grows still balance, and every group
keeps its quota after every update.

**Neuron ablation** (``ConstantFanIn(ablation=gamma)``, SRigL's
:math:`\gamma_{sal}`): before the drop, a weight is *salient* if it would be
kept by the drop criterion (one of the ``n_active - n_drop`` highest drop
scores among the active weights) or would be grown by the grow criterion (one
of the ``n_drop`` highest grow scores over the whole tensor). A row with fewer
than ``max(1, floor(gamma * k0))`` salient weights is ablated (all its weights
dropped), where ``k0`` is the tensor's fan-in with no row ablated. The other
rows share the tensor's budget ``K = rows * k0``: their fan-in becomes
``k = K // active_rows``, so the tensor holds ``active_rows * k`` weights (at
most ``active_rows - 1`` fewer than ``K``). At least ``ceil(K / columns)`` rows
stay active (so that ``k`` fits in a row): if fewer pass the threshold, the
most salient ones are kept. An ablated row whose gradients make it salient
again comes back. As in SRigL's code, the last structured tensor of the model
(the output layer) is never ablated. Deviations from SRigL's reference code:
``gamma`` is a fraction of the sparse fan-in ``k0`` (SRigL's code offers this
and the dense fan-in), a row over the new ``k`` keeps its highest-scoring
weights (SRigL's code keeps arbitrary ones), and ties are drawn at random.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from sparsetorch.policies.base import (
    Policy,
    _check_finite,
    _nonzero,
    _shares_memory,
    _top,
)

if TYPE_CHECKING:
    from collections.abc import Mapping

__all__ = [
    "NM",
    "ConstantFanIn",
    "Layout",
    "Structure",
    "check_mask",
    "initial_mask",
    "make_structure",
    "select_top",
    "update_structured",
]


@dataclass(frozen=True)
class Structure:
    """Base class of mask structures (see the module docstring).

    sparsetorch selects within :class:`NM` and :class:`ConstantFanIn`; other
    subclasses are refused by :func:`make_structure`.
    """

    def fan_in(self, cols: int, sparsity: float) -> int:
        """Active weights per row of a tensor with ``cols`` columns.

        Raises:
            ValueError: ``sparsity`` cannot be met with this structure.
        """
        raise NotImplementedError

    def group_size(self, cols: int) -> int:
        """Size of the groups that each keep a fixed quota (a row, or ``m``)."""
        raise NotImplementedError

    def check_shape(self, fqn: str, shape: tuple[int, ...], cols: int) -> None:
        """Raise ``ValueError`` if a tensor of this shape cannot take the structure."""

    def check_sparsities(self, sparsities: Mapping[str, float]) -> None:
        """Raise ``ValueError`` if an allocated sparsity cannot be met."""


@dataclass(frozen=True)
class NM(Structure):
    """N:M sparsity: every ``m`` consecutive inputs of a row keep exactly ``n``.

    ``NM(2, 4)`` (the string ``"2:4"``) is the pattern NVIDIA's sparse tensor
    cores run (``torch.sparse.to_sparse_semi_structured``). Every layer's
    density is ``n / m``: pass ``sparsity=1 - n / m`` with
    ``distribution="uniform"``. Each row's length (the fan-in) must be a
    multiple of ``m``.

    Args:
        n: weights kept per group, ``1 <= n < m``.
        m: group size, ``m >= 2``.

    Example::

        >>> NM(2, 4)
        NM(n=2, m=4)
        >>> make_structure("2:4") == NM(2, 4)
        True
    """

    n: int
    m: int

    def __post_init__(self) -> None:
        for name, value in (("n", self.n), ("m", self.m)):
            if isinstance(value, bool) or not isinstance(value, int):
                raise TypeError(f"NM: {name} must be an int, got {value!r}.")
        if not 1 <= self.n < self.m:
            raise ValueError(
                f"NM needs 1 <= n < m, got n={self.n}, m={self.m}.\n"
                'Example: NM(2, 4), or structure="2:4".'
            )

    @property
    def sparsity(self) -> float:
        """The sparsity ``1 - n / m`` that every layer has."""
        return 1.0 - self.n / self.m

    def fan_in(self, cols: int, sparsity: float) -> int:
        return cols // self.m * self.n

    def group_size(self, cols: int) -> int:
        return self.m

    def check_shape(self, fqn: str, shape: tuple[int, ...], cols: int) -> None:
        if cols % self.m:
            raise ValueError(
                f"Cannot make {fqn!r} {self.n}:{self.m} sparse: its rows hold {cols} "
                f"inputs (shape {shape}), not a multiple of {self.m}.\nLeave it "
                f"dense: exclude=[{fqn!r}], or use another structure."
            )

    def check_sparsities(self, sparsities: Mapping[str, float]) -> None:
        wrong = {
            fqn: s
            for fqn, s in sparsities.items()
            if not math.isclose(s, self.sparsity, rel_tol=0.0, abs_tol=1e-9)
        }
        if wrong:
            shown = {fqn: round(s, 4) for fqn, s in wrong.items()}
            raise ValueError(
                f"{self.n}:{self.m} sparsity fixes every layer's sparsity at "
                f"1 - {self.n}/{self.m} = {self.sparsity:g}, but the requested "
                f"sparsity and distribution give {shown}.\nPass "
                f'sparsity={self.sparsity:g}, distribution="uniform".'
            )


@dataclass(frozen=True, kw_only=True)
class ConstantFanIn(Structure):
    r"""Constant fan-in: every row (output unit) keeps the same number of weights.

    A tensor allocated density ``d`` (by ``distribution``, ERK included)
    keeps ``k = max(1, round(d * fan_in))`` weights per row, so its count is
    ``rows * k``: the tensor's sparsity differs from the allocated one by the
    rounding of ``k`` (less than half a weight per row).

    Args:
        ablation: SRigL's :math:`\gamma_{sal}` in ``[0, 1]``: a row with fewer
            than ``max(1, floor(ablation * k))`` salient weights is ablated at
            an update and its weights go to the other rows (see the module
            docstring). SRigL uses 0.3. ``0`` turns ablation off.
            Default: ``0.0``.

    Example::

        >>> ConstantFanIn(ablation=0.3)
        ConstantFanIn(ablation=0.3)
        >>> ConstantFanIn().fan_in(100, 0.9)
        10
    """

    ablation: float = 0.0

    def __post_init__(self) -> None:
        value = self.ablation
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise TypeError(f"ConstantFanIn: ablation must be a float, got {value!r}.")
        if not 0.0 <= value <= 1.0:
            raise ValueError(
                f"ConstantFanIn: ablation must be in [0, 1], got {value!r}.\nIt is "
                "the fraction of a row's fan-in that must be salient for the row "
                "to stay active (SRigL's gamma_sal, 0.3 in the paper); 0 turns "
                "ablation off."
            )

    def fan_in(self, cols: int, sparsity: float) -> int:
        return max(1, min(cols, round((1.0 - sparsity) * cols)))

    def group_size(self, cols: int) -> int:
        return cols


def make_structure(structure: str | Structure | None) -> Structure | None:
    """Resolve ``"N:M"`` / ``"constant-fan-in"`` or pass a structure through.

    Raises:
        ValueError: an unknown or malformed name.
        TypeError: neither ``None``, a string, :class:`NM` nor :class:`ConstantFanIn`.

    Example::

        >>> make_structure("1:8"), make_structure("constant-fan-in")
        (NM(n=1, m=8), ConstantFanIn(ablation=0.0))
    """
    if structure is None or isinstance(structure, (NM, ConstantFanIn)):
        return structure
    if isinstance(structure, Structure):
        raise TypeError(
            f"sparsetorch selects masks within NM and ConstantFanIn only, got "
            f"{type(structure).__name__}.\nPass NM(n, m), ConstantFanIn(...), or "
            "a name ('2:4', 'constant-fan-in')."
        )
    if not isinstance(structure, str):
        raise TypeError(
            "structure must be None, a name or a sparsetorch.structure.Structure, "
            f"got {type(structure).__name__}."
        )
    if structure == "constant-fan-in":
        return ConstantFanIn()
    n, colon, m = structure.partition(":")
    if colon and n.isdigit() and m.isdigit():
        return NM(int(n), int(m))
    raise ValueError(
        f"Unknown structure {structure!r}.\nKnown structures: 'N:M' (e.g. '2:4'), "
        "'constant-fan-in', or a Structure object (NM(2, 4), "
        "ConstantFanIn(ablation=0.3))."
    )


# -- one tensor's rows ---------------------------------------------------------------


@dataclass(frozen=True)
class Layout:
    """How one tensor meets its structure.

    Made by :class:`~sparsetorch.Topology` for each structured tensor.

    Attributes:
        structure: the structure.
        transposed: the tensor stores ``(in, out)`` (Hugging Face ``Conv1D``):
            its rows are its columns.
        rows: output units.
        cols: inputs per unit (the fan-in of the dense layer).
        fan_in: active weights per row with no row ablated (``k0``).
        ablate: neuron ablation applies to this tensor.
    """

    structure: Structure
    transposed: bool
    rows: int
    cols: int
    fan_in: int
    ablate: bool

    @property
    def count(self) -> int:
        """The tensor's active count with no row ablated: ``rows * fan_in``."""
        return self.rows * self.fan_in

    def to_rows(self, t: Tensor) -> Tensor:
        """``t`` as a ``(rows, cols)`` matrix (a view unless ``transposed``)."""
        return t.t() if self.transposed else t.reshape(self.rows, self.cols)

    def from_rows(self, t: Tensor, shape: torch.Size) -> Tensor:
        """The inverse of :meth:`to_rows`: a contiguous tensor of ``shape``."""
        return t.t().contiguous() if self.transposed else t.reshape(shape)


def layout(
    fqn: str,
    structure: Structure,
    shape: tuple[int, ...],
    sparsity: float,
    *,
    kind: str,
    ablate: bool,
) -> Layout:
    """Bind ``structure`` to a tensor of ``shape``, or raise why it cannot be.

    ``kind``: ``"transposed"`` (HF ``Conv1D``), ``"conv-transpose"`` (refused)
    or ``"plain"``.

    Raises:
        ValueError: the tensor cannot take the structure (named, with the fix).
    """
    if kind == "conv-transpose" or len(shape) < 2:
        what = "a ConvTranspose weight" if len(shape) >= 2 else "a 1-D tensor"
        raise ValueError(
            f"Cannot give {fqn!r} (shape {shape}) a structure: it is {what}, "
            "whose rows are not its output units.\nLeave it dense: "
            f"exclude=[{fqn!r}], or sparsify it without structure=."
        )
    if kind == "transposed":
        if len(shape) != 2:
            raise ValueError(f"{fqn!r}: a Conv1D weight must be 2-D, got {shape}.")
        rows, cols = shape[1], shape[0]
    else:
        rows, cols = shape[0], math.prod(shape[1:])
    structure.check_shape(fqn, shape, cols)
    ablation = getattr(structure, "ablation", 0.0)
    return Layout(
        structure,
        kind == "transposed",
        rows,
        cols,
        structure.fan_in(cols, sparsity),
        ablate and ablation > 0.0,
    )


def check_mask(mask: Tensor, layout: Layout) -> bool:
    """Whether ``mask`` meets ``layout``'s structure.

    N:M: every group holds exactly ``n``. Constant fan-in: every row holds
    ``layout.fan_in``; with ablation, every row holds either
    ``layout.count // a`` or nothing, where ``a`` rows are active.

    Example::

        >>> lay = Layout(NM(2, 4), False, rows=1, cols=8, fan_in=4, ablate=False)
        >>> check_mask(torch.tensor([[1, 1, 0, 0, 0, 1, 0, 1]]).bool(), lay)
        True
    """
    rows = layout.to_rows(mask)
    s = layout.structure
    if isinstance(s, NM):
        return bool((rows.reshape(-1, s.m).sum(1) == s.n).all())
    counts = rows.sum(1)
    if not layout.ablate:
        return bool((counts == layout.fan_in).all())
    alive = counts[counts > 0]
    return alive.numel() > 0 and bool((alive == layout.count // alive.numel()).all())


def initial_mask(
    layout: Layout, shape: torch.Size, generator: torch.Generator
) -> Tensor:
    """A random CPU mask of ``shape`` meeting ``layout``: each group's quota at random.

    Every group draws its positions with one ``torch.rand`` of the tensor's
    size from ``generator`` (one random key per weight; the highest keys of
    each group are active).
    """
    size = layout.structure.group_size(layout.cols)
    keys = torch.rand(layout.rows * layout.cols // size, size, generator=generator)
    quota = layout.fan_in if size == layout.cols else _nm(layout).n
    chosen = torch.zeros(keys.shape, dtype=torch.bool)
    chosen.scatter_(1, keys.topk(quota, dim=1).indices, True)
    return layout.from_rows(chosen.reshape(layout.rows, layout.cols), shape)


def select_top(scores: Tensor, layout: Layout, generator: torch.Generator) -> Tensor:
    """The mask of ``scores``' shape keeping each group's quota of highest scores.

    Each N:M group keeps its ``n`` highest scores; under constant fan-in each
    row keeps its ``k``. Ties are drawn with ``generator``. Used by one-shot
    selections (SNIP's :meth:`~sparsetorch.Sparsifier.prune_at_init`).

    Example::

        >>> lay = Layout(NM(1, 2), False, rows=1, cols=4, fan_in=2, ablate=False)
        >>> select_top(torch.tensor([[0.1, 0.9, 0.7, 0.2]]), lay, torch.Generator())
        tensor([[False,  True,  True, False]])
    """
    size = layout.structure.group_size(layout.cols)
    quota = layout.fan_in if size == layout.cols else _nm(layout).n
    groups = layout.to_rows(scores).reshape(-1, size)
    need = torch.full((groups.shape[0],), quota, device=scores.device)
    chosen = _group_top(groups, need, generator)
    return layout.from_rows(chosen.view(layout.rows, layout.cols), scores.shape)


def _nm(layout: Layout) -> NM:
    assert isinstance(layout.structure, NM)
    return layout.structure


def _group_top(scores: Tensor, need: Tensor, generator: torch.Generator) -> Tensor:
    """Per row of ``scores`` ``(G, S)``, its ``need[g]`` highest entries (bool).

    One ``topk`` of the largest need finds them; a row whose cut falls inside
    a run of equal scores draws among them instead: its entries are ordered by
    a random key from ``generator`` and then (stably) by score, so ties never
    fall to position.
    """
    g, s = scores.shape
    device = scores.device
    chosen = torch.zeros(g, s, dtype=torch.bool, device=device)
    most = int(need.max()) if g else 0
    if most <= 0:
        return chosen
    listed = min(s, most + 1)
    values, order = scores.topk(listed, dim=1)  # (G, listed), descending
    take = torch.arange(listed, device=device).expand(g, listed) < need.unsqueeze(1)
    chosen.scatter_(1, order, take)
    inside = (need > 0) & (need < listed)
    cut = need.clamp(1, listed - 1).unsqueeze(1)
    tied = inside & (values.gather(1, cut - 1) == values.gather(1, cut)).squeeze(1)
    rows = tied.nonzero().flatten()
    if rows.numel():
        chosen[rows] = _drawn_top(scores[rows], need[rows], generator)
    return chosen


def _drawn_top(scores: Tensor, need: Tensor, generator: torch.Generator) -> Tensor:
    """:func:`_group_top` by a full sort, ties ordered by random keys."""
    g, s = scores.shape
    keys = torch.rand(g, s, generator=generator).to(scores.device)
    order = keys.argsort(dim=1)
    by_score = scores.gather(1, order).argsort(dim=1, descending=True, stable=True)
    order = order.gather(1, by_score)
    take = torch.arange(s, device=scores.device).expand(g, s) < need.unsqueeze(1)
    chosen = torch.zeros_like(take)
    return chosen.scatter_(1, order, take)


def update_structured(
    policy: Policy,
    weight: Tensor,
    mask: Tensor,
    grad: Tensor | None,
    n_drop: int,
    generator: torch.Generator,
    layout: Layout,
) -> Tensor:
    """One structured update of ``mask`` (see the module docstring).

    Returns:
        The new bool mask, meeting ``layout``'s structure.

    Raises:
        FloatingPointError: a score read by the update is NaN or infinite.
    """
    name = type(policy).__name__
    device = mask.device
    rows_mask = layout.to_rows(mask).reshape(-1)
    active = _nonzero(rows_mask.contiguous())
    if type(policy).drop_score is Policy.drop_score:
        drop_all = weight.detach().abs()
    else:
        drop_all = policy.drop_score(weight, mask)
    drop_rows = layout.to_rows(drop_all).reshape(-1).contiguous()
    drop = drop_rows[active]
    _check_finite(drop, "drop", name)
    n_keep = active.numel() - n_drop
    kept = active[_top(drop.contiguous(), n_keep, generator)]
    grow_scores = policy.grow_score(weight, mask, grad, generator)
    if not grow_scores.is_floating_point() or _shares_memory(
        grow_scores, weight, mask, grad
    ):
        grow_scores = (
            grow_scores.float()
            if not grow_scores.is_floating_point()
            else (grow_scores.clone())
        )
    grow = layout.to_rows(grow_scores).reshape(-1).contiguous().clone()
    _check_finite(grow, "grow", name, skip=kept)
    rows, cols = layout.rows, layout.cols
    is_kept = torch.zeros(rows * cols, dtype=torch.bool, device=device)
    is_kept[kept] = True
    if layout.ablate:
        is_kept, quota = _ablate(
            layout, is_kept, kept, drop_rows, grow, n_drop, generator
        )
    else:
        size = layout.structure.group_size(cols)
        per_group = layout.fan_in if size == cols else _nm(layout).n
        quota = torch.full((rows * cols // size,), per_group, device=device)
    size = is_kept.numel() // quota.numel()
    groups_kept = is_kept.view(-1, size)
    need = quota - groups_kept.sum(1)
    grow.masked_fill_(is_kept, float("-inf"))
    grown = _group_top(grow.view(-1, size), need, generator)
    new = (groups_kept | grown).reshape(rows, cols)
    return layout.from_rows(new, mask.shape)


def _ablate(
    layout: Layout,
    is_kept: Tensor,
    kept: Tensor,
    drop: Tensor,
    grow: Tensor,
    n_drop: int,
    generator: torch.Generator,
) -> tuple[Tensor, Tensor]:
    """SRigL's neuron ablation: the rows kept, their kept weights and quotas.

    Returns ``(is_kept, quota)``: the kept positions with ablated rows emptied
    and rows over the new fan-in cut to their highest drop scores, and each
    row's fan-in after the update (0 for ablated rows).
    """
    rows, cols = layout.rows, layout.cols
    structure = layout.structure
    assert isinstance(structure, ConstantFanIn)
    salient = is_kept.clone()
    if n_drop > 0:
        salient[_top(grow.contiguous(), n_drop, generator)] = True
    counts = salient.view(rows, cols).sum(1)
    threshold = max(1, math.floor(structure.ablation * layout.fan_in))
    alive = counts >= threshold
    fewest = -(-layout.count // cols)  # ceil: k must fit in a row
    if int(alive.sum()) < fewest:
        alive = _group_top(
            counts.view(1, rows).double(),
            torch.tensor([fewest], device=counts.device),
            generator,
        ).view(rows)
    k = layout.count // int(alive.sum())
    quota = torch.where(alive, k, 0)
    is_kept = is_kept.view(rows, cols) & alive.unsqueeze(1)
    over = is_kept.sum(1) > quota
    if bool(over.any()):
        scores = torch.full(
            (rows * cols,), float("-inf"), dtype=torch.float64, device=drop.device
        )
        scores[kept] = drop[kept].double()
        scores = scores.view(rows, cols).masked_fill(~is_kept, float("-inf"))
        is_kept = torch.where(
            over.unsqueeze(1),
            _group_top(scores, torch.minimum(quota, is_kept.sum(1)), generator),
            is_kept,
        )
    return is_kept.reshape(-1), quota


def structure_settings(structure: Structure | None) -> dict[str, object] | None:
    """``structure`` as plain data for a checkpoint's settings (``None`` stays).

    Example::

        >>> structure_settings(NM(2, 4))
        {'name': 'NM', 'n': 2, 'm': 4}
    """
    if structure is None:
        return None
    return {"name": type(structure).__name__, **dataclasses.asdict(structure)}


def check_policy(structure: Structure | None, policy: Policy) -> None:
    """Raise ``ValueError`` if ``policy`` cannot keep ``structure``.

    A structure keeps a fixed quota per group, so it works with the policies
    whose updates drop as many weights as they grow in each tensor and start
    from the allocated counts (RigL, SET, static, and any policy that only
    scores drops and grows). A policy that overrides how counts move
    (:meth:`~sparsetorch.policies.Policy.update_counts`,
    ``active_counts_at`` or ``initial_sparsities``) is refused: SNFS and GMP,
    which move counts between tensors or over time, and SNIP with its global
    threshold (which sets each layer's count from the scores). SNIP with
    ``global_threshold=False`` works: the model starts dense, and
    :meth:`~sparsetorch.Sparsifier.prune_at_init` keeps each group's quota of
    highest sensitivities (:func:`select_top`).

    Example::

        >>> from sparsetorch.policies import GMP, RigL
        >>> check_policy(NM(2, 4), RigL())
        >>> check_policy(NM(2, 4), GMP())  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        ValueError: policy GMP cannot keep structure=NM(n=2, m=4): it prunes ...
    """
    if structure is None:
        return
    cls = type(policy)
    name = cls.__name__
    if name == "SNIP" and not getattr(policy, "global_threshold", True):
        return  # its one-shot selection keeps each group's quota (select_top)
    moved = [
        hook
        for hook in ("update_counts", "active_counts_at", "initial_sparsities")
        if getattr(cls, hook) is not getattr(Policy, hook)
    ]
    reason = _REFUSED.get(name)
    if reason is None and moved:
        reason = (
            f"it overrides {', '.join(moved)}, so its counts need not be the "
            "multiples of rows or groups a structure holds."
        )
    if reason is not None:
        raise ValueError(
            f"policy {name} cannot keep structure={structure!r}: {reason}\nUse "
            f"policy='rigl', 'set' or 'static' with a structure, or {name} "
            "without one."
        )


#: ``policy class name -> why a structure cannot hold under it``.
_REFUSED = {
    "SNFS": "it moves active weights between layers, and a structure fixes each "
    "layer's count (a multiple of its rows or groups).",
    "GMP": "it prunes gradually from dense, through counts that no N:M or "
    "constant fan-in pattern holds.",
    "SNIP": "its global threshold chooses each layer's count from the scores, "
    "and a structure fixes it; SNIP(global_threshold=False) keeps each group's "
    "quota.",
}


def check_loaded_mask(fqn: str, mask: Tensor, layout: Layout) -> None:
    """Raise ``ValueError`` if a checkpoint's ``mask`` breaks ``layout``'s structure.

    An all-active mask passes: SNIP's masks before its one-shot selection.
    """
    if not bool(mask.all()) and not check_mask(mask, layout):
        raise ValueError(
            f"Mask {fqn!r} in the checkpoint does not meet the structure "
            f"{layout.structure!r} (see sparsetorch.structure.check_mask).\nThe "
            "checkpoint was made with another structure, or the mask was edited."
        )


def structure_notes(
    structure: Structure | None,
    layouts: Mapping[str, Layout],
    masks: Mapping[str, Tensor],
) -> list[str]:
    """The summary's lines on the structure: which, and the units ablated.

    Example::

        >>> lay = Layout(ConstantFanIn(ablation=0.3), False, 3, 4, 2, ablate=True)
        >>> mask = torch.tensor([[1, 1, 1, 0], [0, 0, 0, 0], [0, 1, 1, 1]]).bool()
        >>> for line in structure_notes(lay.structure, {"w": lay}, {"w": mask}):
        ...     print(line)
        structure: ConstantFanIn(ablation=0.3)
        ablated: w 1 of 3 units (3 of 4 inputs each)
    """
    if structure is None:
        return []
    lines = [f"structure: {structure!r}"]
    for fqn, layout in layouts.items():
        if not layout.ablate:
            continue
        per_row = layout.to_rows(masks[fqn]).sum(1)
        alive = int((per_row > 0).sum())
        if alive < layout.rows:
            lines.append(
                f"ablated: {fqn} {layout.rows - alive} of {layout.rows} units "
                f"({int(per_row.max())} of {layout.cols} inputs each)"
            )
    return lines
