"""Convert a dataset in its original format into WebDataset shards, once:

    python -m jocor_ddp.prepare DATASET --src RAW_DIR --out SHARD_DIR [--shard-size N]

DATASET is one of mnist, fashion-mnist, cifar10, cifar100, clothing1m, imagefolder. The
small sets are written as PNG (lossless: the shards decode to the very pixels of the IDX
and pickle files); Clothing1M and ImageFolder images keep their original bytes. Labels
are written as the source gives them, never noised: train with any noise setting from
the same shards (``data.source=shards data.shards=SHARD_DIR``).
"""

from __future__ import annotations

import argparse
import io
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Iterator

import numpy as np
from PIL import Image

from .config import DATASETS, PROGRESS
from .data.clothing1m import read_clothing1m
from .data.imagefolder import read_imagefolder
from .data.shards import DatasetWriter, Manifest, SampleIn, image_ext
from .data.sources import DataError, Split, load_arrays
from .progress import progress_enabled

DEFAULT_SHARD_SIZE = 1000


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
    source = Source(ds.classes, "clean", {"format": "png", "channels": int(c), "height": int(h), "width": int(w)})
    for split_name, split in (("train", ds.train), ("test", ds.test)):
        source.splits[split_name] = (len(split), lambda split=split: _array_samples(split))
    return source


def file_samples(root: Path, entries: list[tuple[str, int, int]]) -> Iterator[SampleIn]:
    """(relative path, label, clean label) -> the file's bytes, never re-encoded. Only the
    header is parsed here (cheap); a body that does not decode is caught at training."""
    for rel, label, clean in entries:
        path = root / rel
        try:
            data = path.read_bytes()
            with Image.open(io.BytesIO(data)) as im:
                im.size  # noqa: B018 -- parses the header
        except OSError as exc:
            raise DataError(f"{path}: not a readable image: {exc}") from None
        if image_ext(data) is None:
            raise DataError(f"{path}: not a PNG or JPEG file")
        yield SampleIn(data, label, clean, src=rel)


def clothing1m_source(src: str) -> Source:
    release = read_clothing1m(src)
    source = Source(release.classes, "noisy", {"format": "jpg", "channels": 3, "height": None, "width": None})
    for name, entries in release.splits.items():
        rows = [(e.key, e.label, e.clean) for e in entries]
        source.splits[name] = (len(rows), lambda rows=rows: file_samples(release.root, rows))
    return source


def imagefolder_source(src: str) -> Source:
    folder = read_imagefolder(src)
    suffixes = {Path(rel).suffix.lower().replace("jpeg", "jpg") for s in folder.splits.values() for rel, _ in s}
    fmt = suffixes.pop().lstrip(".") if len(suffixes) == 1 else "mixed"
    source = Source(folder.classes, "clean", {"format": fmt, "channels": 3, "height": None, "width": None})
    for name, samples in folder.splits.items():
        # ImageFolder labels are taken as clean: the clean label is the given one.
        rows = [(rel, label, label) for rel, label in samples]
        source.splits[name] = (len(rows), lambda rows=rows: file_samples(folder.root, rows))
    return source


def open_source(dataset: str, src: str) -> Source:
    if dataset == "clothing1m":
        return clothing1m_source(src)
    if dataset == "imagefolder":
        return imagefolder_source(src)
    return array_source(dataset, src)


def prepare(dataset: str, src: str, out: str, *, shard_size: int = DEFAULT_SHARD_SIZE,
            force: bool = False, progress: bool = False) -> Manifest:
    if dataset not in DATASETS:
        raise DataError(f"dataset {dataset!r} is not one of {', '.join(DATASETS)}")
    if shard_size <= 0:
        raise DataError(f"--shard-size: must be a positive number of samples, got {shard_size}")
    source = open_source(dataset, src)
    writer = DatasetWriter(out, dataset, source.classes, force=force, progress=progress)
    for name, (count, samples) in source.splits.items():
        writer.write_split(name, count, samples(), shard_size)
    return writer.finish(source.labels, source.image)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m jocor_ddp.prepare",
        description="Write a dataset as WebDataset shards plus manifest.json, once; every noise "
                    "setting then trains from the same shards.")
    p.add_argument("dataset", choices=DATASETS)
    p.add_argument("--src", required=True, help="folder of the raw files in their original format")
    p.add_argument("--out", required=True, help="shard folder to write (SHARD_DIR)")
    p.add_argument("--shard-size", type=int, default=DEFAULT_SHARD_SIZE,
                   help=f"samples per shard (default {DEFAULT_SHARD_SIZE}); keep shards >= ranks x workers")
    p.add_argument("--force", action="store_true", help="overwrite a folder holding another dataset's shards")
    p.add_argument("--progress", choices=PROGRESS, default="auto", help="progress bar (default: on a terminal)")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        m = prepare(args.dataset, args.src, args.out, shard_size=args.shard_size, force=args.force,
                    progress=progress_enabled(args.progress, True))
    except DataError as exc:
        print(f"error: {exc}", file=sys.stderr, flush=True)
        return 2
    for name, split in m.splits.items():
        print(f"{args.out}: {name}: {split.samples} samples in {len(split.shards)} shards")
    print(f"train with: data.name={args.dataset} data.source=shards data.shards={args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
