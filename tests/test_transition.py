"""The transition-matrix estimates (transition.py) on synthetic probabilities whose T is known,
Patrini's outlier filter against a hand example, the undecided rows, and the same matrices
from evidence gathered under 1 and 2 ranks. (The command, estimate_noise, on a generated set
and on real Fashion-MNIST: test_autorate.py.)"""

import numpy as np
import pytest
import torch

from jocor_ddp.autorate import gather_evidence, merge_evidence
from jocor_ddp.dist import DistContext
from jocor_ddp.noise import apply_transition, empirical_transition, transition_matrix
from jocor_ddp.noise_rate import ANCHOR_SHARE, estimate_noise_rate, sample_evidence
from jocor_ddp.transition import (ANCHOR_SET, PATRINI, anchor_set_transition, estimate_transitions, mean_row_l1,
                                  patrini_transition)

C = 10
CONFIDENT = 0.5   # the share of samples the clean posterior is (nearly) one-hot on their class
EPS = 0.01        # ... within this much: 1 - m on the class, m <= EPS spread over all


def random_transition(seed: int = 3, rho: float = 0.4) -> np.ndarray:
    """A random row-stochastic T with T[i, i] >= 1 - rho > rho >= T[k, i] (k != i): each class
    is its own column's most likely source, which anchor points need (else T is not
    identifiable from p(noisy | x))."""
    return (1 - rho) * np.eye(C) + rho * np.random.default_rng(seed).dirichlet(np.ones(C), C)


MATRICES = {"symmetric 0.5": transition_matrix("symmetric", 0.5, C, "mnist"),
            "pairflip 0.45": transition_matrix("pairflip", 0.45, C, "mnist"),
            "asymmetric 0.4": transition_matrix("asymmetric", 0.4, C, "mnist"),
            "random": random_transition()}


def synthetic(t: np.ndarray, *, n: int = 40000, seed: int = 0, noisy_posterior: bool = True):
    """(evidence with probs, clean labels) for two identical networks: the clean posterior h is
    nearly one-hot on the class for a CONFIDENT share of the samples (1 - m on it, m <= EPS
    spread by a Dirichlet), mixed for the rest (m in [0.5, 1]: 15% of all samples are predicted
    as another class, about a Fashion-MNIST MLP's own error). The given labels are drawn from t. The networks output
    h T (fitted to the noisy labels, Patrini's premise) or h itself (a pair that learned the
    clean classes, the anchor set's)."""
    rng = np.random.default_rng(seed)
    true = rng.integers(0, C, n)
    labels = apply_transition(true, t, seed + 1)
    m = np.where(rng.random(n) < CONFIDENT, rng.uniform(0, EPS, n), rng.uniform(0.5, 1.0, n))
    h = (1 - m)[:, None] * np.eye(C)[true] + m[:, None] * rng.dirichlet(np.ones(C), n)
    logits = torch.from_numpy(np.log(h @ t if noisy_posterior else h))
    ev = sample_evidence(logits, logits, torch.from_numpy(labels), probs=True)
    return ev, true


def sampling_limit(t: np.ndarray, anchors: np.ndarray) -> float:
    """1.2 B, B the mean over rows of sum_j sd(share of label j among k_i anchors), sd =
    sqrt(T_ij (1 - T_ij) / k_i). Each entry's expected absolute error is at most its standard
    deviation (Jensen), so B bounds the expected mean row L1 of rows read from k_i clean
    anchors; about 0.8 B is expected (near-normal shares), and the mean of 10 rows strays
    little: symmetric 0.5 over seeds 0-39, mean 0.80 B, largest 1.09 B (seed 3)."""
    return 1.2 * float(np.mean(np.sqrt(t * (1 - t) / anchors[:, None]).sum(1)))


