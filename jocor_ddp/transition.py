"""Estimate the noise transition matrix T (C x C, row-stochastic, T[i, j] = P(given label j |
clean class i)) from the scoring pass of ``method.forget_rate: auto``, two ways:

- **the anchor set** (this project's): for each predicted class i, the distribution of the
  given labels among its anchors, the ANCHOR_SHARE most confident samples predicted as i
  (``noise_rate.class_anchors``, float64 log-odds: the anchors of the noise-rate estimate, so
  1 - T[i, i] is that estimate's noise of class i). It reads the labels, not the probabilities:
  it needs the pair to be right on its most confident samples, not calibrated (where the pair
  is confidently wrong, as on Fashion-MNIST's shirts among T-shirts, a row mixes in the rows of
  the classes it mistakes: docs/methods.md).
- **Patrini's** (F-correction, Patrini et al., CVPR 2017; giorgiop/loss-correction,
  ``NoiseEstimator``): for each class i, the anchor is the sample with the highest p(i | x)
  once the samples at or above the 97th percentile of p(i | x) are left out (the outlier
  filter; ``percentile=None`` turns it off, as the original does for CIFAR-100); row i is
  that sample's p(. | x). It reads the probabilities: it assumes a network fitted to the
  noisy labels, whose p(. | x) on a perfectly clean-looking sample of class i is T[i, .].

p(. | x) is the pair's mean softmax in float64 (``noise_rate.sample_evidence(..., probs=True)``).
Both are pure float64 functions of the gathered per-sample values sorted by sample index
(``autorate.gather_evidence``), with stable sorts and first-of-ties argmaxes: every rank gets
the same matrices. Under another world size each rank scores other batches, whose float32
logits round differently: the anchor set, which counts labels and reads the scores only
through their order, stays the same unless two scores at the edge of a class's anchors are
within rounding of each other (the tests compare 1 process and 2 ranks); Patrini's rows,
which are probabilities, move in the 8th decimal.

**Undecided rows.** A row an estimator cannot read (the reasons below, each a warning line)
is the identity row: that class's labels are taken as clean, so a forward correction leaves
its loss as it is, the choice that assumes nothing. The other estimator's row is not borrowed:
each matrix stays one rule's, and the two stay comparable. The anchor set: a class predicted
for fewer than MIN_SAMPLES_PER_CLASS samples (never predicted included): under 5 anchors.
Patrini's: fewer than MIN_SAMPLES_PER_CLASS samples a class overall; no sample left below the
filter (p(i | x) constant); or an anchor the pair predicts as another class (the class is
predicted for fewer samples than the filter leaves out, or never: its row would describe
another class). The original uses such rows as they are.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import numpy as np

from .noise_rate import ANCHOR_SHARE, MIN_SAMPLES_PER_CLASS, class_anchors

# Patrini et al.'s outlier filter: the top 3% of p(i | x) are left out before the anchor of i
# is chosen (an overconfident network's highest p(i | x) are the least representative).
PATRINI_PERCENTILE = 97.0
# The estimators by the names the command, its JSON and the docs use.
ANCHOR_SET, PATRINI = "anchor_set", "patrini"
TITLES = {ANCHOR_SET: "anchor set", PATRINI: "Patrini"}


@dataclass
class TransitionEstimate:
    matrix: np.ndarray                                    # C x C float64, every row sums to 1
    undecided: dict[int, str] = field(default_factory=dict)  # row -> why it is the identity row

    def warnings(self, name: str) -> list[str]:
        """One line per undecided row."""
        return [undecided_line(name, i, why) for i, why in sorted(self.undecided.items())]

    def to_dict(self) -> dict:
        return {"matrix": self.matrix.tolist(), "undecided": {str(i): why for i, why in sorted(self.undecided.items())}}


def undecided_line(name: str, row, why: str, fallback: str = "using the identity row") -> str:
    return f"warning: transition matrix ({TITLES[name]}): row {row} undecided: {why}; {fallback}"


def anchor_set_transition(pred: np.ndarray, score: np.ndarray, label: np.ndarray, num_classes: int,
                          anchor_share: float = ANCHOR_SHARE) -> TransitionEstimate:
    """Row i: the given labels' distribution among the anchors of predicted class i."""
    t, undecided = np.eye(num_classes), {}
    counts = np.bincount(pred, minlength=num_classes)
    for i, top in enumerate(class_anchors(pred, score, num_classes, anchor_share)):
        if counts[i] < MIN_SAMPLES_PER_CLASS:
            undecided[i] = (f"the pair predicts class {i} for {counts[i]} sample(s), fewer than "
                            f"{MIN_SAMPLES_PER_CLASS}: too few anchors")
            continue
        t[i] = np.bincount(label[top], minlength=num_classes)[:num_classes] / len(top)
    return TransitionEstimate(t, undecided)


