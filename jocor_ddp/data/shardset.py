"""A verified shard set: the manifest, the training split and every evaluation split checked
on every rank before the first collective (files, sizes, sha256, index, labels), the labels
resolved (noise drawn once, on the whole split; instance noise decodes the training split once
for it), and the choice between the device cache and the stream."""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple, Optional

import numpy as np
import torch

from ..config import Config, ConfigError
from ..dist import DistContext
from ..noise import ImageChunks, NoiseInfo, make_noisy_labels
from ..progress import progress_enabled
from .memory import held_out
from .place import Geometry, geometry
from .shards import Manifest, SplitIndex, load_manifest, verify_split
from .sources import DataError, warn
from .types import EvalLoader, TrainLoader
from .workers import DECODE_BATCH, DecodePool, decoded

# --- the verified shards, labels resolved ---------------------------------------------

@dataclass
class EvalSplit:
    """An evaluation split of the shards (data.eval_splits), verified."""
    index: SplitIndex
    keep: np.ndarray    # by sample index: in the subset (data.test_subset), not a known bad sample
    bad: int            # known bad samples left out (data.on_bad_sample: skip)
    labels: np.ndarray  # by sample index


@dataclass
class ShardData:
    manifest: Manifest
    geo: Geometry
    train: SplitIndex
    evals: dict[str, EvalSplit]  # by name, in the order of data.eval_splits
    train_keep: np.ndarray  # by sample index: in the subset, not a known bad sample, not held out
    noisy_val_keep: np.ndarray  # by sample index: held out, noisy labels and all (data.noisy_val_fraction)
    train_bad: int          # known bad samples left out (data.on_bad_sample: skip)
    noisy: np.ndarray       # by sample index
    clean: np.ndarray
    noise: Optional[NoiseInfo]


def _usable(split: SplitIndex, limit: Optional[int], num_classes: int, skip: bool,
            ctx: DistContext) -> tuple[np.ndarray, int]:
    keep = np.zeros(split.samples, dtype=bool)
    keep[:min(limit or split.samples, split.samples)] = True
    bad = [pos for pos in split.bad_labels(num_classes) if keep[split.rows["idx"][pos]]]
    if bad and not skip:
        raise DataError(split.describe_label(bad[0], num_classes))
    if bad:
        keep[split.rows["idx"][bad]] = False
        if ctx.is_main:
            warn(f"left out {len(bad)} sample(s) of split {split.name!r} with a label outside "
                  f"[0, {num_classes}) (data.on_bad_sample=skip); the first: {split.where(bad[0])}")
    return keep, len(bad)


def _labels(cfg: Config, ctx: DistContext, manifest: Manifest, geo: Geometry, split: SplitIndex, keep: np.ndarray):
    n = min(cfg.data.train_subset or split.samples, split.samples)
    cls, clean = split.by_idx("cls")[:n], split.by_idx("clean")[:n]
    if manifest.labels == "noisy":
        if cfg.noise.type != "none":
            raise ConfigError(f"noise.type: {manifest.dataset}'s labels are already noisy; set "
                              f"noise.type=none noise.rate=0 (tau is then estimated: method.forget_rate auto)")
        return cls, clean, None  # no synthetic noise: the trainer estimates tau unless it is set
    # Labels left out as bad are drawn as class 0: each sample's noisy label depends on its
    # own clean label and its own uniform only (and its own image), so every other sample's
    # is unchanged.
    safe = np.where(keep[:n], cls, 0)
    images, features = None, None
    if cfg.noise.type == "instance":
        if not geo.native:
            raise ConfigError(f"noise.type: instance needs images of one fixed size (MNIST, CIFAR); "
                              f"{manifest.dataset}'s images vary in size")
        images, features = _training_images(cfg, ctx, geo, split, n), geo.channels * geo.native[0] * geo.native[1]
    noisy, info = make_noisy_labels(cfg.noise, safe, manifest.num_classes, manifest.dataset, images, features)
    return noisy, safe, info


def _training_images(cfg: Config, ctx: DistContext, geo: Geometry, split: SplitIndex, n: int) -> ImageChunks:
    """The first n training samples decoded once, in chunks, for instance noise: the stored
    views the memory source holds (MNIST and CIFAR shards are lossless PNGs of its pixels).
    Every rank decodes them all, through workers of its own, gone once the labels are drawn."""
    pool = DecodePool({"train": split}, geo, batch=DECODE_BATCH, workers=cfg.data.num_workers,
                      seed=0, skip_bad=cfg.data.on_bad_sample == "skip", device=torch.device("cpu"))
    try:  # positions in shard order: each worker reads its shards' files
        yield from decoded(pool, "train", np.flatnonzero(split.rows["idx"] < n),
                           progress=progress_enabled(cfg.log.progress, ctx.is_main), main=ctx.is_main)
    finally:
        pool.close()


def open_shards(cfg: Config, ctx: DistContext) -> ShardData:
    """Verify the manifest, the train split and every evaluation split, resolve the labels."""
    manifest = load_manifest(cfg.data.shards)
    if manifest.dataset != cfg.data.name:
        raise DataError(f"{manifest.root}: holds {manifest.dataset!r} shards, data.name is {cfg.data.name!r}")
    train = verify_split(manifest, "train", cfg.data.verify)
    splits = [verify_split(manifest, name, cfg.data.verify) for name in cfg.data.eval_splits]
    c, skip = manifest.num_classes, cfg.data.on_bad_sample == "skip"
    train_keep, train_bad = _usable(train, cfg.data.train_subset, c, skip, ctx)
    evals = {s.name: EvalSplit(s, *_usable(s, cfg.data.test_subset, c, skip, ctx), s.by_idx("cls")) for s in splits}
    geo = geometry(cfg, manifest)
    noisy, clean, info = _labels(cfg, ctx, manifest, geo, train, train_keep)
    held = held_out(len(noisy), cfg.data.noisy_val_fraction)
    noisy_val_keep = np.zeros_like(train_keep)
    noisy_val_keep[:len(held)] = train_keep[:len(held)] & held
    return ShardData(manifest, geo, train, evals, train_keep & ~noisy_val_keep, noisy_val_keep,
                     train_bad, noisy, clean, info)


def choose_cache(cfg: Config, data: ShardData) -> str:
    if cfg.data.cache != "auto":
        return cfg.data.cache
    h, w = data.geo.stored
    samples = int(data.train_keep.sum()) + sum(int(s.keep.sum()) for s in data.evals.values())
    return "device" if samples * data.geo.channels * h * w <= cfg.data.cache_budget_gb * 2**30 else "stream"


class Loaders(NamedTuple):
    train: TrainLoader
    evals: dict[str, EvalLoader]  # by name, in the order of data.eval_splits
    train_eval: EvalLoader  # every training sample once, unaugmented, as Batches
    noisy_val: Optional[EvalLoader]  # the held-out samples (data.noisy_val_fraction) as Batches, or None
