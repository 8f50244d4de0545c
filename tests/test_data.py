import gzip
import io
import pickle
import struct
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch

from relu_opt import data as data_mod
from relu_opt.data import FASHION_FILES, load_dataset, random_crop
from relu_opt.errors import DataError


def _idx(path, arr):
    header = struct.pack(">HBB", 0, 0x08, arr.ndim) + struct.pack(f">{arr.ndim}I", *arr.shape)
    with gzip.open(path, "wb") as f:
        f.write(header + arr.astype(np.uint8).tobytes())


@pytest.fixture
def fashion_dir(tmp_path):
    rng = np.random.default_rng(0)
    _idx(tmp_path / FASHION_FILES[0], rng.integers(0, 256, (300, 28, 28)))
    _idx(tmp_path / FASHION_FILES[1], np.arange(300) % 10)
    _idx(tmp_path / FASHION_FILES[2], rng.integers(0, 256, (50, 28, 28)))
    _idx(tmp_path / FASHION_FILES[3], np.arange(50) % 10)
    return tmp_path


def test_fashion_mnist_from_folder(fashion_dir):
    ds = load_dataset("fashion-mnist", fashion_dir, val_size=60)
    assert (len(ds.train), len(ds.val), len(ds.test)) == (240, 60, 50)
    assert ds.input_shape == (1, 1, 28, 28) and ds.num_classes == 10
    assert abs(float(ds.train.x.mean())) < 0.05  # normalised with train statistics
    assert sorted(torch.cat([ds.train.y, ds.val.y]).tolist()) == sorted((np.arange(300) % 10).tolist())
    assert torch.equal(ds.test.y, torch.arange(50) % 10)  # test order untouched


def test_fashion_mnist_missing_files(tmp_path):
    (tmp_path / FASHION_FILES[0]).write_bytes(b"")
    with pytest.raises(DataError, match=r"missing in .*train-labels-idx1-ubyte.gz.*apt-get install dataset-fashion"):
        load_dataset("fashion-mnist", tmp_path)


def _cifar_folder(root, name):
    rng = np.random.default_rng(1)
    if name == "cifar10":
        folder = root / "cifar-10-batches-py"
        folder.mkdir(parents=True)
        for i in range(1, 6):
            d = {b"data": rng.integers(0, 256, (20, 3072), dtype=np.uint8), b"labels": list(np.arange(20) % 10)}
            (folder / f"data_batch_{i}").write_bytes(pickle.dumps(d))
        (folder / "test_batch").write_bytes(
            pickle.dumps({b"data": rng.integers(0, 256, (10, 3072), dtype=np.uint8), b"labels": list(range(10))})
        )
    else:
        folder = root / "cifar-100-python"
        folder.mkdir(parents=True)
        (folder / "train").write_bytes(
            pickle.dumps({b"data": rng.integers(0, 256, (100, 3072), dtype=np.uint8), b"fine_labels": list(range(100))})
        )
        (folder / "test").write_bytes(
            pickle.dumps({b"data": rng.integers(0, 256, (10, 3072), dtype=np.uint8), b"fine_labels": list(range(10))})
        )
    return folder


@pytest.mark.parametrize("name,classes,n_train", [("cifar10", 10, 100), ("cifar100", 100, 100)])
def test_cifar_parsing(tmp_path, name, classes, n_train):
    folder = _cifar_folder(tmp_path, name)
    ds = load_dataset(name, tmp_path)
    assert ds.num_classes == classes and ds.input_shape == (1, 3, 32, 32)
    assert len(ds.train) + len(ds.val) == n_train and len(ds.val) == n_train // 10
    raw = pickle.loads((folder / ("test_batch" if name == "cifar10" else "test")).read_bytes())[b"data"]
    first = torch.from_numpy(raw[0].reshape(3, 32, 32).astype(np.float32) / 255)
    # The test image is the raw pixels, normalised per channel: check it is an affine map of them.
    got = ds.test.x[0]
    corr = np.corrcoef(first.flatten().numpy(), got.flatten().numpy())[0, 1]
    assert corr > 0.999


def test_cifar_missing_folder_says_where(tmp_path):
    with pytest.raises(DataError, match=r"cifar-10-batches-py' not found.*--data-dir.*--download"):
        load_dataset("cifar10", tmp_path)


def test_cifar_download_unpacks_archive(tmp_path, monkeypatch):
    src = tmp_path / "src"
    _cifar_folder(src, "cifar10")
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        tar.add(src / "cifar-10-batches-py", arcname="cifar-10-batches-py")

    def fake_urlretrieve(url, dest):
        assert url == data_mod.CIFAR_URLS["cifar10"]
        Path(dest).write_bytes(buf.getvalue())

    monkeypatch.setattr(data_mod.urllib.request, "urlretrieve", fake_urlretrieve)
    ds = load_dataset("cifar10", tmp_path / "dl", download=True)
    assert len(ds.test) == 10


def test_augmentation_is_a_shifted_crop():
    x = torch.arange(2 * 1 * 6 * 6, dtype=torch.float32).reshape(2, 1, 6, 6)
    out = random_crop(2, flip=False)(x, torch.Generator().manual_seed(0))
    assert out.shape == x.shape
    for i in range(2):
        vals = set(out[i].flatten().tolist()) - {0.0}
        assert vals <= set(x[i].flatten().tolist())
    same = random_crop(0, flip=False)(x, torch.Generator().manual_seed(0))
    assert torch.equal(same, x)


def test_small_datasets():
    d = load_dataset("digits")
    assert d.input_shape == (1, 1, 8, 8) and len(d.test) == 360
    s = load_dataset("synthetic")
    assert s.num_classes == 4 and len(s.train) + len(s.val) + len(s.test) == 1200
    with pytest.raises(DataError, match="unknown dataset 'mnist'"):
        load_dataset("mnist")
