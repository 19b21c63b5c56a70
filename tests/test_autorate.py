"""method.forget_rate: auto in real runs: the estimate on data with known noise, the same
estimate under 1 and 2 ranks, the fallback line, and the errors that name the key.
(Resume with auto, mid-epoch, is in test_resume.py: its runs all estimate tau.)"""

import importlib.util
import json
import sys

import numpy as np
import pytest

from helpers import metric_rows, needs_fashion_mnist, run_python, run_torchrun, train_args

HAVE_MATPLOTLIB = importlib.util.find_spec("matplotlib") is not None
BASE = ["model.arch=mlp", "train.batch_size=32", "method.num_gradual=3", "method.co_lambda=0.5"]


@pytest.fixture(scope="module")
def data(mnist_data):
    return mnist_data(640, 64)


def _train(data, run_dir, *extra, nproc=1, check=True):
    return run_torchrun(nproc, train_args(data, run_dir, *BASE, *extra), check=check, timeout=240)


@pytest.mark.slow
@needs_fashion_mnist
@pytest.mark.parametrize("noise,epochs", [(["noise.type=none", "noise.rate=0"], 4), (["noise.rate=0.3"], 3),
                                          (["noise.rate=0.6"], 3), (["noise.type=pairflip", "noise.rate=0.45"], 3)])
def test_estimate_noise_finds_the_rate_of_known_noise(tmp_path, noise, epochs):
    """Real images (a 6,000-sample subset of Fashion-MNIST, 3 epochs): the estimate is
    within 0.08 of the drawn labels' share of wrong ones, and nearer to it than the naive
    share both networks predict against. (The full set over 10 epochs: within 0.05,
    docs/methods.md.) Clean labels take a fourth epoch: what a 3-epoch MLP confuses
    (shirts, T-shirts, pullovers, coats) reads as noise, 0.087 on this project's CPU machine
    (AMD EPYC, torch 2.14.1), 0.068 after 4 epochs."""
    out = tmp_path / "estimate.json"
    proc = run_python(["-m", "jocor_ddp.estimate_noise", "--config", "configs/fashion_mnist_sym50.yaml",
                       "data.train_subset=6000", "train.batch_size=64", "log.progress=never",
                       f"method.num_gradual={epochs}", *noise, "--out", str(out)], timeout=240)
    result = json.loads(out.read_text())
    assert len(result["epochs"]) == epochs and result["epochs"][-1]["final"]
    line = estimate_line(proc.stdout)
    assert line.startswith(f"noise rate estimate: {result['estimate']:.3f}")
    actual = float(line.split("actual ")[1].split()[0])  # the drawn labels' share of wrong ones
    assert abs(result["estimate"] - actual) <= 0.08, proc.stdout
    assert abs(result["estimate"] - actual) < abs(result["epochs"][-1]["disagreement"] - actual), proc.stdout


def estimate_line(stdout: str) -> str:
    """The summary line (the transition matrices follow it)."""
    return next(line for line in stdout.splitlines() if line.startswith("noise rate"))


def printed_matrix(lines: list[str], heading: str) -> np.ndarray:
    """The 10 rows printed under the line that starts with ``heading``."""
    at = next(i for i, line in enumerate(lines) if line.startswith(heading))
    return np.array([[float(v) for v in line.split(":")[1].split()] for line in lines[at + 1:at + 11]])


