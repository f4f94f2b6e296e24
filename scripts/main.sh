#!/usr/bin/env bash
# Install everything on a fresh machine and run sparsetorch's main job.
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m venv .venv
.venv/bin/pip install -q --disable-pip-version-check -c constraints.txt -e ".[examples]"
.venv/bin/python examples/quickstart.py "$@"
