"""F-correction's transition matrix (method.transition): read from a file or taken from the
noise the config drew, checked with one line naming the file and the row, the same T in the
step's buffer, the checkpoint and RUN/transition.json, kept across a resume and refused when
the config's T changed under a run; with T = I it trains exactly as Standard, and with the true
T at pairflip 45% it learns where Standard does not. (The loss against its float64 reference:
test_losses.py; 1 process against 2 ranks: test_equivalence.py.)"""

import contextlib
import io
import json
import signal

import numpy as np
import pytest
import torch

from helpers import child_env, metric_rows, run_python, run_torchrun, train_args
from jocor_ddp.checkpoint import CheckpointError, list_checkpoints
from jocor_ddp.config import ConfigError, MethodConfig, load_config
from jocor_ddp.correction import ROW_SUM_TOLERANCE, read_transition_file, resolve_transition
from jocor_ddp.dist import DistContext
from jocor_ddp.preemption import Preempted
from jocor_ddp.state import read_state
from jocor_ddp.trainer import Trainer
from jocor_ddp.transition import correction_estimate

T3 = [[0.8, 0.1, 0.1], [0.0, 0.7, 0.3], [0.25, 0.25, 0.5]]


def _write(path, rows):
    """``rows`` in the file's format (a list of lists, or raw text for .json / .csv)."""
    if isinstance(rows, str):
        path.write_text(rows)
    elif path.suffix == ".npy":
        np.save(path, np.asarray(rows))
    elif path.suffix == ".json":
        path.write_text(json.dumps(rows))
    else:
        path.write_text("\n".join(",".join(repr(float(v)) for v in row) for row in rows) + "\n")
    return path


@pytest.mark.parametrize("suffix", [".json", ".csv", ".npy"])
def test_a_good_file_reads_in_every_format_rows_renormalised(tmp_path, suffix):
    off = [[v + (1e-7 if i == j else 0.0) for j, v in enumerate(row)] for i, row in enumerate(T3)]  # within tolerance
    t = read_transition_file(str(_write(tmp_path / f"t{suffix}", off)), 3)
    assert t.dtype == np.float64
    np.testing.assert_allclose(t, T3, atol=2e-7, rtol=0)
    np.testing.assert_allclose(t.sum(1), 1.0, atol=1e-15, rtol=0)
    assert t[1, 0] == 0.0


BAD_FILES = [
    ("t.json", '{"rows": 1}', r"expected a list of 3 lists of 3 numbers"),
    ("t.json", "[[0.5, 0.5", r"cannot be read"),
    ("t.json", [[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]], r"2 rows, expected 3 \(a 3 x 3 matrix for 3 classes\)"),
    ("t.json", [[1.0, 0.0, 0.0], [0.0, 1.0], [0.0, 0.0, 1.0]], r"row 1 has 2 entries, expected 3"),
    ("t.json", [[1.0, 0.0, 0.0], [0.0, 1.0, "x"], [0.0, 0.0, 1.0]], r"row 1, column 2: 'x' is not a number"),
    ("t.json", [[1.0, 0.0, 0.0], [0.0, 1.0, True], [0.0, 0.0, 1.0]], r"row 1, column 2: True is not a number"),
    ("t.csv", "1,0,0\n0,1,0\nnan,0,1\n", r"row 2, column 0: nan is not finite"),
    ("t.csv", "1,0,0\n0,one,0\n0,0,1\n", r"row 1, column 1: 'one' is not a number"),
    ("t.csv", [[1.1, -0.1, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0]], r"row 0, column 1: -0.1 is negative"),
    ("t.csv", [[1.0, 0.0, 0.0], [0.0, 0.9, 0.0], [0.0, 0.0, 1.0]], r"row 1 sums to 0\.9, not 1 \(within 1e-06\)"),
    ("t.npy", [[1.0, 0.0, 0.0], [1.0, 0.0, 0.0], [0.0, 0.0, 1.0]], r"column 1 is all zeros"),
    ("t.npy", [0.5, 0.5], r"holds a float64 array of shape \(2,\), expected a 3 x 3 matrix"),
    ("t.npy", [[0.5, 0.5, 0.0, 0.0]] * 3, r"row 0 has 4 entries, expected 3"),
    ("t.npy", "not an npy file", r"cannot be read"),
    ("t.txt", "1,0,0", r"unsupported format '\.txt'"),
]


