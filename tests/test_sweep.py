"""Sweeps: the grid, its runner on CPU processes, the Slurm array script and the paper's table.

A tiny sweep (2 settings x 2 methods x 2 seeds, 3 epochs of 4 steps, generated MNIST) runs
to the end with --procs 2; stopped by SIGTERM midway and run again, it skips what finished,
resumes the rest, and ends identical to the uninterrupted sweep. The table's mean and std are
checked against a hand computation over hand-written metrics."""

from __future__ import annotations

import csv
import io
import json
import os
import shlex
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

from helpers import REPO, child_env, fake_bin, metric_rows, run_python
from jocor_ddp import report
from jocor_ddp.checkpoint import list_checkpoints
from jocor_ddp.grid import load_sweep
from jocor_ddp.state import read_state

SWEEPS = sorted((REPO / "configs" / "sweeps").glob("*.yaml"))


def write_sweep(tmp_path: Path, name: str, axes: dict, *, epochs: int = 3, data=None, **extra) -> Path:
    base = tmp_path / "base.yaml"
    base.write_text(yaml.safe_dump({
        "data": {"name": "mnist", "root": str(data or tmp_path / "none")}, "model": {"arch": "mlp"},
        "method": {"num_gradual": 1, "forget_rate": 0.4}, "log": {"progress": "never"},
        "train": {"batch_size": 32, "epochs": epochs, "lr": 0.01}, "checkpoint": {"every_steps": 2, "keep": 50}}))
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump({"base": str(base), "dir": str(tmp_path / name), "axes": axes, **extra},
                                   sort_keys=False))
    return path


TINY_AXES = {"setting": {"sym20": {"noise.rate": 0.2}, "pair30": {"noise.type": "pairflip", "noise.rate": 0.3}},
             "method.name": ["jocor", "coteaching"], "train.seed": [1, 2]}


def sweep_cmd(path: Path, *args: str) -> list[str]:
    return [sys.executable, "-m", "jocor_ddp.sweep", str(path), *args]


def run_sweep(path: Path, *args: str, check_rc: int | None = 0) -> subprocess.CompletedProcess:
    proc = subprocess.run(sweep_cmd(path, *args), cwd=REPO, env=child_env(), capture_output=True, text=True,
                          timeout=300)
    if check_rc is not None:
        assert proc.returncode == check_rc, f"exit {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc


# --- the grid ---------------------------------------------------------------------------------

@pytest.mark.parametrize("path", SWEEPS, ids=lambda p: p.name)
def test_shipped_sweeps_validate(path):
    sweep = load_sweep(path)
    n_settings = len(sweep.axes.get("setting", [None]))
    assert all(r.dir.parent == sweep.dir for r in sweep.runs)
    if "method.forget_rate" in sweep.axes:  # tau picked on a validation split: report --pick
        assert len(sweep.runs) == n_settings * len(sweep.axes["method.forget_rate"])
        # Every run scores a validation split: Clothing1M's clean val, else a noisy held-out share.
        assert all(("val" in r.cfg.data.eval_splits or r.cfg.data.noisy_val_fraction > 0)
                   and r.cfg.method.name == "jocor" for r in sweep.runs)
        return
    assert all(r.cfg.train.epochs == 200 for r in sweep.runs)
    assert len(sweep.runs) == n_settings * 6 * 3
    # The paper's six methods in its column order; F-correction estimates T in the run.
    assert sweep.axes["method.name"] == ["standard", "fcorrection", "decoupling", "coteaching", "coteaching_plus",
                                         "jocor"]
    assert {r.cfg.method.transition for r in sweep.runs if r.method == "fcorrection"} == {"auto"}
    if path.stem == "fashion_mnist":
        instance = {r.setting: r.cfg.noise.rate for r in sweep.runs if r.cfg.noise.type == "instance"}
        assert instance == {"instance20": 0.2, "instance40": 0.4}
    if path.stem.startswith("paper_"):
        assert set(sweep.paper) == set(sweep.axes["setting"])
        dataset = path.stem.removeprefix("paper_")
        sym50 = next(r for r in sweep.runs if r.setting == "sym50" and r.method == "jocor")
        assert sym50.config_path == f"configs/{dataset}_sym50.yaml" and sym50.cfg.noise.rate == 0.5


