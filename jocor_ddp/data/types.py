"""What every data source hands the trainer, whichever loader produced it."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterable, Iterator, Optional, Protocol

import torch

from ..noise import NoiseInfo


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
    # A deterministic pass over every training sample (this rank's share), unaugmented, with
    # noisy and clean labels and indices: what evaluate / audit score the training split with.
    train_eval: Optional[Iterable[Batch]] = None
    # How inputs were normalised after ToTensor (None: not at all), for export.
    normalization: Optional[dict] = None
    extra: dict = field(default_factory=dict)

    @property
    def num_classes(self) -> int:
        return len(self.classes)
