"""report: the table's numbers from hand-written metrics (exactly), the PNGs from a real
run, the table without matplotlib, and errors that name the file and line; the test accuracy
at the best validation epoch (the clean val split preferred to the noisy held-out one), the
Kendall tau of validation against test, and --pick on hand-written sweeps of either kind."""

import csv
import io
import json
import sys

import pytest
import yaml

from helpers import metric_rows, run_python

from jocor_ddp import report
from jocor_ddp.grid import load_sweep
from jocor_ddp.tables import kendall_tau

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def write_run(folder, rows, method="jocor", noise=("symmetric", 0.5), **method_keys):
    folder.mkdir(parents=True)
    (folder / "config.yaml").write_text(yaml.safe_dump(
        {"method": {"name": method, **method_keys}, "noise": {"type": noise[0], "rate": noise[1]}}))
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
    assert "| long | jocor | symmetric 50% | 12 | 8.50 | 14.00 | n/a | n/a | n/a | 75.00 |" in table
    assert "| short | coteaching | pairflip 45% | 3 | 72.17 | 91.00 | n/a | n/a | n/a | n/a |" in table
    assert table in capsys.readouterr().out


def test_plots_and_table_from_a_real_run(tiny_run, tmp_path):
    pytest.importorskip("matplotlib")
    run = tiny_run
    rows = metric_rows(run, keep_time=True)
    out = tmp_path / "report"
    proc = run_python(["-m", "jocor_ddp.report", str(run), "--out", str(out), "--acc", "both"])
    for name in ("test_accuracy.png", "label_precision.png"):
        data = (out / name).read_bytes()
        assert data.startswith(PNG_MAGIC) and len(data) > 5000, name
    expected = sum((r["test_acc1"] + r["test_acc2"]) / 2 for r in rows) / len(rows)
    assert json.loads((out / "report.json").read_text())[0]["last10_acc"] == pytest.approx(expected, abs=1e-12)
    line = f"| run | jocor | symmetric 50% | {len(rows)} | {expected:.2f} |"
    assert line in (out / "report.md").read_text() and line in proc.stdout


def test_a_run_that_estimated_t_shows_it_with_both_errors(tmp_path, capsys):
    # An F-correction auto run on 3 classes: the row of the estimate epoch carries both
    # estimates (4 decimals), transition.json the exact T it trained with, noise.json the
    # drawn labels' empirical T. The errors are the mean row L1 distances, by hand.
    exact = [[0.7, 0.2, 0.1], [0.05, 0.9, 0.05], [0.0, 0.25, 0.75]]
    patrini = [[0.6, 0.3, 0.1], [0.1, 0.8, 0.1], [0.2, 0.2, 0.6]]
    empirical = [[0.8, 0.1, 0.1], [0.0, 1.0, 0.0], [0.0, 0.25, 0.75]]
    rows = [row(e, 50.0, 52.0) for e in range(1, 5)]
    rows[1]["transition_estimate"] = {"source": "anchor_set", "epoch": 2, "matrix": [[0.7, 0.2, 0.1]] * 3,
                                      "undecided": {"2": "too few anchors"}, "patrini": {"matrix": patrini}}
    run = write_run(tmp_path / "fc", rows, method="fcorrection", noise=("pairflip", 0.25), transition="auto")
    (run / "transition.json").write_text(json.dumps({"source": "auto: anchor set, epoch 2", "classes": 3,
                                                     "matrix": exact}))
    (run / "noise.json").write_text(json.dumps({"type": "pairflip", "empirical_transition": empirical}))
    plain = write_run(tmp_path / "plain", rows[:1] + rows[2:])
    out = tmp_path / "out"
    assert report.main([str(run), str(plain), "--out", str(out), "--no-plots"]) == 0
    md = (out / "report.md").read_text()
    # anchor set: rows (0.1+0.1+0) (0.05+0.1+0.05) (0) -> 0.4 / 3; Patrini: (0.2+0.2+0) (0.1+0.2+0.1) (0.2+0.05+0.15)
    assert ("### Transition matrix of fc: T[i, j] = P(given label j | clean class i), estimated after epoch 2 (the "
            "anchor set, what the run trained with)\n\nMean row L1 distance to the empirical T of the drawn labels "
            "(noise.json): anchor set 0.133, Patrini 0.400") in md
    assert "Undecided rows, the identity: 2." in md
    assert "| i \\ j | 0 | 1 | 2 |\n|---|---:|---:|---:|\n| 0 | 0.700 | 0.200 | 0.100 |\n| 1 | 0.050 | 0.900 |" in md
    assert md.count("### Transition matrix") == 1  # the plain run estimated none
    saved = {s["name"]: s["transition"] for s in json.loads((out / "report.json").read_text())}
    assert saved["plain"] is None and saved["fc"]["anchor_set"] == exact
    assert saved["fc"]["error"]["patrini"] == pytest.approx(1.2 / 3, abs=1e-12)
    pytest.importorskip("matplotlib")
    assert report.main([str(run), str(plain), "--out", str(out)]) == 0
    assert (out / "transition_fc.png").read_bytes().startswith(PNG_MAGIC)
    assert not (out / "transition_plain.png").exists()
    # Without transition.json the row's copy is used; without noise.json there is no error to give.
    (run / "transition.json").unlink()
    (run / "noise.json").unlink()
    assert report.main([str(run), "--out", str(out), "--no-plots"]) == 0
    md = (out / "report.md").read_text()
    assert "Mean row L1" not in md and "| 1 | 0.700 | 0.200 | 0.100 |" in md



