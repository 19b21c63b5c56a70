"""The in-memory loader: the whole split as one uint8 tensor on the training device.

Small datasets (MNIST, CIFAR) are fed the way airbench feeds CIFAR: no DataLoader in
the hot loop, the batch is an index into a device tensor. The shard cache (``cache.py``)
decodes shards once and feeds them through these same loaders. The order of an epoch is
drawn from (train.seed, epoch) alone (``epochs.py``), and rank r of W takes the r-th
slice of every global batch, so W ranks at batch B/W see exactly the samples that one
process at batch B sees, in the same positions.
"""

from __future__ import annotations

from typing import Iterator, Optional

import numpy as np
import torch

from .epochs import EpochDraw
from .place import Geometry, Placement, crop_params, native_geometry
from .types import BadSamples, Batch, EvalBatch


# The validation split's own seed: the same held-out samples whatever train.seed and world size.
VAL_SEED = 1955


def held_out(n: int, fraction: float) -> np.ndarray:
    """Per sample of the training split: held out as the noisy validation split (data.noisy_val_fraction)."""
    out = np.zeros(n, dtype=bool)
    out[np.random.default_rng([VAL_SEED, n]).permutation(n)[:int(round(fraction * n))]] = True
    return out


def nchw(images: np.ndarray, device: torch.device) -> torch.Tensor:
    """uint8 NHWC images on ``device``, seen as NCHW (channels-last strides)."""
    return torch.from_numpy(np.ascontiguousarray(images)).to(device).permute(0, 3, 1, 2)


class MemoryTrainLoader:
    """A split's stored views (uint8 NHWC, by row) on the device; the batch is gathered by the
    step from the epoch's order and placed (``place.py``) on the device. ``sample_idx`` maps
    rows to the split's sample indices where rows were left out (the shard cache's bad samples)."""

    resident = True
    # The order is one global permutation, sliced per rank: a run stopped mid-epoch under
    # W ranks continues exactly the same global batches under any other world size.
    world_size_invariant = True

    def __init__(self, images: np.ndarray, noisy: np.ndarray, clean: np.ndarray, *,
                 global_batch: int, rank: int, world_size: int, seed: int, device: torch.device,
                 geo: Optional[Geometry] = None, sample_idx: Optional[np.ndarray] = None,
                 index_range: Optional[int] = None, static_bad: int = 0, steps_per_epoch: Optional[int] = None,
                 max_per_class: Optional[int] = None):
        n = int(noisy.shape[0])
        # Which rows an epoch trains on, in what order (ValueError: too few for the batch or the steps).
        self.draw = EpochDraw(noisy, global_batch, seed, steps_per_epoch, max_per_class)
        self.geo = geo or native_geometry(images, False)
        self.placement = Placement(self.geo, device)
        # uint8 (4x smaller on the device than float), seen as NCHW, kept channels last: no copy
        # but the one to the device.
        self.images = nchw(images, device)
        self.noisy = torch.from_numpy(noisy).to(device)
        self.clean = torch.from_numpy(clean).to(device)
        self.sample_idx_np = np.arange(n) if sample_idx is None else sample_idx
        self.sample_idx = torch.from_numpy(self.sample_idx_np).to(device)
        self.rows = n
        # The range of Batch.idx (consumers index per-sample arrays with it), left-out samples included.
        self.index_range = n if index_range is None else index_range
        self.global_batch = global_batch
        self.local_batch = global_batch // world_size
        self.seed = seed
        self.device = device
        # Counted once per epoch, on one rank: every rank left out the same samples.
        self.bad = BadSamples(static_bad)
        # Whole global batches only (the reference drops the last partial one): every rank runs
        # the same number of steps, so no rank waits alone in a collective.
        self.steps_per_epoch = self.draw.steps
        # Where this rank's samples sit in a global batch.
        self.offsets = torch.arange(rank * self.local_batch, (rank + 1) * self.local_batch, device=device)

    def epoch_plan(self, epoch: int, start_step: int = 0) -> dict[str, torch.Tensor]:
        """The epoch's order and crops as device tensors of fixed shapes: a captured step
        gathers from them, so a new epoch only overwrites them in place."""
        self.bad.start_epoch(start_step)
        # The same length every epoch (the draw's pool): a captured step's buffers keep their shapes.
        plan = {"order": torch.from_numpy(self.draw.order(epoch)).to(self.device)}
        if self.geo.random:  # by sample index: the same crop from every source, for any world size
            plan["params"] = torch.from_numpy(crop_params(self.geo, self.seed, epoch, self.sample_idx_np)).to(self.device)
        return plan

    def gather(self, plan: dict[str, torch.Tensor], step: torch.Tensor) -> Batch:
        """This rank's share of global batch ``step`` (a device integer): device ops only."""
        rows = plan["order"][step * self.global_batch + self.offsets]
        x = self.images[rows]
        x = self.placement.train(x, plan["params"][rows]) if self.geo.random else self.placement.eval(x)
        return Batch(x=x, y=self.noisy[rows], clean=self.clean[rows], idx=self.sample_idx[rows])

    def epoch(self, epoch: int, start_step: int = 0) -> Iterator[Batch]:
        plan = self.epoch_plan(epoch, start_step)
        for step in range(start_step, self.steps_per_epoch):
            yield self.gather(plan, torch.tensor(step, device=self.device))

    def close(self) -> None:
        pass  # resident: nothing serves it


class MemoryEvalLoader:
    """Rank r scores the r-th contiguous share of a split: every sample once, none padded.

    With ``clean`` given it yields training ``Batch``es (noisy and clean labels, indices),
    the unaugmented pass that evaluate and audit use; otherwise ``EvalBatch``es."""

    def __init__(self, images: np.ndarray, labels: np.ndarray, *, rank: int, world_size: int,
                 device: torch.device, batch_size: int = 1000, clean: Optional[np.ndarray] = None,
                 geo: Optional[Geometry] = None, sample_idx: Optional[np.ndarray] = None):
        n = int(labels.shape[0])
        lo, hi = n * rank // world_size, n * (rank + 1) // world_size
        self.placement = Placement(geo or native_geometry(images, False), device)
        self.images = nchw(images[lo:hi], device)
        self.labels = torch.from_numpy(labels[lo:hi]).to(device)
        self.clean = torch.from_numpy(clean[lo:hi]).to(device) if clean is not None else None
        idx = np.arange(n) if sample_idx is None else sample_idx
        self.idx = torch.from_numpy(idx[lo:hi]).to(device)
        self.num_samples = n
        self.left_out = 0  # decoded before training: nothing is left out while scoring
        self.batch_size = batch_size

    def __iter__(self) -> Iterator[EvalBatch | Batch]:
        for lo in range(0, self.labels.shape[0], self.batch_size):
            part = slice(lo, lo + self.batch_size)
            x, y = self.placement.eval(self.images[part]), self.labels[part]
            if self.clean is None:
                yield EvalBatch(x=x, y=y)
            else:
                yield Batch(x=x, y=y, clean=self.clean[part], idx=self.idx[part])


class Lazy:
    """An evaluation loader built on first use: the training split's evaluation copy on the
    device is made only when evaluate or audit iterate it, never during training."""

    def __init__(self, factory, num_samples: int):
        self.factory = factory
        self.built = None
        self.num_samples, self.left_out = num_samples, 0

    def __iter__(self):
        if self.built is None:
            self.built = self.factory()
        return iter(self.built)
