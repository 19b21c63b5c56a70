"""Decoupling (Malach & Shalev-Shwartz, NeurIPS 2017): "when to update" is decoupled from
"how to update": both networks are updated, with plain cross-entropy, only on the samples
where their predictions disagree (here: over the whole global batch)."""

from __future__ import annotations

import torch

from ..config import MethodConfig
from . import EpochValues, MethodStep
from .coteaching import cross_entropies
from .selection import Selector


def step(logits1, logits2, labels, sel: Selector) -> MethodStep:
    ce = cross_entropies(logits1, logits2, labels)
    ce_all = sel.gather(ce.detach())
    kept = sel.keep_all(sel.gather(logits1.detach().argmax(1) != logits2.detach().argmax(1)))
    loss = sel.mean(ce[0], kept) + sel.mean(ce[1], kept)
    objective = sel.objective(ce_all[0], kept) + sel.objective(ce_all[1], kept)
    return MethodStep(loss=loss, checked=ce_all, kept_local=kept.local[None],
                      kept_global=kept.glob[None], objective=objective)


def train_step(logits1: torch.Tensor, logits2: torch.Tensor, labels: torch.Tensor, values: EpochValues,
               sel: Selector, cfg: MethodConfig) -> MethodStep:
    """The registry's entry (registry.py): the trainer's call, with this method's settings."""
    return step(logits1, logits2, labels, sel)
