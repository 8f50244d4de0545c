"""Datasets with train/validation/test splits, held in memory as normalised float tensors.

Selection decisions (ranking, budget search, early stopping) use the validation split carved from
train; the test split is only for reporting.
"""

from __future__ import annotations

import gzip
import os
import pickle
import struct
import tarfile
import urllib.request
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from relu_opt.cache import cache_dir
from relu_opt.errors import DataError

FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")
FASHION_FILES = (
    "train-images-idx3-ubyte.gz",
    "train-labels-idx1-ubyte.gz",
    "t10k-images-idx3-ubyte.gz",
    "t10k-labels-idx1-ubyte.gz",
)
CIFAR_URLS = {
    "cifar10": "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz",
    "cifar100": "https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz",
}
CIFAR_FOLDERS = {"cifar10": "cifar-10-batches-py", "cifar100": "cifar-100-python"}


@dataclass
class Split:
    x: Tensor  # float32, normalised, (N, C, H, W)
    y: Tensor  # int64, (N,)

    def __len__(self) -> int:
        return len(self.y)

    def subset(self, n: int | None) -> Split:
        """Return the first `n` examples (all when n is None)."""
        return self if n is None or n >= len(self) else Split(self.x[:n], self.y[:n])


@dataclass
class Dataset:
    """Three splits plus what a model needs to know about the inputs."""

    name: str
    train: Split
    val: Split
    test: Split
    num_classes: int
    augment: Callable[[Tensor, torch.Generator], Tensor] | None = None

    @property
    def input_shape(self) -> tuple[int, ...]:
        return (1, *self.train.x.shape[1:])


_DATASETS: dict[str, Callable[..., Dataset]] = {}


def register_dataset(fn: Callable[..., Dataset]) -> Callable[..., Dataset]:
    """Register a dataset loader under its name with '_' spelled '-'; returns it unchanged."""
    _DATASETS[fn.__name__.replace("_", "-")] = fn
    return fn


def list_datasets() -> list[str]:
    """Return the registered dataset names."""
    return sorted(_DATASETS)


def load_dataset(name: str, data_dir: str | os.PathLike | None = None, **kwargs) -> Dataset:
    """Return the dataset `name`; raise DataError naming the missing files and where to put them."""
    if name not in _DATASETS:
        raise DataError(f"unknown dataset '{name}'; choose one of {', '.join(list_datasets())}")
    return _DATASETS[name](data_dir=data_dir, **kwargs)


def batches(
    split: Split,
    batch_size: int,
    shuffle: bool = False,
    generator: torch.Generator | None = None,
    augment: Callable[[Tensor, torch.Generator], Tensor] | None = None,
) -> Iterator[tuple[Tensor, Tensor]]:
    """Yield (x, y) mini-batches, shuffled and augmented when asked."""
    n = len(split)
    order = torch.randperm(n, generator=generator) if shuffle else torch.arange(n)
    for i in range(0, n, batch_size):
        idx = order[i : i + batch_size]
        x = split.x[idx]
        if augment is not None:
            x = augment(x, generator)
        yield x, split.y[idx]


def random_crop(pad: int, flip: bool) -> Callable[[Tensor, torch.Generator], Tensor]:
    """Return an augmentation: zero-pad by `pad`, crop back at a random offset, optionally h-flip."""

    def augment(x: Tensor, gen: torch.Generator | None) -> Tensor:
        n, _, h, w = x.shape
        padded = torch.nn.functional.pad(x, (pad, pad, pad, pad))
        dy = torch.randint(0, 2 * pad + 1, (n,), generator=gen)
        dx = torch.randint(0, 2 * pad + 1, (n,), generator=gen)
        rows = (dy[:, None] + torch.arange(h))[:, None, :, None].expand(n, x.shape[1], h, w + 2 * pad)
        out = padded.gather(2, rows)
        cols = (dx[:, None] + torch.arange(w))[:, None, None, :].expand(n, x.shape[1], h, w)
        out = out.gather(3, cols)
        if flip:
            mirror = torch.rand(n, generator=gen) < 0.5
            out[mirror] = out[mirror].flip(3)
        return out

    return augment


