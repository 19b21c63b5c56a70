"""Which training samples an epoch draws, and in what order: one global order per
(train.seed, epoch), which every source (memory, device cache, stream) and every world size
cut the same way (global batch t is positions t*B..(t+1)*B, rank r its r-th slice).

By default an epoch is a permutation of every usable sample, cut into whole global batches
(the last partial batch is dropped, as the reference does). Two keys change that, for the
protocols that need it:

- ``train.max_per_class``: each epoch first draws afresh at most that many samples of each
  class by the given (noisy) labels; a class with fewer gives all it has. DivideMix's and
  ELR+'s Clothing1M epochs are such a class-balanced draw from the million noisy images.
- ``train.steps_per_epoch``: the epoch stops after that many global batches (the reference's
  MNIST loop stops after 401 of 468). Each sample is still drawn at most once an epoch.

The lr and forget-rate schedules still count epochs, whatever their length.
"""

from __future__ import annotations

from typing import Optional

import numpy as np

# The balanced draw's own random stream: (seed, epoch, BALANCE). An epoch without
# train.max_per_class keeps today's permutation of (seed, epoch), bit for bit.
BALANCE = 7


def epoch_permutation(n: int, seed: int, epoch: int) -> np.ndarray:
    return np.random.default_rng([seed, epoch]).permutation(n)


class EpochDraw:
    """The epochs of one training split: ``labels`` are the given labels of the samples the
    loader trains on, by position; ``order(epoch)`` are positions into them."""

    def __init__(self, labels: np.ndarray, global_batch: int, seed: int, steps_per_epoch: Optional[int] = None,
                 max_per_class: Optional[int] = None):
        self.seed, self.cap, self.global_batch = seed, max_per_class, global_batch
        self.groups: Optional[list[np.ndarray]] = None
        self.pool = len(labels)  # the samples an epoch draws from (then permutes)
        if max_per_class:
            # The positions of each class, found once (a million labels are sorted once, not each epoch).
            by_label = np.argsort(labels, kind="stable")
            _, starts = np.unique(labels[by_label], return_index=True)
            self.groups = np.split(by_label, starts[1:])
            self.pool = sum(min(len(g), max_per_class) for g in self.groups)
        whole = self.pool // global_batch
        drawn = (f"{self.pool} samples (at most {max_per_class} of each of {len(self.groups)} classes, "
                 f"train.max_per_class)" if self.groups is not None else f"{self.pool} samples")
        if whole == 0:
            raise ValueError(f"an epoch draws {drawn}, fewer than one global batch of {global_batch}; "
                             f"lower train.batch_size")
        if steps_per_epoch and steps_per_epoch > whole:
            raise ValueError(f"train.steps_per_epoch: {steps_per_epoch} global batches of {global_batch} need "
                             f"{steps_per_epoch * global_batch} samples, and an epoch draws {drawn}, each at most "
                             f"once: at most {whole} steps")
        self.steps = steps_per_epoch or whole
        self.fixed = bool(steps_per_epoch)

    @property
    def balanced(self) -> bool:
        return self.groups is not None

    def order(self, epoch: int) -> np.ndarray:
        """The epoch's positions in training order, ``pool`` long; its steps take the first
        ``steps * global_batch``."""
        if self.groups is None:
            return epoch_permutation(self.pool, self.seed, epoch)
        rng = np.random.default_rng([self.seed, epoch, BALANCE])
        drawn = np.concatenate([g if len(g) <= self.cap else g[rng.choice(len(g), self.cap, replace=False)]
                                for g in self.groups])
        return drawn[rng.permutation(len(drawn))]