@pytest.mark.parametrize("name,content,message", BAD_FILES)
def test_every_bad_file_is_one_line_naming_the_key_the_file_and_the_row(tmp_path, name, content, message):
    path = _write(tmp_path / name, content)
    with pytest.raises(ConfigError, match=rf"^method\.transition: {path}: {message}") as err:
        read_transition_file(str(path), 3)
    assert "\n" not in str(err.value)
    with pytest.raises(ConfigError, match=r"method\.transition: .*: not found"):
        read_transition_file(str(tmp_path / "missing.json"), 3)


def test_the_tolerance_is_the_stated_one(tmp_path):
    near = [[1.0 - 0.9 * ROW_SUM_TOLERANCE, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0]]
    read_transition_file(str(_write(tmp_path / "near.json", near)), 3)
    near[0][0] = 1.0 - 1.1 * ROW_SUM_TOLERANCE
    with pytest.raises(ConfigError, match="row 0 sums to"):
        read_transition_file(str(_write(tmp_path / "far.json", near)), 3)


@pytest.mark.parametrize("overrides,message", [
    (["method.name=fcorrection", "train.epochs=10"],  # no method.transition: auto, whose warm-up must fit
     r"^method\.warmup_epochs: 10 with train\.epochs=10: method\.transition auto estimates T"),
    (["method.name=standard", "method.transition=auto"],
     r"^method\.transition: auto: method\.name=standard corrects with no transition matrix, so there is none to "
     r"estimate; use fcorrection$"),
    (["method.name=fcorrection", "method.transition=auto", "train.epochs=10"],
     r"^method\.warmup_epochs: 10 with train\.epochs=10: method\.transition auto estimates T after the warm-up, "
     r"so it must end before the last epoch \(at most 9\)$"),
    (["method.name=fcorrection", "method.transition=auto", "method.warmup_epochs=0"],
     r"^method\.warmup_epochs: must be >= 1, got 0$"),
    (["method.name=fcorrection", "method.transition=auto", "method.reinit_after_warmup=1"],
     r"^method\.reinit_after_warmup: expected true or false, got 1$"),
    (["method.name=fcorrection", "train.epochs=20"],  # the default 2 rounds of 5 after 10: the last at 20
     r"^method\.refine_rounds: 2 of method\.refine_epochs=5 after method\.warmup_epochs=10 end at epoch 20, with "
     r"train\.epochs=20: the last refinement must end before the last epoch; fewer rounds or epochs "
     r"\(method\.refine_rounds=0: the first estimate only\)$"),
    (["method.name=fcorrection", "method.refine_rounds=-1"], r"^method\.refine_rounds: must be >= 0, got -1$"),
    (["method.name=fcorrection", "method.refine_epochs=0"], r"^method\.refine_epochs: must be >= 1, got 0$"),
    (["method.name=fcorrection", "method.transition=automatic"],
     r"method\.transition: 'automatic' is not one of the allowed forms: a \.json, \.csv or \.npy file"),
    (["method.name=fcorrection", "method.transition=T.txt"], r"method\.transition: 'T\.txt' is not one of the allowed"),
    (["method.name=fcorrection", "method.transition=false"], r"method\.transition: False is not one of the allowed"),
    (["method.name=fcorrection", "method.transition=true", "noise.type=instance", "noise.rate=0.2"],
     r"method\.transition: true: noise\.type: instance draws each sample from its own flip distribution"),
    (["method.name=fcorrection", "method.transition=true", "noise.type=file", "noise.file=labels.npy"],
     r"method\.transition: true: noise\.type: file gives per-sample labels, not the matrix"),
])
def test_fcorrection_without_a_usable_matrix_is_a_config_error(overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, overrides)


