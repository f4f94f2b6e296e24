"""Sparse execution: run masked ``nn.Linear`` layers on compressed weights.

In *mask* mode (the default) a sparsified layer computes with its dense stored
weight, which is zero outside the mask: the same work as the dense model. In
*sparse* mode the layer's forward and backward work on the active weights only:

* forward: the active values are gathered from the stored weight (one gather of
  ``nnz`` elements) into a CSR matrix whose structure (``crow``/``col``) is
  built once per mask change, and ``y = W x`` is a sparse-dense product;
* backward: the input gradient is a product with the transposed CSR matrix, and
  the weight gradient is computed only at active positions (a sampled
  dense-dense product, :func:`torch.sparse.sampled_addmm`) and scattered into a
  dense gradient that is zero outside the mask, so the optimizer, gradient
  clipping, DDP and ``model.state_dict()`` see exactly what mask mode gives them;
* in the backward pass before a topology update (while the
  :class:`~sparsetorch.MaskParametrization` is ``capturing``), the full dense
  weight gradient is computed instead and goes through the same capture path as
  in mask mode, so RigL grows from the same gradient.

The compressed structure is rebuilt lazily, at the first forward after the mask
changed (an update, ``sparsifier.load_state_dict``, a device move): it is keyed
on the mask tensor and its version counter, which every in-place write bumps.

``"auto"`` runs a layer sparse only for the calls where :func:`sparse_is_faster`
predicts a win from its shape, density and batch (:data:`AUTO_RULES`, crossovers
measured with ``benchmarks/sparse_execution.py``); otherwise it computes exactly
as in mask mode. :func:`export_sparse` makes an inference copy of a model whose
sparse layers hold only compressed weights. See ``docs/sparse_execution.md``.
"""

from __future__ import annotations

import copy
import functools
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, cast

import torch
from torch import Tensor, nn
from torch.autograd import forward_ad
from torch.autograd.function import FunctionCtx
from torch.nn.utils import parametrize

from sparsetorch.condensed import CondensedLinear
from sparsetorch.parametrization import MaskParametrization, _np
from sparsetorch.policies.base import _nonzero
from sparsetorch.topology import Topology

__all__ = [
    "AUTO_RULES",
    "EXECUTIONS",
    "PRODUCT_RULES",
    "SparseExecution",
    "SparseLinear",
    "check_execution",
    "executions",
    "export_sparse",
    "set_execution",
    "sparse_is_faster",
]

#: The execution modes ``sparsify(..., execution=...)`` accepts.
EXECUTIONS = ("mask", "sparse", "auto")

_SUPPORTED_DTYPES = (torch.float32, torch.float64)
_PLAIN = (Tensor, nn.Parameter)


def check_execution(execution: object) -> str:
    """Return ``execution`` if it is a known mode, else raise.

    Raises:
        TypeError: ``execution`` is not a string.
        ValueError: ``execution`` is not one of :data:`EXECUTIONS`.

    Example::

        >>> check_execution("auto")
        'auto'
    """
    if not isinstance(execution, str):
        raise TypeError(
            f"execution must be a string, one of {list(EXECUTIONS)}, got {execution!r}."
        )
    if execution not in EXECUTIONS:
        raise ValueError(
            f"Unknown execution {execution!r}.\nKnown executions: "
            f"{sorted(EXECUTIONS)} ('mask': dense compute on masked weights, "
            "'sparse': compressed weights, 'auto': sparse where it is faster)."
        )
    return execution


# -- the cost model -----------------------------------------------------------------

#: ``(training, min_rows, min_numel, max_density)``: a call runs sparse under
#: ``"auto"`` when the first row with its ``training`` flag, ``rows >= min_rows``
#: and ``out * in >= min_numel`` has ``nnz / (out * in) <= max_density``; when no
#: row matches, the call computes in mask mode. Measured on CPU with one
#: thread (``benchmarks/sparse_execution.py grid``, see
#: ``docs/sparse_execution.md``) and set below the measured crossovers, so that
#: ``"auto"`` is never slower than mask mode: near a crossover both paths take
#: about the same time, so erring towards mask mode costs little.
AUTO_RULES: tuple[tuple[bool, int, int, float], ...] = (
    # training: forward, input gradient, weight gradient at active positions
    (True, 128, 1 << 18, 0.05),
    (True, 16, 1 << 20, 0.02),
    # inference: forward only
    (False, 16, 1 << 18, 0.10),
    (False, 1, 1 << 20, 0.05),
    (False, 1, 1 << 18, 0.02),
)