def patrini_transition(probs: np.ndarray, percentile: Optional[float] = PATRINI_PERCENTILE) -> TransitionEstimate:
    """Row i: p(. | x) of the sample with the highest p(i | x) below the column's
    ``percentile``-th percentile (None: no filter), normalised to sum to 1 (float64 rounding).

    The percentile is numpy's ``method="higher"``, the original's ``interpolation='higher'``:
    the order statistic at or above the position 0.97 (n - 1). With the rule "leave out what
    is at or above it", numpy's default linear interpolation leaves out exactly the same
    samples: the interpolated value lies in [s_k, s_k+1] (s sorted, k = floor of the
    position), equal to s_k only where the position is whole or s_k = s_k+1, and in each case
    the values below it are the values below the 'higher' one (up to rounding where s_k and
    s_k+1 are a few ulps apart).

    Unlike the original, the probabilities are not changed: it zeroes the filtered entries in
    place through a view of its one probability matrix (``robust_eta = eta_corr[:, i];
    robust_eta[robust_eta >= eta_thresh] = 0.0``), so every later row reads an anchor whose
    earlier columns may have been zeroed (and then row-normalises to hide it), and each
    column's filter depends on the rows before it. Here the filter is a mask.
    """
    n, c = probs.shape
    t, undecided = np.eye(c), {}
    if n < MIN_SAMPLES_PER_CLASS * c:
        why = f"too few samples: {n} for {c} classes (at least {MIN_SAMPLES_PER_CLASS} per class are needed)"
        return TransitionEstimate(t, dict.fromkeys(range(c), why))
    for i in range(c):
        column = probs[:, i]
        kept = np.arange(n)
        if percentile is not None:
            cut = np.percentile(column, percentile, method="higher")
            kept = np.flatnonzero(column < cut)
            if len(kept) == 0:
                undecided[i] = (f"every sample's p({i} | x) is at or above its {percentile:g}th percentile "
                                f"({cut:.4g}): no sample is left below the filter")
                continue
        anchor = kept[np.argmax(column[kept])]  # the first of ties: the lowest sample position
        row = probs[anchor]
        if row.argmax() != i:
            undecided[i] = (f"its anchor (sample position {anchor}, p({i} | x) = {row[i]:.3f}) is predicted as "
                            f"class {row.argmax()}: the pair predicts class {i} for too few samples")
            continue
        t[i] = row / row.sum()
    return TransitionEstimate(t, undecided)


def estimate_transitions(evidence: dict, num_classes: int,
                         percentile: Optional[float] = PATRINI_PERCENTILE) -> dict[str, TransitionEstimate]:
    """Both estimates from one gathered scoring pass (``pred``, ``score``, ``label``,
    ``probs``, sorted by sample index)."""
    return {ANCHOR_SET: anchor_set_transition(evidence["pred"].astype(np.int64), evidence["score"],
                                              evidence["label"].astype(np.int64), num_classes),
            PATRINI: patrini_transition(evidence["probs"], percentile)}


def correction_estimate(evidence: dict, num_classes: int, epoch: int, refinement: int = 0,
                        previous: Optional[np.ndarray] = None) -> tuple[np.ndarray, dict, list[str]]:
    """method.transition auto: T from one gathered scoring pass (``autorate.gather_evidence``
    with probs, sorted by sample index: the same float64 arrays on every rank and any world
    size), the anchor-set estimate (docs/methods.md says why not Patrini's); returns T, the
    metrics row's evidence (both estimates, rounded, with their undecided rows) and the warning
    lines. ``epoch``: 0-based, the epoch whose end estimates; ``refinement``: 0 for the first
    estimate, k for the k-th refinement (method.refine_rounds), whose undecided rows keep
    ``previous``'s, the T the pair was trained with, where the first estimate's are the
    identity's.

    A column of zeros would give every sample labelled with that class an infinite loss: where
    the anchors of no class carry label j, row j is undecided too."""
    estimates = estimate_transitions(evidence, num_classes)
    est = estimates[ANCHOR_SET]
    matrix, undecided = est.matrix.copy(), dict(est.undecided)
    fallback = dict.fromkeys(undecided, "using the identity row")
    if refinement > 0 and previous is not None:
        for i in undecided:
            matrix[i], fallback[i] = previous[i], "keeping the row it was trained with"
    for j in np.flatnonzero(matrix.sum(axis=0) == 0):
        matrix[j], fallback[int(j)] = np.eye(num_classes)[j], "using the identity row"
        undecided[int(j)] = f"no anchor of any class is labelled {j}: column {j} would be all zeros"
    lines = [undecided_line(ANCHOR_SET, i, why, fallback[i]) for i, why in sorted(undecided.items())]
    row = {"source": ANCHOR_SET, "epoch": epoch + 1, "refinement": refinement,
           "matrix": np.round(matrix, 4).tolist(),
           "undecided": {str(i): why for i, why in sorted(undecided.items())},
           PATRINI: {"matrix": np.round(estimates[PATRINI].matrix, 4).tolist(),
                     "undecided": {str(i): why for i, why in sorted(estimates[PATRINI].undecided.items())}}}
    return matrix, row, lines


def mean_row_l1(estimate: np.ndarray, reference: np.ndarray) -> float:
    """The mean over rows of the L1 distance between two transition matrices (0 to 2)."""
    return float(np.abs(np.asarray(estimate) - np.asarray(reference)).sum(1).mean())


def draw_matrices(plt, panels: list[tuple[str, list]], path) -> None:
    """Transition matrices side by side on one colour scale (0-1), each panel (title, C x C),
    written to ``path`` (PNG). ``plt``: matplotlib's pyplot, which the caller imports (with its
    own line where matplotlib is missing), so that this module needs only numpy."""
    c = len(panels[0][1])
    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels) + 1, 4.6), squeeze=False)
    for ax, (title, matrix) in zip(axes[0], panels):
        image = ax.imshow(np.asarray(matrix), vmin=0.0, vmax=1.0, cmap="viridis")
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("given label j")
        ax.set_ylabel("clean class i")
        if c <= 10:  # the values themselves, where they fit
            for (i, j), v in np.ndenumerate(np.asarray(matrix)):
                ax.text(j, i, f"{v:.2f}", ha="center", va="center", fontsize=6,
                        color="white" if v < 0.5 else "black")
    fig.colorbar(image, ax=axes[0].tolist(), shrink=0.8, label="T[i, j]")
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)