@pytest.mark.parametrize("given", [["method.transition=auto"], [], ["method.transition=null"]])
def test_auto_is_accepted_for_fcorrection_with_a_warmup_below_the_epochs(given):
    # auto is also the default: a sweep's method axis names fcorrection and nothing else.
    cfg = load_config(None, ["method.name=fcorrection", *given, "train.epochs=21"])
    assert (cfg.method.transition, cfg.method.warmup_epochs, cfg.method.reinit_after_warmup) == ("auto", 10, True)
    assert (cfg.method.refine_rounds, cfg.method.refine_epochs) == (2, 5)
    assert cfg.method.transition_estimate_epochs() == [9, 14, 19]  # 0-based: the ends of epochs 10, 15, 20
    assert load_config(None, ["method.name=fcorrection", *given, "train.epochs=11",
                              "method.refine_rounds=0"]).method.transition_estimate_epochs() == [9]
    assert load_config(None, ["method.name=jocor"]).method.transition is None
    t = resolve_transition(cfg.method, "symmetric", 4, None, labels_noisy=False)
    assert np.array_equal(t.matrix, np.eye(4)) and t.source == "auto: warm-up"


def test_true_refuses_labels_that_came_noisy():
    with pytest.raises(ConfigError, match=r"^method\.transition: true: the training labels came noisy"):
        resolve_transition(MethodConfig(name="fcorrection", transition=True), "none", 14, None, labels_noisy=True)
    assert load_config(None, ["method.transition='true'", "method.name=fcorrection"]).method.transition is True
    assert resolve_transition(MethodConfig(name="standard", transition=True), "none", 14, None, True) is None


@pytest.fixture(scope="module")
def data(mnist_data):
    return mnist_data(256, 64)


def _trainer(data, run_dir, *extra):
    cfg = load_config(None, train_args(data, run_dir, "train.batch_size=32", "train.epochs=2", "train.lr=0.01",
                                       "method.name=fcorrection", *extra, entry=()))
    return Trainer(cfg, DistContext())


def _fit(trainer):
    with contextlib.redirect_stdout(io.StringIO()):
        return trainer.fit()


@pytest.mark.parametrize("noise,expected", [
    (["noise.type=symmetric", "noise.rate=0.3"], np.full((10, 10), 0.3 / 9) + np.eye(10) * (0.7 - 0.3 / 9)),
    (["noise.type=pairflip", "noise.rate=0.45"], np.eye(10) * 0.55 + np.roll(np.eye(10), 1, axis=1) * 0.45),
])
def test_true_is_the_requested_matrix_in_the_step_the_checkpoint_and_the_run_folder(data, tmp_path, noise, expected):
    trainer = _trainer(data, tmp_path / "run", "method.transition=true", "train.epochs=1", *noise)
    np.testing.assert_allclose(trainer.transition.matrix, expected, rtol=0, atol=1e-15)
    assert trainer.transition.source.startswith(f"true: the requested matrix of {noise[0][11:]} noise")
    assert torch.equal(trainer.step.values.log_transition, torch.from_numpy(trainer.transition.matrix).log().float())
    _fit(trainer)
    saved = read_state(list_checkpoints(tmp_path / "run" / "checkpoints")[0]).transition
    assert saved["matrix"].dtype == torch.float64 and np.array_equal(saved["matrix"].numpy(), trainer.transition.matrix)
    written = json.loads((tmp_path / "run" / "transition.json").read_text())
    assert written["source"] == saved["source"] == trainer.transition.source and written["classes"] == 10
    assert np.array_equal(np.array(written["matrix"]), trainer.transition.matrix)