def sparse_is_faster(
    out_features: int,
    in_features: int,
    nnz: int,
    rows: int,
    *,
    training: bool,
    device: torch.device | str = "cpu",
) -> bool:
    """Predict whether the sparse path beats mask mode for one layer call.

    Looks the call up in :data:`AUTO_RULES`, crossovers measured on CPU: the
    sparse path wins when the layer is large, its density low, and (more so in
    training) the batch large enough for the saved multiply-adds to outweigh
    the per-call costs (building the CSR views, the dense gradient the optimizer
    still gets). Only CPU is measured, so other devices always get ``False``.

    Args:
        out_features: rows of the weight.
        in_features: columns of the weight.
        nnz: active weights.
        rows: rows of the input (the batch, times the sequence length).
        training: whether the weight gradient is computed too.
        device: where the layer runs. Default: ``"cpu"``.

    Returns:
        Whether ``"auto"`` runs the call sparse.

    Example::

        >>> sparse_is_faster(2048, 2048, 84_000, 128, training=True)  # 2%
        True
        >>> sparse_is_faster(2048, 2048, 400_000, 128, training=True)  # 9.5%
        False
        >>> sparse_is_faster(2048, 2048, 400_000, 128, training=False)
        True
    """
    if torch.device(device).type != "cpu":
        return False
    numel = out_features * in_features
    if nnz >= numel:
        return False
    for is_training, min_rows, min_numel, max_density in AUTO_RULES:
        if is_training == training and rows >= min_rows and numel >= min_numel:
            return nnz <= round(max_density * numel)  # as sparsify rounds counts
    return False


#: ``(min_rows, min_numel, max_density)``: a training call that does not run
#: wholly sparse under :data:`AUTO_RULES` still runs its forward and input
#: gradient as sparse products (its weight gradient dense) when the first row
#: with ``rows >= min_rows`` and ``out * in >= min_numel`` allows its density.
#: Measured on CPU with one thread (``benchmarks/sparse_execution.py grid``,
#: the ``auto / mask`` column) and set below the crossovers, as the rules above.
PRODUCT_RULES: tuple[tuple[int, int, float], ...] = (
    (128, 1 << 19, 0.10),
    (16, 1 << 21, 0.10),
)


def _choose_kernels(
    out_features: int,
    in_features: int,
    nnz: int,
    rows: int,
    *,
    training: bool,
    device: str,
) -> str:
    """What one ``"auto"`` call runs (see :data:`AUTO_RULES`).

    ``"sparse"``: every product on the active weights (in inference, the
    forward); ``"products"``: in training, the forward and the input gradient
    (the same sparse-dense product, transposed) sparse, the weight gradient
    dense and masked by the parametrization's hook, where :data:`PRODUCT_RULES`
    allow; ``"plain"``: ``F.linear``.
    """
    if sparse_is_faster(
        out_features, in_features, nnz, rows, training=training, device=device
    ):
        return "sparse"
    numel = out_features * in_features
    if not training or device != "cpu" or nnz >= numel:
        return "plain"
    for min_rows, min_numel, max_density in PRODUCT_RULES:
        if rows >= min_rows and numel >= min_numel:
            return "products" if nnz <= round(max_density * numel) else "plain"
    return "plain"


# -- the compressed structure ----------------------------------------------------------


@dataclass(eq=False)
class _Plan:
    """The compressed structure of one mask: CSR of ``W``, and of ``W.T`` on demand.

    ``values = weight.flatten()[index]`` are ``W``'s CSR values (row-major), and
    ``values[perm]`` are ``W.T``'s. ``W.T``'s structure (``perm``, ``crow_t``,
    ``col_t``) is built at the first input gradient that needs it: a first layer,
    whose input needs no gradient, never holds it.
    """

    mask: Tensor  # the mask it was built from (identity and version are the key)
    version: int
    shape: tuple[int, int]  # (out, in)
    index: Tensor  # (nnz,): flat positions of the active weights, row-major
    crow: Tensor  # (out + 1,)
    col: Tensor  # (nnz,)
    transposed: tuple[Tensor, Tensor, Tensor] | None = None  # perm, crow_t, col_t

    @property
    def nnz(self) -> int:
        return self.index.numel()

    def matches(self, mask: Tensor) -> bool:
        return self.mask is mask and self.version == mask._version

    def csr(self, values: Tensor) -> Tensor:
        return torch.sparse_csr_tensor(
            self.crow, self.col, values, self.shape, check_invariants=False
        )

    def csr_t(self, values: Tensor) -> Tensor:
        perm, crow_t, col_t = self.transpose()
        return torch.sparse_csr_tensor(
            crow_t,
            col_t,
            values.index_select(0, perm),
            (self.shape[1], self.shape[0]),
            check_invariants=False,
        )

    def transpose(self) -> tuple[Tensor, Tensor, Tensor]:
        """``W.T``'s structure ``(perm, crow_t, col_t)``, built at the first call."""
        if self.transposed is None:
            self.transposed = self._transpose()
        return self.transposed

    def _transpose(self) -> tuple[Tensor, Tensor, Tensor]:
        out, inp = self.shape
        rows = torch.repeat_interleave(
            torch.arange(out, dtype=self.col.dtype, device=self.col.device),
            self.crow.diff(),
            output_size=self.nnz,
        )
        # W.T's CSR order is by column, then row: a stable sort of the columns of
        # W's row-major entries gives it, as positions in W's order (on 16-bit
        # keys where the columns fit: a radix sort, twice as fast).
        keys = self.col.to(torch.int16) if inp <= 2**15 else self.col
        perm = torch.sort(keys, stable=True).indices.to(self.col.dtype)
        crow_t = torch.zeros(inp + 1, dtype=self.col.dtype, device=self.col.device)
        crow_t[1:] = torch.bincount(self.col, minlength=inp).cumsum(0)
        return perm, crow_t, rows.index_select(0, perm)


