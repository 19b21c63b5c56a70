"""Two nodes on one machine: two torchrun agents with one worker each join a c10d
rendezvous on 127.0.0.1 and train exactly what one node with two workers trains.

The c10d rendezvous numbers the nodes in the order they join, so either agent may host
rank 0; the data a rank sees depends only on its rank, so the result must not change."""

import os
import signal
import subprocess
import sys

import pytest

from helpers import REPO, child_env, free_port, metric_rows, run_torchrun, train_args

pytestmark = pytest.mark.slow  # two torchrun agents and a 2-worker run per test
TIMEOUT_S = 150


CONFIG = "configs/fashion_mnist_sym50.yaml"


def _overrides(data) -> list[str]:
    # num_gradual=0: the full forget rate from the first step, so the global small-loss
    # selection over both nodes' shares of each batch decides what is trained on.
    return ["data.name=mnist", f"data.root={data}", "method.num_gradual=0", "train.batch_size=32",
            "train.epochs=1", "log.progress=never"]


def _train_args(data, run_dir) -> list[str]:
    return train_args(None, run_dir, *_overrides(data), config=CONFIG)


def _run_nodes(commands: list[list[str]], envs: list[dict]) -> list[str]:
    """Start one agent per node at once; on a failure or a hang kill them all."""
    procs = [subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              text=True, start_new_session=True) for cmd, env in zip(commands, envs)]
    try:
        outputs = [p.communicate(timeout=TIMEOUT_S)[0] for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)
                p.wait()
    for node, (p, out) in enumerate(zip(procs, outputs)):
        assert p.returncode == 0, f"node {node} exited {p.returncode}\n{out[-6000:]}"
    return outputs


@pytest.fixture(scope="module")
def data(mnist_data):
    return mnist_data(512, 200)


@pytest.fixture(scope="module")
def one_node(tmp_path_factory, data):
    run_dir = tmp_path_factory.mktemp("one-node")
    run_torchrun(2, _train_args(data, run_dir), timeout=TIMEOUT_S)
    rows = metric_rows(run_dir)
    assert len(rows) == 1
    # Half of every global batch of 32 is left out: the selection is active.
    assert rows[0]["kept"] == 256 and rows[0]["steps"] == 16
    return rows


def _check(outputs, run_dir, one_node):
    assert sum("2 rank(s)" in out for out in outputs) == 1, "rank 0 reports a world of 2, once"
    assert metric_rows(run_dir) == one_node


def test_two_torchrun_nodes_equal_one_node_with_two_workers(tmp_path, data, one_node):
    port = free_port()
    run_dir = tmp_path / "run"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes=2", "--nproc-per-node=1",
           "--rdzv-backend=c10d", f"--rdzv-endpoint=127.0.0.1:{port}", "--rdzv-id=two-nodes",
           "--max-restarts=0", *_train_args(data, run_dir)]
    outputs = _run_nodes([cmd, cmd], [child_env(), child_env()])
    _check(outputs, run_dir, one_node)


def test_multinode_sh_on_two_nodes_equals_one_node(tmp_path, data, one_node):
    """The same through launch/multinode.sh, driven by the variables a scheduler sets."""
    port = free_port()
    env = child_env(PATH=os.path.dirname(sys.executable) + os.pathsep + os.environ["PATH"],
                    NNODES="2", NPROC_PER_NODE="1", RDZV_ENDPOINT=f"127.0.0.1:{port}",
                    RDZV_ID="two-nodes-sh", MAX_RESTARTS="0", RUNS=str(tmp_path), RUN_NAME="job")
    cmd = ["bash", "launch/multinode.sh", CONFIG, *_overrides(data)]
    outputs = _run_nodes([cmd, cmd], [env, env])
    _check(outputs, tmp_path / "job", one_node)
