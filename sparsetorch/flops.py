r"""FLOPs of a sparsified model relative to dense, by the RigL paper's accounting.

Evci et al. 2020 (https://arxiv.org/abs/1911.11134, appendix on FLOPs) count
the multiply-adds of the layers' weight products. Per example, a forward pass
costs :math:`f_S` on the sparse model and :math:`f_D` on the dense one. A
training step costs the forward, the gradient with respect to the layer inputs
(:math:`f_S` again) and the gradient with respect to the weights: :math:`f_S`
when only the active weights' gradient is computed, :math:`f_D` when the dense
gradient is. Hence, per step:

========================  ======================================================
dense                     :math:`3 f_D`
static, SET, SNIP         :math:`3 f_S`
RigL                      :math:`3 f_S`, and :math:`2 f_S + f_D` in the backward
                          pass before each update (the paper's mean over an
                          update interval :math:`\Delta T` is
                          :math:`(3 f_S \Delta T + 2 f_S + f_D) / (\Delta T + 1)`,
                          counting the dense-gradient pass as one more step)
SNFS                      :math:`2 f_S + f_D` (a dense gradient at every step
                          until the last update), :math:`3 f_S` after
GMP                       :math:`3 f_S(t)`, :math:`f_S(t)` following the density
                          schedule from dense
========================  ======================================================

summed over the run's steps. Here every step is counted as sparsetorch runs
it: a step whose backward pass keeps the dense gradient (see
:meth:`~sparsetorch.Sparsifier.capture_dense_grads`) costs
:math:`2 f_S + f_D`, every other step :math:`3 f_S`, with the active counts of
that step. One multiply-add counts as 2 FLOPs (ratios do not depend on it).

Counted weights: those of ``nn.Linear``, ``nn.Conv{1,2,3}d``,
``nn.ConvTranspose{1,2,3}d``, Hugging Face's ``Conv1D`` and
``nn.MultiheadAttention`` (its input and output projections), masked or not (an
unmasked weight costs the same sparse and dense). A weight's multiply-adds per
forward are its count (active or all) times the number of times it is applied,
as seen in one forward pass: once per output position of a layer (per input
position of a transposed convolution), once per token for an attention
projection (the query, key and value blocks of ``in_proj_weight`` per query,
key and value token). Biases, normalisation, activations, embeddings, pooling
and products of two activations (attention scores and their weighted sum) are
not counted, as the paper leaves out batch norm and the loss.
"""

from __future__ import annotations

import bisect
import functools
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn
from torch.nn.utils import parametrize
from torch.utils.hooks import RemovableHandle

from sparsetorch.topology import DEFAULT_MODULE_TYPES

if TYPE_CHECKING:
    from sparsetorch.sparsifier import Sparsifier

__all__ = ["FlopsReport", "LayerFlops", "flops_report"]

_TRANSPOSED = (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)
_CONV = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
_HF_CONV1D = "transformers.pytorch_utils.Conv1D"  # matched by path, never imported

#: Rows ``[start, stop)`` of a weight that one use multiplies, or ``None``: all.
Block = tuple[int, int] | None


def layer_kind(module: nn.Module) -> str | None:
    """The counted layer type of ``module`` (its class name), else ``None``."""
    if isinstance(module, (*DEFAULT_MODULE_TYPES, nn.MultiheadAttention)):
        cls = type(module)
        if parametrize.is_parametrized(module):  # ParametrizedLinear: Linear
            cls = cls.__bases__[0]
        return cls.__name__
    if any(
        f"{c.__module__}.{c.__qualname__}" == _HF_CONV1D for c in type(module).__mro__
    ):
        return "Conv1D"
    return None


def _counted_weights(module: nn.Module) -> list[str]:
    """The weights of a counted layer, relative to it (``"weight"``, ...)."""
    if isinstance(module, nn.MultiheadAttention):
        names = ["in_proj_weight", "q_proj_weight", "k_proj_weight", "v_proj_weight"]
        own = [n for n in names if _has_tensor(module, n)]
        return [*own, "out_proj.weight"]
    return ["weight"]