def test_a_refined_estimate_is_shown_after_the_ones_before_it(tmp_path):
    """method.refine_rounds: the last estimate is what the run trained with; the ones before it
    are listed with their distances (from their rows' copies)."""
    empirical = [[0.8, 0.1, 0.1], [0.0, 1.0, 0.0], [0.0, 0.25, 0.75]]
    first = [[0.6, 0.2, 0.2], [0.0, 1.0, 0.0], [0.0, 0.25, 0.75]]     # row 0 off by 0.4: 0.4 / 3
    refined = [[0.8, 0.1, 0.1], [0.0, 0.9, 0.1], [0.0, 0.25, 0.75]]   # row 1 off by 0.2: 0.2 / 3
    rows = [row(e, 50.0, 52.0) for e in range(1, 6)]
    rows[1]["transition_estimate"] = {"epoch": 2, "refinement": 0, "matrix": first, "undecided": {},
                                      "patrini": {"matrix": empirical}}
    rows[3]["transition_estimate"] = {"epoch": 4, "refinement": 1, "matrix": refined, "undecided": {},
                                      "patrini": {"matrix": first}}
    run = write_run(tmp_path / "fc", rows, method="fcorrection", noise=("pairflip", 0.25), transition="auto")
    (run / "noise.json").write_text(json.dumps({"type": "pairflip", "empirical_transition": empirical}))
    out = tmp_path / "out"
    assert report.main([str(run), "--out", str(out), "--no-plots"]) == 0
    md = (out / "report.md").read_text()
    assert ("estimated after epoch 4 (the anchor set, refinement 1, what the run trained with)\n\nMean row L1 "
            "distance to the empirical T of the drawn labels (noise.json): anchor set 0.067, Patrini 0.133") in md
    assert "The estimates before it, the same distances: epoch 2: anchor set 0.133, Patrini 0.000." in md
    saved = json.loads((out / "report.json").read_text())[0]["transition"]
    assert (saved["refinement"], saved["anchor_set"]) == (1, refined)
    assert saved["earlier"] == [{"epoch": 2, "refinement": 0,
                                 "error": {"anchor_set": pytest.approx(0.4 / 3), "patrini": 0.0}}]


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


# --- validation accuracy ---------------------------------------------------------------------

def val_row(epoch, test, val, split="noisy_val", **more):
    """A row of a run with a validation split: (net 1, net 2) test and validation accuracies
    (split: noisy_val, the held-out noisy labels, or val, a clean split); ``more``: another
    split's pair, by name."""
    out = {**row(epoch, *test), f"{split}_acc1": val[0], f"{split}_acc2": val[1], f"{split}_samples": 500}
    for name, (acc1, acc2) in more.items():
        out.update({f"{name}_acc1": acc1, f"{name}_acc2": acc2, f"{name}_samples": 50})
    return out


@pytest.fixture
def val_runs(tmp_path):
    # Mean test / val per epoch; last-10 means over all (fewer than ten) epochs:
    #   a: test 60 70 65 -> 65,   val 50 55 52 -> 52.33, best val at epoch 2 -> test 70
    #   b: test 70 73    -> 71.5, val 60 59    -> 59.5,  best val at epoch 1 -> test 70
    #   c: test 80 77    -> 78.5, val 51 56    -> 53.5,  best val at epoch 2 -> test 77
    # Pairs by val / by test: (a, b) and (a, c) agree, (b, c) disagree: tau = (2 - 1) / 3.
    a = write_run(tmp_path / "a", [val_row(1, (58, 62), (49, 51)), val_row(2, (69, 71), (54, 56)),
                                   val_row(3, (64, 66), (51, 53))], forget_rate="auto")
    b = write_run(tmp_path / "b", [val_row(1, (70, 70), (60, 60)), val_row(2, (72, 74), (58, 60))])
    c = write_run(tmp_path / "c", [val_row(1, (80, 80), (50, 52)), val_row(2, (76, 78), (55, 57))])
    return a, b, c


