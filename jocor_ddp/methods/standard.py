"""Standard training: cross-entropy on every sample, no selection. The pair's two
networks are trained independently (two standard networks from different initialisations),
so that the reported accuracy averages two runs, like the other methods'."""

from __future__ import annotations

from ..config import MethodConfig
from . import EpochValues, MethodStep
from .coteaching import cross_entropies
from .decoupling import both_on
from .selection import Selector


def step(logits1, logits2, labels, values: EpochValues, sel: Selector, cfg: MethodConfig) -> MethodStep:
    return both_on(cross_entropies(logits1, logits2, labels), sel)

