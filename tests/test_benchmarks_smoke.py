"""``benchmarks/bench.py --quick`` runs and prints its tables (no timing asserted)."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parents[1] / "benchmarks" / "bench.py"


def test_quick_benchmark_prints_a_table_per_workload() -> None:
    done = subprocess.run(
        [sys.executable, str(BENCH), "--quick"],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    out = done.stdout
    header = (
        "| variant | step ms | step / dense (IQR) | update ms | update / dense step "
        "| state B/weight | peak added MiB | note |"
    )
    assert out.count(header) == 3
    rows: dict[tuple[str, str], list[str]] = {}
    workload = ""
    for line in out.splitlines():
        if re.match(r"W\d: ", line):
            workload = line.split(":")[0]
        elif line.startswith("| ") and not line.startswith("| variant"):
            cells = [c.strip() for c in line.strip("|").split("|")]
            rows[(workload, cells[0])] = cells
    for w in ("W1", "W2", "W3"):
        assert rows[(w, "dense")][2] == "1.000"
        sparse = rows[(w, "sparsetorch")]
        assert float(sparse[1]) > 0 and float(sparse[3]) > 0  # step and update ran
        # Persistent state: the bool mask, one byte per masked weight, exactly;
        # the float-mask peer holds a float32 mask.
        assert sparse[5] == "1.00"
        assert rows[(w, "float-mask")][5] == "4.00"
        peer = rows[(w, "rigl-torch")]
        assert peer[5] == "1.00" or peer[7].startswith("not run:")


def test_cuda_check_runs_on_the_cpu_in_quick_mode() -> None:
    """``scripts/gpu_check.sh``'s script, so it does not rot between GPU runs."""
    script = BENCH.parent / "cuda_check.py"
    done = subprocess.run(
        [sys.executable, str(script), "--device", "cpu", "--quick"],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    lines = done.stdout.splitlines()
    assert lines[1] == (
        "amp fp16 + GradScaler on cpu: 6 steps, 3 updates, invariants held after "
        "every step"
    )
    assert lines[2].startswith("sparse execution on cpu: max |output diff| ")
    assert lines[3] == "workload                   dense ms  sparse ms  ratio"
    assert [line.split()[0] for line in lines[4:]] == ["MLP", "TransformerEncoderLayer"]
