"""Training from shards: decode once into a device cache, or stream every epoch.

``data.cache: device`` (auto picks it when the decoded splits fit in
``data.cache_budget_gb``): every rank decodes every shard once, in DataLoader workers,
into a uint8 array, and the in-memory loaders take over: a global per-epoch permutation,
the same for every world size, augmentation on the device.

``data.cache: stream``: every epoch the train shards are shuffled with (train.seed,
epoch) and dealt to (rank, worker) slots; each worker reads its shards through a seeded
shuffle buffer and builds whole batches, which the DataLoader hands out in turn. Every
random choice is a function of (seed, epoch, rank, worker, sample index), never of
timing, so ``epoch(e, start_step=s)`` yields exactly the batches s.. of ``epoch(e)``.
A worker that has used up its shards goes on resampling from all of them, so every rank
runs the same floor(N / global batch) steps however unevenly the shards divide.
webdataset reads the tars (``tarfile_samples``); the dealing of shards to ranks and workers
is ours rather than ``split_by_node`` / ``split_by_worker`` + ``resampled``: those give equal
step counts but neither each sample once per epoch nor a step-exact resume, which need the
fixed mapping of steps to workers ("lanes") below.

Bad input. Everything that can be checked without decoding pixels (manifest, files,
sizes, sha256, index, labels, sample counts) is checked on every rank before the first
collective, so every rank reaches the same verdict on its own. An image that fails to
decode is met by one rank only, while streaming; so before every training step (and at
the end of evaluation) the ranks exchange one small flag on a CPU gloo group, and if any
rank failed, every rank raises at the same step instead of waiting in a collective.
"""

from __future__ import annotations

import datetime

import dataclasses
import itertools
import re
import signal
import sys
from dataclasses import dataclass
from typing import Iterator, NamedTuple, Optional

import numpy as np
import torch
import torch.distributed as dist
import torchvision.transforms.v2.functional as TF
from torch.utils.data import DataLoader, IterableDataset, get_worker_info
from torchvision.io import ImageReadMode, decode_image, decode_jpeg

from ..config import Config, ConfigError
from ..dist import DistContext
from ..noise import NoiseInfo, make_noisy_labels
from ..progress import Progress, progress_enabled
from .memory import MemoryEvalLoader, MemoryTrainLoader, to_float
from .shards import Manifest, Record, SplitIndex, load_manifest, read_records, verify_split
from .sources import DataError
from .types import Batch, DataBundle, EvalBatch

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# Datasets of variable image size: resize the shorter side, then crop a square.
RESIZED = ("clothing1m", "imagefolder")
MAX_WARNINGS = 5


# --- geometry: how a stored image becomes the model's input --------------------------

@dataclass(frozen=True)
class Geometry:
    channels: int
    native: Optional[tuple[int, int]]  # (H, W): used as stored; None: resize, then crop
    resize: int
    crop: int
    pad_augment: bool  # native images only: pad-4 random crop and flip (data.augment)

    @property
    def side(self) -> int:
        """The side the model sees."""
        return self.native[0] if self.native else self.crop

    @property
    def cached(self) -> tuple[int, int]:
        """The side of a device-cache entry: random training crops are taken inside it."""
        return self.native or (self.resize, self.resize)


def geometry(cfg: Config, manifest: Manifest) -> Geometry:
    image = manifest.image
    channels = int(image["channels"])
    if manifest.dataset in RESIZED or image.get("height") is None:
        return Geometry(channels, None, cfg.data.resize_size, cfg.data.crop_size, False)
    return Geometry(channels, (int(image["height"]), int(image["width"])), 0, 0, cfg.data.augment)


def _mix(z: np.ndarray) -> np.ndarray:
    """splitmix64, elementwise on uint64 (wrapping arithmetic)."""
    with np.errstate(over="ignore"):
        z = z + np.uint64(0x9E3779B97F4A7C15)
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return z ^ (z >> np.uint64(31))


def sample_uniforms(seed: int, epoch: int, idx, k: int = 3) -> np.ndarray:
    """(len(idx), k) uniforms in [0, 1) that depend on (seed, epoch, sample index) alone:
    a sample gets the same crop and flip whichever rank, worker or step meets it."""
    key = _mix(np.array([seed % 2**64], dtype=np.uint64) ^ _mix(np.array([epoch % 2**64], dtype=np.uint64)))
    z = np.asarray(idx, dtype=np.int64).astype(np.uint64) ^ key
    cols = []
    for _ in range(k):
        z = _mix(z)
        cols.append((z >> np.uint64(11)).astype(np.float64) * 2.0**-53)
    return np.stack(cols, axis=1)


def _reason(exc: Exception) -> str:
    # torchvision prefixes 'decode_jpeg, /path/decode_jpeg.cpp:171, '.
    return re.sub(r"^\w+, \S+:\d+, ", "", str(exc))


