"""Constant fan-in inference on CPU: the condensed layout against dense and CSR.

One ``nn.Linear`` layer at 90% sparsity with a constant fan-in mask (every
output unit keeps ``k = 0.1 * in_features`` inputs, drawn at random, as
``sparsify(..., structure="constant-fan-in")`` makes them), exported three
ways and timed under ``torch.inference_mode()``:

* ``dense``: ``F.linear`` with the dense (zero-filled) weight;
* ``csr``: :class:`~sparsetorch.execution.SparseLinear` (``export_sparse(...,
  execution="sparse")``);
* ``condensed``: :class:`~sparsetorch.condensed.CondensedLinear`
  (``export_sparse(..., execution="condensed")``).

SRigL (Lasby et al. 2023, arXiv 2305.02299) reports 3.4x faster online
(batch 1) CPU inference than dense for a 90% sparse constant fan-in layer.
Timing as in ``sparse_execution.py``: rounds of interleaved blocks, the order
rotating; each ratio is the median over rounds of the variant's block time
over the dense block of the same round. ``torch.set_num_threads`` is fixed
(``--threads``, default 1). Run it under the shared lock when ``uptime``
shows a low load::

    flock /tmp/sparsetorch-bench.lock python benchmarks/condensed.py
    python benchmarks/condensed.py --quick     # a seconds-long smoke run
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
from collections.abc import Callable

import torch
from torch import nn
from torch.nn import functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from sparse_execution import timed_rounds

from sparsetorch.condensed import CondensedLinear
from sparsetorch.execution import SparseLinear

#: ``(out_features, in_features)`` of the layers measured.
SHAPES = ((1024, 1024), (4096, 4096), (3072, 768), (768, 3072))
BATCHES = (1, 16, 256)


def fan_in_layer(out: int, n_in: int, sparsity: float) -> nn.Linear:
    """A seeded ``nn.Linear`` with a random constant fan-in mask baked in."""
    g = torch.Generator().manual_seed(0)
    layer = nn.Linear(n_in, out)
    k = max(1, round((1 - sparsity) * n_in))
    mask = torch.zeros(out, n_in, dtype=torch.bool)
    mask.scatter_(1, torch.rand(out, n_in, generator=g).topk(k, dim=1).indices, True)
    with torch.no_grad():
        layer.weight.mul_(mask)
    return layer


def bench(shape: tuple[int, int], batch: int, sparsity: float, rounds: int) -> str:
    out, n_in = shape
    layer = fan_in_layer(out, n_in, sparsity)
    weight, bias = layer.weight.detach(), layer.bias.detach()
    csr = SparseLinear(weight, bias)
    condensed = CondensedLinear(weight, bias)
    x = torch.randn(batch, n_in, generator=torch.Generator().manual_seed(1))
    expected = F.linear(x, weight, bias)
    for m in (csr, condensed):
        torch.testing.assert_close(m(x), expected, rtol=1e-4, atol=1e-4)
    fns: dict[str, Callable[[], object]] = {
        "dense": lambda: F.linear(x, weight, bias),
        "csr": lambda: csr(x),
        "condensed": lambda: condensed(x),
    }
    block = max(1, min(50, 2_000_000 // (batch * out * n_in // 64 + 1)))
    with torch.inference_mode():
        result = timed_rounds(fns, rounds, block)
    dense_ms = result["dense"][0]
    cells = [
        f"{r[1]:.2f} ({r[2]:.2f}-{r[3]:.2f})"
        for r in (result["csr"], result["condensed"])
    ]
    speedup = 1 / result["condensed"][1]
    return (
        f"| {out} x {n_in} | {condensed.fan_in} | {batch} | {dense_ms:.3f} | "
        f"{cells[0]} | {cells[1]} | {speedup:.2f}x |"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--sparsity", type=float, default=0.9)
    parser.add_argument("--quick", action="store_true", help="tiny sizes, 3 rounds")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    shapes: tuple[tuple[int, int], ...] = SHAPES
    batches: tuple[int, ...] = BATCHES
    rounds = args.rounds
    if args.quick:
        shapes, batches, rounds = ((64, 64),), (1, 4), 3
    print(
        f"torch {torch.__version__}, {platform.processor() or platform.machine()}, "
        f"{torch.get_num_threads()} thread(s), {args.sparsity:.0%} sparsity, "
        f"{rounds} rounds\n"
    )
    print(
        "| layer (out x in) | fan-in k | batch | dense ms | CSR / dense (IQR) "
        "| condensed / dense (IQR) | condensed speed-up over dense |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|")
    for shape in shapes:
        for batch in batches:
            print(bench(shape, batch, args.sparsity, rounds), flush=True)


if __name__ == "__main__":
    main()