def test_with_the_identity_it_trains_exactly_as_standard(data, tmp_path):
    """noise.type none: the true T is I, and F-correction is Standard, bit for bit."""
    runs = {}
    for name, extra in (("standard", ["method.name=standard"]), ("fcorrection", ["method.transition=true"])):
        trainer = _trainer(data, tmp_path / name, "noise.type=none", "noise.rate=0", *extra)
        _fit(trainer)
        runs[name] = trainer
    assert metric_rows(tmp_path / "standard") == metric_rows(tmp_path / "fcorrection")
    for (key, p), q in zip(runs["standard"].pair.named_parameters(), runs["fcorrection"].pair.parameters()):
        assert torch.equal(p, q), key
    assert runs["standard"].transition is None and not (tmp_path / "standard" / "transition.json").exists()


def test_a_resume_keeps_the_checkpoints_matrix_and_refuses_a_changed_file(data, tmp_path):
    t = _write(tmp_path / "t.csv", np.eye(10) * 0.6 + np.roll(np.eye(10), 1, axis=1) * 0.4)
    _fit(_trainer(data, tmp_path / "run", f"method.transition={t}", "train.epochs=1"))
    moved = tmp_path / "moved.csv"
    moved.write_text(t.read_text())  # the same matrix elsewhere: the checkpoint's T (and source) go on
    resumed = _trainer(data, tmp_path / "run", f"method.transition={moved}")
    _fit(resumed)
    assert resumed.transition.source == f"file {t}"
    assert json.loads((tmp_path / "run" / "transition.json").read_text())["source"] == f"file {t}"
    _write(moved, np.eye(10) * 0.6 + np.roll(np.eye(10), -1, axis=1) * 0.4)  # changed under the run
    with pytest.raises(CheckpointError, match=rf"checkpoint .*step-16\.pt was trained with the transition matrix "
                                              rf"from file {t}; method\.transition now gives another \(file {moved}; "
                                              rf"row 0, column 1: 0\.4 against 0\.0\)"):
        _fit(_trainer(data, tmp_path / "run", f"method.transition={moved}", "train.epochs=3"))


def test_with_the_true_matrix_at_pairflip_45_it_learns_where_standard_does_not(mnist_data, tmp_path):
    """Generated MNIST, 512 samples, 3 epochs: with training seeds 1, 2 and 3 F-correction
    reaches 100% test accuracy, Standard 50.0%, 45.7% and 44.1% (it learns the flips)."""
    accuracy = {}
    for name, extra in (("standard", ["method.name=standard"]), ("fcorrection", ["method.transition=true"])):
        cfg = train_args(mnist_data(512, 128), tmp_path / name, "noise.type=pairflip", "noise.rate=0.45",
                         "train.batch_size=32", "train.epochs=3", "train.lr=0.001", "method.name=fcorrection",
                         *extra, entry=())
        rows = _fit(Trainer(load_config(None, cfg), DistContext()))
        accuracy[name] = (rows[-1]["test_acc1"] + rows[-1]["test_acc2"]) / 2
    assert accuracy["fcorrection"] > 90 and accuracy["fcorrection"] > accuracy["standard"] + 20, accuracy


# --- every rank, and a resume mid-epoch (torchrun, several runs) ------------------------------

@pytest.mark.slow
def test_a_bad_file_stops_every_rank_with_its_line_and_exit_2(data, tmp_path):
    bad = _write(tmp_path / "t.json", [[1.0] + [0.0] * 9] + [[0.1] * 10] * 8 + [[0.2] * 10])
    proc = run_torchrun(2, train_args(data, tmp_path / "run", "method.name=fcorrection", f"method.transition={bad}"),
                        check=False)
    line = f"method.transition: {bad}: row 9 sums to 2.0, not 1 (within 1e-06)"
    for rank in (0, 1):
        assert f"error (rank {rank}): {line}" in proc.stderr, proc.stderr[-3000:]
    assert "exitcode  : 2" in proc.stderr and not (tmp_path / "run" / "checkpoints").exists()


