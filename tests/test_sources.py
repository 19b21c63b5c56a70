"""Readers of the original formats, on generated files (and the real Fashion-MNIST when installed)."""

import gzip
import pickle

import numpy as np
import pytest

from helpers import FASHION_MNIST, make_cifar, make_mnist, write_idx
from jocor_ddp.data.sources import DataError, load_arrays, read_idx


@pytest.mark.parametrize("gz", [True, False])
def test_idx_round_trip(tmp_path, gz):
    a = np.random.default_rng(0).integers(0, 256, (5, 28, 28), dtype=np.uint8)
    path = tmp_path / ("x.idx.gz" if gz else "x.idx")
    write_idx(path, a)
    assert np.array_equal(read_idx(path), a)


def test_idx_errors_name_the_file(tmp_path):
    bad = tmp_path / "bad-idx"
    bad.write_bytes(b"\x01\x02\x03\x04rest")
    with pytest.raises(DataError, match="bad-idx: not an IDX file"):
        read_idx(bad)
    a = np.zeros((4, 3, 3), np.uint8)
    write_idx(tmp_path / "short", a)
    (tmp_path / "short").write_bytes((tmp_path / "short").read_bytes()[:-5])
    with pytest.raises(DataError, match="short: IDX body holds 31 bytes, header promises 36"):
        read_idx(tmp_path / "short")
    (tmp_path / "trunc.gz").write_bytes(gzip.compress(b"\x00\x00\x08\x01" + b"\x00\x00\x00\x09")[:-6])
    with pytest.raises(DataError, match="trunc.gz: cannot read IDX file"):
        read_idx(tmp_path / "trunc.gz")


@pytest.mark.parametrize("gz", [True, False])
def test_mnist_layout(tmp_path, gz):
    make_mnist(tmp_path, n_train=30, n_test=10, gz=gz)
    ds = load_arrays("mnist", str(tmp_path))
    assert ds.train.images.shape == (30, 28, 28, 1) and ds.test.images.shape == (10, 28, 28, 1)
    assert ds.train.labels.dtype == np.int64 and ds.num_classes == 10


def test_mismatched_label_count(tmp_path):
    make_mnist(tmp_path, n_train=30, n_test=10)
    write_idx(tmp_path / "train-labels-idx1-ubyte.gz", np.zeros(29, np.uint8))
    with pytest.raises(DataError, match="29 labels for 30 images"):
        load_arrays("mnist", str(tmp_path))


def test_label_out_of_range_names_the_sample(tmp_path):
    make_mnist(tmp_path, n_train=30, n_test=10)
    labels = np.zeros(30, np.uint8)
    labels[17] = 12
    write_idx(tmp_path / "train-labels-idx1-ubyte.gz", labels)
    with pytest.raises(DataError, match=r"mnist train: sample 17 has label 12, outside \[0, 10\)"):
        load_arrays("mnist", str(tmp_path))


@pytest.mark.parametrize("classes", [10, 100])
def test_cifar_pickles(tmp_path, classes):
    folder = make_cifar(tmp_path, classes=classes, n_train_per_batch=8, n_test=6)
    name = f"cifar{classes}"
    for root in (tmp_path, folder):  # the parent folder or the extracted folder itself
        ds = load_arrays(name, str(root))
        assert ds.train.images.shape == (40, 32, 32, 3) and ds.test.images.shape == (6, 32, 32, 3)
        assert ds.num_classes == classes
    # The pickle's rows are channel-planar (R plane, G plane, B plane): check the transpose.
    first = pickle.loads(((folder / "data_batch_1") if classes == 10 else (folder / "train")).read_bytes())
    row = np.asarray(first[b"data"][0])
    assert np.array_equal(ds.train.images[0, :, :, 1].reshape(-1), row[1024:2048])


def test_cifar_missing_batch(tmp_path):
    folder = make_cifar(tmp_path, n_train_per_batch=4, n_test=4)
    (folder / "data_batch_3").unlink()
    with pytest.raises(DataError, match="data_batch_3: not found"):
        load_arrays("cifar10", str(tmp_path))


@pytest.mark.skipif(not FASHION_MNIST.is_dir(), reason="dataset-fashion-mnist is not installed")
def test_real_fashion_mnist():
    ds = load_arrays("fashion-mnist", str(FASHION_MNIST))
    assert ds.train.images.shape == (60000, 28, 28, 1) and ds.test.images.shape == (10000, 28, 28, 1)
    assert np.bincount(ds.train.labels).tolist() == [6000] * 10
    assert ds.classes[9] == "Ankle boot"


def test_cifar_pickle_that_would_run_code_is_refused(tmp_path):
    folder = make_cifar(tmp_path, n_train_per_batch=4, n_test=4)
    marker = tmp_path / "pwned"

    class RunsCode:
        def __reduce__(self):
            import os
            return (os.system, (f"touch {marker}",))

    (folder / "data_batch_2").write_bytes(pickle.dumps({b"data": RunsCode(), b"labels": [0]}))
    with pytest.raises(DataError, match=r"data_batch_2: not a readable CIFAR pickle: refused global .*system"):
        load_arrays("cifar10", str(tmp_path))
    assert not marker.exists()
