"""Readers for the datasets' original file formats: IDX (MNIST, Fashion-MNIST) and the
CIFAR-10 / CIFAR-100 python pickles. Everything comes back as uint8 HWC arrays, so
the in-memory loader and the shard writer share one representation.
"""

from __future__ import annotations

import gzip
import pickle
import struct
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np


class DataError(RuntimeError):
    """Missing or malformed data; the message names the file and says what to do."""


def warn(msg: str) -> None:
    """A data problem that does not stop the run (data.on_bad_sample: skip)."""
    print(f"warning: {msg}", file=sys.stderr, flush=True)


@dataclass
class Split:
    images: np.ndarray  # uint8, (N, H, W, C)
    labels: np.ndarray  # int64, (N,), the labels as the source gives them

    def __len__(self) -> int:
        return int(self.labels.shape[0])


@dataclass
class ArrayDataset:
    name: str
    classes: list[str]
    train: Split
    test: Split

    @property
    def num_classes(self) -> int:
        return len(self.classes)


FASHION_MNIST_CLASSES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
                         "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"]
MNIST_CLASSES = [str(i) for i in range(10)]

IDX_DTYPES = {0x08: np.uint8, 0x09: np.int8, 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}

DATA_HINTS = {
    "fashion-mnist": "install it with `apt-get install dataset-fashion-mnist` (files land in "
                     "/usr/share/datasets/fashion-mnist) or point data.root at a folder holding "
                     "the four IDX files",
    "mnist": "download the four MNIST IDX files (train-images-idx3-ubyte.gz, ...) and point "
             "data.root at their folder",
    "cifar10": "download cifar-10-python.tar.gz, extract it and point data.root at the folder "
               "holding cifar-10-batches-py/ (or at that folder itself)",
    "cifar100": "download cifar-100-python.tar.gz, extract it and point data.root at the folder "
                "holding cifar-100-python/ (or at that folder itself)",
}


def read_idx(path: Path) -> np.ndarray:
    """An IDX file (gzipped or not) as a numpy array of its declared type and shape."""
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as f:
            data = f.read()
    except (OSError, EOFError) as exc:
        raise DataError(f"{path}: cannot read IDX file: {exc}") from None
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] not in IDX_DTYPES:
        raise DataError(f"{path}: not an IDX file (bad magic number)")
    ndim = data[3]
    header = 4 + 4 * ndim
    if len(data) < header:
        raise DataError(f"{path}: truncated IDX header")
    shape = struct.unpack(f">{ndim}I", data[4:header])
    dtype = np.dtype(IDX_DTYPES[data[2]])
    expected = int(np.prod(shape)) * dtype.itemsize
    if len(data) - header != expected:
        raise DataError(f"{path}: IDX body holds {len(data) - header} bytes, header promises {expected}")
    # A copy: frombuffer views of bytes are read-only, which torch warns about.
    return np.frombuffer(data, dtype=dtype, offset=header).reshape(shape).copy()


def _find(root: Path, stem: str, dataset: str) -> Path:
    for candidate in (root / stem, root / f"{stem}.gz", root / "raw" / stem, root / "raw" / f"{stem}.gz"):
        if candidate.is_file():
            return candidate
    raise DataError(f"{dataset}: {stem}[.gz] not found under {root}; {DATA_HINTS[dataset]}")


def _idx_split(root: Path, prefix: str, dataset: str) -> Split:
    images_path = _find(root, f"{prefix}-images-idx3-ubyte", dataset)
    labels_path = _find(root, f"{prefix}-labels-idx1-ubyte", dataset)
    images, labels = read_idx(images_path), read_idx(labels_path)
    if images.ndim != 3 or images.dtype != np.uint8:
        raise DataError(f"{images_path}: expected uint8 images of shape (N, H, W), got {images.dtype} {images.shape}")
    if labels.ndim != 1 or labels.shape[0] != images.shape[0]:
        raise DataError(f"{labels_path}: {labels.shape[0]} labels for {images.shape[0]} images in {images_path}")
    return Split(np.ascontiguousarray(images[..., None]), labels.astype(np.int64))


def load_idx_dataset(root: str, name: str) -> ArrayDataset:
    r = Path(root)
    if not r.is_dir():
        raise DataError(f"{name}: data.root {root} is not a folder; {DATA_HINTS[name]}")
    classes = FASHION_MNIST_CLASSES if name == "fashion-mnist" else MNIST_CLASSES
    return ArrayDataset(name, list(classes), _idx_split(r, "train", name), _idx_split(r, "t10k", name))


