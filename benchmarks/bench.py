"""Masked training against dense training and against peers, in one process.

Every variant trains its own copy of the same model on the same batch with SGD
(momentum 0.9) at 90% sparsity (the same fraction in every selected layer, so the
peers, whose only allocation is uniform, do the same work). Timed blocks of
ordinary steps alternate: dense, variant, dense, variant, ... (the order flips
every round), and each variant's step ratio is the median over rounds of its
block time over the dense block next to it, so load that drifts during the run
cancels. Ordinary steps are the steps of a training loop between topology
updates: ``zero_grad``, forward, loss, backward, optimizer step (and whatever the
variant hooks into them). No update is scheduled during them.

Per workload and variant the table gives:

* ``step ms``, ``step / dense``: an ordinary step, and its ratio to the dense
  step (median over rounds; the range is the rounds' interquartile range);
* ``update / dense step``: one topology update (the update call alone, after an
  ordinary step and a backward pass that captured the dense gradient), in dense
  steps, each update timed next to a dense step;
* ``state B/weight``: bytes of persistent state beyond the dense model and its
  optimizer (tensors reachable from the model, the optimizer and the variant's
  own objects, after a step), per masked weight;
* ``peak added MiB``: peak memory of an ordinary step beyond the dense step's
  (persistent state plus the step's own allocations, from the profiler's
  allocation events).

Variants: ``dense`` (the baseline), ``sparsetorch`` (eager, the default
``execution="mask"``), ``sparsetorch auto`` (eager, ``execution="auto"``: sparse
products where they win, see ``docs/sparse_execution.md``), ``dense+compile``
and ``sparsetorch+compile`` (``torch.compile`` of the model), ``float-mask``
(``torch.nn.utils.parametrize`` with ``X * mask`` and a float mask, what
``torch.ao.pruning``'s ``FakeSparsity`` does, with a plain RigL update written
here) and ``rigl-torch`` 0.5.2 (``pip install rigl-torch==0.5.2 --no-deps``;
skipped with a note when missing).

Run::

    python benchmarks/bench.py            # the table in docs/performance.md
    python benchmarks/bench.py --quick    # seconds: tiny models, a smoke test
"""

from __future__ import annotations

import argparse
import copy
import gc
import importlib
import importlib.metadata
import itertools
import json
import math
import os
import platform
import statistics
import sys
import tempfile
import time
import types
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.utils import parametrize
from torch.profiler import ProfilerActivity, profile

import sparsetorch as st
from sparsetorch.execution import SparseExecution

SPARSITY = 0.9
DROP_FRACTION = 0.3
LR = 0.01
MOMENTUM = 0.9
NEVER = 10**12  # an update interval / end step no benchmark reaches
RIGL_TORCH_VERSION = "0.5.2"


# -- workloads ---------------------------------------------------------------------


@dataclass(frozen=True)
class Workload:
    name: str
    title: str
    build: Callable[[], nn.Module]
    input_shape: tuple[int, ...]  # one sample
    classes: int
    batch: int
    block: int  # ordinary steps per timed block


def mlp(sizes: tuple[int, ...]) -> nn.Module:
    layers: list[nn.Module] = []
    for i, (a, b) in enumerate(itertools.pairwise(sizes)):
        layers.append(nn.Linear(a, b))
        if i < len(sizes) - 2:
            layers.append(nn.ReLU())
    return nn.Sequential(*layers)


def cnn(channels: tuple[int, ...], classes: int = 10) -> nn.Module:
    layers: list[nn.Module] = []
    c_in = 3
    for i, c in enumerate(channels):
        layers += [nn.Conv2d(c_in, c, 3, padding=1), nn.BatchNorm2d(c), nn.ReLU()]
        if i < len(channels) - 1:
            layers.append(nn.MaxPool2d(2))
        c_in = c
    layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(c_in, classes)]
    return nn.Sequential(*layers)


