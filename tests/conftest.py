import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

# tests/helpers.py is imported by name from every test module.
sys.path.insert(0, str(Path(__file__).resolve().parent))

from helpers import FASHION_MNIST, HAVE_FASHION_MNIST, make_mnist  # noqa: E402


# --- shared data: generated once per session, read-only for the tests ------------------------

@pytest.fixture(scope="session")
def mnist_data(tmp_path_factory):
    """``mnist_data(n_train, n_test)``: the generated MNIST-format set of that size (helpers.make_mnist,
    seed 0, gzipped), made once per session and shared by every test that asks for that size.
    The same size is the same files, so tests that compare numbers keep their data; a test
    that damages or adds files works on its own copy."""
    made: dict[tuple[int, int], Path] = {}

    def get(n_train: int, n_test: int) -> Path:
        if (n_train, n_test) not in made:
            made[n_train, n_test] = make_mnist(tmp_path_factory.mktemp(f"mnist_{n_train}_{n_test}_"),
                                               n_train=n_train, n_test=n_test)
        return made[n_train, n_test]
    return get


@pytest.fixture(scope="session")
def fashion_mnist(mnist_data):
    """``fashion_mnist(n_train, n_test)``: the installed Fashion-MNIST (tests take a subset of it
    with data.train_subset / data.test_subset), or without it a generated set of that size in
    its format. Tests that need the real images use helpers.needs_fashion_mnist instead."""
    return lambda n_train, n_test: FASHION_MNIST if HAVE_FASHION_MNIST else mnist_data(n_train, n_test)


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory, mnist_data):
    """The run folder of tests/tiny_run.py's tiny training run, trained once per session."""
    from tiny_run import N_TEST, N_TRAIN, train_tiny_run
    return train_tiny_run(mnist_data(N_TRAIN, N_TEST), tmp_path_factory.mktemp("tiny_run") / "run")


def _docker_engine_missing() -> str | None:
    """Why no Docker engine answers here, or None when one does."""
    try:
        proc = subprocess.run(["docker", "info", "--format", "{{.ServerVersion}}"], capture_output=True,
                              text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"docker info: {exc}"
    return None if proc.returncode == 0 else f"docker info: {(proc.stderr.strip().splitlines() or ['failed'])[-1]}"


def pytest_collection_modifyitems(config, items):
    """Tests marked cuda need a CUDA device, tests marked docker a Docker engine: skipped, and
    said so, without one. JOCOR_DOCKER_REQUIRED=1 (set by .ci/run once it has started the
    engine) turns the docker tests' skip into a failure, so that they never pass unrun."""
    if not torch.cuda.is_available():
        skip = pytest.mark.skip(reason="needs a CUDA device")
        for item in items:
            if item.get_closest_marker("cuda"):
                item.add_marker(skip)
    docker_items = [item for item in items if item.get_closest_marker("docker")]
    if docker_items and os.environ.get("JOCOR_DOCKER_REQUIRED") != "1":
        missing = _docker_engine_missing()
        if missing:
            skip = pytest.mark.skip(reason=f"needs a Docker engine ({missing}); bash .ci/run starts one")
            for item in docker_items:
                item.add_marker(skip)


def pytest_terminal_summary(terminalreporter):
    """The count of tests/test_fuzz.py's malformed inputs, when it ran."""
    fuzz = sys.modules.get("fuzz_inputs")
    if fuzz is not None and any(c["tried"] for c in fuzz.TALLY.values()):
        terminalreporter.write_line(fuzz.summary())
