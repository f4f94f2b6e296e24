"""Topology: the masked tensors of one model, addressed by ``tensor_fqn``."""

from __future__ import annotations

import fnmatch
import functools
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn.utils import parametrize

from sparsetorch._optim import reset_state
from sparsetorch._stash import Stash
from sparsetorch.distributions import active_count
from sparsetorch.parametrization import MaskParametrization, _mask_, local
from sparsetorch.structure import Layout, Structure, initial_mask, layout

__all__ = ["DEFAULT_MODULE_TYPES", "Topology", "named_tensors", "select_tensors"]

DEFAULT_MODULE_TYPES: tuple[type[nn.Module], ...] = (
    nn.Linear,
    nn.Conv1d,
    nn.Conv2d,
    nn.Conv3d,
    nn.ConvTranspose1d,
    nn.ConvTranspose2d,
    nn.ConvTranspose3d,
)


def _split(tensor_fqn: str) -> tuple[str, str]:
    module_fqn, _, tensor_name = tensor_fqn.rpartition(".")
    return module_fqn, tensor_name


def named_tensors(model: nn.Module) -> Iterator[tuple[str, Tensor]]:
    """``(tensor_fqn, tensor)`` of every parameter under its dense name.

    A parametrized tensor is listed under ``module_fqn.tensor_name``, as in the
    dense model's state dict, with its stored (original) value.
    """
    for module_fqn, module in model.named_modules():
        prefix = f"{module_fqn}." if module_fqn else ""
        for name, tensor in module._parameters.items():
            if tensor is not None:
                yield prefix + name, tensor
        if parametrize.is_parametrized(module):
            for name, plist in module.parametrizations.items():
                if "original" in plist._parameters:  # one stored tensor, not several
                    yield prefix + name, plist.original