def test_val_columns_and_how_val_ranks_the_runs(val_runs, hand_runs, tmp_path):
    out = tmp_path / "out"
    assert report.main([*map(str, val_runs), *map(str, hand_runs), "--out", str(out), "--no-plots"]) == 0
    summary = {s["name"]: s for s in json.loads((out / "report.json").read_text())}
    assert summary["a"]["last10_val_acc"] == pytest.approx(157 / 3, abs=1e-12)
    assert (summary["a"]["test_acc_at_best_val"], summary["a"]["best_val_epoch"]) == (70.0, 2)
    assert (summary["b"]["test_acc_at_best_val"], summary["b"]["best_val_epoch"]) == (70.0, 1)
    assert summary["a"]["val_split"] == "noisy_val"
    assert summary["long"]["last10_val_acc"] is None and summary["long"]["test_acc_at_best_val"] is None
    assert summary["long"]["val_split"] is None
    table = (out / "report.md").read_text()
    assert "| a | jocor | symmetric 50% | 3 | 65.00 | 71.00 | 70.00 | noisy val | 52.33 | n/a |" in table
    assert "| c | jocor | symmetric 50% | 2 | 78.50 | 80.00 | 77.00 | noisy val | 53.50 | n/a |" in table
    assert "| long | jocor | symmetric 50% | 12 | 8.50 | 14.00 | n/a | n/a | n/a | 75.00 |" in table
    assert ("Noisy val acc against test acc over the 3 symmetric 50% runs judged by noisy val (last-10 means): "
            "Kendall's tau = 0.33 (1: the same order, -1: reversed); the best by noisy val acc, b, is not the "
            "best by test acc (c: 78.50% vs 71.50%).") in table


@pytest.fixture
def clean_run(tmp_path):
    # A clean val split and a noisy held-out one that disagree on the best epoch. Means per epoch:
    #   test 61, 65, 63; val 71, 70, 71 (epochs 1 and 3 tie: the first counts); noisy val 40, 46, 44.
    # Judged by val: epoch 1, test 61 (the noisy split would have said epoch 2, test 65).
    return write_run(tmp_path / "clean", [val_row(1, (60, 62), (70, 72), "val", noisy_val=(40, 40)),
                                          val_row(2, (66, 64), (69, 71), "val", noisy_val=(45, 47)),
                                          val_row(3, (63, 63), (71, 71), "val", noisy_val=(44, 44))])


def test_the_clean_val_split_judges_where_the_run_scores_it(clean_run, val_runs, tmp_path, capsys):
    out = tmp_path / "out"
    assert report.main([str(clean_run), str(val_runs[0]), "--out", str(out), "--no-plots"]) == 0
    summary = {s["name"]: s for s in json.loads((out / "report.json").read_text())}
    clean = summary["clean"]
    assert (clean["test_acc_at_best_val"], clean["best_val_epoch"], clean["val_split"]) == (61.0, 1, "val")
    assert clean["last10_val_acc"] == pytest.approx(212 / 3, abs=1e-12)
    assert (clean["last10_acc"], clean["best_acc"]) == (63.0, 66.0)
    table = (out / "report.md").read_text()
    assert "| clean | jocor | symmetric 50% | 3 | 63.00 | 66.00 | 61.00 | val | 70.67 | n/a |" in table
    assert "| a | jocor | symmetric 50% | 3 | 65.00 | 71.00 | 70.00 | noisy val | 52.33 | n/a |" in table
    assert table in capsys.readouterr().out  # the console table
    # A clean and a noisy split are different scales: no ranking across the two kinds.
    assert "Kendall" not in table


def test_val_ranks_runs_within_one_noise_setting_only(val_runs, tmp_path):
    """Noisy labels of another setting put val accuracy on another scale: a pairflip run with
    the highest val acc of all must not join the symmetric runs' ranking."""
    flip = write_run(tmp_path / "flip", [val_row(1, (40, 40), (90, 90))], noise=("pairflip", 0.45))
    out = tmp_path / "out"
    assert report.main([*map(str, val_runs), str(flip), "--out", str(out), "--no-plots"]) == 0
    table = (out / "report.md").read_text()
    assert "over the 3 symmetric 50% runs" in table and "the best by noisy val acc, b," in table
    assert "pairflip 45% runs" not in table