def workloads(quick: bool) -> list[Workload]:
    if quick:  # same shapes of model, a few thousand weights: seconds in all
        return [
            Workload(
                "W1", "MLP 64-32-32-10", lambda: mlp((64, 32, 32, 10)), (64,), 10, 8, 1
            ),
            Workload(
                "W2", "CNN 3-8-8-8, 8x8", lambda: cnn((8, 8, 8)), (3, 8, 8), 10, 4, 1
            ),
            Workload(
                "W3", "4 x Linear(32, 32)", lambda: mlp((32,) * 5), (32,), 32, 8, 1
            ),
        ]
    return [
        Workload(
            "W1",
            "MLP 784-1024-1024-10, batch 256",
            lambda: mlp((784, 1024, 1024, 10)),
            (784,),
            10,
            256,
            6,
        ),
        Workload(
            "W2",
            "CNN conv 3-64-128-256 + BatchNorm, 32x32, batch 64",
            lambda: cnn((64, 128, 256)),
            (3, 32, 32),
            10,
            64,
            2,
        ),
        Workload(
            "W3",
            "4 x Linear(2048, 2048), batch 128",
            lambda: mlp((2048,) * 5),
            (2048,),
            2048,
            128,
            2,
        ),
    ]


# -- variants ----------------------------------------------------------------------


class Variant:
    """One way to train the model: ``step`` is an ordinary training step."""

    name = "dense"
    compiled = False

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.optimizer = torch.optim.SGD(model.parameters(), lr=LR, momentum=MOMENTUM)
        self.forward: Callable[[Tensor], Tensor] = model
        self.masked = 0  # number of masked weights

    def loss(self, x: Tensor, y: Tensor) -> Tensor:
        return F.cross_entropy(self.forward(x), y)

    def step(self, x: Tensor, y: Tensor) -> None:
        self.optimizer.zero_grad()
        self.loss(x, y).backward()
        self.optimizer.step()

    def prepare_update(self, x: Tensor, y: Tensor) -> None:
        """The backward pass before an update, capturing what the update needs."""
        raise NotImplementedError

    def update(self) -> None:
        """One topology update."""
        raise NotImplementedError

    def roots(self) -> list[object]:
        """The objects whose tensors are this variant's persistent state."""
        return [self.model, self.optimizer, *getattr(self, "masks", [])]


class DenseCompiled(Variant):
    name = "dense+compile"
    compiled = True

    def __init__(self, model: nn.Module) -> None:
        super().__init__(model)
        self.forward = torch.compile(model)


class Sparsetorch(Variant):
    name = "sparsetorch"
    execution = "mask"

    def __init__(self, model: nn.Module) -> None:
        super().__init__(model)
        self.sparsifier = st.sparsify(
            model,
            self.optimizer,
            policy="rigl",
            sparsity=SPARSITY,
            distribution="uniform",
            update_interval=NEVER,
            end_step=NEVER + 1,
            drop_fraction=DROP_FRACTION,
            drop_schedule="constant",
            execution=self.execution,
        )
        self.masked = sum(m.numel() for m in self.sparsifier.masks.values())

    def prepare_update(self, x: Tensor, y: Tensor) -> None:
        # Pretend the next step is an update step: the sparsifier arms the
        # dense-gradient capture exactly as it does one step before an update.
        self._saved = self.sparsifier.step_count
        self.sparsifier.step_count = NEVER - 1
        self.sparsifier._arm()
        self.optimizer.zero_grad()
        self.loss(x, y).backward()

    def update(self) -> None:
        self.sparsifier.step_count = NEVER
        self.sparsifier.update()
        self.sparsifier.step_count = self._saved
        self.sparsifier._arm()

    def roots(self) -> list[object]:
        return [*super().roots(), self.sparsifier]


class SparsetorchAuto(Sparsetorch):
    name = "sparsetorch auto"
    execution = "auto"

    def update(self) -> None:
        forwards = [
            f
            for f in (m.__dict__.get("forward") for m in self.model.modules())
            if isinstance(f, SparseExecution)
        ]
        transposed = [
            f.plan is not None and f.plan.transposed is not None for f in forwards
        ]
        super().update()
        # The compressed structure of each changed mask is rebuilt in the next
        # forward (W) and backward (W.T, where an input gradient needs it): part
        # of what an update costs in this mode.
        for forward, had_transposed in zip(forwards, transposed, strict=True):
            plan = forward._plan()
            if had_transposed:
                plan.transpose()


