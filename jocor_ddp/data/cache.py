"""The device cache (``data.cache: device``; auto picks it when the decoded splits fit in
``data.cache_budget_gb``): every rank decodes every shard once, in DataLoader workers, into a
uint8 array, and the in-memory loaders take over: a global per-epoch permutation, the same
for every world size, augmentation on the device, and a batch the training step gathers
itself from the device (``gather``)."""

from __future__ import annotations

from typing import Iterator, Optional

import numpy as np
import torch
import torchvision.transforms.v2.functional as TF
from torch.utils.data import IterableDataset

from ..config import Config
from ..dist import DistContext
from ..progress import Progress, progress_enabled
from .decode import (Geometry, Normalize, cache_view, crop_flip_batch, decode, make_loader, sample_uniforms,
                     worker_slot)
from .memory import MemoryEvalLoader, MemoryTrainLoader
from .shards import SplitIndex, read_records
from .shardset import Loaders, ShardData
from .sources import DataError, warn
from .types import Batch, EvalBatch

class _DecodeShards(IterableDataset):
    """Worker w of W decodes shards w, w + W, ... of a split into cache entries."""

    def __init__(self, split: SplitIndex, keep: np.ndarray, geo: Geometry, skip: bool):
        self.split, self.keep, self.geo, self.skip = split, keep, geo, skip

    def __iter__(self):
        w, nw = worker_slot()
        for i in range(w, len(self.split.paths), nw):
            rows = self.split.shard_rows(i)
            imgs, idxs, bad = [], [], []
            if not self.keep[rows["idx"]].any():  # outside data.train_subset: not read at all
                yield {"idx": torch.zeros(0, dtype=torch.int64), "x": None, "bad": [], "rows": len(rows)}
                continue
            try:
                for rec in read_records(self.split.paths[i], rows):
                    if not self.keep[rec.idx]:
                        continue
                    try:
                        imgs.append(cache_view(decode(rec, self.geo.channels), self.geo, rec.where()))
                        idxs.append(rec.idx)
                    except DataError as exc:
                        if not self.skip:
                            raise
                        bad.append(str(exc))
            except DataError as exc:
                yield {"error": str(exc)}
                return
            x = torch.stack(imgs) if imgs else None
            yield {"idx": torch.tensor(idxs, dtype=torch.int64), "x": x, "bad": bad, "rows": len(rows)}