@functools.cache
def _silence_beta_warning() -> None:
    """Make PyTorch's once-per-process "CSR tensors are in beta" warning now."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Sparse CSR tensor support")
        torch.sparse_csr_tensor(
            torch.zeros(2, dtype=torch.int64),
            torch.zeros(1, dtype=torch.int64),
            torch.zeros(1),
            (1, 1),
            check_invariants=False,
        )


@torch.no_grad()
def _build_plan(mask: Tensor, active: Tensor | None = None) -> _Plan:
    """The compressed structure of ``mask`` (``active``: its sorted active positions,
    when known: the update that made the mask found them, so they need no search)."""
    _silence_beta_warning()
    out, inp = mask.shape
    # int32 wherever it fits: half the memory (and fewer copies in the kernels)
    itype = torch.int32 if mask.numel() < 2**31 else torch.int64
    if active is None:
        active = _nonzero(mask.flatten())  # row-major: CSR order
    index = active.to(itype)
    rows, cols = index.div(inp, rounding_mode="floor"), index.remainder(inp)
    crow = torch.zeros(out + 1, dtype=itype, device=mask.device)
    crow[1:] = torch.bincount(rows, minlength=out).cumsum(0)
    return _Plan(
        mask=mask,
        version=mask._version,
        shape=(out, inp),
        index=index,
        crow=crow,
        col=cols,
    )


# -- the autograd function -------------------------------------------------------------


def _sparse_linear(
    input: Tensor, weight: Tensor, bias: Tensor | None, plan: _Plan
) -> tuple[Tensor, Tensor, Tensor]:
    """``F.linear`` on the active weights; returns ``(output, x, values)``."""
    out, inp = plan.shape
    x = input.reshape(-1, inp)  # (rows, in)
    values = weight.detach().reshape(-1).index_select(0, plan.index)  # (nnz,)
    y = torch.sparse.mm(plan.csr(values), x.detach().t())  # (out, rows)
    if bias is not None:
        y = y.add_(bias.detach().unsqueeze(1))
    output = y.t().reshape(*input.shape[:-1], out).contiguous()
    return output, x, values


class _SparseLinearFunction(torch.autograd.Function):
    """``F.linear`` on a masked stored weight, with sparse kernels where chosen."""

    @staticmethod
    def forward(
        ctx: FunctionCtx,
        input: Tensor,
        weight: Tensor,
        bias: Tensor | None,
        plan: _Plan,
        owner: MaskParametrization,
        buffer: _GradBuffer,
        sparse_weight_grad: bool,
    ) -> Tensor:
        output, x, values = _sparse_linear(input, weight, bias, plan)
        ctx.save_for_backward(x, weight, values)
        ctx.plan = plan  # type: ignore[attr-defined]
        ctx.owner = owner  # type: ignore[attr-defined]
        ctx.buffer = buffer  # type: ignore[attr-defined]
        ctx.sparse_weight_grad = sparse_weight_grad  # type: ignore[attr-defined]
        ctx.input_shape = input.shape  # type: ignore[attr-defined]
        return output

    @staticmethod
    def backward(ctx: Any, grad_output: Tensor) -> tuple[Tensor | None, ...]:
        x, weight, values = ctx.saved_tensors
        plan: _Plan = ctx.plan
        owner: MaskParametrization = ctx.owner
        out, inp = plan.shape
        g = grad_output.reshape(-1, out)  # (rows, out)
        if torch.is_grad_enabled():
            # backward(create_graph=True): F.linear's own formulas, which are
            # differentiable; the parametrization's hook masks the weight's.
            return (
                g.mm(weight).view(ctx.input_shape),
                g.t().mm(x),
                g.sum(0) if ctx.needs_input_grad[2] else None,
                *(None,) * 4,
            )
        sparse_weight_grad = (
            ctx.needs_input_grad[1] and ctx.sparse_weight_grad and not owner.capturing
        )
        g_t = None
        if ctx.needs_input_grad[0] or sparse_weight_grad:
            g_t = g.t().contiguous()  # (out, rows): what the sparse kernels read
        grad_input = grad_weight = grad_bias = None
        if ctx.needs_input_grad[0]:
            grad_input = torch.sparse.mm(plan.csr_t(values), g_t)  # (in, rows)
            # Row-major like F.linear's: elementwise backward ops before this
            # layer (ReLU's, say) take a slow path on mixed layouts.
            grad_input = grad_input.t().contiguous().view(ctx.input_shape)
        if ctx.needs_input_grad[1]:
            if not sparse_weight_grad:
                # Dense, as mask mode computes it; the parametrization's hooks
                # mask it (and capture it for RigL before an update).
                grad_weight = g.t().mm(x)  # (out, in)
            else:
                active = torch.sparse.sampled_addmm(
                    plan.csr(values), g_t, x, beta=0.0
                ).values()  # (nnz,): (g.T @ x) at the active positions only
                flat = ctx.buffer.scatter(out * inp, plan.index, active)
                grad_weight = flat.view(out, inp)
                owner.mark_grad_masked(grad_weight)
        if ctx.needs_input_grad[2]:
            grad_bias = g.sum(0)
        return grad_input, grad_weight, grad_bias, None, None, None, None


_storage_use_count = getattr(torch._C, "_storage_Use_Count", None)


class _GradBuffer:
    """The memory of one layer's dense weight gradient, reused across steps.

    A fresh weight-sized gradient every step costs more than the sparse compute
    at high sparsity: the allocator returns large blocks to the system, so each
    new one is page-faulted in and zeroed. This keeps the block of the previous
    step's gradient (through a 1-D alias, so that ``AccumulateGrad`` still takes
    the returned view as ``.grad`` without a copy) and reuses it, but only once
    nobody else holds it: ``zero_grad()`` set ``.grad`` to ``None`` and no other
    tensor shares the memory. Otherwise a new block is allocated, so a gradient
    still in use is never overwritten.

    A reused block holds the last gradient: zeros except at the positions last
    written. If nothing wrote to it since (its version counter, shared with the
    ``.grad`` view, is unchanged), only those positions are cleared, and not even
    those when the next gradient goes to the same positions (no update since);
    after any other in-place write it is zeroed whole.
    """

    def __init__(self) -> None:
        self.flat: Tensor | None = None
        self._written: Tensor | None = None  # positions of the last scatter
        self._version = -1  # flat._version right after it

    def scatter(self, numel: int, index: Tensor, values: Tensor) -> Tensor:
        """A 1-D tensor of ``numel`` zeros with ``values`` at ``index``."""
        flat = self.flat
        if (
            flat is not None
            and _storage_use_count is not None
            and flat.numel() == numel
            and flat.dtype == values.dtype
            and flat.device == values.device
            # `flat` and the temporary storage object: nobody else.
            and _storage_use_count(flat.untyped_storage()._cdata) == 2
        ):
            if flat._version != self._version or self._written is None:
                flat.zero_()
            elif self._written is not index:
                flat.scatter_(0, self._written, 0.0)
            # else: `index` holds the only nonzeros, which are overwritten
        else:
            self.flat = flat = values.new_zeros(numel)
        flat.scatter_(0, index, values)
        self._written, self._version = index, flat._version
        return flat


# -- switching a layer's forward -------------------------------------------------------


class SparseExecution:
    """The forward of one sparsified ``nn.Linear`` that runs sparsetorch's kernels.

    Installed as the module's ``forward`` (an instance attribute, so the class
    and every other module are untouched) by :func:`set_execution`; removing it
    restores the plain forward. It reads ``module.weight`` through the
    parametrization as the plain forward does (so stale weights are re-masked
    first), then runs sparsetorch's kernels or ``F.linear``. ``sparse_calls``
    counts the calls that ran any of sparsetorch's kernels, ``dense_calls`` the
    plain ones.

    Args:
        module: the parametrized ``nn.Linear``.
        parametrization: its :class:`~sparsetorch.MaskParametrization`.
        mode: ``"sparse"`` (always, where supported) or ``"auto"`` (each
            product of a call where the measured rules predict a win).

    Example::

        >>> import sparsetorch as st
        >>> model = nn.Sequential(nn.Linear(8, 8))
        >>> _ = st.sparsify(model, policy="static", sparsity=0.5, execution="sparse")
        >>> _ = model(torch.randn(2, 8))
        >>> model[0].forward
        SparseExecution(mode='sparse', sparse_calls=1, dense_calls=0, rebuilds=1)
    """

    def __init__(
        self, module: nn.Linear, parametrization: MaskParametrization, mode: str
    ) -> None:
        if mode not in ("sparse", "auto"):
            raise ValueError(
                f"SparseExecution mode must be 'sparse' or 'auto': {mode!r}"
            )
        self.module = module
        self.parametrization = parametrization
        self.mode = mode
        self.plan: _Plan | None = None
        self.grad_buffer = _GradBuffer()
        self.rebuilds = 0
        self.sparse_calls = 0
        self.dense_calls = 0
        self._warned = False
        self._nnz_of: Tensor | None = None  # the mask _nnz was counted on
        self._nnz_version = -1
        self._nnz = 0
        self._decisions: dict[tuple[int, bool, str], str] = {}

    def __call__(self, input: Tensor) -> Tensor:
        module = self.module
        if not parametrize.is_parametrized(module, "weight"):
            del module.__dict__["forward"]  # the parametrization is gone
            return cast(Tensor, module(input))
        if torch.compiler.is_compiling():
            # Compiled code keeps mask mode's plain call (inductor fuses around it).
            return nn.functional.linear(input, module.weight, module.bias)
        if self.parametrization._masked_grad is not None:
            self.parametrization.mark_grad_masked(None)  # forget an unused mark
        weight = module.weight  # through the parametrization: re-masks if stale
        training = torch.is_grad_enabled() and _needs_grad(input, weight, module.bias)
        kernels = self._kernels(input, weight, training)
        if kernels == "plain":
            self.dense_calls += 1
            return nn.functional.linear(input, weight, module.bias)
        self.sparse_calls += 1
        plan = self._plan()
        if not training:
            return _sparse_linear(input, weight, module.bias, plan)[0]
        apply = cast(Callable[..., Tensor], _SparseLinearFunction.apply)
        return apply(
            input,
            weight,
            module.bias,
            plan,
            self.parametrization,
            self.grad_buffer,
            kernels == "sparse",
        )

    def _plan(self) -> _Plan:
        p = self.parametrization
        mask = p.mask
        if self.plan is None or not self.plan.matches(mask):
            self.plan = None  # free the old structure first
            self.plan = _build_plan(mask, p.active_positions())
            self.rebuilds += 1
            # The positions, for the next update (shared with the plan).
            p.keep_active_positions(self.plan.index)
        return self.plan

    def _kernels(self, input: Tensor, weight: Tensor, training: bool) -> str:
        """What this call runs: ``"sparse"``, ``"products"`` or ``"plain"``.

        See :func:`_choose_kernels`; without a gradient to compute, anything but
        ``"plain"`` means a sparse forward.
        """
        kernels = (
            "sparse" if self.mode == "sparse" else self._auto(input, weight, training)
        )
        if kernels == "plain":
            return kernels  # (decided first: the plain path stays cheap)
        why = _unsupported(input, weight)
        if why is not None:
            if self.mode == "sparse" and not self._warned:
                self._warned = True
                warnings.warn(
                    f"execution='sparse': {why}, so this layer computes in mask "
                    "mode (same results, dense speed).",
                    RuntimeWarning,
                    stacklevel=3,
                )
            return "plain"
        return kernels

    def _auto(self, input: Tensor, weight: Tensor, training: bool) -> str:
        """:func:`_choose_kernels` for this call, cached per mask version."""
        mask = self.parametrization.mask
        if self._nnz_of is not mask or self._nnz_version != mask._version:
            self._nnz_of, self._nnz_version = mask, mask._version
            self._nnz = _count(mask)  # once per mask change, not per call
            self._decisions.clear()
        out, inp = weight.shape
        rows = input.numel() // max(inp, 1)
        key = (rows, training, weight.device.type)
        if key not in self._decisions:
            if len(self._decisions) >= 256:  # many input shapes: start over
                self._decisions.clear()
            self._decisions[key] = _choose_kernels(
                out, inp, self._nnz, rows, training=training, device=key[2]
            )
        return self._decisions[key]

    def __repr__(self) -> str:
        return (
            f"SparseExecution(mode={self.mode!r}, sparse_calls={self.sparse_calls}, "
            f"dense_calls={self.dense_calls}, rebuilds={self.rebuilds})"
        )


def _count(mask: Tensor) -> int:
    """Active entries of a bool mask (``mask.sum()`` widens every entry to int64:
    14x slower than ``count_nonzero``, 80x slower than numpy's, on the CPU)."""
    if _np is not None and mask.device.type == "cpu" and mask.is_contiguous():
        return int(_np.count_nonzero(mask.numpy()))
    return int(torch.count_nonzero(mask))


def _needs_grad(*tensors: Tensor | None) -> bool:
    return any(t is not None and t.requires_grad for t in tensors)


def _unsupported(input: Tensor, weight: Tensor) -> str | None:
    """Why the sparse path cannot run this call, or ``None``."""
    if weight.dtype not in _SUPPORTED_DTYPES:
        return f"the weight's dtype is {weight.dtype} (float32 and float64 run sparse)"
    if input.dtype != weight.dtype:
        return (
            f"the input's dtype {input.dtype} differs from the weight's {weight.dtype}"
        )
    if torch.is_autocast_enabled(weight.device.type):
        return "autocast is enabled"
    if type(weight) not in _PLAIN or type(input) not in _PLAIN:
        return "the weight or input is a tensor subclass"
    if _is_functorch(input) or _is_functorch(weight):
        return "a torch.func transform (vmap, grad, ...) is active"
    if torch.jit.is_tracing():  # type: ignore[attr-defined,no-untyped-call]
        return "torch.jit.trace is recording"
    if forward_ad._current_level >= 0:
        return "forward-mode AD is active"
    if input.dim() == 0 or input.shape[-1] != weight.shape[1]:
        return "the input does not fit the weight"
    if input.numel() == 0:
        return "the input is empty"
    return None


def _is_functorch(tensor: Tensor) -> bool:
    return bool(torch._C._functorch.is_functorch_wrapped_tensor(tensor))


def _linear_modules(
    topology: Topology,
) -> dict[str, tuple[nn.Linear, MaskParametrization]]:
    """``tensor_fqn -> (module, parametrization)`` of the masked weights that may
    run sparse: those of ``nn.Linear`` modules computing ``nn.Linear.forward``."""
    modules = dict(topology.model.named_modules())
    found = {}
    for fqn, p in topology.parametrizations.items():
        module_fqn, _, name = fqn.rpartition(".")
        module = modules[module_fqn]
        if name == "weight" and _custom_forward(module) is None:
            assert isinstance(module, nn.Linear)
            found[fqn] = (module, p)
    return found


def _custom_forward(module: nn.Module) -> str | None:
    """Why ``module`` must keep its own forward, or ``None`` for a plain Linear.

    Sparse execution replaces ``nn.Linear.forward``; a subclass that overrides
    it, or a forward set on the instance, computes something else, so it keeps
    mask mode.
    """
    if not isinstance(module, nn.Linear):
        return "not an nn.Linear"
    if type(module).forward is not nn.Linear.forward:
        cls = type(module)
        if parametrize.is_parametrized(module):
            cls = cls.__mro__[1]  # the class parametrize derived ParametrizedX from
        return f"{cls.__name__} overrides forward"
    current = module.__dict__.get("forward")
    if current is not None and not isinstance(current, SparseExecution):
        return "the instance has its own forward"
    return None


def mask_mode_reasons(topology: Topology) -> dict[str, str]:
    """``tensor_fqn -> reason`` of masked ``nn.Linear`` weights kept in mask mode.

    Example::

        >>> import sparsetorch as st
        >>> class Scaled(nn.Linear):
        ...     def forward(self, x):
        ...         return 2 * super().forward(x)
        >>> model = nn.Sequential(Scaled(8, 8), nn.Linear(8, 8))
        >>> sparsifier = st.sparsify(model, policy="static", execution="sparse")
        >>> mask_mode_reasons(sparsifier.topology)
        {'0.weight': 'Scaled overrides forward'}
    """
    modules = dict(topology.model.named_modules())
    reasons = {}
    for fqn in topology.parametrizations:
        module_fqn, _, name = fqn.rpartition(".")
        module = modules[module_fqn]
        why = _custom_forward(module)
        if name == "weight" and isinstance(module, nn.Linear) and why is not None:
            reasons[fqn] = why
    return reasons


def set_execution(topology: Topology, execution: str) -> None:
    """Switch every masked ``nn.Linear`` of ``topology`` to ``execution``.

    ``"mask"`` restores the plain forward. Other masked layers (convolutions,
    custom ``include=`` tensors) always compute in mask mode, and so do, under
    ``"auto"``, layers too small for any row of :data:`AUTO_RULES`. Called by
    ``sparsify(..., execution=...)`` and :meth:`Sparsifier.set_execution
    <sparsetorch.Sparsifier.set_execution>`.

    Args:
        topology: the masked tensors.
        execution: one of :data:`EXECUTIONS`.

    Raises:
        ValueError: unknown ``execution``.
        TypeError: ``execution`` is not a string.

    Example::

        >>> import sparsetorch as st
        >>> model = nn.Sequential(nn.Linear(64, 64))
        >>> sparsifier = st.sparsify(model, policy="static", sparsity=0.9)
        >>> set_execution(sparsifier.topology, "sparse")
        >>> executions(sparsifier.topology)
        {'0.weight': 'sparse'}
    """
    check_execution(execution)
    for module, p in _linear_modules(topology).values():
        p.mark_grad_masked(None)
        p.active = None  # kept only with a compressed structure: the next one
        current = module.__dict__.get("forward")
        if isinstance(current, SparseExecution):
            del module.__dict__["forward"]
        if execution == "auto" and p.mask.numel() < min(r[2] for r in AUTO_RULES):
            continue  # never sparse under AUTO_RULES: keep mask mode's plain call
        if execution != "mask":
            module.forward = SparseExecution(module, p, execution)  # type: ignore[method-assign]


def executions(topology: Topology) -> dict[str, str]:
    """``tensor_fqn -> execution mode`` of every masked tensor.

    Tensors that cannot run sparse (not the weight of an ``nn.Linear``) are
    always ``"mask"``.

    Example::

        >>> import sparsetorch as st
        >>> model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.Flatten(), nn.Linear(16, 2))
        >>> sparsifier = st.sparsify(model, policy="static", execution="sparse")
        >>> executions(sparsifier.topology)
        {'0.weight': 'mask', '2.weight': 'sparse'}
    """
    linear = _linear_modules(topology)
    modes = {}
    for fqn in topology.parametrizations:
        current = linear[fqn][0].__dict__.get("forward") if fqn in linear else None
        modes[fqn] = current.mode if isinstance(current, SparseExecution) else "mask"
    return modes


# -- inference export ------------------------------------------------------------------


class SparseLinear(nn.Module):
    """An inference ``nn.Linear`` whose weight is a CSR tensor.

    Made by :func:`export_sparse`. ``weight`` is a ``torch.sparse_csr`` buffer
    holding only the active weights; ``y = x W^T + b`` is one sparse-dense
    product. ``weight`` and ``bias`` are buffers: gradients flow to the input
    only.

    Args:
        weight: dense ``(out_features, in_features)`` weight; its nonzeros are
            kept.
        bias: ``(out_features,)`` bias, or ``None``.

    Example::

        >>> w = torch.tensor([[0.0, 2.0], [1.0, 0.0]])
        >>> layer = SparseLinear(w, torch.tensor([0.5, 0.0]))
        >>> layer
        SparseLinear(in_features=2, out_features=2, nnz=2, bias=True)
        >>> layer(torch.tensor([[1.0, 3.0]]))
        tensor([[6.5000, 1.0000]])
    """

    weight: Tensor
    bias: Tensor | None

    def __init__(self, weight: Tensor, bias: Tensor | None) -> None:
        super().__init__()
        if weight.dim() != 2 or weight.layout != torch.strided:
            raise ValueError(
                f"SparseLinear needs a dense 2-D weight, got shape "
                f"{tuple(weight.shape)} and layout {weight.layout}."
            )
        self.out_features, self.in_features = weight.shape
        plan = _build_plan(weight.detach() != 0)
        values = weight.detach().reshape(-1)[plan.index].clone()
        self.register_buffer("weight", plan.csr(values))
        self.register_buffer("bias", None if bias is None else bias.detach().clone())

    def forward(self, input: Tensor) -> Tensor:
        x = input.reshape(-1, self.in_features)  # (rows, in)
        y: Tensor = torch.sparse.mm(self.weight, x.t())  # (out, rows)
        if self.bias is not None:
            y = y + self.bias.unsqueeze(1)
        return y.t().reshape(*input.shape[:-1], self.out_features).contiguous()

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"nnz={self.weight._nnz()}, bias={self.bias is not None}"
        )


