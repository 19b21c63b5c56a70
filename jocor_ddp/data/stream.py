"""Streaming shards (``data.cache: stream``): every epoch the train shards are shuffled with
(train.seed, epoch) and dealt to (rank, worker) slots; each worker reads its shards through a
seeded shuffle buffer and builds whole batches, which the DataLoader hands out in turn. Every
random choice is a function of (seed, epoch, rank, worker, sample index), never of timing, so
``epoch(e, start_step=s)`` yields exactly the batches s.. of ``epoch(e)``. A worker that has
used up its shards goes on resampling from all of them, so every rank runs the same
floor(N / global batch) steps however unevenly the shards divide. webdataset reads the tars
(``tarfile_samples``); the dealing of shards to ranks and workers is ours rather than
``split_by_node`` / ``split_by_worker`` + ``resampled``: those give equal step counts but
neither each sample once per epoch nor a step-exact resume, which need the fixed mapping of
steps to workers ("lanes") below.

Bad input. Everything that can be checked without decoding pixels is checked on every rank
before the first collective (``shardset.py``). An image that fails to decode is met by one
rank only, while streaming; so before every training step (and at the end of evaluation) the
ranks exchange one small flag on a CPU gloo group, and if any rank failed, every rank raises at
the same step instead of waiting in a collective.
"""

from __future__ import annotations

import dataclasses
import datetime
import itertools
from dataclasses import dataclass
from typing import Iterator, Optional

import numpy as np
import torch
import torch.distributed as dist
from torch.utils.data import IterableDataset
from torchvision.io import ImageReadMode, decode_jpeg

from ..config import Config
from ..dist import DistContext
from .decode import Geometry, Normalize, decode, make_loader, place, reason, sample_uniforms, worker_slot
from .memory import to_float
from .shards import Record, SplitIndex, read_records
from .shardset import Loaders, ShardData
from .sources import DataError, warn
from .types import Batch, DataBundle, EvalBatch

# Warnings per worker about skipped bad samples (data.on_bad_sample: skip); the count goes on.
MAX_WARNINGS = 5


# --- streaming: workers read shards and build batches -----------------------------------

@dataclass
class StreamPlan:
    """What a streaming worker needs (picklable: no device tensors)."""
    split: SplitIndex
    keep: np.ndarray
    geo: Geometry
    seed: int
    rank: int
    world_size: int
    lanes: int          # batch streams per rank: max(1, data.num_workers)
    batch: int
    shuffle_buffer: int
    skip_bad: bool
    raw_jpeg: bool      # leave JPEGs encoded for the GPU decoder


class _ShardStream(IterableDataset):
    """Base of the worker side: gathers decoded batches; an error becomes an item."""

    def __init__(self, plan: StreamPlan, epoch: int):
        self.plan, self.epoch = plan, epoch
        self.warned = 0

    def __iter__(self):
        try:
            yield from self._batches()
        except DataError as exc:
            # The main process raises it at the right step, after the ranks agree.
            yield {"error": str(exc)}

    def _batches(self):
        raise NotImplementedError

    def _load(self, rec: Record, train: bool) -> tuple[torch.Tensor, bool]:
        p = self.plan
        if p.raw_jpeg and rec.ext == "jpg":
            return torch.frombuffer(bytearray(rec.image), dtype=torch.uint8), True
        random = train and (p.geo.native is None or p.geo.pad_augment)
        u = sample_uniforms(p.seed, self.epoch, [rec.idx])[0] if random else None
        return place(decode(rec, p.geo.channels), p.geo, u, rec.where()), False

    def _take(self, records: Iterator[Record], train: bool, decode_images: bool = True) -> Optional[dict]:
        """Up to plan.batch good samples; None when the records ran out before any."""
        imgs, raw, idxs, where, bad = [], [], [], [], 0
        while len(idxs) < self.plan.batch:
            rec = next(records, None)
            if rec is None:
                break
            if not decode_images:
                idxs.append(rec.idx)
            else:
                try:
                    img, is_raw = self._load(rec, train)
                except DataError as exc:
                    if not self.plan.skip_bad:
                        raise
                    bad += 1
                    self._warn(str(exc))
                    continue
                imgs.append(img)
                raw.append(is_raw)
                idxs.append(rec.idx)
                where.append(rec.where())
        if not idxs:
            return {"bad": bad} if bad else None
        item = {"idx": torch.tensor(idxs, dtype=torch.int64), "bad": bad}
        if any(raw):
            item.update(images=imgs, raw=raw, where=where)
        elif imgs:
            item["x"] = torch.stack(imgs)
        return item

    def _warn(self, msg: str) -> None:
        self.warned += 1
        if self.warned <= MAX_WARNINGS:
            warn(f"rank {self.plan.rank}: skipped a bad sample (data.on_bad_sample=skip): {msg}")


