"""data.noisy_val_fraction: the noisy validation split is held out of training, the same samples
for every world size, training seed and source, and nothing changes when it is 0."""

import numpy as np
import pytest
import torch

from jocor_ddp.config import config_from_dict
from jocor_ddp.data import build_data
from jocor_ddp.data.memory import MemoryTrainLoader, held_out
from jocor_ddp.dist import DistContext
from shard_fixtures import mnist_shards

N = 200


@pytest.fixture(scope="module")
def mnist(mnist_data):
    return mnist_data(N, 20)


def cfg(root, fraction, seed=1, **data):
    return config_from_dict({"data": {"name": "mnist", "root": str(root), "noisy_val_fraction": fraction, **data},
                             "noise": {"type": "symmetric", "rate": 0.4}, "train": {"batch_size": 16, "seed": seed}})


def indices(batches) -> set:
    return {i for b in batches for i in b.idx.tolist()}


def trained_indices(loader) -> set:
    return {i for step_batch in loader.epoch(0) for i in step_batch.idx.tolist()}


def test_held_out_is_a_fixed_share_drawn_from_its_own_seed():
    a = held_out(1000, 0.2)
    assert a.sum() == 200 and np.array_equal(a, held_out(1000, 0.2))
    assert not held_out(1000, 0.0).any()
    assert held_out(1000, 0.1).sum() == 100 and held_out(999, 0.2).sum() == 200


@pytest.mark.parametrize("seed", [1, 7])
def test_the_split_is_disjoint_from_training_and_the_same_for_any_world_size(mnist, seed):
    expected = set(np.flatnonzero(held_out(N, 0.25)).tolist())
    for world in (1, 2):
        val, train_eval, trained = set(), set(), set()
        for rank in range(world):
            bundle = build_data(cfg(mnist, 0.25, seed), DistContext(rank=rank, world_size=world))
            val |= indices(bundle.noisy_val)
            train_eval |= indices(bundle.train_eval)
            trained |= trained_indices(bundle.train)
        assert val == expected, f"world size {world}, seed {seed}"
        assert not val & train_eval and not val & trained
        assert val | train_eval == set(range(N))
        assert len(trained) == (N - len(val)) // 16 * 16  # the last partial batch is dropped


def test_the_validation_labels_are_the_noisy_ones(mnist):
    bundle = build_data(cfg(mnist, 0.25), DistContext())
    batches = list(bundle.noisy_val)
    y, clean = torch.cat([b.y for b in batches]), torch.cat([b.clean for b in batches])
    assert (y != clean).any() and bundle.noise.type == "symmetric"


def test_zero_changes_nothing(mnist):
    bundle = build_data(cfg(mnist, 0.0), DistContext())
    assert bundle.noisy_val is None
    # The loader the memory source built before the split existed: the whole split, by row.
    from jocor_ddp.data.sources import load_arrays
    arrays = load_arrays("mnist", str(mnist))
    plain = MemoryTrainLoader(arrays.train.images, bundle.train.noisy.numpy(), arrays.train.labels,
                              global_batch=16, rank=0, world_size=1, seed=1, device=torch.device("cpu"))
    for a, b in zip(bundle.train.epoch(0), plain.epoch(0)):
        assert torch.equal(a.idx, b.idx) and torch.equal(a.x, b.x) and torch.equal(a.y, b.y)


def test_shards_hold_out_the_same_samples_cached_or_streamed(tmp_path):
    shards = mnist_shards(tmp_path, n_train=96)
    expected = set(np.flatnonzero(held_out(96, 0.25)).tolist())
    for cache in ("device", "stream"):
        c = config_from_dict({"data": {"name": "mnist", "source": "shards", "shards": str(shards), "num_workers": 0,
                                       "cache": cache, "noisy_val_fraction": 0.25},
                              "noise": {"type": "symmetric", "rate": 0.4}, "train": {"batch_size": 8}})
        bundle = build_data(c, DistContext())
        assert indices(bundle.noisy_val) == expected, cache
        assert not indices(bundle.train_eval) & expected and not trained_indices(bundle.train) & expected
