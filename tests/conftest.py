import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

# tests/helpers.py is imported by name from every test module.
sys.path.insert(0, str(Path(__file__).resolve().parent))


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
