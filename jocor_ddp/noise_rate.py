"""Estimate the share of wrong training labels from the two networks' predictions
(``method.forget_rate: auto``): the anchor-point estimate of the noise transition diagonal.

For every training sample, scored unaugmented in eval mode, the pair's prediction is the
argmax of the two networks' mean softmax, and its confidence the smaller of the two
networks' log-odds for that class (log p / (1 - p), from logits in float64: a float32
softmax saturates at 1.0 on an MLP's confident samples, and the top of the ranking
becomes a tie broken by index). Then, for each predicted class c:

    the anchors of c = the ANCHOR_SHARE most confident samples predicted as c
    noise_c = the share of c's anchors whose given label is not c
    rate = sum_c (samples predicted as c / all samples) * noise_c

Why anchors: the networks' disagreement with the labels is the noise plus their own
error on clean samples (about 0.14 on Fashion-MNIST's training split), so it is biased by
that error; on the samples the networks are most sure of, their prediction is almost
always the true class, and the labels there show the noise alone (class-conditional noise
is the same for every sample of a class). The estimate is the share of wrong labels, the
quantity the forget rate should be, for symmetric, pairflip and asymmetric noise alike.
What was tried and what each gave is in docs/methods.md.

The estimate is a pure function of the gathered per-sample values, sorted by sample
index, computed in float64 with stable sorts: every rank and any world size reach the
same number from the same predictions.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch

# The share of each predicted class taken as its anchors. Measured on Fashion-MNIST (MLP
# pair, 10 epochs): 0.05-0.25 agree within 0.01 on symmetric noise; larger shares let the
# networks' clean error in (0.5: +0.03 with no noise), smaller ones are noisier.
ANCHOR_SHARE = 0.25
# Fewer samples per class than this and the per-class shares are too coarse to use.
MIN_SAMPLES_PER_CLASS = 20
# The networks predict one class for at least this share of the samples: no class
# structure to read the labels against (a collapsed or untrained pair).
ONE_CLASS_SHARE = 0.9


@dataclass
class NoiseEstimate:
    rate: Optional[float]       # the estimated share of wrong labels; None: undecided
    reason: Optional[str]       # why undecided (one line), else None
    samples: int
    anchors: int
    per_class: list             # noise_c per predicted class (None: never predicted)
    predicted_share: list       # share of samples predicted as each class
    disagreement: float         # share both networks predict against the given label (naive)

    def evidence(self) -> dict:
        """What a user needs to judge the estimate, for metrics.jsonl."""
        return {"samples": self.samples, "anchors": self.anchors, "anchor_share": ANCHOR_SHARE,
                "per_class": [None if v is None else round(v, 4) for v in self.per_class],
                "predicted_share": [round(v, 4) for v in self.predicted_share],
                "disagreement": round(self.disagreement, 4), "undecided": self.reason}


def log_odds(logits: torch.Tensor, cls: torch.Tensor) -> torch.Tensor:
    """log p_c / (1 - p_c) per row for class ``cls``, in float64, without a softmax."""
    z = logits.double()
    zc = z.gather(1, cls[:, None])[:, 0]
    rest = z.scatter(1, cls[:, None], -torch.inf).logsumexp(1)
    return zc - rest


def sample_evidence(logits1: torch.Tensor, logits2: torch.Tensor, labels: torch.Tensor, probs: bool = False) -> dict:
    """Per sample of a batch: the pair's prediction, its confidence, and whether both
    networks predict against the given label; on the CPU, as numpy arrays. With ``probs``
    also the pair's mean softmax in float64 (``probs``, samples x classes: what the
    transition-matrix estimates of ``transition.py`` read), only when asked: it is C values a
    sample to copy and gather, where the rest is four."""
    logp = torch.logaddexp(torch.log_softmax(logits1.double(), 1), torch.log_softmax(logits2.double(), 1))
    pred = logp.argmax(1)
    score = torch.minimum(log_odds(logits1, pred), log_odds(logits2, pred))
    a1, a2 = logits1.argmax(1), logits2.argmax(1)
    against = (a1 == a2) & (a1 != labels)
    ev = {"pred": pred.cpu().numpy(), "score": score.cpu().numpy(),
          "label": labels.cpu().numpy(), "against": against.cpu().numpy()}
    if probs:  # logp is log(p1 + p2): the mean is half its exponential
        ev["probs"] = (logp - math.log(2.0)).exp().cpu().numpy()
    return ev


def class_anchors(pred: np.ndarray, score: np.ndarray, num_classes: int,
                  anchor_share: float = ANCHOR_SHARE) -> list[Optional[np.ndarray]]:
    """Per predicted class c, the positions of its anchors: the ``anchor_share`` most
    confident samples predicted as c (at least one), most confident first, ties by sample
    position (the caller sorts by sample index); None where no sample is predicted as c."""
    anchors: list[Optional[np.ndarray]] = [None] * num_classes
    for k in range(num_classes):
        members = np.flatnonzero(pred == k)
        if len(members):
            anchors[k] = members[np.argsort(-score[members], kind="stable")[:max(1, int(anchor_share * len(members)))]]
    return anchors


def estimate_noise_rate(pred: np.ndarray, score: np.ndarray, label: np.ndarray, against: np.ndarray,
                        num_classes: int, anchor_share: float = ANCHOR_SHARE) -> NoiseEstimate:
    """The anchor estimate of the module docstring; undecided (rate None, with the reason)
    when there are too few samples, when the networks predict one class or never predict a
    class the labels hold, or when the labels agree with the networks' confident predictions
    no more often than chance."""
    n, c = int(pred.shape[0]), num_classes
    share = np.bincount(pred, minlength=c)[:c] / max(n, 1)
    per_class: list = [None] * c
    anchors, rate = 0, 0.0
    for k, top in enumerate(class_anchors(pred, score, c, anchor_share)):
        if top is None:
            continue
        per_class[k] = float(np.mean(label[top] != k))
        anchors += len(top)
        rate += share[k] * per_class[k]
    disagreement = float(np.mean(against)) if n else 0.0
    reason = None
    if n < MIN_SAMPLES_PER_CLASS * c:
        reason = (f"too few samples: {n} for {c} classes (at least {MIN_SAMPLES_PER_CLASS} per class "
                  f"are needed)")
    elif share.max() >= ONE_CLASS_SHARE:
        reason = (f"a single mode: the networks predict class {int(share.argmax())} for "
                  f"{100 * share.max():.1f}% of the samples, so there is no class structure to read "
                  f"the labels against")
    elif len(missing := [k for k in range(c) if share[k] == 0 and np.sum(label == k) >= MIN_SAMPLES_PER_CLASS]):
        reason = (f"the networks predict no sample as class(es) {', '.join(map(str, missing[:5]))}"
                  f"{' ...' if len(missing) > 5 else ''}, which the labels hold: no anchors for them yet")
    elif rate >= 1.0 - 1.0 / c - 3.0 * np.sqrt((1.0 / c) * (1.0 - 1.0 / c) / max(anchors, 1)):
        # Chance is 1 - 1/C, less three standard errors of a share over this many anchors.
        reason = (f"the labels agree with the networks' most confident predictions no more often than "
                  f"chance (estimate {rate:.3f}, chance {1.0 - 1.0 / c:.3f} within sampling error over "
                  f"{anchors} anchors): noise this high cannot be told from no signal")
    return NoiseEstimate(rate=None if reason else float(rate), reason=reason, samples=n, anchors=anchors,
                         per_class=per_class, predicted_share=[float(v) for v in share],
                         disagreement=disagreement)
