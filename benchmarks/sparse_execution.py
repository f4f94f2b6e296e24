"""Sparse execution against dense and mask-mode compute, on CPU, in one process.

Three measurements (``docs/sparse_execution.md`` shows their tables):

* ``train``: the acceptance workload: 4 x ``nn.Linear(2048, 2048)`` (ReLU
  between), batch 128, RigL at 98% sparsity, SGD with momentum 0.9. Variants:
  ``dense`` (no sparsetorch), and ``sparsify(..., execution=...)`` with
  ``"mask"``, ``"sparse"`` and ``"auto"``. An ordinary step is ``zero_grad``,
  forward, MSE loss, backward, ``optimizer.step()``; an update step (every
  ``UPDATE_INTERVAL`` steps) also computes the dense gradient and runs the
  RigL update, and is reported apart.
* ``infer``: the same model at 95% and 98% sparsity, exported with
  ``export_sparse`` (every layer sparse) against the dense model, under
  ``torch.inference_mode()``, at batch 1 and 128.
* ``memory``: the persistent state sparse mode adds to the 98% model: the
  compressed structure and the gradient buffer kept between steps.
* ``profile``: where the time of a 98%-sparse training step goes (self CPU
  time per op, ``torch.profiler``), dense against sparse.
* ``grid``: one layer of each size and density (1%, 2%, 5%, 10%, 20%) at
  ``--batch`` rows (128): a training step (forward, backward with an input
  gradient, SGD step) in mask, sparse and auto mode, and an inference forward
  (dense ``F.linear`` against :class:`~sparsetorch.execution.SparseLinear`),
  each as a ratio to dense. It locates the crossovers behind
  ``execution="auto"`` (``AUTO_RULES``), prints what ``auto`` chose next to
  the measured winner, and auto's time over mask mode's.

Timing: rounds of interleaved blocks (``dense``, then each variant, the order
rotating every round); each variant's ratio is the median over rounds of its
block time over the dense block of the same round, so load drifting during the
run cancels. ``torch.set_num_threads`` is fixed (``--threads``, default 1).
Run every timing under the shared lock, and only when ``uptime`` shows a low
load::

    flock /tmp/sparsetorch-bench.lock python benchmarks/sparse_execution.py
    flock /tmp/sparsetorch-bench.lock python benchmarks/sparse_execution.py train
    python benchmarks/sparse_execution.py --quick      # a seconds-long smoke run
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import time
import warnings
from collections.abc import Callable

import torch
from torch import nn

import sparsetorch as st
from sparsetorch.execution import (
    SparseExecution,
    SparseLinear,
    _choose_kernels,
    export_sparse,
    sparse_is_faster,
)

UPDATE_INTERVAL = 25
DENSITIES = (0.01, 0.02, 0.05, 0.10, 0.20)
SIZES = ((512, 512), (1024, 1024), (2048, 2048), (4096, 1024), (1024, 4096))

warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta")


def timed_rounds(
    fns: dict[str, Callable[[], object]], rounds: int, block: int
) -> dict[str, tuple[float, float, float, float]]:
    """``name -> (median ms per call, median ratio to dense, ratio q1, q3)``.

    ``fns`` must hold ``"dense"``. Every round times a block of ``block`` calls
    of each function, the order rotating every round.
    """
    names = list(fns)
    times: dict[str, list[float]] = {n: [] for n in names}
    ratios: dict[str, list[float]] = {n: [] for n in names}
    for f in fns.values():  # warm up: allocator, plans, MKL handles
        f()
        f()
    for r in range(rounds):
        order = names[r % len(names) :] + names[: r % len(names)]
        block_times = {}
        for name in order:
            start = time.perf_counter()
            for _ in range(block):
                fns[name]()
            block_times[name] = (time.perf_counter() - start) / block
        for name in names:
            times[name].append(block_times[name])
            ratios[name].append(block_times[name] / block_times["dense"])
    out = {}
    for name in names:
        q = statistics.quantiles(ratios[name], n=4) if rounds > 1 else [0, 0, 0]
        out[name] = (
            statistics.median(times[name]) * 1e3,
            statistics.median(ratios[name]),
            q[0],
            q[2],
        )
    return out


def mlp(width: int, depth: int) -> nn.Sequential:
    torch.manual_seed(0)
    layers: list[nn.Module] = []
    for i in range(depth):
        layers.append(nn.Linear(width, width))
        if i < depth - 1:
            layers.append(nn.ReLU())
    return nn.Sequential(*layers)


def sgd_mlp(
    width: int, depth: int, static_sparsity: float | None = None
) -> tuple[nn.Sequential, torch.optim.Optimizer]:
    """``mlp(width, depth)`` and its SGD (momentum 0.9).

    With ``static_sparsity``: sparsified by the static policy, in
    ``execution="sparse"``.
    """
    model = mlp(width, depth)
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)
    if static_sparsity is not None:
        st.sparsify(
            model,
            optimizer,
            policy="static",
            sparsity=static_sparsity,
            distribution="uniform",
            execution="sparse",
        )
    return model, optimizer


def train_step(
    model: nn.Module, optimizer: torch.optim.Optimizer, x: torch.Tensor
) -> Callable[[], None]:
    target = torch.zeros(x.shape[0], model[-1].out_features)

    def step() -> None:
        optimizer.zero_grad()
        nn.functional.mse_loss(model(x), target).backward()
        optimizer.step()

    return step


def bench_train(
    width: int, depth: int, batch: int, sparsity: float, rounds: int
) -> None:
    x = torch.randn(batch, width, generator=torch.Generator().manual_seed(1))
    steps: dict[str, Callable[[], None]] = {}
    update_steps: dict[str, list[float]] = {}
    for variant in ("dense", "mask", "sparse", "auto"):
        model, optimizer = sgd_mlp(width, depth)
        if variant != "dense":
            sparsifier = st.sparsify(
                model,
                optimizer,
                policy="rigl",
                sparsity=sparsity,
                distribution="uniform",
                total_steps=10**9,
                update_interval=UPDATE_INTERVAL,
                execution=variant,
            )
            step = train_step(model, optimizer, x)
            update_steps[variant] = []

            def counted(
                step: Callable[[], None] = step,
                sparsifier: st.Sparsifier = sparsifier,
                variant: str = variant,
            ) -> None:
                # Update steps (dense gradient + RigL update) are timed apart:
                # run them outside the timed blocks.
                while (sparsifier.step_count + 1) % UPDATE_INTERVAL == 0:
                    start = time.perf_counter()
                    step()
                    update_steps[variant].append(time.perf_counter() - start)
                step()

            steps[variant] = counted
        else:
            steps[variant] = train_step(model, optimizer, x)
    result = timed_rounds(steps, rounds, block=3)
    print(
        f"\n### Training step: {depth} x Linear({width}, {width}), batch {batch}, "
        f"RigL at {sparsity:.0%} sparsity, SGD momentum\n"
    )
    print("| execution | step ms | step / dense (IQR) | update step ms |")
    print("|---|---:|---:|---:|")
    for name, (ms, ratio, q1, q3) in result.items():
        ups = update_steps.get(name)
        up = f"{statistics.median(ups) * 1e3:.1f}" if ups else "-"
        print(f"| {name} | {ms:.1f} | {ratio:.3f} ({q1:.3f}-{q3:.3f}) | {up} |")


def bench_infer(
    width: int, depth: int, sparsities: tuple[float, ...], rounds: int
) -> None:
    print(
        f"\n### Inference: {depth} x Linear({width}, {width}), exported with "
        "export_sparse(execution='sparse'), torch.inference_mode()\n"
    )
    print("| sparsity | batch | dense ms | exported ms | exported / dense (IQR) |")
    print("|---:|---:|---:|---:|---:|")
    for sparsity in sparsities:
        dense = mlp(width, depth).eval()
        model = mlp(width, depth)
        st.sparsify(model, policy="static", sparsity=sparsity, distribution="uniform")
        exported = export_sparse(model, execution="sparse")
        for batch in (1, 128):
            x = torch.randn(batch, width, generator=torch.Generator().manual_seed(1))

            def run(m: nn.Module = dense, x: torch.Tensor = x) -> None:
                with torch.inference_mode():
                    m(x)

            def run_sparse(m: nn.Module = exported, x: torch.Tensor = x) -> None:
                with torch.inference_mode():
                    m(x)

            res = timed_rounds({"dense": run, "exported": run_sparse}, rounds, 5)
            _, ratio, q1, q3 = res["exported"]
            print(
                f"| {sparsity:.0%} | {batch} | {res['dense'][0]:.2f} | "
                f"{res['exported'][0]:.2f} | {ratio:.3f} ({q1:.3f}-{q3:.3f}) |"
            )


def bench_memory(width: int, depth: int, sparsity: float) -> None:
    """Persistent state sparse mode adds, after two training steps."""
    model, optimizer = sgd_mlp(width, depth, sparsity)
    x = torch.randn(128, width)
    for _ in range(2):
        train_step(model, optimizer, x)()
    plan_bytes = buffer_bytes = active = numel = 0
    for module in model.modules():
        forward = module.__dict__.get("forward")
        if isinstance(forward, SparseExecution) and forward.plan is not None:
            plan = forward.plan
            plan_bytes += sum(
                t.numel() * t.element_size()
                for t in (plan.index, plan.crow, plan.col, *(plan.transposed or ()))
            )
            flat = forward.grad_buffer.flat
            buffer_bytes += 0 if flat is None else flat.numel() * flat.element_size()
            active += plan.nnz
            numel += plan.shape[0] * plan.shape[1]
    print(
        f"\n### Memory: {depth} x Linear({width}, {width}) at {sparsity:.0%} "
        "sparsity, execution='sparse'\n"
    )
    print("| state | bytes | per active weight | per weight |")
    print("|---|---:|---:|---:|")
    print(
        f"| compressed structure | {plan_bytes} | {plan_bytes / active:.1f} "
        f"| {plan_bytes / numel:.2f} |"
    )
    print(
        f"| gradient buffer kept between steps | {buffer_bytes} "
        f"| {buffer_bytes / active:.1f} | {buffer_bytes / numel:.2f} |"
    )
    print(f"| (the masks, for scale) | {numel} | {numel / active:.1f} | 1.00 |")


def bench_profile(width: int, depth: int, batch: int, sparsity: float) -> None:
    """Where a training step's time goes, dense against sparse (torch.profiler)."""
    from torch.profiler import profile

    x = torch.randn(batch, width, generator=torch.Generator().manual_seed(1))
    per_step: dict[str, dict[str, float]] = {}
    steps = 5
    for variant in ("dense", "sparse"):
        model, optimizer = sgd_mlp(
            width, depth, sparsity if variant == "sparse" else None
        )
        step = train_step(model, optimizer, x)
        for _ in range(3):
            step()
        with profile() as prof:
            for _ in range(steps):
                step()
        per_step[variant] = {
            e.key: e.self_cpu_time_total / steps / 1e3 for e in prof.key_averages()
        }
    print(
        f"\n### Profile of a training step: {depth} x Linear({width}, {width}), "
        f"batch {batch}, {sparsity:.0%} sparsity (self CPU ms per step)\n"
    )
    print("| op | dense | sparse |")
    print("|---|---:|---:|")
    keys = sorted(
        set(per_step["dense"]) | set(per_step["sparse"]),
        key=lambda k: -max(per_step["dense"].get(k, 0), per_step["sparse"].get(k, 0)),
    )
    for key in keys[:14]:
        print(
            f"| {key} | {per_step['dense'].get(key, 0):.1f} "
            f"| {per_step['sparse'].get(key, 0):.1f} |"
        )
    print(
        f"| total | {sum(per_step['dense'].values()):.1f} "
        f"| {sum(per_step['sparse'].values()):.1f} |"
    )


