"""docs/clothing1m.md, done: every command of the page, in the page's order, read from its bash
blocks and run on a miniature generated release (2 ranks, a few steps, 32-pixel crops).

The test changes only what makes the commands small, each change listed in ``small`` with its
reason; the folders the page's variables name are the test's own. The single-node command
trains the first epoch and the several-node command (two torchrun agents on this machine,
one worker each) resumes and trains the second, so both are run for real."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import pytest

from helpers import REPO, child_env, free_port, metric_rows
from shard_fixtures import make_clothing1m

pytestmark = pytest.mark.slow  # prepare, three torchrun runs, a three-run sweep: about a minute

PAGE = REPO / "docs" / "clothing1m.md"
TIMEOUT_S = 240

# Train small: 32-pixel crops of 36-pixel images, batch 8, two steps an epoch, a one-epoch ramp.
SMALL_TRAIN = ("data.resize_size=36 data.crop_size=32 data.num_workers=1 train.batch_size=8 train.steps_per_epoch=2 "
               "method.num_gradual=1 log.progress=never")


def page_commands() -> list[str]:
    """The commands of the page's bash blocks, in order: continuation lines joined, comments
    and blank lines dropped."""
    commands = []
    for block in re.findall(r"```bash\n(.*?)```", PAGE.read_text(), re.S):
        for line in block.replace("\\\n", " ").splitlines():
            line = re.sub(r"\s+#.*$", "", line).strip()
            if line:
                commands.append(line)
    return commands


def substitutions(tmp_path, ports: dict) -> list[tuple[str, str]]:
    """What makes the page's commands small; every change says why."""
    return [
        # The miniature's images are 24-48 px: shards at a short side of 40, not 256.
        ("--resize 256", "--resize 40"),
        # One node with 2 CPU workers, on a free port of this machine.
        ("torchrun --nproc_per_node=8 -m",
         f"torchrun --nproc_per_node=2 --master_addr=127.0.0.1 --master_port={ports['one']} -m"),
        # Two "nodes" on this machine, one worker each, the rendezvous on a free port.
        ("--nproc_per_node=8 --rdzv_backend", "--nproc_per_node=1 --rdzv_backend"),
        (":29500", f":{ports['rdzv']}"),
        # The sweep: the shipped file with its runs made small and kept in the test's folder.
        ("configs/sweeps/clothing1m_tau.yaml", str(tmp_path / "clothing1m_tau.yaml")),
        ("--gpus-per-run 8", "--gpus none --procs 1"),
    ]


def small(command: str, tmp_path, ports: dict, used: set) -> str:
    """The page's command made small (``used`` collects the substitutions that applied)."""
    for old, new in substitutions(tmp_path, ports):
        if old in command:
            used.add(old)
        command = command.replace(old, new)
    if "jocor_ddp.train" in command:
        # The single-node command trains epoch 1; the several-node one resumes and trains epoch 2.
        epochs = 2 if "--nnodes" in command else 1
        command += f" {SMALL_TRAIN} train.epochs={epochs}"
    return command


def small_sweep(tmp_path, shards) -> None:
    """configs/sweeps/clothing1m_tau.yaml with its runs small (its base and axes kept)."""
    import yaml
    sweep = yaml.safe_load((REPO / "configs" / "sweeps" / "clothing1m_tau.yaml").read_text())
    sweep["dir"] = str(tmp_path / "sweep")
    overrides = dict(o.split("=", 1) for o in SMALL_TRAIN.split())
    sweep["overrides"] = {**{k: yaml.safe_load(v) for k, v in overrides.items()}, "train.epochs": 2,
                          "data.shards": str(shards)}
    (tmp_path / "clothing1m_tau.yaml").write_text(yaml.safe_dump(sweep))


