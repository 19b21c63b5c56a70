"""Co-teaching+ (Yu et al., ICML 2019): Co-teaching's cross update, restricted to the
samples on which the two networks' predictions disagree. Before ``method.init_epoch``
it is plain Co-teaching, as in the authors' code. The disagreement set and each network's
small-loss choice within it are taken over the whole global batch. When no sample of the
global batch is disputed, the step updates nothing (the authors' code falls back to a
plain cross-entropy only during its first 5,000 iterations).

Whether the disagreement applies is a device boolean: before ``init_epoch`` every sample is
eligible, which selects exactly what plain Co-teaching selects, so one step (and one CUDA
graph) serves both phases, with no host sync for the data-dependent count.
"""

from __future__ import annotations

import torch

from ..config import MethodConfig
from . import EpochValues, MethodStep
from .coteaching import cross_entropies, cross_update
from .selection import Selector


def step(logits1, logits2, labels, values: EpochValues, sel: Selector, cfg: MethodConfig) -> MethodStep:
    ce = cross_entropies(logits1, logits2, labels)
    disagree = logits1.detach().argmax(1) != logits2.detach().argmax(1)
    disagreement = values.epoch >= cfg.init_epoch  # a device boolean: before init_epoch, Co-teaching
    eligible_all = sel.gather(disagree | ~disagreement)
    return cross_update(ce, values.remember, sel, eligible_all=eligible_all)

