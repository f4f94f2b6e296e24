"""The Fashion-MNIST main job on the real data: quick runs, the grid, the report.

The data comes from the Debian package ``dataset-fashion-mnist`` (CI installs it).
Nothing here is skipped: without the data, the quick run fails with the loader's
one-line message saying how to get it.
"""

from __future__ import annotations

import gzip
import hashlib
import http.server
import importlib
import importlib.metadata
import json
import os
import shutil
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from expecttest import assert_expected_inline

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = ROOT / "examples"
APP = EXAMPLES / "fashion_mnist"  # the application folder, run as `python APP`
sys.path.insert(0, str(EXAMPLES))

# the example's loader is a script beside it, not part of the package
fmd = importlib.import_module("fashion_mnist_data")
report = importlib.import_module("fashion_mnist.report")
cli = importlib.import_module("fashion_mnist.cli")
grid = importlib.import_module("fashion_mnist.grid")


def _env(tmp_path: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "SPARSETORCH_DATA"}
    env["XDG_CACHE_HOME"] = str(tmp_path / "cache")  # never touch ~/.cache
    env["PYTHONPATH"] = os.pathsep.join(
        [str(ROOT), *filter(None, [env.get("PYTHONPATH")])]
    )
    return env


def _run(
    tmp_path: Path, *args: str, timeout: float = 60
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, str(APP), *args],
        capture_output=True,
        text=True,
        env=_env(tmp_path),
        cwd=tmp_path,
        timeout=timeout,
        check=False,
    )


def _one_line_error(capsys: pytest.CaptureFixture[str], *args: str) -> str:
    """Runs the command line in this process; returns its one-line error."""
    try:
        status = cli.main(["--no-progress", *args])
    except SystemExit as exc:  # argparse's errors exit
        status = exc.code
    err = capsys.readouterr().err
    assert status == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    return lines[0]


@pytest.fixture(scope="module")
def data_dir() -> Path:
    """The system copy of the four files; fails with the fix when it is missing."""
    try:
        found: Path = fmd.resolve_data_dir(download=False)
    except fmd.DataNotFoundError as exc:
        pytest.fail(str(exc), pytrace=False)
    return found


@pytest.fixture
def copy_dir(data_dir: Path, tmp_path: Path) -> Path:
    """A private copy of the data files, free to damage."""
    target = tmp_path / "fmnist"
    target.mkdir()
    for name in fmd.FILE_NAMES:
        shutil.copyfile(data_dir / name, target / name)
    return target


