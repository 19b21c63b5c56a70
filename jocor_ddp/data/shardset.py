"""A verified shard set: the manifest, the training split and every evaluation split checked
on every rank before the first collective (files, sizes, sha256, index, labels), the labels
resolved (noise drawn once, on the whole split), and the choice between the device cache and
the stream."""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple, Optional

import numpy as np

from ..config import Config, ConfigError
from ..dist import DistContext
from ..noise import NoiseInfo, make_noisy_labels
from .memory import held_out
from .place import Geometry, geometry
from .shards import Manifest, SplitIndex, load_manifest, verify_split
from .sources import DataError, warn
from .types import EvalLoader, TrainLoader

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


def _labels(cfg: Config, manifest: Manifest, split: SplitIndex, keep: np.ndarray):
    n = min(cfg.data.train_subset or split.samples, split.samples)
    cls, clean = split.by_idx("cls")[:n], split.by_idx("clean")[:n]
    if manifest.labels == "noisy":
        if cfg.noise.type != "none":
            raise ConfigError(f"noise.type: {manifest.dataset}'s labels are already noisy; set "
                              f"noise.type=none noise.rate=0 (tau is then estimated: method.forget_rate auto)")
        return cls, clean, None  # no synthetic noise: the trainer estimates tau unless it is set
    # Labels left out as bad are drawn as class 0: each sample's noisy label depends on its
    # own clean label and its own uniform only, so every other sample's is unchanged.
    safe = np.where(keep[:n], cls, 0)
    noisy, info = make_noisy_labels(cfg.noise, safe, manifest.num_classes, manifest.dataset)
    return noisy, safe, info


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
    noisy, clean, info = _labels(cfg, manifest, train, train_keep)
    held = held_out(len(noisy), cfg.data.noisy_val_fraction)
    noisy_val_keep = np.zeros_like(train_keep)
    noisy_val_keep[:len(held)] = train_keep[:len(held)] & held
    return ShardData(manifest, geometry(cfg, manifest), train, evals, train_keep & ~noisy_val_keep, noisy_val_keep,
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