def export_sparse(
    model: nn.Module, *, execution: str = "auto", batch_size: int = 128
) -> nn.Module:
    """An inference copy of ``model`` whose sparse ``nn.Linear`` layers are compressed.

    The copy has no parametrizations or sparsetorch hooks: every masked weight
    is baked in (zeros outside its mask), and each ``nn.Linear`` chosen by
    ``execution`` is replaced by a :class:`SparseLinear`. ``model`` itself is
    not changed. Works on a sparsified model and on a plain one with zeros (after
    ``sparsifier.remove()``, say), whose zeros then define the sparsity.

    Args:
        model: the model to export.
        execution: ``"auto"``: the layers :func:`sparse_is_faster` predicts
            faster at ``batch_size`` rows; ``"sparse"``: every ``nn.Linear`` with
            at least one zero; ``"condensed"``: every ``nn.Linear`` with at
            least one masked weight (or zero, on a plain model) becomes a
            :class:`~sparsetorch.condensed.CondensedLinear` (per output unit,
            its active inputs' positions and values: the layout for
            constant fan-in layers, ``structure="constant-fan-in"``);
            ``"mask"``: none (a plain dense copy). Default: ``"auto"``.
        batch_size: input rows the ``"auto"`` choice assumes. Default: ``128``.

    Returns:
        The exported copy, in eval mode.

    Raises:
        ValueError: unknown ``execution`` or ``batch_size < 1``.

    Example::

        >>> import sparsetorch as st
        >>> model = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 2))
        >>> _ = st.sparsify(model, policy="static", sparsity=0.75,
        ...                 distribution="uniform")
        >>> exported = export_sparse(model, execution="sparse")
        >>> exported
        Sequential(
          (0): SparseLinear(in_features=8, out_features=8, nnz=16, bias=True)
          (1): ReLU()
          (2): SparseLinear(in_features=8, out_features=2, nnz=4, bias=True)
        )
        >>> x = torch.randn(3, 8)
        >>> torch.allclose(exported(x), model(x), atol=1e-6)
        True
    """
    if execution != "condensed":
        check_execution(execution)
    if (
        isinstance(batch_size, bool)
        or not isinstance(batch_size, int)
        or batch_size < 1
    ):
        raise ValueError(f"batch_size must be an int >= 1, got {batch_size!r}.")
    copied = copy.deepcopy(model)
    masks = _weight_masks(copied) if execution == "condensed" else {}
    _strip(copied)
    replaced: dict[str, nn.Module] = {}
    for fqn, module in copied.named_modules():
        if type(module) is not nn.Linear or execution == "mask":
            continue
        weight = module.weight.detach()
        mask = masks.get(fqn)
        nnz = int(torch.count_nonzero(weight) if mask is None else mask.sum())
        if nnz == weight.numel():
            continue
        if execution == "condensed":
            replaced[fqn] = CondensedLinear(weight, module.bias, mask)
            continue
        if execution == "auto" and not (
            weight.dtype in _SUPPORTED_DTYPES
            and sparse_is_faster(
                module.out_features,
                module.in_features,
                nnz,
                batch_size,
                training=False,
                device=weight.device,
            )
        ):
            continue
        replaced[fqn] = SparseLinear(weight, module.bias)
    for fqn, new in replaced.items():
        parent_fqn, _, name = fqn.rpartition(".")
        parent = copied.get_submodule(parent_fqn)
        setattr(parent, name, new)
    return copied.eval()


