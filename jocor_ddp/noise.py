"""Synthetic label noise, as the JoCoR reference implementation defines it, and the
instance-dependent (part-dependent) noise of Xia et al. (NeurIPS 2020).

The noisy labels are a pure function of (clean labels, noise type, rate, noise seed, and for
instance noise the training images): they are computed once on the whole training split,
before anything is divided among ranks, so neither the training seed nor the world size can
change them.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Optional, Union

import numpy as np

from .checkpoint import load_weights_only
from .config import ConfigError, NoiseConfig


@dataclass
class NoiseInfo:
    type: str
    rate: float
    seed: int
    # The requested C x C matrix (row: clean, column: noisy); None where no matrix was
    # requested: label files, and instance noise (each sample has its own row).
    transition: Optional[list]
    actual_rate: float  # share of training labels that differ from the clean ones
    empirical_transition: Optional[list] = None  # the drawn labels' clean -> noisy counts, rows normalised

    def to_dict(self) -> dict:
        return dict(type=self.type, rate=self.rate, seed=self.seed, actual_rate=self.actual_rate,
                    transition=self.transition, empirical_transition=self.empirical_transition)


def _flip_pairs(dataset: str, num_classes: int) -> list[tuple[int, int]]:
    """Class pairs (source -> target) that asymmetric noise flips."""
    if dataset in ("mnist", "fashion-mnist") and num_classes == 10:
        # The reference's MNIST mapping: 7->1, 2->7, 5<->6, 3->8 (applied to Fashion-MNIST
        # class indices as well, so that the demo uses the same matrix).
        return [(7, 1), (2, 7), (5, 6), (6, 5), (3, 8)]
    if dataset == "cifar10":
        # truck -> automobile, bird -> airplane, cat <-> dog, deer -> horse
        return [(9, 1), (2, 0), (3, 5), (5, 3), (4, 7)]
    if dataset == "cifar100":
        if num_classes % 5:
            raise ConfigError("noise.type: asymmetric CIFAR-100 noise needs a multiple of 5 classes")
        # Cyclic inside each block of five consecutive class indices.
        return [(b + i, b + (i + 1) % 5) for b in range(0, num_classes, 5) for i in range(5)]
    raise ConfigError(f"noise.type: 'asymmetric' is defined for mnist, fashion-mnist, cifar10 and "
                      f"cifar100, not for {dataset!r}; use symmetric, pairflip or file")


def transition_matrix(noise_type: str, rate: float, num_classes: int, dataset: str) -> np.ndarray:
    """The requested P[clean, noisy] in float64; every row sums to 1."""
    c = num_classes
    if noise_type == "none" or rate == 0.0:
        return np.eye(c)
    if noise_type == "symmetric":
        # JoCoR's convention: the whole rate goes off the diagonal, n/(C-1) to each class.
        p = np.full((c, c), rate / (c - 1))
        np.fill_diagonal(p, 1.0 - rate)
        return p
    if noise_type == "pairflip":
        p = np.eye(c) * (1.0 - rate)
        for i in range(c):
            p[i, (i + 1) % c] += rate
        return p
    if noise_type == "asymmetric":
        p = np.eye(c)
        for src, dst in _flip_pairs(dataset, c):
            p[src, src] = 1.0 - rate
            p[src, dst] = rate
        return p
    raise ConfigError(f"noise.type: no transition matrix for {noise_type!r}")


def apply_transition(clean: np.ndarray, p: np.ndarray, seed: int) -> np.ndarray:
    """Draw noisy[i] ~ P[clean[i], :] by inverse CDF with one uniform per sample."""
    clean = np.asarray(clean, dtype=np.int64)
    return _draw(p[clean], np.random.default_rng(seed).random(clean.shape[0]))


def _draw(rows: np.ndarray, u: np.ndarray) -> np.ndarray:
    """Per sample i the class k with cdf[i, k-1] <= u[i] < cdf[i, k] of its own row."""
    cdf = np.cumsum(rows, axis=1)
    cdf[:, -1] = 1.0  # guard against rows summing to 1 - 1e-16
    return (u[:, None] >= cdf).sum(axis=1).astype(np.int64)


# --- instance-dependent noise -------------------------------------------------------------
#
# The part-dependent generator (xiaoboxia/Part-dependent-label-noise, tools.py:
# get_instance_noisy_label), which Co-learning and most later papers use: per sample a flip
# rate q_i ~ N(rate, 0.1^2) truncated to [0, 1]; per clean class y a projection W_y
# (features x classes) of N(0, 1) entries; sample i's label stays with probability 1 - q_i and
# goes to class k != y with probability q_i softmax(x_i W_y)[k], the own class masked (-inf)
# out of the softmax. x_i is the stored view (uint8, HWC) flattened, as raw pixel values 0-255,
# as the original feeds it (not scaled to [0, 1] as ToTensor does, nor normalised as Co-learning
# does): the noise the published part-dependent benchmarks drew. The scale is a softmax
# temperature: at 0-255 each image, when it flips, goes to one class of its own. Measured on
# Fashion-MNIST at rate 0.4, seed 0 (docs/training.md, Noise): the off-diagonal distributions'
# mean top-1 share is 0.9995 (0.002 bits of entropy; 0.884 and 0.42 bits with [0, 1] pixels,
# 0.957 and 0.15 bits standardised); the class-level transition matrix barely moves (raw
# against [0, 1]: at most 0.013 per entry): each class still flips to ~4 classes, by image.
#
# The draw's stream layout, from noise.seed alone: SeedSequence(seed).spawn(3) gives three
# generators: 0 the flip rates (one uniform per sample, by inverse CDF), 1 the projections
# (C x F x C standard normals, class-major), 2 the label draw (one uniform per sample).

FLIP_STD = 0.1  # the generator's norm_std
PIXEL_SCALE = 1.0  # what one unit of a stored uint8 pixel is worth in x: raw 0-255
# W is rounded to multiples of 2^-24 (an error below 6e-8 per entry): every product of a uint8
# pixel and an entry, and every partial sum of up to ~350,000 of them, is then exact in float64,
# so x W_y is the same bits whatever the order of summation (BLAS blocking, chunk sizes, the
# machine): the memory source, the device cache and the stream draw the same labels.
W_QUANTUM = 2.0 ** -24
EXACT_LIMIT = 2.0 ** (53 - 24)  # below it, every sum of multiples of W_QUANTUM is exact


def _normal_cdf(z: float) -> float:
    return 0.5 * (1.0 + math.erf(z / math.sqrt(2.0)))


def truncated_normal(u: np.ndarray, mean: float, std: float, lo: float = 0.0, hi: float = 1.0) -> np.ndarray:
    """N(mean, std^2) truncated to [lo, hi], one uniform u in [0, 1) per value, by inverse CDF
    (float64), the distribution of scipy.stats.truncnorm((lo - mean) / std, (hi - mean) / std,
    loc=mean, scale=std)."""
    import torch
    a, b = _normal_cdf((lo - mean) / std), _normal_cdf((hi - mean) / std)
    z = torch.special.ndtri(torch.from_numpy(a + np.asarray(u, dtype=np.float64) * (b - a))).numpy()
    return np.clip(mean + std * z, lo, hi)


class InstanceNoise:
    """The part-dependent generator over one training split of ``features`` values per image,
    fed its images in chunks of any size and order (``add``); ``labels`` then draws. Samples
    never fed (images that do not decode, skipped) flip uniformly: they are never trained on."""

    def __init__(self, clean: np.ndarray, num_classes: int, rate: float, seed: int, features: int):
        self.clean = np.asarray(clean, dtype=np.int64)
        n, c = len(self.clean), num_classes
        flips, projections, draws = (np.random.default_rng(s) for s in np.random.SeedSequence(seed).spawn(3))
        self.flip = truncated_normal(flips.random(n), rate, FLIP_STD)
        w = projections.standard_normal((c, features, c))
        w /= W_QUANTUM
        np.rint(w, out=w)
        w *= W_QUANTUM
        if 255 * np.abs(w).sum(axis=1).max() >= EXACT_LIMIT:
            raise ConfigError(f"noise.type: instance: {features} features per image are too many for "
                              f"exact float64 projections")
        self.w = w
        self.u = draws.random(n)
        self.logits = np.zeros((n, c))  # x_i W_{y_i}, in pixel units
        self.fed = np.zeros(n, dtype=bool)

    def add(self, idx: np.ndarray, images: np.ndarray) -> None:
        """Samples ``idx`` (indices into the split) and their uint8 images (any shape per image)."""
        idx = np.asarray(idx, dtype=np.int64)
        x = np.asarray(images).reshape(len(idx), -1).astype(np.float64)
        y = self.clean[idx]
        for cls in np.unique(y):
            rows = y == cls
            self.logits[idx[rows]] = x[rows] @ self.w[cls]
        self.fed[idx] = True

    def flip_distributions(self, scale: float = PIXEL_SCALE) -> np.ndarray:
        """P[i, k]: sample i's probability of the noisy label k (its own row of a transition matrix)."""
        n = len(self.clean)
        a = self.logits * scale
        own = (np.arange(n), self.clean)
        a[own] = -np.inf
        a -= a.max(axis=1, keepdims=True)
        p = np.exp(a)
        p *= (self.flip / p.sum(axis=1))[:, None]
        p[own] = 1.0 - self.flip
        return p

    def labels(self, scale: float = PIXEL_SCALE) -> np.ndarray:
        return _draw(self.flip_distributions(scale), self.u)


