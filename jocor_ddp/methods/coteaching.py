"""Co-teaching (Han et al., NeurIPS 2018): each network picks its small-loss samples and
the *peer* is updated on them. Here each network's kept set is chosen globally, over the
all-gathered cross-entropies of the whole batch."""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from ..config import MethodConfig
from . import EpochValues, MethodStep
from .selection import Selector


def cross_entropies(logits1: torch.Tensor, logits2: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """(2, b) per-sample cross-entropies in fp32."""
    return torch.stack([F.cross_entropy(logits1.float(), labels, reduction="none"),
                        F.cross_entropy(logits2.float(), labels, reduction="none")])


def cross_update(ce: torch.Tensor, remember: torch.Tensor, sel: Selector,
                 eligible_all: Optional[torch.Tensor] = None) -> MethodStep:
    """Network 1 learns from network 2's kept set and vice versa (ce: (2, b), with grad)."""
    ce_all = sel.gather(ce.detach())
    kept1 = sel.keep_smallest(ce_all[0], remember, eligible_all)  # chosen by network 1
    kept2 = sel.keep_smallest(ce_all[1], remember, eligible_all)  # chosen by network 2
    loss = sel.mean(ce[0], kept2) + sel.mean(ce[1], kept1)
    objective = sel.objective(ce_all[0], kept2) + sel.objective(ce_all[1], kept1)
    return MethodStep(loss=loss, checked=ce_all, kept_local=torch.stack([kept1.local, kept2.local]),
                      kept_global=torch.stack([kept1.glob, kept2.glob]), objective=objective)


def step(logits1, logits2, labels, values: EpochValues, sel: Selector, cfg: MethodConfig) -> MethodStep:
    return cross_update(cross_entropies(logits1, logits2, labels), values.remember, sel)

