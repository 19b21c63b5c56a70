"""The in-memory loader: the whole split as one uint8 tensor on the training device.

Small datasets (MNIST, CIFAR) are fed the way airbench feeds CIFAR: no DataLoader in
the hot loop, the batch is an index into a device tensor. The order of an epoch is a
global permutation drawn from (train.seed, epoch) alone, and rank r of W takes the r-th
slice of every global batch, so W ranks at batch B/W see exactly the samples that one
process at batch B sees, in the same positions.
"""

from __future__ import annotations

from typing import Iterator, Optional

import numpy as np
import torch

from .types import Batch, EvalBatch


def epoch_permutation(n: int, seed: int, epoch: int) -> np.ndarray:
    return np.random.default_rng([seed, epoch]).permutation(n)


def to_float(images_u8: torch.Tensor) -> torch.Tensor:
    """uint8 NCHW -> float in [0, 1]: torchvision's ToTensor, the reference's only transform."""
    return images_u8.float().div_(255.0)


def random_crop_flip(x: torch.Tensor, shifts: torch.Tensor, flips: torch.Tensor, pad: int = 4) -> torch.Tensor:
    """Batched random crop (zero padding ``pad``) and horizontal flip, all on the device."""
    b, _, h, w = x.shape
    padded = torch.nn.functional.pad(x, (pad, pad, pad, pad))
    rows = torch.arange(h, device=x.device)[None, :] + shifts[:, 0:1]
    cols = torch.arange(w, device=x.device)[None, :] + shifts[:, 1:2]
    cols = torch.where(flips[:, None], cols.flip(1), cols)
    batch = torch.arange(b, device=x.device)[:, None, None]
    out = padded.permute(0, 2, 3, 1)[batch, rows[:, :, None], cols[:, None, :]]
    return out.permute(0, 3, 1, 2).contiguous()


class MemoryTrainLoader:
    # The order is one global permutation, sliced per rank: a run stopped mid-epoch under
    # W ranks continues exactly the same global batches under any other world size.
    world_size_invariant = True

    def __init__(self, images: np.ndarray, noisy: np.ndarray, clean: np.ndarray, *,
                 global_batch: int, rank: int, world_size: int, seed: int,
                 device: torch.device, augment: bool = False):
        n = int(noisy.shape[0])
        if n < global_batch:
            raise ValueError(f"the training split has {n} samples, fewer than one global batch "
                             f"of {global_batch}; lower train.batch_size")
        # uint8 NHWC -> NCHW once; 4x smaller on the device than float.
        self.images = torch.from_numpy(np.ascontiguousarray(images.transpose(0, 3, 1, 2))).to(device)
        self.noisy = torch.from_numpy(noisy).to(device)
        self.clean = torch.from_numpy(clean).to(device)
        self.num_samples = n
        self.global_batch = global_batch
        self.local_batch = global_batch // world_size
        self.rank = rank
        self.seed = seed
        self.device = device
        self.augment = augment
        # Training drops the last partial batch (as the reference does): every rank runs
        # the same number of steps, so no rank waits alone in a collective.
        self.steps_per_epoch = n // global_batch
        # Where this rank's samples sit in a global batch.
        self.offsets = torch.arange(rank * self.local_batch, (rank + 1) * self.local_batch, device=device)

    def epoch_plan(self, epoch: int, start_step: int = 0) -> dict[str, torch.Tensor]:
        """The epoch's order (and crops) as device tensors of fixed shapes: a captured step
        gathers from them, so a new epoch only overwrites them in place. (``start_step``
        matters to loaders that count per epoch; this one has nothing to count.)"""
        plan = {"order": torch.from_numpy(epoch_permutation(self.num_samples, self.seed, epoch)).to(self.device)}
        if self.augment:
            # Drawn per global position, so the same sample gets the same crop whatever W is.
            rng = np.random.default_rng([self.seed, epoch, 1])
            plan["shifts"] = torch.from_numpy(rng.integers(0, 9, size=(self.num_samples, 2))).to(self.device)
            plan["flips"] = torch.from_numpy(rng.random(self.num_samples) < 0.5).to(self.device)
        return plan

    def gather(self, plan: dict[str, torch.Tensor], step: torch.Tensor) -> Batch:
        """This rank's share of global batch ``step`` (a device integer): device ops only."""
        positions = step * self.global_batch + self.offsets
        idx = plan["order"][positions]
        x = to_float(self.images[idx])
        if self.augment:
            x = random_crop_flip(x, plan["shifts"][positions], plan["flips"][positions])
        return Batch(x=x, y=self.noisy[idx], clean=self.clean[idx], idx=idx)

    def epoch(self, epoch: int, start_step: int = 0) -> Iterator[Batch]:
        plan = self.epoch_plan(epoch, start_step)
        for step in range(start_step, self.steps_per_epoch):
            yield self.gather(plan, torch.tensor(step, device=self.device))


class MemoryEvalLoader:
    """Rank r scores the r-th contiguous share of a split: every sample once, none padded.

    With ``clean`` given it yields training ``Batch``es (noisy and clean labels, indices),
    the unaugmented pass that evaluate and audit use; otherwise ``EvalBatch``es."""

    def __init__(self, images: np.ndarray, labels: np.ndarray, *, rank: int, world_size: int,
                 device: torch.device, batch_size: int = 1000, clean: Optional[np.ndarray] = None):
        n = int(labels.shape[0])
        lo, hi = n * rank // world_size, n * (rank + 1) // world_size
        self.images = torch.from_numpy(np.ascontiguousarray(images[lo:hi].transpose(0, 3, 1, 2))).to(device)
        self.labels = torch.from_numpy(labels[lo:hi]).to(device)
        self.clean = torch.from_numpy(clean[lo:hi]).to(device) if clean is not None else None
        self.offset = lo
        self.num_samples = n
        self.batch_size = batch_size

    def __iter__(self) -> Iterator[EvalBatch | Batch]:
        for lo in range(0, self.labels.shape[0], self.batch_size):
            part = slice(lo, lo + self.batch_size)
            x, y = to_float(self.images[part]), self.labels[part]
            if self.clean is None:
                yield EvalBatch(x=x, y=y)
            else:
                idx = torch.arange(self.offset + lo, self.offset + lo + y.shape[0], device=y.device)
                yield Batch(x=x, y=y, clean=self.clean[part], idx=idx)


class Lazy:
    """An iterable built on first use: the training split's evaluation copy on the device is
    made only when evaluate or audit iterate it, never during training."""

    def __init__(self, factory):
        self.factory = factory
        self.built = None

    def __iter__(self):
        if self.built is None:
            self.built = self.factory()
        return iter(self.built)