def layer_train_step(
    out_f: int, in_f: int, density: float | None, batch: int, execution: str
) -> Callable[[], None]:
    torch.manual_seed(0)
    layer = nn.Linear(in_f, out_f)
    optimizer = torch.optim.SGD(layer.parameters(), lr=1e-3, momentum=0.9)
    if density is not None:
        st.sparsify(
            layer,
            optimizer,
            policy="static",
            sparsity=1 - density,
            execution=execution,
        )
    x = torch.randn(batch, in_f, requires_grad=True)
    grad = torch.randn(batch, out_f)

    def step() -> None:
        optimizer.zero_grad()
        x.grad = None
        layer(x).backward(grad)
        optimizer.step()

    return step


def layer_infer(
    out_f: int, in_f: int, density: float | None, batch: int
) -> Callable[[], None]:
    torch.manual_seed(0)
    weight = torch.randn(out_f, in_f)
    bias = torch.randn(out_f)
    if density is not None:
        weight *= torch.rand(out_f, in_f) < density
    layer: nn.Module = nn.Linear(in_f, out_f)
    if density is not None:
        layer = SparseLinear(weight, bias)
    x = torch.randn(batch, in_f)

    def forward() -> None:
        with torch.inference_mode():
            layer(x)

    return forward


def bench_grid(
    sizes: tuple[tuple[int, int], ...],
    densities: tuple[float, ...],
    batch: int,
    rounds: int,
) -> None:
    print(
        f"\n### One layer, batch {batch}: time / dense time "
        "(training step; inference forward)\n"
    )
    print(
        "| out x in | density | train mask | train sparse | train auto "
        "| auto / mask | auto (train) | infer sparse | auto (infer) |"
    )
    print("|---|---:|---:|---:|---:|---:|---|---:|---|")
    for out_f, in_f in sizes:
        for density in densities:
            train = timed_rounds(
                {
                    "dense": layer_train_step(out_f, in_f, None, batch, "mask"),
                    "mask": layer_train_step(out_f, in_f, density, batch, "mask"),
                    "sparse": layer_train_step(out_f, in_f, density, batch, "sparse"),
                    "auto": layer_train_step(out_f, in_f, density, batch, "auto"),
                },
                rounds,
                block=3,
            )
            infer = timed_rounds(
                {
                    "dense": layer_infer(out_f, in_f, None, batch),
                    "sparse": layer_infer(out_f, in_f, density, batch),
                },
                rounds,
                block=5,
            )
            nnz = round(density * out_f * in_f)
            kernels = _choose_kernels(
                out_f, in_f, nnz, batch, training=True, device="cpu"
            )
            auto_infer = sparse_is_faster(out_f, in_f, nnz, batch, training=False)
            t_mask, t_sparse = train["mask"][1], train["sparse"][1]
            t_auto, i_sparse = train["auto"][1], infer["sparse"][1]
            print(
                f"| {out_f}x{in_f} | {density:.0%} | {t_mask:.2f} | {t_sparse:.2f} "
                f"| {t_auto:.2f} | {t_auto / t_mask:.2f} "
                f"| {_train_choice(kernels, t_sparse < t_mask)} | {i_sparse:.2f} "
                f"| {_choice(auto_infer, i_sparse < 1)} |"
            )