@pytest.fixture(autouse=True)
def _keep_torch_threads() -> Iterator[None]:
    """The command line sets torch's thread count; in-process runs restore it."""
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def test_quick_run_on_real_data(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # in this process: the worker pool and the entry point are
    # test_results_do_not_depend_on_jobs's
    out = str(tmp_path / "out")
    assert cli.main(["--quick", "--jobs", "1", "--no-progress", "--out", out]) == 0
    stdout = capsys.readouterr().out
    payload = json.loads((tmp_path / "out" / "results.json").read_text())
    rows = {
        (r["policy"], r["distribution"], r["target_sparsity"]): r
        for r in payload["rows"]
    }
    # the whole default grid ran: dense + 6 policies x 2 sparsities, ERK
    assert len(rows) == 13, sorted(rows)
    assert payload["n_train"] == 6000 and payload["n_eval"] == 1000
    assert rows[("dense", "-", 0.0)]["mean"] > 0.75  # chance is 0.10
    assert rows[("rigl", "erk", 0.9)]["mean"] > 0.6
    for (policy, _dist, target), row in rows.items():
        if policy != "dense":
            assert abs(row["overall_sparsity"] - target) < 1e-3, row
    runs = {(r["spec"]["policy"], r["spec"]["sparsity"]): r for r in payload["runs"]}
    # the library's metrics: RigL's topology changed at updates, static's never
    assert len(runs["rigl", 0.9]["mask_events"]) > 1
    assert all(change > 0 for _, change, _ in runs["rigl", 0.9]["mask_events"][1:])
    assert len(runs["static", 0.9]["mask_events"]) == 1
    # the library's FLOPs: dense is 1x; RigL pays for its dense-gradient steps
    assert runs["dense", 0.0]["train_flops"] == 1.0
    assert runs["static", 0.9]["train_flops"] < runs["rigl", 0.9]["train_flops"] < 1
    assert runs["rigl", 0.9]["inference_flops"] < 0.2
    assert "fc1.weight" in stdout  # the sparsifier's summary() was printed
    assert (tmp_path / "out" / "results.md").is_file()
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return
    for name in (
        "accuracy_vs_sparsity",
        "accuracy_vs_flops",
        "layer_density",
        "mask_dynamics",
    ):
        assert (tmp_path / "out" / f"{name}.png").stat().st_size > 0


def test_results_do_not_depend_on_jobs(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    # LeNet-5: the conv layers are sparse too
    tiny = ("--quick", "--model", "lenet5", "--policy", "rigl", "--seeds", "2")
    tiny += ("--train-subset", "1024", "--test-subset", "500", "--no-plots")
    tiny += ("--update-interval", "4")  # 16 steps: updates at 4, 8 and 12
    runs = {}
    # in this process, one run after the other
    assert cli.main([*tiny, "--no-progress", "--jobs", "1", "--out", "out1"]) == 0
    # the entry point in its own process, with a pool of two workers that keep
    # their progress bars on (one lock; tqdm draws nothing as stderr is no terminal)
    proc = _run(tmp_path, *tiny, "--jobs", "2", "--out", "out2")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "4 runs, 2 at a time" in proc.stdout + proc.stderr
    for jobs in ("1", "2"):
        payload = json.loads((tmp_path / f"out{jobs}" / "results.json").read_text())
        assert payload["jobs"] == int(jobs)
        runs[jobs] = [
            (r["spec"], r["test_accuracy"], r["train_loss"], r["mask_events"])
            for r in payload["runs"]
        ]
    assert [spec["seed"] for spec, *_ in runs["2"]] == [0, 1, 0, 1]  # grid order
    assert runs["1"] == runs["2"]  # bit for bit
    erk = payload["runs"][0]
    assert [step for step, *_ in erk["mask_events"]] == [0, 4, 8]
    assert list(erk["layer_density"]) == [
        "conv1.weight",
        "conv2.weight",
        "fc1.weight",
        "fc2.weight",
        "fc3.weight",
    ]
    assert abs(erk["overall_sparsity"] - 0.9) < 1e-4
    # ERK keeps the small first conv layer denser than the big linear one
    assert erk["layer_density"]["conv1.weight"] > erk["layer_density"]["fc1.weight"]


def test_resume_keeps_finished_runs_and_json_rerenders(tmp_path: Path) -> None:
    tiny = ["--quick", "--train-subset", "512", "--test-subset", "100", "--jobs", "1"]
    tiny += ["--update-interval", "4"]
    tiny += ["--no-progress", "--no-plots", "--out", str(tmp_path / "out")]
    assert cli.main([*tiny, "--policy", "dense", "rigl", "--sparsity", "0.9"]) == 0
    first = json.loads((tmp_path / "out" / "results.json").read_text())
    assert cli.main([*tiny, "--policy", "dense", "static", "rigl", "--resume"]) == 0
    second = json.loads((tmp_path / "out" / "results.json").read_text())
    assert second["resumed_runs"] == 2  # dense and RigL 90% kept, static trained
    kept = {json.dumps(r["spec"]): r for r in first["runs"]}
    methods = []
    for run in second["runs"]:
        methods.append(f"{run['spec']['policy']} {run['spec']['sparsity']}")
        if json.dumps(run["spec"]) in kept:
            assert run == kept[json.dumps(run["spec"])]
    assert methods == [
        "dense 0.0",
        "static 0.9",
        "static 0.98",
        "rigl 0.9",
        "rigl 0.98",
    ]
    # the report re-renders from its JSON alone, identically
    out = tmp_path / "again"
    json_path = str(tmp_path / "out" / "results.json")
    assert cli.main(["--from-json", json_path, "--out", str(out), "--no-plots"]) == 0
    rendered = f"- This page was rendered from `{json_path}` by `--from-json` (no "
    rendered += "training)\n"
    again = (out / "results.md").read_text()
    assert rendered in again
    assert again.replace(rendered, "") == (tmp_path / "out" / "results.md").read_text()


def _row(policy: str, sparsity: float, *accs: float, **variant: object) -> object:
    dist = "-" if policy == "dense" else variant.pop("distribution", "erk")
    return report.Row(
        "lenet300", policy, dist, sparsity, sparsity, list(accs), 1.0, **variant
    )


def test_comparisons_state_difference_se_and_verdict() -> None:
    rows = [
        _row("dense", 0.0, 0.899, 0.898, 0.900),
        _row("rigl", 0.9, 0.893, 0.892, 0.894),
        _row("snfs", 0.9, 0.897, 0.896, 0.898),  # ahead: +0.40 +- 0.08
        _row("set", 0.9, 0.892, 0.895, 0.891),  # within noise
        _row("static", 0.9, 0.880, 0.882, 0.881),  # behind
        _row("rigl", 0.9, 0.895),  # one seed only
        _row("rigl", 0.9, 0.896, 0.897, 0.895, length=2),
        _row("rigl", 0.5, 0.90, 0.899, 0.898, distribution="uniform"),
        _row("rigl", 0.5, 0.894, 0.895, 0.896, distribution="uniform", structure="2:4"),
    ]
    rows[5].distribution = "uniform"  # RigL 90% uniform: compared with nothing
    found = report.comparisons(rows)
    lines = [c.line() for c in found] + report.findings(found)
    assert_expected_inline(
        "\n".join(lines).replace("\u00b1", "+-"),  # expecttest pins ASCII
        """\
lenet300: static 90% vs RigL 90%: 88.10 vs 89.30, -1.20 +- 0.08 s.e.: RigL 90% ahead
lenet300: SET 90% vs RigL 90%: 89.27 vs 89.30, -0.03 +- 0.13 s.e.: within noise
lenet300: SNFS 90% vs RigL 90%: 89.70 vs 89.30, +0.40 +- 0.08 s.e.: SNFS 90% ahead
lenet300: RigL 90% vs dense: 89.30 vs 89.90, -0.60 +- 0.08 s.e.: dense ahead
lenet300: RigL 2x 90% vs dense: 89.60 vs 89.90, -0.30 +- 0.08 s.e.: dense ahead
lenet300: RigL 2x 90% vs RigL 90%: 89.60 vs 89.30, +0.30 +- 0.08 s.e.: RigL 2x 90% ahead
lenet300: RigL 2:4 50% uniform vs RigL 50% uniform: 89.50 vs 89.90, -0.40 +- 0.08 s.e.: RigL 50% uniform ahead
Ahead of RigL by more than 2 s.e.: SNFS 90% on lenet300 (+0.40 +- 0.08).
Behind RigL by more than 2 s.e.: static 90% on lenet300 (-1.20 +- 0.08).
Within 2 s.e. of RigL: SET 90% on lenet300 (-0.03 +- 0.13).""",
    )
    one_seed = report.Comparison("lenet300", rows[5], rows[1])
    assert one_seed.verdict == "one seed: no standard error"


def test_results_table() -> None:
    rows = [
        _row("dense", 0.0, 0.899, 0.898, 0.900, train_flops=1.0, inference_flops=1.0),
        _row("rigl", 0.9, 0.893, 0.892, 0.894, train_flops=0.101, inference_flops=0.1),
        _row("rigl", 0.9, 0.896, 0.897, 0.895, length=2, train_flops=0.202),
        _row("rigl", 0.5, 0.894, 0.895, 0.896, distribution="uniform", structure="2:4"),
    ]
    assert_expected_inline(
        report.format_table(rows).replace("\u00b1", "+-"),
        """\
model     method    distribution  target sparsity  overall sparsity  train FLOPs  infer FLOPs  test acc % (mean +- std)  vs dense  seeds  s/run
lenet300  dense     -             0.00             0.0000            1.000x       1.000x       89.90 +- 0.10                       3      1.0
lenet300  RigL      erk           0.90             0.9000            0.101x       0.100x       89.30 +- 0.10             -0.60     3      1.0
lenet300  RigL 2x   erk           0.90             0.9000            0.202x       ?            89.60 +- 0.10             -0.30     3      1.0
lenet300  RigL 2:4  uniform       0.50             0.5000            ?            ?            89.50 +- 0.10             -0.40     3      1.0""",
    )


def test_peer_claims_compare_best_allocations_and_like_for_like() -> None:
    def row(policy: str, dist: str, overall: float, *accs: float) -> object:
        return report.Row("lenet300", policy, dist, 0.9, overall, list(accs), 1.0)

    rows = [
        row("dense", "-", 0.0, 0.899, 0.898, 0.900),
        row("rigl", "erk", 0.9, 0.893, 0.892, 0.894),
        row("rigl", "uniform", 0.9, 0.887, 0.889, 0.888),
        row("rigl-torch", "uniform", 0.9, 0.889, 0.888, 0.890),
        row("rigl", "uniform-first-dense", 0.1048, 0.890, 0.892, 0.894),
        row("rigl-torch", "uniform-first-dense", 0.1048, 0.900, 0.901, 0.899),
    ]
    lines = [
        f"[{'ok' if holds else 'MISS'}] {claim}: {evidence}"
        for claim, holds, evidence in report.peer_checks(rows)
    ]
    assert_expected_inline(
        "\n".join(lines).replace("\u00b1", "+-"),  # expecttest pins ASCII
        """\
[ok] lenet300: sparsetorch RigL >= rigl-torch at overall sparsity 0.9000, best allocation of each: sparsetorch erk 89.30 +- 0.10, rigl-torch uniform 88.90 +- 0.10: +0.40 +- 0.08 s.e.
[ok] lenet300: same allocation (uniform, overall 0.9000): sparsetorch RigL no worse than rigl-torch beyond 2 s.e.: sparsetorch 88.80 +- 0.10, rigl-torch 88.90 +- 0.10: -0.10 +- 0.08 s.e.
[MISS] lenet300: same allocation (uniform-first-dense, overall 0.1048): sparsetorch RigL no worse than rigl-torch beyond 2 s.e.: sparsetorch 89.20 +- 0.20, rigl-torch 90.00 +- 0.10: -0.80 +- 0.13 s.e.""",
    )


def test_full_sweep_rows() -> None:
    rows = [
        f"{r.model} {r.method} {r.distribution} {r.sparsity:g}"
        for r in grid.full_rows()
    ]
    assert_expected_inline(
        "\n".join(rows),
        """\
lenet300 dense - 0
lenet300 static erk 0.9
lenet300 static erk 0.98
lenet300 SET erk 0.9
lenet300 SET erk 0.98
lenet300 SNFS erk 0.9
lenet300 SNFS erk 0.98
lenet300 RigL erk 0.9
lenet300 RigL erk 0.98
lenet300 SNIP erk 0.9
lenet300 SNIP erk 0.98
lenet300 GMP erk 0.9
lenet300 GMP erk 0.98
lenet300 RigL 2x erk 0.9
lenet300 RigL 2x erk 0.98
lenet300 RigL 5x erk 0.9
lenet300 RigL 5x erk 0.98
lenet300 RigL 2:4 uniform 0.5
lenet300 RigL uniform 0.5
lenet300 RigL fan-in erk 0.9
lenet5 dense - 0
lenet5 static erk 0.9
lenet5 static erk 0.98
lenet5 SET erk 0.9
lenet5 SET erk 0.98
lenet5 SNFS erk 0.9
lenet5 SNFS erk 0.98
lenet5 RigL erk 0.9
lenet5 RigL erk 0.98
lenet5 SNIP erk 0.9
lenet5 SNIP erk 0.98
lenet5 GMP erk 0.9
lenet5 GMP erk 0.98
lenet5 RigL 2x erk 0.9
lenet5 RigL 2x erk 0.98""",
    )
    assert grid.full_rows()[: len(grid.default_rows())] == grid.default_rows()


def test_unknown_policy_is_a_one_line_error(capsys: pytest.CaptureFixture[str]) -> None:
    line = _one_line_error(capsys, "--policy", "magnitude")
    assert_expected_inline(
        line,
        """fashion_mnist: error: argument --policy: unknown policy 'magnitude': use one of dense, static, set, snfs, rigl, snip, gmp, rigl-torch (see --help)""",
    )


def test_full_with_grid_flags_is_a_one_line_error(
    capsys: pytest.CaptureFixture[str],
) -> None:
    line = _one_line_error(capsys, "--full", "--policy", "rigl")
    assert_expected_inline(
        line,
        """fashion_mnist: error: --full runs the preset rows: drop it, or drop --model / --policy / --sparsity / --distribution / --structure / --length""",
    )


def test_two_four_needs_half_sparsity(capsys: pytest.CaptureFixture[str]) -> None:
    line = _one_line_error(
        capsys, "--policy", "rigl", "--structure", "2:4", "--sparsity", "0.9"
    )
    assert_expected_inline(
        line,
        """fashion_mnist: error: --structure 2:4 keeps 2 of every 4 weights, sparsity 0.5, not 0.9: pass --sparsity 0.5""",
    )


def test_wrong_data_dir_is_a_one_line_error(capsys: pytest.CaptureFixture[str]) -> None:
    line = _one_line_error(capsys, "--quick", "--data-dir", "/nonexistent/fmnist")
    assert_expected_inline(
        line,
        """fashion_mnist: error: --data-dir '/nonexistent/fmnist' does not exist: pass a directory holding train-images-idx3-ubyte.gz, train-labels-idx1-ubyte.gz, t10k-images-idx3-ubyte.gz, t10k-labels-idx1-ubyte.gz, or drop --data-dir to use /usr/share/datasets/fashion-mnist (`apt-get install -y dataset-fashion-mnist`)""",
    )


def test_truncated_file_is_a_one_line_error(
    copy_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = copy_dir / "t10k-images-idx3-ubyte.gz"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    line = _one_line_error(
        capsys, "--quick", "--policy", "dense", "--data-dir", str(copy_dir)
    )
    line = line.replace(str(copy_dir), "DIR")
    assert_expected_inline(
        line,
        """fashion_mnist: error: DIR/t10k-images-idx3-ubyte.gz is truncated or corrupt (Compressed file ended before the end-of-stream marker was reached); delete it and re-install (`apt-get install --reinstall -y dataset-fashion-mnist`) or re-download it from https://raw.githubusercontent.com/zalandoresearch/fashion-mnist/master/data/fashion/t10k-images-idx3-ubyte.gz""",
    )


def test_flipped_bytes_are_caught(copy_dir: Path) -> None:
    path = copy_dir / "train-labels-idx1-ubyte.gz"
    data = bytearray(path.read_bytes())
    for i in range(len(data) // 2, len(data) // 2 + 64):
        data[i] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(fmd.CorruptDataError) as info:
        fmd.read_idx(path, "train_labels")
    message = str(info.value)
    assert "\n" not in message
    assert str(path) in message and "truncated or corrupt" in message
    assert isinstance(info.value, ValueError)  # and a RuntimeError


def _rewrite(path: Path, edit: bytes | None = None, *, at: int = 0) -> None:
    """Re-gzips ``path`` with ``edit`` written over its payload at offset ``at``.

    Without ``edit`` the byte at ``at`` is inverted.
    """
    raw = bytearray(gzip.decompress(path.read_bytes()))
    if edit is None:
        raw[at] ^= 0xFF
    else:
        raw[at : at + len(edit)] = edit
    path.write_bytes(gzip.compress(bytes(raw), compresslevel=1))


def test_valid_gzip_with_wrong_content_is_caught(copy_dir: Path) -> None:
    labels = copy_dir / "t10k-labels-idx1-ubyte.gz"
    _rewrite(labels, b"\x0b", at=8 + 17)  # label 11
    with pytest.raises(fmd.CorruptDataError, match="holds label 11, labels must be"):
        fmd.read_idx(labels, "test_labels")

    _rewrite(labels, b"\x00\x00\x08\x03")  # image magic in a label file
    with pytest.raises(fmd.CorruptDataError, match="magic=0x00000803"):
        fmd.read_idx(labels, "test_labels")

    train = copy_dir / "train-labels-idx1-ubyte.gz"
    _rewrite(train, b"\x00\x00\xea\x5f", at=4)  # header claims 59999 labels
    with pytest.raises(fmd.CorruptDataError, match=r"dims=\[59999\]"):
        fmd.read_idx(train, "train_labels")

    images = copy_dir / "t10k-images-idx3-ubyte.gz"
    _rewrite(images, at=16 + 400)  # one pixel off: only the hash can tell
    with pytest.raises(fmd.CorruptDataError, match="not the published Fashion-MNIST"):
        fmd.read_idx(images, "test_images")


def test_load_shapes_and_batches(data_dir: Path) -> None:
    data = fmd.load_fashion_mnist(data_dir)
    assert data.train_x.shape == (60000, 1, 28, 28)
    assert data.test_x.shape == (10000, 1, 28, 28)
    assert data.train_x.dtype == torch.float32
    assert torch.bincount(data.train_y).tolist() == [6000] * 10
    assert torch.bincount(data.test_y).tolist() == [1000] * 10
    assert abs(float(data.train_x.mean())) < 1e-4
    assert abs(float(data.train_x.std()) - 1.0) < 1e-3

    small = data.subset(1000, 10)
    seen = []
    for seed in (3, 3):
        g = torch.Generator().manual_seed(seed)
        batches = list(fmd.iterate_batches(small.train_x, small.train_y, 128, g))
        assert [b[0].shape[0] for b in batches] == [128] * 7  # last 104 dropped
        seen.append(torch.cat([b[1] for b in batches]))
    assert torch.equal(seen[0], seen[1])  # same seed, same order
    g = torch.Generator().manual_seed(3)
    full = list(
        fmd.iterate_batches(small.train_x, small.train_y, 128, g, drop_last=False)
    )
    order = torch.cat([b[1] for b in full])
    assert sorted(order.tolist()) == sorted(small.train_y.tolist())


def test_not_found_anywhere_says_what_to_do(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("SPARSETORCH_DATA", raising=False)
    monkeypatch.setattr(fmd, "DEBIAN_DIR", tmp_path / "debian")
    with pytest.raises(fmd.DataNotFoundError) as info:
        fmd.resolve_data_dir(cache_dir=tmp_path / "cache", download=False)
    assert_expected_inline(
        str(info.value).replace(str(tmp_path), "TMP"),
        """Fashion-MNIST not found in TMP/debian or TMP/cache and downloading is off: run `apt-get install -y dataset-fashion-mnist`, or pass --data-dir DIR holding the four IDX .gz files""",
    )
    # a download that cannot connect (nothing listens on the discard port)
    with pytest.raises(fmd.DataNotFoundError) as info:
        fmd.resolve_data_dir(
            cache_dir=tmp_path / "cache", base_url="http://127.0.0.1:9/", timeout=5
        )
    message = str(info.value)
    assert "\n" not in message
    assert "downloading from http://127.0.0.1:9/ failed" in message
    assert message.endswith(fmd.INSTALL_HINT)


def test_environment_variable_must_point_at_the_data(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "train-labels-idx1-ubyte.gz").write_bytes(b"")
    monkeypatch.setenv("SPARSETORCH_DATA", str(tmp_path))
    with pytest.raises(fmd.DataNotFoundError) as info:
        fmd.resolve_data_dir(download=False)
    assert_expected_inline(
        str(info.value).replace(str(tmp_path), "TMP"),
        """SPARSETORCH_DATA 'TMP' lacks train-images-idx3-ubyte.gz, t10k-images-idx3-ubyte.gz, t10k-labels-idx1-ubyte.gz: pass a directory holding train-images-idx3-ubyte.gz, train-labels-idx1-ubyte.gz, t10k-images-idx3-ubyte.gz, t10k-labels-idx1-ubyte.gz, or unset it to use /usr/share/datasets/fashion-mnist (`apt-get install -y dataset-fashion-mnist`)""",
    )


@pytest.fixture
def local_server(copy_dir: Path) -> Iterator[str]:
    """Serves ``copy_dir`` on the loopback interface; yields its base URL."""

    class Quiet(http.server.SimpleHTTPRequestHandler):
        def __init__(self, *args: object, **kwargs: object) -> None:
            super().__init__(*args, directory=str(copy_dir), **kwargs)  # type: ignore[arg-type]

        def log_message(self, format: str, *args: object) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Quiet)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/"
    finally:
        server.shutdown()
        server.server_close()


def test_download_checks_the_published_md5(
    local_server: str,
    copy_dir: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delenv("SPARSETORCH_DATA", raising=False)
    monkeypatch.setattr(fmd, "DEBIAN_DIR", tmp_path / "debian")
    cache = tmp_path / "cache"
    # Debian re-compresses the archives: same content, different .gz bytes, so
    # served as they are they fail the published archive MD5 ...
    with pytest.raises(fmd.CorruptDataError, match=r"has MD5 \w+, expected 8d4fb7e6"):
        fmd.resolve_data_dir(cache_dir=cache, base_url=local_server)
    assert sorted(p.name for p in cache.iterdir()) == []  # no half file left
    # ... and with the MD5 of the served files the download goes through
    for key, spec in list(fmd._FILES.items()):
        digest = hashlib.md5((copy_dir / spec.name).read_bytes()).hexdigest()
        monkeypatch.setitem(
            fmd._FILES, key, fmd._FileSpec(**{**spec.__dict__, "gz_md5": digest})
        )
    assert fmd.resolve_data_dir(cache_dir=cache, base_url=local_server) == cache
    assert sorted(p.name for p in cache.iterdir()) == sorted(fmd.FILE_NAMES)
    assert fmd.read_idx(cache / "t10k-labels-idx1-ubyte.gz", "test_labels").shape == (
        10000,
    )


def test_peer_without_rigl_torch_says_how_to_install(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    peer = importlib.import_module("_rigl_torch_peer")

    def not_installed(name: str) -> str:
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(peer.importlib.metadata, "version", not_installed)
    with pytest.raises(peer.PeerUnavailableError) as info:
        peer._import_rigl_scheduler()
    assert_expected_inline(
        str(info.value),
        """the rigl-torch peer is not installed: run `pip install rigl-torch==0.5.2 --no-deps`""",
    )


def test_torchvision_stub_stays_private() -> None:
    peer = importlib.import_module("_rigl_torch_peer")
    stub = peer._torchvision_stub()
    resnet = stub["torchvision.models.resnet"]
    assert stub["torchvision"].models.resnet is resnet
    assert issubclass(resnet.Bottleneck, torch.nn.Module)
    assert not isinstance(torch.nn.Linear(2, 2), (resnet.Bottleneck, resnet.BasicBlock))


def test_rigl_torch_import_sees_the_stub_and_leaks_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # a stand-in rigl-torch 0.5.2 whose RigL module needs torchvision, as the real one
    package = tmp_path / "rigl_torch"
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "RigL.py").write_text(
        "import torchvision\nRigLScheduler = torchvision.models.resnet.Bottleneck\n"
    )
    meta = tmp_path / "rigl_torch-0.5.2.dist-info"
    meta.mkdir()
    (meta / "METADATA").write_text(
        "Metadata-Version: 2.1\nName: rigl-torch\nVersion: 0.5.2\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    for name in ("rigl_torch", "rigl_torch.RigL", "torchvision"):
        monkeypatch.delitem(sys.modules, name, raising=False)
    peer = importlib.import_module("_rigl_torch_peer")
    try:
        scheduler = peer._import_rigl_scheduler()
        assert scheduler.__name__ == "Bottleneck"  # resolved through the stub
        assert "torchvision" not in sys.modules  # and the stub is gone again
        assert "torchvision.models.resnet" not in sys.modules
    finally:  # forget the stand-in so no later import finds it
        for name in ("rigl_torch.RigL", "rigl_torch"):
            module = sys.modules.get(name)
            if module is not None and str(tmp_path) in str(module.__file__):
                del sys.modules[name]
