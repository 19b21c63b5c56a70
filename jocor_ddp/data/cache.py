"""The device cache (``data.cache: device``; auto picks it when the stored views fit in
``data.cache_budget_gb``): every rank decodes every usable sample once, through the same
workers the stream uses, into a uint8 array of stored views, and the in-memory loaders
(``memory.py``) take over. Every rank decodes everything, so a bad image stops every rank
alike, before training starts."""

from __future__ import annotations

import numpy as np

from ..config import Config
from ..dist import DistContext
from ..progress import progress_enabled
from .memory import MemoryEvalLoader, MemoryTrainLoader
from .shardset import Loaders, ShardData
from .sources import DataError
from .workers import DecodePool, decoded


def decode_split(cfg: Config, ctx: DistContext, data: ShardData, pool: DecodePool, name: str,
                 keep: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Every kept sample of a split as stored views: (images NHWC by sample index, decoded ok)."""
    split = pool.decoder.splits[name]
    h, w = data.geo.stored
    images = np.zeros((split.samples, h, w, data.geo.channels), dtype=np.uint8)
    ok = np.zeros(split.samples, dtype=bool)
    positions = np.flatnonzero(keep[split.rows["idx"]])  # shard order: each worker reads its shards' files
    for idx, views in decoded(pool, name, positions, progress=progress_enabled(cfg.log.progress, ctx.is_main),
                              main=ctx.is_main):
        images[idx] = views
        ok[idx] = True
    return images, ok


def cached_loaders(cfg: Config, ctx: DistContext, data: ShardData, pool: DecodePool) -> Loaders:
    try:
        train_images, train_decoded = decode_split(cfg, ctx, data, pool, "train", data.train_keep | data.noisy_val_keep)
        evals = {name: decode_split(cfg, ctx, data, pool, name, s.keep) for name, s in data.evals.items()}
    finally:
        pool.close()  # the cache needs no workers from here on
    train_ok = train_decoded & data.train_keep
    train_idx, held_idx = np.flatnonzero(train_ok), np.flatnonzero(train_decoded & data.noisy_val_keep)
    held_images = train_images[held_idx]
    if len(train_idx) < len(train_images):  # a copy only when samples were left out
        train_images = train_images[train_idx]
    bad = data.train_bad + int((data.train_keep & ~train_ok).sum())
    try:
        train = MemoryTrainLoader(train_images, data.noisy[train_idx], data.clean[train_idx],
                                  global_batch=cfg.train.batch_size, rank=ctx.rank, world_size=ctx.world_size,
                                  seed=cfg.train.seed, device=ctx.device, geo=data.geo, sample_idx=train_idx,
                                  index_range=len(data.noisy), static_bad=bad if ctx.is_main else 0,
                                  steps_per_epoch=cfg.train.steps_per_epoch, max_per_class=cfg.train.max_per_class)
    except ValueError as exc:
        raise DataError(f"{data.manifest.root}: training split: {exc}") from None
    eval_batch = 1000 if data.geo.native else 128

    def scored(name, images, ok):  # an evaluation split's decoded samples
        idx = np.flatnonzero(ok)
        return MemoryEvalLoader(images[idx] if len(idx) < len(images) else images, data.evals[name].labels[idx],
                                rank=ctx.rank, world_size=ctx.world_size, device=ctx.device, batch_size=eval_batch,
                                geo=data.geo)

    def part(images, idx):  # training or held-out samples, unaugmented, as Batches
        return MemoryEvalLoader(images, data.noisy[idx], rank=ctx.rank, world_size=ctx.world_size, device=ctx.device,
                                batch_size=eval_batch, clean=data.clean[idx], geo=data.geo, sample_idx=idx)
    return Loaders(train, {name: scored(name, images, ok) for name, (images, ok) in evals.items()},
                   part(train_images, train_idx), part(held_images, held_idx) if len(held_idx) else None)
