"""audit: the flag's precision and recall on a case with known answers, the kept share
from a hand-made bitmask, the flag rule, and the command on a real checkpoint (with and
without its kept history)."""

import csv
import json

import pytest
import torch

from tiny_run import N_TRAIN, final_checkpoint

from jocor_ddp import audit
from jocor_ddp.checkpoint import CheckpointError, load_checkpoint
from jocor_ddp.state import read_state


@pytest.fixture(scope="module")
def run(tiny_run):
    return tiny_run


def t(*values):
    return torch.tensor(values)


def test_flag_quality_known_answers():
    # Sample:       0  1  2  3  4  5  6  7
    given = t(1, 1, 2, 2, 3, 3, 4, 4)
    clean = t(0, 0, 2, 2, 3, 9, 4, -1)     # mislabelled: 0, 1, 5; sample 7 unknown
    flags = t(1, 0, 1, 0, 0, 1, 0, 1).bool()  # flagged: 0 (TP), 2 (FP), 5 (TP), 7 (unknown: ignored)
    q = audit.flag_quality(flags, given, clean)
    assert q["known"] == 7 and q["mislabelled"] == 3 and q["flagged"] == 3
    assert (q["true_positives"], q["false_positives"], q["false_negatives"]) == (2, 1, 1)
    assert q["precision"] == pytest.approx(2 / 3) and q["recall"] == pytest.approx(2 / 3)

    flags = t(1, 1, 0, 0, 0, 1, 0, 0).bool()  # exactly the mislabelled ones
    q = audit.flag_quality(flags, given, clean)
    assert q["precision"] == 1.0 and q["recall"] == 1.0

    flags = t(0, 0, 1, 0, 0, 0, 0, 0).bool()  # one wrong flag, finds nothing
    q = audit.flag_quality(flags, given, clean)
    assert q["precision"] == 0.0 and q["recall"] == 0.0

    nothing = torch.zeros(8, dtype=torch.bool)
    q = audit.flag_quality(nothing, given, given)  # no flag, no mislabelled sample
    assert q["precision"] is None and q["recall"] is None and q["mislabelled"] == 0
    assert audit.flag_quality(nothing, given, torch.full((8,), -1)) is None


def test_kept_share_from_a_hand_made_checkpoint():
    history = torch.tensor([0b0, 0b1, 0b11, 0b110, 0b111, (1 << 15) | (1 << 10) | 0b1, 0xFFFF],
                           dtype=torch.int64)
    share, window = audit.history_share({"bits": history, "epochs": 3}, "x.pt", 7)
    assert window == 3
    assert share.tolist() == pytest.approx([0, 1 / 3, 2 / 3, 2 / 3, 1, 1 / 3, 1])
    # 16 epochs recorded: only the newest 10 bits count (bits 10 and 15 are older).
    share, window = audit.history_share({"bits": history, "epochs": 16}, "x.pt", 7)
    assert window == 10
    assert share.tolist() == pytest.approx([0, 0.1, 0.2, 0.2, 0.3, 0.1, 1])

    assert audit.history_share({"bits": history, "epochs": 0}, "x.pt", 7) == (None, 0)
    assert audit.history_share({}, "x.pt", 7) == (None, 0)
    with pytest.raises(CheckpointError, match="x.pt"):
        audit.history_share({"bits": history, "epochs": 3}, "x.pt", 8)


def test_flag_rule():
    given = t(0, 0, 0, 0, 0, 0)
    pred1 = t(1, 1, 0, 0, 0, 0)
    pred2 = t(1, 2, 0, 0, 0, 0)
    losses = t(0.1, 5.0, 4.0, 3.0, 0.2, 0.3)
    share = t(1.0, 1.0, 0.4, 0.5, 0.0, 1.0).double()
    # Sample 0: both nets say 1 -> flagged whatever its loss. 1: nets disagree, kept -> no.
    # 2: rarely kept and among the top half of losses -> flagged. 3: kept half the time -> no.
    # 4: never kept but a small loss -> no.
    flags = audit.flag_samples(given, pred1, pred2, losses, share, forget_rate=0.5)
    assert flags.tolist() == [True, False, True, False, False, False]
    flags = audit.flag_samples(given, pred1, pred2, losses, None, forget_rate=0.5)
    assert flags.tolist() == [True, False, False, False, False, False]
    assert audit.top_share(losses, 0.5).tolist() == [False, True, True, True, False, False]
    assert not audit.top_share(losses, 0.0).any()


def read_audit(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f)), json.loads(path.with_suffix(".json").read_text())


def check_audit_csv(rows, summary, *, with_history):
    assert len(rows) == N_TRAIN
    assert sorted(int(r["idx"]) for r in rows) == list(range(N_TRAIN))
    assert [int(r["rank"]) for r in rows] == list(range(1, N_TRAIN + 1))
    # Ranked: flagged first, then by joint loss, largest first.
    keys = [(-int(r["probably_mislabelled"]), -float(r["joint_loss"])) for r in rows]
    assert keys == sorted(keys)
    losses = torch.tensor([float(r["joint_loss"]) for r in rows])
    top = audit.top_share(losses, summary["forget_rate"])
    for r, in_top in zip(rows, top.tolist()):
        agree = r["pred1"] == r["pred2"] != r["given_label"]
        low_share = with_history and float(r["kept_share"]) < 0.5
        assert int(r["probably_mislabelled"]) == int(agree or (low_share and in_top)), r
        assert (r["kept_share"] != "") == with_history
    flags = torch.tensor([int(r["probably_mislabelled"]) for r in rows]).bool()
    given = torch.tensor([int(r["given_label"]) for r in rows])
    clean = torch.tensor([int(r["clean_label"]) for r in rows])
    assert summary["quality"] == audit.flag_quality(flags, given, clean)
    assert summary["quality"]["mislabelled"] == int((given != clean).sum()) > 0
    assert summary["flagged"] == int(flags.sum()) > 0


def test_audit_command_on_a_real_checkpoint(run, tmp_path, capsys):
    out = tmp_path / "audit.csv"
    assert audit.main([str(final_checkpoint(run)), "--out", str(out), "--device", "cpu"]) == 0
    rows, summary = read_audit(out)
    state = read_state(final_checkpoint(run))
    assert summary["kept_share_epochs"] == min(state.history["epochs"], 10) > 0
    check_audit_csv(rows, summary, with_history=True)
    printed = capsys.readouterr().out
    assert summary["rule"] in printed and "precision" in printed and "recall" in printed


def test_audit_without_kept_history(run, tmp_path):
    state = load_checkpoint(final_checkpoint(run))  # the file as written
    state["history"] = {"bits": None, "epochs": None, "kept": None}
    ckpt = tmp_path / "old.pt"
    torch.save(state, ckpt)
    out = tmp_path / "audit.csv"
    assert audit.main([str(ckpt), "--out", str(out), "--device", "cpu"]) == 0
    rows, summary = read_audit(out)
    assert summary["rule"] == audit.RULE_NO_HISTORY and summary["kept_share_epochs"] == 0
    check_audit_csv(rows, summary, with_history=False)


def test_the_forget_rate_of_an_auto_run_is_its_estimate(run):
    state = read_state(final_checkpoint(run))
    state.forget_rate = {"auto": True, "tau": 0.25, "why": "auto", "estimate": 0.31, "final": True}
    assert state.final_tau == 0.31
    state.forget_rate["estimate"] = None  # never decided: the fallback
    assert state.final_tau == 0.25
    state.forget_rate = {"auto": False, "tau": 0.4, "why": "the noise rate"}
    assert state.final_tau == 0.4