def _has_tensor(module: nn.Module, name: str) -> bool:
    return parametrize.is_parametrized(module, name) or isinstance(
        module._parameters.get(name), Tensor
    )


def _uses(
    module: nn.Module, args: tuple[Any, ...], kwargs: Mapping[str, Any], output: Any
) -> list[tuple[str, Block, int]]:
    """``(weight, rows, positions)``: what one call multiplies, and how often.

    A layer applies (the ``rows`` of) its weight once per output position (per
    input position for a transposed convolution); attention projects each
    query, key and value token with its block of the input projection and each
    query token with the output projection.
    """
    if isinstance(module, nn.MultiheadAttention):
        return _attention_uses(module, args, kwargs)
    x = args[0] if args else None
    if isinstance(module, _TRANSPOSED):
        if not isinstance(x, Tensor):
            return []
        return [("weight", None, x.numel() // module.in_channels)]
    if not isinstance(output, Tensor):
        return []
    if isinstance(module, nn.Linear):
        return [("weight", None, output.numel() // module.out_features)]
    if isinstance(module, _CONV):
        return [("weight", None, output.numel() // module.out_channels)]
    nf = getattr(module, "nf", None)  # Conv1D: weight (in, nf)
    if not isinstance(nf, int) or nf < 1:
        return []
    return [("weight", None, output.numel() // nf)]


def _attention_uses(
    module: nn.MultiheadAttention, args: tuple[Any, ...], kwargs: Mapping[str, Any]
) -> list[tuple[str, Block, int]]:
    names = ("query", "key", "value")
    given = [args[i] if len(args) > i else kwargs.get(n) for i, n in enumerate(names)]
    inputs = [t for t in given if isinstance(t, Tensor) and not t.is_nested]
    if len(inputs) != 3:
        return []
    e = module.embed_dim
    q, k, v = (
        t.numel() // d
        for t, d in zip(inputs, (e, module.kdim, module.vdim), strict=True)
    )
    if _has_tensor(module, "in_proj_weight"):
        uses: list[tuple[str, Block, int]] = [
            ("in_proj_weight", (0, e), q),
            ("in_proj_weight", (e, 2 * e), k),
            ("in_proj_weight", (2 * e, 3 * e), v),
        ]
    else:
        uses = [("q_proj_weight", None, q), ("k_proj_weight", None, k)]
        uses.append(("v_proj_weight", None, v))
    return [*uses, ("out_proj.weight", None, q)]


def _batch_size(args: tuple[Any, ...], kwargs: Mapping[str, Any]) -> int:
    """The leading dimension of the first tensor among the forward's inputs."""
    for value in (*args, *kwargs.values()):
        found = _first_tensor(value, depth=2)
        if found is not None:
            return int(found.shape[0]) if found.dim() else 1
    return 1


def _first_tensor(value: Any, depth: int) -> Tensor | None:
    if isinstance(value, Tensor):
        return value
    if depth and isinstance(value, Mapping):
        value = list(value.values())
    if depth and isinstance(value, (list, tuple)):
        for item in value:
            found = _first_tensor(item, depth - 1)
            if found is not None:
                return found
    return None


def _join(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix else name


class SizeRecorder:
    """Records how often every counted weight is applied during one forward.

    :meth:`after_step`, called after each optimizer step, hooks the model after
    the first step so that the next forward in training mode is recorded, then
    unhooks it; the hooks live one step at most (a compiled model does not run
    them: it is not recorded, and they are removed at the next step). Hooks
    installed before training would turn off fast paths that refuse hooked
    modules (``nn.TransformerEncoderLayer``'s inference path), so none are.
    :meth:`measure` runs one forward on an example input.

    Args:
        model: the sparsified model.
    """

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        #: ``weight name -> {rows: positions}``, summed over the recorded forward.
        self.positions: dict[str, dict[Block, int]] | None = None
        #: ``weight name -> (module_fqn, name in the module, layer type)``.
        self.weights: dict[str, tuple[str, str, str]] = {}
        self.batch_size = 1
        self._pending: dict[str, dict[Block, int]] = {}
        self._pending_batch = 1
        self._recording = False
        self._force = False
        self._handles: list[RemovableHandle] = []
        self._gave_up = False

    def after_step(self) -> None:
        """After an optimizer step: watch the next training forward, once."""
        if self.positions is not None or self._gave_up:
            return
        if self.watching:  # a whole step without a recorded forward: compiled
            self.stop()
            self._gave_up = True
        else:
            self.watch()

    def watch(self) -> None:
        """Record the next forward in training mode, then unhook."""
        self.stop()
        model = self.model
        self._handles = [
            model.register_forward_pre_hook(self._before, with_kwargs=True)
        ]
        self.weights = {}
        inside_attention = {
            id(m.out_proj)
            for m in model.modules()
            if isinstance(m, nn.MultiheadAttention)
        }
        for module_fqn, module in model.named_modules():
            kind = layer_kind(module)
            if kind is None or id(module) in inside_attention:
                continue  # attention's out_proj: counted with the attention
            for name in _counted_weights(module):
                self.weights[_join(module_fqn, name)] = (module_fqn, name, kind)
            hook = functools.partial(self._layer, module_fqn)
            self._handles.append(module.register_forward_hook(hook, with_kwargs=True))
        # Last: when the model is itself a layer, its layer hook runs first (the
        # root's hook unhooks everything, which must not cut the hooks running).
        self._handles.append(model.register_forward_hook(self._after, with_kwargs=True))

    def stop(self) -> None:
        """Remove the hooks."""
        for handle in self._handles:
            handle.remove()
        self._handles = []
        self._recording = False

    @property
    def watching(self) -> bool:
        """Whether the hooks are installed."""
        return bool(self._handles)

    def measure(self, example_input: Any) -> None:
        """Run the model once on ``example_input`` (eval mode, no grad) and record.

        ``example_input`` is a tensor (``model(x)``), a tuple (``model(*x)``) or
        a dict (``model(**x)``). The modules' training flags are restored.
        """
        was_watching = self.watching
        self.watch()
        self._force = True
        modes = [(m, m.training) for m in self.model.modules()]
        self.model.eval()
        try:
            with torch.no_grad():
                if isinstance(example_input, Mapping):
                    self.model(**example_input)
                elif isinstance(example_input, tuple):
                    self.model(*example_input)
                else:
                    self.model(example_input)
        finally:
            self._force = False
            for module, training in modes:
                module.training = training
            self.stop()
            if was_watching and self.positions is None:  # the forward raised
                self.watch()

    def _before(
        self, module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> None:
        if torch.compiler.is_compiling() or not (self._force or module.training):
            return
        self._recording = True
        self._pending = {name: {} for name in self.weights}
        self._pending_batch = _batch_size(args, kwargs)

    def _layer(
        self,
        module_fqn: str,
        module: nn.Module,
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
        output: Any,
    ) -> None:
        if not self._recording or torch.compiler.is_compiling():
            return
        for name, rows, positions in _uses(module, args, kwargs, output):
            counts = self._pending[_join(module_fqn, name)]
            counts[rows] = counts.get(rows, 0) + positions

    def _after(
        self,
        module: nn.Module,
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
        output: Any,
    ) -> None:
        if not self._recording or torch.compiler.is_compiling():
            return
        self.positions = self._pending
        self.batch_size = max(1, self._pending_batch)
        self.stop()


@dataclass(frozen=True)
class LayerFlops:
    """One counted weight's FLOPs per example (1 multiply-add = 2 FLOPs).

    Attributes:
        name: the weight's name in the dense model's state dict
            (``"0.weight"``, ``"attn.in_proj_weight"``).
        kind: its layer's class name (``"Linear"``, ``"Conv2d"``, ...).
        tensor: the mask's ``tensor_fqn``, or ``None`` if the weight is dense
            (it differs from ``name`` for a weight tied to another).
        numel: weight elements.
        active: active weights at the end of the run (``numel`` if dense).
        positions: how often each weight is applied per example: the output
            positions of a layer (input positions of a transposed
            convolution, tokens of an attention projection); the dense
            forward costs ``positions * numel`` multiply-adds.
        inference: FLOPs of a forward pass with the final masks.
        dense_inference: FLOPs of the dense forward pass.
        training: FLOPs over the run's steps, or ``None`` if the run length is
            unknown.
        dense_training: ``3 * dense_inference * total_steps``, or ``None``.
    """

    name: str
    kind: str
    tensor: str | None
    numel: int
    active: int
    positions: float
    inference: float
    dense_inference: float
    training: float | None
    dense_training: float | None


@dataclass(frozen=True)
class FlopsReport:
    """Inference and training FLOPs of a sparsified model, per weight and in total.

    Made by :meth:`sparsetorch.Sparsifier.flops`; ``print(report)`` shows the
    table. All FLOPs are per example; a run's total is the training FLOPs
    times the examples per step.

    Attributes:
        layers: one :class:`LayerFlops` per counted weight, in model order.
        policy: the policy's class name.
        total_steps: optimizer steps of the run, or ``None`` if unknown.
        dense_grad_steps: steps whose backward pass computes the dense weight
            gradient (``None`` if the run length is unknown).
        batch_size: examples in the recorded forward pass (its counts are
            divided by it).
        uncounted: masked tensors whose module is not a counted layer type.
    """

    layers: tuple[LayerFlops, ...]
    policy: str
    total_steps: int | None
    dense_grad_steps: int | None
    batch_size: int
    uncounted: tuple[str, ...] = ()

    @property
    def inference_flops(self) -> float:
        """FLOPs of one forward pass per example with the final masks."""
        return sum(layer.inference for layer in self.layers)

    @property
    def dense_inference_flops(self) -> float:
        """FLOPs of one dense forward pass per example."""
        return sum(layer.dense_inference for layer in self.layers)

    @property
    def inference_ratio(self) -> float:
        """``inference_flops / dense_inference_flops``."""
        return _ratio(self.inference_flops, self.dense_inference_flops)

    @property
    def training_flops(self) -> float | None:
        """FLOPs per example over the run (``None``: its length is unknown)."""
        values = [layer.training for layer in self.layers]
        return None if any(v is None for v in values) else sum(v or 0.0 for v in values)

    @property
    def dense_training_flops(self) -> float | None:
        """``3 * dense_inference_flops * total_steps``, or ``None``."""
        if self.total_steps is None:
            return None
        return 3 * self.dense_inference_flops * self.total_steps

    @property
    def training_ratio(self) -> float | None:
        """``training_flops / dense_training_flops``, or ``None``."""
        train, dense = self.training_flops, self.dense_training_flops
        return None if train is None or dense is None else _ratio(train, dense)

    def summary_line(self) -> str:
        """One line for :meth:`sparsetorch.Sparsifier.summary`."""
        line = (
            f"FLOPs per example: inference {self.inference_flops:.4g} "
            f"({self.inference_ratio:.4f}x dense)"
        )
        if self.training_ratio is None:
            return line + ", training: run length unknown"
        return (
            line + f", training {self.training_flops:.4g} "
            f"({self.training_ratio:.4f}x dense) over {self.total_steps} steps"
        )

    def __str__(self) -> str:
        steps = (
            "run length unknown"
            if self.total_steps is None
            else f"{self.total_steps} steps ({self.dense_grad_steps} with a dense "
            "weight gradient)"
        )
        rows = [
            (
                layer.name,
                layer.kind,
                layer.active / layer.numel,
                layer.inference,
                _ratio(layer.inference, layer.dense_inference),
                layer.training,
                None
                if layer.training is None or layer.dense_training is None
                else _ratio(layer.training, layer.dense_training),
            )
            for layer in self.layers
        ]
        active = sum(layer.active for layer in self.layers)
        numel = sum(layer.numel for layer in self.layers)
        rows.append(
            (
                "total",
                "",
                active / numel if numel else 1.0,
                self.inference_flops,
                self.inference_ratio,
                self.training_flops,
                self.training_ratio,
            )
        )
        width = max(len("weight"), *(len(r[0]) for r in rows))
        kwidth = max(len("type"), *(len(r[1]) for r in rows))
        lines = [
            f"{self.policy}, {steps}, FLOPs per example",
            f"{'weight':<{width}}  {'type':<{kwidth}}  density   inference  x dense"
            "    training  x dense",
        ]
        for name, kind, density, inf, inf_ratio, train, train_ratio in rows:
            train_text = f"{'-':>10}" if train is None else f"{train:>10.4e}"
            ratio_text = f"{'-':>7}" if train_ratio is None else f"{train_ratio:>7.4f}"
            lines.append(
                f"{name:<{width}}  {kind:<{kwidth}}  {density:>7.4f}  {inf:>10.4e}"
                f"  {inf_ratio:>7.4f}  {train_text}  {ratio_text}"
            )
        lines += [
            f"not counted: {fqn} (not a Linear, Conv or attention weight)"
            for fqn in self.uncounted
        ]
        return "\n".join(lines)


def _ratio(a: float, b: float) -> float:
    return a / b if b else 1.0


def update_steps(sparsifier: Sparsifier, total_steps: int) -> list[int]:
    """The scheduled update steps in ``[1, total_steps]``."""
    schedule = sparsifier.schedule
    if not sparsifier.policy.dynamic or schedule.end_step is None:
        return []
    interval = schedule.update_interval
    first = math.ceil(max(schedule.begin_step, 1) / interval) * interval
    return list(range(first, min(schedule.end_step, total_steps + 1), interval))


def _last_update_step(sparsifier: Sparsifier) -> int | None:
    schedule = sparsifier.schedule
    if not sparsifier.policy.dynamic or schedule.end_step is None:
        return None
    interval = schedule.update_interval
    first = math.ceil(max(schedule.begin_step, 1) / interval) * interval
    last = (schedule.end_step - 1) // interval * interval
    return last if last >= first else None


def dense_grad_steps(
    sparsifier: Sparsifier, total_steps: int, updates: list[int]
) -> list[int]:
    """The steps in ``[1, total_steps]`` whose backward keeps the dense gradient.

    Every step up to the last update for a policy with
    ``dense_grad_every_step`` (SNFS); else, for a
    policy that ``needs_grad`` (RigL), the ``capture_steps`` steps ending at
    each update step, as :meth:`~sparsetorch.Sparsifier.update` runs them.
    """
    policy = sparsifier.policy
    if getattr(policy, "dense_grad_every_step", False):
        # Kept at every step while an update is still to come.
        last = _last_update_step(sparsifier)
        return [] if last is None else list(range(1, min(last, total_steps) + 1))
    if not policy.needs_grad:
        return []
    window = max(1, sparsifier.capture_steps)
    steps: set[int] = set()
    for u in updates:
        steps.update(range(max(1, u - window + 1), u + 1))
    return sorted(steps)


def flops_report(
    sparsifier: Sparsifier,
    recorder: SizeRecorder,
    *,
    total_steps: int | None,
) -> FlopsReport:
    """Count the FLOPs of ``sparsifier``'s model from ``recorder``'s sizes."""
    positions = recorder.positions
    if positions is None:
        raise RuntimeError("No forward pass was recorded yet.")
    topology = sparsifier.topology
    by_parametrization = {id(p): fqn for fqn, p in topology.parametrizations.items()}
    modules = dict(topology.model.named_modules())
    counts_at = _counts_at(sparsifier)
    updates = [] if total_steps is None else update_steps(sparsifier, total_steps)
    dense_steps = (
        None
        if total_steps is None
        else dense_grad_steps(sparsifier, total_steps, updates)
    )
    # Steps (b_i, b_{i+1}] run with the counts after the update at step b_i.
    bounds = [0, *updates]
    segment_counts = [counts_at(b) for b in bounds]
    final = (
        counts_at(total_steps) if total_steps is not None else dict(topology.targets)
    )
    batch = recorder.batch_size
    masks = topology.masks
    layers = []
    counted: set[str] = set()
    for name, (module_fqn, local, kind) in recorder.weights.items():
        path, _, tensor_name = _join(module_fqn, local).rpartition(".")
        module = modules.get(path)
        if module is None or not _has_tensor(module, tensor_name):
            continue
        weight = _stored(module, tensor_name)
        fqn = _masked_tensor(module, tensor_name, by_parametrization)
        uses = positions.get(name, {})
        row = weight[0].numel() if weight.dim() else 1
        # Multiply-adds per example: of the dense weight, and per active weight.
        dense = (
            sum(
                p * (weight.numel() if r is None else (r[1] - r[0]) * row)
                for r, p in uses.items()
            )
            / batch
        )
        per_active = dense / weight.numel()
        if fqn is not None and any(r is not None for r in uses):
            # Blocks applied unequally often (cross-attention): weigh each
            # block's uses by its share of the active weights now.
            mask = masks[fqn]
            active_rows = {r: int(mask[r[0] : r[1]].sum()) for r in uses if r}
            total = sum(active_rows.values())
            per_active = (
                sum(p * active_rows[r] for r, p in uses.items() if r) / total / batch
                if total
                else 0.0
            )
        numel = weight.numel()
        active = numel if fqn is None else final[fqn]
        training = dense_training = None
        if total_steps is not None and dense_steps is not None:
            training = 0.0
            for i, start in enumerate(bounds):
                end = bounds[i + 1] if i + 1 < len(bounds) else total_steps
                count = numel if fqn is None else segment_counts[i][fqn]
                sparse = 2 * per_active * count if fqn is not None else 2 * dense
                n = end - start
                n_dense = bisect.bisect_right(dense_steps, end) - bisect.bisect_right(
                    dense_steps, start
                )
                training += 3 * sparse * n + (2 * dense - sparse) * n_dense
            dense_training = 3 * 2 * dense * total_steps
        if fqn is not None:
            counted.add(fqn)
        layers.append(
            LayerFlops(
                name=name,
                kind=kind,
                tensor=fqn,
                numel=numel,
                active=active,
                positions=dense / numel,
                inference=2 * dense if fqn is None else 2 * per_active * active,
                dense_inference=2 * dense,
                training=training,
                dense_training=dense_training,
            )
        )
    return FlopsReport(
        layers=tuple(layers),
        policy=type(sparsifier.policy).__name__,
        total_steps=total_steps,
        dense_grad_steps=None if dense_steps is None else len(dense_steps),
        batch_size=batch,
        uncounted=tuple(f for f in topology.masks if f not in counted),
    )


def _counts_at(sparsifier: Sparsifier) -> Callable[[int], Mapping[str, int]]:
    """``step -> {tensor_fqn: active count after that step's update}``."""
    targets_at = getattr(sparsifier, "targets_at", None)
    if callable(targets_at):
        return functools.lru_cache(maxsize=None)(targets_at)
    current = dict(sparsifier.topology.targets)
    return lambda step: current


def _masked_tensor(
    module: nn.Module, name: str, by_parametrization: Mapping[int, str]
) -> str | None:
    if not parametrize.is_parametrized(module, name):
        return None
    for p in _plist(module, name):
        if id(p) in by_parametrization:
            return by_parametrization[id(p)]
    return None


def _plist(module: nn.Module, name: str) -> parametrize.ParametrizationList:
    plist = getattr(module, "parametrizations")[name]  # noqa: B009
    assert isinstance(plist, parametrize.ParametrizationList)
    return plist


def _stored(module: nn.Module, name: str) -> Tensor:
    """The stored tensor ``name`` of ``module`` (not its parametrized value)."""
    original: Any
    if parametrize.is_parametrized(module, name):
        original = _plist(module, name).original
    else:
        original = module._parameters[name]
    assert isinstance(original, Tensor)
    return original
