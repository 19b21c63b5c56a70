"""Noise: the empirical transition matrix matches the requested one; labels depend only
on (clean labels, type, rate, noise seed)."""

import numpy as np
import pytest

from jocor_ddp.config import ConfigError, NoiseConfig
from jocor_ddp.noise import (apply_transition, empirical_transition, make_noisy_labels,
                             transition_matrix)

N = 100_000


@pytest.mark.parametrize("noise_type,rate,dataset,classes", [
    ("symmetric", 0.2, "mnist", 10), ("symmetric", 0.5, "cifar10", 10), ("symmetric", 0.8, "cifar100", 100),
    ("pairflip", 0.45, "cifar10", 10), ("asymmetric", 0.4, "mnist", 10), ("asymmetric", 0.4, "cifar10", 10),
    ("asymmetric", 0.4, "cifar100", 100), ("none", 0.0, "mnist", 10),
])
def test_empirical_transition_matches_requested(noise_type, rate, dataset, classes):
    clean = np.random.default_rng(123).integers(0, classes, N)
    noisy, info = make_noisy_labels(NoiseConfig(type=noise_type, rate=rate), clean, classes, dataset)
    requested = np.array(info.transition)
    np.testing.assert_allclose(requested.sum(1), 1.0)
    empirical = empirical_transition(clean, noisy, classes)
    # Five binomial standard errors per entry; entries of probability 0 must stay exactly 0.
    rows = np.bincount(clean, minlength=classes)[:, None]
    tol = 5 * np.sqrt(requested * (1 - requested) / rows)
    assert (np.abs(empirical - requested) <= tol).all()
    expected_rate = 1 - np.mean(np.diag(requested)[clean])
    assert abs(info.actual_rate - expected_rate) < 0.01


def test_matrices_follow_the_reference():
    p = transition_matrix("symmetric", 0.5, 10, "mnist")
    assert p[0, 0] == 0.5 and p[0, 1] == pytest.approx(0.5 / 9)
    p = transition_matrix("pairflip", 0.45, 10, "cifar10")
    assert p[9, 0] == 0.45 and p[3, 4] == 0.45 and p[3, 3] == 0.55
    p = transition_matrix("asymmetric", 0.4, 10, "mnist")
    assert p[7, 1] == p[2, 7] == p[5, 6] == p[6, 5] == p[3, 8] == 0.4
    assert p[0, 0] == p[1, 1] == p[4, 4] == p[8, 8] == p[9, 9] == 1.0
    p = transition_matrix("asymmetric", 0.4, 10, "cifar10")
    assert p[9, 1] == p[2, 0] == p[3, 5] == p[5, 3] == p[4, 7] == 0.4
    p = transition_matrix("asymmetric", 0.4, 100, "cifar100")
    assert p[4, 0] == 0.4 and p[0, 1] == 0.4 and p[99, 95] == 0.4 and p[5, 6] == 0.4


def test_same_seed_same_labels_other_seed_other_labels():
    clean = np.random.default_rng(0).integers(0, 10, 5000)
    p = transition_matrix("symmetric", 0.5, 10, "mnist")
    a, b = apply_transition(clean, p, 0), apply_transition(clean, p, 0)
    assert np.array_equal(a, b)
    assert not np.array_equal(a, apply_transition(clean, p, 1))


def test_world_size_and_training_seed_do_not_change_labels(mnist_data):
    from jocor_ddp.config import load_config
    from jocor_ddp.data import build_data
    from jocor_ddp.dist import DistContext

    root = mnist_data(300, 20)
    labels = []
    for seed, rank, world in ((1, 0, 1), (7, 0, 2), (1, 1, 2), (3, 2, 4)):
        cfg = load_config(None, ["data.name=mnist", f"data.root={root}", f"train.seed={seed}",
                                 "train.batch_size=64", "noise.rate=0.6"])
        bundle = build_data(cfg, DistContext(rank=rank, world_size=world))
        labels.append(bundle.train.noisy.numpy())
    assert all(np.array_equal(labels[0], other) for other in labels[1:])
    assert (labels[0] != bundle.train.clean.numpy()).mean() > 0.4


def test_asymmetric_unknown_dataset_is_an_error():
    with pytest.raises(ConfigError, match="asymmetric"):
        transition_matrix("asymmetric", 0.4, 14, "clothing1m")


def test_label_file(tmp_path):
    clean = np.arange(20) % 5
    labels = (clean + 1) % 5
    np.save(tmp_path / "l.npy", labels)
    (tmp_path / "l.txt").write_text("\n".join(map(str, labels)))
    for name in ("l.npy", "l.txt"):
        noisy, info = make_noisy_labels(NoiseConfig(type="file", rate=0.0, file=str(tmp_path / name)),
                                        clean, 5, "cifar10")
        assert np.array_equal(noisy, labels) and info.actual_rate == 1.0
    np.save(tmp_path / "short.npy", labels[:5])
    with pytest.raises(ConfigError, match="short.npy has 5 labels"):
        make_noisy_labels(NoiseConfig(type="file", file=str(tmp_path / "short.npy")), clean, 5, "cifar10")
    np.save(tmp_path / "bad.npy", labels + 3)
    with pytest.raises(ConfigError, match=r"sample \d+ has label \d+, outside \[0, 5\)"):
        make_noisy_labels(NoiseConfig(type="file", file=str(tmp_path / "bad.npy")), clean, 5, "cifar10")