def _carve(x: Tensor, y: Tensor, val: int, seed: int = 0) -> tuple[Split, Split]:
    perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed))
    return Split(x[perm[val:]], y[perm[val:]]), Split(x[perm[:val]], y[perm[:val]])


def _normalise(x: Tensor, mean: Tensor | None = None, std: Tensor | None = None):
    mean = x.mean(dim=(0, 2, 3), keepdim=True) if mean is None else mean
    std = x.std(dim=(0, 2, 3), keepdim=True) if std is None else std
    return (x - mean) / std, mean, std


def _read_idx(path: Path) -> np.ndarray:
    with gzip.open(path, "rb") as f:
        data = f.read()
    if data[:2] != b"\x00\x00" or data[2] != 0x08:
        raise ValueError(f"{path.name} is not an unsigned-byte IDX file")
    ndim = data[3]
    dims = struct.unpack(f">{ndim}I", data[4 : 4 + 4 * ndim])
    return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim).reshape(dims)


@register_dataset
def fashion_mnist(data_dir=None, val_size: int = 5000, **_) -> Dataset:
    """Fashion-MNIST from Debian's dataset-fashion-mnist package or a folder with the same gz files."""
    root = Path(data_dir) if data_dir else FASHION_MNIST_DIR
    missing = [f for f in FASHION_FILES if not (root / f).is_file()]
    if missing:
        raise DataError(
            f"Fashion-MNIST files missing in {root}: {', '.join(missing)}. Install them with "
            "`apt-get install dataset-fashion-mnist`, or pass --data-dir to a folder holding the four "
            "gzipped IDX files"
        )
    try:
        arrays = [_read_idx(root / f) for f in FASHION_FILES]
    except (OSError, EOFError, ValueError, struct.error, zlib.error) as exc:
        raise DataError(
            f"cannot parse Fashion-MNIST files in {root} ({type(exc).__name__}: {exc}); they are truncated or "
            "damaged, so reinstall them (`apt-get install --reinstall dataset-fashion-mnist`) or copy them again"
        ) from exc
    if len(arrays[0]) != len(arrays[1]) or len(arrays[2]) != len(arrays[3]):
        raise DataError(f"Fashion-MNIST files in {root} disagree on the number of examples; copy them again")
    xtr = torch.from_numpy(arrays[0].copy()).float().div_(255).unsqueeze(1)
    xte = torch.from_numpy(arrays[2].copy()).float().div_(255).unsqueeze(1)
    xtr, mean, std = _normalise(xtr)
    xte, _, _ = _normalise(xte, mean, std)
    ytr, yte = torch.from_numpy(arrays[1].astype(np.int64)), torch.from_numpy(arrays[3].astype(np.int64))
    train, val = _carve(xtr, ytr, val_size)
    return Dataset("fashion-mnist", train, val, Split(xte, yte), 10, random_crop(2, flip=False))


def _unpickle(path: Path) -> dict:
    with open(path, "rb") as f:
        return pickle.load(f, encoding="bytes")


def download_cifar(name: str, root: Path) -> None:
    """Fetch and unpack the CIFAR archive into `root` (needs a network)."""
    root.mkdir(parents=True, exist_ok=True)
    archive = root / Path(CIFAR_URLS[name]).name
    tmp = archive.with_suffix(".part")
    try:
        urllib.request.urlretrieve(CIFAR_URLS[name], tmp)
    except OSError as exc:
        raise DataError(f"downloading {CIFAR_URLS[name]} failed ({exc}); put the folder there by hand") from exc
    os.replace(tmp, archive)
    with tarfile.open(archive) as tar:
        tar.extractall(root, filter="data")


