import sys
from pathlib import Path

import pytest
import torch

# tests/helpers.py is imported by name from every test module.
sys.path.insert(0, str(Path(__file__).resolve().parent))


def pytest_collection_modifyitems(config, items):
    """Tests marked cuda need a CUDA device: skipped (and said so) without one."""
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if item.get_closest_marker("cuda"):
            item.add_marker(skip)