def test_no_ranking_line_with_fewer_than_two_val_runs(val_runs, hand_runs, tmp_path):
    out = tmp_path / "out"
    assert report.main([str(val_runs[0]), *map(str, hand_runs), "--out", str(out), "--no-plots"]) == 0
    assert "Kendall" not in (out / "report.md").read_text()


@pytest.mark.parametrize("x, y, tau", [
    ([1, 2, 3, 4], [1, 3, 2, 4], (5 - 1) / 6),   # one of six pairs swapped
    ([1, 1, 2], [1, 2, 3], 2 / 3),               # the tied pair counts neither way (tau-a)
    ([1, 2, 3], [3, 2, 1], -1.0), ([3.5, 1.0], [2.0, 0.5], 1.0)])
def test_kendall_tau_by_hand(x, y, tau):
    assert kendall_tau(x, y) == pytest.approx(tau, abs=1e-12)


# --- --pick: an axis chosen by validation accuracy ---------------------------------------------------

# setting -> forget rate -> (val, test): the mean over two seeds of each run's last-10 mean.
# sym20: val picks 0.3, test would pick 0.4 (gap 2); sym50: both pick 0.3.
PICK = {"sym20": {0.2: (60, 80), 0.3: (62, 79), 0.4: (58, 81)},
        "sym50": {0.2: (40, 60), 0.3: (45, 66), 0.4: (44, 65)}}
UNFINISHED = "sym50-forget_rate0.4-seed2"
# The sweep-wide overrides that give every run a validation split of one kind.
NOISY = {"data.noisy_val_fraction": 0.1}
CLEAN = {"data.source": "shards", "data.shards": "none", "data.eval_splits": ["val", "test"]}


def write_sweep(tmp_path, overrides=None, sym50=None):
    """A 2 settings x 3 forget rates x 2 seeds sweep; ``overrides`` for every run (default NOISY),
    ``sym50`` for the sym50 runs only."""
    base = tmp_path / "base.yaml"
    base.write_text(yaml.safe_dump({"data": {"name": "mnist", "root": str(tmp_path / "none")},
                                    "model": {"arch": "mlp"}, "train": {"epochs": 3}}))
    path = tmp_path / "pick.yaml"
    path.write_text(yaml.safe_dump({
        "base": str(base), "dir": str(tmp_path / "sweep"), "overrides": NOISY if overrides is None else overrides,
        "axes": {"setting": {"sym20": {"noise.rate": 0.2}, "sym50": {"noise.rate": 0.5, **(sym50 or {})}},
                 "method.forget_rate": [0.2, 0.3, 0.4], "train.seed": [1, 2]}}, sort_keys=False))
    return path


def write_pick_metrics(path, splits=("noisy_val",)):
    """Each run's epochs spread around its figure (e - 2: the 3-epoch mean is the figure);
    seed 1 of sym20/0.2 is 3 points of val above seed 2, so that seed 1 alone would pick 0.2.
    The first of ``splits`` holds PICK's validation figures; any other, 100 minus them: a split
    that would pick otherwise."""
    for run in load_sweep(path).runs:
        val, test = PICK[run.labels["setting"]][run.cfg.method.forget_rate]
        if (run.labels["setting"], run.cfg.method.forget_rate) == ("sym20", 0.2):
            val += 3 if run.seed == 1 else -3
        rows = [row(e, test + e - 3, test + e - 1) for e in range(1, 4)]
        for k, split in enumerate(splits):
            figure = val if k == 0 else 100 - val
            rows = [{**r, f"{split}_acc1": figure + e - 3, f"{split}_acc2": figure + e - 1}
                    for e, r in enumerate(rows, 1)]
        run.dir.mkdir(parents=True)
        (run.dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in
                                                    rows[:2 if run.name == UNFINISHED else 3]))


@pytest.mark.parametrize("overrides, splits, words", [
    (NOISY, ("noisy_val",), "noisy val"), (CLEAN, ("val",), "val"),
    # Both kinds in every run: the clean one judges, whatever the noisy one would pick.
    ({**CLEAN, **NOISY}, ("val", "noisy_val"), "val")])