class _CifarUnpickler(pickle.Unpickler):
    """The CIFAR batches are pickles of dicts, lists, bytes and numpy arrays: allow exactly the
    globals that rebuild those, so that a crafted file cannot run code (plain pickle.load would)."""

    ALLOWED = {("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
               ("numpy", "ndarray"), ("numpy", "dtype"), ("numpy.core.multiarray", "scalar"),
               ("numpy._core.multiarray", "scalar"), ("_codecs", "encode")}

    def find_class(self, module: str, name: str):
        if (module, name) not in self.ALLOWED:
            raise pickle.UnpicklingError(f"refused global {module}.{name}: not part of a CIFAR batch")
        return super().find_class(module, name)


def _unpickle(path: Path) -> dict:
    if not path.is_file():
        raise DataError(f"{path}: not found")
    try:
        with open(path, "rb") as f:
            return _CifarUnpickler(f, encoding="bytes").load()
    except Exception as exc:
        raise DataError(f"{path}: not a readable CIFAR pickle: {exc}") from None


def _get(d: dict, key: str, path: Path):
    for k in (key.encode(), key):
        if k in d:
            return d[k]
    raise DataError(f"{path}: missing entry {key!r}")


def _cifar_split(paths: list[Path], label_key: str) -> Split:
    images, labels = [], []
    for p in paths:
        d = _unpickle(p)
        data = np.asarray(_get(d, "data", p), dtype=np.uint8)
        lab = np.asarray(_get(d, label_key, p), dtype=np.int64)
        if data.ndim != 2 or data.shape[1] != 3072 or data.shape[0] != lab.shape[0]:
            raise DataError(f"{p}: expected data of shape (N, 3072) and N labels, got {data.shape} and {lab.shape}")
        images.append(data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1))
        labels.append(lab)
    return Split(np.ascontiguousarray(np.concatenate(images)), np.concatenate(labels))


def _names(meta: dict, key: str, path: Path) -> list[str]:
    return [n.decode() if isinstance(n, bytes) else str(n) for n in _get(meta, key, path)]


def load_cifar(root: str, name: str) -> ArrayDataset:
    r = Path(root)
    folder = "cifar-10-batches-py" if name == "cifar10" else "cifar-100-python"
    if (r / folder).is_dir():
        r = r / folder
    if not r.is_dir():
        raise DataError(f"{name}: data.root {root} is not a folder; {DATA_HINTS[name]}")
    if name == "cifar10":
        if not (r / "data_batch_1").is_file():
            raise DataError(f"cifar10: data_batch_1 not found under {r}; {DATA_HINTS[name]}")
        train = _cifar_split([r / f"data_batch_{i}" for i in range(1, 6)], "labels")
        test = _cifar_split([r / "test_batch"], "labels")
        meta_path = r / "batches.meta"
        classes = _names(_unpickle(meta_path), "label_names", meta_path)
    else:
        if not (r / "train").is_file():
            raise DataError(f"cifar100: train not found under {r}; {DATA_HINTS[name]}")
        train = _cifar_split([r / "train"], "fine_labels")
        test = _cifar_split([r / "test"], "fine_labels")
        meta_path = r / "meta"
        classes = _names(_unpickle(meta_path), "fine_label_names", meta_path)
    return ArrayDataset(name, classes, train, test)


def load_arrays(name: str, root: str) -> ArrayDataset:
    if name in ("mnist", "fashion-mnist"):
        ds = load_idx_dataset(root, name)
    elif name in ("cifar10", "cifar100"):
        ds = load_cifar(root, name)
    else:
        raise DataError(f"data.name: {name!r} has no in-memory reader; prepare shards and use "
                        f"data.source: shards")
    for split_name, split in (("train", ds.train), ("test", ds.test)):
        bad = np.flatnonzero((split.labels < 0) | (split.labels >= ds.num_classes))
        if bad.size:
            raise DataError(f"{name} {split_name}: sample {bad[0]} has label {split.labels[bad[0]]}, "
                            f"outside [0, {ds.num_classes})")
        if len(split) == 0:
            raise DataError(f"{name} {split_name}: the split is empty")
    return ds


def subset(split: Split, n: Optional[int]) -> Split:
    if n is None or n >= len(split):
        return split
    return Split(split.images[:n], split.labels[:n])
