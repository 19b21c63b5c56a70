"""Decoding workers: persistent processes that turn a batch's row positions into stored
views (``decode.py``) in a ring of shared uint8 slots made once, pinned on CUDA.

What crosses the process boundary is small: a job (row positions, the epoch whose crops to
draw) one way, a slot number and the batch's indices the other. Pixels, crop parameters and
(for GPU decoding) the packed JPEG bytes stay in the shared slots, so a batch costs the main
process one copy out of memory it already has mapped, not a fresh segment and a file
descriptor per tensor. Job k goes to worker k mod W and results come back in job order,
so the batches' order never depends on timing. The workers live as long as the pool: one
pool per rank serves the training stream every epoch, the evaluation passes, and the
device cache's one-time decode.
"""

from __future__ import annotations

import atexit
import collections
import multiprocessing as mp
import os
import queue
import signal
import weakref
from dataclasses import dataclass, field
from typing import Iterable, Iterator, Optional

import numpy as np
import torch

from ..progress import Progress
from .decode import decode
from .place import Geometry, crop_params
from .shards import ShardReader, SplitIndex
from .sources import DataError, warn

SLOTS_PER_WORKER = 3  # one being consumed, two being filled
POLL_S = 1.0          # how often a waiting process checks that its peer is alive
DECODE_BATCH = 64     # samples per job of a one-time decode (the device cache, instance noise)


@dataclass
class Job:
    split: str
    positions: np.ndarray       # row positions in the split's index (shard order)
    epoch: Optional[int] = None  # training: draw this epoch's crop parameters; None: none
    fill: bool = False          # training: a skipped bad sample's place goes to a good one of the batch
    raw: bool = False           # leave JPEGs encoded (packed in the slot) for the GPU decoder


@dataclass
class Result:
    slot: int
    idx: np.ndarray             # sample indices, in slot order
    ok: np.ndarray              # decoded (False: a bad sample skipped, data.on_bad_sample=skip)
    bad: list = field(default_factory=list)   # messages of the samples skipped
    lengths: Optional[np.ndarray] = None      # raw: each JPEG's length in the slot's packed bytes
    error: Optional[str] = None


class Ring:
    """The shared slots: pixels (slot, b, C, H, W), crop parameters (slot, b, 3), sample
    indices (slot, b) and, for GPU decoding, packed bytes (slot, capacity)."""

    def __init__(self, slots: int, batch: int, geo: Geometry, raw_capacity: int, shared: bool):
        # Channels last in memory (HWC, as the decoder writes), seen as (slot, b, C, H, W):
        # copying an image in is then a plain copy, not a transpose.
        self.hwc = torch.zeros((slots, batch, *geo.stored, geo.channels), dtype=torch.uint8)
        self.pixels = self.hwc.permute(0, 1, 4, 2, 3)
        self.params = torch.zeros((slots, batch, 3), dtype=torch.int64)
        self.idx = torch.zeros((slots, batch), dtype=torch.int64)
        self.raw = torch.zeros((slots, raw_capacity), dtype=torch.uint8) if raw_capacity else None
        self.registered: list[torch.Tensor] = []
        if shared:  # before the workers fork: they write, the main process reads, no copy between
            for t in self._tensors():
                t.share_memory_()

    def _tensors(self) -> list[torch.Tensor]:
        return [t for t in (self.hwc, self.params, self.idx, self.raw) if t is not None]

    def pin(self) -> None:
        """Page-lock the slots in place (cudaHostRegister), so that copies to the GPU run
        asynchronously from them; unpinned copies still work, only slower."""
        cudart = torch.cuda.cudart()
        for t in self._tensors():
            if int(cudart.cudaHostRegister(t.data_ptr(), t.numel() * t.element_size(), 0)) == 0:  # cudaSuccess
                self.registered.append(t)

    def unpin(self) -> None:
        for t in self.registered:
            torch.cuda.cudart().cudaHostUnregister(t.data_ptr())
        self.registered = []


