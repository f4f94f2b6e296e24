"""Fashion-MNIST without torchvision: find, verify and load the four IDX files.

The data set is looked for, in this order, in:

1. the directory passed as ``data_dir`` (``--data-dir`` on the command line),
2. the directory named by ``$SPARSETORCH_DATA``,
3. ``/usr/share/datasets/fashion-mnist`` (Debian package ``dataset-fashion-mnist``),
4. the download cache ``~/.cache/sparsetorch/fashion-mnist``
   (``$XDG_CACHE_HOME`` is honoured),

and when it is in none of them it is downloaded from the data set's canonical
location into the cache, checking the published MD5 of every archive. An explicit
``data_dir`` or ``$SPARSETORCH_DATA`` that lacks the files is an error, never a
silent fall-through to another copy.

Every file is checked before use whatever its source: the gzip stream must be
complete, the IDX header must carry the right magic number and shape, the payload
must have the right size, labels must lie in 0-9, and the SHA-256 of the unpacked
payload must match the published data set (Debian re-compresses the archives, so the
archive bytes differ while the content is identical).

The whole set is kept in memory as tensors; :func:`iterate_batches` slices them in
a seeded random order, with no ``DataLoader`` and no per-sample Python.
"""

from __future__ import annotations

import gzip
import hashlib
import os
import shutil
import tempfile
import urllib.error
import urllib.request
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

__all__ = [
    "CANONICAL_URL",
    "DEBIAN_DIR",
    "CorruptDataError",
    "DataNotFoundError",
    "FashionMNIST",
    "FashionMNISTError",
    "default_cache_dir",
    "iterate_batches",
    "load_fashion_mnist",
    "read_idx",
    "resolve_data_dir",
]

CANONICAL_URL = "https://raw.githubusercontent.com/zalandoresearch/fashion-mnist/master/data/fashion/"
DEBIAN_DIR = Path("/usr/share/datasets/fashion-mnist")
INSTALL_HINT = (
    "run `apt-get install -y dataset-fashion-mnist`, or pass --data-dir DIR "
    "holding the four IDX .gz files"
)

CLASSES = (
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
)


@dataclass(frozen=True)
class _FileSpec:
    """What one of the four files must contain."""

    name: str
    magic: int  # 0x801 labels (1-d), 0x803 images (3-d)
    count: int
    gz_md5: str  # MD5 of the archive as published upstream
    sha256: str  # SHA-256 of the unpacked IDX payload


_IMAGE_MAGIC = 0x00000803
_LABEL_MAGIC = 0x00000801
_ROWS = _COLS = 28

_FILES: dict[str, _FileSpec] = {
    "train_images": _FileSpec(
        "train-images-idx3-ubyte.gz",
        _IMAGE_MAGIC,
        60000,
        "8d4fb7e6c68d591d4c3dfef9ec88bf0d",
        "c59f468a2f672dc815687fe0f83887768d799fd8a3f3276145d20f83aa44d888",
    ),
    "train_labels": _FileSpec(
        "train-labels-idx1-ubyte.gz",
        _LABEL_MAGIC,
        60000,
        "25c81989df183df01b3e8a0aad5dffbe",
        "bad3541b69d912435c50bb6ba87bec294ff4f6a2e1246121d8633921760443d9",
    ),
    "test_images": _FileSpec(
        "t10k-images-idx3-ubyte.gz",
        _IMAGE_MAGIC,
        10000,
        "bef4ecab320f06d8554ea6380940ec79",
        "5b4141f0afbad91edebe8549f8fcffe087ea10ca49f1dbef5c9a5cd8815ce37b",
    ),
    "test_labels": _FileSpec(
        "t10k-labels-idx1-ubyte.gz",
        _LABEL_MAGIC,
        10000,
        "bb300cfdad3c16e7a12a480ee83cd310",
        "0402a96d92fd2663957122ceb108a494c5af83dab82d92729df917d7dec38c34",
    ),
}
FILE_NAMES: tuple[str, ...] = tuple(spec.name for spec in _FILES.values())


