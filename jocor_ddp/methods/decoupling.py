"""Decoupling (Malach & Shalev-Shwartz, NeurIPS 2017): "when to update" is decoupled from
"how to update": both networks are updated, with plain cross-entropy, only on the samples
where their predictions disagree (here: over the whole global batch)."""

from __future__ import annotations

from typing import Optional

import torch

from ..config import MethodConfig
from . import EpochValues, MethodStep
from .coteaching import cross_entropies
from .selection import Selector


def step(logits1, logits2, labels, values: EpochValues, sel: Selector, cfg: MethodConfig) -> MethodStep:
    disagree = logits1.detach().argmax(1) != logits2.detach().argmax(1)
    return both_on(cross_entropies(logits1, logits2, labels), sel, sel.gather(disagree))


def both_on(ce: torch.Tensor, sel: Selector, keep_all: Optional[torch.Tensor] = None) -> MethodStep:
    """Both networks updated with their own cross-entropy (ce: (2, b)) on the samples of the
    whole batch that ``keep_all`` marks (None: every sample)."""
    ce_all = sel.gather(ce.detach())
    if keep_all is None:
        keep_all = torch.ones(ce_all.shape[1], dtype=torch.bool, device=ce.device)
    kept = sel.keep_all(keep_all)
    loss = sel.mean(ce[0], kept) + sel.mean(ce[1], kept)
    objective = sel.objective(ce_all[0], kept) + sel.objective(ce_all[1], kept)
    return MethodStep(loss=loss, checked=ce_all, kept_local=kept.local[None],
                      kept_global=kept.glob[None], objective=objective)