class TrainLanes(_ShardStream):
    """Rank r's lanes: lane l reads the shards dealt to slot r * lanes + l, shuffled."""

    def __init__(self, plan: StreamPlan, epoch: int, start_step: int):
        super().__init__(plan, epoch)
        self.start_step = start_step

    def _batches(self):
        p = self.plan
        w, _ = worker_slot()
        # The DataLoader hands out step start_step + i from worker i % lanes; lane l owns
        # steps l, l + lanes, ..., so worker w plays lane (start_step + w) % lanes from its
        # batch (start_step + w) // lanes on: a resumed epoch continues the same batches.
        lane, first = (self.start_step + w) % p.lanes, (self.start_step + w) // p.lanes
        records = self._lane_records(lane)
        for j in itertools.count():
            # Skipped batches are not decoded, unless skipping bad samples decides what they hold.
            item = self._take(records, train=True, decode_images=j >= first or p.skip_bad)
            if j >= first:
                yield item

    def _lane_records(self, lane: int) -> Iterator[Record]:
        p = self.plan
        n_shards = len(p.split.paths)
        useful = [bool(p.keep[p.split.shard_rows(i)["idx"]].any()) for i in range(n_shards)]
        if not any(useful):
            raise DataError(f"split {p.split.name!r}: no usable sample in any shard")
        # The same shard permutation on every rank: (seed, epoch) alone.
        perm = np.random.default_rng([p.seed, self.epoch]).permutation(n_shards)
        slot = p.rank * p.lanes + lane
        order = [int(i) for i in perm[slot::p.world_size * p.lanes] if useful[i]]
        rng = np.random.default_rng([p.seed, self.epoch, p.rank, lane])
        while True:
            yield from self._shuffled(order, rng)
            # Past its own shards a lane resamples from all of them: it never runs dry,
            # so every rank takes the same number of steps whatever the split.
            order = [int(i) for i in rng.permutation(n_shards) if useful[i]]

    def _shuffled(self, order: list[int], rng: np.random.Generator) -> Iterator[Record]:
        p = self.plan
        buf: list[Record] = []
        for i in order:
            for rec in read_records(p.split.paths[i], p.split.shard_rows(i)):
                if not p.keep[rec.idx]:
                    continue
                if len(buf) < p.shuffle_buffer:
                    buf.append(rec)
                    continue
                if p.shuffle_buffer:
                    j = int(rng.integers(p.shuffle_buffer))
                    buf[j], rec = rec, buf[j]
                yield rec
        # Drained at the end of each pass: every sample of a lane's own shards comes out
        # before any resampled one, so evenly divided shards are each seen once an epoch.
        for j in rng.permutation(len(buf)):
            yield buf[j]


