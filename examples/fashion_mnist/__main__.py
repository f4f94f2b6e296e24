"""``python examples/fashion_mnist [flags]``: see :mod:`fashion_mnist`."""

import sys
from pathlib import Path

if not __package__:  # run as a folder: import the package from examples/
    sys.path[0] = str(Path(__file__).resolve().parent.parent)

from fashion_mnist.cli import main

sys.exit(main())
