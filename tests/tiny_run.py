"""One tiny real training run (MNIST-format data, MLP pair, 2 epochs, CPU) shared by the
tests of the offline commands (evaluate, export, audit, report): trained once per
session; tests that damage files work on copies."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from helpers import make_mnist, run_python

from jocor_ddp.checkpoint import list_checkpoints

EPOCHS, N_TRAIN, N_TEST = 2, 256, 64


def tiny_run(tmp_path_factory) -> Path:
    base = tmp_path_factory.getbasetemp() / "tiny_run"
    run = base / "run"
    if not (run / "metrics.jsonl").is_file():
        shutil.rmtree(base, ignore_errors=True)
        root = make_mnist(base / "mnist", n_train=N_TRAIN, n_test=N_TEST)
        run_python(["-m", "jocor_ddp.train", "data.name=mnist", f"data.root={root}", "model.arch=mlp",
                    "train.batch_size=32", f"train.epochs={EPOCHS}", "log.progress=never", f"run.dir={run}"])
    return run


def final_checkpoint(run: Path) -> Path:
    return list_checkpoints(run / "checkpoints")[0]


def metrics_rows(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]
