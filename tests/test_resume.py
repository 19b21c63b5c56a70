"""Exact resume under faults: real SIGKILL, SIGTERM and torchrun restarts, 2 ranks (gloo).

Every interrupted run must end where the uninterrupted run A ends: the same parameters,
bit for bit, and the same metrics.jsonl rows (time fields aside). Every run here estimates
its forget rate (method.forget_rate: auto, rows with the estimate and its evidence) and
holds out a noisy validation split (noisy_val_acc in every row): both resume exactly too.

All but one are marked slow (several 2-rank runs each); the quick subset keeps the
one-process test that a checkpoint carries the noise estimate (a SIGTERM, then resume)."""


import pytest
import torch

from helpers import child_env, metric_rows, run_python, run_torchrun, train_args
from jocor_ddp.checkpoint import list_checkpoints
from jocor_ddp.state import read_state

EPOCHS, STEPS = 3, 8


def _args(data, run_dir, *extra):
    return train_args(data, run_dir, "model.arch=mlp", "train.batch_size=32", f"train.epochs={EPOCHS}",
                      "method.num_gradual=2", "noise.rate=0.4", "checkpoint.every_steps=3", "checkpoint.keep=20",
                      "method.forget_rate=auto", "data.noisy_val_fraction=0.1111", *extra)


def _final_model(run_dir):
    newest = list_checkpoints(run_dir / "checkpoints")[0]
    state = read_state(newest)
    assert state.global_step == EPOCHS * STEPS and state.epoch == EPOCHS
    return state.model


def assert_same_run(run_dir, reference_dir):
    assert metric_rows(run_dir) == metric_rows(reference_dir)
    a, b = _final_model(run_dir), _final_model(reference_dir)
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


@pytest.fixture(scope="module")
def data(mnist_data):
    # 288 samples, 32 held out for validation: 256 train, 8 steps of 32 an epoch.
    return mnist_data(288, 64)


@pytest.fixture(scope="module")
def run_a(data, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("run_a")
    run_torchrun(2, _args(data, run_dir))
    rows = metric_rows(run_dir)
    assert len(rows) == EPOCHS and all(r["noisy_val_samples"] == 32 for r in rows)
    assert [("forget_rate_estimate" in r) for r in rows] == [True, True, False]  # num_gradual=2
    return run_dir


@pytest.mark.slow
def test_sigkill_mid_epoch_then_resume_matches_uninterrupted(data, run_a, tmp_path):
    run_dir = tmp_path / "run"
    # Rank 1 is SIGKILLed before global step 13 (epoch 2, step 5); the newest checkpoint is step 12.
    crashed = run_torchrun(2, _args(data, run_dir), env=child_env(JOCOR_FAULT="crash:1:13"), check=False)
    assert crashed.returncode != 0
    assert list_checkpoints(run_dir / "checkpoints")[0].name == "step-12.pt"
    assert len(metric_rows(run_dir)) == 1
    resumed = run_torchrun(2, _args(data, run_dir))
    assert "resumed from" in resumed.stdout and "step-12.pt" in resumed.stdout
    assert_same_run(run_dir, run_a)


@pytest.mark.slow
def test_sigterm_checkpoints_at_that_step_exits_0_and_resumes(data, run_a, tmp_path):
    run_dir = tmp_path / "run"
    stopped = run_torchrun(2, _args(data, run_dir), env=child_env(JOCOR_FAULT="sigterm:1:10"))
    assert stopped.returncode == 0
    # SIGTERM arrived during global step 10; all ranks stopped after it, at step 11.
    assert list_checkpoints(run_dir / "checkpoints")[0].name == "step-11.pt"
    assert "stopped by signal 15 at epoch 2, step 3/8" in stopped.stdout
    run_torchrun(2, _args(data, run_dir))
    assert_same_run(run_dir, run_a)


@pytest.mark.slow
def test_truncated_newest_checkpoint_falls_back_with_warning(data, run_a, tmp_path):
    run_dir = tmp_path / "run"
    run_torchrun(2, _args(data, run_dir), env=child_env(JOCOR_FAULT="crash:0:20"), check=False)
    newest = list_checkpoints(run_dir / "checkpoints")[0]
    assert newest.name == "step-18.pt"
    newest.write_bytes(newest.read_bytes()[:1000])
    resumed = run_torchrun(2, _args(data, run_dir))
    assert "warning: checkpoint" in resumed.stderr and "step-18.pt: cannot be read" in resumed.stderr
    assert "step-16.pt" in resumed.stdout  # the epoch-2 end checkpoint, the one before
    assert_same_run(run_dir, run_a)


@pytest.mark.slow
def test_torchrun_max_restarts_recovers_from_a_crash(data, run_a, tmp_path):
    run_dir = tmp_path / "run"
    proc = run_torchrun(2, _args(data, run_dir), env=child_env(JOCOR_FAULT="crash:1:7"),
                        extra_torchrun=["--max-restarts=1"], timeout=240)
    assert proc.returncode == 0
    assert "resumed from" in proc.stdout and "step-6.pt" in proc.stdout
    assert_same_run(run_dir, run_a)


@pytest.mark.slow
def test_resume_with_another_world_size_continues_the_same_epoch(data, run_a, tmp_path):
    """The in-memory loader's order is one global permutation: 1 rank can finish what 2
    ranks started (parameters then agree to float tolerance, not bit for bit)."""
    run_dir = tmp_path / "run"
    run_torchrun(2, _args(data, run_dir), env=child_env(JOCOR_FAULT="sigterm:0:13"))
    run_torchrun(1, _args(data, run_dir))
    rows, ref = metric_rows(run_dir), metric_rows(run_a)
    assert [r["kept"] for r in rows] == [r["kept"] for r in ref]
    a, b = _final_model(run_dir), _final_model(run_a)
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=1e-4, rtol=0)


