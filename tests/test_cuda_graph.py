"""The captured step on a real GPU (marked cuda: skipped without one).

Capture + replay against the same step run eagerly, for every method and both feeds;
mixed precision under capture; a capture that fails falls back (auto) or stops the run
(true); a captured run stopped mid-epoch resumes bit for bit."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from helpers import child_env, make_cifar, method_args, metric_rows, run_python, train_args
from jocor_ddp.checkpoint import list_checkpoints
from jocor_ddp.config import load_config
from jocor_ddp.dist import DistContext
from jocor_ddp.step import CaptureError
from jocor_ddp.trainer import Trainer
from jocor_ddp.registry import method_names
from jocor_ddp.state import read_state

pytestmark = pytest.mark.cuda
METHODS = method_names()
STEPS = 50


@pytest.fixture(scope="module")
def mnist(mnist_data):
    return mnist_data(1024, 64)


def cuda() -> DistContext:
    return DistContext(device=torch.device("cuda", torch.cuda.current_device()))


def _cfg(tmp_path, name, *extra):
    # 8 steps per epoch: 50 steps cross six epoch boundaries, the forget-rate ramp, the lr
    # decay and the beta1 change (a second capture) at epoch 4.
    return load_config(None, ["data.name=mnist", "model.arch=mlp", "train.batch_size=128", "train.epochs=8",
                              "method.num_gradual=3", "train.epoch_decay_start=4", "method.init_epoch=2",
                              "train.precision=fp32", "train.device=cuda", "log.progress=never",
                              f"run.dir={tmp_path / name}", *extra])


def _steps(trainer: Trainer, n: int):
    """Run n steps across epochs; yield each step's kept sets (read after the step)."""
    per_epoch = trainer.data.train.steps_per_epoch
    epoch = -1
    for i in range(n):
        if i // per_epoch != epoch:
            epoch = i // per_epoch
            trainer.begin_epoch(epoch)
            items = iter(trainer.step.feed.steps(epoch, 0))
        trainer.step.run(next(items))
        yield trainer.step.last[1].kept_global.clone()


def assert_same_training(captured: Trainer, eager: Trainer, n: int = STEPS):
    for i, (a, b) in enumerate(zip(_steps(captured, n), _steps(eager, n))):
        assert torch.equal(a, b), f"step {i}: the captured step kept other samples"
    assert captured.step.captured and not eager.step.captured
    for (name, p), q in zip(captured.pair.named_parameters(), eager.pair.parameters()):
        assert torch.equal(p, q), f"{name} differs by {(p - q).abs().max().item():.3g}"


@pytest.mark.parametrize("method", METHODS)
def test_capture_and_replay_equal_eager_fp32(mnist, tmp_path, method):
    extra = [f"data.root={mnist}", *method_args(method)]
    assert_same_training(Trainer(_cfg(tmp_path, "g", "train.cuda_graph=true", *extra), cuda()),
                         Trainer(_cfg(tmp_path, "e", "train.cuda_graph=false", *extra), cuda()))


def test_streamed_batches_copied_into_the_graph_equal_eager(mnist, tmp_path):
    """The shard stream: uint8 pixels, indices and crops copied into the step's buffers each
    step, placed inside the graph (random crops: data.augment)."""
    shards = tmp_path / "shards"
    run_python(["-m", "jocor_ddp.prepare", "mnist", "--src", str(mnist), "--out", str(shards),
                "--shard-size", "128", "--progress", "never"])
    extra = ["data.source=shards", f"data.shards={shards}", "data.cache=stream", "data.num_workers=2",
             "data.augment=true"]
    assert_same_training(Trainer(_cfg(tmp_path, "g", "train.cuda_graph=true", *extra), cuda()),
                         Trainer(_cfg(tmp_path, "e", "train.cuda_graph=false", *extra), cuda()))


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_cnn_pair_in_mixed_precision_is_captured_and_learns(tmp_path, precision):
    root = make_cifar(tmp_path / "c10", n_train_per_batch=128, n_test=64).parent
    cfg = load_config(None, ["data.name=cifar10", f"data.root={root}", "model.arch=cnn", "train.batch_size=64",
                             "train.epochs=3", "method.num_gradual=1", "train.cuda_graph=true",
                             f"train.precision={precision}", "log.progress=never", f"run.dir={tmp_path / 'run'}"])
    trainer = Trainer(cfg, cuda())
    rows = trainer.fit()
    assert trainer.step.captured
    assert all(np.isfinite(r["train_loss"]) for r in rows)
    assert rows[-1]["kept"] == 10 * (64 // 2)  # 640 samples, 10 steps, half kept once the ramp is done


def _poison_with_host_read(trainer):
    """Make the step read a device value on the host, which a capture forbids."""
    method = trainer.step.method
    trainer.step.method = lambda *a: (lambda out: (out.objective.item(), out)[1])(method(*a))


def test_a_failed_capture_trains_eagerly_under_auto_and_stops_under_true(mnist, tmp_path, capsys):
    auto = Trainer(_cfg(tmp_path, "a", f"data.root={mnist}"), cuda())
    _poison_with_host_read(auto)
    kept = list(_steps(auto, 12))
    assert len(kept) == 12 and not auto.step.captured and not auto.step.capture
    assert "cuda graph: capturing the step failed" in capsys.readouterr().out
    strict = Trainer(_cfg(tmp_path, "t", f"data.root={mnist}", "train.cuda_graph=true"), cuda())
    _poison_with_host_read(strict)
    with pytest.raises(CaptureError, match="train.cuda_graph: true, but capturing the step failed"):
        list(_steps(strict, 12))


def test_captured_run_stopped_mid_epoch_resumes_bit_for_bit(mnist, tmp_path):
    overrides = ["model.arch=mlp", "train.batch_size=128", "train.epochs=3", "method.num_gradual=2",
                 "train.precision=fp32", "train.cuda_graph=true", "checkpoint.every_steps=5", "checkpoint.keep=20"]
    run_python(train_args(mnist, tmp_path / "a", *overrides))
    stopped = run_python(train_args(mnist, tmp_path / "b", *overrides), env=child_env(JOCOR_FAULT="sigterm:0:11"))
    assert "stopped by signal 15 at epoch 2" in stopped.stdout
    resumed = run_python(train_args(mnist, tmp_path / "b", *overrides))
    assert "resumed from" in resumed.stdout and "cuda graph" in resumed.stdout

    def final(run):
        return metric_rows(run), read_state(list_checkpoints(run / "checkpoints")[0]).model
    (rows_a, model_a), (rows_b, model_b) = final(tmp_path / "a"), final(tmp_path / "b")
    assert rows_a == rows_b
    for k in model_a:
        assert torch.equal(model_a[k], model_b[k]), k