class SparsetorchCompiled(Sparsetorch):
    name = "sparsetorch+compile"
    compiled = True

    def __init__(self, model: nn.Module) -> None:
        super().__init__(model)
        self.forward = torch.compile(model)


class _FloatMask(nn.Module):
    """``torch.ao.pruning``'s FakeSparsity: the effective weight is ``X * mask``."""

    mask: Tensor

    def __init__(self, mask: Tensor) -> None:
        super().__init__()
        self.register_buffer("mask", mask)
        self.capturing = False
        self.dense_grad: Tensor | None = None

    def forward(self, X: Tensor) -> Tensor:
        W = X * self.mask
        if self.capturing and W.requires_grad:
            W.register_hook(self._capture)
        return W

    def _capture(self, grad: Tensor) -> None:
        self.dense_grad = grad


class MaskPass(Variant):
    """The physical limit: dense training plus one masking pass per gradient.

    The dense model with a bool mask per weight (weights zero outside it) and a
    post-accumulate-grad hook running sparsetorch's masking kernel, nothing else:
    no parametrization, no step counting, no updates.
    """

    name = "limit: dense + mask pass"

    def __init__(self, model: nn.Module) -> None:
        super().__init__(model)
        from sparsetorch.parametrization import _mask_

        generator = torch.Generator().manual_seed(0)
        self.masks: list[Tensor] = []
        for module in list(model.modules()):
            if isinstance(module, (nn.Linear, nn.Conv2d)):
                n = module.weight.numel()
                mask = torch.zeros(n, dtype=torch.bool)
                mask[torch.randperm(n, generator=generator)[: round(0.1 * n)]] = True
                mask = mask.view_as(module.weight)
                with torch.no_grad():
                    module.weight.mul_(mask)
                module.weight.register_post_accumulate_grad_hook(  # type: ignore[no-untyped-call]
                    lambda p, mask=mask: _mask_(p.grad, mask)
                )
                self.masks.append(mask)
                self.masked += n


class FloatMask(Variant):
    """Plain parametrize with a float mask, and a plain per-tensor RigL update."""

    name = "float-mask"

    def __init__(self, model: nn.Module) -> None:
        super().__init__(model)
        generator = torch.Generator().manual_seed(0)
        self.masks: list[tuple[nn.Module, _FloatMask]] = []
        for module in list(model.modules()):
            if isinstance(module, (nn.Linear, nn.Conv2d)):
                n = module.weight.numel()
                mask = torch.zeros(n)
                mask[torch.randperm(n, generator=generator)[: round(0.1 * n)]] = 1
                p = _FloatMask(mask.view_as(module.weight))
                parametrize.register_parametrization(module, "weight", p)
                self.masks.append((module, p))
                self.masked += n

    def prepare_update(self, x: Tensor, y: Tensor) -> None:
        for _, p in self.masks:
            p.capturing = True
        self.optimizer.zero_grad()
        self.loss(x, y).backward()
        for _, p in self.masks:
            p.capturing = False

    @torch.no_grad()
    def update(self) -> None:
        for module, p in self.masks:
            w: Tensor = module.parametrizations.weight.original  # type: ignore[union-attr,assignment]
            mask, flat = p.mask, p.mask.view(-1)
            n_drop = int(int(mask.sum()) * DROP_FRACTION)
            active = mask.bool()
            score = torch.where(active, w.abs(), math.inf).view(-1)
            keep = flat.clone()
            keep[torch.topk(score, n_drop, largest=False).indices] = 0
            assert p.dense_grad is not None
            grow = p.dense_grad.abs().view(-1).masked_fill(keep.bool(), -math.inf)
            new = keep.clone()
            new[torch.topk(grow, n_drop).indices] = 1
            w.view(-1).masked_fill_(new.bool() & ~flat.bool(), 0.0)  # grown: zero
            for state in self.optimizer.state[w].values():
                if isinstance(state, Tensor) and state.shape == w.shape:
                    state.mul_(new.view_as(state))
            mask.copy_(new.view_as(mask))
            p.dense_grad = None


