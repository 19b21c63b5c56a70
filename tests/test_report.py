"""report: the table's numbers from hand-written metrics (exactly), the PNGs from a real
run, the table without matplotlib, and errors that name the file and line."""

import json
import sys

import pytest
import yaml

from helpers import run_python
from tiny_run import metrics_rows, tiny_run

from jocor_ddp import report

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def write_run(folder, rows, method="jocor", noise=("symmetric", 0.5)):
    folder.mkdir(parents=True)
    (folder / "config.yaml").write_text(yaml.safe_dump(
        {"method": {"name": method}, "noise": {"type": noise[0], "rate": noise[1]}}))
    (folder / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return folder


def row(epoch, acc1, acc2, precision=None):
    return {"epoch": epoch, "lr": 0.001, "forget_rate": 0.1, "train_loss": 1.0,
            "label_precision": precision, "test_acc1": acc1, "test_acc2": acc2}


@pytest.fixture
def hand_runs(tmp_path):
    # 12 epochs: epoch e has test_acc1 = e, test_acc2 = e + 2 (mean e + 1); the last ten
    # (epochs 3..12) average 8.5. (All epochs would give 7.5, net 1 alone 7.5.)
    long = write_run(tmp_path / "long", [row(e, float(e), float(e + 2), precision=e / 16) for e in range(1, 13)])
    # 3 epochs (fewer than ten: all count), no clean labels; best = 91 (net 1, epoch 2).
    short = write_run(tmp_path / "short", [row(1, 50.0, 60.0), row(2, 91.0, 70.0), row(3, 80.0, 82.0)],
                      method="coteaching", noise=("pairflip", 0.45))
    return long, short


def test_table_from_hand_written_metrics(hand_runs, tmp_path, capsys):
    out = tmp_path / "out"
    assert report.main([*map(str, hand_runs), "--out", str(out), "--no-plots"]) == 0
    summary = json.loads((out / "report.json").read_text())
    assert summary[0]["last10_acc"] == 8.5
    assert summary[0]["best_acc"] == 14.0
    assert summary[0]["final_label_precision"] == 75.0
    assert summary[1]["last10_acc"] == pytest.approx((55.0 + 80.5 + 81.0) / 3, abs=1e-12)
    assert summary[1]["best_acc"] == 91.0
    assert summary[1]["final_label_precision"] is None
    table = (out / "report.md").read_text()
    assert "| long | jocor | symmetric 50% | 12 | 8.50 | 14.00 | 75.00 |" in table
    assert "| short | coteaching | pairflip 45% | 3 | 72.17 | 91.00 | n/a |" in table
    assert table in capsys.readouterr().out


def test_plots_and_table_from_a_real_run(tmp_path_factory, tmp_path):
    pytest.importorskip("matplotlib")
    run = tiny_run(tmp_path_factory)
    rows = metrics_rows(run)
    out = tmp_path / "report"
    proc = run_python(["-m", "jocor_ddp.report", str(run), "--out", str(out), "--acc", "both"])
    for name in ("test_accuracy.png", "label_precision.png"):
        data = (out / name).read_bytes()
        assert data.startswith(PNG_MAGIC) and len(data) > 5000, name
    expected = sum((r["test_acc1"] + r["test_acc2"]) / 2 for r in rows) / len(rows)
    assert json.loads((out / "report.json").read_text())[0]["last10_acc"] == pytest.approx(expected, abs=1e-12)
    line = f"| run | jocor | symmetric 50% | {len(rows)} | {expected:.2f} |"
    assert line in (out / "report.md").read_text() and line in proc.stdout


def test_without_matplotlib_the_table_is_still_written(hand_runs, tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib -> ImportError
    out = tmp_path / "out"
    assert report.main([*map(str, hand_runs), "--out", str(out)]) == 2
    assert "pip install -e .[report]" in capsys.readouterr().err
    assert "| long | jocor |" in (out / "report.md").read_text()
    assert not (out / "test_accuracy.png").exists()


@pytest.mark.parametrize("content, message", [
    (None, "metrics.jsonl: not found"),
    ("", "metrics.jsonl: empty"),
    ('{"epoch": 1, "test_acc1": 1, "test_acc2": 2}\n{"epoch": 2, "test_acc1": \n', "metrics.jsonl, line 2: not valid JSON"),
    ('{"epoch": 1, "test_acc1": 1, "test_acc2": 2}\n\n[1, 2]\n', "metrics.jsonl, line 3: expected a JSON object"),
    ('{"epoch": 1, "test_acc1": 1}\n', "metrics.jsonl, line 1: no number for test_acc2"),
])
def test_errors_name_the_file_and_line(tmp_path, capsys, content, message):
    run = write_run(tmp_path / "bad", [])
    if content is None:
        (run / "metrics.jsonl").unlink()
    else:
        (run / "metrics.jsonl").write_text(content)
    assert report.main([str(run), "--out", str(tmp_path / "out"), "--no-plots"]) == 2
    err = capsys.readouterr().err
    assert f"{run}/{message}" in err and len(err.strip().splitlines()) == 1