def select_tensors(
    model: nn.Module,
    include: Sequence[str] | None = None,
    exclude: Sequence[str] | None = None,
    *,
    skipped: dict[str, str] | None = None,
) -> list[str]:
    """The ``tensor_fqn`` of every tensor to sparsify, in model order.

    By default: the ``weight`` of every ``nn.Linear``, ``nn.Conv{1,2,3}d``,
    ``nn.ConvTranspose{1,2,3}d`` and Hugging Face ``Conv1D`` (GPT-2's linear
    layers; matched by class path, so transformers is never imported here)
    (``nn.MultiheadAttention``'s ``out_proj`` is an ``nn.Linear``); biases,
    norms, embeddings, recurrent weights and ``in_proj_weight`` stay dense
    unless ``include`` names them. ``Conv1D`` stores its weight as
    ``(in, out)``, the transpose of ``nn.Linear``'s ``(out, in)``; the ER and
    ERK allocations are symmetric in the two dimensions, so this changes
    nothing for them.

    A tensor shared by several modules (tied weights) is selected once, under
    its first name in model order: it gets one mask, and every module using it
    sees that mask. An output layer tied to an input embedding (GPT-2's
    ``lm_head.weight`` is ``transformer.wte.weight``) is the exception: by
    default it stays dense, so that the embedding is not sparsified through
    the head and the model's ``tie_weights()`` and
    ``resize_token_embeddings()`` keep working; it is reported in ``skipped``.
    ``include`` may name it on a plain PyTorch model, not on a model with
    ``tie_weights()`` (Hugging Face), whose re-tying cannot go through a
    parametrized weight.

    Args:
        model: the model.
        include: fnmatch globs over ``tensor_fqn``; when given, the selection is
            every parameter matching one of them (any module type).
        exclude: fnmatch globs over ``tensor_fqn`` removed from the selection;
            exclude wins over include.
        skipped: if given, filled with ``{tensor_fqn: reason}`` for the
            default-selected tensors left dense (tied input embeddings).

    Raises:
        ValueError: a glob matches no tensor, nothing is selected, or
            ``include`` names an embedding tied to an output layer of a model
            with ``tie_weights()``.

    Example::

        >>> model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
        >>> select_tensors(model)
        ['0.weight', '2.weight']
        >>> select_tensors(model, exclude=["2.*"])
        ['0.weight']
    """
    for name, globs in (("include", include), ("exclude", exclude)):
        if globs is not None and (
            isinstance(globs, str)
            or not isinstance(globs, (list, tuple))
            or not all(isinstance(g, str) for g in globs)
        ):
            raise TypeError(
                f"{name} must be a list of glob strings, got {globs!r}.\n"
                f'Example: {name}=["encoder.*.weight"].'
            )
    tensors = dict(named_tensors(model))
    # Default types named by class path: their libraries need not be imported.
    paths = ("transformers.pytorch_utils.Conv1D",)
    if include is None:
        selected = [
            f"{module_fqn}.weight" if module_fqn else "weight"
            for module_fqn, module in model.named_modules()
            if (
                isinstance(module, DEFAULT_MODULE_TYPES)
                or any(
                    f"{c.__module__}.{c.__qualname__}" in paths
                    for c in type(module).__mro__
                )
            )
            and isinstance(getattr(module, "weight", None), Tensor)
        ]
    else:
        selected = [
            fqn for fqn in tensors if any(fnmatch.fnmatchcase(fqn, g) for g in include)
        ]
    names = [*tensors, *(fqn for fqn in selected if fqn not in tensors)]
    for name, globs in (("include", include), ("exclude", exclude)):
        for glob in globs or ():
            if not any(fnmatch.fnmatchcase(fqn, glob) for fqn in names):
                raise ValueError(
                    f"{name} glob {glob!r} matches no tensor of the model.\n"
                    f"tensors: {sorted(tensors)}"
                )
    selected = [
        fqn
        for fqn in selected
        if not any(fnmatch.fnmatchcase(fqn, g) for g in exclude or ())
    ]
    computed = [fqn for fqn in selected if fqn not in tensors]
    if computed:
        raise ValueError(
            f"Cannot sparsify {computed}: computed by another parametrization "
            "(weight_norm, say) or not parameters, so sparsetorch cannot mask them."
            f"\nLeave them dense: exclude={computed}."
        )
    # Output layers tied to an input embedding: {tensor_fqn: the other names}.
    embeddings = {
        id(tensors[f"{module_fqn}.weight" if module_fqn else "weight"])
        for module_fqn, module in model.named_modules()
        if isinstance(module, (nn.Embedding, nn.EmbeddingBag))
        and (f"{module_fqn}.weight" if module_fqn else "weight") in tensors
    }
    tied = {
        fqn: [f for f, t in tensors.items() if t is tensors[fqn] and f != fqn]
        for fqn in selected
        if id(tensors[fqn]) in embeddings
    }
    tied = {fqn: others for fqn, others in tied.items() if others}
    if tied and include is None:
        for fqn, others in tied.items():
            selected.remove(fqn)
            if skipped is not None:
                skipped[fqn] = f"tied to {', '.join(others)}, an input embedding"
    elif tied and callable(getattr(model, "tie_weights", None)):
        pair = sorted({f for fqn, others in tied.items() for f in (fqn, *others)})
        raise ValueError(
            f"Cannot sparsify {sorted(tied)}: an input embedding tied to an "
            f"output layer ({' = '.join(pair)}), in a model with "
            "tie_weights().\nThe model re-ties them by assignment "
            "(tie_weights(), resize_token_embeddings()), which a sparsified "
            "weight cannot take. Leave them dense: "
            f"exclude={pair}; or untie them before "
            "building the model (config.tie_word_embeddings=False)."
        )
    seen: set[int] = set()
    for fqn in list(selected):  # tied weights: keep the first name only
        if id(tensors[fqn]) in seen:
            selected.remove(fqn)
        seen.add(id(tensors[fqn]))
    if not selected:
        dense = f" ({sorted(tied)} stay dense: tied to an embedding)" if tied else ""
        raise ValueError(
            "Nothing to sparsify: no tensor is selected.\n"
            f"tensors: {sorted(tensors)}\n"
            "By default the weights of nn.Linear and nn.Conv* layers are selected"
            f'{dense}; pass include=["..."] to choose tensors by name.'
        )
    return selected


