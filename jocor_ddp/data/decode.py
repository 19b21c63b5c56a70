"""Decoding: a stored sample's bytes -> its uint8 stored view (CHW, the fixed shape of
``Geometry.stored``). This is the only per-image work of the pipeline: on the CPU one image
at a time in a worker process (``workers.py``), on the GPU one batched nvJPEG call per batch
(``decode_on_device``, from the feeder thread of ``stream.py``). Crops, flips and floats
are the device's (``place.py``)."""

from __future__ import annotations

import re
from typing import Callable, Optional

import torch
import torchvision.transforms.v2.functional as TF
from torchvision.io import ImageReadMode, decode_image, decode_jpeg

from .place import Geometry
from .sources import DataError


def reason(exc: Exception) -> str:
    # torchvision prefixes 'decode_jpeg, /path/decode_jpeg.cpp:171, '.
    return re.sub(r"^\w+, \S+:\d+, ", "", str(exc))


def _mode(channels: int) -> ImageReadMode:
    return ImageReadMode.GRAY if channels == 1 else ImageReadMode.RGB


def fit(img: torch.Tensor, geo: Geometry, where: str) -> torch.Tensor:
    """A decoded CHW image -> its stored view: native images as they are (checked); others
    with the shorter side at ``resize`` (already so for shards made by prepare --resize at
    that size) and the central square."""
    if geo.native:
        if tuple(img.shape) != (geo.channels, *geo.native):
            raise DataError(f"{where}: image of shape {tuple(img.shape)}, the manifest says "
                            f"{(geo.channels, *geo.native)}")
        return img
    if min(img.shape[-2:]) != geo.resize:
        img = TF.resize(img, [geo.resize], antialias=True)
    return TF.center_crop(img, [geo.resize, geo.resize])


def decode(data: bytes, geo: Geometry, where: str) -> torch.Tensor:
    """One image's bytes -> its stored view, on the CPU."""
    try:
        img = decode_image(torch.frombuffer(bytearray(data), dtype=torch.uint8), mode=_mode(geo.channels))
    except RuntimeError as exc:
        raise DataError(f"{where}: the image does not decode: {reason(exc)}") from None
    return fit(img, geo, where)


def decode_on_device(blobs: list[torch.Tensor], geo: Geometry, device: torch.device,
                     where: Callable[[int], str]) -> tuple[list[Optional[torch.Tensor]], list[str]]:
    """A batch of JPEGs (CPU uint8 tensors) decoded in one call on ``device``: the stored views
    (None where an image does not decode) and the messages of those that do not (``where(k)``
    names the k-th sample)."""
    mode = _mode(geo.channels)
    try:
        images: list = decode_jpeg(blobs, mode=mode, device=device)
    except RuntimeError:  # which one: the batch again, one image at a time
        images = []
        for k, blob in enumerate(blobs):
            try:
                images.append(decode_jpeg(blob, mode=mode, device=device))
            except RuntimeError as exc:
                images.append(DataError(f"{where(k)}: the image does not decode: {reason(exc)}"))
    out, bad = [], []
    for k, img in enumerate(images):
        try:
            if isinstance(img, DataError):
                raise img
            out.append(fit(img, geo, where(k)))
        except DataError as exc:
            out.append(None)
            bad.append(str(exc))
    return out, bad
