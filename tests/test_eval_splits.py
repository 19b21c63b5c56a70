"""Evaluation splits named for what they are: a real (tiny) run on Clothing1M-layout shards
scores its clean val split and its test split after every epoch, and the held-out share of
its noisy training labels as noisy_val; each is named on the start-up line, on the epoch line
and in metrics.jsonl, and the evaluate command scores each split as the trainer did. Runs
written before the renames (tests/data/runs-725b923, written by commit 725b923 on generated
MNIST and Clothing1M-layout data: `data.val_fraction=0.2`, and `data.eval_split=val
data.val_fraction=0.25`) still read, in today's names, in report and in a resumed run."""

from __future__ import annotations

import contextlib
import importlib.util
import io
import json
import shutil
from pathlib import Path

import pytest
import yaml

from helpers import train_args
from shard_fixtures import clothing1m_shards

from jocor_ddp import evaluate, report
from jocor_ddp.checkpoint import list_checkpoints
from jocor_ddp.config import config_from_dict, load_config
from jocor_ddp.dist import DistContext
from jocor_ddp.runfolder import CONFIG, METRICS, read_metrics
from jocor_ddp.runlog import RunLog
from jocor_ddp.trainer import Trainer

OLD = Path(__file__).resolve().parent / "data" / "runs-725b923"
N_TRAIN, N_VAL, N_TEST, EPOCHS = 32, 6, 8, 2
TENSORBOARD = importlib.util.find_spec("tensorboard") is not None  # the extra: pip install -e .[tensorboard]


@pytest.fixture(scope="module")
def splits_run(tmp_path_factory):
    """(run folder, what the run printed): 2 epochs in one process, 1/4 of the training
    split held out (8 samples), val and test scored."""
    tmp = tmp_path_factory.mktemp("splits")
    shards, _ = clothing1m_shards(tmp, n_train=N_TRAIN, n_val=N_VAL, n_test=N_TEST)
    cfg = load_config(None, train_args(
        None, tmp / "run", "data.name=clothing1m", "data.source=shards", f"data.shards={shards}", "data.cache=device",
        "data.num_workers=0", "data.resize_size=36", "data.crop_size=32", "data.eval_splits=[val, test]",
        "data.noisy_val_fraction=0.25", "noise.type=none", "noise.rate=0", "method.forget_rate=0.2",
        "method.num_gradual=1", "model.arch=mlp", "train.batch_size=8", f"train.epochs={EPOCHS}",
        f"log.tensorboard={str(TENSORBOARD).lower()}", entry=()))
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        Trainer(cfg, DistContext()).fit()
    return tmp / "run", printed.getvalue()


def test_every_split_is_scored_and_named_every_epoch(splits_run):
    run, printed = splits_run
    assert "jocor_ddp: clothing1m (24 train + 8 noisy val / 6 val / 8 test), mlp pair" in printed
    rows = [json.loads(line) for line in (run / METRICS).read_text().splitlines()]
    assert len(rows) == EPOCHS
    for row in rows:
        # In the order of data.eval_splits, then the noisy held-out split.
        assert [k for k in row if k.endswith("_acc1")] == ["val_acc1", "test_acc1", "noisy_val_acc1"]
        assert (row["val_samples"], row["test_samples"], row["noisy_val_samples"]) == (N_VAL, N_TEST, 8)
        line = next(s for s in printed.splitlines() if s.startswith(f"epoch {row['epoch']:>3}/{EPOCHS}"))
        assert (f"  val acc {row['val_acc1']:.2f}% / {row['val_acc2']:.2f}%  test acc {row['test_acc1']:.2f}% / "
                f"{row['test_acc2']:.2f}%  noisy val acc {row['noisy_val_acc1']:.2f}% / "
                f"{row['noisy_val_acc2']:.2f}%  ") in line


