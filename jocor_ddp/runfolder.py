"""A run folder's layout, RUN/{config.yaml, noise.json, transition.json, metrics.jsonl, checkpoints/, tensorboard/}
(the trainer writes it: ``runlog``, ``checkpoint``), the names of its metrics, and the one reader of
its metrics.jsonl: read once, leniently for where a run stands, strictly (``Metrics.checked``) for
what is averaged or judged, and in today's names whichever version wrote it.

Every scored split S is logged as S_acc1, S_acc2 (the two networks, percent) and S_samples: the
evaluation splits under their own names (test, val, ...), the held-out share of the noisy
training labels as noisy_val."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import yaml

CONFIG, NOISE, TRANSITION, METRICS, CHECKPOINTS, TENSORBOARD = (
    "config.yaml", "noise.json", "transition.json", "metrics.jsonl", "checkpoints", "tensorboard")
REQUIRED_METRICS = ("epoch", "test_acc1", "test_acc2")
# The held-out share of the training split with its noisy labels (data.noisy_val_fraction), as scored.
NOISY_VAL = "noisy_val"
# The splits a run is judged by, in the order of preference: clean labels measure what is wanted;
# accuracy against noisy labels is a biased stand-in (docs/tools.md, Choosing by validation).
VALIDATION_SPLITS = ("val", NOISY_VAL)


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
    """The rows of RUN/metrics.jsonl, in today's names (``earlier_names``)."""
    path = Path(path)
    if not path.is_file():
        return Metrics(path, [], f"{path}: not found (a run folder holds the metrics.jsonl the trainer writes)")
    renames, scored = earlier_names(path.parent)
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
            row = {renames.get(k, k): v for k, v in row.items()}
            missing = [k for k in REQUIRED_METRICS if not isinstance(row.get(k), (int, float))]
            error = f"no number for {', '.join(missing)}" if missing else None
            if error and scored != "test":
                error += (f" (its {CONFIG} says data.eval_split: {scored}: the run scored {scored}, logged as "
                          f"{scored}_acc1 / {scored}_acc2, and never test)")
            elif error and any(k.endswith("_acc1") for k in row):
                error += " (the run scored no test split: data.eval_splits in its config.yaml names none)"
            if isinstance(row.get("epoch"), (int, float)):
                rows[int(row["epoch"])] = row
        problem = problem or (error and f"{path}, line {n}: {error}")
    if not rows and problem is None:
        problem = f"{path}: empty (no epoch has finished yet)"
    return Metrics(path, [rows[e] for e in sorted(rows)], problem)


def earlier_names(run: Path) -> tuple[dict[str, str], str]:
    """(metrics.jsonl key -> today's name, the split its test_acc* scored) for a run folder: the
    renames are for runs written before data.eval_splits, known by data.eval_split in their
    config.yaml. Their val_acc* was the noisy held-out split (data.val_fraction), now noisy_val_acc*,
    and with data.eval_split: S other than test, test_acc* was S's accuracy, now S_acc*.
    Today's runs (and folders without a readable config.yaml): no renames, test."""
    try:
        data = (yaml.safe_load((run / CONFIG).read_text()) or {}).get("data")
    except (OSError, yaml.YAMLError, AttributeError):
        data = None
    if not isinstance(data, dict) or "eval_split" not in data:
        return {}, "test"
    split = str(data["eval_split"])
    renames = {f"val_{part}": f"{NOISY_VAL}_{part}" for part in ("acc1", "acc2", "samples")}
    if split != "test":
        renames.update({f"test_{part}": f"{split}_{part}" for part in ("acc1", "acc2", "samples")})
    return renames, split


def acc_keys(split: str) -> tuple[str, str]:
    """A split's accuracy keys in metrics.jsonl: net 1's and net 2's."""
    return f"{split}_acc1", f"{split}_acc2"


def split_words(split: str) -> str:
    """A split's name as the epoch line and the reports write it (noisy_val: 'noisy val')."""
    return split.replace("_", " ")


def has_split(rows: list[dict], split: str) -> bool:
    """Whether there are rows and every one scores ``split`` (both networks)."""
    return bool(rows) and all(isinstance(r.get(k), (int, float)) for r in rows for k in acc_keys(split))


def validation_split(rows: list[dict]) -> Optional[str]:
    """The split that judges a run: val (clean labels) where every row scores it, else the noisy
    held-out split, else None."""
    return next((s for s in VALIDATION_SPLITS if has_split(rows, s)), None)


def write_json(path: Path, obj) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj, indent=1) + "\n")
