"""Synthetic label noise, as the JoCoR reference implementation defines it.

The noisy labels are a pure function of (clean labels, noise type, rate, noise seed):
they are computed once on the whole training split, before anything is divided among
ranks, so neither the training seed nor the world size can change them.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np

from .config import ConfigError, NoiseConfig


@dataclass
class NoiseInfo:
    type: str
    rate: float
    seed: int
    transition: Optional[list]  # requested C x C matrix (row: clean, column: noisy); None for files
    actual_rate: float  # share of training labels that differ from the clean ones

    def to_dict(self) -> dict:
        return dict(type=self.type, rate=self.rate, seed=self.seed,
                    actual_rate=self.actual_rate, transition=self.transition)


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
    u = np.random.default_rng(seed).random(clean.shape[0])
    cdf = np.cumsum(p, axis=1)
    cdf[:, -1] = 1.0  # guard against rows summing to 1 - 1e-16
    noisy = (u[:, None] >= cdf[clean]).sum(axis=1)
    return noisy.astype(np.int64)


def load_label_file(path: str, key: Optional[str], n: int, num_classes: int) -> np.ndarray:
    """Per-sample labels from a user file (human-noise label sets such as CIFAR-10N)."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"noise.file: {path} not found")
    suffix = p.suffix.lower()
    try:
        if suffix == ".npy":
            labels = np.load(p, allow_pickle=False)
        elif suffix in (".txt", ".csv"):
            labels = np.array([int(line.split(",")[-1]) for line in p.read_text().split("\n")
                               if line.strip()], dtype=np.int64)
        elif suffix == ".json":
            data = json.loads(p.read_text())
            labels = np.asarray(data[key] if key else data, dtype=np.int64)
        elif suffix in (".pt", ".pth"):
            import torch
            data = torch.load(p, map_location="cpu", weights_only=True)
            if isinstance(data, dict):
                if key is None:
                    raise ConfigError(f"noise.file_key: {path} holds {sorted(data)}; name one")
                if key not in data:
                    raise ConfigError(f"noise.file_key: {key!r} not in {path}; it holds {sorted(data)}")
                data = data[key]
            labels = np.asarray(data.numpy() if hasattr(data, "numpy") else data, dtype=np.int64)
        else:
            raise ConfigError(f"noise.file: {path}: unsupported format {suffix!r} "
                              f"(use .npy, .txt, .csv, .json or .pt)")
    except ConfigError:
        raise
    except Exception as exc:  # a corrupt or unsafe file: say which and why
        raise ConfigError(f"noise.file: cannot read labels from {path}: {exc}") from None
    labels = np.asarray(labels).reshape(-1)
    if labels.shape[0] != n:
        raise ConfigError(f"noise.file: {path} has {labels.shape[0]} labels, the training split has {n}")
    bad = np.flatnonzero((labels < 0) | (labels >= num_classes))
    if bad.size:
        raise ConfigError(f"noise.file: {path}: sample {bad[0]} has label {labels[bad[0]]}, "
                          f"outside [0, {num_classes})")
    return labels.astype(np.int64)


def make_noisy_labels(cfg: NoiseConfig, clean: np.ndarray, num_classes: int,
                      dataset: str) -> tuple[np.ndarray, NoiseInfo]:
    clean = np.asarray(clean, dtype=np.int64)
    if cfg.type == "file":
        noisy = load_label_file(cfg.file, cfg.file_key, clean.shape[0], num_classes)
        transition = None
    else:
        p = transition_matrix(cfg.type, cfg.rate, num_classes, dataset)
        noisy = apply_transition(clean, p, cfg.seed)
        transition = p.tolist()
    actual = float((noisy != clean).mean()) if clean.size else 0.0
    return noisy, NoiseInfo(cfg.type, cfg.rate, cfg.seed, transition, actual)


def empirical_transition(clean: np.ndarray, noisy: np.ndarray, num_classes: int) -> np.ndarray:
    counts = np.zeros((num_classes, num_classes))
    np.add.at(counts, (clean, noisy), 1)
    return counts / np.maximum(counts.sum(axis=1, keepdims=True), 1)
