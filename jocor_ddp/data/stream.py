"""Streaming shards (``data.cache: stream``): the feed between the decoding workers and the step.

The order is the memory source's: one global permutation of the usable samples per
(train.seed, epoch), rank r taking the r-th slice of every global batch. Shards are read by
offset (``shards.ShardReader``), so any order costs the same, and the stream yields, for a
given (seed, epoch, step), exactly the batch the device cache yields: the same samples, the
same stored views, the same crops. ``epoch(e, start_step=s)`` is the batches s.. of
``epoch(e)`` under any number of ranks.

Per step only uint8 pixels, the batch's indices and crop parameters reach the device; the
step (inside its CUDA graph) gathers the labels and places the pixels (``place.py``). With
``data.gpu_decode`` the workers pack each batch's JPEGs into their slot and a feeder thread
decodes them with one nvJPEG call per batch on its own stream, synchronised before each
call (nvJPEG may overwrite memory that work still queued on its stream reads:
pytorch/vision#9606); the step's stream waits on an event, never the host, and
``record_stream`` keeps a decoded batch alive while the step reads it. Two batches are
decoded ahead (a double buffer), so decoding batch t+1 overlaps step t.

Bad input. What can be checked without decoding is checked on every rank before the first
collective (``shardset.py``). An image that fails to decode is met by one rank only: that
rank goes on stepping with its previous batch and keeps the error, and the trainer's next
sync point (``train.sync_every``) raises it on every rank at the same step.
"""

from __future__ import annotations

import queue
import threading
from contextlib import closing, nullcontext
from dataclasses import dataclass
from typing import Callable, Iterator, Optional

import numpy as np
import torch

from ..dist import DistContext
from .decode import decode_on_device
from .epochs import EpochDraw
from .place import Geometry, Placement
from .shards import SplitIndex
from .shardset import Loaders, ShardData
from .sources import DataError, warn
from .types import BadSamples, Batch, EvalBatch, agree_on_error
from .workers import DecodePool, Job, Result, positions_in_batches

MAX_WARNINGS = 5  # warnings per rank about skipped bad samples (data.on_bad_sample: skip); the count goes on
AHEAD = 2         # batches the GPU decoder works ahead of the step


@dataclass
class Item:
    """One batch on its way to the step: host views of a worker's slot (CPU decoding) or
    device tensors with the event that completes them (GPU decoding)."""
    pixels: Optional[torch.Tensor] = None  # (n, C, H, W) uint8 stored views
    params: Optional[torch.Tensor] = None  # (n, 3) crops
    idx: Optional[torch.Tensor] = None     # (n,) sample indices
    ok: Optional[np.ndarray] = None        # evaluation: which samples decoded
    bad: int = 0
    error: Optional[str] = None
    event: Optional[torch.cuda.Event] = None
    release: Callable = lambda event=None: None  # the slot goes back to its worker


@dataclass
class Buffers:
    """The step's fixed input buffers: what a captured graph reads every replay."""
    pixels: torch.Tensor
    params: torch.Tensor
    idx: torch.Tensor


