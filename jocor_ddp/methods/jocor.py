"""JoCoR's per-sample joint loss (Wei et al., CVPR 2020, Eq. 3-5).

    l(x) = (1 - lambda) * (CE(p1, y) + CE(p2, y)) + lambda * (KL(p1 || p2) + KL(p2 || p1))

The reference computes KL with ``F.kl_div(log_softmax(a), softmax(b))``: when a confident
network's softmax underflows to exactly 0, the gradient of p*log(p) there is infinite
and training turns to NaN. Here both sides come from log_softmax, so every term and its
gradient stay finite. Gradients flow through both sides of each KL term, as in the
reference (neither distribution is detached).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..config import MethodConfig
from . import EpochValues, MethodStep
from .selection import Selector


def symmetric_kl(logp1: torch.Tensor, logp2: torch.Tensor) -> torch.Tensor:
    """KL(p1 || p2) + KL(p2 || p1) per sample, from log-probabilities.

    The sum equals sum_c (p1 - p2) * (log p1 - log p2): no log of a probability is ever taken."""
    return ((logp1.exp() - logp2.exp()) * (logp1 - logp2)).sum(dim=1)


def jocor_loss(logits1: torch.Tensor, logits2: torch.Tensor, labels: torch.Tensor,
               co_lambda: float) -> torch.Tensor:
    """Per-sample joint loss in fp32, whatever precision produced the logits."""
    logp1 = F.log_softmax(logits1.float(), dim=1)
    logp2 = F.log_softmax(logits2.float(), dim=1)
    ce = F.nll_loss(logp1, labels, reduction="none") + F.nll_loss(logp2, labels, reduction="none")
    return (1.0 - co_lambda) * ce + co_lambda * symmetric_kl(logp1, logp2)


def step(logits1: torch.Tensor, logits2: torch.Tensor, labels: torch.Tensor, values: EpochValues,
         sel: Selector, cfg: MethodConfig) -> MethodStep:
    """Keep the small-joint-loss samples (the ``values.remember`` = 1 - r share); one mean
    over them updates both networks."""
    losses = jocor_loss(logits1, logits2, labels, cfg.co_lambda)
    losses_all = sel.gather(losses.detach())
    kept = sel.keep_smallest(losses_all, values.remember)
    return MethodStep(loss=sel.mean(losses, kept), checked=losses_all[None],
                      kept_local=kept.local[None], kept_global=kept.glob[None],
                      objective=sel.objective(losses_all, kept))