def run(command: str, env: dict, nodes: int = 1) -> list[str]:
    """Run one command in bash (the page's $(...) and $VARS), ``nodes`` copies at once; fail with
    its output."""
    procs = [subprocess.Popen(["bash", "-c", command], cwd=REPO, env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True, start_new_session=True) for _ in range(nodes)]
    try:
        outputs = [p.communicate(timeout=TIMEOUT_S)[0] for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                os.killpg(p.pid, 9)
    for p, out in zip(procs, outputs):
        assert p.returncode == 0, f"{command}\nexited {p.returncode}:\n{out[-4000:]}"
    return outputs


def test_the_clothing1m_page_from_the_release_to_a_test_accuracy(tmp_path):
    # 288 training images: 20 a class, the least method.forget_rate: auto estimates from.
    make_clothing1m(tmp_path / "release", n_train=288, n_val=10, n_test=12, n_clean_train=8)
    folders = {"RELEASE": tmp_path / "release", "SHARDS": tmp_path / "shards", "RUN": tmp_path / "runs" / "c1m"}
    env = child_env(HEAD="127.0.0.1", **{k: str(v) for k, v in folders.items()})
    env["PATH"] = f"{os.path.dirname(sys.executable)}{os.pathsep}{env['PATH']}"  # python and torchrun of this venv
    ports = {"one": free_port(), "rdzv": free_port()}
    small_sweep(tmp_path, folders["SHARDS"])

    commands = page_commands()
    assignments = [c for c in commands if re.match(r"^[A-Z_]+=", c)]
    assert sorted(a.split("=")[0] for a in assignments) == sorted(folders)  # the page names no other folder
    out, used = {}, set()
    for command in (c for c in commands if c not in assignments):
        nodes = 2 if "--nnodes=2" in command else 1
        out[command] = run(small(command, tmp_path, ports, used), env, nodes)[0]
    said = "\n".join(out.values())
    # Every substitution met its command: a page edited away from the test fails here, not silently.
    assert used == {old for old, _ in substitutions(tmp_path, ports)}

    # Both splits scored every epoch, named on the start-up and epoch lines and in metrics.jsonl.
    assert re.search(r"\(288 train / 10 val / 12 test\)", said), said
    rows = metric_rows(folders["RUN"])
    assert [r["epoch"] for r in rows] == [1, 2] and all(r["steps"] == 2 for r in rows)
    assert all(r["val_samples"] == 10 and r["test_samples"] == 12 for r in rows)
    assert "resumed from" in said  # the several-node command continued the single-node run

    # The report's headline: the test accuracy at the best validation epoch, by hand.
    mean = lambda r, s: (r[f"{s}_acc1"] + r[f"{s}_acc2"]) / 2  # noqa: E731
    best = max(rows, key=lambda r: mean(r, "val"))
    summary = json.loads((folders["RUN"] / "report" / "report.json").read_text())[0]
    assert summary["val_split"] == "val" and summary["best_val_epoch"] == best["epoch"]
    assert summary["test_acc_at_best_val"] == pytest.approx(mean(best, "test"))
    assert "best by val_acc" in said  # export judged the networks by the clean val split
    assert (folders["RUN"] / "clothing1m.pt").is_file() and (folders["RUN"] / "audit.csv").is_file()
    # Its epochs drew 16 of 288 samples: not kept there says nothing, so the audit's kept-share rule is off.
    audited = json.loads((folders["RUN"] / "audit.json").read_text())
    assert audited["kept_share_epochs"] == 0 and "draw a subset of the training split" in audited["rule"]

    # The sweep's pick: the tau whose run has the best last-10 mean clean val accuracy, by hand.
    last = {tau: metric_rows(tmp_path / "sweep" / f"forget_rate{tau}") for tau in ("0.2", "0.3", "0.4")}
    by_val = {tau: sum(mean(r, "val") for r in rows[-10:]) / len(rows[-10:]) for tau, rows in last.items()}
    picked = max(by_val, key=by_val.get)  # the first of equals, in the axis order
    pick = (tmp_path / "sweep" / "report" / "pick.md").read_text()
    assert "(the clean validation split)" in pick and f"| all | forget_rate{picked} | " in pick
