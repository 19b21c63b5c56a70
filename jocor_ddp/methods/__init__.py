"""Training methods: each turns the two networks' logits and the labels into the loss this
rank backpropagates, using the global (or local) selection of ``selection.py``.

Every method returns a ``MethodStep``; the trainer needs nothing else to train, check for
non-finite values, and count what was kept. What changes from epoch to epoch (the share
to remember, the epoch itself) reaches a method as device tensors in a ``Schedule``, never
as Python numbers, which a captured CUDA graph would freeze at their first value.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from .selection import Selector


@dataclass
class MethodStep:
    loss: torch.Tensor        # this rank's scalar to backpropagate
    checked: torch.Tensor     # (m, W*b) per-sample losses of the whole batch, the same on every rank
    kept_local: torch.Tensor  # bool (s, b): this rank's samples in each of the s kept sets
    kept_global: torch.Tensor  # bool (s, W*b): the kept sets over the whole batch
    objective: torch.Tensor   # the batch objective, the same on every rank (train_loss)


@dataclass
class Schedule:
    """The epoch's values as device scalars, updated in place (``set``) between epochs."""
    remember: torch.Tensor  # float64: 1 - forget rate, the share of each batch kept
    epoch: torch.Tensor     # int64: the 0-based epoch

    @classmethod
    def on(cls, device: torch.device | str = "cpu") -> "Schedule":
        return cls(torch.ones((), dtype=torch.float64, device=device),
                   torch.zeros((), dtype=torch.int64, device=device))

    @classmethod
    def at(cls, forget_rate: float, epoch: int = 0, device: torch.device | str = "cpu") -> "Schedule":
        schedule = cls.on(device)
        schedule.set(forget_rate, epoch)
        return schedule

    def set(self, forget_rate: float, epoch: int) -> None:
        # 1 - r computed on the host in float64, as the reference's int((1 - r) * n) does.
        self.remember.fill_(1.0 - float(forget_rate))
        self.epoch.fill_(epoch)


MethodFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, Schedule, Selector], MethodStep]


def get_method(name: str, co_lambda: float = 0.1, init_epoch: int = 0) -> MethodFn:
    from . import coteaching, coteaching_plus, decoupling, jocor, standard
    if name == "jocor":
        return lambda z1, z2, y, sched, sel: jocor.step(z1, z2, y, sched.remember, sel, co_lambda)
    if name == "coteaching":
        return lambda z1, z2, y, sched, sel: coteaching.step(z1, z2, y, sched.remember, sel)
    if name == "coteaching_plus":
        return lambda z1, z2, y, sched, sel: coteaching_plus.step(z1, z2, y, sched.remember, sel,
                                                                  sched.epoch >= init_epoch)
    if name == "decoupling":
        return lambda z1, z2, y, sched, sel: decoupling.step(z1, z2, y, sel)
    if name == "standard":
        return lambda z1, z2, y, sched, sel: standard.step(z1, z2, y, sel)
    raise ValueError(f"method.name: {name!r}")
