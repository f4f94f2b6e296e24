#!/usr/bin/env bash
# The main job on a fresh machine: install what the Fashion-MNIST example needs
# (the Debian data package when missing, a venv with sparsetorch and its examples
# extra, torch pinned by constraints.txt), then run it. Arguments go to
# examples/fashion_mnist.py, e.g.
#   bash examples/fashion_mnist.sh            # the default sweep (~10 min on 2 cores)
#   bash examples/fashion_mnist.sh --quick    # smoke test (< 1 min)
#   bash examples/fashion_mnist.sh --peer --out docs/results --report docs/results.md
set -euo pipefail
cd "$(dirname "$0")/.."

data=/usr/share/datasets/fashion-mnist
if [[ -z "${SPARSETORCH_DATA:-}" && ! -f "$data/t10k-labels-idx1-ubyte.gz" ]] \
    && [[ " $* " != *" --data-dir "* ]] && command -v apt-get >/dev/null; then
    sudo=""
    if [[ "$(id -u)" != 0 ]] && command -v sudo >/dev/null; then sudo="sudo"; fi
    { $sudo apt-get update -qq && $sudo apt-get install -y -qq dataset-fashion-mnist; } \
        || echo "note: apt-get could not install dataset-fashion-mnist;" \
            "the example will look elsewhere and say what to do" >&2
fi

[[ -x .venv/bin/python ]] || python3 -m venv .venv
pip=(.venv/bin/pip install -q --disable-pip-version-check -c constraints.txt)
"${pip[@]}" -e ".[examples]"
if [[ " $* " == *" --peer "* || " $* " == *"rigl-torch"* ]]; then
    "${pip[@]}" --no-deps rigl-torch==0.5.2
fi
exec .venv/bin/python examples/fashion_mnist.py "$@"