def check_materialized(fqn: str, tensor: Tensor) -> None:
    """Raise unless ``tensor`` has a shape and values (not lazy, not meta).

    Raises:
        ValueError: naming ``fqn`` and how to materialize it.
    """
    if isinstance(tensor, nn.parameter.UninitializedParameter):
        raise ValueError(
            f"{fqn!r} is not initialized yet (lazy modules such as nn.LazyLinear "
            "learn their shapes at the first forward).\nRun the model once on a "
            "batch, then sparsify: model(example_input); sparsify(model, ...)."
        )
    if tensor.is_meta:
        raise ValueError(
            f"{fqn!r} is on the meta device (no values yet).\nMaterialize the "
            "model first (model.to_empty(device=...), then initialize it), then "
            "sparsify."
        )


@dataclass(eq=False)
class _Entry:
    module: nn.Module
    tensor_name: str
    parametrization: MaskParametrization
    sparsity: float
    target: int  # the active count now
    layout: Layout | None = None
    final: int | None = None  # the allocated active count, where it differs

    @property
    def param(self) -> nn.Parameter:
        original = _plist(self.module, self.tensor_name).original
        assert isinstance(original, nn.Parameter)
        return original

    @property
    def mask(self) -> Tensor:
        return self.parametrization.mask


class Topology:
    """The masks of one model: registration, updates, checkpoints.

    Registers a :class:`~sparsetorch.MaskParametrization` on every tensor of
    ``sparsities``, draws its initial random mask with exactly
    ``active_count(numel, sparsity)`` active weights, and zeroes the stored weight
    outside it. ``model.state_dict()`` keeps the dense model's keys, in the same
    order: the parametrized keys are renamed back by state-dict hooks.

    Args:
        model: the model, changed in place.
        sparsities: ``tensor_fqn -> sparsity``.
        generator: CPU generator for the initial masks.
        stash: keeps the weights' values that the initial masks zero, so that
            masks loaded next can restore them. Default: ``None``.
        structure: a :mod:`sparsetorch.structure` constraint for every
            tensor: its initial mask is drawn with the structure, and its
            count is what the structure implies (:attr:`targets`).
            Default: ``None`` (unstructured).
        initial_sparsities: ``tensor_fqn -> sparsity`` of the initial masks,
            where they start elsewhere than ``sparsities`` (GMP starts dense
            and prunes toward ``sparsities``). Default: ``None`` (at
            ``sparsities``).

    Raises:
        ValueError: a tensor is missing, already sparsified, or shared.
        TypeError: a tensor is not a floating-point ``nn.Parameter``.

    Example::

        >>> model = nn.Sequential(nn.Linear(4, 4))
        >>> topology = Topology(model, {"0.weight": 0.75}, torch.Generator())
        >>> int(topology.masks["0.weight"].sum()), list(model.state_dict())
        (4, ['0.weight', '0.bias'])
    """

    def __init__(
        self,
        model: nn.Module,
        sparsities: Mapping[str, float],
        generator: torch.Generator,
        *,
        stash: Stash | None = None,
        structure: Structure | None = None,
        initial_sparsities: Mapping[str, float] | None = None,
    ) -> None:
        self.model = model
        #: The structure every tensor meets, or ``None`` (unstructured).
        self.structure = structure
        modules = dict(model.named_modules())
        seen: dict[int, str] = {}
        masked = {id(p) for p in _masked_params(model)}
        for fqn in sparsities:
            module_fqn, name = _split(fqn)
            module = modules.get(module_fqn)
            if module is None:
                raise ValueError(f"The model has no module {module_fqn!r} ({fqn!r}).")
            if parametrize.is_parametrized(module, name):
                if any(
                    isinstance(p, MaskParametrization) for p in _plist(module, name)
                ):
                    raise ValueError(
                        f"{fqn!r} is already sparsified: a model can be sparsified "
                        "once.\nCall sparsifier.remove() first, or keep using the "
                        "existing sparsifier."
                    )
                raise ValueError(
                    f"{fqn!r} already has a parametrization; sparsetorch must be the "
                    f"only one.\nLeave it dense: exclude=[{fqn!r}]."
                )
            tensor = module._parameters.get(name)
            if tensor is not None:
                check_materialized(fqn, tensor)
            if not isinstance(tensor, nn.Parameter):
                raise TypeError(
                    f"{fqn!r} must be an nn.Parameter to be sparsified, got "
                    f"{type(getattr(module, name, None)).__name__}."
                )
            if tensor.numel() == 0:
                raise ValueError(
                    f"{fqn!r} has no elements (shape {tuple(tensor.shape)}): "
                    "there is nothing to mask.\nLeave it out: exclude=[...]."
                )
            if not tensor.is_floating_point():
                raise TypeError(
                    f"{fqn!r} has dtype {tensor.dtype}; only floating-point "
                    "parameters can be sparsified."
                )
            if id(tensor) in masked:
                raise ValueError(
                    f"{fqn!r} is already sparsified under another name (tied "
                    "weights): a model can be sparsified once."
                )
            if isinstance(module, (nn.Embedding, nn.EmbeddingBag)) and module.sparse:
                raise ValueError(
                    f"{fqn!r} belongs to an embedding with sparse=True, whose sparse "
                    "gradients sparsetorch cannot mask.\nBuild it with "
                    "sparse=False, or leave it dense."
                )
            if id(tensor) in seen:
                raise ValueError(
                    f"{fqn!r} and {seen[id(tensor)]!r} are the same parameter (tied "
                    "weights).\nSelect only one of them: exclude=[...]."
                )
            seen[id(tensor)] = fqn
        layouts = _layouts(modules, sparsities, structure)

        # Everything is checked: from here on the model changes.
        dense_order = {
            module_fqn: list(modules[module_fqn].state_dict(keep_vars=True))
            for module_fqn in {_split(fqn)[0] for fqn in sparsities}
        }
        self._param_order = {
            module_fqn: list(modules[module_fqn]._parameters)
            for module_fqn in dense_order
        }
        self._entries: dict[str, _Entry] = {}
        self._handles: list[Any] = []
        for fqn, sparsity in sparsities.items():
            module_fqn, name = _split(fqn)
            module = modules[module_fqn]
            weight = module._parameters[name]
            assert weight is not None
            bound = layouts.get(fqn)
            if bound is None:
                final = active_count(weight.numel(), sparsity)
                start = (initial_sparsities or {}).get(fqn, sparsity)
                target = active_count(weight.numel(), start)
                perm = torch.randperm(weight.numel(), generator=generator)
                mask = torch.zeros(weight.numel(), dtype=torch.bool)
                mask[perm[:target]] = True
                mask = mask.view(weight.shape).to(weight.device)
            elif (initial_sparsities or {}).get(fqn) == 0.0:
                # Starts dense (SNIP): its one-shot selection brings the structure.
                target, final = weight.numel(), bound.count
                mask = torch.ones(weight.shape, dtype=torch.bool, device=weight.device)
            else:
                target = final = bound.count
                mask = initial_mask(bound, weight.shape, generator).to(weight.device)
            p = MaskParametrization(mask)
            parametrize.register_parametrization(module, name, p)
            weight = _plist(module, name).original
            p.attach(weight)
            if stash is None:
                _mask_(weight, mask)
            else:
                stash.keep(weight, mask, functools.partial(_mask_, weight, mask))
            self._entries[fqn] = _Entry(module, name, p, sparsity, target, bound, final)
            setattr(type(module), "__getstate__", _refuse_pickle)  # noqa: B010
        stored = {id(e.param): e.parametrization for e in self._entries.values()}
        for module in model.modules():
            # Tied weights: a module holding a masked tensor as its own parameter
            # reads it without the parametrization: re-mask it after a load.
            # (Only then: a hook turns off nn.TransformerEncoderLayer's fast path.)
            if isinstance(module, parametrize.ParametrizationList):
                continue
            shared = [
                stored[id(t)] for t in module._parameters.values() if id(t) in stored
            ]
            if shared:
                self._handles.append(
                    module.register_forward_pre_hook(
                        functools.partial(_remask_stale, parametrizations=shared)
                    )
                )
        for module_fqn, order in dense_order.items():
            module = modules[module_fqn]
            names = [
                _split(fqn)[1] for fqn in sparsities if _split(fqn)[0] == module_fqn
            ]
            self._handles += [
                module.register_state_dict_post_hook(
                    functools.partial(_rename_on_save, names=names, order=order)
                ),
                module.register_load_state_dict_pre_hook(
                    functools.partial(_rename_on_load, names=names)
                ),
                module.register_load_state_dict_post_hook(
                    functools.partial(_mark_stale, names=names)
                ),
            ]

    @property
    def masks(self) -> dict[str, Tensor]:
        """``tensor_fqn -> mask``: the live bool buffers, not copies."""
        return {fqn: e.mask for fqn, e in self._entries.items()}

    @property
    def params(self) -> dict[str, nn.Parameter]:
        """``tensor_fqn -> stored parameter`` (``parametrizations.<name>.original``)."""
        return {fqn: e.param for fqn, e in self._entries.items()}

    @property
    def parametrizations(self) -> dict[str, MaskParametrization]:
        """``tensor_fqn -> MaskParametrization``."""
        return {fqn: e.parametrization for fqn, e in self._entries.items()}

    @property
    def sparsities(self) -> dict[str, float]:
        """``tensor_fqn -> target sparsity`` as allocated."""
        return {fqn: e.sparsity for fqn, e in self._entries.items()}

    @property
    def targets(self) -> dict[str, int]:
        """``tensor_fqn -> exact number of active weights`` now.

        Constant for RigL, SET and static masks; GMP shrinks it on its
        schedule and SNFS moves it between tensors (:attr:`final_targets`
        holds the allocation).
        """
        return {fqn: e.target for fqn, e in self._entries.items()}

    @property
    def final_targets(self) -> dict[str, int]:
        """``tensor_fqn -> active count`` as allocated by the distribution."""
        return {
            fqn: e.target if e.final is None else e.final
            for fqn, e in self._entries.items()
        }

    def set_targets(self, counts: Mapping[str, int]) -> None:
        """Record the active counts of masks written from outside :meth:`apply`."""
        for fqn, count in counts.items():
            self._entries[fqn].target = count

    @property
    def layouts(self) -> dict[str, Layout]:
        """``tensor_fqn -> Layout`` of each structured tensor (none if unstructured)."""
        return {
            fqn: e.layout for fqn, e in self._entries.items() if e.layout is not None
        }

    def parameter_orders(self) -> list[list[Tensor]]:
        """The model's parameters in the two orders an optimizer may list them.

        ``model.parameters()`` before sparsifying lists a module's weight before
        its bias; after, the weight comes last (it moved into
        ``parametrizations``). Used to re-key optimizer state loaded by position.
        """
        modules = dict(self.model.named_modules())
        dense: list[Tensor] = []
        for module_fqn, module in modules.items():
            if isinstance(module, parametrize.ParametrizationList):
                continue
            order = self._param_order.get(module_fqn, list(module._parameters))
            for name in order:
                tensor = module._parameters.get(name)
                if tensor is None and parametrize.is_parametrized(module, name):
                    tensor = _plist(module, name).original
                if tensor is not None:
                    dense.append(tensor)
        unique = list({id(t): t for t in dense}.values())
        return [unique, list(self.model.parameters())]

    def __len__(self) -> int:
        return len(self._entries)

    def __iter__(self) -> Iterator[str]:
        return iter(self._entries)

    @torch.no_grad()
    def apply(
        self,
        new_masks: Mapping[str, Tensor],
        optimizers: Sequence[torch.optim.Optimizer] = (),
        grow_value: float = 0.0,
        counts: Mapping[str, int] | None = None,
    ) -> None:
        """Write new masks in place and make weights and optimizer state agree.

        ``counts``: the new masks' active counts where they change (GMP, SNFS),
        recorded as :attr:`targets`; without it, counts stay.

        Every position that is not kept (active both before and after) gets zero
        in the stored weight, and every optimizer state tensor of the weight's
        shape is reset there (:func:`sparsetorch._optim.reset_state`); newly
        grown positions then get ``grow_value``. The whole weight is re-masked,
        so anything written outside the mask since the last update is cleared
        too.
        """
        for fqn, new in new_masks.items():
            entry = self._entries[fqn]
            param, old = entry.param, local(entry.mask)  # (FSDP2: this shard)
            # Multiplying by the mask is one vectorised pass (_mask_); masked_fill
            # with a bool mask goes element by element.
            keep = old & new
            _mask_(param, keep)
            if grow_value != 0.0:
                local(param).masked_fill_(new & ~old, grow_value)
            if param.grad is not None:
                _mask_(param.grad, new)
            for optimizer in optimizers:
                reset_state(optimizer, param, keep)
            old.copy_(new)
            entry.parametrization.stale = False
            if entry.layout is not None and entry.layout.ablate:
                entry.target = int(new.sum())  # rows ablated or revived
            elif counts is not None and fqn in counts:
                entry.target = counts[fqn]

    @torch.no_grad()
    def apply_masks(self, optimizers: Sequence[torch.optim.Optimizer] = ()) -> None:
        """Zero the stored weights (and reset optimizer state) outside the masks."""
        for entry in self._entries.values():
            _mask_(entry.param, entry.mask)
            for optimizer in optimizers:
                reset_state(optimizer, entry.param, entry.mask)
            entry.parametrization.stale = False

    def remove(self) -> None:
        """Remove the parametrizations and hooks; stored weights stay masked."""
        self.apply_masks()
        for handle in self._handles:
            handle.remove()
        self._handles = []
        for entry in self._entries.values():
            entry.parametrization.detach()
            parametrize.remove_parametrizations(
                entry.module, entry.tensor_name, leave_parametrized=False
            )
        modules = dict(self.model.named_modules())
        for module_fqn, names in self._param_order.items():
            params = modules[module_fqn]._parameters
            for name in names:  # back to the dense order: weight before bias
                params[name] = params.pop(name)
        self._entries = {}


