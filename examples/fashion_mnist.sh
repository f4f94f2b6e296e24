#!/usr/bin/env bash
# The main job on a fresh machine: install what the Fashion-MNIST example needs
# (the Debian data package when missing, a venv with sparsetorch and its examples
# extra, torch pinned by constraints.txt), then run it. Arguments go to the
# application in examples/fashion_mnist/ (see its __init__.py, or --help), e.g.
#   bash examples/fashion_mnist.sh            # the default run (~10 min on 2 cores)
#   bash examples/fashion_mnist.sh --quick    # smoke test (< 1 min)
#   bash examples/fashion_mnist.sh --full --out docs/results --report docs/results.md
set -euo pipefail
cd "$(dirname "$0")/.."

if [[ -z "${SPARSETORCH_DATA:-}" && " $* " != *" --data-dir "* ]]; then
    bash scripts/install_fashion_mnist.sh
fi

[[ -x .venv/bin/python ]] || python3 -m venv .venv
pip=(.venv/bin/pip install -q --disable-pip-version-check -c constraints.txt)
"${pip[@]}" -e ".[examples]"
if [[ " $* " == *" --peer "* || " $* " == *"rigl-torch"* ]]; then
    "${pip[@]}" --no-deps rigl-torch==0.5.2
fi
exec .venv/bin/python examples/fashion_mnist "$@"