def _train_choice(kernels: str, sparse_won: bool) -> str:
    if kernels == "products":
        return kernels  # sparse forward and input gradient: see auto / mask
    return _choice(kernels == "sparse", sparse_won)


def _choice(auto_sparse: bool, sparse_won: bool) -> str:
    chosen = "sparse" if auto_sparse else "mask"
    return chosen if auto_sparse == sparse_won else f"{chosen} (measured: other)"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "what",
        nargs="*",
        default=["train", "infer", "grid", "memory"],
        help="train infer grid memory profile (profile is not in the default)",
    )
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument(
        "--sizes", help="grid layer sizes, e.g. 1024x1024,4096x1024 (default: all)"
    )
    parser.add_argument(
        "--densities", help="grid densities, e.g. 0.02,0.1 (default: 1%%..20%%)"
    )
    parser.add_argument("--quick", action="store_true", help="tiny sizes, 3 rounds")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(
        f"torch {torch.__version__}, {platform.processor() or platform.machine()}, "
        f"{args.threads} thread(s), load average {os.getloadavg()[0]:.2f}"
    )
    width, sizes, densities, rounds = 2048, SIZES, DENSITIES, args.rounds
    if args.sizes:
        sizes = tuple(
            (int(o), int(i)) for o, i in (s.split("x") for s in args.sizes.split(","))
        )
    if args.densities:
        densities = tuple(float(d) for d in args.densities.split(","))
    if args.quick:
        width, sizes, densities, rounds = 256, ((256, 256),), (0.05,), 3
    for what in args.what:
        if what == "train":
            bench_train(width, 4, args.batch, 0.98, rounds)
        elif what == "infer":
            bench_infer(width, 4, (0.95, 0.98), rounds)
        elif what == "profile":
            bench_profile(width, 4, args.batch, 0.98)
        elif what == "memory":
            bench_memory(width, 4, 0.98)
        elif what == "grid":
            bench_grid(sizes, densities, args.batch, rounds)
        else:
            parser.error(
                f"unknown measurement {what!r}: pick train, infer, grid, memory, "
                "profile"
            )


if __name__ == "__main__":
    main()
