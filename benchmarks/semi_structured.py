"""2:4 masks on a GPU: ``to_sparse_semi_structured`` against dense, one process.

A ``nn.Linear`` sparsified with ``sparsify(..., structure="2:4")``, baked with
``sparsifier.remove()``, its weight converted with
``torch.sparse.to_sparse_semi_structured`` (NVIDIA's sparse tensor cores,
Ampere or newer), timed against the same dense fp16 layer: interleaved blocks,
the order rotating, medians of per-round ratios (as ``sparse_execution.py``).
Outputs are checked against the dense layer first. Needs CUDA; run by
``scripts/gpu_check.sh``::

    python benchmarks/semi_structured.py
"""

from __future__ import annotations

import argparse
import functools
import statistics
import time

import torch
from torch import nn
from torch.nn import functional as F

import sparsetorch as st

SHAPES = ((4096, 4096), (11008, 4096), (4096, 11008))
BATCHES = (16, 256, 4096)


def timed(fns: dict[str, object], rounds: int, block: int) -> dict[str, float]:
    """``name -> median over rounds of block time / dense block time``."""
    names = list(fns)
    ratios: dict[str, list[float]] = {n: [] for n in names}
    ms: dict[str, list[float]] = {n: [] for n in names}
    for f in fns.values():
        f()  # type: ignore[operator]
    for r in range(rounds):
        order = names[r % len(names) :] + names[: r % len(names)]
        times = {}
        for name in order:
            torch.cuda.synchronize()
            start = time.perf_counter()
            for _ in range(block):
                fns[name]()  # type: ignore[operator]
            torch.cuda.synchronize()
            times[name] = (time.perf_counter() - start) / block
        for name in names:
            ratios[name].append(times[name] / times["dense"])
            ms[name].append(times[name] * 1e3)
    return {n: statistics.median(ratios[n]) for n in names} | {
        "dense_ms": statistics.median(ms["dense"])
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=10)
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("benchmarks/semi_structured.py needs a CUDA device.")
    from torch.sparse import to_sparse_semi_structured

    print(f"torch {torch.__version__}, {torch.cuda.get_device_name()}, fp16\n")
    print("| layer (out x in) | batch | dense ms | 2:4 / dense | max abs diff |")
    print("|---|---:|---:|---:|---:|")
    for out, n_in in SHAPES:
        torch.manual_seed(0)
        layer = nn.Linear(n_in, out, bias=False).half().cuda()
        sparsifier = st.sparsify(
            layer,
            policy="static",
            structure="2:4",
            sparsity=0.5,
            distribution="uniform",
        )
        sparsifier.remove()
        weight = layer.weight.detach()
        sparse = to_sparse_semi_structured(weight)
        for batch in BATCHES:
            x = torch.randn(batch, n_in, dtype=torch.half, device="cuda")
            with torch.inference_mode():
                dense_y = F.linear(x, weight)
                sparse_y = F.linear(x, sparse)
                diff = float((dense_y - sparse_y).abs().max())
                result = timed(
                    {
                        "dense": functools.partial(F.linear, x, weight),
                        "2:4": functools.partial(F.linear, x, sparse),
                    },
                    args.rounds,
                    block=20,
                )
            print(
                f"| {out} x {n_in} | {batch} | {result['dense_ms']:.3f} | "
                f"{result['2:4']:.3f} | {diff:.3g} |",
                flush=True,
            )


if __name__ == "__main__":
    main()
