"""Training methods: each turns the two networks' logits and the labels into the loss this
rank backpropagates, using the global (or local) selection of ``selection.py``.

Every method returns a ``MethodStep``; the trainer needs nothing else to train, check for
non-finite values, and count what was kept. What changes from epoch to epoch (the share
to remember, the epoch itself) and what the run resolves once (F-correction's transition
matrix) reach a method as device tensors in ``EpochValues``, never as Python numbers, which a
captured CUDA graph would freeze at their first value. Which
methods exist, and what the rest of the trainer knows of each, is ``registry.py``.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Callable, Optional

import numpy as np
import torch

from .. import registry
from ..config import MethodConfig
from .selection import Selector


@dataclass
class MethodStep:
    loss: torch.Tensor        # this rank's scalar to backpropagate
    checked: torch.Tensor     # (m, W*b) per-sample losses of the whole batch, the same on every rank
    kept_local: torch.Tensor  # bool (s, b): this rank's samples in each of the s kept sets
    kept_global: torch.Tensor  # bool (s, W*b): the kept sets over the whole batch
    objective: torch.Tensor   # the batch objective, the same on every rank (train_loss)


@dataclass
class EpochValues:
    """The epoch's values as device scalars, updated in place (``set``) between epochs, and
    the run's transition matrix (``set_transition``) for the methods that correct with one."""
    remember: torch.Tensor  # float64: 1 - forget rate, the share of each batch kept
    epoch: torch.Tensor     # int64: the 0-based epoch
    # float32 (C, C): log T, T[i, j] = P(noisy j | clean i) (log 0 = -inf); None until set
    log_transition: Optional[torch.Tensor] = None

    @classmethod
    def on(cls, device: torch.device | str = "cpu") -> "EpochValues":
        return cls(torch.ones((), dtype=torch.float64, device=device),
                   torch.zeros((), dtype=torch.int64, device=device))

    @classmethod
    def at(cls, forget_rate: float, epoch: int = 0, device: torch.device | str = "cpu") -> "EpochValues":
        values = cls.on(device)
        values.set(forget_rate, epoch)
        return values

    def set(self, forget_rate: float, epoch: int) -> None:
        # 1 - r computed on the host in float64, as the reference's int((1 - r) * n) does.
        self.remember.fill_(1.0 - float(forget_rate))
        self.epoch.fill_(epoch)

    def set_transition(self, matrix: np.ndarray) -> None:
        """T (float64, row-stochastic) as log T in the loss's float32: the log taken in float64,
        rounded once. The buffer is made once; a new T (an estimate made during the run) is
        copied into it, so a captured step reads the new value."""
        log_t = torch.from_numpy(np.asarray(matrix, dtype=np.float64)).log().float()
        if self.log_transition is None:
            self.log_transition = log_t.to(self.remember.device)
        elif self.log_transition.shape != log_t.shape:
            raise ValueError(f"a {tuple(log_t.shape)} transition matrix for a {tuple(self.log_transition.shape)} buffer")
        else:
            self.log_transition.copy_(log_t)


MethodFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, EpochValues, Selector], MethodStep]


def get_method(name: str, cfg: Optional[MethodConfig] = None) -> MethodFn:
    """The step of registry entry ``name``, bound to its ``method.*`` settings."""
    return functools.partial(registry.get_method(name).load_step(), cfg=cfg or MethodConfig(name=name))