def test_pick_chooses_by_val_beside_the_test_oracle(tmp_path, capsys, overrides, splits, words):
    path = write_sweep(tmp_path, overrides)
    write_pick_metrics(path, splits)
    out = tmp_path / "out"
    assert report.main(["--sweep", str(path), "--pick", "method.forget_rate", "--out", str(out)]) == 0
    md = (out / "pick.md").read_text()
    assert f"| setting | picked by {words} | {words} acc (%) | test acc (%) | best by test |" in md
    assert "| sym20 | forget_rate0.3 | 62.00 | 79.00 | forget_rate0.4 | 81.00 | 2.00 | 6 |" in md
    assert "| sym50 | forget_rate0.3 | 45.00 | 66.00 | forget_rate0.3 | 66.00 | 0.00 | 5 (+1 unfinished) |" in md
    assert f"{words.capitalize()} acc picked the oracle's value in 1 of 2 combinations; mean gap 1.00" in md
    assert f"Skipped, not finished: {UNFINISHED} (unfinished (2/3 epochs))." in md
    assert md in capsys.readouterr().out
    assert not (out / "table.md").exists()
    rows = {r["setting"]: r for r in csv.DictReader(io.StringIO((out / "pick.csv").read_text()))}
    assert (rows["sym20"]["picked"], rows["sym20"]["oracle"]) == ("forget_rate0.3", "forget_rate0.4")
    assert float(rows["sym20"]["picked_val"]) == 62 and float(rows["sym20"]["oracle_val"]) == 58
    assert float(rows["sym20"]["gap"]) == 2 and (rows["sym50"]["runs_finished"], rows["sym50"]["runs_unfinished"]) \
        == ("5", "1")
    assert rows["sym20"]["val_split"] == splits[0]
    # The other axes are the rows: picking the setting per forget rate (seeds still averaged).
    assert report.main(["--sweep", str(path), "--pick", "setting", "--out", str(out),
                        "--where", "method.forget_rate=0.2"]) == 0
    assert "| forget_rate0.2 | sym20 | 60.00 | 80.00 | sym20 | 80.00 | 0.00 | 4 |" in (out / "pick.md").read_text()


NEEDED = ("--pick needs runs with a validation split, a clean one (data.eval_splits with val) or a noisy one "
          "(data.noisy_val_fraction > 0) (narrow the sweep with --where if only some have one)")


@pytest.mark.parametrize("axis, overrides, sym50, splits, message", [
    ("method.lr", NOISY, None, (), "--pick method.lr: not an axis of {path}; the sweep's axes: setting, "
                                   "method.forget_rate"),
    ("train.seed", NOISY, None, (), "--pick train.seed: seeds are averaged, not picked; the sweep's axes: setting"),
    ("method.forget_rate", {}, None, (), NEEDED + ": run {dir}/sym20-forget_rate0.2-seed1 has neither "
                                         "(data.eval_splits: [test], data.noisy_val_fraction = 0.0)"),
    ("method.forget_rate", NOISY, None, (), NEEDED + ": {dir}/sym20-forget_rate0.2-seed1/metrics.jsonl has no "
                                            "noisy_val_acc1 / noisy_val_acc2 in every row"),
    ("method.forget_rate", CLEAN, None, ("noisy_val",), NEEDED + ": {dir}/sym20-forget_rate0.2-seed1/metrics.jsonl "
                                                        "has no val_acc1 / val_acc2 in every row"),
    # sym20 has a clean split only, sym50 a noisy one only: nothing judges them alike.
    ("method.forget_rate", CLEAN, {"data.eval_splits": ["test"], **NOISY}, ("val",),
     "--pick: the runs compared must be judged by the same kind of validation split, but run "
     "{dir}/sym20-forget_rate0.2-seed1 scores a clean val split without a noisy one (data.noisy_val_fraction = 0) "
     "and run {dir}/sym50-forget_rate0.2-seed1 only a noisy one (no val in data.eval_splits); narrow the sweep "
     "with --where"),
])
def test_pick_errors(tmp_path, capsys, axis, overrides, sym50, splits, message):
    path = write_sweep(tmp_path, overrides, sym50)
    write_pick_metrics(path, splits)
    out = tmp_path / "out"
    assert report.main(["--sweep", str(path), "--pick", axis, "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert message.format(path=path, dir=tmp_path / "sweep") in err and len(err.strip().splitlines()) == 1
    assert not (out / "pick.md").exists()


def test_pick_goes_with_sweep(tmp_path, capsys):
    with pytest.raises(SystemExit):
        report.parse_args([str(tmp_path), "--out", str(tmp_path / "out"), "--pick", "method.forget_rate"])
    assert "--pick goes with --sweep" in capsys.readouterr().err