def _cifar(name: str, data_dir, val_size: int, download: bool) -> Dataset:
    root = Path(data_dir) if data_dir else cache_dir() / "data"
    folder = root / CIFAR_FOLDERS[name]
    if not folder.is_dir() and download:
        download_cifar(name, root)
    if not folder.is_dir():
        raise DataError(
            f"{name} folder '{folder}' not found. Put the python version of the dataset there (unpack "
            f"{Path(CIFAR_URLS[name]).name} in {root}), pass --data-dir to the folder that holds "
            f"'{CIFAR_FOLDERS[name]}', or add --download where a network is available"
        )
    if name == "cifar10":
        train_files, test_files, key = [f"data_batch_{i}" for i in range(1, 6)], ["test_batch"], b"labels"
    else:
        train_files, test_files, key = ["train"], ["test"], b"fine_labels"
    try:
        parts = {
            split: [_unpickle(folder / f) for f in files]
            for split, files in (("train", train_files), ("test", test_files))
        }
    except (OSError, pickle.UnpicklingError, EOFError, ValueError) as exc:
        raise DataError(
            f"cannot read {name} from {folder} ({type(exc).__name__}: {exc}); copy the files again"
        ) from exc

    def stack(dicts):
        x = np.concatenate([d[b"data"] for d in dicts]).reshape(-1, 3, 32, 32)
        y = np.concatenate([np.asarray(d[key], dtype=np.int64) for d in dicts])
        return torch.from_numpy(x).float().div_(255), torch.from_numpy(y)

    try:
        xtr, ytr = stack(parts["train"])
        xte, yte = stack(parts["test"])
    except (KeyError, ValueError, TypeError) as exc:
        raise DataError(f"{name} files in {folder} are damaged ({type(exc).__name__}: {exc}); copy them again") from exc
    xtr, mean, std = _normalise(xtr)
    xte, _, _ = _normalise(xte, mean, std)
    train, val = _carve(xtr, ytr, min(val_size, len(ytr) // 10))
    classes = 10 if name == "cifar10" else 100
    return Dataset(name, train, val, Split(xte, yte), classes, random_crop(4, flip=True))


@register_dataset
def cifar10(data_dir=None, val_size: int = 5000, download: bool = False, **_) -> Dataset:
    """CIFAR-10, python format (cifar-10-batches-py) in a local folder."""
    return _cifar("cifar10", data_dir, val_size, download)


@register_dataset
def cifar100(data_dir=None, val_size: int = 5000, download: bool = False, **_) -> Dataset:
    """CIFAR-100, python format (cifar-100-python) in a local folder."""
    return _cifar("cifar100", data_dir, val_size, download)


@register_dataset
def digits(data_dir=None, **_) -> Dataset:
    """sklearn's bundled 8x8 digits (1,797 images): for the tiniest end-to-end runs."""
    try:
        from sklearn.datasets import load_digits
    except ImportError as exc:
        raise DataError("the digits dataset needs scikit-learn: pip install scikit-learn") from exc
    d = load_digits()
    x = torch.from_numpy(d.images.astype(np.float32) / 16).unsqueeze(1)
    y = torch.from_numpy(d.target.astype(np.int64))
    rest, test = _carve(x, y, 360, seed=1)
    train, val = _carve(rest.x, rest.y, 180)
    xtr, mean, std = _normalise(train.x)
    return Dataset(
        "digits",
        Split(xtr, train.y),
        Split(_normalise(val.x, mean, std)[0], val.y),
        Split(_normalise(test.x, mean, std)[0], test.y),
        10,
        random_crop(1, flip=False),
    )


@register_dataset
def synthetic(
    data_dir=None,
    shape: tuple[int, ...] = (1, 12, 12),
    n: int = 1200,
    num_classes: int = 4,
    seed: int = 0,
    **_,
) -> Dataset:
    """Random images whose labels a fixed random linear map decides: learnable, instant, for unit tests."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn((n, *shape), generator=gen)
    w = torch.randn(int(np.prod(shape)), num_classes, generator=gen)
    y = (x.flatten(1) @ w).argmax(1)
    rest, test = _carve(x, y, n // 6, seed=seed + 1)
    train, val = _carve(rest.x, rest.y, n // 6, seed=seed)
    return Dataset("synthetic", train, val, test, num_classes)