class FashionMNISTError(RuntimeError):
    """Base class of the data errors; the message is one line that names the fix."""


class DataNotFoundError(FashionMNISTError):
    """The data set is in none of the places looked at and could not be downloaded."""


class CorruptDataError(FashionMNISTError, ValueError):
    """A data file is truncated, corrupt or not the published Fashion-MNIST file."""


@dataclass(frozen=True)
class FashionMNIST:
    """The data set held in memory.

    Attributes:
        train_x: ``(60000, 1, 28, 28)`` float32 images, normalised with the training
            mean and standard deviation.
        train_y: ``(60000,)`` int64 labels in 0-9.
        test_x: ``(10000, 1, 28, 28)`` float32 images, same normalisation.
        test_y: ``(10000,)`` int64 labels.
        source: the directory the files were read from.
    """

    train_x: torch.Tensor
    train_y: torch.Tensor
    test_x: torch.Tensor
    test_y: torch.Tensor
    source: Path

    def subset(self, n_train: int | None, n_test: int | None) -> FashionMNIST:
        """Returns the first ``n_train`` training and ``n_test`` test examples.

        Args:
            n_train: how many training examples to keep; ``None`` keeps all.
            n_test: how many test examples to keep; ``None`` keeps all.

        Returns:
            A data set that shares storage with this one.
        """
        return FashionMNIST(
            self.train_x[:n_train],
            self.train_y[:n_train],
            self.test_x[:n_test],
            self.test_y[:n_test],
            self.source,
        )

    def holdout(self, n_val: int) -> FashionMNIST:
        """Splits the last ``n_val`` training examples off as the evaluation set.

        Use it to tune a recipe without looking at the test set.

        Args:
            n_val: size of the validation split, taken from the end of the
                training set.

        Returns:
            A data set whose ``test_*`` tensors are the validation split.

        Raises:
            ValueError: if ``n_val`` is not in ``1 .. len(train) - 1``.
        """
        n = self.train_x.shape[0]
        if not 0 < n_val < n:
            raise ValueError(
                f"holdout size {n_val} must be between 1 and {n - 1}; pass a smaller "
                "--holdout"
            )
        return FashionMNIST(
            self.train_x[:-n_val],
            self.train_y[:-n_val],
            self.train_x[-n_val:],
            self.train_y[-n_val:],
            self.source,
        )


def default_cache_dir() -> Path:
    """Returns the download cache, ``$XDG_CACHE_HOME/sparsetorch/fashion-mnist``."""
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "sparsetorch" / "fashion-mnist"


def _missing(directory: Path) -> list[str]:
    return [name for name in FILE_NAMES if not (directory / name).is_file()]