ImageChunks = Iterable[tuple[np.ndarray, np.ndarray]]  # (sample indices, their uint8 images)
CHUNK = 4096  # images per matmul: a bounded float64 copy of the pixels


def array_chunks(images: np.ndarray) -> ImageChunks:
    """An in-memory split's images (N, ...) as chunks."""
    for lo in range(0, len(images), CHUNK):
        yield np.arange(lo, min(lo + CHUNK, len(images))), images[lo:lo + CHUNK]


def instance_noisy_labels(images: Union[np.ndarray, ImageChunks], clean: np.ndarray, num_classes: int,
                          rate: float, seed: int, features: Optional[int] = None) -> np.ndarray:
    """The part-dependent generator's labels of one training split: ``images`` the uint8 images
    in sample order (N, ...), or chunks of them with ``features`` values per image."""
    if isinstance(images, np.ndarray):
        features, images = int(np.prod(images.shape[1:])), array_chunks(images)
    gen = InstanceNoise(clean, num_classes, rate, seed, features)
    for idx, chunk in images:
        gen.add(idx, chunk)
    return gen.labels()


def _entry(data: Any, key: Optional[str], path: str) -> Any:
    """The labels a loaded file holds: the whole file, or its entry ``key`` (a dict's: .json, torch)."""
    if isinstance(data, dict):
        names = sorted(map(str, data))
        if key is None:
            raise ConfigError(f"noise.file_key: {path} holds {names}; name one")
        if key not in data:
            raise ConfigError(f"noise.file_key: {key!r} not in {path}; it holds {names}")
        return data[key]
    if key is not None:
        raise ConfigError(f"noise.file_key: {key!r}, but {path} holds one {type(data).__name__} of labels, "
                          f"not named entries; leave noise.file_key unset")
    return data