class _SplitStream:
    """What the training and evaluation streams share: jobs through the pool, to ``Item``s."""

    def __init__(self, pool: DecodePool, split: SplitIndex, geo: Geometry, device: torch.device, rank: int,
                 gpu_decode: bool, skip_bad: bool):
        self.pool, self.split, self.geo, self.device, self.rank = pool, split, geo, device, rank
        self.gpu_decode, self.skip_bad = gpu_decode, skip_bad
        self.placement = Placement(geo, device)
        self.warned = 0

    def _warn(self, messages: list) -> None:
        for msg in messages:
            self.warned += 1
            if self.warned <= MAX_WARNINGS:
                warn(f"rank {self.rank}: skipped a bad sample (data.on_bad_sample=skip): {msg}")

    def _items(self, jobs: Iterator[Job]) -> Iterator[Item]:
        results = self.pool.run(jobs)
        if self.gpu_decode:
            return self._decoded_on_device(results)
        return (self._host_item(r) for r in results)

    def _host_item(self, r: Result) -> Item:
        if r.error:
            self.pool.release(r)
            return Item(error=r.error)
        self._warn(r.bad)
        n, ring = len(r.idx), self.pool.ring
        return Item(ring.pixels[r.slot, :n], ring.params[r.slot, :n], ring.idx[r.slot, :n], r.ok, len(r.bad),
                    release=lambda event=None, r=r: self.pool.release(r, event))

    # --- GPU decoding: a feeder thread, its own stream, a double buffer -------------------

    def _decoded_on_device(self, results: Iterator[Result]) -> Iterator[Item]:
        out: queue.Queue = queue.Queue(maxsize=AHEAD)
        stop = threading.Event()
        done = object()

        def put(item) -> None:
            while not stop.is_set():
                try:
                    return out.put(item, timeout=0.1)
                except queue.Full:
                    continue

        def feed() -> None:
            stream = torch.cuda.Stream(self.device) if self.device.type == "cuda" else None
            try:
                for r in results:
                    if stop.is_set():
                        break
                    put(self._decode(r, stream))
            except Exception as exc:  # noqa: BLE001 -- raised by the consumer at its sync point
                put(Item(error=f"rank {self.rank}: GPU decoding failed: {exc!r}"))
            finally:
                results.close()  # this thread runs the pool's generator: it closes it too
                put(done)

        thread = threading.Thread(target=feed, name="jocor-gpu-decode", daemon=True)
        thread.start()
        try:
            while (item := out.get()) is not done:
                yield item
        finally:
            stop.set()
            thread.join()

    def _decode(self, r: Result, stream) -> Item:
        ring = self.pool.ring
        if r.error:
            self.pool.release(r)
            return Item(error=r.error)
        n = len(r.idx)
        ends = np.cumsum(r.lengths)
        blobs = [ring.raw[r.slot, e - size:e] for e, size in zip(ends, r.lengths)]
        split = self.split
        ctx = torch.cuda.stream(stream) if stream is not None else nullcontext()
        with ctx:
            if stream is not None:
                stream.synchronize()  # pytorch/vision#9606: nothing of ours queued while nvJPEG runs
            views, bad = decode_on_device(blobs, self.geo, self.device,
                                          lambda k: split.where(int(split.pos_of_idx[r.idx[k]])))
            if bad and not self.skip_bad:
                self.pool.release(r)
                return Item(error=bad[0])
            self._warn(bad)
            ok = np.array([v is not None for v in views])
            if not ok.any():
                self.pool.release(r)
                return Item(error=f"no image of the batch decodes; the first: {bad[0]}")
            params, idx = ring.params[r.slot, :n], ring.idx[r.slot, :n]
            if bad and self.fill:  # training keeps its batch size: a good sample of the batch takes the place
                g = int(np.flatnonzero(ok)[0])
                views = [v if v is not None else views[g] for v in views]
                idx[torch.from_numpy(~ok)] = int(r.idx[g])
            elif bad:  # evaluation scores fewer samples
                keep = torch.from_numpy(ok)
                views, params, idx = [v for v in views if v is not None], params[keep], idx[keep]
            pixels = torch.stack(views)
            params = params.to(self.device, non_blocking=True, copy=True)  # the slot is refilled
            idx = idx.to(self.device, non_blocking=True, copy=True)
            event = torch.cuda.Event() if stream is not None else None
            if event is not None:
                event.record(stream)
        self.pool.release(r, event)  # the slot is free once these copies are done
        return Item(pixels, params, idx, np.ones(len(views), dtype=bool), len(bad), event=event)


def arrive(item: Item, device: torch.device) -> Optional[torch.cuda.Stream]:
    """On CUDA: make the current stream wait for a batch decoded on the GPU (an event, not the
    host) and keep its memory from reuse until this stream is done with it."""
    if device.type != "cuda":
        return None
    current = torch.cuda.current_stream(device)
    if item.event is not None:
        current.wait_event(item.event)
        item.pixels.record_stream(current)
    return current


def done(item: Item, current: Optional[torch.cuda.Stream]) -> None:
    """The item's slot goes back to its worker once what this stream copied from it is copied."""
    event = None
    if current is not None:
        event = torch.cuda.Event()
        event.record(current)
    item.release(event)


