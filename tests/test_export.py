"""export: the exported network, rebuilt by load_exported, gives the checkpoint network's
logits exactly; --net best follows the metrics (the validation split's accuracy over test_acc
where the run has one: val_acc, clean labels, before noisy_val_acc; or as --by says); the file
loads with weights_only."""

import json
import shutil

import pytest
import torch

from helpers import run_python
from tiny_run import final_checkpoint

from jocor_ddp import export
from jocor_ddp.checkpoint import CheckpointError
from jocor_ddp.config import config_from_dict
from jocor_ddp.models import build_pair
from jocor_ddp.state import read_state


@pytest.fixture(scope="module")
def run(tiny_run):
    return tiny_run


def checkpoint_pair(path):
    state = read_state(path)
    pair = build_pair(config_from_dict(state.config).model, 1, 10, 28)
    pair.load_state_dict(state.model)
    return pair.eval()


@pytest.mark.parametrize("net", [1, 2])
def test_exported_net_reloads_with_identical_logits(run, tmp_path, net):
    ckpt = final_checkpoint(run)
    out = tmp_path / "model.pt"
    run_python(["-m", "jocor_ddp.export", str(ckpt), "--out", str(out), "--net", str(net)])
    payload = torch.load(out, weights_only=True)
    assert payload["format"] == "jocor_ddp.export/1" and payload["net"] == net
    assert (payload["arch"], payload["num_classes"], payload["in_channels"], payload["image_size"]) == \
        ("mlp", 10, 1, 28)
    assert payload["classes"] == [str(i) for i in range(10)] and payload["normalization"] is None
    assert payload["source_checkpoint"] == str(ckpt)

    model = export.load_exported(out)
    pair = checkpoint_pair(ckpt)
    x = torch.rand(16, 1, 28, 28, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        chosen, other = (pair.net1, pair.net2) if net == 1 else (pair.net2, pair.net1)
        assert torch.equal(model(x), chosen(x))
        assert not torch.equal(model(x), other(x))


def copy_run(run, dest, acc1, acc2, val=None, noisy_val=None):
    """The final checkpoint in a fresh RUN layout, with a metrics.jsonl whose row of its epoch
    holds these test accuracies (and a clean val split's, and a noisy held-out split's, each a
    pair, when given), or none."""
    (dest / "checkpoints").mkdir(parents=True)
    ckpt = dest / "checkpoints" / final_checkpoint(run).name
    shutil.copy(final_checkpoint(run), ckpt)
    if acc1 is not None:
        row = {"epoch": read_state(ckpt).epoch, "test_acc1": acc1, "test_acc2": acc2}
        if val is not None:
            row.update(val_acc1=val[0], val_acc2=val[1], val_samples=100)
        if noisy_val is not None:
            row.update(noisy_val_acc1=noisy_val[0], noisy_val_acc2=noisy_val[1], noisy_val_samples=100)
        (dest / "metrics.jsonl").write_text(json.dumps({"epoch": 1, "test_acc1": 0, "test_acc2": 0}) + "\n"
                                            + json.dumps(row) + "\n")
    return ckpt


@pytest.mark.parametrize("acc1, acc2, expected", [(60.0, 70.0, 2), (70.0, 60.0, 1), (65.0, 65.0, 1),
                                                  (None, None, 1)])
def test_best_picks_the_more_accurate_net(run, tmp_path, acc1, acc2, expected):
    ckpt = copy_run(run, tmp_path / "run", acc1, acc2)
    out = tmp_path / "best.pt"
    assert export.main([str(ckpt), "--out", str(out), "--net", "best"]) == 0
    assert torch.load(out, weights_only=True)["net"] == expected


@pytest.mark.parametrize("split", ["val", "noisy_val"])
@pytest.mark.parametrize("test, val, by, expected", [
    ((70.0, 80.0), (61.2, 60.95), "val", 1), ((70.0, 80.0), (61.2, 60.95), "auto", 1),
    ((70.0, 80.0), (61.2, 60.95), "test", 2), ((80.0, 70.0), (60.0, 65.0), "val", 2),
    ((80.0, 70.0), (60.0, 65.0), None, 2), ((80.0, 70.0), (60.0, 65.0), "test", 1)])
def test_best_by_val_follows_val_acc_even_against_test_acc(run, tmp_path, capsys, split, test, val, by, expected):
    """Either validation split, alone, judges as the other would."""
    ckpt = copy_run(run, tmp_path / "run", *test, **{split: val})
    out = tmp_path / "best.pt"
    assert export.main([str(ckpt), "--out", str(out), *(["--by", by] if by else [])]) == 0
    assert torch.load(out, weights_only=True)["net"] == expected
    figure, accs = ("test", test) if by == "test" else (split, val)
    epoch = read_state(ckpt).epoch
    assert (f"net {expected} (best by {figure}_acc at epoch {epoch} of {tmp_path / 'run' / 'metrics.jsonl'}: "
            f"{max(accs):.2f}% vs {min(accs):.2f}%)") in capsys.readouterr().out


@pytest.mark.parametrize("by", ["val", None])
def test_the_clean_val_split_judges_before_the_noisy_one(run, tmp_path, capsys, by):
    """Val says net 1 (61.20 vs 60.95), noisy val net 2 (55 vs 50), test net 2: net 1, by val_acc."""
    ckpt = copy_run(run, tmp_path / "run", 70.0, 80.0, val=(61.2, 60.95), noisy_val=(50.0, 55.0))
    out = tmp_path / "best.pt"
    assert export.main([str(ckpt), "--out", str(out), *(["--by", by] if by else [])]) == 0
    assert torch.load(out, weights_only=True)["net"] == 1
    assert (f"net 1 (best by val_acc at epoch {read_state(ckpt).epoch} of {tmp_path / 'run' / 'metrics.jsonl'}: "
            "61.20% vs 60.95%)") in capsys.readouterr().out


def test_by_val_without_a_validation_split_is_an_error(run, tmp_path, capsys):
    ckpt = copy_run(run, tmp_path / "run", 70.0, 80.0)
    out = tmp_path / "m.pt"
    assert export.main([str(ckpt), "--out", str(out), "--by", "val"]) == 2
    err = capsys.readouterr().err
    assert "--by val" in err and "no validation split" in err and "data.noisy_val_fraction" in err
    assert "data.eval_splits: [val, test]" in err
    assert str(tmp_path / "run" / "metrics.jsonl") in err and len(err.strip().splitlines()) == 1
    assert not out.exists()
    # Without metrics there is nothing to judge by: --by val fails where auto falls back to net 1.
    (tmp_path / "run" / "metrics.jsonl").unlink()
    assert export.main([str(ckpt), "--out", str(out), "--by", "val"]) == 2
    assert "--by val: no metrics.jsonl next to the checkpoint" in capsys.readouterr().err
    assert export.main([str(ckpt), "--out", str(out)]) == 0
    # --by judges for --net best only.
    with pytest.raises(SystemExit):
        export.parse_args([str(ckpt), "--out", str(out), "--net", "1", "--by", "val"])
    assert "--by goes with --net best" in capsys.readouterr().err


def test_errors(run, tmp_path, capsys):
    ckpt = copy_run(run, tmp_path / "run", 1.0, 2.0)
    (tmp_path / "run" / "metrics.jsonl").write_text('{"epoch": 1, "test_acc1": 1, "test_acc2": 2}\n{oops\n')
    assert export.main([str(ckpt), "--out", str(tmp_path / "m.pt")]) == 2
    assert f"{tmp_path / 'run' / 'metrics.jsonl'}, line 2" in capsys.readouterr().err

    missing = tmp_path / "missing.pt"
    assert export.main([str(missing), "--out", str(tmp_path / "m.pt")]) == 2
    assert str(missing) in capsys.readouterr().err

    not_exported = tmp_path / "plain.pt"
    torch.save({"weights": torch.zeros(2)}, not_exported)
    with pytest.raises(CheckpointError, match=str(not_exported)):
        export.load_exported(not_exported)