@pytest.mark.parametrize("name", list(MATRICES))
def test_both_estimators_find_a_known_matrix(name):
    """Probabilities h T (a network fitted to the noisy labels). Patrini's anchor of class i is
    a confident sample of i (5% of all samples, above everything else in column i, so the 3%
    filter leaves some), whose output ((1 - m) e_i + m s) T is within 2 m <= 2 EPS of T[i] in
    L1: the generating T within 0.02. The anchor set's rows are the given labels of ~1,000
    clean anchors a class: within sampling_limit of the generating T."""
    t = MATRICES[name]
    ev, true = synthetic(t)
    found = estimate_transitions(ev, C)
    assert not found[ANCHOR_SET].undecided and not found[PATRINI].undecided
    assert mean_row_l1(found[PATRINI].matrix, t) <= 2 * EPS
    limit = sampling_limit(t, np.array([max(1, int(ANCHOR_SHARE * np.sum(ev["pred"] == i))) for i in range(C)]))
    assert mean_row_l1(found[ANCHOR_SET].matrix, t) <= limit
    # ... and of the empirical T of the drawn labels (itself within ~0.03 of t here).
    assert mean_row_l1(found[ANCHOR_SET].matrix, empirical_transition(true, ev["label"], C)) <= limit
    # The anchors are what makes it work: all the samples predicted as i carry the networks' error.
    naive = np.stack([np.bincount(ev["label"][ev["pred"] == i], minlength=C) / np.sum(ev["pred"] == i)
                      for i in range(C)])
    assert mean_row_l1(naive, t) > limit
    for est in found.values():
        np.testing.assert_allclose(est.matrix.sum(1), 1.0, atol=1e-12)


def test_on_a_pair_that_learned_the_clean_classes_patrini_finds_the_identity():
    """Probabilities h (clean posteriors, what a small-loss-trained pair tends towards): the
    anchor set still reads T from the labels; Patrini's rows are the anchors' outputs, the
    identity within 2 EPS, off by 2 x the noise of each row (here 2 x 0.5)."""
    t = MATRICES["symmetric 0.5"]
    ev, _ = synthetic(t, noisy_posterior=False)
    found = estimate_transitions(ev, C)
    assert mean_row_l1(found[PATRINI].matrix, np.eye(C)) <= 2 * EPS
    assert mean_row_l1(found[PATRINI].matrix, t) == pytest.approx(1.0, abs=2 * EPS)
    assert mean_row_l1(found[ANCHOR_SET].matrix, t) <= 0.1


def test_the_anchor_sets_diagonal_is_the_noise_rate_estimates_per_class_noise():
    ev, _ = synthetic(MATRICES["pairflip 0.45"], n=6000, noisy_posterior=False)
    t = anchor_set_transition(ev["pred"], ev["score"], ev["label"], C).matrix
    noise = estimate_noise_rate(ev["pred"], ev["score"], ev["label"], ev["against"], C).per_class
    np.testing.assert_allclose(1.0 - np.diag(t), noise, rtol=0, atol=1e-15)  # the same anchors and counts


def test_probs_are_the_mean_of_the_two_softmaxes_in_float64_and_only_when_asked():
    rng = np.random.default_rng(0)
    l1, l2 = (torch.from_numpy(rng.normal(0, 5, (64, C))).float() for _ in range(2))
    y = torch.from_numpy(rng.integers(0, C, 64))
    assert "probs" not in sample_evidence(l1, l2, y)
    probs = sample_evidence(l1, l2, y, probs=True)["probs"]
    assert probs.dtype == np.float64
    reference = (torch.softmax(l1.double(), 1) + torch.softmax(l2.double(), 1)).numpy() / 2
    np.testing.assert_allclose(probs, reference, rtol=1e-13, atol=1e-300)


# --- Patrini's filter on a hand example -------------------------------------------------------

