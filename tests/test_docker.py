"""The Docker image, built and run for real: train in a container, stop it with `docker stop`,
resume in the next one. Needs a Docker engine (`bash .ci/run` starts one); without it the
tests are skipped and say so, and with JOCOR_DOCKER_REQUIRED=1 they fail instead.

No registry but PyPI is reachable here, so the image is built FROM a local stand-in for
pytorch/pytorch made by tests/docker/build_test_base.sh (Debian, Python, torch from this
machine's wheels); the Dockerfile itself is the real one, with only its BASE_IMAGE argument set.
The containers train on Fashion-MNIST on the CPU, two torchrun workers, one short epoch."""

from __future__ import annotations

import os
import subprocess
import time
from pathlib import Path

import pytest
import torch

from helpers import FASHION_MNIST, REPO, metric_rows
from jocor_ddp.checkpoint import list_checkpoints
from jocor_ddp.state import read_state

pytestmark = [pytest.mark.docker, pytest.mark.slow]

BASE = os.environ.get("JOCOR_TEST_BASE", "jocor-test-base:local")
IMAGE = "jocor-ddp:test"
CONFIG = "configs/fashion_mnist_sym50.yaml"
# One short epoch: 16,000 samples in 125 global steps of 128, a checkpoint every 10 steps
# (the test waits for the first one to know that the epoch has begun before it stops the job).
SUBSET, BATCH, EVERY = 16000, 128, 10
STEPS = SUBSET // BATCH
OVERRIDES = ["data.root=/data", "train.epochs=1", f"data.train_subset={SUBSET}", "data.test_subset=2000",
             f"checkpoint.every_steps={EVERY}", "checkpoint.keep=50", "log.progress=never"]
README_FILES = {"config.yaml", "noise.json", "metrics.jsonl", "checkpoints"}
# The user the containers run as. As root (CI), an unprivileged uid without an entry in the
# image's /etc/passwd stands in for the host user, as Kubernetes and OpenShift run them.
UID, GID = (os.getuid(), os.getgid()) if os.getuid() != 0 else (4242, 4242)


def docker(*args: str, timeout: float = 300, check: bool = True) -> subprocess.CompletedProcess:
    proc = subprocess.run(["docker", *args], capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"docker {' '.join(args)} exited {proc.returncode}\n--- stdout\n"
                             f"{proc.stdout[-4000:]}\n--- stderr\n{proc.stderr[-6000:]}")
    return proc


@pytest.fixture(scope="module")
def image():
    """The stand-in base (reused when it exists), then the real Dockerfile on top of it."""
    subprocess.run(["bash", str(REPO / "tests/docker/build_test_base.sh")], check=True, timeout=1800,
                   env={**os.environ, "BASE_TAG": BASE})
    docker("build", "--network", "host", "--build-arg", f"BASE_IMAGE={BASE}", "-t", IMAGE, str(REPO),
           timeout=1200)
    return IMAGE


@pytest.fixture()
def containers():
    names = []
    yield lambda name: names.append(f"jocor-test-{os.getpid()}-{name}") or names[-1]
    for name in names:
        docker("rm", "-f", name, check=False)


@pytest.fixture(scope="module")
def data(fashion_mnist):
    root = fashion_mnist(SUBSET, 2000)  # without the real set: Fashion-MNIST's files, generated
    if root != FASHION_MNIST:
        root.chmod(0o755)  # pytest makes it 0700: readable by the container's user too
    return root


def _run_args(name: str, run_name: str, data: Path, runs: Path, *, detach: bool = False) -> list[str]:
    return ["run", *(["-d"] if detach else []), "--name", name, "--user", f"{UID}:{GID}",
            "-e", "NPROC_PER_NODE=2", "-e", "OMP_NUM_THREADS=1", "-e", f"RUN_NAME={run_name}",
            "-v", f"{data}:/data:ro", "-v", f"{runs}:/runs", IMAGE, "launch/local.sh", CONFIG, *OVERRIDES]


