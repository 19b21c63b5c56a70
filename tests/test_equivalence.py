"""W ranks at global batch B must train the same model as one process at batch B."""

import numpy as np
import pytest
import torch

from helpers import run_torchrun, train_args

pytestmark = pytest.mark.slow  # four torchrun runs


def _run(tmp_path, nproc, data, selection="global", *extra, name="jocor"):
    out = tmp_path / f"{name}-{selection}-{nproc}.pt"
    run_torchrun(nproc, train_args(data, tmp_path / f"run-{name}-{selection}-{nproc}", "model.arch=mlp",
                                   "noise.type=symmetric", "noise.rate=0.5", "method.num_gradual=2",
                                   "method.co_lambda=0.5", "train.batch_size=64", "train.epochs=3",
                                   f"selection={selection}", *extra,
                                   entry=("tests/workers/equivalence.py", str(out))),
                 timeout=240)
    return torch.load(out, weights_only=True)


@pytest.fixture(scope="module")
def data(mnist_data):
    return mnist_data(512, 64)


def test_two_ranks_equal_one_process(tmp_path, data):
    one = _run(tmp_path, 1, data)
    two = _run(tmp_path, 2, data)
    assert len(one["kept"]) == len(two["kept"]) == 24
    for step, (a, b) in enumerate(zip(one["kept"], two["kept"])):
        assert torch.equal(a, b), f"step {step}: different samples kept"
    # From epoch 2 on the forget rate is 0.5: exactly floor(0.5 * 64) samples are kept.
    assert all(len(k) == 32 for k in one["kept"][8:])
    for name, p in one["state"].items():
        torch.testing.assert_close(two["state"][name], p, atol=1e-5, rtol=0, msg=name)


def test_local_selection_differs_from_global(tmp_path, data):
    """The naive per-rank selection keeps different samples: the test above can fail."""
    glob = _run(tmp_path, 2, data, "global")
    local = _run(tmp_path, 2, data, "local")
    differing = sum(not torch.equal(a, b) for a, b in zip(glob["kept"], local["kept"]))
    assert differing > 0
    assert all(len(k) == 32 for k in local["kept"][8:])


def test_fcorrection_two_ranks_equal_one_process(tmp_path, data):
    """No selection: each rank's share of the gradient of the corrected loss, averaged by DDP, is
    the whole batch's (a random T with zeros, from a file)."""
    rng = np.random.default_rng(0)
    t = rng.random((10, 10)) * (rng.random((10, 10)) < 0.5) + np.eye(10)
    np.save(tmp_path / "t.npy", t / t.sum(1, keepdims=True))
    extra = ("method.name=fcorrection", f"method.transition={tmp_path / 't.npy'}")
    one = _run(tmp_path, 1, data, "global", *extra, name="fcorrection")
    two = _run(tmp_path, 2, data, "global", *extra, name="fcorrection")
    assert len(one["kept"]) == len(two["kept"]) == 24 and all(len(k) == 64 for k in one["kept"] + two["kept"])
    for name, p in one["state"].items():
        torch.testing.assert_close(two["state"][name], p, atol=1e-5, rtol=0, msg=name)
    standard = _run(tmp_path, 1, data, "global", "method.name=standard", name="standard")
    assert any((standard["state"][k] - p).abs().max() > 1e-3 for k, p in one["state"].items())  # T mattered