@pytest.mark.slow
def test_stopped_mid_epoch_and_resumed_it_ends_bit_for_bit(data, tmp_path):
    t = _write(tmp_path / "t.npy", np.eye(10) * 0.7 + np.roll(np.eye(10), 1, axis=1) * 0.3)
    args = ["train.batch_size=32", "train.epochs=3", "method.name=fcorrection", f"method.transition={t}",
            "noise.type=pairflip", "noise.rate=0.3", "checkpoint.every_steps=3", "checkpoint.keep=20"]
    run_torchrun(2, train_args(data, tmp_path / "a", *args))
    run_torchrun(2, train_args(data, tmp_path / "b", *args), env=child_env(JOCOR_FAULT="sigterm:1:10"))
    stopped = read_state(list_checkpoints(tmp_path / "b" / "checkpoints")[0])
    assert (stopped.epoch, stopped.step_in_epoch) == (1, 3)
    assert np.array_equal(stopped.transition["matrix"].numpy(), read_transition_file(str(t), 10))
    resumed = run_torchrun(2, train_args(data, tmp_path / "b", *args))
    assert "resumed from" in resumed.stdout
    assert metric_rows(tmp_path / "b") == metric_rows(tmp_path / "a")
    final = [read_state(list_checkpoints(d / "checkpoints")[0]).model for d in (tmp_path / "a", tmp_path / "b")]
    for k in final[0]:
        assert torch.equal(final[0][k], final[1][k]), k


# --- method.transition: auto ------------------------------------------------------------------

AUTO = ["method.transition=auto", "method.warmup_epochs=2", "method.refine_rounds=0", "noise.type=pairflip",
        "noise.rate=0.3"]


def test_auto_warms_up_as_standard_then_trains_with_its_estimate(data, tmp_path):
    """The warm-up epochs' rows (and the networks at their end) are Standard's bit for bit; at
    the end of the last one T is estimated once, into the step's buffer, the row, the
    checkpoint and RUN/transition.json; the next epoch trains with it."""
    standard = _trainer(data, tmp_path / "standard", "method.name=standard", *AUTO[3:])
    _fit(standard)
    auto = _trainer(data, tmp_path / "auto", *AUTO, "train.epochs=3")
    assert np.array_equal(auto.transition.matrix, np.eye(10)) and auto.transition.source == "auto: warm-up"
    _fit(auto)
    rows, reference = metric_rows(tmp_path / "auto"), metric_rows(tmp_path / "standard")
    assert rows[0] == reference[0]
    estimate = rows[1].pop("transition_estimate")
    assert rows[1] == reference[1]
    assert "transition_estimate" not in rows[0] and "transition_estimate" not in rows[2]
    # After the estimate the loss is no longer Standard's: the epoch's loss moves away.
    assert rows[2]["train_loss"] != pytest.approx(reference[1]["train_loss"], abs=1e-9)
    t = auto.transition
    assert t.source == "auto: anchor set, epoch 2" and estimate["epoch"] == 2 and estimate["source"] == "anchor_set"
    assert not np.array_equal(t.matrix, np.eye(10))
    np.testing.assert_allclose(t.matrix.sum(1), 1.0, rtol=0, atol=1e-12)
    np.testing.assert_allclose(np.array(estimate["matrix"]), t.matrix, rtol=0, atol=5e-5)
    assert set(estimate["patrini"]) == {"matrix", "undecided"}
    assert torch.equal(auto.step.values.log_transition, torch.from_numpy(t.matrix).log().float())
    written = json.loads((tmp_path / "auto" / "transition.json").read_text())
    assert written["source"] == t.source and np.array_equal(np.array(written["matrix"]), t.matrix)
    saved = [read_state(p) for p in list_checkpoints(tmp_path / "auto" / "checkpoints")]
    by_epoch = {s.epoch: s.transition for s in saved}
    assert by_epoch[1]["source"] == "auto: warm-up" and np.array_equal(by_epoch[1]["matrix"].numpy(), np.eye(10))
    assert by_epoch[2]["source"] == by_epoch[3]["source"] == t.source
    assert np.array_equal(by_epoch[3]["matrix"].numpy(), t.matrix)