def _layouts(
    modules: Mapping[str, nn.Module],
    sparsities: Mapping[str, float],
    structure: Structure | None,
) -> dict[str, Layout]:
    """Bind ``structure`` to every tensor (checked; nothing changes).

    The last tensor in model order (the output layer) is never neuron-ablated,
    as in SRigL.
    """
    if structure is None:
        return {}
    structure.check_sparsities(sparsities)
    result = {}
    last = list(sparsities)[-1]
    for fqn, sparsity in sparsities.items():
        module_fqn, name = _split(fqn)
        module = modules[module_fqn]
        tensor = module._parameters[name]
        assert tensor is not None
        kind = "plain"
        if isinstance(module, nn.modules.conv._ConvTransposeNd) and name == "weight":
            kind = "conv-transpose"
        elif name == "weight" and any(
            f"{c.__module__}.{c.__qualname__}" == "transformers.pytorch_utils.Conv1D"
            for c in type(module).__mro__
        ):
            kind = "transposed"
        result[fqn] = layout(
            fqn,
            structure,
            tuple(tensor.shape),
            sparsity,
            kind=kind,
            ablate=fqn != last,
        )
    return result


def _masked_params(model: nn.Module) -> Iterator[Tensor]:
    """The stored tensors of every :class:`MaskParametrization` in ``model``."""
    for module in model.modules():
        if parametrize.is_parametrized(module):
            for name in module.parametrizations:  # type: ignore[union-attr]
                plist = _plist(module, name)
                original = plist._parameters.get("original")
                if original is not None and any(
                    isinstance(p, MaskParametrization) for p in plist
                ):
                    yield original


