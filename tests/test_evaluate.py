"""evaluate: the accuracies of a real checkpoint equal the trainer's own evaluation of it,
the confusion matrix covers the test split, and errors are one line naming the file."""

import csv
import json

import pytest
import torch

from helpers import metric_rows, run_python
from tiny_run import EPOCHS, N_TEST, final_checkpoint

from jocor_ddp import evaluate


@pytest.fixture(scope="module")
def run(tiny_run):
    return tiny_run


def test_accuracy_equals_the_last_metrics_row(run, tmp_path):
    ckpt = final_checkpoint(run)
    proc = run_python(["-m", "jocor_ddp.evaluate", str(ckpt), "--out", str(tmp_path), "--device", "cpu"])
    result = json.loads((tmp_path / "evaluate-test.json").read_text())
    last = metric_rows(run, keep_time=True)[-1]
    assert last["epoch"] == EPOCHS and result["epoch"] == EPOCHS
    # The final checkpoint is written right after the last epoch's evaluation: the same numbers.
    assert result["acc1"] == last["test_acc1"]
    assert result["acc2"] == last["test_acc2"]
    assert result["samples"] == N_TEST
    assert f"net1 {last['test_acc1']:.2f}%" in proc.stdout

    with open(tmp_path / "confusion-test.csv", newline="") as f:
        rows = list(csv.reader(f))
    assert rows[0] == ["true \\ predicted", *result["classes"]]
    assert [r[0] for r in rows[1:]] == result["classes"]
    matrix = torch.tensor([[int(v) for v in r[1:]] for r in rows[1:]])
    assert matrix.shape == (10, 10)
    assert int(matrix.sum()) == N_TEST
    assert 100.0 * int(matrix.diag().sum()) / N_TEST == pytest.approx(result["acc_avg"], abs=1e-9)


def test_averaged_prediction_is_the_mean_softmax(run, tmp_path, monkeypatch):
    """Make net 2 certain of class 0 everywhere: the average then follows net 2 unless net 1
    is more certain, so acc_avg must differ from a 'net 1 only' or 'logit mean' reading."""
    from jocor_ddp import restore as restore_mod
    real = restore_mod.restore

    def rigged(*args, **kwargs):
        r = real(*args, **kwargs)
        with torch.no_grad():
            r.pair.net2.fc2.weight.zero_()
            r.pair.net2.fc2.bias.copy_(torch.tensor([50.0] + [0.0] * 9))
        return r
    monkeypatch.setattr(evaluate, "restore", rigged)
    assert evaluate.main([str(final_checkpoint(run)), "--out", str(tmp_path), "--device", "cpu"]) == 0
    result = json.loads((tmp_path / "evaluate-test.json").read_text())
    with open(tmp_path / "confusion-test.csv", newline="") as f:
        rows = list(csv.reader(f))
    class0 = sum(int(r[0 + 1]) for r in rows[1:])
    assert class0 == N_TEST  # every averaged prediction is class 0: net 2's softmax dominates
    assert result["acc2"] == result["acc_avg"]


def test_errors_name_the_file(run, tmp_path, capsys):
    missing = tmp_path / "nope.pt"
    assert evaluate.main([str(missing)]) == 2
    assert str(missing) in capsys.readouterr().err

    unsafe = tmp_path / "unsafe.pt"
    torch.save({"format": 1, "payload": torch.nn.Linear(2, 2)}, unsafe)  # a module needs a full unpickler
    assert evaluate.main([str(unsafe)]) == 2
    err = capsys.readouterr().err
    assert str(unsafe) in err and "refused" in err

    no_data = tmp_path / "no-mnist"
    assert evaluate.main([str(final_checkpoint(run)), "--root", str(no_data), "--device", "cpu",
                          "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and str(no_data) in err and len(err.strip().splitlines()) == 1