class _DenseFirst(nn.Module):
    """A one-element layer for rigl-torch's 'uniform' to keep dense (it keeps the
    first layer dense); every real layer then gets the requested sparsity."""

    def __init__(self) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(1), requires_grad=False)


def _import_rigl_torch() -> Any:
    """rigl-torch's ``RigLScheduler``; its ``util`` imports torchvision only to
    test for ResNet blocks, so a stub stands in while it is imported."""
    version = importlib.metadata.version("rigl-torch")
    if version != RIGL_TORCH_VERSION:
        raise RuntimeError(f"rigl-torch {version} (the benchmark needs 0.5.2)")
    if "rigl_torch.RigL" in sys.modules:
        return sys.modules["rigl_torch.RigL"].RigLScheduler
    resnet = types.ModuleType("torchvision.models.resnet")
    resnet.Bottleneck = type("Bottleneck", (nn.Module,), {})  # type: ignore[attr-defined]
    resnet.BasicBlock = type("BasicBlock", (nn.Module,), {})  # type: ignore[attr-defined]
    models = types.ModuleType("torchvision.models")
    models.resnet = resnet  # type: ignore[attr-defined]
    root = types.ModuleType("torchvision")
    root.models = models  # type: ignore[attr-defined]
    stub = {"torchvision": root, "torchvision.models": models}
    stub["torchvision.models.resnet"] = resnet
    saved = {name: sys.modules.get(name) for name in stub}
    sys.modules.update(stub)
    try:
        return importlib.import_module("rigl_torch.RigL").RigLScheduler
    finally:
        for name, module in saved.items():
            if module is None:
                del sys.modules[name]
            else:
                sys.modules[name] = module


class RigLTorch(Variant):
    """rigl-torch 0.5.2, with its ``if pruner(): optimizer.step()`` protocol."""

    name = "rigl-torch"
    delta = NEVER

    def __init__(self, model: nn.Module) -> None:
        super().__init__(model)
        scheduler = _import_rigl_torch()
        holder = nn.Module()
        holder.add_module("dense_first", _DenseFirst())
        holder.add_module("model", model)
        self.pruner = scheduler(
            holder,
            self.optimizer,
            dense_allocation=1 - SPARSITY,
            T_end=NEVER * 10,
            delta=self.delta,
            alpha=DROP_FRACTION,
            sparsity_distribution="uniform",
            ignore_linear_layers=False,
        )
        self.masked = sum(
            n for n, s in zip(self.pruner.N, self.pruner.S, strict=True) if s > 0
        )

    def step(self, x: Tensor, y: Tensor) -> None:
        self.optimizer.zero_grad()
        self.loss(x, y).backward()
        if self.pruner():
            self.optimizer.step()

    def prepare_update(self, x: Tensor, y: Tensor) -> None:
        self._saved = self.pruner.step
        self.pruner.step = self.delta - 1  # its hooks accumulate the dense grads
        for hook in self.pruner.backward_hook_objects:
            if hook is not None:
                hook.dense_grad = None
        self.optimizer.zero_grad()
        self.loss(x, y).backward()

    def update(self) -> None:
        self.pruner._rigl_step()
        self.pruner.step = self._saved

    def roots(self) -> list[object]:
        return [*super().roots(), self.pruner]


VARIANTS: list[type[Variant]] = [
    MaskPass,
    Sparsetorch,
    SparsetorchAuto,
    SparsetorchCompiled,
    DenseCompiled,
    FloatMask,
    RigLTorch,
]


# -- measurements ------------------------------------------------------------------


