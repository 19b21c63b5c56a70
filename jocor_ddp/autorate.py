"""``method.forget_rate: auto`` (as decided by ``schedule.decide_forget_rate``): the forget
rate follows an estimate of the noise rate made while the pair trains.

At the end of each of the first max(method.num_gradual, 1) epochs (the ramp, while the
forget rate is still rising), the trainer scores every training sample once, unaugmented,
and this module turns the gathered predictions into an estimate (``noise_rate.py``). The
next epoch's forget rate is the ramp towards the newest estimate; the estimate made at
the end of the ramp is final. Later epochs would see networks that fit more of the noisy
labels, and a moving tau would move the selection under the run's feet.

Where the estimator cannot decide, one line says why and the rate stays where it was: the
previous estimate, or method.forget_rate_fallback before the first.

Every rank gathers the same per-sample values (sorted by sample index), so every rank and
any world size compute the same estimate; it travels in checkpoints, so a resumed run
continues with the rate an uninterrupted one has.
"""

from __future__ import annotations

from typing import Callable, Iterable, Optional

import numpy as np

from .config import ConfigError, MethodConfig
from .dist import DistContext, all_gather_objects
from .noise_rate import MIN_SAMPLES_PER_CLASS, NoiseEstimate, estimate_noise_rate, sample_evidence
from .schedule import forget_rate_schedule


class AutoForgetRate:
    """The latest estimate, whether it is final, and the forget rates it gives."""

    def __init__(self, method: MethodConfig, epochs: int, num_classes: int, num_scored: int):
        if num_scored < MIN_SAMPLES_PER_CLASS * num_classes:
            raise ConfigError(f"method.forget_rate: auto needs at least {MIN_SAMPLES_PER_CLASS} training samples "
                              f"per class to estimate the noise rate ({MIN_SAMPLES_PER_CLASS * num_classes} for "
                              f"{num_classes} classes); this run trains on {num_scored}: set method.forget_rate "
                              f"to a number")
        self.method, self.epochs = method, epochs
        self.num_classes = num_classes
        self.fallback = method.forget_rate_fallback
        self.estimate: Optional[float] = None   # the latest decided estimate
        self.last_epoch = max(method.num_gradual, 1) - 1  # 0-based epoch of the final estimate
        self.final = False
        # Set by estimate_noise: also gather the pair's mean softmax, and keep the latest pass's
        # gathered evidence here (the transition-matrix estimates read it).
        self.probs = False
        self.evidence: Optional[dict] = None

    @property
    def tau(self) -> float:
        return self.estimate if self.estimate is not None else self.fallback

    def forget_rates(self) -> np.ndarray:
        """Per epoch: the ramp towards the newest estimate (or the fallback)."""
        return forget_rate_schedule(self.tau, self.epochs, self.method.num_gradual, self.method.exponent)

    def wants(self, epoch: int) -> bool:
        """Whether the end of (0-based) epoch ``epoch`` is estimated."""
        return not self.final and epoch <= self.last_epoch

    def observe(self, ctx: DistContext, epoch: int, scored: Iterable[tuple]) -> dict:
        """Estimate from this rank's scored batches (``score_evidence``), gathered from every
        rank; returns the metrics row's fields. A collective."""
        ev = gather_evidence(ctx, scored, self.num_classes, probs=self.probs)
        if self.probs:
            self.evidence = ev
        est = estimate_noise_rate(ev["pred"].astype(np.int64), ev["score"], ev["label"], ev["against"],
                                  self.num_classes)
        self.final = epoch >= self.last_epoch
        if est.rate is not None:
            self.estimate = est.rate
        return self.row(est)

    def row(self, est: NoiseEstimate) -> dict:
        evidence = est.evidence()
        evidence.update(final=self.final, fallback=self.fallback if self.estimate is None else None)
        return {"forget_rate_estimate": self.tau, "noise_estimate": evidence}

    def describe(self, row: dict) -> str:
        """The epoch line's words for an estimate row."""
        ev = row["noise_estimate"]
        if ev["undecided"]:
            kept = "fallback" if ev["fallback"] is not None else "previous estimate"
            return f"auto: undecided, tau {row['forget_rate_estimate']:.3f} ({kept})"
        final = ", final" if ev["final"] else ""
        return f"auto: noise estimate {row['forget_rate_estimate']:.3f} from {ev['anchors']} anchors{final}"

    def undecided_line(self, row: dict) -> Optional[str]:
        ev = row["noise_estimate"]
        if not ev["undecided"]:
            return None
        use = (f"the fallback method.forget_rate_fallback={self.fallback:g}" if ev["fallback"] is not None
               else f"the previous estimate {self.tau:.3f}")
        return f"warning: forget_rate auto: cannot estimate the noise rate: {ev['undecided']}; using {use}"

    def state_dict(self) -> dict:
        return {"estimate": self.estimate, "final": self.final}

    def load_state_dict(self, state: dict) -> None:
        """``TrainingState.forget_rate``; one of a run that fixed tau holds no estimate: none yet."""
        self.estimate, self.final = state.get("estimate"), state.get("final", False)


EVIDENCE = ("idx", "pred", "score", "label", "against")  # and "probs" when asked


def score_evidence(batches: Iterable, score: Callable) -> Iterable[tuple]:
    """Per batch of the training split's unaugmented pass: ``score(x)`` gives the two
    networks' logits; yields (sample indices, logits1, logits2, labels), which
    ``gather_evidence`` reduces to the evidence it is asked for before the next batch."""
    for batch in batches:
        logits1, logits2 = score(batch.x)
        yield batch.idx, logits1, logits2, batch.y


def gather_evidence(ctx: DistContext, scored: Iterable[tuple], num_classes: int, probs: bool = False) -> dict:
    """Every rank's per-sample evidence (``noise_rate.sample_evidence``, with the pair's mean
    softmax where ``probs``) and indices, sorted by sample index. A collective."""
    keys = EVIDENCE + (("probs",) if probs else ())
    parts = [dict(sample_evidence(logits1, logits2, labels, probs=probs), idx=idx.cpu().numpy())
             for idx, logits1, logits2, labels in scored]
    mine = {key: np.concatenate([p[key] for p in parts]) if parts
            else np.zeros((0, num_classes) if key == "probs" else 0) for key in keys}
    return merge_evidence(all_gather_objects(ctx, mine))


def merge_evidence(gathered: list[dict]) -> dict:
    """The ranks' evidence (in rank order) as one set, sorted by sample index: any world size,
    any split of the samples among ranks, gives the same arrays."""
    merged = {key: np.concatenate([g[key] for g in gathered]) for key in gathered[0]}
    order = np.argsort(merged["idx"], kind="stable")
    return {key: value[order] for key, value in merged.items()}