@pytest.mark.skipif(not TENSORBOARD, reason="the tensorboard extra is not installed")
def test_each_split_is_its_own_tensorboard_tag(splits_run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    run, _ = splits_run
    events = EventAccumulator(str(run / "tensorboard"))
    events.Reload()
    rows = read_metrics(run / METRICS).rows
    for key in ("val_acc1", "test_acc2", "noisy_val_acc1"):
        assert [(e.step, round(e.value, 4)) for e in events.Scalars(key)] == \
            [(r["epoch"], round(r[key], 4)) for r in rows], key


def test_evaluate_scores_each_split_as_the_trainer_did(splits_run, tmp_path):
    run, _ = splits_run
    last = read_metrics(run / METRICS).rows[-1]
    ckpt = list_checkpoints(run / "checkpoints")[0]  # written right after the last epoch's evaluation
    assert evaluate.main([str(ckpt), "--out", str(tmp_path / "all"), "--device", "cpu"]) == 0
    for split in ("val", "test"):
        result = json.loads((tmp_path / "all" / f"evaluate-{split}.json").read_text())
        assert (result["acc1"], result["acc2"], result["samples"]) == \
            (last[f"{split}_acc1"], last[f"{split}_acc2"], last[f"{split}_samples"])
    assert evaluate.main([str(ckpt), "--split", "val", "--out", str(tmp_path / "val"), "--device", "cpu"]) == 0
    assert sorted(p.name for p in (tmp_path / "val").iterdir()) == ["confusion-val.csv", "evaluate-val.json"]


def test_report_judges_the_run_by_its_clean_val_split(splits_run, tmp_path):
    run, _ = splits_run
    rows = read_metrics(run / METRICS).rows
    assert report.main([str(run), "--out", str(tmp_path), "--no-plots"]) == 0
    summary = json.loads((tmp_path / "report.json").read_text())[0]
    val = [(r["val_acc1"] + r["val_acc2"]) / 2 for r in rows]
    best = rows[val.index(max(val))]  # the first of equals
    assert summary["val_split"] == "val" and summary["best_val_epoch"] == best["epoch"]
    assert summary["test_acc_at_best_val"] == (best["test_acc1"] + best["test_acc2"]) / 2


# --- runs written before the renames ---------------------------------------------------------

def raw_rows(name: str) -> list[dict]:
    return [json.loads(line) for line in (OLD / name / METRICS).read_text().splitlines()]


def renamed(row: dict, renames: dict) -> dict:
    return {renames.get(k, k): v for k, v in row.items()}


def test_an_earlier_runs_held_out_split_reads_as_noisy_val(tmp_path):
    raw = raw_rows("noisy_val")
    assert "val_acc1" in raw[0] and "noisy_val_acc1" not in raw[0]  # the file as 725b923 wrote it
    noisy = {f"val_{k}": f"noisy_val_{k}" for k in ("acc1", "acc2", "samples")}
    assert read_metrics(OLD / "noisy_val" / METRICS).checked() == [renamed(r, noisy) for r in raw]
    assert report.main([str(OLD / "noisy_val"), "--out", str(tmp_path), "--no-plots"]) == 0
    summary = json.loads((tmp_path / "report.json").read_text())[0]
    val = [(r["val_acc1"] + r["val_acc2"]) / 2 for r in raw]
    best = raw[val.index(max(val))]
    assert summary["val_split"] == "noisy_val"
    assert summary["test_acc_at_best_val"] == (best["test_acc1"] + best["test_acc2"]) / 2
    assert summary["last10_val_acc"] == pytest.approx(sum(val) / len(val), abs=1e-12)
    assert "| noisy_val | jocor | symmetric 40% | 4 |" in (tmp_path / "report.md").read_text()


def test_an_earlier_run_that_scored_val_has_no_test_and_says_so(tmp_path, capsys):
    raw = raw_rows("eval_val")
    renames = {**{f"test_{k}": f"val_{k}" for k in ("acc1", "acc2", "samples")},
               **{f"val_{k}": f"noisy_val_{k}" for k in ("acc1", "acc2", "samples")}}
    metrics = read_metrics(OLD / "eval_val" / METRICS)
    assert metrics.rows == [renamed(r, renames) for r in raw]
    assert report.main([str(OLD / "eval_val"), "--out", str(tmp_path), "--no-plots"]) == 2
    assert (f"{OLD / 'eval_val' / METRICS}, line 1: no number for test_acc1, test_acc2 (its config.yaml says "
            "data.eval_split: val: the run scored val, logged as val_acc1 / val_acc2, and never test)") \
        in capsys.readouterr().err
    # Its config reads in today's names: val was the only split scored, and still is when continued.
    data = config_from_dict(yaml.safe_load((OLD / "eval_val" / CONFIG).read_text())).data
    assert (data.eval_splits, data.noisy_val_fraction) == (["val"], 0.25)


def test_a_run_without_a_test_split_trains_and_report_says_why_it_cannot_judge_it(tmp_path, capsys):
    """An ImageFolder set of train and val alone: eval_splits [val] is valid; report names the gap."""
    assert config_from_dict({"data": {"source": "shards", "shards": "S", "eval_splits": ["val"]}}).data.eval_splits \
        == ["val"]
    run = tmp_path / "run"
    run.mkdir()
    (run / METRICS).write_text(json.dumps({"epoch": 1, "val_acc1": 50.0, "val_acc2": 40.0, "val_samples": 6}) + "\n")
    assert report.main([str(run), "--out", str(tmp_path / "out"), "--no-plots"]) == 2
    assert "line 1: no number for test_acc1, test_acc2 (the run scored no test split" in capsys.readouterr().err


def test_a_run_continued_by_this_version_renames_its_rows_once(tmp_path):
    run = tmp_path / "run"
    shutil.copytree(OLD / "noisy_val", run)
    cfg = load_config(None, train_args(OLD / "none", run, "data.noisy_val_fraction=0.2", entry=()))
    log = RunLog(cfg, DistContext(), None)
    log.begin(len(read_metrics(run / METRICS).rows))  # continued from its last checkpoint
    log.close()
    assert "noisy_val_acc1" in (run / METRICS).read_text() and "val_acc1\"" not in \
        (run / METRICS).read_text().replace("noisy_val_acc1\"", "")
    assert "eval_splits" in (run / CONFIG).read_text()
    assert read_metrics(run / METRICS).rows == read_metrics(OLD / "noisy_val" / METRICS).rows