def decode(rec: Record, channels: int) -> torch.Tensor:
    mode = ImageReadMode.GRAY if channels == 1 else ImageReadMode.RGB
    try:
        return decode_image(torch.frombuffer(bytearray(rec.image), dtype=torch.uint8), mode=mode)
    except RuntimeError as exc:
        raise DataError(f"{rec.where()}: the image does not decode: {_reason(exc)}") from None


def place(img: torch.Tensor, geo: Geometry, u: Optional[np.ndarray], where: str) -> torch.Tensor:
    """One decoded CHW uint8 image -> the model's side. ``u`` (three uniforms) gives a
    training sample its random crop and flip; None gives the evaluation view."""
    if geo.native:
        if tuple(img.shape) != (geo.channels, *geo.native):
            raise DataError(f"{where}: image of shape {tuple(img.shape)}, the manifest says "
                            f"{(geo.channels, *geo.native)}")
        if u is None or not geo.pad_augment:
            return img
        h, w = geo.native
        top, left = int(u[0] * 9), int(u[1] * 9)
        img = torch.nn.functional.pad(img, (4, 4, 4, 4))[:, top:top + h, left:left + w]
    else:
        img = TF.resize(img, [geo.resize], antialias=True)
        if u is None:
            return TF.center_crop(img, [geo.crop, geo.crop])
        h, w = img.shape[-2:]
        top, left = int(u[0] * (h - geo.crop + 1)), int(u[1] * (w - geo.crop + 1))
        img = img[:, top:top + geo.crop, left:left + geo.crop]
    return (img.flip(-1) if u[2] < 0.5 else img).contiguous()


def cache_view(img: torch.Tensor, geo: Geometry, where: str) -> torch.Tensor:
    """What the device cache keeps: native images as they are; others resized and
    centre-cropped to resize x resize, inside which training takes its random crops."""
    if geo.native:
        return place(img, geo, None, where)
    return TF.center_crop(TF.resize(img, [geo.resize], antialias=True), [geo.resize, geo.resize])


def crop_flip_batch(x: torch.Tensor, tops: torch.Tensor, lefts: torch.Tensor, size: int,
                    flips: torch.Tensor) -> torch.Tensor:
    """Per-sample size x size crops at (top, left), flipped where asked: one gather on the device."""
    ar = torch.arange(size, device=x.device)
    rows = tops[:, None] + ar
    cols = lefts[:, None] + torch.where(flips[:, None], ar.flip(0), ar)
    batch = torch.arange(x.shape[0], device=x.device)[:, None, None]
    return x[batch, :, rows[:, :, None], cols[:, None, :]].permute(0, 3, 1, 2)


class Normalize:
    """ImageNet normalisation for the resized sets; the small sets stay in [0, 1] (ToTensor)."""

    def __init__(self, geo: Geometry, device: torch.device):
        self.on = geo.native is None
        self.mean = torch.tensor(IMAGENET_MEAN, device=device).view(1, 3, 1, 1)
        self.std = torch.tensor(IMAGENET_STD, device=device).view(1, 3, 1, 1)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) / self.std if self.on else x


# --- the verified shards, labels resolved ---------------------------------------------

@dataclass
class ShardData:
    manifest: Manifest
    geo: Geometry
    train: SplitIndex
    test: SplitIndex
    train_keep: np.ndarray  # by sample index: in the subset and not a known bad sample
    test_keep: np.ndarray
    train_bad: int          # known bad samples left out (data.on_bad_sample: skip)
    test_bad: int
    noisy: np.ndarray       # by sample index
    clean: np.ndarray
    test_labels: np.ndarray
    noise: Optional[NoiseInfo]


def _warn(msg: str) -> None:
    print(f"warning: {msg}", file=sys.stderr, flush=True)


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
            _warn(f"left out {len(bad)} sample(s) of split {split.name!r} with a label outside "
                  f"[0, {num_classes}) (data.on_bad_sample=skip); the first: {split.where(bad[0])}")
    return keep, len(bad)


def _labels(cfg: Config, manifest: Manifest, split: SplitIndex, keep: np.ndarray):
    n = min(cfg.data.train_subset or split.samples, split.samples)
    cls, clean = split.by_idx("cls")[:n], split.by_idx("clean")[:n]
    if manifest.labels == "noisy":
        if cfg.noise.type != "none":
            raise ConfigError(f"noise.type: {manifest.dataset}'s labels are already noisy; set "
                              f"noise.type=none noise.rate=0 (and method.forget_rate)")
        if cfg.method.forget_rate is None:
            # tau would default to the synthetic noise rate, 0: JoCoR would keep every sample.
            raise ConfigError(f"method.forget_rate: {manifest.dataset}'s labels are already noisy, so "
                              f"the forget rate cannot follow noise.rate; set it (e.g. 0.38 for Clothing1M)")
        return cls, clean, None
    # Labels left out as bad are drawn as class 0: each sample's noisy label depends on its
    # own clean label and its own uniform only, so every other sample's is unchanged.
    safe = np.where(keep[:n], cls, 0)
    noisy, info = make_noisy_labels(cfg.noise, safe, manifest.num_classes, manifest.dataset)
    return noisy, safe, info