def hand_example() -> np.ndarray:
    """40 samples, 2 classes (the fewest the estimators take: 20 a class). Column 0: 36 fillers
    0.05, 0.06, ..., 0.40 and four samples 0.80, 0.90, 0.95, 0.99 (positions 36-39). The 97th
    percentile ('higher') is the order statistic at ceil(0.97 x 39 = 37.83) = 38: 0.95; the
    filter leaves out 0.95 and 0.99 (>= it), and the anchor of class 0 is the 0.90 sample.
    Column 1 (= 1 - column 0) sorted: 0.01, 0.05, 0.10, 0.20, then the fillers 0.60 ... 0.95;
    its 97th percentile is 0.94, so 0.94 and 0.95 go and the anchor of class 1 is the 0.93
    filler (p0 = 0.07, position 2)."""
    p0 = np.concatenate([0.40 - 0.01 * np.arange(36), [0.80, 0.90, 0.95, 0.99]])
    return np.stack([p0, 1.0 - p0], 1)


def test_the_97th_percentile_filter_on_a_hand_example():
    probs = hand_example()
    assert np.percentile(probs[:, 0], 97, method="higher") == 0.95
    filtered = patrini_transition(probs)
    np.testing.assert_allclose(filtered.matrix, [[0.90, 0.10], [0.07, 0.93]], atol=1e-12)
    unfiltered = patrini_transition(probs, percentile=None)  # the original's CIFAR-100 setting
    np.testing.assert_allclose(unfiltered.matrix, [[0.99, 0.01], [0.05, 0.95]], atol=1e-12)


def test_linear_interpolation_leaves_out_the_same_samples_as_higher():
    """The docstring's claim: with 'leave out what is at or above it', numpy's default
    percentile and the original's interpolation='higher' keep the same samples, ties included."""
    rng = np.random.default_rng(0)
    for n in (40, 41, 97, 100, 101, 1000, 1234):
        for column in (rng.random(n), rng.integers(0, 5, n) / 4.0, np.sort(rng.random(n))):
            for q in (97.0, 90.0, 50.0):
                np.testing.assert_array_equal(column < np.percentile(column, q),
                                              column < np.percentile(column, q, method="higher"))


def test_the_filter_does_not_change_the_probabilities_it_reads():
    """The original zeroes the filtered entries of its one probability matrix in place, so a
    later row can be read from an altered sample. Three classes: sample 0 is in the top 3% of
    column 0 (the original zeroes its p0) and is the anchor of class 1; its row is read as it is."""
    filler = np.tile([0.05, 0.05, 0.9], (57, 1))  # class 2, low in columns 0 and 1
    filler[:, 1] += np.linspace(0, 0.3, 57)       # distinct values in column 1, below 0.45
    filler[:, 2] -= np.linspace(0, 0.3, 57)
    special = np.array([[0.45, 0.50, 0.05],   # column 0's 2nd highest; column 1's third highest
                        [0.90, 0.05, 0.05],   # class 0, above the 97th percentile
                        [0.05, 0.90, 0.05],   # class 1, above
                        [0.04, 0.94, 0.02]])  # class 1, above
    probs = np.concatenate([special, filler])
    before = probs.copy()
    t = patrini_transition(probs).matrix
    np.testing.assert_array_equal(probs, before)
    np.testing.assert_allclose(t[1], [0.45, 0.50, 0.05], atol=1e-12)
    # The original's loop (giorgiop/loss-correction, NoiseEstimator.fit), row-normalised as its
    # predict() does: sample 0's p0 was zeroed while estimating row 0.
    eta = before.copy()
    rows = []
    for i in range(3):
        robust = eta[:, i]
        robust[robust >= np.percentile(robust, 97, method="higher")] = 0.0
        rows.append(eta[np.argmax(robust)] / eta[np.argmax(robust)].sum())
    np.testing.assert_allclose(rows[1], [0.0, 0.50 / 0.55, 0.05 / 0.55], atol=1e-12)


# --- undecided rows ---------------------------------------------------------------------------

