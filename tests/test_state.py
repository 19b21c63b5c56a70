"""The training state: one typed record per checkpoint, read through one function.

- A checkpoint written by the format-1 code (c9f7fb6: a 22-key dict, stopped mid-epoch with
  method.forget_rate auto; tests/data/format1/step-12.pt, beside the metrics.jsonl of the
  uninterrupted run that wrote it) is read, resumes, and ends exactly as that run ended; the
  offline commands read it too.
- tau is decided once: on shards whose labels came noisy with method.forget_rate unset, the
  trainer estimates it, and the audit uses the trainer's tau (it used to write 0.0 there).
"""

import json
import shutil

import pytest
import torch

from helpers import REPO, make_mnist, metric_rows, run_python, train_args
from jocor_ddp import audit, evaluate, export
from jocor_ddp.checkpoint import load_checkpoint
from jocor_ddp.state import FORMAT, read_state
from shard_fixtures import clothing1m_shards
from tiny_run import final_checkpoint

OLD_RUN_DIR = REPO / "tests" / "data" / "format1"
OLD = OLD_RUN_DIR / "step-12.pt"
# What wrote them (in c9f7fb6): make_mnist(ROOT, n_train=256, n_test=40, side=8), then training with
OLD_RUN = ["model.arch=mlp", "train.batch_size=32", "train.epochs=2", "method.num_gradual=1",
           "method.forget_rate=auto", "noise.rate=0.4", "checkpoint.every_steps=3", "checkpoint.keep=20"]


def test_a_format_1_checkpoint_reads_as_a_training_state():
    assert load_checkpoint(OLD)["format"] == 1
    state = read_state(OLD)
    assert (state.epoch, state.step_in_epoch, state.global_step, state.world_size) == (1, 4, 12, 1)
    assert state.forget_rate == {"auto": True, "tau": 0.2, "why": "auto", "estimate": None, "final": True}
    assert state.final_tau == 0.2
    counters = state.step["counters"]  # the old fourth count (bad samples) became the data part
    assert counters["counts"].shape == (3,) and state.data == {"bad_samples": 0}
    assert state.history["epochs"] == 1 and state.history["bits"].shape == (256,)
    assert set(state.step) == {"optimizer", "scaler", "skipped_steps", "counters"}
    assert state.transition is None  # written before F-correction


def test_a_format_1_checkpoint_resumes_where_its_run_ended(tmp_path):
    data = make_mnist(tmp_path / "mnist", n_train=256, n_test=40, side=8)
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    shutil.copy(OLD, run / "checkpoints" / OLD.name)
    (run / "metrics.jsonl").write_text((OLD_RUN_DIR / "metrics.jsonl").read_text().splitlines()[0] + "\n")  # epoch 1
    proc = run_python(train_args(data, run, *OLD_RUN))
    assert "resumed from" in proc.stdout and "epoch 2, step 4, global step 12" in proc.stdout
    assert metric_rows(run) == metric_rows(OLD_RUN_DIR)
    new = read_state(final_checkpoint(run))
    assert load_checkpoint(final_checkpoint(run))["format"] == FORMAT == 2
    assert (new.epoch, new.global_step, new.forget_rate["auto"]) == (2, 16, True)


def test_the_offline_commands_read_a_format_1_checkpoint(tmp_path):
    data = make_mnist(tmp_path / "mnist", n_train=256, n_test=40, side=8)
    assert evaluate.main([str(OLD), "--root", str(data), "--out", str(tmp_path / "eval"), "--device", "cpu"]) == 0
    assert audit.main([str(OLD), "--root", str(data), "--out", str(tmp_path / "audit.csv"), "--device", "cpu"]) == 0
    summary = json.loads((tmp_path / "audit.json").read_text())
    assert summary["forget_rate"] == 0.2 and summary["kept_share_epochs"] == 1
    assert export.main([str(OLD), "--net", "1", "--out", str(tmp_path / "net.pt")]) == 0
    assert torch.load(tmp_path / "net.pt", weights_only=True)["net"] == 1


def test_a_training_state_round_trips(tmp_path):
    state = read_state(OLD)
    torch.save(state.to_dict(), tmp_path / "step-12.pt")
    again = read_state(tmp_path / "step-12.pt")
    assert again.forget_rate == state.forget_rate and again.data == state.data
    assert all(torch.equal(again.model[k], v) for k, v in state.model.items())


@pytest.mark.slow
def test_the_audit_uses_the_tau_the_trainer_estimated_on_noisy_labels(tmp_path):
    """Clothing1M-shaped shards (labels that came noisy), method.forget_rate unset: the trainer
    decides auto, and the audit's rule (b) must use that tau, not noise.rate (0)."""
    shards, _ = clothing1m_shards(tmp_path, n_train=300, n_val=4, n_test=14, shard_size=100)
    run = tmp_path / "run"
    run_python(train_args(None, run, "data.name=clothing1m", "data.source=shards", f"data.shards={shards}",
                          "data.cache=device", "data.num_workers=0", "data.resize_size=36", "data.crop_size=32",
                          "noise.type=none", "noise.rate=0", "model.arch=mlp", "train.batch_size=50",
                          "train.epochs=1", "method.num_gradual=1", "method.forget_rate_fallback=0.3"))
    row = metric_rows(run)[0]
    assert "forget_rate_estimate" in row  # tau was estimated: auto, as the labels came noisy
    state = read_state(final_checkpoint(run))
    assert state.forget_rate["auto"] and state.final_tau == row["forget_rate_estimate"] > 0
    assert audit.main([str(final_checkpoint(run)), "--out", str(tmp_path / "audit.csv"), "--device", "cpu"]) == 0
    summary = json.loads((tmp_path / "audit.json").read_text())
    assert summary["forget_rate"] == row["forget_rate_estimate"]
