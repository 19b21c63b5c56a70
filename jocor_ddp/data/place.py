"""Placement: how stored uint8 pixels become the model's input, on the training device.

Every source keeps each image as a fixed-shape uint8 square ("stored view": the native
image for MNIST / CIFAR, the ``resize`` x ``resize`` centre of the resized image for
Clothing1M and ImageFolder) and hands the step only those pixels, the samples' indices
and their crop parameters. Crop, flip, ``to_float`` and normalisation then run here, in
one fixed set of batched ops, inside the step (and its CUDA graph). The crop parameters
are a function of (seed, epoch, sample index) alone, so a sample gets the same crop from
the memory source, the device cache and the stream, on any rank, worker or step.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch

from .sources import DataError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# Datasets of variable image size: resize the shorter side, then crop a square.
RESIZED = ("clothing1m", "imagefolder")
PAD = 4  # the native sets' random crop: pad 4, crop back to size (data.augment)


@dataclass(frozen=True)
class Geometry:
    channels: int
    native: Optional[tuple[int, int]]  # (H, W): used as stored; None: resize, then crop
    resize: int
    crop: int
    pad_augment: bool  # native images only: pad-4 random crop and flip (data.augment)
    prepared_resize: Optional[int] = None  # the short side prepare --resize stored, if any

    @property
    def side(self) -> int:
        """The side the model sees."""
        return self.native[0] if self.native else self.crop

    @property
    def stored(self) -> tuple[int, int]:
        """(H, W) of the uint8 view every source keeps: random training crops are taken inside it."""
        return self.native or (self.resize, self.resize)

    @property
    def random(self) -> bool:
        """Whether training draws crops and flips."""
        return self.native is None or self.pad_augment


def geometry(cfg, manifest) -> Geometry:
    image = manifest.image
    channels = int(image["channels"])
    if manifest.dataset in RESIZED or image.get("height") is None:
        stored = image.get("resize")
        if stored is not None and int(stored) < cfg.data.resize_size:
            raise DataError(f"{manifest.root}: the shards were prepared with --resize {stored}, smaller than "
                            f"data.resize_size {cfg.data.resize_size}: set data.resize_size<={stored} (and "
                            f"data.crop_size<=it), or re-run prepare with --resize {cfg.data.resize_size}")
        return Geometry(channels, None, cfg.data.resize_size, cfg.data.crop_size, False,
                        None if stored is None else int(stored))
    return Geometry(channels, (int(image["height"]), int(image["width"])), 0, 0, cfg.data.augment)


def native_geometry(images: np.ndarray, augment: bool) -> Geometry:
    """The geometry of an in-memory split (uint8 NHWC)."""
    _, h, w, c = images.shape
    return Geometry(int(c), (int(h), int(w)), 0, 0, augment)


# --- crop parameters: (seed, epoch, sample index) -> (top, left, flip) -------------------

def _mix(z: np.ndarray) -> np.ndarray:
    """splitmix64, elementwise on uint64 (wrapping arithmetic)."""
    with np.errstate(over="ignore"):
        z = z + np.uint64(0x9E3779B97F4A7C15)
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return z ^ (z >> np.uint64(31))


def sample_uniforms(seed: int, epoch: int, idx, k: int = 3) -> np.ndarray:
    """(len(idx), k) uniforms in [0, 1) that depend on (seed, epoch, sample index) alone:
    a sample gets the same crop and flip whichever rank, worker or step meets it."""
    key = _mix(np.array([seed % 2**64], dtype=np.uint64) ^ _mix(np.array([epoch % 2**64], dtype=np.uint64)))
    z = np.asarray(idx, dtype=np.int64).astype(np.uint64) ^ key
    cols = []
    for _ in range(k):
        z = _mix(z)
        cols.append((z >> np.uint64(11)).astype(np.float64) * 2.0**-53)
    return np.stack(cols, axis=1)


def crop_params(geo: Geometry, seed: int, epoch: int, idx) -> np.ndarray:
    """(n, 3) int64 (top, left, flip) of training crops inside the stored view: one call a batch
    (or an epoch). Without random augmentation: zeros, which ``Placement.train`` ignores."""
    idx = np.asarray(idx)
    if not geo.random:
        return np.zeros((idx.shape[0], 3), dtype=np.int64)
    u = sample_uniforms(seed, epoch, idx)
    room = 2 * PAD + 1 if geo.native else geo.resize - geo.crop + 1
    return np.stack([(u[:, 0] * room).astype(np.int64), (u[:, 1] * room).astype(np.int64),
                     (u[:, 2] < 0.5).astype(np.int64)], axis=1)


# --- on the device ------------------------------------------------------------------

def to_float(images_u8: torch.Tensor) -> torch.Tensor:
    """uint8 NCHW -> float in [0, 1]: torchvision's ToTensor, the reference's only transform."""
    return images_u8.float().div_(255.0)


def crop_flip_batch(x: torch.Tensor, tops: torch.Tensor, lefts: torch.Tensor, size: int,
                    flips: torch.Tensor) -> torch.Tensor:
    """Per-sample size x size crops at (top, left), flipped where asked: one gather on the device."""
    ar = torch.arange(size, device=x.device)
    rows = tops[:, None] + ar
    cols = lefts[:, None] + torch.where(flips[:, None].bool(), ar.flip(0), ar)
    batch = torch.arange(x.shape[0], device=x.device)[:, None, None]
    return x[batch, :, rows[:, :, None], cols[:, None, :]].permute(0, 3, 1, 2)


class Placement:
    """Stored uint8 views -> the model's float input: the same few batched ops for every
    source, whatever the batch size (nothing per image)."""

    def __init__(self, geo: Geometry, device: torch.device):
        self.geo = geo
        self.normalize = geo.native is None  # ImageNet statistics for the resized sets
        self.mean = torch.tensor(IMAGENET_MEAN, device=device).view(1, 3, 1, 1)
        self.std = torch.tensor(IMAGENET_STD, device=device).view(1, 3, 1, 1)

    def _finish(self, x_u8: torch.Tensor) -> torch.Tensor:
        x = to_float(x_u8.contiguous())
        return (x - self.mean) / self.std if self.normalize else x

    def train(self, x_u8: torch.Tensor, params: torch.Tensor) -> torch.Tensor:
        """Training view: random crops and flips per ``params`` (n, 3), where the geometry has any."""
        geo = self.geo
        if not geo.random:
            return self._finish(x_u8)
        if geo.native:
            x_u8 = torch.nn.functional.pad(x_u8, (PAD, PAD, PAD, PAD))
        size = geo.native[0] if geo.native else geo.crop
        return self._finish(crop_flip_batch(x_u8, params[:, 0], params[:, 1], size, params[:, 2]))

    def eval(self, x_u8: torch.Tensor) -> torch.Tensor:
        """Evaluation view: the native image, or the central crop of the stored square."""
        if self.geo.native:
            return self._finish(x_u8)
        lo = int(round((self.geo.resize - self.geo.crop) / 2.0))  # as torchvision's center_crop
        return self._finish(x_u8[:, :, lo:lo + self.geo.crop, lo:lo + self.geo.crop])