def test_a_resumed_run_keeps_the_checkpoints_estimate_and_never_reestimates(data, tmp_path):
    _fit(_trainer(data, tmp_path / "run", *AUTO, "train.epochs=3"))
    estimated = json.loads((tmp_path / "run" / "transition.json").read_text())
    resumed = _trainer(data, tmp_path / "run", *AUTO, "train.epochs=4")
    rows = _fit(resumed)
    assert [r["epoch"] for r in rows] == [4] and "transition_estimate" not in rows[0]
    assert resumed.transition.source == "auto: anchor set, epoch 2"
    assert np.array_equal(resumed.transition.matrix, np.array(estimated["matrix"]))
    assert torch.equal(resumed.step.values.log_transition, torch.from_numpy(resumed.transition.matrix).log().float())


REFINE = [*AUTO, "method.refine_rounds=2", "method.refine_epochs=1"]  # estimates at the ends of epochs 2, 3, 4


def test_refinement_reestimates_after_each_round_from_the_corrected_pair_without_reinit(data, tmp_path):
    """The first estimate at the end of the warm-up, then one per round; the pair is
    re-initialised once, after the first; each estimate goes into the row, the step's buffer,
    the checkpoint and RUN/transition.json, and the run trains on with the last."""
    trainer = _trainer(data, tmp_path / "run", *REFINE, "train.epochs=5", "checkpoint.keep=20")
    calls, reinitialise = [], trainer.reinitialise
    trainer.reinitialise = lambda: (calls.append(trainer.transition.source), reinitialise())[1]
    _fit(trainer)
    assert calls == ["auto: anchor set, epoch 2"]
    rows = metric_rows(tmp_path / "run")
    estimates = {r["epoch"]: r["transition_estimate"] for r in rows if "transition_estimate" in r}
    assert {e: (x["epoch"], x["refinement"]) for e, x in estimates.items()} == {2: (2, 0), 3: (3, 1), 4: (4, 2)}
    by_epoch = {s.epoch: s.transition for s in map(read_state, list_checkpoints(tmp_path / "run" / "checkpoints"))}
    assert [by_epoch[e]["source"] for e in (1, 2, 3, 4, 5)] == [
        "auto: warm-up", "auto: anchor set, epoch 2", "auto: anchor set, epoch 3 (refinement 1)",
        "auto: anchor set, epoch 4 (refinement 2)", "auto: anchor set, epoch 4 (refinement 2)"]
    for e in (2, 3, 4):  # each estimate is its row's matrix, and differs from the one before
        np.testing.assert_allclose(by_epoch[e]["matrix"].numpy(), np.array(estimates[e]["matrix"]), rtol=0, atol=5e-5)
    assert not np.array_equal(by_epoch[2]["matrix"].numpy(), by_epoch[3]["matrix"].numpy())
    t = trainer.transition
    assert t.source == "auto: anchor set, epoch 4 (refinement 2)"
    assert torch.equal(trainer.step.values.log_transition, torch.from_numpy(t.matrix).log().float())
    written = json.loads((tmp_path / "run" / "transition.json").read_text())
    assert written["source"] == t.source and np.array_equal(np.array(written["matrix"]), t.matrix)


def test_a_run_resumed_between_refinements_goes_on_with_the_next_one(data, tmp_path):
    """Stopped after the first refinement (epoch 3 of 5), resumed: the second refinement comes
    at the end of epoch 4 and the rows and the final T equal an uninterrupted run's."""
    _fit(_trainer(data, tmp_path / "whole", *REFINE, "train.epochs=5"))
    cut = _trainer(data, tmp_path / "cut", *REFINE, "train.epochs=5")
    saved, save = [], cut.save
    cut.save = lambda epoch, step: (saved.append((epoch, step)), save(epoch, step))[1]
    cut._sync_point = lambda: signal.SIGTERM if saved[-1:] == [(3, 0)] else None  # seen after epoch 3's checkpoint
    with pytest.raises(Preempted, match="after epoch 3"):
        _fit(cut)
    resumed = _trainer(data, tmp_path / "cut", *REFINE, "train.epochs=5")
    assert resumed.transition.source == "auto: warm-up"  # until restore() reads the checkpoint in fit()
    rows = _fit(resumed)
    assert [r["epoch"] for r in rows] == [4, 5] and rows[0]["transition_estimate"]["refinement"] == 2
    assert metric_rows(tmp_path / "cut") == metric_rows(tmp_path / "whole")
    assert (tmp_path / "cut" / "transition.json").read_text() == (tmp_path / "whole" / "transition.json").read_text()