class Decoder:
    """The work of one job, the same in a worker process and in the main process (0 workers)."""

    def __init__(self, splits: dict[str, SplitIndex], geo: Geometry, seed: int, skip_bad: bool, ring: Ring):
        self.splits, self.geo, self.seed, self.skip_bad, self.ring = splits, geo, seed, skip_bad, ring
        self.readers: dict[str, ShardReader] = {}

    def run(self, slot: int, job: Job) -> Result:
        split = self.splits[job.split]
        reader = self.readers.get(job.split) or self.readers.setdefault(job.split, ShardReader(split))
        idx = split.rows["idx"][job.positions].copy()
        result = Result(slot, idx, np.ones(len(idx), dtype=bool))
        try:
            if job.raw:
                result.lengths = self._pack(reader, slot, job.positions)
            else:
                self._decode(reader, split, slot, job, result)
            if job.epoch is not None:  # one call a batch: (seed, epoch, sample index) -> crops
                self.ring.params[slot, :len(idx)] = torch.from_numpy(crop_params(self.geo, self.seed, job.epoch, idx))
            self.ring.idx[slot, :len(idx)] = torch.from_numpy(result.idx)
        except DataError as exc:
            result.error = str(exc)
        except Exception as exc:  # noqa: BLE001 -- anything else, as an error at the same step, not a dead worker
            result.error = f"{job.split} samples {idx[:3].tolist()}...: decoding failed: {exc!r}"
        return result

    def _decode(self, reader: ShardReader, split: SplitIndex, slot: int, job: Job, result: Result) -> None:
        out = self.ring.pixels[slot]
        for k, pos in enumerate(job.positions):
            data = reader.read(int(pos))  # a read error (changed shard) stops the run, skip or not
            try:
                out[k].copy_(decode(data, self.geo, split.where(int(pos))))
            except DataError as exc:
                if not self.skip_bad:
                    raise
                result.ok[k] = False
                result.bad.append(str(exc))
        if job.fill and not result.ok.all():
            fill_bad(out, result)

    def _pack(self, reader: ShardReader, slot: int, positions: np.ndarray) -> np.ndarray:
        buf, at = self.ring.raw[slot], 0
        lengths = np.zeros(len(positions), dtype=np.int64)
        for k, pos in enumerate(positions):
            data = reader.read(int(pos))
            buf[at:at + len(data)] = torch.frombuffer(bytearray(data), dtype=torch.uint8)
            lengths[k] = len(data)
            at += len(data)
        return lengths

    def close(self) -> None:
        for r in self.readers.values():
            r.close()


def fill_bad(pixels: torch.Tensor, result: Result) -> None:
    """Training keeps the batch size the collectives expect: a bad sample's place goes to the
    first good sample of the same batch (image and index)."""
    good = np.flatnonzero(result.ok)
    if good.size == 0:
        raise DataError(f"no image of the batch decodes; the first: {result.bad[0]}")
    for k in np.flatnonzero(~result.ok):
        pixels[k].copy_(pixels[good[0]])
        result.idx[k] = result.idx[good[0]]


def _worker_main(decoder: Decoder, tasks, results, parent: int) -> None:
    # SIGTERM and Ctrl-C are the main process's to handle (it checkpoints); workers go when it does.
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    torch.set_num_threads(1)
    while True:
        try:
            task = tasks.get(timeout=POLL_S)
        except queue.Empty:
            if os.getppid() != parent:  # the main process is gone (SIGKILL): so are we
                return
            continue
        if task is None:
            decoder.close()
            return
        results.put(decoder.run(*task))