class EvalSlices(_ShardStream):
    """Slot r * lanes + w scores the slot-th contiguous share of the split's samples, so
    the ranks together score every sample exactly once, whatever the shard count."""

    def __init__(self, plan: StreamPlan):
        super().__init__(plan, 0)

    def _batches(self):
        p = self.plan
        w, _ = worker_slot()
        valid = np.flatnonzero(p.keep[p.split.rows["idx"]])  # positions in shard order
        slots, slot = p.world_size * p.lanes, p.rank * p.lanes + w
        mine = valid[len(valid) * slot // slots:len(valid) * (slot + 1) // slots]
        if mine.size == 0:
            return
        records = self._range(int(mine[0]), int(mine[-1]))
        while (item := self._take(records, train=False)) is not None:
            yield item

    def _range(self, lo: int, hi: int) -> Iterator[Record]:
        split, offsets = self.plan.split, self.plan.split.offsets
        first = int(np.searchsorted(offsets, lo, side="right")) - 1
        last = int(np.searchsorted(offsets, hi, side="right")) - 1
        for i in range(first, last + 1):
            for k, rec in enumerate(read_records(split.paths[i], split.shard_rows(i))):
                if lo <= offsets[i] + k <= hi and self.plan.keep[rec.idx]:
                    yield rec


class Agreement:
    """One verdict for all ranks: any rank's error stops every rank at the same point.
    A CPU gloo group, so the check costs no GPU synchronisation."""

    def __init__(self, ctx: DistContext, timeout_s: float):
        self.rank = ctx.rank
        timeout = datetime.timedelta(seconds=timeout_s)
        # With the run's timeout: a rank stuck reading a shard fails its peers after
        # dist.timeout_s, not after gloo's default 30 minutes.
        self.group = (dist.new_group(backend="gloo", timeout=timeout)
                      if ctx.distributed and dist.is_initialized() else None)

    def check(self, error: Optional[str], count: int = 0) -> int:
        """All ranks call it together; returns the sum of ``count`` over the ranks."""
        if self.group is None:
            if error:
                raise DataError(error)
            return count
        t = torch.tensor([1.0 if error else 0.0, float(count)], dtype=torch.float64)
        dist.all_reduce(t, group=self.group)
        if t[0] > 0:
            errors: list = [None] * dist.get_world_size(self.group)
            dist.all_gather_object(errors, error, group=self.group)
            first = next(r for r, e in enumerate(errors) if e)
            raise DataError(error or f"rank {first} stopped on bad input: {errors[first]}")
        return int(t[1])


class _Feed:
    """Main-process side of a stream: device copies, GPU decoding, normalisation."""

    def __init__(self, plan: StreamPlan, device: torch.device, num_workers: int, agreement: Agreement):
        self.plan, self.device, self.num_workers, self.agreement = plan, device, num_workers, agreement
        self.normalize = Normalize(plan.geo, device)

    def _images(self, item: dict, epoch: int, train: bool) -> tuple[torch.Tensor, torch.Tensor, int]:
        if "error" in item:
            raise DataError(item["error"])
        idx, bad = item["idx"], item["bad"]  # bad: skipped by the worker
        if "x" in item:
            x = item["x"].to(self.device, non_blocking=True)
        else:
            x, idx, more = self._decode_on_device(item, epoch, train)
            bad += more
        return self.normalize(to_float(x)), idx.to(self.device, non_blocking=True), bad

    def _decode_one(self, data: torch.Tensor, where: str, mode) -> Optional[torch.Tensor]:
        try:
            return decode_jpeg(data, mode=mode, device=self.device)
        except RuntimeError as exc:
            msg = f"{where}: the image does not decode: {reason(exc)}"
            if not self.plan.skip_bad:
                raise DataError(msg) from None
            warn(f"rank {self.plan.rank}: skipped a bad sample (data.on_bad_sample=skip): {msg}")
            return None

    def _decode_on_device(self, item: dict, epoch: int, train: bool):
        geo, idx = self.plan.geo, item["idx"].clone()
        mode = ImageReadMode.GRAY if geo.channels == 1 else ImageReadMode.RGB
        pos = [i for i, r in enumerate(item["raw"]) if r]
        data = [item["images"][i] for i in pos]
        try:
            decoded = decode_jpeg(data, mode=mode, device=self.device)
        except RuntimeError:  # find which: one at a time
            decoded = [self._decode_one(d, item["where"][i], mode) for d, i in zip(data, pos)]
        u = sample_uniforms(self.plan.seed, epoch, idx.numpy()) if train else None
        # Non-JPEG samples arrive decoded and placed by the worker; JPEGs are placed here.
        out: list = [None if r else img.to(self.device, non_blocking=True)
                     for img, r in zip(item["images"], item["raw"])]
        for i, img in zip(pos, decoded):
            out[i] = None if img is None else place(img, geo, None if u is None else u[i], item["where"][i])
        good = [i for i, o in enumerate(out) if o is not None]
        if not good:
            raise DataError(f"{item['where'][0]}: no image of the batch decodes")
        bad = len(out) - len(good)
        if not train:  # evaluation just scores fewer samples
            return torch.stack([out[i] for i in good]), idx[good], bad
        # Training keeps the batch size the collectives expect: a bad sample's place goes
        # to a good sample of the same batch (image and labels).
        for i, o in enumerate(out):
            if o is None:
                out[i], idx[i] = out[good[0]], idx[good[0]]
        return torch.stack(out), idx, bad


class StreamTrainLoader(_Feed):
    # Shards are dealt to (rank, worker) slots: the order depends on the world size, so a
    # checkpoint taken mid-epoch continues exactly only under the same number of ranks.
    world_size_invariant = False

    def __init__(self, plan: StreamPlan, *, noisy: np.ndarray, clean: np.ndarray, steps_per_epoch: int,
                 num_samples: int, static_bad: int, device: torch.device, num_workers: int,
                 agreement: Agreement):
        super().__init__(plan, device, num_workers, agreement)
        self.noisy = torch.from_numpy(noisy).to(device)
        self.clean = torch.from_numpy(clean).to(device)
        self.steps_per_epoch = steps_per_epoch
        self.num_samples = num_samples
        self.static_bad = static_bad
        self.bad_samples = static_bad

    def epoch(self, epoch: int, start_step: int = 0) -> Iterator[Batch]:
        # bad_samples: those met in the steps yielded, plus the ones left out up front when the
        # epoch starts at step 0; a resumed epoch's earlier count travels in the checkpoint.
        self.bad_samples = self.static_bad if start_step == 0 else 0
        if start_step >= self.steps_per_epoch:
            return
        batches = iter(make_loader(TrainLanes(self.plan, epoch, start_step), self.num_workers, self.device))
        for step in range(start_step, self.steps_per_epoch):
            batch, error = None, None
            try:
                x, idx, bad = self._images(next(batches), epoch, train=True)
                self.bad_samples += bad
                batch = Batch(x=x, y=self.noisy[idx], clean=self.clean[idx], idx=idx)
            except DataError as exc:
                error = str(exc)
            except Exception as exc:  # a worker died, a copy failed: still stop every rank together
                error = f"rank {self.plan.rank}: the input pipeline failed at step {step}: {exc!r}"
            try:
                self.agreement.check(error)
            except DataError:
                batches = None  # stop the workers now: every rank reports at once, none lingers
                raise
            yield batch


class StreamEvalLoader(_Feed):
    """Scores a split (the evaluation split, or with ``clean`` the training split for the
    train_eval pass, yielding ``Batch``es) once, its share on each rank."""

    def __init__(self, plan: StreamPlan, *, labels: np.ndarray, num_samples: int, device: torch.device,
                 num_workers: int, agreement: Agreement, clean: Optional[np.ndarray] = None):
        super().__init__(plan, device, num_workers, agreement)
        self.labels = torch.from_numpy(labels).to(device)
        self.clean = None if clean is None else torch.from_numpy(clean).to(device)
        self.num_samples = num_samples
        # The trainer checks the scored count against bundle.test_samples after the loop;
        # samples skipped while streaming are subtracted there (data.on_bad_sample: skip).
        self.bundle: Optional[DataBundle] = None

    def __iter__(self) -> Iterator[EvalBatch]:
        error, skipped = None, 0
        try:
            for item in make_loader(EvalSlices(self.plan), self.num_workers, self.device):
                if "idx" not in item and "error" not in item:
                    skipped += item["bad"]  # a tally of skipped samples
                    continue
                x, idx, bad = self._images(item, 0, train=False)
                skipped += bad
                if self.clean is None:
                    yield EvalBatch(x=x, y=self.labels[idx])
                else:
                    yield Batch(x=x, y=self.labels[idx], clean=self.clean[idx], idx=idx)
        except DataError as exc:
            error = str(exc)
        except Exception as exc:
            error = f"rank {self.plan.rank}: the evaluation input pipeline failed: {exc!r}"
        total = self.agreement.check(error, skipped)
        if self.bundle is not None:
            self.bundle.test_samples = self.num_samples - total


def stream_loaders(cfg: Config, ctx: DistContext, data: ShardData, *, raw_jpeg: bool = False) -> Loaders:
    lanes = max(1, cfg.data.num_workers)
    n_shards = len(data.train.paths)
    if n_shards < ctx.world_size * lanes:
        raise DataError(f"{data.manifest.root}: split 'train' has {n_shards} shards, fewer than ranks x "
                        f"workers = {ctx.world_size} x {lanes}; re-run prepare with a smaller --shard-size, "
                        f"or lower data.num_workers")
    kept = int(data.train_keep.sum())
    steps = kept // cfg.train.batch_size
    if steps == 0:
        raise DataError(f"{data.manifest.root}: the training split has {kept} usable samples, fewer than "
                        f"one global batch of {cfg.train.batch_size}; lower train.batch_size")
    local = cfg.train.batch_size // ctx.world_size
    plan = StreamPlan(data.train, data.train_keep, data.geo, cfg.train.seed, ctx.rank, ctx.world_size, lanes,
                      local, cfg.data.shuffle_buffer, cfg.data.on_bad_sample == "skip", raw_jpeg)
    agreement = Agreement(ctx, cfg.dist.timeout_s)
    train = StreamTrainLoader(plan, noisy=data.noisy, clean=data.clean, steps_per_epoch=steps,
                              num_samples=len(data.noisy),
                              static_bad=data.train_bad if ctx.is_main else 0, device=ctx.device,
                              num_workers=cfg.data.num_workers, agreement=agreement)
    test_plan = dataclasses.replace(plan, split=data.test, keep=data.test_keep)
    test = StreamEvalLoader(test_plan, labels=data.test_labels, num_samples=int(data.test_keep.sum()),
                            device=ctx.device, num_workers=cfg.data.num_workers, agreement=agreement)
    train_eval = StreamEvalLoader(plan, labels=data.noisy, clean=data.clean, num_samples=kept, device=ctx.device,
                                  num_workers=cfg.data.num_workers, agreement=agreement)
    return Loaders(train, test, test.num_samples, train_eval)
