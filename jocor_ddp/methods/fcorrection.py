"""F-correction (Patrini et al., CVPR 2017, forward loss correction): both networks of the
pair trained, each on its own, with the forward-corrected loss on every sample, no selection

    l(x, y~) = -log((softmax(f(x)) T)[y~]),   T[i, j] = P(noisy j | clean i), rows summing to 1,

the likelihood of the given (noisy) label under the network's clean-class prediction passed
through the noise. In log space, from log-probabilities only,

    l = -logsumexp_j(log_softmax(f(x))_j + log T[j, y~]),

finite for any logits wherever column y~ of T has a positive entry (log 0 = -inf terms drop
out), where the product form underflows to log 0 for confident networks. With T = I the sum
has one finite term, so the loss is Standard's cross-entropy bit for bit. T is the run's
(``method.transition``, resolved once by the trainer: ``correction.py``), read from the step's
device buffer ``EpochValues.log_transition``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..config import MethodConfig
from . import EpochValues, MethodStep
from .decoupling import both_on
from .selection import Selector


def forward_loss(logits: torch.Tensor, labels: torch.Tensor, log_transition: torch.Tensor) -> torch.Tensor:
    """(b,) per-sample forward-corrected losses in fp32, whatever precision produced the logits;
    ``log_transition``: (C, C) log T."""
    logp = F.log_softmax(logits.float(), dim=1)
    # Row i: log T[:, y~_i], the log-probability of the given label from each clean class.
    return -torch.logsumexp(logp + log_transition.t()[labels], dim=1)


def step(logits1, logits2, labels, values: EpochValues, sel: Selector, cfg: MethodConfig) -> MethodStep:
    log_t = values.log_transition
    if log_t is None:  # a host attribute, not a device read: the step stays capturable
        raise RuntimeError("fcorrection: no transition matrix in the step's values (EpochValues.set_transition)")
    losses = torch.stack([forward_loss(logits1, labels, log_t), forward_loss(logits2, labels, log_t)])
    return both_on(losses, sel)
