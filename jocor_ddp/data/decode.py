"""How a sample stored in a shard becomes the model's input: decoding, the split's geometry
(native size, or resize then crop), random crops drawn from (seed, epoch, sample index)
alone, ImageNet normalisation; and the DataLoader worker processes that decode, for the
device cache (``cache.py``) and the stream (``stream.py``) alike."""

from __future__ import annotations

import re
import signal
from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch
import torchvision.transforms.v2.functional as TF
from torch.utils.data import DataLoader, IterableDataset, get_worker_info
from torchvision.io import ImageReadMode, decode_image

from ..config import Config
from .shards import Manifest, Record
from .sources import DataError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# Datasets of variable image size: resize the shorter side, then crop a square.
RESIZED = ("clothing1m", "imagefolder")


# --- geometry: how a stored image becomes the model's input --------------------------

@dataclass(frozen=True)
class Geometry:
    channels: int
    native: Optional[tuple[int, int]]  # (H, W): used as stored; None: resize, then crop
    resize: int
    crop: int
    pad_augment: bool  # native images only: pad-4 random crop and flip (data.augment)

    @property
    def side(self) -> int:
        """The side the model sees."""
        return self.native[0] if self.native else self.crop

    @property
    def cached(self) -> tuple[int, int]:
        """The side of a device-cache entry: random training crops are taken inside it."""
        return self.native or (self.resize, self.resize)


def geometry(cfg: Config, manifest: Manifest) -> Geometry:
    image = manifest.image
    channels = int(image["channels"])
    if manifest.dataset in RESIZED or image.get("height") is None:
        return Geometry(channels, None, cfg.data.resize_size, cfg.data.crop_size, False)
    return Geometry(channels, (int(image["height"]), int(image["width"])), 0, 0, cfg.data.augment)


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


def reason(exc: Exception) -> str:
    # torchvision prefixes 'decode_jpeg, /path/decode_jpeg.cpp:171, '.
    return re.sub(r"^\w+, \S+:\d+, ", "", str(exc))


def decode(rec: Record, channels: int) -> torch.Tensor:
    mode = ImageReadMode.GRAY if channels == 1 else ImageReadMode.RGB
    try:
        return decode_image(torch.frombuffer(bytearray(rec.image), dtype=torch.uint8), mode=mode)
    except RuntimeError as exc:
        raise DataError(f"{rec.where()}: the image does not decode: {reason(exc)}") from None


def place(img: torch.Tensor, geo: Geometry, u: Optional[np.ndarray], where: str) -> torch.Tensor:
    """One decoded CHW uint8 image -> the model's side. ``u`` (three uniforms) gives a
    training sample its random crop and flip; None gives the evaluation view."""
    if geo.native:
        if tuple(img.shape) != (geo.channels, *geo.native):
            raise DataError(f"{where}: image of shape {tuple(img.shape)}, the manifest says "
                            f"{(geo.channels, *geo.native)}")
        if u is None or not geo.pad_augment:
            return img
        h, w = geo.native
        top, left = int(u[0] * 9), int(u[1] * 9)
        img = torch.nn.functional.pad(img, (4, 4, 4, 4))[:, top:top + h, left:left + w]
    else:
        img = TF.resize(img, [geo.resize], antialias=True)
        if u is None:
            return TF.center_crop(img, [geo.crop, geo.crop])
        h, w = img.shape[-2:]
        top, left = int(u[0] * (h - geo.crop + 1)), int(u[1] * (w - geo.crop + 1))
        img = img[:, top:top + geo.crop, left:left + geo.crop]
    return (img.flip(-1) if u[2] < 0.5 else img).contiguous()


def cache_view(img: torch.Tensor, geo: Geometry, where: str) -> torch.Tensor:
    """What the device cache keeps: native images as they are; others resized and
    centre-cropped to resize x resize, inside which training takes its random crops."""
    if geo.native:
        return place(img, geo, None, where)
    return TF.center_crop(TF.resize(img, [geo.resize], antialias=True), [geo.resize, geo.resize])


def crop_flip_batch(x: torch.Tensor, tops: torch.Tensor, lefts: torch.Tensor, size: int,
                    flips: torch.Tensor) -> torch.Tensor:
    """Per-sample size x size crops at (top, left), flipped where asked: one gather on the device."""
    ar = torch.arange(size, device=x.device)
    rows = tops[:, None] + ar
    cols = lefts[:, None] + torch.where(flips[:, None], ar.flip(0), ar)
    batch = torch.arange(x.shape[0], device=x.device)[:, None, None]
    return x[batch, :, rows[:, :, None], cols[:, None, :]].permute(0, 3, 1, 2)


class Normalize:
    """ImageNet normalisation for the resized sets; the small sets stay in [0, 1] (ToTensor)."""

    def __init__(self, geo: Geometry, device: torch.device):
        self.on = geo.native is None
        self.mean = torch.tensor(IMAGENET_MEAN, device=device).view(1, 3, 1, 1)
        self.std = torch.tensor(IMAGENET_STD, device=device).view(1, 3, 1, 1)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) / self.std if self.on else x


# --- DataLoader workers -------------------------------------------------------------

def _worker_init(_: int) -> None:
    # SIGTERM is the main process's to handle (checkpoint on preemption); workers go when it does.
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    torch.set_num_threads(1)


def worker_slot() -> tuple[int, int]:
    info = get_worker_info()
    return (info.id, info.num_workers) if info is not None else (0, 1)


def make_loader(dataset: IterableDataset, num_workers: int, device: torch.device) -> DataLoader:
    # batch_size=None: workers build whole batches; the loader hands them out in turn,
    # worker 0 first, which is what makes the order of batches deterministic.
    return DataLoader(dataset, batch_size=None, num_workers=num_workers,
                      pin_memory=device.type == "cuda", worker_init_fn=_worker_init if num_workers else None)
