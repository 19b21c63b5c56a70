"""Co-teaching+ (Yu et al., ICML 2019): Co-teaching's cross update, restricted to the
samples on which the two networks' predictions disagree. Before ``method.init_epoch``
it is plain Co-teaching, as in the authors' code. The disagreement set and each network's
small-loss choice within it are taken over the whole global batch. When no sample of the
global batch is disputed, the step updates nothing (the authors' code falls back to a
plain cross-entropy only during its first 5,000 iterations)."""

from __future__ import annotations

from . import MethodStep
from .coteaching import cross_entropies, cross_update
from .selection import Selector


def step(logits1, logits2, labels, forget_rate: float, sel: Selector, disagreement: bool) -> MethodStep:
    ce = cross_entropies(logits1, logits2, labels)
    if not disagreement:
        return cross_update(ce, forget_rate, sel)
    disagree_all = sel.gather(logits1.detach().argmax(1) != logits2.detach().argmax(1))
    return cross_update(ce, forget_rate, sel, eligible_all=disagree_all)
