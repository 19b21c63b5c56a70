"""What every data source hands the trainer, whichever loader produced it."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterator, Optional, Protocol

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


class BadSamples:
    """The training split's samples left out as bad this epoch (data.on_bad_sample: skip):
    those this rank's loader met since the epoch (re)started, plus, on rank 0, the total of
    all ranks carried over from a mid-epoch checkpoint."""

    def __init__(self, static: int = 0):
        self.static = static  # left out up front (a verified shard set), counted on one rank
        self.met = self.carried = 0

    def start_epoch(self, start_step: int) -> None:
        """Called by the loader; ``carried`` is the trainer's (``load_state_dict``)."""
        # The ones left out up front count once per epoch: in a resumed epoch the checkpoint has them.
        self.met = self.static if start_step == 0 else 0

    def local(self) -> int:
        """This rank's share of the epoch's total (summed over the ranks by the caller)."""
        return self.met + self.carried

    def state_dict(self, ctx: DistContext) -> dict:
        """The epoch's total so far over all ranks (a collective, on every rank)."""
        total = all_reduce_sum(ctx, torch.tensor([float(self.local())], dtype=torch.float64, device=ctx.device))
        return {"bad_samples": int(total.item())}

    def load_state_dict(self, state: Optional[dict], ctx: DistContext) -> None:
        """At every epoch's start (``state``: None, or a mid-epoch checkpoint's part): rank 0
        carries the total on, the others start from zero."""
        self.carried = int(state["bad_samples"]) if state and ctx.is_main else 0


class TrainLoader(Protocol):
    """What the trainer and the step use of every training loader."""
    steps_per_epoch: int
    index_range: int             # Batch.idx lies in [0, index_range): samples left out included
    resident: bool               # True: a ResidentTrainLoader; False: a StreamedTrainLoader
    world_size_invariant: bool   # a mid-epoch checkpoint continues exactly under another world size
    bad: BadSamples

    def epoch(self, epoch: int, start_step: int = 0) -> Iterator[Batch]:
        """The batches themselves, for tools and tests (the step gathers its own)."""

    def close(self) -> None:
        """Stop what serves it (a stream's decoding workers); nothing for resident data."""


class ResidentTrainLoader(TrainLoader, Protocol):
    """Data on the device: the step gathers each batch from the epoch's plan."""

    def epoch_plan(self, epoch: int, start_step: int = 0) -> dict[str, torch.Tensor]: ...

    def gather(self, plan: dict[str, torch.Tensor], step: torch.Tensor) -> Batch: ...


class StreamedTrainLoader(TrainLoader, Protocol):
    """A stream: each step's item is copied into the step's fixed buffers, then gathered."""
    error: Optional[str]  # the first bad input this rank met, until a sync point raises it

    def items(self, epoch: int, start_step: int = 0) -> Iterator: ...

    def buffers(self): ...

    def load(self, item, bufs) -> None: ...

    def gather(self, bufs) -> Batch: ...


class EvalLoader(Protocol):
    """One pass over a split, every sample once (rank r its r-th share): ``EvalBatch``es, or
    ``Batch``es for the training split's passes (train_eval, the noisy held-out split)."""
    num_samples: int  # the samples a pass tries to score, over all ranks
    left_out: int     # of those, left out as bad by the latest pass (all ranks; stream, skip)

    def __iter__(self) -> Iterator[EvalBatch | Batch]: ...


@dataclass
class DataBundle:
    name: str
    classes: list[str]
    in_channels: int
    image_size: int
    train: TrainLoader
    # The evaluation splits (data.eval_splits), by name, in that order: every one is scored
    # after every epoch.
    evals: dict[str, EvalLoader]
    noise: Optional[NoiseInfo] = None
    # The given labels are the noisy ones (Clothing1M's shards): the noise rate is unknown.
    labels_noisy: bool = False
    # A deterministic pass over every training sample (this rank's share), unaugmented, with
    # noisy and clean labels and indices: what evaluate / audit score the training split with.
    train_eval: Optional[EvalLoader] = None
    # The held-out share of the training split (data.noisy_val_fraction), with its noisy
    # labels, scored as noisy_val; None when nothing is held out.
    noisy_val: Optional[EvalLoader] = None
    # How inputs were normalised after ToTensor (None: not at all), for export.
    normalization: Optional[dict] = None
    extra: dict = field(default_factory=dict)

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def test(self) -> EvalLoader:
        """The test split, the one every report judges (KeyError where data.eval_splits names none)."""
        return self.evals["test"]

    @property
    def noisy_val_samples(self) -> int:
        """Training samples held out as the noisy validation split (data.noisy_val_fraction)."""
        return self.noisy_val.num_samples if self.noisy_val is not None else 0

    @property
    def meta(self) -> dict:
        """What a checkpoint keeps to rebuild the pair and its inputs without the data."""
        return {"name": self.name, "classes": list(self.classes), "in_channels": self.in_channels,
                "image_size": self.image_size, "normalization": self.normalization}


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