def test_a_bad_value_in_one_run_stops_the_sweep_before_anything_starts(tmp_path):
    axes = {"setting": {"ok": {"noise.rate": 0.2}, "broken": {"train.lr": -1}}, "method.name": ["jocor"]}
    path = write_sweep(tmp_path, "bad", axes)
    proc = run_sweep(path, check_rc=2)
    assert "run 1 (broken-jocor): train.lr: must be > 0, got -1.0" in proc.stderr
    assert not (tmp_path / "bad").exists()
    proc = run_sweep(write_sweep(tmp_path, "typo", {"method.nmae": ["jocor"]}), check_rc=2)
    assert "run 0 (jocor): method.nmae: unknown key" in proc.stderr


@pytest.mark.parametrize("text, message", [
    ("base: [1\n", "not valid YAML: line 2, column 1"),
    ("", "expected a mapping at the top level"),
    ("base: x.yaml\ndir: d\naxes: {}\n", "axes: expected a mapping of at least one axis"),
    ("base: x.yaml\ndir: d\naxes: {a: [1]}\nextra: 1\n", "extra: unknown key"),
    ("dir: d\naxes: {a: [1]}\n", "base: missing"),
])
def test_a_malformed_sweep_file_is_named(tmp_path, text, message):
    from jocor_ddp.grid import SweepError
    path = tmp_path / "s.yaml"
    path.write_text(text)
    with pytest.raises(SweepError, match=message) as info:
        load_sweep(path)
    assert str(path) in str(info.value) and "\n" not in str(info.value)


@pytest.mark.slow
def test_list_and_index_cover_every_run_exactly_once(tmp_path):
    path = write_sweep(tmp_path, "grid", TINY_AXES)
    lines = run_sweep(path, "--list").stdout.splitlines()
    assert len(lines) == 8
    listed = [line.split("\t") for line in lines]
    assert [int(i) for i, _, _ in listed] == list(range(8))
    assert len({name for _, name, _ in listed}) == 8 and all(s == "not started" for _, _, s in listed)
    assert listed[0][1] == "sym20-jocor-seed1" and listed[-1][1] == "pair30-coteaching-seed2"
    for i, name, _ in listed:
        one = [json.loads(l) for l in run_sweep(path, "--index", i, "--dry-run", "--gpus", "none").stdout.splitlines()]
        assert [o["name"] for o in one] == [name]
        assert one[0]["command"][-2:] == [f"run.dir={tmp_path / 'grid' / name}", "log.progress=never"]
    assert "--index 8: the sweep has runs 0..7" in run_sweep(path, "--index", "8", check_rc=2).stderr
    picked = run_sweep(path, "--list", "--where", "setting=pair30", "--where", "train.seed=2").stdout.splitlines()
    assert [l.split("\t")[1] for l in picked] == ["pair30-jocor-seed2", "pair30-coteaching-seed2"]


