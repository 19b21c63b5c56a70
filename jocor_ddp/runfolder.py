"""A run folder's layout, RUN/{config.yaml, noise.json, metrics.jsonl, checkpoints/, tensorboard/}
(the trainer writes it: ``runlog``, ``checkpoint``), and the one reader of its metrics.jsonl: read
once, leniently for where a run stands, strictly (``Metrics.checked``) for what is averaged or
judged."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

CONFIG, NOISE, METRICS, CHECKPOINTS, TENSORBOARD = (
    "config.yaml", "noise.json", "metrics.jsonl", "checkpoints", "tensorboard")
REQUIRED_METRICS = ("epoch", "test_acc1", "test_acc2")


class RunFolderError(RuntimeError):
    """A run folder's file is missing or damaged; the message names the file and the line."""


def run_dir_of(checkpoint: str | Path) -> Optional[Path]:
    """RUN for RUN/checkpoints/step-N.pt, else None."""
    parent = Path(checkpoint).resolve().parent
    return parent.parent if parent.name == CHECKPOINTS else None


@dataclass
class Metrics:
    """A metrics.jsonl: its rows, one per epoch in epoch order (a row logged twice for one epoch
    counts once: the later one), and the first thing wrong with it."""
    path: Path
    rows: list[dict]        # every JSON object with an epoch number (a line cut short by a crash is left out)
    problem: Optional[str]  # None when the file holds rows and each has epoch, test_acc1, test_acc2

    def checked(self) -> list[dict]:
        """The rows, or an error naming the file and the line."""
        if self.problem:
            raise RunFolderError(self.problem)
        return self.rows


def read_metrics(path: str | Path) -> Metrics:
    path = Path(path)
    if not path.is_file():
        return Metrics(path, [], f"{path}: not found (a run folder holds the metrics.jsonl the trainer writes)")
    rows, problem = {}, None
    for n, line in enumerate(path.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            error = None if isinstance(row, dict) else f"expected a JSON object, got {type(row).__name__}"
        except ValueError as exc:
            row, error = None, f"not valid JSON ({exc})"
        if isinstance(row, dict):
            missing = [k for k in REQUIRED_METRICS if not isinstance(row.get(k), (int, float))]
            error = f"no number for {', '.join(missing)}" if missing else None
            if isinstance(row.get("epoch"), (int, float)):
                rows[int(row["epoch"])] = row
        problem = problem or (error and f"{path}, line {n}: {error}")
    if not rows and problem is None:
        problem = f"{path}: empty (no epoch has finished yet)"
    return Metrics(path, [rows[e] for e in sorted(rows)], problem)


def has_val(rows: list[dict]) -> bool:
    """Whether every row scores the validation split (runs with data.val_fraction > 0)."""
    return all(isinstance(r.get(k), (int, float)) for r in rows for k in ("val_acc1", "val_acc2"))


def write_json(path: Path, obj) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj, indent=1) + "\n")