def _refuse_pickle(module: nn.Module) -> Any:
    """``__getstate__`` of sparsified modules: say what to save instead."""
    raise RuntimeError(
        f"Cannot pickle the sparsified {type(module).__mro__[1].__name__} module: "
        "torch.save(model) pickles whole modules, and modules sparsified with "
        "sparsetorch (torch.nn.utils.parametrize) cannot be pickled.\nSave the "
        'state dicts instead: torch.save({"model": model.state_dict(), '
        '"optimizer": optimizer.state_dict(), "sparsity": '
        "sparsifier.state_dict()}, path), or call sparsifier.remove() first for "
        "a plain model with zeros."
    )


def _remask_stale(
    module: nn.Module, args: Any, *, parametrizations: list[MaskParametrization]
) -> None:
    """Forward pre-hook: mask stale tensors that ``module`` reads unparametrized."""
    for p in parametrizations:
        param = None if p._param is None else p._param()
        if p.stale and param is not None:
            with torch.no_grad():
                param.mul_(p.mask)
            p.stale = False


def _plist(module: nn.Module, name: str) -> parametrize.ParametrizationList:
    plist = module.parametrizations[name]  # type: ignore[index]
    assert isinstance(plist, parametrize.ParametrizationList)
    return plist


def _original_key(prefix: str, name: str) -> str:
    return f"{prefix}parametrizations.{name}.original"


