"""One tiny real training run (MNIST-format data, MLP pair, 2 epochs, CPU) shared by the
tests of the offline commands (evaluate, export, audit, report): the session fixture
``tiny_run`` (conftest.py) trains it once per session; tests that damage files work on copies."""

from __future__ import annotations

from pathlib import Path

from helpers import run_python, train_args

from jocor_ddp.checkpoint import list_checkpoints

EPOCHS, N_TRAIN, N_TEST = 2, 256, 64


def train_tiny_run(data: Path, run: Path) -> Path:
    run_python(train_args(data, run, "model.arch=mlp", "train.batch_size=32", f"train.epochs={EPOCHS}"))
    return run


def final_checkpoint(run: Path) -> Path:
    return list_checkpoints(run / "checkpoints")[0]
