#!/usr/bin/env bash
# Install everything on a fresh machine and run every check: ruff, mypy --strict, pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install_fashion_mnist.sh  # real data for the main job's test
python3 -m venv .venv
.venv/bin/pip install -q --disable-pip-version-check -c constraints.txt -e ".[test,examples,lightning,transformers]"
.venv/bin/ruff check .
.venv/bin/ruff format --check .
.venv/bin/mypy --strict sparsetorch
.venv/bin/python -m pytest -q "$@"
