"""Noise: the empirical transition matrix matches the requested one; labels depend only
on (clean labels, type, rate, noise seed, and for instance noise the images); instance noise
follows the part-dependent generator, flips by image, and is the same bits however its
images arrive."""

import math

import numpy as np
import pytest

from helpers import FASHION_MNIST, needs_fashion_mnist
from jocor_ddp.config import ConfigError, NoiseConfig
from jocor_ddp.noise import (FLIP_STD, W_QUANTUM, InstanceNoise, apply_transition, empirical_transition,
                             instance_noisy_labels, make_noisy_labels, transition_matrix, truncated_normal)

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


@pytest.mark.parametrize("noise_type", ["symmetric", "instance"])
def test_world_size_and_training_seed_do_not_change_labels(mnist_data, noise_type):
    from jocor_ddp.config import load_config
    from jocor_ddp.data import build_data
    from jocor_ddp.dist import DistContext

    root = mnist_data(300, 20)
    labels = []
    for seed, rank, world in ((1, 0, 1), (7, 0, 2), (1, 1, 2), (3, 2, 4)):
        cfg = load_config(None, ["data.name=mnist", f"data.root={root}", f"train.seed={seed}",
                                 "train.batch_size=64", f"noise.type={noise_type}", "noise.rate=0.6"])
        bundle = build_data(cfg, DistContext(rank=rank, world_size=world))
        labels.append(bundle.train.noisy.numpy())
    assert all(np.array_equal(labels[0], other) for other in labels[1:])
    assert (labels[0] != bundle.train.clean.numpy()).mean() > 0.4
    cfg.noise.seed = 1
    assert not np.array_equal(build_data(cfg, DistContext()).train.noisy.numpy(), labels[0])


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


# --- instance-dependent noise ------------------------------------------------------------------

def _phi(z):
    return math.exp(-z * z / 2) / math.sqrt(2 * math.pi)


def _cdf(z):
    return 0.5 * (1 + math.erf(z / math.sqrt(2)))


def truncated_moments(mean, std, lo=0.0, hi=1.0):
    """The mean and standard deviation of N(mean, std^2) truncated to [lo, hi] (closed form)."""
    a, b = (lo - mean) / std, (hi - mean) / std
    z = _cdf(b) - _cdf(a)
    m = (_phi(a) - _phi(b)) / z
    var = 1 + (a * _phi(a) - b * _phi(b)) / z - m * m
    return mean + std * m, std * math.sqrt(var)


def test_truncated_normal_has_its_moments_and_bounds():
    u = (np.arange(200_000) + 0.5) / 200_000  # midpoints: a quadrature of the inverse CDF
    # mean 0: the half-normal (the upper bound is 10 std away): mean std*sqrt(2/pi), std std*sqrt(1 - 2/pi)
    q = truncated_normal(u, 0.0, 0.1)
    assert abs(q.mean() - 0.1 * math.sqrt(2 / math.pi)) < 1e-5
    assert abs(q.std() - 0.1 * math.sqrt(1 - 2 / math.pi)) < 1e-5
    for mean in (0.0, 0.2, 0.4, 0.95):
        q = truncated_normal(u, mean, FLIP_STD)
        want_mean, want_std = truncated_moments(mean, FLIP_STD)
        assert abs(q.mean() - want_mean) < 1e-5 and abs(q.std() - want_std) < 1e-5, mean
        assert np.all(np.diff(q) >= 0)  # an inverse CDF: monotone in u
    edges = truncated_normal(np.array([0.0, 1e-300, 1 - 2 ** -53]), 0.4, FLIP_STD)
    assert ((edges >= 0) & (edges <= 1)).all()
    assert abs(truncated_normal(np.array([0.5]), 0.5, FLIP_STD)[0] - 0.5) < 1e-15  # the median of a symmetric cut


def random_images(n=600, classes=10, seed=0, shape=(8, 8, 1)):
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, (n, *shape), dtype=np.uint8), rng.integers(0, classes, n)


def test_instance_noise_follows_the_generator():
    """Against the original's per-sample loop, in float64, with the generator's own draws; and
    the draws themselves are the documented streams of noise.seed."""
    x, clean = random_images()
    n, c, f = len(clean), 10, 64
    gen = InstanceNoise(clean, c, 0.4, 7, f)
    streams = [np.random.default_rng(s) for s in np.random.SeedSequence(7).spawn(3)]
    assert np.array_equal(gen.flip, truncated_normal(streams[0].random(n), 0.4, FLIP_STD))
    w = streams[1].standard_normal((c, f, c))
    assert np.abs(gen.w - w).max() <= W_QUANTUM / 2 and np.array_equal(np.rint(gen.w / W_QUANTUM) * W_QUANTUM, gen.w)
    assert np.array_equal(gen.u, streams[2].random(n))
    gen.add(np.arange(n), x)
    p = gen.flip_distributions()
    want = []
    for i in range(n):
        a = x[i].reshape(-1).astype(np.float64) @ gen.w[clean[i]]
        a[clean[i]] = -np.inf
        s = np.exp(a - a.max())
        row = gen.flip[i] * s / s.sum()
        row[clean[i]] += 1 - gen.flip[i]
        want.append(row)
    np.testing.assert_allclose(p, np.array(want), rtol=1e-12, atol=1e-300)
    np.testing.assert_allclose(p.sum(axis=1), 1.0, rtol=1e-12)
    labels = [int(np.searchsorted(np.cumsum(row), u, side="right")) for row, u in zip(want, gen.u)]
    assert np.array_equal(gen.labels(), labels)
    assert np.array_equal(instance_noisy_labels(x, clean, c, 0.4, 7), labels)


