"""Fixed-length and class-balanced epochs (train.steps_per_epoch, train.max_per_class): the
draw itself; the same batches from the device cache and the stream, sliced the same under
2 ranks, repeated by a resumed epoch; and whole runs: 1 process against 2 ranks, and a run
stopped mid-epoch that ends bit for bit where the uninterrupted one ends."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from helpers import child_env, metric_rows, run_torchrun, train_args
from shard_fixtures import mnist_shards
from test_shards import epoch_batches, same_batches

from jocor_ddp.checkpoint import list_checkpoints
from jocor_ddp.config import ConfigError, config_from_dict
from jocor_ddp.data import build_data
from jocor_ddp.data.epochs import EpochDraw
from jocor_ddp.data.sources import DataError
from jocor_ddp.dist import DistContext
from jocor_ddp.schedule import lr_beta1_schedule
from jocor_ddp.state import read_state

CPU = DistContext()


# --- the draw ------------------------------------------------------------------------

def test_without_the_keys_an_epoch_is_the_permutation_it_always_was():
    labels = np.arange(1000) % 7
    draw = EpochDraw(labels, 32, seed=5)
    assert draw.steps == 1000 // 32
    for epoch in (0, 3):  # the order main used before the keys existed, written out
        assert np.array_equal(draw.order(epoch), np.random.default_rng([5, epoch]).permutation(1000))
    fixed = EpochDraw(labels, 32, seed=5, steps_per_epoch=10)
    assert fixed.steps == 10 and np.array_equal(fixed.order(3), draw.order(3))  # the same, cut short


def test_a_balanced_epoch_draws_at_most_the_cap_of_each_class_once():
    sizes = [5, 50, 200, 40]  # class 3 has exactly the cap
    labels = np.random.default_rng(0).permutation(np.repeat(np.arange(4), sizes))
    draw = EpochDraw(labels, 16, seed=1, max_per_class=40)
    assert draw.pool == 5 + 40 + 40 + 40 and draw.steps == 125 // 16
    orders = [draw.order(e) for e in range(30)]
    for o in orders:
        assert len(o) == len(set(o.tolist())) == 125
        assert np.bincount(labels[o], minlength=4).tolist() == [5, 40, 40, 40]
    assert np.array_equal(orders[2], draw.order(2))                  # a function of (seed, epoch)
    assert not np.array_equal(orders[2], orders[3])                  # drawn afresh each epoch
    assert not np.array_equal(orders[2], EpochDraw(labels, 16, seed=2, max_per_class=40).order(2))
    big = np.flatnonzero(labels == 2)
    seen = np.unique(np.concatenate([o[np.isin(o, big)] for o in orders]))
    assert len(seen) > 190  # 30 fresh draws of 40 of 200 reach nearly all of them


def test_keys_are_checked():
    with pytest.raises(ConfigError, match="train.steps_per_epoch"):
        config_from_dict({"train": {"steps_per_epoch": 0}})
    with pytest.raises(ConfigError, match="train.max_per_class"):
        config_from_dict({"train": {"max_per_class": -3}})
    with pytest.raises(ValueError, match="train.steps_per_epoch: 8 global batches of 16 need 128 samples.*at most 7"):
        EpochDraw(np.arange(125) % 4, 16, seed=1, steps_per_epoch=8)


# --- the sources ---------------------------------------------------------------------

@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    return mnist_shards(tmp_path_factory.mktemp("mnist"))  # 96 train in 8 shards, 30 test in 3


STEPS, CAP, BATCH = 5, 6, 8


def bundle(shards, cache, rank=0, world=1, **train):
    cfg = config_from_dict({
        "data": {"name": "mnist", "source": "shards", "shards": str(shards), "num_workers": 2, "cache": cache,
                 "augment": True},
        "train": {"batch_size": BATCH, "seed": 3, "steps_per_epoch": STEPS, "max_per_class": CAP, **train},
        "noise": {"type": "symmetric", "rate": 0.4}})
    return build_data(cfg, DistContext(rank=rank, world_size=world))


@pytest.mark.parametrize("cache", ["device", "stream"])
def test_fixed_balanced_epochs_resume_and_slice_across_ranks(shards, cache):
    train = bundle(shards, cache).train
    assert train.steps_per_epoch == STEPS
    full = epoch_batches(train, 1)
    idx = torch.cat([b[3] for b in full])
    assert len(full) == STEPS and len(set(idx.tolist())) == STEPS * BATCH      # each sample at most once
    noisy = torch.cat([b[1] for b in full])
    assert torch.bincount(noisy, minlength=10).max() <= CAP                   # balanced by the given labels
    assert same_batches(epoch_batches(train, 1, 3), full[3:])                 # a resumed epoch
    assert not same_batches(epoch_batches(train, 2), full)
    ranks = [[b.idx.tolist() for b in bundle(shards, cache, r, 2).train.epoch(1)] for r in range(2)]
    assert [a + b for a, b in zip(*ranks)] == [b.tolist() for b in (b[3] for b in full)]


def test_the_stream_draws_what_the_device_cache_draws(shards):
    assert same_batches(epoch_batches(bundle(shards, "device").train, 2), epoch_batches(bundle(shards, "stream").train, 2))


def test_an_epoch_too_long_for_the_draw_is_an_error_naming_the_key(shards):
    for cache in ("device", "stream"):
        with pytest.raises(DataError, match=r"train.steps_per_epoch: 9 global batches of 8 need 72 samples, and an "
                                            r"epoch draws \d+ samples \(at most 6 of each of 10 classes"):
            bundle(shards, cache, steps_per_epoch=9)


# --- whole runs ----------------------------------------------------------------------

EPOCHS, RUN_STEPS = 3, 5


def _args(data, run_dir, *extra, entry=("-m", "jocor_ddp.train")):
    return train_args(data, run_dir, "model.arch=mlp", "train.batch_size=32", f"train.epochs={EPOCHS}",
                      "method.num_gradual=2", "noise.rate=0.4", f"train.steps_per_epoch={RUN_STEPS}",
                      "train.max_per_class=20", "train.epoch_decay_start=1", "checkpoint.keep=20", *extra,
                      entry=entry)


@pytest.fixture(scope="module")
def data(mnist_data):
    return mnist_data(288, 64)  # about 29 a class: the cap of 20 leaves out about a third


@pytest.mark.slow
def test_one_process_and_two_ranks_train_the_same_fixed_balanced_epochs(data, tmp_path):
    runs = {}
    for nproc in (1, 2):
        out = tmp_path / f"{nproc}.pt"
        run_torchrun(nproc, _args(data, tmp_path / f"run{nproc}", entry=("tests/workers/equivalence.py", str(out))))
        runs[nproc] = torch.load(out, weights_only=True)
    one, two = runs[1], runs[2]
    assert len(one["kept"]) == len(two["kept"]) == EPOCHS * RUN_STEPS
    for step, (a, b) in enumerate(zip(one["kept"], two["kept"])):
        assert torch.equal(a, b), f"step {step}: different samples kept"
    for name, p in one["state"].items():
        # Adam turns the all-reduce's rounding in near-zero gradients into ~1e-5 steps: float tolerance.
        torch.testing.assert_close(two["state"][name], p, atol=1e-4, rtol=0, msg=name)


@pytest.mark.slow
def test_a_fixed_balanced_epoch_stopped_mid_way_resumes_bit_for_bit(data, tmp_path):
    """SIGTERM mid-epoch (the checkpoint: epoch 2, 4 of its 5 steps done); a resume that asks for other epochs is
    refused; the same command ends where the uninterrupted run ends."""
    run_torchrun(1, _args(data, tmp_path / "a"))
    rows = metric_rows(tmp_path / "a")
    assert [r["steps"] for r in rows] == [RUN_STEPS] * EPOCHS
    lrs, _ = lr_beta1_schedule(0.001, EPOCHS, 1)  # the schedule counts epochs, whatever their length
    assert [r["lr"] for r in rows] == pytest.approx(list(lrs))

    b = tmp_path / "b"
    run_torchrun(1, _args(data, b), env=child_env(JOCOR_FAULT="sigterm:0:8"))
    assert read_state(list_checkpoints(b / "checkpoints")[0]).step_in_epoch == 4
    other = run_torchrun(1, _args(data, b, "train.steps_per_epoch=4"), check=False)
    assert other.returncode != 0  # torchrun exits 1 whatever its worker's code (2 here)
    assert "stopped mid-epoch with train.steps_per_epoch=5, this run asks for 4" in other.stderr
    resumed = run_torchrun(1, _args(data, b))
    assert "resumed from" in resumed.stdout and "steps/epoch (class-balanced, at most 20 a class, fixed length)" \
        in resumed.stdout
    assert metric_rows(b) == metric_rows(tmp_path / "a")
    final = [read_state(list_checkpoints(d / "checkpoints")[0]).model for d in (tmp_path / "a", b)]
    for k in final[0]:
        assert torch.equal(final[0][k], final[1][k]), k
