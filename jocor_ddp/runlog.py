"""The run folder's record: config.yaml and noise.json when a run starts (once its checkpoint
is read), transition.json once
the run's F-correction matrix is settled (after a resume), one metrics.jsonl
row per epoch (with TensorBoard scalars under log.tensorboard), the epoch line on stdout,
and the rows of epochs a checkpoint does not hold dropped on resume. Rank 0 writes; a
failure to write is raised on every rank."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

from .config import Config, ConfigError, dump_config
from .dist import DistContext, agree
from .runfolder import (CONFIG, METRICS, NOISE, NOISY_VAL, TENSORBOARD, TRANSITION, acc_keys, earlier_names,
                        read_metrics, split_words, write_json)


class RunLog:
    def __init__(self, cfg: Config, ctx: DistContext, noise: Optional[dict]):
        self.cfg, self.ctx, self.noise = cfg, ctx, noise
        self.dir = Path(cfg.run.dir)
        self.metrics = self.dir / METRICS
        agree(ctx, lambda: self._writing(lambda: self.dir.mkdir(parents=True, exist_ok=True)))
        self.tensorboard = self._open_tensorboard()

    def _writing(self, fn) -> None:
        try:
            fn()
        except OSError as exc:
            raise ConfigError(f"run.dir: cannot write the run folder {self.dir}: {exc}") from None

    def begin(self, completed_epochs: int) -> None:
        """config.yaml and noise.json, and the rows of epochs after ``completed_epochs`` dropped:
        on rank 0 (inside dist.agree), once the run knows where it starts, so that a start refused
        on a bad checkpoint leaves the folder as it was."""
        self.record()
        self.truncate(completed_epochs)

    def record(self) -> None:
        """config.yaml and noise.json alone (rank 0, inside dist.agree): a job that trains no run
        of its own (estimate_noise) keeps its folder's rows."""
        self._writing(self._write_record)

    def _write_record(self) -> None:
        if self.metrics.is_file() and earlier_names(self.dir)[0]:
            # Written by an earlier version: its rows take today's names before config.yaml,
            # which says how to read them, is rewritten (read_metrics drops a line cut short).
            self.metrics.write_text("".join(json.dumps(r) + "\n" for r in read_metrics(self.metrics).rows))
        (self.dir / CONFIG).write_text(dump_config(self.cfg))
        if self.noise is not None:
            (self.dir / NOISE).write_text(json.dumps(self.noise, indent=1))

    def write_transition(self, record: dict) -> None:
        """RUN/transition.json: the matrix the run corrects with and where it came from."""
        def write() -> None:
            try:
                write_json(self.dir / TRANSITION, record)
            except OSError as exc:
                raise ConfigError(f"run.dir: cannot write {self.dir / TRANSITION}: {exc}") from None
        agree(self.ctx, write)

    def _open_tensorboard(self):
        if not self.cfg.log.tensorboard:
            return None
        try:  # checked on every rank (the same environment), so no rank waits for a failed one
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            raise ConfigError("log.tensorboard: true needs the tensorboard package: "
                              "pip install -e .[tensorboard]") from None
        return SummaryWriter(str(self.dir / TENSORBOARD)) if self.ctx.is_main else None

    def write(self, row: dict, forget_words: str = "") -> None:
        """One epoch's row: metrics.jsonl, TensorBoard, and the epoch line (``forget_words``:
        what follows the forget rate there, e.g. how method.forget_rate auto set it)."""
        if not self.ctx.is_main:
            return
        with open(self.metrics, "a") as f:
            f.write(json.dumps(row) + "\n")
        if self.tensorboard is not None:
            for key, value in row.items():
                if key != "epoch" and isinstance(value, (int, float)):
                    self.tensorboard.add_scalar(key, value, row["epoch"])
            self.tensorboard.flush()
        precision = row["label_precision"]
        precision_s = f"{100 * precision:.2f}%" if precision is not None else "n/a"
        scored = "  ".join(f"{split_words(split)} acc {row[acc1]:.2f}% / {row[acc2]:.2f}%"
                           for split in (*self.cfg.data.eval_splits, NOISY_VAL)
                           for acc1, acc2 in [acc_keys(split)] if acc1 in row)
        print(f"epoch {row['epoch']:>3}/{self.cfg.train.epochs}  lr {row['lr']:.2e}  "
              f"forget {row['forget_rate']:.3f}{forget_words}  loss {row['train_loss']:.4f}  "
              f"label precision {precision_s}  {scored}  "
              f"{row['samples_per_s']:.0f} samples/s  {row['epoch_s']:.1f}s", flush=True)

    def truncate(self, completed_epochs: int) -> None:
        """Drop rows of epochs after the checkpoint: a crash between a row and its checkpoint
        must not leave the row twice once the epoch is trained again (nor a line it cut short)."""
        if not self.metrics.is_file():
            return
        keep = [row for row in read_metrics(self.metrics).rows if row["epoch"] <= completed_epochs]
        text = "".join(json.dumps(row) + "\n" for row in keep)
        if text != self.metrics.read_text():
            self.metrics.write_text(text)

    def close(self) -> None:
        if self.tensorboard is not None:
            self.tensorboard.close()