@pytest.mark.slow
def test_collective_timeout_is_a_clear_error(data, tmp_path):
    """A peer that stops answering: the others fail after dist.timeout_s, never hang."""
    proc = run_torchrun(2, _args(data, tmp_path / "run", "dist.timeout_s=5"),
                        env=child_env(JOCOR_FAULT="hang:1:4"), check=False, timeout=120)
    assert proc.returncode != 0
    assert "error (rank 0): a collective did not complete" in proc.stderr, proc.stderr[-3000:]


class _RunsCode:
    """Unpickling this calls os.system: what a tampered checkpoint would do."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        import os
        return (os.system, (f"touch {self.marker}",))


@pytest.mark.slow
def test_checkpoint_that_would_run_code_is_refused_on_every_rank(data, tmp_path):
    run_dir = tmp_path / "run"
    marker = tmp_path / "pwned"
    (run_dir / "checkpoints").mkdir(parents=True)
    torch.save({"format": 1, "model": _RunsCode(marker)}, run_dir / "checkpoints" / "step-99.pt")
    for resume in ("auto", str(run_dir / "checkpoints" / "step-99.pt")):
        proc = run_torchrun(2, _args(data, run_dir, f"train.resume={resume}"), check=False, timeout=120)
        assert proc.returncode != 0
        assert proc.stderr.count("step-99.pt refused: it holds objects that only a full unpickler") == 2
        assert "posix.system" in proc.stderr or "os.system" in proc.stderr
        assert not marker.exists()
    torch.load(run_dir / "checkpoints" / "step-99.pt", weights_only=False)  # the payload is real
    assert marker.exists()


def _single(data, run_dir, *extra, env=None):
    return run_python(_args(data, run_dir, *extra), env=env)


def test_the_noise_estimate_travels_in_checkpoints(data, tmp_path):
    """With train.lr=0.003 the estimate at the end of epoch 2 is decided (the runs above stay
    on the fallback: their networks do not yet predict every class) and sets epoch 3's forget
    rate; a run stopped mid-epoch 3 must go on with it, not with the fallback."""
    whole, split = tmp_path / "whole", tmp_path / "split"
    _single(data, whole, "train.lr=0.003")
    rows = metric_rows(whole)
    assert rows[1]["noise_estimate"]["undecided"] is None and rows[1]["noise_estimate"]["final"]
    assert rows[2]["forget_rate"] == rows[1]["forget_rate_estimate"] != 0.2
    _single(data, split, "train.lr=0.003", env=child_env(JOCOR_FAULT="sigterm:0:20"))
    assert len(metric_rows(split)) == 2
    _single(data, split, "train.lr=0.003")
    assert_same_run(split, whole)


@pytest.mark.slow
@pytest.mark.parametrize("precision", ["fp16", "bf16"])
def test_amp_checkpoints_resume_exactly(data, tmp_path, precision):
    """Mixed precision on CPU autocast: the GradScaler state (fp16) and everything else
    round-trips, so a SIGTERM-interrupted run ends as the uninterrupted one."""
    whole, split = tmp_path / "whole", tmp_path / "split"
    _single(data, whole, f"train.precision={precision}")
    _single(data, split, f"train.precision={precision}", env=child_env(JOCOR_FAULT="sigterm:0:13"))
    state = read_state(list_checkpoints(split / "checkpoints")[0])
    assert state.precision == precision and state.global_step == 14
    if precision == "fp16":
        assert state.step["scaler"]["scale"] > 0 and "_growth_tracker" in state.step["scaler"]
    _single(data, split, f"train.precision={precision}")
    assert_same_run(split, whole)


# --- the same guarantees when the data streams from WebDataset shards --------------------

@pytest.fixture(scope="module")
def shard_args(data, tmp_path_factory):
    """Train from shards through the decoding workers (data.cache=stream), not the device cache."""
    shards = tmp_path_factory.mktemp("shards")
    run_python(["-m", "jocor_ddp.prepare", "mnist", "--src", str(data), "--out", str(shards),
                "--shard-size", "32", "--progress", "never"])
    return ["data.source=shards", f"data.shards={shards}", "data.cache=stream", "data.num_workers=1"]


@pytest.fixture(scope="module")
def stream_run_a(data, shard_args, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("stream_run_a")
    run_torchrun(2, _args(data, run_dir, *shard_args))
    assert len(metric_rows(run_dir)) == EPOCHS
    return run_dir


@pytest.mark.slow
def test_the_stream_trains_exactly_like_the_memory_source(stream_run_a, run_a):
    """Same order, same pixels (PNG shards decode to the IDX pixels), same labels: the
    streamed run under 2 ranks is the in-memory run, bit for bit (the noise estimates and the
    validation accuracy included)."""
    assert_same_run(stream_run_a, run_a)


@pytest.mark.slow
def test_the_device_cache_trains_exactly_like_the_memory_source(data, shard_args, run_a, tmp_path):
    """The third source: the shards decoded once into the device cache."""
    cached = [a.replace("data.cache=stream", "data.cache=device") for a in shard_args]
    run_torchrun(2, _args(data, tmp_path / "run", *cached))
    assert_same_run(tmp_path / "run", run_a)


@pytest.mark.slow
@pytest.mark.parametrize("fault", ["crash:1:13", "sigterm:0:13"])
def test_stream_interrupted_then_resumed_matches_uninterrupted(data, shard_args, stream_run_a, tmp_path, fault):
    run_dir = tmp_path / "run"
    first = run_torchrun(2, _args(data, run_dir, *shard_args), env=child_env(JOCOR_FAULT=fault), check=False)
    # SIGTERM: a checkpoint at that step and exit 0; SIGKILL: the job fails.
    assert (first.returncode == 0) == fault.startswith("sigterm")
    resumed = run_torchrun(2, _args(data, run_dir, *shard_args))
    assert "resumed from" in resumed.stdout
    assert_same_run(run_dir, stream_run_a)


@pytest.mark.slow
def test_stream_in_one_process_interrupted_then_resumed_matches_uninterrupted(data, shard_args, tmp_path):
    """One process, two persistent decoding workers: SIGTERM mid-epoch, then the same command."""
    run_torchrun(1, _args(data, tmp_path / "a", *shard_args, "data.num_workers=2"))
    run_torchrun(1, _args(data, tmp_path / "b", *shard_args, "data.num_workers=2"),
                 env=child_env(JOCOR_FAULT="sigterm:0:13"))
    resumed = run_torchrun(1, _args(data, tmp_path / "b", *shard_args, "data.num_workers=2"))
    assert "resumed from" in resumed.stdout
    assert_same_run(tmp_path / "b", tmp_path / "a")


@pytest.mark.slow
def test_stream_resumes_under_another_world_size_mid_epoch(data, shard_args, stream_run_a, tmp_path):
    """The stream's order is one global permutation, as the memory source's: 1 rank finishes
    the epoch 2 ranks started (parameters then agree to float tolerance)."""
    run_dir = tmp_path / "run"
    run_torchrun(2, _args(data, run_dir, *shard_args), env=child_env(JOCOR_FAULT="sigterm:0:13"))
    proc = run_torchrun(1, _args(data, run_dir, *shard_args))
    assert "resumed from" in proc.stdout
    rows, ref = metric_rows(run_dir), metric_rows(stream_run_a)
    assert [r["kept"] for r in rows] == [r["kept"] for r in ref]
    a, b = _final_model(run_dir), _final_model(stream_run_a)
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=1e-4, rtol=0)


@pytest.mark.slow
def test_stream_skipping_bad_samples_resumes_with_the_same_counts(data, tmp_path):
    """data.on_bad_sample=skip: the bad samples met before a mid-epoch checkpoint travel in it,
    so the resumed run's rows, bad_samples included, equal the uninterrupted run's."""
    from shard_fixtures import rewrite_sample, undecodable_png
    shards = tmp_path / "shards"
    run_python(["-m", "jocor_ddp.prepare", "mnist", "--src", str(data), "--out", str(shards),
                "--shard-size", "32", "--progress", "never"])
    for idx in (5, 70, 200):
        rewrite_sample(shards, "train", idx, image=undecodable_png())
    args = ["data.source=shards", f"data.shards={shards}", "data.cache=stream", "data.num_workers=1",
            "data.on_bad_sample=skip"]
    run_torchrun(2, _args(data, tmp_path / "a", *args))
    run_torchrun(2, _args(data, tmp_path / "b", *args), env=child_env(JOCOR_FAULT="sigterm:0:13"))
    run_torchrun(2, _args(data, tmp_path / "b", *args))
    assert sum(r["bad_samples"] for r in metric_rows(tmp_path / "a")) >= 3
    assert_same_run(tmp_path / "b", tmp_path / "a")