def _rename_on_save(
    module: nn.Module,
    state_dict: dict[str, Any],
    prefix: str,
    local_metadata: dict[str, Any],
    *,
    names: list[str],
    order: list[str],
) -> None:
    """State-dict post-hook: give the parametrized tensors their dense keys back.

    Runs right after ``module`` wrote its entries, so they are the tail of
    ``state_dict``: pop them, rename, and put them back in the dense order.
    """
    tail = []
    for key in reversed(state_dict):
        if not key.startswith(prefix):
            break
        tail.append(key)
    renamed = {_original_key(prefix, n): prefix + n for n in names}
    entries = [(renamed.get(k, k), state_dict.pop(k)) for k in reversed(tail)]
    for name in names:
        mask = _mask_if_stale(module, name)
        if mask is not None:  # loaded but not used yet: save what would be used
            entries = [
                (k, v.detach() * mask if k == prefix + name else v) for k, v in entries
            ]
    rank = {prefix + key: i for i, key in enumerate(order)}
    entries.sort(key=lambda kv: rank.get(kv[0], len(rank)))
    state_dict.update(entries)
    metadata = getattr(state_dict, "_metadata", None)
    if metadata is not None:
        for key in [k for k in metadata if k.startswith(f"{prefix}parametrizations")]:
            del metadata[key]