def test_estimate_noise_command_on_generated_data(data, tmp_path):
    """The quick check of ``python -m jocor_ddp.estimate_noise`` (one process, generated
    data, the overrides of the runs below): it trains only the estimator's epochs
    (num_gradual=3), writes every epoch's estimate, and prints the final, decided one; then
    the transition matrices of the last pass, printed with 3 decimals, and in the JSON with
    their mean row L1 distances to the drawn labels' empirical matrix; and the heatmap."""
    from jocor_ddp.transition import mean_row_l1
    out, heatmap = tmp_path / "estimate.json", tmp_path / "t.png"
    proc = run_python(["-m", "jocor_ddp.estimate_noise", "data.name=mnist", f"data.root={data}", *BASE,
                       "noise.rate=0.4", "train.epochs=4", "method.refine_rounds=2", "method.refine_epochs=1",
                       "--out", str(out), "--run-dir", str(tmp_path / "run"),
                       *(["--heatmap", str(heatmap)] if HAVE_MATPLOTLIB else [])], timeout=240)
    result = json.loads(out.read_text())
    assert [e["epoch"] for e in result["epochs"]] == [1, 2, 3] and result["epochs"][-1]["final"]
    assert result["epochs"][-1]["undecided"] is None and 0 < result["estimate"] < 1
    assert result["estimate"] == result["epochs"][-1]["forget_rate_estimate"]
    line = estimate_line(proc.stdout)
    assert line.startswith(f"noise rate estimate: {result['estimate']:.3f}"), proc.stdout
    actual = float(line.split("actual ")[1].split()[0])
    assert abs(actual - 0.4) < 0.05, proc.stdout  # its accuracy: the Fashion-MNIST test above
    assert not (tmp_path / "run" / "checkpoints").exists()  # no checkpoint: a short run, not a training run

    found = result["transition"]
    assert found["epoch"] == 3 and found["percentile"] == 97.0 and found["anchor_share"] == 0.25
    noise = json.loads((tmp_path / "run" / "noise.json").read_text())
    assert found["empirical"] == noise["empirical_transition"] and found["requested"] == noise["transition"]
    lines = proc.stdout.splitlines()
    for name, heading in (("anchor_set", "anchor set ("), ("patrini", "Patrini (")):
        matrix = np.array(found[name]["matrix"])
        assert matrix.shape == (10, 10) and np.allclose(matrix.sum(1), 1.0)
        assert found[name]["error"] == pytest.approx(mean_row_l1(matrix, found["empirical"]), abs=1e-12)
        head = next(line for line in lines if line.startswith(heading))
        assert head.endswith(f": mean row L1 to the empirical T {found[name]['error']:.3f}"), proc.stdout
        np.testing.assert_array_equal(printed_matrix(lines, heading), np.round(matrix, 3))
    np.testing.assert_array_equal(printed_matrix(lines, "empirical ("), np.round(found["empirical"], 3))
    assert lines.index(line) < lines.index(next(x for x in lines if x.startswith("anchor set (")))
    # The refinement: a fresh pair trained with F-correction on the anchor set's T, read again
    # after each round (a round's undecided rows keep the T it trained with).
    refined = result["refinements"]
    assert [(r["refinement"], r["epoch"]) for r in refined] == [(1, 1), (2, 2)]
    for r in refined:
        matrix = np.array(r["anchor_set"]["matrix"])
        assert np.allclose(matrix.sum(1), 1.0) and r["empirical"] == found["empirical"]
        assert r["anchor_set"]["error"] == pytest.approx(mean_row_l1(matrix, found["empirical"]), abs=1e-12)
        rounds = next(x for x in lines if x.startswith(f"refinement {r['refinement']}/2: 1 epoch(s) of F-correction"))
        assert f"mean row L1 to the empirical T {r['anchor_set']['error']:.3f}" in rounds, proc.stdout
    assert not np.array_equal(refined[0]["anchor_set"]["matrix"], found["anchor_set"]["matrix"])
    np.testing.assert_array_equal(printed_matrix(lines, "refined ("), np.round(refined[-1]["anchor_set"]["matrix"], 3))
    if HAVE_MATPLOTLIB:
        assert heatmap.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and f"heatmap: {heatmap}" in proc.stdout


def test_a_heatmap_without_matplotlib_is_one_line_before_any_training(data, tmp_path, monkeypatch, capsys):
    from jocor_ddp import estimate_noise
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib raises ImportError
    code = estimate_noise.main(["data.name=mnist", f"data.root={data}", *BASE, "--heatmap", str(tmp_path / "t.png"),
                                "--run-dir", str(tmp_path / "run")])
    err = capsys.readouterr().err
    assert code == 2 and err == "error (rank 0): --heatmap needs matplotlib: pip install -e .[report]\n"
    assert not (tmp_path / "run" / "config.yaml").exists()  # refused before the run began


