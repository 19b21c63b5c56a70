"""The noise-rate estimator (method.forget_rate: auto) on synthetic predictions whose
noise is known: networks that are right and confident on most samples and wrong, less
confidently, on a known share, with labels corrupted by the reference's transitions."""

import numpy as np
import pytest
import torch

from jocor_ddp.noise import apply_transition, transition_matrix
from jocor_ddp.noise_rate import estimate_noise_rate, log_odds, sample_evidence

C = 10


def synthetic(noise: str, rate: float, *, n: int = 6000, error: float = 0.15, seed: int = 0):
    """(evidence, actual noise rate): two networks that predict the true class with a
    margin of 2-10 logits, except on an ``error`` share of the samples, where they predict
    a wrong class with a margin of 0-2 (their clean error, as Fashion-MNIST's ~0.14)."""
    rng = np.random.default_rng(seed)
    true = rng.integers(0, C, n)
    pred = true.copy()
    wrong = rng.random(n) < error
    pred[wrong] = (true[wrong] + rng.integers(1, C, wrong.sum())) % C
    margin = np.where(wrong, rng.uniform(0, 2, n), rng.uniform(2, 10, n))
    base = rng.normal(0, 0.5, (n, C))
    base[np.arange(n), pred] += margin + 1.0
    logits1 = torch.from_numpy(base + rng.normal(0, 0.1, (n, C))).float()
    logits2 = torch.from_numpy(base + rng.normal(0, 0.1, (n, C))).float()
    labels = apply_transition(true, transition_matrix(noise, rate, C, "mnist"), seed + 1)
    ev = sample_evidence(logits1, logits2, torch.from_numpy(labels))
    return ev, float(np.mean(labels != true))


def run(ev):
    return estimate_noise_rate(ev["pred"], ev["score"], ev["label"], ev["against"], C)


@pytest.mark.parametrize("noise,rate", [("symmetric", 0.2), ("symmetric", 0.5), ("symmetric", 0.8),
                                        ("pairflip", 0.45), ("asymmetric", 0.4), ("none", 0.0)])
def test_the_estimate_finds_the_share_of_wrong_labels(noise, rate):
    ev, actual = synthetic(noise, rate)
    est = run(ev)
    assert est.reason is None
    assert abs(est.rate - actual) <= 0.02, (est.rate, actual)
    # The naive figure (both networks against the label) carries the networks' own error:
    # the test would pass a biased estimator otherwise.
    if rate < 0.8:
        assert abs(est.disagreement - actual) > 0.05


def test_log_odds_do_not_saturate_where_a_float32_softmax_does():
    logits = torch.tensor([[30.0, 0.0, 0.0], [40.0, 0.0, 0.0]])
    assert torch.softmax(logits, 1)[:, 0].tolist() == [1.0, 1.0]  # a tie in float32
    odds = log_odds(logits, torch.tensor([0, 0]))
    assert odds[1] > odds[0] > 29


def test_the_estimate_does_not_depend_on_the_order_of_the_samples_given_the_same_order():
    ev, _ = synthetic("symmetric", 0.5, n=3000)
    perm = np.random.default_rng(5).permutation(3000)
    shuffled = {k: v[perm] for k, v in ev.items()}
    # Anchors are chosen by confidence: any order of distinct scores gives the same anchors.
    assert run(shuffled).rate == pytest.approx(run(ev).rate, abs=1e-12)


def test_a_single_mode_is_undecided_and_says_why():
    ev, _ = synthetic("symmetric", 0.3)
    one_class = dict(ev, pred=np.zeros_like(ev["pred"]))
    est = run(one_class)
    assert est.rate is None and "single mode" in est.reason and "class 0" in est.reason


def test_too_few_samples_are_undecided():
    ev, _ = synthetic("symmetric", 0.3, n=150)
    est = run(ev)
    assert est.rate is None and "too few samples: 150 for 10 classes" in est.reason


def test_labels_unrelated_to_the_predictions_are_undecided():
    ev, _ = synthetic("symmetric", 0.3)
    random_labels = dict(ev, label=np.random.default_rng(1).integers(0, C, len(ev["label"])))
    est = run(random_labels)
    assert est.rate is None and "no more often than chance" in est.reason


def test_a_class_the_networks_never_predict_is_undecided():
    ev, _ = synthetic("symmetric", 0.3)
    pred = np.where(ev["pred"] == 3, 4, ev["pred"])
    est = run(dict(ev, pred=pred))
    assert est.rate is None and "class(es) 3" in est.reason
