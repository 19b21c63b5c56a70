"""The datasets in their original formats, as the writer sees them: per split, a sample
count and the samples (encoded images and labels) to hand to ``convert.writer``."""

from __future__ import annotations

import io
import multiprocessing
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Callable, Iterable, Iterator, Optional

import numpy as np
from PIL import Image

from ..data.shards import image_ext
from ..data.sources import DataError, Split, load_arrays
from .clothing1m import read_clothing1m
from .imagefolder import read_imagefolder
from .writer import SampleIn

DEFAULT_QUALITY = 90
CHUNKSIZE = 16  # images a worker takes at once: amortises the pipe round trip


@dataclass
class Source:
    """A dataset as the writer sees it: per split, a sample count and the samples."""
    classes: list[str]
    labels: str  # 'clean' or 'noisy': what the cls entries hold
    image: dict
    splits: dict[str, tuple[int, Callable[[], Iterable[SampleIn]]]] = field(default_factory=dict)


def png_bytes(image: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(image[..., 0] if image.shape[-1] == 1 else image).save(buf, format="PNG")
    return buf.getvalue()


def _array_samples(split: Split) -> Iterator[SampleIn]:
    for image, label in zip(split.images, split.labels):
        yield SampleIn(png_bytes(image), int(label), int(label))


def array_source(name: str, src: str) -> Source:
    ds = load_arrays(name, src)
    _, h, w, c = ds.train.images.shape
    source = Source(ds.classes, "clean", {"format": "png", "channels": int(c), "height": int(h), "width": int(w),
                                          "resize": None, "quality": None})
    for split_name, split in (("train", ds.train), ("test", ds.test)):
        source.splits[split_name] = (len(split), lambda split=split: _array_samples(split))
    return source


def resized_jpeg(im: Image.Image, size: int, quality: int) -> bytes:
    """The image with its shorter side exactly ``size`` (torchvision's rule for Resize(int)),
    as baseline 4:2:0 JPEG: the layout nvJPEG's fast paths and the hardware decoder take."""
    w, h = im.size
    other = int(size * max(w, h) / min(w, h))
    new_size = (size, other) if w <= h else (other, size)
    small = im.convert("RGB").resize(new_size, Image.BILINEAR, reducing_gap=None)
    buf = io.BytesIO()
    small.save(buf, format="JPEG", quality=quality, subsampling=2, progressive=False, optimize=False)
    return buf.getvalue()


def load_file(root: Path, resize: Optional[int], quality: int, entry: tuple[str, int, int]) -> SampleIn:
    """(relative path, label, clean label) -> the file's bytes, or with ``resize`` its
    re-encoding. Without resize only the header is parsed (cheap); a body that does not
    decode is caught at training."""
    rel, label, clean = entry
    path = root / rel
    try:
        data = path.read_bytes()
        with Image.open(io.BytesIO(data)) as im:  # parses the header
            if resize is not None:
                data = resized_jpeg(im, resize, quality)
    except OSError as exc:
        raise DataError(f"{path}: not a readable image: {exc}") from None
    if image_ext(data) is None:
        raise DataError(f"{path}: not a PNG or JPEG file")
    return SampleIn(data, label, clean, src=rel)


@dataclass(frozen=True)
class FileImages:
    """How Clothing1M and ImageFolder images reach the shards: the source's own bytes
    (resize None) or re-encoded; read in ``workers`` processes (0: in this one)."""
    resize: Optional[int] = None
    quality: int = DEFAULT_QUALITY
    workers: int = 0

    def image(self, fmt: str) -> dict:
        """The manifest's image entry, for source files of format ``fmt``."""
        resized = self.resize is not None
        return {"format": "jpg" if resized else fmt, "channels": 3, "height": None, "width": None,
                "resize": self.resize, "quality": self.quality if resized else None}

    def samples(self, root: Path, entries: list[tuple[str, int, int]]) -> Iterator[SampleIn]:
        load = partial(load_file, root, self.resize, self.quality)
        if self.workers == 0:
            yield from map(load, entries)
            return
        # An ordered imap: the shards are byte-identical whatever the number of workers.
        with multiprocessing.Pool(self.workers) as pool:
            yield from pool.imap(load, entries, chunksize=CHUNKSIZE)


def clothing1m_source(src: str, files: FileImages) -> Source:
    release = read_clothing1m(src)
    source = Source(release.classes, "noisy", files.image("jpg"))
    for name, entries in release.splits.items():
        rows = [(e.key, e.label, e.clean) for e in entries]
        source.splits[name] = (len(rows), lambda rows=rows: files.samples(release.root, rows))
    return source


def imagefolder_source(src: str, files: FileImages) -> Source:
    folder = read_imagefolder(src)
    suffixes = {Path(rel).suffix.lower().replace("jpeg", "jpg") for s in folder.splits.values() for rel, _ in s}
    fmt = suffixes.pop().lstrip(".") if len(suffixes) == 1 else "mixed"
    source = Source(folder.classes, "clean", files.image(fmt))
    for name, samples in folder.splits.items():
        # ImageFolder labels are taken as clean: the clean label is the given one.
        rows = [(rel, label, label) for rel, label in samples]
        source.splits[name] = (len(rows), lambda rows=rows: files.samples(folder.root, rows))
    return source


def open_source(dataset: str, src: str, files: FileImages) -> Source:
    if dataset == "clothing1m":
        return clothing1m_source(src, files)
    if dataset == "imagefolder":
        return imagefolder_source(src, files)
    return array_source(dataset, src)