def _weight_masks(model: nn.Module) -> dict[str, Tensor]:
    """``module_fqn -> mask`` of every masked ``weight`` (the masks, not the
    nonzeros: a weight grown at zero is still active)."""
    masks = {}
    for module_fqn, module in model.named_modules():
        if parametrize.is_parametrized(module, "weight"):
            plist = cast(
                parametrize.ParametrizationList, module.parametrizations.weight
            )
            for p in plist:
                if isinstance(p, MaskParametrization):
                    masks[module_fqn] = p.mask.clone()
    return masks


def _strip(model: nn.Module) -> None:
    """Bake the masks into a copy and remove sparsetorch's forwards and hooks.

    ``parametrize.remove_parametrizations`` would delete the weight property
    from the parametrized class, which a deep copy shares with the original
    model; so the copy is un-parametrized by hand, leaving the class alone.

    Raises:
        ValueError: a module also has a parametrization that is not
            sparsetorch's.
    """
    from sparsetorch import topology as _topology

    ours = {
        _topology._rename_on_save,
        _topology._rename_on_load,
        _topology._mark_stale,
        _topology._remask_stale,
    }
    for module_fqn, module in model.named_modules():
        if isinstance(module.__dict__.get("forward"), SparseExecution):
            del module.__dict__["forward"]
        if parametrize.is_parametrized(module):
            order = list(module.state_dict(keep_vars=True))  # the dense order
            plists = cast(
                dict[str, parametrize.ParametrizationList], module.parametrizations
            )
            for name, plist in plists.items():
                if not all(isinstance(p, MaskParametrization) for p in plist):
                    raise ValueError(
                        f"Cannot export {module_fqn or 'the model'!r}: its "
                        f"{name!r} has a parametrization that is not sparsetorch's "
                        f"({[type(p).__name__ for p in plist]}).\nRemove it first "
                        "(torch.nn.utils.parametrize.remove_parametrizations)."
                    )
            params = module._parameters
            for name, plist in plists.items():
                original = plist.original
                with torch.no_grad():
                    for p in plist:
                        original.mul_(cast(MaskParametrization, p).mask)
                params[name] = nn.Parameter(
                    original.detach(), requires_grad=original.requires_grad
                )
            del module._modules["parametrizations"]
            module.__class__ = type(module).__bases__[0]
            rank = {key: i for i, key in enumerate(order)}
            for name in sorted(params, key=lambda n: rank.get(n, len(rank))):
                params[name] = params.pop(name)  # back to the dense order
        for hooks in (
            module._state_dict_hooks,
            module._load_state_dict_pre_hooks,
            module._load_state_dict_post_hooks,
            module._forward_pre_hooks,
        ):
            for key, hook in list(hooks.items()):
                inner = getattr(hook, "hook", hook)  # load pre-hooks are wrapped
                if isinstance(inner, functools.partial) and inner.func in ours:
                    del hooks[key]