def _tensors(roots: list[object]) -> Iterator[Tensor]:
    """Every tensor reachable from ``roots`` (and the ``.grad`` of each)."""
    seen: set[int] = set()
    stack: list[object] = list(roots)
    skip = (type, types.ModuleType, types.FunctionType, types.BuiltinFunctionType)
    while stack:
        obj = stack.pop()
        if id(obj) in seen or isinstance(obj, skip):
            continue
        seen.add(id(obj))
        if isinstance(obj, Tensor):
            yield obj
            if obj.grad is not None:
                stack.append(obj.grad)
            stack.extend(vars(obj).values())
            continue
        if isinstance(obj, (str, bytes, int, float, bool, torch.dtype)):
            continue
        stack.extend(gc.get_referents(obj))


def live_bytes(*roots: object) -> int:
    """Bytes of the distinct storages of every tensor reachable from ``roots``.

    tests/test_performance_invariants.py holds sparsetorch's persistent state to
    exact byte counts with this same measure.
    """
    storages = {}
    for t in _tensors(list(roots)):
        s = t.untyped_storage()
        storages[s.data_ptr()] = s.nbytes()
    return sum(storages.values())


def persistent_bytes(variant: Variant) -> int:
    return live_bytes(*variant.roots())


def step_peak_bytes(fn: Callable[[], None]) -> int:
    """Peak of the bytes that ``fn`` allocates and still holds, at any moment.

    From the allocator's events in the profiler's trace (each allocation and
    free, in time order); memory allocated before ``fn`` and freed by it is not
    credited, alike for every variant.
    """
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "trace.json")
        prof.export_chrome_trace(path)
        with open(path) as f:
            trace = json.load(f)
    events = sorted(
        (e["ts"], e["args"]["Bytes"])
        for e in trace["traceEvents"]
        if e.get("name") == "[memory]" and e.get("args", {}).get("Device Type") == 0
    )
    current = peak = 0
    for _, nbytes in events:
        current += nbytes
        peak = max(peak, current)
    return peak


@dataclass
class Result:
    variant: str
    step_ms: float = math.nan
    ratio: float = math.nan
    ratio_lo: float = math.nan
    ratio_hi: float = math.nan
    update_ms: float = math.nan
    update_ratio: float = math.nan
    state_bytes: float = math.nan
    peak_mib: float = math.nan
    note: str = ""


def _quartiles(values: list[float]) -> tuple[float, float, float]:
    if len(values) < 4:
        return statistics.median(values), min(values), max(values)
    q1, q2, q3 = statistics.quantiles(values, n=4)
    return q2, q1, q3