def open_shards(cfg: Config, ctx: DistContext) -> ShardData:
    """Verify the manifest and the train and evaluation splits, resolve the labels."""
    manifest = load_manifest(cfg.data.shards)
    if manifest.dataset != cfg.data.name:
        raise DataError(f"{manifest.root}: holds {manifest.dataset!r} shards, data.name is {cfg.data.name!r}")
    train = verify_split(manifest, "train", cfg.data.verify)
    test = verify_split(manifest, cfg.data.eval_split, cfg.data.verify)
    c, skip = manifest.num_classes, cfg.data.on_bad_sample == "skip"
    train_keep, train_bad = _usable(train, cfg.data.train_subset, c, skip, ctx)
    test_keep, test_bad = _usable(test, cfg.data.test_subset, c, skip, ctx)
    noisy, clean, info = _labels(cfg, manifest, train, train_keep)
    return ShardData(manifest, geometry(cfg, manifest), train, test, train_keep, test_keep, train_bad,
                     test_bad, noisy, clean, test.by_idx("cls"), info)


def choose_cache(cfg: Config, data: ShardData) -> str:
    if cfg.data.cache != "auto":
        return cfg.data.cache
    h, w = data.geo.cached
    need = (int(data.train_keep.sum()) + int(data.test_keep.sum())) * data.geo.channels * h * w
    return "device" if need <= cfg.data.cache_budget_gb * 2**30 else "stream"


# --- DataLoader workers -------------------------------------------------------------

def _worker_init(_: int) -> None:
    # SIGTERM is the main process's to handle (checkpoint on preemption); workers go when it does.
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    torch.set_num_threads(1)


def _worker() -> tuple[int, int]:
    info = get_worker_info()
    return (info.id, info.num_workers) if info is not None else (0, 1)


def make_loader(dataset: IterableDataset, num_workers: int, device: torch.device) -> DataLoader:
    # batch_size=None: workers build whole batches; the loader hands them out in turn,
    # worker 0 first, which is what makes the order of batches deterministic.
    return DataLoader(dataset, batch_size=None, num_workers=num_workers,
                      pin_memory=device.type == "cuda", worker_init_fn=_worker_init if num_workers else None)


# --- the device cache ----------------------------------------------------------------

class _DecodeShards(IterableDataset):
    """Worker w of W decodes shards w, w + W, ... of a split into cache entries."""

    def __init__(self, split: SplitIndex, keep: np.ndarray, geo: Geometry, skip: bool):
        self.split, self.keep, self.geo, self.skip = split, keep, geo, skip

    def __iter__(self):
        w, nw = _worker()
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
        _warn(f"left out {len(bad)} sample(s) of split {split.name!r} that do not decode "
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


class Loaders(NamedTuple):
    train: object
    test: object
    test_samples: int
    train_eval: object  # every training sample once, unaugmented, as Batches


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
            _warn(f"rank {self.plan.rank}: skipped a bad sample (data.on_bad_sample=skip): {msg}")


class TrainLanes(_ShardStream):
    """Rank r's lanes: lane l reads the shards dealt to slot r * lanes + l, shuffled."""

    def __init__(self, plan: StreamPlan, epoch: int, start_step: int):
        super().__init__(plan, epoch)
        self.start_step = start_step

    def _batches(self):
        p = self.plan
        w, _ = _worker()
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
        w, _ = _worker()
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
            msg = f"{where}: the image does not decode: {_reason(exc)}"
            if not self.plan.skip_bad:
                raise DataError(msg) from None
            _warn(f"rank {self.plan.rank}: skipped a bad sample (data.on_bad_sample=skip): {msg}")
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


def build_shard_bundle(cfg: Config, ctx: DistContext) -> DataBundle:
    if cfg.data.gpu_decode and ctx.device.type != "cuda":
        raise ConfigError("data.gpu_decode: needs a CUDA training device (train.device)")
    data = open_shards(cfg, ctx)
    cache = choose_cache(cfg, data)
    if cache == "device":
        loaders = cached_loaders(cfg, ctx, data)
    else:
        loaders = stream_loaders(cfg, ctx, data, raw_jpeg=cfg.data.gpu_decode)
    m = data.manifest
    normalization = None if data.geo.native else {"mean": list(IMAGENET_MEAN), "std": list(IMAGENET_STD)}
    bundle = DataBundle(name=m.dataset, classes=m.classes, in_channels=data.geo.channels,
                        image_size=data.geo.side, train=loaders.train, test=loaders.test,
                        test_samples=loaders.test_samples, noise=data.noise, train_eval=loaders.train_eval,
                        normalization=normalization,
                        extra={"shards": str(m.root), "cache": cache, "eval_split": cfg.data.eval_split})
    if isinstance(loaders.test, StreamEvalLoader):
        loaders.test.bundle = bundle
    return bundle