@pytest.mark.slow
def test_one_process_and_two_ranks_reach_the_same_estimate(data, tmp_path):
    runs = {}
    for nproc in (1, 2):
        _train(data, tmp_path / f"run{nproc}", "noise.rate=0.4", "method.forget_rate=auto", "train.epochs=4",
               nproc=nproc)
        runs[nproc] = metric_rows(tmp_path / f"run{nproc}")
    estimates = [[r.get("forget_rate_estimate") for r in runs[n]] for n in (1, 2)]
    assert estimates[0] == estimates[1]
    # Estimated at the end of epochs 1-3 (num_gradual=3), then final: no row after. The final
    # estimate is decided, so the ranks compare numbers, not the fallback.
    assert runs[1][2]["noise_estimate"]["undecided"] is None
    assert all(isinstance(e, float) for e in estimates[0][:3]) and estimates[0][3] is None
    assert [r["noise_estimate"] for r in runs[1][:3]] == [r["noise_estimate"] for r in runs[2][:3]]
    assert [r["forget_rate"] for r in runs[1]] == [r["forget_rate"] for r in runs[2]]
    # The rate the step used follows the estimate: the ramp (num_gradual=3) towards it.
    tau = estimates[0][2]
    assert runs[1][3]["forget_rate"] == tau and 0 < tau < 1
    assert runs[1][2]["forget_rate"] == estimates[0][1]


@pytest.mark.slow
def test_undecided_estimate_says_so_and_uses_the_fallback(data, tmp_path):
    """A label file that gives every sample class 0: the networks predict one class, so the
    estimator cannot decide. noise.type=file also makes auto the default."""
    labels = tmp_path / "labels.npy"
    np.save(labels, np.zeros(640, dtype=np.int64))
    proc = _train(data, tmp_path / "run", "noise.type=file", f"noise.file={labels}", "train.epochs=2",
                  "method.num_gradual=2", "method.forget_rate_fallback=0.25")
    assert ("warning: forget_rate auto: cannot estimate the noise rate: a single mode: the networks predict "
            "class 0 for 100.0% of the samples") in proc.stdout
    assert "using the fallback method.forget_rate_fallback=0.25" in proc.stdout
    rows = metric_rows(tmp_path / "run")
    assert rows[1]["forget_rate"] == 0.25 and rows[0]["noise_estimate"]["fallback"] == 0.25
    assert rows[0]["noise_estimate"]["undecided"].startswith("a single mode")


@pytest.mark.slow
def test_too_few_samples_for_the_estimator_is_an_error_on_every_rank(data, tmp_path):
    proc = _train(data, tmp_path / "run", "method.forget_rate=auto", "data.train_subset=150", nproc=2, check=False)
    assert proc.returncode != 0
    for rank in (0, 1):
        assert (f"error (rank {rank}): method.forget_rate: auto needs at least 20 training samples per class "
                f"to estimate the noise rate (200 for 10 classes); this run trains on 150") in proc.stderr


@pytest.mark.slow
def test_held_out_samples_do_not_count_towards_the_estimators_minimum(data, tmp_path):
    """220 samples, 22 held out for validation: the estimate would score 198, under 200."""
    proc = _train(data, tmp_path / "run", "method.forget_rate=auto", "data.train_subset=220",
                  "data.noisy_val_fraction=0.1", check=False)
    assert proc.returncode != 0
    assert "(200 for 10 classes); this run trains on 198" in proc.stderr


@pytest.mark.slow
def test_auto_with_a_method_that_takes_no_forget_rate_is_an_error(data, tmp_path):
    proc = _train(data, tmp_path / "run", "method.forget_rate=auto", "method.name=standard", check=False)
    assert proc.returncode != 0
    assert "method.forget_rate: auto: method.name=standard selects no small-loss share" in proc.stderr