def decode_split(cfg: Config, ctx: DistContext, data: ShardData, split: SplitIndex,
                 keep: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Every kept sample of a split, decoded: (images NHWC by sample index, decoded ok).
    Every rank decodes every shard, so a bad image stops every rank alike."""
    h, w = data.geo.cached
    images = np.zeros((split.samples, h, w, data.geo.channels), dtype=np.uint8)
    ok = np.zeros(split.samples, dtype=bool)
    bar = Progress(split.samples, f"decode {split.name}", progress_enabled(cfg.log.progress, ctx.is_main))
    done, bad = 0, []
    ds = _DecodeShards(split, keep, data.geo, cfg.data.on_bad_sample == "skip")
    for item in make_loader(ds, cfg.data.num_workers, torch.device("cpu")):
        if "error" in item:
            raise DataError(item["error"])
        idx = item["idx"].numpy()
        if idx.size:
            images[idx] = item["x"].permute(0, 2, 3, 1).numpy()
            ok[idx] = True
        bad += item["bad"]
        done += item["rows"]
        bar.update(done)
    bar.close()
    if bad and ctx.is_main:
        warn(f"left out {len(bad)} sample(s) of split {split.name!r} that do not decode "
              f"(data.on_bad_sample=skip); the first: {bad[0]}")
    return images, ok


class CachedTrainLoader:
    """The in-memory loader over the decoded cache, plus what shards may add: random crops
    and normalisation for the resized sets, and the split's own sample indices when bad
    samples were left out of the cache."""

    # A crop is drawn per sample index, the order is the inner loader's global permutation:
    # any world size continues a checkpointed epoch with the same samples.
    world_size_invariant = True

    def __init__(self, inner: MemoryTrainLoader, split_idx: np.ndarray, geo: Geometry, seed: int,
                 bad_samples: int, num_samples: int):
        self.inner = inner
        self.steps_per_epoch = inner.steps_per_epoch
        # The range of Batch.idx (consumers index per-sample arrays with it), left-out samples included.
        self.num_samples = num_samples
        self.split_idx_np = split_idx
        self.split_idx = torch.from_numpy(split_idx).to(inner.device)
        self.geo, self.seed = geo, seed
        # Counted on rank 0 only: every rank left out the same samples.
        self.static_bad = bad_samples
        self.bad_samples = bad_samples
        self.normalize = Normalize(geo, inner.device)

    def epoch_plan(self, epoch: int, start_step: int = 0) -> dict[str, torch.Tensor]:
        # The left-out samples count once per epoch: in a resumed epoch the checkpoint has them.
        self.bad_samples = self.static_bad if start_step == 0 else 0
        plan = self.inner.epoch_plan(epoch)
        if self.geo.native is None:
            u = torch.from_numpy(sample_uniforms(self.seed, epoch, self.split_idx_np)).to(self.inner.device)
            room = self.geo.resize - self.geo.crop + 1
            plan.update(tops=(u[:, 0] * room).long(), lefts=(u[:, 1] * room).long(), crop_flips=u[:, 2] < 0.5)
        return plan

    def gather(self, plan: dict[str, torch.Tensor], step: torch.Tensor) -> Batch:
        b = self.inner.gather(plan, step)
        x = b.x
        if self.geo.native is None:
            x = crop_flip_batch(x, plan["tops"][b.idx], plan["lefts"][b.idx], self.geo.crop, plan["crop_flips"][b.idx])
        return Batch(x=self.normalize(x), y=b.y, clean=b.clean, idx=self.split_idx[b.idx])

    def epoch(self, epoch: int, start_step: int = 0) -> Iterator[Batch]:
        plan = self.epoch_plan(epoch, start_step)
        for step in range(start_step, self.steps_per_epoch):
            yield self.gather(plan, torch.tensor(step, device=self.inner.device))


class CachedEvalLoader:
    """The evaluation view of the cache: centre crop and normalisation for the resized sets;
    training ``Batch``es (the train_eval pass) get the split's own sample indices back."""

    def __init__(self, inner: MemoryEvalLoader, geo: Geometry, device: torch.device,
                 split_idx: Optional[np.ndarray] = None):
        self.inner, self.geo = inner, geo
        self.normalize = Normalize(geo, device)
        self.split_idx = None if split_idx is None else torch.from_numpy(split_idx).to(device)

    def __iter__(self) -> Iterator[EvalBatch | Batch]:
        for b in self.inner:
            x = b.x if self.geo.native else TF.center_crop(b.x, [self.geo.crop, self.geo.crop])
            if isinstance(b, Batch):
                yield Batch(x=self.normalize(x), y=b.y, clean=b.clean, idx=self.split_idx[b.idx])
            else:
                yield EvalBatch(x=self.normalize(x), y=b.y)


def cached_loaders(cfg: Config, ctx: DistContext, data: ShardData) -> Loaders:
    train_images, train_ok = decode_split(cfg, ctx, data, data.train, data.train_keep)
    test_images, test_ok = decode_split(cfg, ctx, data, data.test, data.test_keep)
    train_idx, test_idx = np.flatnonzero(train_ok), np.flatnonzero(test_ok)
    try:
        inner = MemoryTrainLoader(train_images[train_idx], data.noisy[train_idx], data.clean[train_idx],
                                  global_batch=cfg.train.batch_size, rank=ctx.rank, world_size=ctx.world_size,
                                  seed=cfg.train.seed, device=ctx.device, augment=data.geo.pad_augment)
    except ValueError as exc:
        raise DataError(f"{data.manifest.root}: {exc}") from None
    bad = data.train_bad + int((data.train_keep & ~train_ok).sum())
    eval_batch = 1000 if data.geo.native else 128
    test = MemoryEvalLoader(test_images[test_idx], data.test_labels[test_idx], rank=ctx.rank,
                            world_size=ctx.world_size, device=ctx.device, batch_size=eval_batch)
    train_eval = MemoryEvalLoader(train_images[train_idx], data.noisy[train_idx], rank=ctx.rank,
                                  world_size=ctx.world_size, device=ctx.device, batch_size=eval_batch,
                                  clean=data.clean[train_idx])
    if data.geo.native and np.array_equal(train_idx, np.arange(len(data.noisy))):
        # Nothing to add: exactly the memory source's loaders, batch for batch.
        return Loaders(inner, test, len(test_idx), train_eval)
    train = CachedTrainLoader(inner, train_idx, data.geo, cfg.train.seed, bad if ctx.is_main else 0,
                              num_samples=len(data.noisy))
    return Loaders(train, CachedEvalLoader(test, data.geo, ctx.device), len(test_idx),
                   CachedEvalLoader(train_eval, data.geo, ctx.device, split_idx=train_idx))