class StreamTrainLoader(_SplitStream):
    resident = False
    # The memory source's order: any world size continues a checkpointed epoch exactly.
    world_size_invariant = True
    fill = True

    def __init__(self, pool: DecodePool, split: SplitIndex, usable: np.ndarray, noisy: np.ndarray,
                 clean: np.ndarray, *, global_batch: int, ctx: DistContext, seed: int, geo: Geometry,
                 gpu_decode: bool, skip_bad: bool, static_bad: int, steps_per_epoch: Optional[int] = None,
                 max_per_class: Optional[int] = None):
        super().__init__(pool, split, geo, ctx.device, ctx.rank, gpu_decode, skip_bad)
        self.ctx = ctx
        self.usable = usable  # the sample indices trained on, ascending
        self.noisy = torch.from_numpy(noisy).to(ctx.device)
        self.clean = torch.from_numpy(clean).to(ctx.device)
        self.global_batch, self.local_batch = global_batch, global_batch // ctx.world_size
        self.offset = ctx.rank * self.local_batch
        # The memory source's draw over the same samples: the same batches (ValueError: too few).
        self.draw = EpochDraw(noisy[usable], global_batch, seed, steps_per_epoch, max_per_class)
        self.steps_per_epoch = self.draw.steps
        self.index_range = len(noisy)  # the range of Batch.idx
        self.bad = BadSamples(static_bad)
        self.error: Optional[str] = None  # the first bad input this rank met, until a sync point raises it

    def jobs(self, epoch: int, start_step: int) -> Iterator[Job]:
        order = self.usable[self.draw.order(epoch)]
        for step in range(start_step, self.steps_per_epoch):
            lo = step * self.global_batch + self.offset
            yield Job("train", self.split.pos_of_idx[order[lo:lo + self.local_batch]], epoch, fill=True,
                      raw=self.gpu_decode)

    def items(self, epoch: int, start_step: int = 0) -> Iterator[Item]:
        """One item per step from ``start_step`` on; after an error, error items to the end
        of the epoch (the rank keeps stepping until the sync point stops every rank)."""
        # Bad samples: those met in the steps yielded, plus the ones left out up front when the
        # epoch starts at step 0; a resumed epoch's earlier count travels in the checkpoint.
        self.bad.start_epoch(start_step)
        self.error = None
        step = start_step
        try:
            # closing: a GPU decoder's thread stops here, before the pool serves another run
            with closing(self._items(self.jobs(epoch, start_step))) as items:
                for item in items:
                    yield item
                    step += 1
                    if item.error:
                        break
        except DataError as exc:  # a worker died
            yield Item(error=str(exc))
            step += 1
        for _ in range(step, self.steps_per_epoch):
            yield Item(error=self.error or "the input pipeline stopped")

    def buffers(self) -> Buffers:
        b = self.local_batch
        # Channels last, like the workers' slots: the copy in is one contiguous block.
        pixels = torch.zeros((b, *self.geo.stored, self.geo.channels), dtype=torch.uint8, device=self.device)
        return Buffers(pixels.permute(0, 3, 1, 2),
                       torch.zeros((b, 3), dtype=torch.int64, device=self.device),
                       torch.zeros(b, dtype=torch.int64, device=self.device))

    def load(self, item: Item, bufs: Buffers) -> None:
        """Copy a batch into the step's buffers (asynchronously from pinned slots on CUDA) and
        hand its slot back once the copy is done. A bad batch is kept back: the buffers keep
        the previous batch, and the error waits for the sync point."""
        if item.error:
            self.error = self.error or item.error
            return
        current = arrive(item, self.device)
        bufs.pixels.copy_(item.pixels, non_blocking=True)
        bufs.params.copy_(item.params, non_blocking=True)
        bufs.idx.copy_(item.idx, non_blocking=True)
        done(item, current)
        self.bad.met += item.bad

    def gather(self, bufs: Buffers) -> Batch:
        """The step's batch from its buffers: device ops only, the same for every batch."""
        return Batch(x=self.placement.train(bufs.pixels, bufs.params), y=self.noisy[bufs.idx],
                     clean=self.clean[bufs.idx], idx=bufs.idx)

    def close(self) -> None:
        self.pool.close()

    def epoch(self, epoch: int, start_step: int = 0) -> Iterator[Batch]:
        """The batches themselves (tools and tests; the trainer feeds the step's buffers and
        agrees at its sync points): the ranks agree on bad input before every batch."""
        bufs = self.buffers()
        for item in self.items(epoch, start_step):
            self.load(item, bufs)
            agree_on_error(self.ctx, self.error)
            b = self.gather(bufs)
            yield Batch(x=b.x, y=b.y, clean=b.clean, idx=b.idx.clone())