def test_a_checkpoint_written_before_the_refinement_existed_reads_as_no_refinement(data, tmp_path):
    """Its config has no method.refine_rounds: today's default (2 rounds of 5) would make a
    short run's config invalid for evaluate, export and audit; that run never refined."""
    from jocor_ddp.restore import checkpoint_config
    _fit(_trainer(data, tmp_path / "run", *AUTO, "train.epochs=3"))
    path = list_checkpoints(tmp_path / "run" / "checkpoints")[0]
    state = read_state(path)
    for key in ("refine_rounds", "refine_epochs"):
        del state.config["method"][key]
    cfg = checkpoint_config(state, path)
    assert (cfg.method.refine_rounds, cfg.method.transition_estimate_epochs()) == (0, [1])
    with pytest.raises(ConfigError, match=r"^method\.refine_rounds: 2 of"):  # what it would be read as without
        load_config(None, [*AUTO, "method.name=fcorrection", "train.epochs=3", "method.refine_rounds=2"])


def test_a_refinements_undecided_row_keeps_the_row_it_was_trained_with():
    """Class 2 is never predicted: the first estimate's row is the identity's, a refinement's
    the T the pair trained with; a label no anchor carries still gives the identity row."""
    rng = np.random.default_rng(0)
    n, c = 400, 4
    pred = rng.choice([0, 1, 3], n)
    evidence = {"pred": pred, "score": rng.normal(size=n), "label": pred.copy(),
                "probs": np.eye(c)[pred] * 0.9 + 0.1 / c}
    evidence["label"][:40] = 2  # label 2 appears, so column 2 is not all zeros
    previous = np.full((c, c), 0.1) + np.eye(c) * 0.6
    first, _, first_lines = correction_estimate(evidence, c, 4)
    refined, row, lines = correction_estimate(evidence, c, 9, 1, previous=previous)
    assert np.array_equal(first[2], np.eye(c)[2]) and np.array_equal(refined[2], previous[2])
    assert np.array_equal(np.delete(refined, 2, 0), np.delete(first, 2, 0))
    assert first_lines[0].endswith("; using the identity row")
    assert lines == [first_lines[0].replace("using the identity row", "keeping the row it was trained with")]
    assert (row["epoch"], row["refinement"], list(row["undecided"])) == (10, 1, ["2"])


def test_reinit_after_warmup_restarts_the_pair_and_adam_in_place(data, tmp_path):
    """The same tensors (a captured step points at them) hold fresh weights seeded by
    train.seed + 1 and a zeroed Adam; the global RNG streams are untouched."""
    trainer = _trainer(data, tmp_path / "run", *AUTO, "method.reinit_after_warmup=true", "train.epochs=3")
    _fit(trainer)  # trains through the estimate and re-initialisation
    params = [p.data_ptr() for p in trainer.pair.parameters()]
    moments = [v.data_ptr() for st in trainer.step.optimizer.state.values() for v in st.values()]
    rng = torch.get_rng_state()
    trainer.reinitialise()
    assert torch.equal(torch.get_rng_state(), rng)
    assert [p.data_ptr() for p in trainer.pair.parameters()] == params
    assert [v.data_ptr() for st in trainer.step.optimizer.state.values() for v in st.values()] == moments
    assert all(torch.count_nonzero(v) == 0 for st in trainer.step.optimizer.state.values() for v in st.values())
    from jocor_ddp.models import build_pair
    fresh = build_pair(trainer.cfg.model, trainer.data.in_channels, 10, trainer.data.image_size, seed=2)
    for (key, p), q in zip(trainer.pair.state_dict().items(), fresh.state_dict().values()):
        assert torch.equal(p, q), key
    first = build_pair(trainer.cfg.model, trainer.data.in_channels, 10, trainer.data.image_size, seed=1)
    assert not torch.equal(next(first.parameters()), next(fresh.parameters()))