@pytest.mark.slow
def test_packing_builds_the_child_commands_and_environment(tmp_path):
    path = write_sweep(tmp_path, "grid", TINY_AXES)

    def plan(*args):
        return [json.loads(l) for l in run_sweep(path, "--dry-run", *args).stdout.splitlines()]
    packed = plan("--gpus", "0,1,2,3", "--runs-per-gpu", "2")
    assert sorted(p["env"]["CUDA_VISIBLE_DEVICES"] for p in packed) == ["0", "0", "1", "1", "2", "2", "3", "3"]
    assert len({p["slot"] for p in packed}) == 8
    assert all(p["command"][1:4] == ["-m", "jocor_ddp.train", "--config"] for p in packed)
    assert all(int(p["env"]["OMP_NUM_THREADS"]) == max(1, (os.cpu_count() or 1) // 8) for p in packed)
    wide = plan("--gpus", "0,1,2,3", "--gpus-per-run", "2")
    assert [p["env"]["CUDA_VISIBLE_DEVICES"] for p in wide[:2]] == ["0,1", "2,3"]
    assert wide[0]["command"][1:5] == ["-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2"]
    assert wide[0]["command"][5:7] == ["-m", "jocor_ddp.train"]
    cpu = plan("--gpus", "none", "--procs", "2")
    assert {p["env"]["CUDA_VISIBLE_DEVICES"] for p in cpu} == {""} and len({p["slot"] for p in cpu}) == 2
    assert "--gpus-per-run 3: only 2 GPU(s) visible" in run_sweep(
        path, "--dry-run", "--gpus", "0,1", "--gpus-per-run", "3", check_rc=2).stderr


# --- running on CPU processes --------------------------------------------------------------------

@pytest.fixture(scope="module")
def mnist(mnist_data):
    return mnist_data(128, 64)


def finals(sweep_dir: Path) -> dict:
    """Each run's metrics rows (time fields aside) and final parameters."""
    out = {}
    for run in sorted(p for p in sweep_dir.iterdir() if p.is_dir()):
        rows = metric_rows(run)
        state = read_state(list_checkpoints(run / "checkpoints")[0])
        out[run.name] = (rows, state.model, state.global_step)
    return out


@pytest.mark.slow
def test_sweep_runs_stops_on_sigterm_and_resumes_to_the_same_results(tmp_path, mnist):
    whole = write_sweep(tmp_path, "whole", TINY_AXES, data=mnist)
    proc = run_sweep(whole, "--procs", "2", "--gpus", "none")
    assert "sweep: 8 done, 0 failed" in proc.stdout
    reference = finals(tmp_path / "whole")
    assert len(reference) == 8 and all(len(rows) == 3 and step == 12 for rows, _, step in reference.values())

    parts = write_sweep(tmp_path, "parts", TINY_AXES, data=mnist)
    sweep = load_sweep(parts)
    child = subprocess.Popen(sweep_cmd(parts, "--procs", "2", "--gpus", "none"), cwd=REPO, env=child_env(),
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        # Stop once two runs finished and a later one has a checkpoint: it must resume from it.
        deadline = time.monotonic() + 240
        while True:
            assert child.poll() is None, child.stdout.read()
            assert time.monotonic() < deadline, "the sweep did not progress"
            done = [r for r in sweep.runs if (r.dir / "metrics.jsonl").is_file()
                    and len((r.dir / "metrics.jsonl").read_text().splitlines()) == 3]
            started = [r for r in sweep.runs if r not in done and list_checkpoints(r.dir / "checkpoints")]
            if len(done) >= 2 and started:
                break
            time.sleep(0.05)
        child.send_signal(signal.SIGTERM)
        out, _ = child.communicate(timeout=120)
    finally:
        if child.poll() is None:
            child.kill()
    assert child.returncode == 0, out
    assert "run the same command again to continue" in out and "stopped" in out
    again = run_sweep(parts, "--procs", "2", "--gpus", "none").stdout
    assert again.count("sweep: skip ") >= 2 and "resuming at epoch" in again
    assert any("resumed from" in (r.dir / "sweep.log").read_text() for r in sweep.runs)
    ours = finals(tmp_path / "parts")
    assert ours.keys() == reference.keys()
    for name, (rows, model, step) in reference.items():
        assert ours[name][0] == rows and ours[name][2] == step, name
        for key in model:
            assert torch.equal(ours[name][1][key], model[key]), (name, key)


@pytest.mark.slow
def test_a_failing_run_is_reported_and_the_others_finish(tmp_path, mnist):
    axes = {"setting": {"good": {"data.root": str(mnist)}, "gone": {"data.root": str(tmp_path / "missing")}},
            "method.name": ["jocor"]}
    path = write_sweep(tmp_path, "mixed", axes, epochs=1)
    proc = run_sweep(path, "--procs", "2", "--gpus", "none", check_rc=1)
    assert "1 done, 1 failed" in proc.stdout
    failed = [l for l in proc.stdout.splitlines() if l.startswith("sweep: failed: gone-jocor")]
    assert failed and "exit code 2" in failed[0] and "missing" in failed[0], proc.stdout
    assert (tmp_path / "mixed" / "good-jocor" / "metrics.jsonl").is_file()


# --- the table -------------------------------------------------------------------------------------

def _rows(rng, epochs):
    return [{"epoch": e, "test_acc1": round(rng.uniform(50, 90), 3), "test_acc2": round(rng.uniform(50, 90), 3),
             "label_precision": round(rng.uniform(0.5, 1.0), 4)} for e in range(1, epochs + 1)]


def test_report_mean_and_std_match_a_hand_computation(tmp_path):
    import random
    rng = random.Random(0)
    axes = {"setting": {"sym20": {"noise.rate": 0.2}}, "method.name": ["standard", "jocor"], "train.seed": [1, 2, 3]}
    path = write_sweep(tmp_path, "table", axes, epochs=12, paper={"sym20": {"jocor": 98.06, "standard": 79.56}})
    written = {}
    for run in load_sweep(path).runs:
        rows = _rows(rng, 5 if run.name == "sym20-standard-seed3" else 12)  # one run still going
        run.dir.mkdir(parents=True)
        (run.dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
        written[run.name] = rows
    out = tmp_path / "out"
    assert report.main(["--sweep", str(path), "--out", str(out), "--no-plots"]) == 0

    def last10(rows):
        return statistics.fmean((r["test_acc1"] + r["test_acc2"]) / 2 for r in rows[-10:])
    jocor = [last10(written[f"sym20-jocor-seed{s}"]) for s in (1, 2, 3)]
    standard = [last10(written[f"sym20-standard-seed{s}"]) for s in (1, 2)]  # seed 3 is unfinished
    best = [max(max(r["test_acc1"], r["test_acc2"]) for r in written[f"sym20-jocor-seed{s}"]) for s in (1, 2, 3)]
    table = {r["method"]: r for r in csv.DictReader(io.StringIO((out / "table.csv").read_text()))}
    assert float(table["jocor"]["last10_mean"]) == pytest.approx(statistics.fmean(jocor), abs=1e-4)
    assert float(table["jocor"]["last10_std"]) == pytest.approx(statistics.stdev(jocor), abs=1e-4)
    assert float(table["jocor"]["best_mean"]) == pytest.approx(statistics.fmean(best), abs=1e-4)
    assert float(table["standard"]["last10_mean"]) == pytest.approx(statistics.fmean(standard), abs=1e-4)
    assert (table["standard"]["runs_finished"], table["standard"]["runs_unfinished"]) == ("2", "1")
    md = (out / "table.md").read_text()
    jocor_cell = f"{statistics.fmean(jocor):.2f} ± {statistics.stdev(jocor):.2f}"
    standard_cell = f"{statistics.fmean(standard):.2f} ± {statistics.stdev(standard):.2f} (+1 unfinished)"
    assert f"| dataset | setting | Standard | JoCoR |\n|---|---|---:|---:|\n| MNIST | sym20 | {standard_cell} | {jocor_cell} |" in md
    assert "| | sym20, paper | 79.56 | 98.06 |" in md
    # Nothing finished: the cell says where the run stands instead of a number.
    (tmp_path / "table" / "sym20-standard-seed1" / "metrics.jsonl").write_text(
        "".join(json.dumps(r) + "\n" for r in written["sym20-standard-seed1"][:4]))
    (tmp_path / "table" / "sym20-standard-seed2").joinpath("metrics.jsonl").unlink()
    assert report.main(["--sweep", str(path), "--out", str(out), "--no-plots"]) == 0
    assert "| MNIST | sym20 | 2 unfinished, 1 not started |" in (out / "table.md").read_text()
    picked = tmp_path / "picked"
    assert report.main(["--sweep", str(path), "--out", str(picked), "--no-plots", "--where", "method.name=jocor"]) == 0
    assert f"| MNIST | sym20 | {jocor_cell} |" in (picked / "table.md").read_text()


def test_the_table_has_the_papers_six_methods_in_its_order(tmp_path):
    import random
    rng = random.Random(2)
    methods = load_sweep(REPO / "configs" / "sweeps" / "fashion_mnist.yaml").axes["method.name"]
    path = write_sweep(tmp_path, "six", {"setting": {"instance40": {"noise.type": "instance", "noise.rate": 0.4}},
                                         "method.name": methods, "train.seed": [1]}, epochs=21)
    last10 = {}  # 21 epochs: F-correction's default warm-up and refinements (10 + 2 x 5) must end before the last
    for run in load_sweep(path).runs:
        rows = _rows(rng, 21)
        run.dir.mkdir(parents=True)
        (run.dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
        last10[run.method] = statistics.fmean((r["test_acc1"] + r["test_acc2"]) / 2 for r in rows[-10:])
    out = tmp_path / "out"
    assert report.main(["--sweep", str(path), "--out", str(out), "--no-plots"]) == 0
    md = (out / "table.md").read_text()
    cells = " | ".join(f"{last10[m]:.2f}" for m in methods)
    assert (f"| dataset | setting | Standard | F-correction | Decoupling | Co-teaching | Co-teaching+ | JoCoR |\n"
            f"|---|---|---:|---:|---:|---:|---:|---:|\n| MNIST | instance40 | {cells} |") in md


@pytest.mark.slow
def test_report_plots_a_sweep(tmp_path):
    pytest.importorskip("matplotlib")
    import random
    rng = random.Random(1)
    path = write_sweep(tmp_path, "plots", {"method.name": ["jocor", "standard"], "train.seed": [1, 2]}, epochs=4)
    for run in load_sweep(path).runs:
        run.dir.mkdir(parents=True)
        (run.dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in _rows(rng, 4)))
    proc = run_python(["-m", "jocor_ddp.report", "--sweep", str(path)])
    for what in ("test_accuracy", "label_precision"):
        data = (tmp_path / "plots" / "report" / f"mnist_all_{what}.png").read_bytes()
        assert data.startswith(b"\x89PNG") and len(data) > 5000
    assert "wrote" in proc.stdout


# --- the Slurm array script --------------------------------------------------------------------------

FAKE_PYTHON = """#!/usr/bin/env bash
echo "python $*" >> "$FAKE_LOG"
trap 'echo "sweep got SIGTERM" >> "$FAKE_LOG"; kill $!; exit 0' TERM
sleep 60 &
echo "running" >> "$FAKE_LOG"
wait $!
"""
FAKE_SCONTROL = """#!/usr/bin/env bash
echo "scontrol $*" >> "$FAKE_LOG"
"""


def test_sweep_sbatch_runs_its_array_index_and_requeues_near_the_time_limit(tmp_path):
    bin_dir = fake_bin(tmp_path / "bin", {"python": FAKE_PYTHON, "scontrol": FAKE_SCONTROL})
    log = tmp_path / "log"
    env = {**child_env(), "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}", "FAKE_LOG": str(log),
           "PYTHON": str(bin_dir / "python"), "SLURM_ARRAY_TASK_ID": "5", "SLURM_JOB_ID": "777",
           "SLURM_ARRAY_JOB_ID": "770"}
    proc = subprocess.Popen(["bash", "launch/sweep.sbatch", "configs/sweeps/fashion_mnist.yaml", "--runs-per-gpu", "1"],
                            cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    try:
        deadline = time.monotonic() + 30
        while not (log.exists() and "running" in log.read_text()):
            assert time.monotonic() < deadline and proc.poll() is None, "the sweep never started"
            time.sleep(0.1)
        proc.send_signal(signal.SIGUSR1)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    lines = log.read_text().splitlines()
    assert shlex.split(lines[0]) == ["python", "-m", "jocor_ddp.sweep", "configs/sweeps/fashion_mnist.yaml",
                                     "--runs-per-gpu", "1", "--index", "5"]
    assert "sweep got SIGTERM" in lines and "scontrol requeue 777" in lines
    assert proc.returncode == 0