class StreamEvalLoader(_SplitStream):
    """Scores a split (an evaluation split, or with ``clean`` the training split for the
    train_eval and noisy held-out passes, yielding ``Batch``es) once: rank r the r-th
    contiguous share."""
    fill = False

    def __init__(self, pool: DecodePool, split_name: str, split: SplitIndex, usable: np.ndarray,
                 labels: np.ndarray, *, batch: int, ctx: DistContext, geo: Geometry, gpu_decode: bool,
                 skip_bad: bool, clean: Optional[np.ndarray] = None):
        super().__init__(pool, split, geo, ctx.device, ctx.rank, gpu_decode, skip_bad)
        self.ctx, self.split_name, self.batch = ctx, split_name, batch
        n = len(usable)
        self.mine = split.pos_of_idx[usable[n * ctx.rank // ctx.world_size:n * (ctx.rank + 1) // ctx.world_size]]
        self.labels = torch.from_numpy(labels).to(ctx.device)
        self.clean = None if clean is None else torch.from_numpy(clean).to(ctx.device)
        self.num_samples = n
        # Samples skipped while streaming (data.on_bad_sample: skip), over all ranks: known
        # once a pass has run, and checked by the trainer against the count it scored.
        self.left_out = 0

    def __iter__(self) -> Iterator[EvalBatch | Batch]:
        error, skipped = None, 0
        jobs = (Job(self.split_name, p, raw=self.gpu_decode) for p in positions_in_batches(self.mine, self.batch))
        try:
            with closing(self._items(jobs)) as items:
                for item in items:
                    if item.error:
                        raise DataError(item.error)
                    skipped += item.bad
                    keep = torch.from_numpy(item.ok) if not item.ok.all() else None
                    pixels, idx = (item.pixels, item.idx) if keep is None else (item.pixels[keep], item.idx[keep])
                    current = arrive(item, self.device)
                    x = self.placement.eval(pixels.to(self.device, non_blocking=True))
                    idx = idx.to(self.device, non_blocking=True, copy=True)  # the slot is refilled
                    done(item, current)
                    if self.clean is None:
                        yield EvalBatch(x=x, y=self.labels[idx])
                    else:
                        yield Batch(x=x, y=self.labels[idx], clean=self.clean[idx], idx=idx)
        except DataError as exc:
            error = str(exc)
        self.left_out = agree_on_error(self.ctx, error, skipped)  # once a pass



def stream_loaders(cfg, ctx: DistContext, data: ShardData, pool: DecodePool) -> Loaders:
    usable = np.flatnonzero(data.train_keep)
    common = dict(ctx=ctx, geo=data.geo, gpu_decode=cfg.data.gpu_decode, skip_bad=cfg.data.on_bad_sample == "skip")
    try:
        train = StreamTrainLoader(pool, data.train, usable, data.noisy, data.clean, global_batch=cfg.train.batch_size,
                                  seed=cfg.train.seed, static_bad=data.train_bad if ctx.is_main else 0,
                                  steps_per_epoch=cfg.train.steps_per_epoch, max_per_class=cfg.train.max_per_class,
                                  **common)
    except ValueError as exc:
        raise DataError(f"{data.manifest.root}: training split: {exc}") from None
    local = train.local_batch
    evals = {name: StreamEvalLoader(pool, name, s.index, np.flatnonzero(s.keep), s.labels, batch=local, **common)
             for name, s in data.evals.items()}
    train_eval, noisy_val = (StreamEvalLoader(pool, "train", data.train, rows, data.noisy, batch=local,
                                              clean=data.clean, **common)
                             for rows in (usable, np.flatnonzero(data.noisy_val_keep)))
    return Loaders(train, evals, train_eval, noisy_val if data.noisy_val_keep.any() else None)