def test_instance_noise_is_exact_whatever_the_chunks():
    """x W_y is exact (W on a grid of 2^-24, uint8 pixels): integer arithmetic gives the same
    numbers, and chunks of any size in any order give the same labels, bit for bit."""
    x, clean = random_images(n=700)
    gen = InstanceNoise(clean, 10, 0.4, 3, 64)
    gen.add(np.arange(700), x)
    w_int = np.rint(gen.w / W_QUANTUM).astype(np.int64)
    exact = np.stack([x[i].reshape(-1).astype(np.int64) @ w_int[clean[i]] for i in range(700)])
    assert np.array_equal(gen.logits / W_QUANTUM, exact.astype(np.float64))
    order = np.random.default_rng(1).permutation(700)
    chunks = [(order[lo:lo + k], x[order[lo:lo + k]]) for lo, k in zip(range(0, 700, 37), [37] * 19)]
    chunks.reverse()
    assert np.array_equal(instance_noisy_labels(chunks, clean, 10, 0.4, 3, features=64),
                          instance_noisy_labels(x, clean, 10, 0.4, 3))


def test_instance_noise_depends_on_the_image_not_only_the_class():
    x, clean = random_images(n=2000)
    gen = InstanceNoise(clean, 10, 0.4, 0, 64)
    gen.add(np.arange(2000), x)
    noisy, p = gen.labels(), gen.flip_distributions()
    for cls in range(10):
        of_class = clean == cls
        assert len(set(noisy[of_class & (noisy != clean)].tolist())) >= 2  # flipped to different classes
        off = p[of_class].copy()
        off[:, cls] = 0
        assert len(set(off.argmax(axis=1).tolist())) >= 2  # rows of one class differ: not a class-level matrix
    assert np.array_equal(instance_noisy_labels(x, clean, 10, 0.4, 0), noisy)
    assert not np.array_equal(instance_noisy_labels(x, clean, 10, 0.4, 1), noisy)
    # Give sample 0 the image of a sample j of its class that flips elsewhere: its row becomes j's
    # (but for its own flip rate), and no other row moves.
    top = np.where(np.arange(10) == clean[:, None], -1.0, p).argmax(axis=1)
    j = np.flatnonzero((clean == clean[0]) & (top != top[0]))[0]
    swapped = x.copy()
    swapped[0] = x[j]
    gen2 = InstanceNoise(clean, 10, 0.4, 0, 64)
    gen2.add(np.arange(2000), swapped)
    p2 = gen2.flip_distributions()
    assert np.array_equal(p2[1:], p[1:])
    own = clean[0]
    np.testing.assert_allclose(np.delete(p2[0], own) / gen.flip[0], np.delete(p[j], own) / gen.flip[j], rtol=1e-12)


@needs_fashion_mnist
@pytest.mark.parametrize("rate", [0.2, 0.4])
def test_instance_noise_rate_on_fashion_mnist(rate):
    from jocor_ddp.data.sources import load_arrays
    ds = load_arrays("fashion-mnist", str(FASHION_MNIST))
    clean = ds.train.labels
    noisy, info = make_noisy_labels(NoiseConfig(type="instance", rate=rate), clean, 10, "fashion-mnist",
                                    ds.train.images)
    assert abs(info.actual_rate - rate) < 0.02
    assert info.actual_rate == (noisy != clean).mean() and info.transition is None
    t = np.array(info.empirical_transition)
    np.testing.assert_allclose(t, empirical_transition(clean, noisy, 10))
    np.testing.assert_allclose(np.diag(t), 1 - rate, atol=0.03)  # every class flips near the rate
    for cls in range(10):  # and, by image, to several classes
        assert len(set(noisy[(clean == cls) & (noisy != clean)].tolist())) >= 2


def test_instance_noise_needs_images():
    with pytest.raises(ConfigError, match="noise.type: instance needs the training images"):
        make_noisy_labels(NoiseConfig(type="instance", rate=0.2), np.zeros(4, dtype=np.int64), 10, "mnist")
