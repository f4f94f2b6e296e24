"""The checks that need a GPU, in one run: AMP fp16 with GradScaler, sparse
execution against mask mode, and the step-time table against dense.

Run by ``scripts/gpu_check.sh`` on a CUDA machine; ``--device cpu --quick`` runs
the same code in seconds (``tests/test_benchmarks_smoke.py``), so that it does
not rot between the rare runs on a GPU. Timings are medians of interleaved
rounds, reported as ratios to dense training in the same process.

    python benchmarks/cuda_check.py            # on a CUDA device, ~2-4 minutes
    python benchmarks/cuda_check.py --device cpu --quick
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch
from torch import nn

import sparsetorch as st


def check_amp_grad_scaler(device: torch.device, steps: int) -> str:
    """RigL under fp16 autocast with a GradScaler: invariants after every step."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 10)).to(device)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    sparsifier = st.sparsify(
        model, optimizer, sparsity=0.9, total_steps=4 * steps, update_interval=2
    )
    amp = device.type == "cuda"
    scaler = torch.amp.GradScaler(device.type, enabled=amp)
    for _ in range(steps):
        x = torch.randn(32, 64, device=device)
        y = torch.randint(0, 10, (32,), device=device)
        optimizer.zero_grad()
        with torch.autocast(device.type, dtype=torch.float16, enabled=amp):
            loss = nn.functional.cross_entropy(model(x), y)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
        for fqn, mask in sparsifier.masks.items():
            param = sparsifier.topology.params[fqn]
            assert mask.device == param.device
            assert int(mask.sum()) == sparsifier.topology.targets[fqn], fqn
            assert int(param[~mask].count_nonzero()) == 0, fqn
            for value in optimizer.state[param].values():
                if isinstance(value, torch.Tensor) and value.shape == param.shape:
                    assert int(value[~mask].count_nonzero()) == 0, fqn
    return (
        f"amp fp16 + GradScaler on {device}: {sparsifier.step_count} steps, "
        f"{sparsifier.update_count} updates, invariants held after every step"
    )


def check_sparse_execution(device: torch.device) -> str:
    """``execution="sparse"`` agrees with mask mode (forward and gradients)."""
    torch.manual_seed(0)
    mask_model = nn.Sequential(nn.Linear(256, 256), nn.ReLU(), nn.Linear(256, 10))
    mask_model = mask_model.to(device)
    sparse_model = nn.Sequential(nn.Linear(256, 256), nn.ReLU(), nn.Linear(256, 10))
    sparse_model = sparse_model.to(device)
    sparse_model.load_state_dict(mask_model.state_dict())
    a = st.sparsify(mask_model, policy="static", sparsity=0.95, seed=1)
    b = st.sparsify(sparse_model, policy="static", sparsity=0.95, seed=1)
    b.set_execution("sparse")
    x = torch.randn(64, 256, device=device)
    out_a, out_b = mask_model(x), sparse_model(x)
    out_a.square().mean().backward()
    out_b.square().mean().backward()
    error = float((out_a - out_b).detach().abs().max())
    grad_error = max(
        float((pa.grad - pb.grad).abs().max())  # type: ignore[operator]
        for pa, pb in zip(
            a.topology.params.values(), b.topology.params.values(), strict=True
        )
    )
    assert error < 1e-4 and grad_error < 1e-4, (error, grad_error)
    return (
        f"sparse execution on {device}: max |output diff| {error:.2e}, "
        f"max |grad diff| {grad_error:.2e}"
    )


def _median_ms(step: Callable[[], None], device: torch.device, n: int) -> float:
    times = []
    for _ in range(n):
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        step()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return 1e3 * statistics.median(times)


def step_time_table(device: torch.device, quick: bool) -> str:
    """Training step time of sparsetorch (mask mode, RigL 90%) against dense."""
    width, batch, rounds, steps = (64, 16, 2, 1) if quick else (4096, 256, 11, 20)
    builders: dict[str, Callable[[], nn.Module]] = {
        f"MLP {width}x{width}x3": lambda: nn.Sequential(
            nn.Linear(width, width),
            nn.ReLU(),
            nn.Linear(width, width),
            nn.ReLU(),
            nn.Linear(width, width),
        ),
        "TransformerEncoderLayer": lambda: nn.TransformerEncoderLayer(
            d_model=width // 4 if quick else 1024, nhead=4, batch_first=True
        ),
    }
    lines = ["workload                   dense ms  sparse ms  ratio"]
    for name, build in builders.items():
        runs = {}
        for variant in ("dense", "sparse"):
            torch.manual_seed(0)
            model = build().to(device)
            optimizer = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)
            if variant == "sparse":
                st.sparsify(model, optimizer, sparsity=0.9, total_steps=10**6)
            is_mlp = isinstance(model, nn.Sequential)
            features = width if is_mlp else (width // 4 if quick else 1024)
            shape = (batch, features) if is_mlp else (batch // 8 or 1, 64, features)
            x = torch.randn(*shape, device=device)

            def step(model: nn.Module = model, optimizer=optimizer, x=x) -> None:
                optimizer.zero_grad()
                model(x).float().square().mean().backward()
                optimizer.step()

            step()  # warm-up
            runs[variant] = (step, [])
        for _ in range(rounds):  # interleaved
            for step, times in runs.values():
                times.append(_median_ms(step, device, steps))
        dense = statistics.median(runs["dense"][1])
        sparse = statistics.median(runs["sparse"][1])
        lines.append(f"{name:<25}  {dense:8.2f}  {sparse:9.2f}  {sparse / dense:5.2f}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--quick", action="store_true", help="tiny sizes, seconds")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("No CUDA device: run with --device cpu for the smoke run.")
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    print(f"# cuda_check on {name}, torch {torch.__version__}")
    print(check_amp_grad_scaler(device, steps=6 if args.quick else 40))
    print(check_sparse_execution(device))
    print(step_time_table(device, args.quick))


if __name__ == "__main__":
    main()