def _md5(path: Path) -> str:
    digest = hashlib.md5(usedforsecurity=False)
    with path.open("rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _download(cache_dir: Path, base_url: str, timeout: float) -> None:
    """Downloads the missing archives into ``cache_dir``, checking their MD5.

    Each file goes to a temporary name first and is renamed only once its checksum
    is right, so an interrupted download never leaves a half file in the cache.
    """
    cache_dir.mkdir(parents=True, exist_ok=True)
    for spec in _FILES.values():
        target = cache_dir / spec.name
        if target.is_file():
            continue
        url = base_url + spec.name
        fd, tmp_name = tempfile.mkstemp(prefix=spec.name + ".", dir=cache_dir)
        tmp = Path(tmp_name)
        try:
            with (
                os.fdopen(fd, "wb") as out,
                urllib.request.urlopen(url, timeout=timeout) as response,
            ):
                shutil.copyfileobj(response, out)
            got = _md5(tmp)
            if got != spec.gz_md5:
                raise CorruptDataError(
                    f"downloaded {url} has MD5 {got}, expected {spec.gz_md5}; the "
                    f"download is damaged or the file changed upstream: {INSTALL_HINT}"
                )
            tmp.replace(target)
        finally:
            tmp.unlink(missing_ok=True)


def resolve_data_dir(
    data_dir: str | os.PathLike[str] | None = None,
    *,
    download: bool = True,
    cache_dir: str | os.PathLike[str] | None = None,
    base_url: str = CANONICAL_URL,
    timeout: float = 30.0,
) -> Path:
    """Finds the directory holding the four Fashion-MNIST archives.

    Args:
        data_dir: directory given by the user; when set, it must hold the files.
        download: whether to download into the cache when no copy is found.
        cache_dir: download cache; defaults to :func:`default_cache_dir`.
        base_url: where to download from (the files' names are appended).
        timeout: network timeout in seconds for each download.

    Returns:
        The directory that holds all four files.

    Raises:
        DataNotFoundError: if ``data_dir`` or ``$SPARSETORCH_DATA`` lacks files,
            or no copy was found and the download was off or failed.
        CorruptDataError: if a downloaded archive has the wrong checksum.
    """
    for given, what, drop in (
        (data_dir, "--data-dir", "drop --data-dir"),
        (os.environ.get("SPARSETORCH_DATA"), "SPARSETORCH_DATA", "unset it"),
    ):
        if given is None or str(given) == "":
            continue
        directory = Path(given).expanduser()
        missing = _missing(directory)
        if missing:
            if directory.is_dir():
                state = "lacks " + ", ".join(missing)
            elif directory.exists():
                state = "is not a directory"
            else:
                state = "does not exist"
            raise DataNotFoundError(
                f"{what} {str(given)!r} {state}: pass a directory holding "
                f"{', '.join(FILE_NAMES)}, or {drop} to use {DEBIAN_DIR} "
                "(`apt-get install -y dataset-fashion-mnist`)"
            )
        return directory

    cache = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    for directory in (DEBIAN_DIR, cache):
        if not _missing(directory):
            return directory
    if not download:
        raise DataNotFoundError(
            f"Fashion-MNIST not found in {DEBIAN_DIR} or {cache} and downloading is "
            f"off: {INSTALL_HINT}"
        )
    try:
        _download(cache, base_url, timeout)
    except (urllib.error.URLError, OSError) as exc:
        reason = getattr(exc, "reason", None) or exc
        raise DataNotFoundError(
            f"Fashion-MNIST not found in {DEBIAN_DIR} or {cache}, and downloading "
            f"from {base_url} failed ({reason}): {INSTALL_HINT}"
        ) from exc
    return cache


def read_idx(path: Path, spec_key: str) -> torch.Tensor:
    """Reads and checks one gzip-compressed IDX file.

    Args:
        path: the ``.gz`` file.
        spec_key: which of the four files it is: ``"train_images"``,
            ``"train_labels"``, ``"test_images"`` or ``"test_labels"``.

    Returns:
        A uint8 tensor, ``(count, 28, 28)`` for images and ``(count,)`` for labels.

    Raises:
        CorruptDataError: if the file is truncated, not gzip, has a wrong header,
            size, label value or checksum.
        KeyError: if ``spec_key`` is not one of the four names.
    """
    spec = _FILES[spec_key]
    fix = (
        f"delete it and re-install (`apt-get install --reinstall -y "
        f"dataset-fashion-mnist`) or re-download it from {CANONICAL_URL}{spec.name}"
    )
    try:
        raw = gzip.decompress(path.read_bytes())
    except (EOFError, gzip.BadGzipFile, zlib.error) as exc:
        raise CorruptDataError(
            f"{path} is truncated or corrupt ({exc}); {fix}"
        ) from exc
    is_images = spec.magic == _IMAGE_MAGIC
    header_len = 16 if is_images else 8
    if len(raw) < header_len:
        raise CorruptDataError(
            f"{path} unpacks to {len(raw)} bytes, too short for an IDX header; {fix}"
        )
    magic = int.from_bytes(raw[0:4], "big")
    dims = [int.from_bytes(raw[i : i + 4], "big") for i in range(4, header_len, 4)]
    want_dims = [spec.count, _ROWS, _COLS] if is_images else [spec.count]
    if magic != spec.magic or dims != want_dims:
        raise CorruptDataError(
            f"{path} has IDX header magic=0x{magic:08x} dims={dims}, expected "
            f"magic=0x{spec.magic:08x} dims={want_dims}; {fix}"
        )
    want_size = header_len + spec.count * (_ROWS * _COLS if is_images else 1)
    if len(raw) != want_size:
        raise CorruptDataError(
            f"{path} unpacks to {len(raw)} bytes, expected {want_size}; {fix}"
        )
    data = torch.frombuffer(bytearray(raw), dtype=torch.uint8, offset=header_len)
    if not is_images:
        top = int(data.max())
        if top > 9:
            raise CorruptDataError(
                f"{path} holds label {top}, labels must be 0-9; {fix}"
            )
    got = hashlib.sha256(raw).hexdigest()
    if got != spec.sha256:
        raise CorruptDataError(
            f"{path} content has SHA-256 {got[:16]}..., expected {spec.sha256[:16]}... "
            f"(not the published Fashion-MNIST); {fix}"
        )
    return data.view(*want_dims)


def load_fashion_mnist(
    data_dir: str | os.PathLike[str] | None = None,
    *,
    download: bool = True,
    cache_dir: str | os.PathLike[str] | None = None,
) -> FashionMNIST:
    """Finds, verifies and loads Fashion-MNIST as normalised in-memory tensors.

    Args:
        data_dir: directory holding the four archives; see the module docstring
            for where it is looked for when ``None``.
        download: whether to download into the cache when no copy is found.
        cache_dir: download cache; defaults to :func:`default_cache_dir`.

    Returns:
        The data set, images normalised with the training mean and std.

    Raises:
        DataNotFoundError: if no copy can be found or downloaded.
        CorruptDataError: if a file fails verification.
    """
    directory = resolve_data_dir(data_dir, download=download, cache_dir=cache_dir)
    tensors = {
        key: read_idx(directory / spec.name, key) for key, spec in _FILES.items()
    }
    train = tensors["train_images"].to(torch.float32).div_(255.0)
    mean, std = train.mean(), train.std()
    train = train.sub_(mean).div_(std).unsqueeze(1)
    test = tensors["test_images"].to(torch.float32).div_(255.0)
    test = test.sub_(mean).div_(std).unsqueeze(1)
    return FashionMNIST(
        train_x=train,
        train_y=tensors["train_labels"].to(torch.int64),
        test_x=test,
        test_y=tensors["test_labels"].to(torch.int64),
        source=directory,
    )


def iterate_batches(
    x: torch.Tensor,
    y: torch.Tensor,
    batch_size: int,
    generator: torch.Generator,
    *,
    drop_last: bool = True,
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Yields ``(x, y)`` mini-batches of one epoch in a seeded random order.

    The order is one seeded permutation per epoch; each batch is gathered from it
    with one ``index_select`` (no per-sample work in the loop, and no copy of the
    whole set per epoch: that 188 MB gather took about 0.2 s an epoch).

    Args:
        x: inputs, first dimension is the example index.
        y: targets, same first dimension as ``x``.
        batch_size: examples per batch.
        generator: seeded generator that fixes the order.
        drop_last: whether to drop the last, smaller batch.

    Yields:
        Batches of inputs and targets.

    Raises:
        ValueError: if ``batch_size`` is not positive or ``x`` and ``y`` differ in
            length.
    """
    if batch_size <= 0:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    n = x.shape[0]
    if y.shape[0] != n:
        raise ValueError(f"x has {n} examples but y has {y.shape[0]}")
    perm = torch.randperm(n, generator=generator)
    stop = n - n % batch_size if drop_last else n
    for start in range(0, stop, batch_size):
        index = perm[start : start + batch_size]
        yield x.index_select(0, index), y.index_select(0, index)
