"""End-to-end training under torchrun (gloo): outputs, evaluation coverage, non-finite losses."""

import json

import pytest
import yaml

from helpers import HAVE_FASHION_MNIST, child_env, metric_rows, run_python, run_torchrun, train_args
from jocor_ddp.config import config_from_dict
from jocor_ddp.state import read_state

pytestmark = pytest.mark.slow  # real training runs, most under torchrun with 2 ranks


def _rows(run_dir):
    return metric_rows(run_dir, keep_time=True)


@pytest.fixture(scope="module")
def mnist(mnist_data):
    return mnist_data(256, 101)


def _args(data, run_dir, *extra):
    return train_args(data, run_dir, "train.batch_size=32", "train.epochs=2", "method.num_gradual=1", *extra)


def test_outputs_and_every_test_sample_scored_once(tmp_path, mnist):
    run_torchrun(2, _args(mnist, tmp_path / "run"))
    rows = _rows(tmp_path / "run")
    assert [r["epoch"] for r in rows] == [1, 2]
    for key in ("epoch", "lr", "forget_rate", "train_loss", "label_precision", "test_acc1", "test_acc2",
                "samples_per_s", "epoch_s"):
        assert key in rows[0]
    # 101 test samples over 2 ranks (51 + 50): each scored exactly once, none padded or dropped.
    assert all(r["test_samples"] == 101 for r in rows)
    assert rows[1]["forget_rate"] == 0.5 and rows[1]["kept"] == 8 * 16
    saved = config_from_dict(yaml.safe_load((tmp_path / "run" / "config.yaml").read_text()))
    assert saved.train.batch_size == 32 and saved.data.root == str(mnist)
    noise = json.loads((tmp_path / "run" / "noise.json").read_text())
    assert len(noise["transition"]) == 10 and 0.3 < noise["actual_rate"] < 0.7


@pytest.mark.parametrize("sync_every", [1, 4])
def test_nonfinite_loss_stops_every_rank_with_epoch_step_and_rank(tmp_path, mnist, sync_every):
    """Read at once, or at the next sync point (train.sync_every=4): the error names the
    step where the NaN appeared either way."""
    proc = run_torchrun(2, _args(mnist, tmp_path / "run", f"train.sync_every={sync_every}"),
                        env=child_env(JOCOR_FAULT="nan:1:11"), check=False, timeout=120)
    assert proc.returncode != 0
    message = "non-finite joint loss at rank 1, batch position 0 in epoch 2, step 11 (global)"
    assert proc.stderr.count(message) == 2, proc.stderr[-3000:]


def test_fewer_host_syncs_train_the_same_model(tmp_path, mnist):
    run_torchrun(2, _args(mnist, tmp_path / "a"))
    run_torchrun(2, _args(mnist, tmp_path / "b", "train.sync_every=3"))
    assert metric_rows(tmp_path / "a") == metric_rows(tmp_path / "b")  # time fields aside


def test_nonfinite_loss_skipped_and_counted(tmp_path, mnist):
    run_torchrun(2, _args(mnist, tmp_path / "run", "train.on_nonfinite=skip"),
                 env=child_env(JOCOR_FAULT="nan:1:11"))
    rows = _rows(tmp_path / "run")
    assert [r["skipped_steps"] for r in rows] == [0, 1]
    assert all(r["train_loss"] == r["train_loss"] for r in rows)  # not NaN
    assert rows[1]["test_acc1"] > 20


def test_demo_config_two_ranks_label_precision_beats_noise(tmp_path, mnist_data):
    """The demo config on a slice of real Fashion-MNIST (generated IDX files without it):
    the kept samples are cleaner than the noisy labels."""
    if HAVE_FASHION_MNIST:
        data, subset = None, ["data.train_subset=6000", "data.test_subset=2000"]
    else:
        data, subset = mnist_data(3000, 500), []
    run_torchrun(2, train_args(data, tmp_path / "run", "method.num_gradual=3", "train.epochs=6", *subset,
                               config="configs/fashion_mnist_sym50.yaml"), timeout=240)
    last = _rows(tmp_path / "run")[-1]
    assert last["forget_rate"] == 0.5
    assert last["label_precision"] > 0.5 + 0.15, last
    assert last["test_acc1"] > 60 and last["test_acc2"] > 60, last


