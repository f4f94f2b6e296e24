#!/usr/bin/env bash
# Install everything on a fresh machine and run every check: ruff, mypy --strict, pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ ! -d /usr/share/datasets/fashion-mnist ] && command -v apt-get >/dev/null \
    && [ "$(id -u)" = 0 ]; then
  # Real data for the main job's test (Debian package, offline afterwards).
  apt-get update -qq && apt-get install -y -qq dataset-fashion-mnist >/dev/null
fi
python3 -m venv .venv
.venv/bin/pip install -q --disable-pip-version-check -c constraints.txt -e ".[test,examples]"
.venv/bin/ruff check .
.venv/bin/ruff format --check .
.venv/bin/mypy --strict sparsetorch
.venv/bin/python -m pytest -q "$@"
