"""Standard training: cross-entropy on every sample, no selection. The pair's two
networks are trained independently (two standard networks from different initialisations),
so that the reported accuracy averages two runs, like the other methods'."""

from __future__ import annotations

import torch

from ..config import MethodConfig
from . import EpochValues, MethodStep
from .coteaching import cross_entropies
from .selection import Selector


def step(logits1, logits2, labels, sel: Selector) -> MethodStep:
    ce = cross_entropies(logits1, logits2, labels)
    ce_all = sel.gather(ce.detach())
    kept = sel.keep_all(torch.ones(ce_all.shape[1], dtype=torch.bool, device=ce.device))
    loss = sel.mean(ce[0], kept) + sel.mean(ce[1], kept)
    objective = sel.objective(ce_all[0], kept) + sel.objective(ce_all[1], kept)
    return MethodStep(loss=loss, checked=ce_all, kept_local=kept.local[None],
                      kept_global=kept.glob[None], objective=objective)


def train_step(logits1: torch.Tensor, logits2: torch.Tensor, labels: torch.Tensor, values: EpochValues,
               sel: Selector, cfg: MethodConfig) -> MethodStep:
    """The registry's entry (registry.py): the trainer's call, with this method's settings."""
    return step(logits1, logits2, labels, sel)