def _rename_on_load(
    module: nn.Module,
    state_dict: dict[str, Any],
    prefix: str,
    local_metadata: dict[str, Any],
    strict: bool,
    missing_keys: list[str],
    unexpected_keys: list[str],
    error_msgs: list[str],
    *,
    names: list[str],
) -> None:
    """Load pre-hook: accept the dense key of each parametrized tensor."""
    for name in names:
        if prefix + name in state_dict:
            state_dict[_original_key(prefix, name)] = state_dict.pop(prefix + name)


def _mask_if_stale(module: nn.Module, name: str) -> Tensor | None:
    for p in _plist(module, name):
        if isinstance(p, MaskParametrization) and p.stale:
            return p.mask
    return None


def _mark_stale(module: nn.Module, incompatible_keys: Any, *, names: list[str]) -> None:
    """Load post-hook: re-mask the loaded weights before their next use.

    Masking right away would destroy the weights of a checkpoint whose masks are
    loaded next (``sparsifier.load_state_dict``), so the forward masks instead.
    A load with ``assign=True`` put new stored tensors in place: the gradient
    hooks follow them. Missing and unexpected keys are reported under the dense
    names (``0.weight``, not ``0.parametrizations.weight.original``).
    """
    for name in names:
        plist = _plist(module, name)
        for p in plist:
            if isinstance(p, MaskParametrization):
                p.stale = True
                current = None if p._param is None else p._param()
                if current is not plist.original:
                    p.attach(plist.original)
                if p.sharded:  # FSDP2: the forward cannot mask; mask the shard
                    p.remask_shard()
    for keys in (incompatible_keys.missing_keys, incompatible_keys.unexpected_keys):
        keys[:] = [_dense_key(key, names) for key in keys]


def _dense_key(key: str, names: list[str]) -> str:
    prefix, found, rest = key.rpartition("parametrizations.")
    name, dot, leaf = rest.partition(".")
    if found and dot and leaf == "original" and name in names:
        return prefix + name
    return key
