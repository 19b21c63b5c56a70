"""The main-process side of the stream, guarded like the step (tests/test_step.py): with a
stub decoder, taking a batch from the workers, copying it into the step's buffers and
placing it reads no device value on the host and dispatches the same ops at batch 8 and
batch 32 (nothing per image); what crosses from a worker process is no tensor at all."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from shard_fixtures import clothing1m_shards
from test_step import OpTrace, first_difference

from jocor_ddp.config import config_from_dict
from jocor_ddp.data import build_data
from jocor_ddp.dist import DistContext
from jocor_ddp.data.workers import Result


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    folder, _ = clothing1m_shards(tmp_path_factory.mktemp("c1m"), n_train=64, shard_size=8)
    return folder


def stream(shards, batch: int, workers: int):
    return build_data(config_from_dict({
        "data": {"name": "clothing1m", "source": "shards", "shards": str(shards), "cache": "stream",
                 "num_workers": workers, "resize_size": 36, "crop_size": 32},
        "train": {"batch_size": batch, "seed": 1}, "noise": {"type": "none", "rate": 0.0},
        "method": {"forget_rate": 0.2}}), DistContext()).train


def stub_decoder(pool) -> None:
    """Jobs answered without reading or decoding: the slot keeps what it holds."""
    def run(slot, job):
        idx = pool.decoder.splits[job.split].rows["idx"][job.positions].copy()
        return Result(slot, idx, np.ones(len(idx), dtype=bool))
    pool.decoder.run = run


def feed_trace(train) -> OpTrace:
    bufs = train.buffers()
    items = train.items(1)
    train.load(next(items), bufs)  # the first batch: buffers settle
    with OpTrace().watching() as trace:
        train.load(next(items), bufs)
        train.gather(bufs)
    items.close()
    return trace


def test_the_feed_is_the_same_few_ops_whatever_the_batch(shards):
    traces = []
    for batch in (8, 32):
        train = stream(shards, batch, workers=0)
        stub_decoder(train.pool)
        traces.append(feed_trace(train))
    small, large = traces
    assert not small.violations and not large.violations, small.violations + large.violations
    assert len(small.ops) == len(large.ops), first_difference(small, large)
    assert [op[0] for op in small.ops] == [op[0] for op in large.ops]
    assert 0 < len(small.ops) < 40


def test_what_a_worker_sends_is_a_slot_number_and_indices(shards):
    train = stream(shards, 16, workers=2)
    got = []
    for r in train.pool.run(train.jobs(0, 0)):
        got.append(r)
        train.pool.release(r)
    assert len(got) == train.steps_per_epoch == 4
    for r in got:
        assert not any(isinstance(v, torch.Tensor) for v in vars(r).values())
        assert r.idx.shape == (16,) and r.error is None
    train.pool.close()