def _final_state(run_dir: Path) -> dict:
    state = read_state(list_checkpoints(run_dir / "checkpoints")[0])
    assert (state.epoch, state.global_step) == (1, STEPS), "the run did not end its epoch"
    return state.model


def _logs(name: str) -> str:
    proc = docker("logs", name, check=False)
    return proc.stdout + proc.stderr


def test_train_stop_and_resume_in_containers(image, data, tmp_path, containers):
    runs = tmp_path / "runs"
    runs.mkdir()
    os.chown(runs, UID, GID)

    # 1. Uninterrupted: the run folder appears on the host, with the README's files, all the user's.
    first = containers("uninterrupted")
    proc = docker(*_run_args(first, "uninterrupted", data, runs), timeout=600, check=False)
    assert proc.returncode == 0, _logs(first)[-8000:]
    reference = runs / "uninterrupted"
    assert README_FILES <= {p.name for p in reference.iterdir()}, sorted(p.name for p in reference.iterdir())
    not_users = [str(p) for p in [reference, *reference.rglob("*")] if (p.stat().st_uid, p.stat().st_gid) != (UID, GID)]
    assert not not_users, f"not owned by {UID}:{GID}: {not_users}"
    assert [r["epoch"] for r in metric_rows(reference)] == [1]

    # 2. The same command, stopped by `docker stop` once the epoch is under way.
    second = containers("stopped")
    docker(*_run_args(second, "stopped", data, runs, detach=True))
    stopped = runs / "stopped"
    deadline = time.monotonic() + 300
    while not (stopped / "checkpoints" / f"step-{EVERY}.pt").exists():
        state = docker("inspect", "-f", "{{.State.Running}}", second).stdout.strip()
        assert state == "true" and time.monotonic() < deadline, _logs(second)[-8000:]
        time.sleep(0.05)
    start = time.monotonic()
    docker("stop", second, timeout=60)  # SIGTERM to torchrun, SIGKILL after docker's 10 s
    took = time.monotonic() - start
    exit_code = docker("inspect", "-f", "{{.State.ExitCode}}", second).stdout.strip()
    logs = _logs(second)
    # 143 (128 + SIGTERM), from launch/multinode.sh: stopped, not failed, and not SIGKILLed (137).
    assert exit_code == "143" and took < 10, f"exit {exit_code} after {took:.1f} s\n{logs[-8000:]}"
    assert "checkpoint written; rerun the same command to continue" in logs, logs[-8000:]
    state = read_state(list_checkpoints(stopped / "checkpoints")[0])
    assert EVERY <= state.global_step < STEPS and state.epoch == 0, "not a mid-epoch checkpoint"
    print(f"docker stop returned in {took:.1f} s: exit {exit_code}, checkpoint at step {state.global_step}/{STEPS}")
    assert not (stopped / "metrics.jsonl").exists() or not (stopped / "metrics.jsonl").read_text().strip()

    # 3. A third container with the same command resumes and ends where the first one did.
    third = containers("resumed")
    proc = docker(*_run_args(third, "stopped", data, runs), timeout=600, check=False)
    logs = _logs(third)
    assert proc.returncode == 0, logs[-8000:]
    assert f"resumed from /runs/stopped/checkpoints/step-{state.global_step}.pt" in logs, logs[-8000:]
    assert metric_rows(stopped) == metric_rows(reference)
    a, b = _final_state(stopped), _final_state(reference)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_default_command_prints_help_as_uid_1000(image, tmp_path):
    proc = docker("run", "--rm", IMAGE, timeout=120)
    assert proc.stdout.startswith("usage: python -m jocor_ddp.train"), proc.stdout + proc.stderr
    # Without --user: uid 1000, which may write /runs (the image's own folder, or a volume).
    proc = docker("run", "--rm", IMAGE, "sh", "-c", "id -u; id -g; touch /runs/x && echo writable",
                  timeout=120)
    assert proc.stdout.split() == ["1000", "1000", "writable"], proc.stdout + proc.stderr

