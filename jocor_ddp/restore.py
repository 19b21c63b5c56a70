"""What the offline commands (evaluate, audit, export, report) share: a checkpoint turned
back into its config, its network pair and, when asked, its data; scoring a split with
the pair; reading a run's metrics.jsonl; and the one-line errors of their command lines.

These commands run in one process: rank 0 of a world of one, on CUDA when available.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Iterator, Optional

import torch

from .checkpoint import CheckpointError
from .config import Config, ConfigError, config_from_dict
from .data import DataBundle, DataError, build_data
from .dist import DistContext
from .models import ModelPair, build_pair
from .progress import Progress, progress_enabled
from .state import TrainingState, read_state
from .step import autocast


class CommandError(RuntimeError):
    """A command cannot go on; the message says why and names the file."""


# Errors a user can fix: printed as one line, exit code 2 (no traceback).
EXPECTED = (CommandError, CheckpointError, ConfigError, DataError)


def guarded(command: Callable, *args) -> int:
    """Run ``command(*args)``: exit code 0, or 2 with a one-line message for an expected error."""
    try:
        command(*args)
        return 0
    except EXPECTED as exc:
        print(f"error: {exc}", file=sys.stderr, flush=True)
        return 2


def pick_device(requested: str = "auto") -> torch.device:
    if requested == "cuda" or (requested == "auto" and torch.cuda.is_available()):
        if not torch.cuda.is_available():
            raise CommandError("--device cuda: CUDA is not available")
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def run_dir_of(checkpoint: str | Path) -> Optional[Path]:
    """RUN for RUN/checkpoints/step-N.pt, else None."""
    parent = Path(checkpoint).resolve().parent
    return parent.parent if parent.name == "checkpoints" else None


def write_json(path: Path, obj) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj, indent=1) + "\n")


# --- metrics.jsonl --------------------------------------------------------------------

REQUIRED_METRICS = ("epoch", "test_acc1", "test_acc2")


def read_metrics(path: str | Path) -> list[dict]:
    """The rows of a metrics.jsonl, one per epoch, in epoch order (a row logged twice for
    one epoch counts once: the later one). Errors name the file and the line."""
    path = Path(path)
    if not path.is_file():
        raise CommandError(f"{path}: not found (a run folder holds the metrics.jsonl the trainer writes)")
    rows: dict[int, dict] = {}
    for n, line in enumerate(path.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except ValueError as exc:
            raise CommandError(f"{path}, line {n}: not valid JSON ({exc})") from None
        if not isinstance(row, dict):
            raise CommandError(f"{path}, line {n}: expected a JSON object, got {type(row).__name__}")
        missing = [k for k in REQUIRED_METRICS if not isinstance(row.get(k), (int, float))]
        if missing:
            raise CommandError(f"{path}, line {n}: no number for {', '.join(missing)}")
        rows[int(row["epoch"])] = row
    if not rows:
        raise CommandError(f"{path}: empty (no epoch has finished yet)")
    return [rows[e] for e in sorted(rows)]


# --- a checkpoint back into config, networks and data ------------------------------------

@dataclass
class Restored:
    path: Path
    state: TrainingState
    cfg: Config
    pair: ModelPair
    device: torch.device
    meta: dict  # name, classes, in_channels, image_size, normalization
    data: Optional[DataBundle] = None

    def autocast(self):
        """The precision the run was trained and evaluated in, so that scores match metrics.jsonl."""
        return autocast(self.state.precision, self.device)

    @torch.no_grad()
    def score(self, batches: Iterable, total: int, desc: str) -> Iterator[tuple]:
        """(batch, logits1, logits2) for every batch, logits in fp32; a progress bar on a terminal."""
        self.pair.eval()
        bar = Progress(total, desc, progress_enabled("auto", True))
        done = 0
        for batch in batches:
            with self.autocast():
                logits1, logits2 = self.pair(batch.x)
            done += batch.y.shape[0]
            bar.update(done)
            yield batch, logits1.float(), logits2.float()
        bar.close()


def checkpoint_config(state: TrainingState, path: Path, *, shards: Optional[str] = None,
                      split: Optional[str] = None, root: Optional[str] = None) -> Config:
    """The run's resolved config, with the data overrides of the command line."""
    tree = copy.deepcopy(state.config)
    if not isinstance(tree, dict) or not isinstance(tree.get("data", {}), dict):
        raise CheckpointError(f"checkpoint {path}: holds no config")
    data = tree.setdefault("data", {})
    if shards is not None:
        data.update(source="shards", shards=shards)
    if split is not None:
        data["eval_split"] = split
    if root is not None:
        data["root"] = root
    try:
        return config_from_dict(tree)
    except ConfigError as exc:
        raise ConfigError(f"checkpoint {path}: its config cannot be used here: {exc}") from None


def restore(path: str | Path, *, with_data: bool, shards: Optional[str] = None, split: Optional[str] = None,
            root: Optional[str] = None, device: str = "auto") -> Restored:
    """Load ``path`` (safely), rebuild its config and pair on the device, and the data when
    ``with_data`` (or when the checkpoint has no data_meta to size the networks with)."""
    path = Path(path)
    state = read_state(path)
    cfg = checkpoint_config(state, path, shards=shards, split=split, root=root)
    dev = pick_device(device)
    meta = state.data_meta
    bundle = None
    if with_data or meta is None:
        bundle = build_data(cfg, DistContext(device=dev))
        if meta is None:
            meta = bundle.meta
        elif len(meta["classes"]) != bundle.num_classes:
            raise CommandError(f"the data ({bundle.name}) has {bundle.num_classes} classes; checkpoint "
                               f"{path} was trained on {len(meta['classes'])}")
    # Initial weights (model.weights) are overwritten at once: do not read that file again.
    model_cfg = dataclasses.replace(cfg.model, weights=None)
    pair = build_pair(model_cfg, meta["in_channels"], len(meta["classes"]), meta["image_size"])
    try:
        pair.load_state_dict(state.model)
    except (RuntimeError, KeyError, TypeError) as exc:
        raise CheckpointError(
            f"checkpoint {path}: its weights do not fit a {cfg.model.arch} pair for {len(meta['classes'])} "
            f"classes and {meta['in_channels']}x{meta['image_size']}x{meta['image_size']} inputs: "
            f"{str(exc).splitlines()[0]}") from None
    return Restored(path, state, cfg, pair.to(dev).eval(), dev, meta, bundle)


def add_restore_args(p, *, data: bool = True) -> None:
    """The arguments evaluate and audit share."""
    p.add_argument("checkpoint", help="a checkpoint file, e.g. RUN/checkpoints/step-N.pt")
    if data:
        p.add_argument("--shards", metavar="DIR",
                       help="read the data from this shard folder (data.source=shards) instead of "
                            "the checkpoint config's data.source / data.root")
        p.add_argument("--root", metavar="DIR", help="override the config's data.root (raw dataset folder)")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto",
                   help="where to run the networks (default: CUDA when available)")


def atomic_save(obj, path: Path) -> None:
    """torch.save to a temporary file, then rename: a crash leaves no half-written file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    torch.save(obj, tmp)
    os.replace(tmp, path)
