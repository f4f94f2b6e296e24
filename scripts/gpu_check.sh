#!/usr/bin/env bash
# Every check that needs a CUDA device, in one run of a few minutes (run it the
# first time a GPU is lent; commit its output as docs/results/gpu_check.txt):
#   1. the tests marked `cuda` (skipped on CPU-only machines), among them the
#      2:4 export through torch.sparse.to_sparse_semi_structured
#      (tests/test_structure.py),
#   2. AMP fp16 with GradScaler, sparse execution against mask mode, and the
#      step-time table against dense (benchmarks/cuda_check.py),
#   3. the speed of 2:4 weights against dense (benchmarks/semi_structured.py).
#
# The device machines have no network: they run their own python3 (CUDA torch,
# pytest, hypothesis, numpy) with this checkout on PYTHONPATH. expecttest is not
# there: carry it as a wheel in .whl/ (gitignored via .git/info/exclude):
#   python3 -m pip download --no-deps --only-binary=:all: -d .whl expecttest==0.3.0
# and name .whl in the run tool's carry list.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ -d .whl ]; then
  $PY -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl
  export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
$PY -c "import torch; assert torch.cuda.is_available(), 'no CUDA device'; print(torch.__version__, torch.cuda.get_device_name())"
$PY -m pytest -q -m cuda -p no:cacheprovider tests
timeout 420 $PY benchmarks/cuda_check.py --device cuda
timeout 120 $PY benchmarks/semi_structured.py