def _integer_labels(raw: Any, path: str) -> np.ndarray:
    """``raw`` as a flat array of whole numbers (the dtype they came in), or an error naming
    the first sample that is not one: a cast would truncate 2.7 to 2 and NaN to a huge int."""
    labels = np.asarray(raw).reshape(-1)
    if labels.dtype.kind in "iu":
        return labels
    if labels.dtype.kind == "f":
        whole = np.isfinite(labels) & (labels == np.round(labels))
    elif labels.dtype.kind == "O":  # Python ints past int64 (a .json of huge numbers), or mixed kinds
        whole = np.array([isinstance(v, (int, np.integer)) and not isinstance(v, bool) for v in labels], dtype=bool)
    else:
        whole = np.zeros(labels.shape, dtype=bool)
    bad = np.flatnonzero(~whole)
    if bad.size:
        value = labels[bad[0]]
        raise ConfigError(f"noise.file: {path}: sample {bad[0]} has label "
                          f"{(value.item() if hasattr(value, 'item') else value)!r}, not a whole number")
    return labels


def load_label_file(path: str, key: Optional[str], n: int, num_classes: int) -> np.ndarray:
    """Per-sample labels from a user file (human-noise label sets such as CIFAR-10N)."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"noise.file: {path} not found")
    suffix = p.suffix.lower()
    try:
        if suffix == ".npy":
            labels = _entry(np.load(p, allow_pickle=False), key, path)
        elif suffix in (".txt", ".csv"):
            labels = _entry(np.array([int(line.split(",")[-1]) for line in p.read_text().split("\n")
                                      if line.strip()], dtype=np.int64), key, path)
        elif suffix == ".json":
            labels = _entry(json.loads(p.read_text()), key, path)
        elif suffix in (".pt", ".pth"):
            data = _entry(load_weights_only(p), key, path)
            labels = data.numpy() if hasattr(data, "numpy") else data
        else:
            raise ConfigError(f"noise.file: {path}: unsupported format {suffix!r} "
                              f"(use .npy, .txt, .csv, .json or .pt)")
        labels = _integer_labels(labels, path)
    except ConfigError:
        raise
    except Exception as exc:  # a corrupt or unsafe file: say which and why
        raise ConfigError(f"noise.file: cannot read labels from {path}: {exc}") from None
    if labels.shape[0] != n:
        raise ConfigError(f"noise.file: {path} has {labels.shape[0]} labels, the training split has {n}")
    bad = np.flatnonzero((labels < 0) | (labels >= num_classes))
    if bad.size:
        raise ConfigError(f"noise.file: {path}: sample {bad[0]} has label {labels[bad[0]]}, "
                          f"outside [0, {num_classes})")
    return labels.astype(np.int64)


def make_noisy_labels(cfg: NoiseConfig, clean: np.ndarray, num_classes: int, dataset: str,
                      images: Union[np.ndarray, ImageChunks, None] = None,
                      features: Optional[int] = None) -> tuple[np.ndarray, NoiseInfo]:
    """The training split's noisy labels and their record; instance noise also needs the
    split's images (see ``instance_noisy_labels``)."""
    clean = np.asarray(clean, dtype=np.int64)
    transition = None
    if cfg.type == "file":
        noisy = load_label_file(cfg.file, cfg.file_key, clean.shape[0], num_classes)
    elif cfg.type == "instance":
        if images is None:
            raise ConfigError(f"noise.type: instance needs the training images of {dataset}")
        noisy = instance_noisy_labels(images, clean, num_classes, cfg.rate, cfg.seed, features)
    else:
        p = transition_matrix(cfg.type, cfg.rate, num_classes, dataset)
        noisy = apply_transition(clean, p, cfg.seed)
        transition = p.tolist()
    actual = float((noisy != clean).mean()) if clean.size else 0.0
    empirical = empirical_transition(clean, noisy, num_classes).tolist()
    return noisy, NoiseInfo(cfg.type, cfg.rate, cfg.seed, transition, actual, empirical)


def empirical_transition(clean: np.ndarray, noisy: np.ndarray, num_classes: int) -> np.ndarray:
    """Counts of clean -> noisy, each row normalised (a row of a class without samples: zeros)."""
    counts = np.zeros((num_classes, num_classes))
    np.add.at(counts, (clean, noisy), 1)
    return counts / np.maximum(counts.sum(axis=1, keepdims=True), 1)