class DecodePool:
    """W persistent workers (0: decode in the calling process) and their ring of slots."""

    def __init__(self, splits: dict[str, SplitIndex], geo: Geometry, *, batch: int, workers: int, seed: int,
                 skip_bad: bool, device: torch.device, raw: bool = False):
        self.workers = workers
        lanes = max(1, workers)
        capacity = batch * max(int(s.rows["nbytes"].max()) for s in splits.values()) if raw else 0
        self.ring = Ring(lanes * SLOTS_PER_WORKER, batch, geo, capacity, shared=workers > 0)
        self.decoder = Decoder(splits, geo, seed, skip_bad, self.ring)
        self.free: list[collections.deque] = [collections.deque() for _ in range(lanes)]  # set by each run
        self.pending: list[collections.deque] = [collections.deque() for _ in range(lanes)]  # (slot, event)
        self.local: collections.deque = collections.deque()  # results decoded in this process (0 workers)
        self.procs, self.tasks, self.results = [], [], []
        ctx = mp.get_context("fork")  # the split's index and the ring are inherited, not pickled
        for w in range(workers):
            self.tasks.append(ctx.Queue())
            self.results.append(ctx.Queue())
            p = ctx.Process(target=_worker_main, args=(self.decoder, self.tasks[w], self.results[w], os.getpid()),
                            name=f"jocor-decode-{w}", daemon=True)
            p.start()
            self.procs.append(p)
        if device.type == "cuda":
            self.ring.pin()
        self.broken: Optional[str] = None
        self.active: Optional[Iterator[Result]] = None
        # The workers go with the pool: on close(); when a pool nobody closed is collected; and
        # at exit, before multiprocessing's own exit handler (atexit runs last-registered first),
        # which would SIGTERM them (they ignore it) and wait for them forever.
        self._stop = weakref.finalize(self, _stop_workers, self.procs, self.tasks, self.ring)
        self._stop.atexit = False
        atexit.register(_close_at_exit, weakref.ref(self))

    # --- slots ----------------------------------------------------------------------

    def release(self, result: Result, event: Optional[torch.cuda.Event] = None) -> None:
        """The consumer is done with the result's slot once ``event`` (its copy) completes."""
        lane = result.slot // SLOTS_PER_WORKER
        if event is None:
            self.free[lane].append(result.slot)
        else:
            self.pending[lane].append((result.slot, event))

    def _take_slot(self, lane: int, wait: bool) -> Optional[int]:
        """A free slot of the lane's worker; with ``wait``, waiting for a copy out of one."""
        pending, free = self.pending[lane], self.free[lane]
        while pending and (pending[0][1].query() or (wait and not free)):
            slot, event = pending.popleft()
            event.synchronize()  # already complete unless waited for: a copy queued long ago
            free.append(slot)
        return free.popleft() if free else None

    # --- running jobs ---------------------------------------------------------------

    def run(self, jobs: Iterable[Job]) -> Iterator[Result]:
        """The jobs' results in job order. The consumer calls ``release`` on each before asking
        for the one after next (a worker refills the slot of the one before). One run at a
        time: a new one first ends the one before (a training epoch left by an exception)."""
        if self.active is not None:
            self.active.close()
        self.active = self._run(iter(jobs))
        return self.active

    def _run(self, jobs: Iterator[Job]) -> Iterator[Result]:
        if self.broken:
            raise DataError(self.broken)
        # Every slot free: between runs nothing is in flight, and a consumer that left a run
        # early may not have released what it held.
        for lane, pending in enumerate(self.pending):
            for _, event in pending:
                event.synchronize()
            pending.clear()
            self.free[lane] = collections.deque(range(lane * SLOTS_PER_WORKER, (lane + 1) * SLOTS_PER_WORKER))
        inflight: collections.deque = collections.deque()  # lanes of submitted jobs, in order
        submitted, job = 0, next(jobs, None)
        try:
            while job is not None or inflight:
                while job is not None:  # submit while the next job's worker has a free slot
                    lane = submitted % len(self.free)
                    slot = self._take_slot(lane, wait=not inflight)
                    if slot is None:
                        break
                    if self.workers:
                        self.tasks[lane].put((slot, job))
                    else:
                        self.local.append(self.decoder.run(slot, job))
                    inflight.append(lane)
                    submitted, job = submitted + 1, next(jobs, None)
                yield self._result(inflight.popleft())
        finally:  # a consumer that stopped early: collect what is in flight, so the workers are idle
            # (not once the workers were stopped: a pool collected with this run left suspended)
            while inflight and not self.broken and (self.procs or not self.workers):
                self._result(inflight.popleft())

    def _result(self, lane: int) -> Result:
        if not self.workers:
            return self.local.popleft()
        while True:
            try:
                return self.results[lane].get(timeout=POLL_S)
            except queue.Empty:
                p = self.procs[lane]
                if not p.is_alive():
                    self.broken = (f"input worker {lane} (pid {p.pid}) died with exit code {p.exitcode} "
                                   f"(out of memory? a /dev/shm too small for data.num_workers x batch?)")
                    raise DataError(self.broken) from None

    def close(self) -> None:
        if self.active is not None:  # first: it collects what the workers still have in flight
            self.active.close()
            self.active = None
        self._stop()
        self.results = []
        self.workers = 0
        self.decoder.close()


def _stop_workers(procs: list, tasks: list, ring: Ring) -> None:
    """Ask each worker to finish, kill what does not (SIGTERM is ignored), unpin the slots."""
    for q in tasks:
        q.put(None)
    for p in procs:
        p.join(timeout=5)
        if p.is_alive():
            p.kill()
    procs.clear()
    tasks.clear()
    if ring.registered:
        ring.unpin()


def _close_at_exit(ref: weakref.ref) -> None:
    pool = ref()
    if pool is not None:
        pool.close()


def positions_in_batches(positions: np.ndarray, batch: int) -> Iterator[np.ndarray]:
    for lo in range(0, len(positions), batch):
        yield positions[lo:lo + batch]



def decoded(pool: DecodePool, name: str, positions: np.ndarray, *, progress: bool,
            main: bool) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Each sample at ``positions`` of a split decoded once, a job at a time: (the decoded
    samples' indices, their stored views NHWC), the views valid until the next chunk. A bad
    image is a DataError, or with the pool's skip_bad left out (``main`` warns once)."""
    bar = Progress(len(positions), f"decode {name}", progress)
    done, bad = 0, []
    for r in pool.run(Job(name, p) for p in positions_in_batches(positions, pool.ring.hwc.shape[1])):
        if r.error:
            raise DataError(r.error)
        yield r.idx[r.ok], pool.ring.hwc[r.slot, :len(r.idx)][r.ok].numpy()
        bad += r.bad
        pool.release(r)
        done += len(r.idx)
        bar.update(done)
    bar.close()
    if bad and main:
        warn(f"left out {len(bad)} sample(s) of split {name!r} that do not decode "
             f"(data.on_bad_sample=skip); the first: {bad[0]}")
