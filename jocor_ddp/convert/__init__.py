"""Converting a dataset from its original format into shards, once: the sources
(``sources.py``, with the Clothing1M and ImageFolder readers) and the shard writer
(``writer.py``). The training input path (``jocor_ddp.data``) only reads what this writes;
``python -m jocor_ddp.prepare`` is the command."""

from __future__ import annotations

from typing import Optional

from ..config import DATASETS
from ..data.shards import Manifest
from ..data.sources import DataError
from .sources import DEFAULT_QUALITY, FileImages, open_source
from .writer import DatasetWriter

DEFAULT_SHARD_SIZE = 1000
RESIZABLE = ("clothing1m", "imagefolder")


def prepare(dataset: str, src: str, out: str, *, shard_size: int = DEFAULT_SHARD_SIZE,
            force: bool = False, progress: bool = False, resize: Optional[int] = None,
            quality: int = DEFAULT_QUALITY, workers: int = 0) -> Manifest:
    """Open the source, write every split of it into ``out`` and finish: the manifest, last."""
    if dataset not in DATASETS:
        raise DataError(f"dataset {dataset!r} is not one of {', '.join(DATASETS)}")
    if shard_size <= 0:
        raise DataError(f"--shard-size: must be a positive number of samples, got {shard_size}")
    if resize is not None and dataset not in RESIZABLE:
        raise DataError("--resize: only clothing1m and imagefolder are resized; the small sets keep their native size")
    if resize is not None and resize <= 0:
        raise DataError(f"--resize: must be a positive number of pixels, got {resize}")
    if not 1 <= quality <= 100:
        raise DataError(f"--quality: must be a JPEG quality in [1, 100], got {quality}")
    if workers < 0:
        raise DataError(f"--workers: must be 0 (in process) or a number of processes, got {workers}")
    source = open_source(dataset, src, FileImages(resize, quality, workers))
    writer = DatasetWriter(out, dataset, source.classes, force=force, progress=progress)
    for name, (count, samples) in source.splits.items():
        writer.write_split(name, count, samples(), shard_size)
    return writer.finish(source.labels, source.image)