def _timed(fn: Callable[[], None]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def run_workload(
    workload: Workload, variants: list[type[Variant]], rounds: int, updates: int
) -> tuple[list[Result], list[str]]:
    torch.manual_seed(0)
    base = workload.build()
    generator = torch.Generator().manual_seed(1)
    x = torch.randn(workload.batch, *workload.input_shape, generator=generator)
    y = torch.randint(0, workload.classes, (workload.batch,), generator=generator)
    dense = Variant(copy.deepcopy(base))
    built: list[Variant] = []
    results: dict[str, Result] = {"dense": Result("dense")}
    for cls in variants:
        try:
            variant = cls(copy.deepcopy(base))
        except Exception as error:  # a peer that is not installed
            results[cls.name] = Result(cls.name, note=f"not run: {error}")
            continue
        built.append(variant)
        results[variant.name] = Result(variant.name)

    # Warm up (and compile); then persistent state and peak memory.
    for variant in [dense, *built]:
        start = time.perf_counter()
        for _ in range(3):
            variant.step(x, y)
        if variant.compiled:
            results[
                variant.name
            ].note = f"warm-up incl. compile {time.perf_counter() - start:.0f} s"
    gc.collect()
    dense_state = persistent_bytes(dense)
    dense_peak = step_peak_bytes(lambda: dense.step(x, y))
    results["dense"].state_bytes = 0.0
    results["dense"].peak_mib = 0.0
    for variant in built:
        state = persistent_bytes(variant)
        peak = step_peak_bytes(lambda v=variant: v.step(x, y))  # type: ignore[misc]
        r = results[variant.name]
        if variant.masked:
            r.state_bytes = (state - dense_state) / variant.masked
        r.peak_mib = (state + peak - dense_state - dense_peak) / 2**20

    # Ordinary steps: dense and variant blocks alternate, order flipped per round.
    def block(v: Variant) -> Callable[[], None]:
        def run() -> None:
            for _ in range(workload.block):
                v.step(x, y)

        return run

    dense_times: list[float] = []
    ratios: dict[str, list[float]] = {v.name: [] for v in built}
    times: dict[str, list[float]] = {v.name: [] for v in built}
    for round_ in range(rounds):
        for variant in built:
            pair = [dense, variant] if round_ % 2 == 0 else [variant, dense]
            t = {v.name: _timed(block(v)) / workload.block for v in pair}
            dense_times.append(t["dense"])
            times[variant.name].append(t[variant.name])
            ratios[variant.name].append(t[variant.name] / t["dense"])
    dense_step = statistics.median(dense_times)
    results["dense"].step_ms = dense_step * 1e3
    results["dense"].ratio = 1.0
    for variant in built:
        res = results[variant.name]
        res.step_ms = statistics.median(times[variant.name]) * 1e3
        res.ratio, res.ratio_lo, res.ratio_hi = _quartiles(ratios[variant.name])
    # Two variants against each other, round by round (each against its dense).
    notes = []
    for a, b in (
        ("sparsetorch+compile", "sparsetorch"),
        ("sparsetorch+compile", "dense+compile"),
    ):
        if a in ratios and b in ratios:
            per_round = [x / y for x, y in zip(ratios[a], ratios[b], strict=True)]
            mid, lo, hi = _quartiles(per_round)
            notes.append(f"step {a} / {b}: {mid:.3f} (IQR {lo:.3f}-{hi:.3f})")

    # Topology updates, each timed next to a dense step.
    for variant in built:
        if variant.compiled and any(v.name == "sparsetorch" for v in built):
            continue  # the same update code as eager
        try:
            variant.prepare_update(x, y)
        except NotImplementedError:
            continue
        variant.update()  # warm-up
        update_ratios, update_times = [], []
        for _ in range(updates):
            d = _timed(lambda: dense.step(x, y))
            # An ordinary step first, as in training (updates are steps apart):
            # the weights just grown move off their initial zeros.
            variant.step(x, y)
            variant.prepare_update(x, y)
            u = _timed(variant.update)
            update_ratios.append(u / d)
            update_times.append(u)
        res = results[variant.name]
        res.update_ms = statistics.median(update_times) * 1e3
        res.update_ratio = statistics.median(update_ratios)
    rows = [results["dense"], *(results[c.name] for c in variants if c.name in results)]
    return rows, notes


# -- report ------------------------------------------------------------------------


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def _load() -> str:
    try:
        return " ".join(f"{x:.2f}" for x in os.getloadavg())
    except OSError:
        return "n/a"


def _fmt(value: float, spec: str) -> str:
    return "-" if math.isnan(value) else format(value, spec)


def table(workload: Workload, results: list[Result]) -> str:
    lines = [
        f"{workload.name}: {workload.title}",
        "",
        "| variant | step ms | step / dense (IQR) | update ms | update / dense step "
        "| state B/weight | peak added MiB | note |",
        "|---|---:|---:|---:|---:|---:|---:|---|",
    ]
    for r in results:
        ratio = _fmt(r.ratio, ".3f")
        if not math.isnan(r.ratio_lo):
            ratio += f" ({r.ratio_lo:.3f}-{r.ratio_hi:.3f})"
        lines.append(
            f"| {r.variant} | {_fmt(r.step_ms, '.1f')} | {ratio} "
            f"| {_fmt(r.update_ms, '.1f')} | {_fmt(r.update_ratio, '.2f')} "
            f"| {_fmt(r.state_bytes, '.2f')} | {_fmt(r.peak_mib, '.1f')} | {r.note} |"
        )
    return "\n".join(lines)


def _kernel_cases(
    n: int, generator: torch.Generator
) -> dict[str, Callable[[], object]]:
    import numpy as np

    from sparsetorch.parametrization import _mask_
    from sparsetorch.policies.base import _top

    g = torch.randn(n, generator=generator)
    mask = torch.rand(n, generator=generator) < 0.1
    ones = mask.float()
    scores = torch.randn(n, generator=generator).abs()
    k = n * 3 // 100  # a RigL grow: 30% of the 10% active weights
    return {
        "grad.mul_(bool mask) (torch)": lambda: g.mul_(mask),
        "grad.mul_(mask.view(uint8)) (torch)": lambda: g.mul_(mask.view(torch.uint8)),
        "grad.mul_(float mask) (a 4 B/weight mask)": lambda: g.mul_(ones),
        "_mask_(grad, mask) (sparsetorch: numpy)": lambda: _mask_(g, mask),
        "torch.topk(scores, 3% of n)": lambda: torch.topk(scores, k, sorted=False),
        "np.argpartition(scores, 3% of n)": lambda: np.argpartition(
            scores.numpy(), n - k
        ),
        "_top(scores, 3% of n) (sparsetorch)": lambda: _top(scores, k, generator),
        "torch.randperm(n) (the old tie-breaking)": lambda: torch.randperm(
            n, generator=generator
        ),
    }


def kernels(rounds: int) -> str:
    """The kernels behind the numbers: masking a gradient and selecting a top-k.

    Median microseconds over ``rounds`` rounds (each kernel once per round, in
    turn), on ``n`` float32 values; masks at 10% density.
    """
    lines = ["| kernel | n | median us | ns / weight |", "|---|---:|---:|---:|"]
    generator = torch.Generator().manual_seed(0)
    for n in (1 << 20, 1 << 22):
        cases = _kernel_cases(n, generator)
        times: dict[str, list[float]] = {name: [] for name in cases}
        for _ in range(rounds):
            for name, fn in cases.items():
                times[name].append(_timed(fn))  # type: ignore[arg-type]
        for name, ts in times.items():
            us = statistics.median(ts) * 1e6
            lines.append(f"| {name} | {n} | {us:.0f} | {us * 1e3 / n:.2f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny models, seconds")
    parser.add_argument("--rounds", type=int, help="alternating rounds per variant")
    parser.add_argument("--updates", type=int, help="timed updates per variant")
    parser.add_argument("--threads", type=int, default=1, help="torch.set_num_threads")
    parser.add_argument("--workloads", nargs="+", help="e.g. W1 W3")
    parser.add_argument("--no-compile", action="store_true", help="skip torch.compile")
    parser.add_argument(
        "--kernels", action="store_true", help="time the masking and top-k kernels"
    )
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.kernels:
        print(f"# {' '.join(sys.argv)}; threads {args.threads}; load {_load()}\n")
        print(kernels(args.rounds or 15))
        return
    rounds = args.rounds or (3 if args.quick else 21)
    updates = args.updates or (1 if args.quick else 5)
    variants = [
        v for v in VARIANTS if not (v.compiled and (args.quick or args.no_compile))
    ]
    print(
        f"# sparsetorch benchmark: {' '.join(sys.argv)}\n"
        f"# {_cpu_model()}, {os.cpu_count()} CPUs, torch {torch.__version__}, "
        f"threads {args.threads}, rounds {rounds}, updates {updates}\n"
        f"# load average at start: {_load()}",
        flush=True,
    )
    start = time.perf_counter()
    for workload in workloads(args.quick):
        if args.workloads and workload.name not in args.workloads:
            continue
        results, notes = run_workload(workload, variants, rounds, updates)
        print("\n" + table(workload, results), flush=True)
        for note in notes:
            print(f"\n{note}", flush=True)
    print(
        f"\n# load average at end: {_load()}; "
        f"wall time {time.perf_counter() - start:.0f} s",
        flush=True,
    )


if __name__ == "__main__":
    main()
