#!/usr/bin/env bash
# Every check that needs a CUDA device, in one run of a few minutes (run it the
# first time a GPU is lent; commit its output as docs/results/gpu_check.txt):
#   1. the tests marked `cuda` (skipped on CPU-only machines), among them the
#      2:4 export through torch.sparse.to_sparse_semi_structured
#      (tests/test_structure.py),
#   2. AMP fp16 with GradScaler, sparse execution against mask mode, and the
#      step-time table against dense (benchmarks/cuda_check.py),
#   3. the speed of 2:4 weights against dense (benchmarks/semi_structured.py).
set -euo pipefail
cd "$(dirname "$0")/.."
if [ ! -x .venv/bin/python ]; then
  python3 -m venv .venv
  .venv/bin/pip install -q --disable-pip-version-check -e ".[test]"  # CUDA torch
fi
.venv/bin/python -c "import torch; assert torch.cuda.is_available(), 'no CUDA device'; print(torch.__version__, torch.cuda.get_device_name())"
.venv/bin/python -m pytest -q -m cuda -p no:cacheprovider tests
timeout 420 .venv/bin/python benchmarks/cuda_check.py --device cuda
timeout 120 .venv/bin/python benchmarks/semi_structured.py
