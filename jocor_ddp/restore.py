"""What the offline commands (evaluate, audit, export) share: a checkpoint turned back into its
config, its network pair and, when asked, its data, and scoring a split with the pair.

These commands run in one process: rank 0 of a world of one, on CUDA when available.
"""

from __future__ import annotations

import copy
import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Iterator, Optional

import torch

from .checkpoint import CHECKPOINT_RE, CheckpointError
from .config import Config, ConfigError, config_from_dict, upgrade_config, written_before_refinement
from .data import DataBundle, DataError, build_data
from .dist import DistContext, pick_device
from .job import CommandError
from .models import ModelPair, build_pair
from .progress import Progress, progress_enabled
from .runfolder import CHECKPOINTS, CONFIG, METRICS, NOISE, TRANSITION
from .state import TrainingState, read_state
from .step import autocast


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
    """The run's resolved config, with the data overrides of the command line (``split``: the
    one evaluation split to score, beside test, which every config scores)."""
    tree = copy.deepcopy(state.config)
    if not isinstance(tree, dict) or not isinstance(tree.get("data", {}), dict):
        raise CheckpointError(f"checkpoint {path}: holds no config")
    try:
        # A checkpoint of an earlier version: today's names and what it did, before the overrides.
        tree = written_before_refinement(upgrade_config(tree))
        data = tree.setdefault("data", {})
        if shards is not None:
            data.update(source="shards", shards=shards)
        if split is not None:
            data["eval_splits"] = [split] if split == "test" else [split, "test"]
        if root is not None:
            data["root"] = root
        return config_from_dict(tree)
    except ConfigError as exc:
        raise ConfigError(f"checkpoint {path}: its config cannot be used here: {exc}") from None


def _check_meta(meta: Any, path: Path) -> None:
    """The sizes the pair is rebuilt with: a damaged record must fail here, by name."""
    ok = (isinstance(meta, dict) and isinstance(meta.get("classes"), list) and meta["classes"]
          and all(isinstance(meta.get(k), int) and meta[k] > 0 for k in ("in_channels", "image_size")))
    if not ok:
        raise CheckpointError(f"checkpoint {path}: its data_meta is incomplete or damaged (classes, in_channels "
                              f"and image_size are needed to rebuild the pair): {str(meta)[:200]}")


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
    if meta is not None:
        _check_meta(meta, path)
    if with_data or meta is None:
        try:
            bundle = build_data(cfg, DistContext(device=dev))
        except DataError as exc:  # the data is the checkpoint's config's: say whose, or a stray file hides it
            raise DataError(f"checkpoint {path}: its data ({cfg.data.name}): {exc}") from None
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


def check_out(out: Path) -> None:
    """An output file of an offline command must not overwrite a run's own record: a checkpoint,
    or config.yaml, noise.json, transition.json, metrics.jsonl of a run folder."""
    folder = out.parent
    in_run = (folder / METRICS).is_file() or (folder / CHECKPOINTS).is_dir()
    if (folder.name == CHECKPOINTS and CHECKPOINT_RE.match(out.name)) or (
            in_run and out.name in (CONFIG, NOISE, TRANSITION, METRICS)):
        raise CommandError(f"--out {out}: would overwrite the run's own {out.name}; name another file")


def add_restore_args(p) -> None:
    """The arguments evaluate and audit share."""
    p.add_argument("checkpoint", help="a checkpoint file, e.g. RUN/checkpoints/step-N.pt")
    p.add_argument("--shards", metavar="DIR",
                   help="read the data from this shard folder (data.source=shards) instead of "
                        "the checkpoint config's data.source / data.root")
    p.add_argument("--root", metavar="DIR", help="override the config's data.root (raw dataset folder)")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto",
                   help="where to run the networks (default: CUDA when available)")