def test_fresh_start_replaces_an_earlier_runs_metrics(tmp_path, mnist):
    for _ in range(2):
        run_python(_args(mnist, tmp_path / "run", "train.resume=never", "train.epochs=1"))
    assert [r["epoch"] for r in _rows(tmp_path / "run")] == [1]


def test_tensorboard_scalars(tmp_path, mnist):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    run_torchrun(2, _args(mnist, tmp_path / "run", "log.tensorboard=true"))
    events = EventAccumulator(str(tmp_path / "run" / "tensorboard"))
    events.Reload()
    acc = [(e.step, round(e.value, 4)) for e in events.Scalars("test_acc1")]
    assert acc == [(r["epoch"], round(r["test_acc1"], 4)) for r in _rows(tmp_path / "run")]
    assert "label_precision" in events.Tags()["scalars"]


def test_compiled_ddp_model_saves_unwrapped_weights(tmp_path, mnist):
    """torch.compile over DDP: checkpoints hold plain keys (no module. / _orig_mod. prefix)
    that load into a fresh, unwrapped pair."""
    import torch
    from jocor_ddp.checkpoint import list_checkpoints
    from jocor_ddp.config import ModelConfig
    from jocor_ddp.models import build_pair
    run_torchrun(2, _args(mnist, tmp_path / "run", "train.epochs=1", "train.compile=true",
                          "train.channels_last=true"), timeout=300)
    state = read_state(list_checkpoints(tmp_path / "run" / "checkpoints")[0])
    assert all(k.startswith(("net1.", "net2.")) for k in state.model)
    build_pair(ModelConfig(arch="mlp"), 1, 10, 28).load_state_dict(state.model)


def test_fresh_start_sets_an_earlier_runs_checkpoints_aside(tmp_path, mnist):
    """Otherwise the old, higher-numbered checkpoints would outrank the new run's: keep would
    prune the new ones and a later auto resume would continue the old run."""
    from jocor_ddp.checkpoint import list_checkpoints
    run = tmp_path / "run"
    run_python(_args(mnist, run, "train.epochs=3", "checkpoint.keep=2"))
    earlier = (run / "metrics.jsonl").read_text()
    fresh = run_python(_args(mnist, run, "train.resume=never", "train.epochs=1", "checkpoint.keep=2"))
    assert [p.name for p in list_checkpoints(run / "checkpoints")] == ["step-8.pt"]
    assert [p.name for p in list_checkpoints(run / "checkpoints.replaced-1")] == ["step-24.pt", "step-16.pt"]
    # The rows of the earlier run go with its checkpoints, not lost.
    assert (run / "checkpoints.replaced-1" / "metrics.jsonl").read_text() == earlier
    assert f"the earlier checkpoints and their metrics.jsonl were moved to {run / 'checkpoints.replaced-1'}" in fresh.stdout
    again = run_python(_args(mnist, run, "train.epochs=2", "checkpoint.keep=2"))
    assert "step-8.pt" in again.stdout and [r["epoch"] for r in _rows(run)] == [1, 2]


def test_unwritable_run_dir_fails_on_every_rank(tmp_path, mnist):
    (tmp_path / "afile").write_text("not a folder")
    proc = run_torchrun(2, _args(mnist, tmp_path / "afile" / "run"), check=False, timeout=120)
    assert proc.returncode != 0
    assert proc.stderr.count("run.dir: cannot write the run folder") == 2, proc.stderr[-2000:]
    assert "collective did not complete" not in proc.stderr
