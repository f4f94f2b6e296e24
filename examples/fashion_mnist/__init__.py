"""The main job: sparse training on Fashion-MNIST, the RigL paper's comparison.

Dense, static, SET, SNFS, RigL, SNIP and GMP at 90% and 98% sparsity (ERK, 3
seeds) on LeNet-300-100 by default (about 10 minutes on 2 CPU cores); ``--full``
adds RigL 2x/5x (the same recipe for 2x/5x the steps), 2:4 and constant-fan-in
RigL beside unstructured RigL at the same density, and LeNet-5, whose conv layers
are sparse too. It prints a results table, comparisons with their standard
errors and one sparsifier's ``summary()``, and writes ``results.json``,
``results.md`` and PNG plots to ``--out``. ``--quick`` runs the same rows for one
seed and two epochs on a slice of the data, in well under a minute.

Examples::

    bash examples/fashion_mnist.sh                       # the default run
    bash examples/fashion_mnist.sh --quick               # smoke test
    bash examples/fashion_mnist.sh --full --out docs/results --report docs/results.md
    python examples/fashion_mnist --policy rigl --sparsity 0.98 --seeds 1
    python examples/fashion_mnist --holdout 10000        # evaluate on a val split

One file per part:

* ``models.py``: LeNet-300-100 and LeNet-5;
* ``config.py``: each model's recipe, a run's spec and result;
* ``train.py``: one run: the training loop and the ``sparsify`` call;
* ``grid.py``: which runs a sweep makes, and the pool of worker processes;
* ``journal.py``: each finished run on disk, so ``--resume`` skips it;
* ``report.py``: aggregation over seeds, the table, the comparisons, JSON;
* ``plots.py`` and ``markdown.py``: the figures and the results page;
* ``progress.py``: progress bars; ``cli.py``: the command line.

The data comes from ``examples/fashion_mnist_data.py`` (no torchvision needed).
"""
