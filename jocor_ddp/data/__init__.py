"""Data: readers for the original formats, noise applied once, loaders per rank."""

from __future__ import annotations

import numpy as np

from ..config import Config, ConfigError
from ..dist import DistContext
from ..noise import make_noisy_labels
from .memory import Lazy, MemoryEvalLoader, MemoryTrainLoader, held_out
from .place import native_geometry
from .sources import DataError, load_arrays, subset
from .types import (BadSamples, Batch, DataBundle, EvalBatch, EvalLoader, ResidentTrainLoader, StreamedTrainLoader,
                    TrainLoader, agree_on_error)

__all__ = ["BadSamples", "Batch", "DataBundle", "DataError", "EvalBatch", "EvalLoader", "ResidentTrainLoader",
           "StreamedTrainLoader", "TrainLoader", "agree_on_error", "build_data"]


def build_data(cfg: Config, ctx: DistContext) -> DataBundle:
    if cfg.data.source == "shards":
        return _build_shards(cfg, ctx)
    if cfg.data.source != "memory":
        raise DataError(f"data.source: {cfg.data.source!r} is not available in this build")
    return _build_memory(cfg, ctx)


def _build_shards(cfg: Config, ctx: DistContext) -> DataBundle:
    """Verified shards, read by offset in persistent decoding workers, and fed from the
    device cache or streamed (data.cache)."""
    # Imported here: the memory source needs neither webdataset nor torchvision.io.
    from .cache import cached_loaders
    from .place import IMAGENET_MEAN, IMAGENET_STD
    from .shardset import choose_cache, open_shards
    from .stream import stream_loaders
    from .workers import DECODE_BATCH, DecodePool
    if cfg.data.gpu_decode and ctx.device.type != "cuda":
        raise ConfigError("data.gpu_decode: needs a CUDA training device (train.device)")
    data = open_shards(cfg, ctx)
    cache = choose_cache(cfg, data)
    local = cfg.train.batch_size // ctx.world_size
    pool = DecodePool({"train": data.train, **{name: s.index for name, s in data.evals.items()}}, data.geo,
                      batch=local if cache == "stream" else DECODE_BATCH, workers=cfg.data.num_workers,
                      seed=cfg.train.seed, skip_bad=cfg.data.on_bad_sample == "skip", device=ctx.device,
                      raw=cfg.data.gpu_decode and cache == "stream")
    loaders = cached_loaders(cfg, ctx, data, pool) if cache == "device" else stream_loaders(cfg, ctx, data, pool)
    m = data.manifest
    normalization = None if data.geo.native else {"mean": list(IMAGENET_MEAN), "std": list(IMAGENET_STD)}
    return DataBundle(name=m.dataset, classes=m.classes, in_channels=data.geo.channels,
                      image_size=data.geo.side, train=loaders.train, evals=loaders.evals, noise=data.noise,
                      train_eval=loaders.train_eval, noisy_val=loaders.noisy_val, labels_noisy=m.labels == "noisy",
                      normalization=normalization, extra={"shards": str(m.root), "cache": cache})


def _build_memory(cfg: Config, ctx: DistContext) -> DataBundle:
    arrays = load_arrays(cfg.data.name, cfg.data.root)
    train = subset(arrays.train, cfg.data.train_subset)
    test = subset(arrays.test, cfg.data.test_subset)
    # Noise is drawn on the whole training split, before it is divided among ranks.
    noisy, info = make_noisy_labels(cfg.noise, train.labels, arrays.num_classes, cfg.data.name, train.images)
    held = held_out(len(noisy), cfg.data.noisy_val_fraction)
    rows, held_rows = np.flatnonzero(~held), np.flatnonzero(held)

    def rows_of(a, r):  # a's rows r; all of them (nothing held out): the array itself, no copy
        return a if len(r) == len(noisy) else a[r]

    def part(r, **kw):  # the training rows or the held-out rows, indexed as in the split
        return MemoryEvalLoader(rows_of(train.images, r), rows_of(noisy, r), rank=ctx.rank,
                                world_size=ctx.world_size, device=ctx.device, clean=rows_of(train.labels, r),
                                sample_idx=r, **kw)
    try:
        train_loader = MemoryTrainLoader(
            rows_of(train.images, rows), rows_of(noisy, rows), rows_of(train.labels, rows),
            global_batch=cfg.train.batch_size, rank=ctx.rank, world_size=ctx.world_size, seed=cfg.train.seed,
            device=ctx.device, geo=native_geometry(train.images, cfg.data.augment), sample_idx=rows,
            index_range=len(noisy), steps_per_epoch=cfg.train.steps_per_epoch, max_per_class=cfg.train.max_per_class)
    except ValueError as exc:
        raise DataError(f"{cfg.data.name}: training split: {exc}") from None
    test_loader = MemoryEvalLoader(test.images, test.labels, rank=ctx.rank,
                                   world_size=ctx.world_size, device=ctx.device)
    _, h, _, c = train.images.shape
    return DataBundle(name=cfg.data.name, classes=arrays.classes, in_channels=c, image_size=h,
                      train=train_loader, evals={"test": test_loader}, noise=info,
                      train_eval=Lazy(lambda: part(rows), len(rows)),
                      noisy_val=part(held_rows) if len(held_rows) else None, normalization=None)
