"""The benchmark commands run and report their figures with the setting they were measured at
(no timing is asserted: speed is measured, never tested)."""

import json

import pytest
from helpers import run_python, run_torchrun

MODEL = ["data.name=mnist", "model.arch=mlp", "train.batch_size=32"]


def _json(proc):
    return json.loads(proc.stdout[proc.stdout.index("{"):])


def test_bench_step_reports_the_setting_and_a_median(tmp_path):
    out = _json(run_python(["-m", "jocor_ddp.bench", "step", "--steps", "4", "--repeats", "3",
                            "--warmup", "1", *MODEL, f"run.dir={tmp_path}"]))
    assert out["bench"] == "step" and out["device"].startswith("cpu") and out["precision"] == "fp32"
    assert out["global_batch"] == 32 and out["steps"] == 4 and len(out["samples_per_s_all"]) == 3
    assert out["samples_per_s"] == sorted(out["samples_per_s_all"])[1] > 0


@pytest.mark.slow
def test_bench_step_under_torchrun_prints_once(tmp_path):
    proc = run_torchrun(2, ["-m", "jocor_ddp.bench", "step", "--steps", "3", "--repeats", "1",
                            "--warmup", "1", *MODEL, f"run.dir={tmp_path}"])
    assert proc.stdout.count('"bench": "step"') == 1 and '"world_size": 2' in proc.stdout


@pytest.mark.slow
def test_bench_train_and_data_from_prepared_shards(tmp_path, mnist_data):
    root = mnist_data(256, 64)
    run_python(["-m", "jocor_ddp.prepare", "mnist", "--src", str(root), "--out", str(tmp_path / "shards"),
                "--shard-size", "64", "--progress", "never"])
    train = _json(run_python(["-m", "jocor_ddp.bench", "train", "--epochs", "1", "--skip-steps", "2", *MODEL,
                              "data.source=shards", f"data.shards={tmp_path / 'shards'}", "data.cache=stream",
                              "data.num_workers=1", f"run.dir={tmp_path / 'run'}"]))
    assert train["bench"] == "train" and train["source"] == "shards" and train["steps_per_epoch"] == 8
    assert train["skip_steps"] == 2 and len(train["samples_per_s_all"]) == 1
    assert train["samples_per_s"] > 0 and train["samples_per_s_whole_epoch"] > 0 and train["eval_s"] >= 0
    # 1 + 9 batches of 32 cross the end of the 8-step epoch: the stream goes on into the next.
    data = _json(run_python(["-m", "jocor_ddp.bench", "data", "--shards", str(tmp_path / "shards"),
                             "--workers", "0,1", "--batch-size", "32", "--steps", "9", "--warmup", "1"]))
    rows = data["results"]
    assert [(r["decode"], r["workers"]) for r in rows] == [("cpu", 0), ("cpu", 1),
                                                           ("cpu, once into the device cache", 1)]
    for row in rows[:2]:
        assert row["samples"] == 9 * 32 and row["samples_per_s_per_worker"] > 0 and row["main_ms_per_batch"] > 0
        assert row["main_ms_per_batch"] == pytest.approx(row["feed_ms_per_batch"] + row["gather_ms_per_batch"],
                                                         abs=0.002)
    assert rows[2]["samples"] == 256 + 64 and rows[2]["samples_per_s"] > 0
    assert data["train_samples"] == 256 and data["resize"] is None and data["batch_size"] == 32


@pytest.mark.slow
def test_bench_comm_counts_bytes():
    out = _json(run_python(["-m", "jocor_ddp.bench", "comm", "--world-sizes", "1,2,8", *MODEL]))
    params = 2 * (784 * 256 + 256 + 256 * 10 + 10)
    assert out["parameters_pair"] == params and out["gradient_bytes"] == 4 * params
    w8 = out["per_world_size"][2]
    assert w8["local_batch"] == 4 and w8["grad_all_reduce_bytes_each_way"] == int(2 * 7 / 8 * 4 * params)
    assert out["per_world_size"][0]["grad_all_reduce_bytes_each_way"] == 0