def test_a_class_never_predicted_is_an_identity_row_with_a_warning():
    ev, _ = synthetic(MATRICES["symmetric 0.5"], n=6000, noisy_posterior=False)
    ev = dict(ev, pred=np.where(ev["pred"] == 3, 4, ev["pred"]))
    ev["probs"][:, 4] += 0.9 * ev["probs"][:, 3]  # the networks put most of class 3's mass on 4
    ev["probs"][:, 3] *= 0.1
    found = estimate_transitions(ev, C)
    for name in (ANCHOR_SET, PATRINI):
        assert list(found[name].undecided) == [3]
        np.testing.assert_array_equal(found[name].matrix[3], np.eye(C)[3])
    assert found[ANCHOR_SET].warnings(ANCHOR_SET) == [
        "warning: transition matrix (anchor set): row 3 undecided: the pair predicts class 3 for 0 sample(s), fewer "
        "than 20: too few anchors; using the identity row"]
    line, = found[PATRINI].warnings(PATRINI)
    assert line.startswith("warning: transition matrix (Patrini): row 3 undecided: ")
    assert "predicted as class" in line and line.endswith("; using the identity row")
    # The other rows are estimated as before.
    assert not np.array_equal(found[ANCHOR_SET].matrix[4], np.eye(C)[4])


def test_a_class_predicted_for_fewer_than_20_samples_is_undecided_and_20_is_enough():
    ev, _ = synthetic(MATRICES["symmetric 0.5"], n=6000, noisy_posterior=False)
    for kept, undecided in ((19, [5]), (20, [])):
        fives = np.flatnonzero(ev["pred"] == 5)
        pred = ev["pred"].copy()
        pred[fives[kept:]] = 6
        est = anchor_set_transition(pred, ev["score"], ev["label"], C)
        assert list(est.undecided) == undecided
        assert np.array_equal(est.matrix[5], np.eye(C)[5]) == bool(undecided)


def test_too_few_samples_and_a_constant_column_are_undecided_for_patrini():
    est = patrini_transition(np.full((150, C), 1.0 / C))
    assert sorted(est.undecided) == list(range(C)) and "too few samples: 150 for 10 classes" in est.undecided[0]
    np.testing.assert_array_equal(est.matrix, np.eye(C))
    probs = np.full((400, C), 1.0 / C)
    est = patrini_transition(probs)
    assert "no sample is left below the filter" in est.undecided[0]
    # Without the filter the anchor is the first sample, predicted as class 0: rows 1-9 undecided.
    assert sorted(patrini_transition(probs, percentile=None).undecided) == list(range(1, C))


# --- any world size ---------------------------------------------------------------------------

def test_one_process_and_two_ranks_gather_the_same_matrices():
    """The trainer's path (``gather_evidence`` over scored batches): one process scoring in
    index order against two ranks that split a shuffled epoch order as a distributed sampler
    does (rank r takes positions r, r + 2, ...), each in batches in its own order, merged as
    the all-gather hands them over: the same arrays, so the same matrices, bit for bit."""
    ev, _ = synthetic(MATRICES["random"], n=8000)
    logits, labels = torch.from_numpy(np.log(ev["probs"])), torch.from_numpy(ev["label"])

    def scored(positions: np.ndarray, batch: int):  # what score_evidence yields, batch by batch
        for s in range(0, len(positions), batch):
            at = torch.from_numpy(positions[s:s + batch])
            yield at, logits[at], logits[at], labels[at]

    one = gather_evidence(DistContext(), scored(np.arange(8000), 512), C, probs=True)
    order = np.random.default_rng(7).permutation(8000)
    two = merge_evidence([gather_evidence(DistContext(), scored(order[r::2], 256), C, probs=True) for r in (0, 1)])
    assert sorted(one) == ["against", "idx", "label", "pred", "probs", "score"]
    for key in one:
        np.testing.assert_array_equal(one[key], two[key])
    a, b = estimate_transitions(one, C), estimate_transitions(two, C)
    for name in (ANCHOR_SET, PATRINI):
        np.testing.assert_array_equal(a[name].matrix, b[name].matrix)
    assert not a[ANCHOR_SET].undecided and not a[PATRINI].undecided
