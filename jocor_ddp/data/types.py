"""What every data source hands the trainer, whichever loader produced it."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterable, Iterator, Optional, Protocol

import torch
import torch.distributed as dist

from ..dist import DistContext, all_gather_objects, all_reduce_sum
from ..noise import NoiseInfo
from .sources import DataError


@dataclass
class Batch:
    """One rank's share of a global training batch, on the training device."""
    x: torch.Tensor      # float (b, C, H, W)
    y: torch.Tensor      # the (noisy) training labels
    clean: torch.Tensor  # the clean labels, -1 where unknown
    idx: torch.Tensor    # the samples' indices in the training split


@dataclass
class EvalBatch:
    x: torch.Tensor
    y: torch.Tensor


class TrainLoader(Protocol):
    steps_per_epoch: int
    num_samples: int

    def epoch(self, epoch: int, start_step: int = 0) -> Iterator[Batch]: ...


@dataclass
class DataBundle:
    name: str
    classes: list[str]
    in_channels: int
    image_size: int
    train: TrainLoader
    test: Iterable[EvalBatch]
    test_samples: int
    noise: Optional[NoiseInfo] = None
    # The given labels are the noisy ones (Clothing1M's shards): the noise rate is unknown.
    labels_noisy: bool = False
    # A deterministic pass over every training sample (this rank's share), unaugmented, with
    # noisy and clean labels and indices: what evaluate / audit score the training split with.
    train_eval: Optional[Iterable[Batch]] = None
    # The held-out share of the training split (data.val_fraction), with its noisy labels, as
    # Batches; None when nothing is held out.
    val: Optional[Iterable[Batch]] = None
    # How inputs were normalised after ToTensor (None: not at all), for export.
    normalization: Optional[dict] = None
    extra: dict = field(default_factory=dict)

    @property
    def num_classes(self) -> int:
        return len(self.classes)


def agree_on_error(ctx: DistContext, error: Optional[str], count: int = 0) -> int:
    """On every rank together: any rank's error is raised on all (its own message, or which
    rank stopped and why); else the sum of ``count`` over the ranks."""
    if not dist.is_initialized():  # one process (or ranks simulated in one, in tests)
        if error:
            raise DataError(error)
        return count
    t = all_reduce_sum(ctx, torch.tensor([1.0 if error else 0.0, float(count)], dtype=torch.float64,
                                         device=ctx.device)).tolist()
    if t[0] > 0:
        errors = all_gather_objects(ctx, error)
        first = next(r for r, e in enumerate(errors) if e)
        raise DataError(error or f"rank {first} stopped on bad input: {errors[first]}")
    return int(t[1])