def test_reinit_after_warmup_the_epoch_after_the_estimate_starts_from_fresh_weights(data, tmp_path):
    """With re-init, the third epoch trains fresh networks (worse than the warm-up's on the
    first steps: a higher loss) and its row still scores the warm-up's pair at the estimate."""
    rows = {}
    for name, flag in (("keep", "false"), ("reinit", "true")):
        rows[name] = _fit(_trainer(data, tmp_path / name, *AUTO, f"method.reinit_after_warmup={flag}",
                                   "train.epochs=3"))
    assert rows["keep"][1]["test_acc1"] == rows["reinit"][1]["test_acc1"]
    assert rows["reinit"][2]["train_loss"] > rows["keep"][2]["train_loss"]


@pytest.mark.slow
def test_the_estimate_is_the_same_under_1_and_2_ranks(data, tmp_path):
    """The first estimate and its refinement (the last T, which depends on the first)."""
    args = [*REFINE, "method.refine_rounds=1", "method.name=fcorrection", "train.batch_size=32", "train.epochs=4"]
    run_python(train_args(data, tmp_path / "one", *args))
    run_torchrun(2, train_args(data, tmp_path / "two", *args))
    one, two = (json.loads((tmp_path / d / "transition.json").read_text()) for d in ("one", "two"))
    assert one["source"] == "auto: anchor set, epoch 3 (refinement 1)" and one == two
    rows = [[r["transition_estimate"] for r in metric_rows(tmp_path / d) if "transition_estimate" in r]
            for d in ("one", "two")]
    assert [r["refinement"] for r in rows[0]] == [0, 1] and rows[0] == rows[1]
    assert not np.array_equal(np.array(one["matrix"]), np.eye(10))


@pytest.mark.slow
@pytest.mark.parametrize("fault,stopped_at,reinit,source", [
    ("sigterm:1:10", (1, 3), "false", "auto: warm-up"),              # mid-warm-up: epoch 2 of 2, step 3
    ("sigterm:1:18", (2, 3), "false", "auto: anchor set, epoch 2"),  # after the estimate, mid-epoch 3
    ("sigterm:1:18", (2, 3), "true", "auto: anchor set, epoch 2"),   # after the estimate and the re-initialisation
    ("sigterm:1:26", (3, 3), "true", "auto: anchor set, epoch 3 (refinement 1)"),  # after the refinement
])
def test_auto_stopped_mid_epoch_and_resumed_ends_bit_for_bit(data, tmp_path, fault, stopped_at, reinit, source):
    args = ["train.batch_size=32", "train.epochs=4", "method.name=fcorrection", *AUTO, "method.refine_epochs=1",
            f"method.refine_rounds={int('refinement' in source)}",
            f"method.reinit_after_warmup={reinit}", "checkpoint.every_steps=3", "checkpoint.keep=20"]
    run_torchrun(2, train_args(data, tmp_path / "a", *args))
    run_torchrun(2, train_args(data, tmp_path / "b", *args), env=child_env(JOCOR_FAULT=fault))
    stopped = read_state(list_checkpoints(tmp_path / "b" / "checkpoints")[0])
    assert (stopped.epoch, stopped.step_in_epoch) == stopped_at
    assert stopped.transition["source"] == source
    resumed = run_torchrun(2, train_args(data, tmp_path / "b", *args))
    assert "resumed from" in resumed.stdout
    assert metric_rows(tmp_path / "b") == metric_rows(tmp_path / "a")
    assert (tmp_path / "b" / "transition.json").read_text() == (tmp_path / "a" / "transition.json").read_text()
    final = [read_state(list_checkpoints(d / "checkpoints")[0]).model for d in (tmp_path / "a", tmp_path / "b")]
    for k in final[0]:
        assert torch.equal(final[0][k], final[1][k]), k
