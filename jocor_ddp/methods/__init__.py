"""Training methods: each turns the two networks' logits and the labels into the loss this
rank backpropagates, using the global (or local) selection of ``selection.py``.

Every method returns a ``MethodStep``; the trainer needs nothing else to train, check for
non-finite values, and count what was kept.
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


MethodFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, float, int, Selector], MethodStep]


def get_method(name: str, co_lambda: float = 0.1, init_epoch: int = 0) -> MethodFn:
    from . import coteaching, coteaching_plus, decoupling, jocor, standard
    if name == "jocor":
        return lambda z1, z2, y, r, epoch, sel: jocor.step(z1, z2, y, r, sel, co_lambda)
    if name == "coteaching":
        return lambda z1, z2, y, r, epoch, sel: coteaching.step(z1, z2, y, r, sel)
    if name == "coteaching_plus":
        return lambda z1, z2, y, r, epoch, sel: coteaching_plus.step(z1, z2, y, r, sel, epoch >= init_epoch)
    if name == "decoupling":
        return lambda z1, z2, y, r, epoch, sel: decoupling.step(z1, z2, y, sel)
    if name == "standard":
        return lambda z1, z2, y, r, epoch, sel: standard.step(z1, z2, y, sel)
    raise ValueError(f"method.name: {name!r}")
