"""The training state: the typed, versioned record of what a checkpoint holds.

The trainer writes one ``TrainingState`` per checkpoint; each part that owns state saves
and loads its own part through ``state_dict`` / ``load_state_dict`` (the Stateful protocol
of torch.distributed.checkpoint), and this record only names the parts:

- ``step``: the step's optimizer, GradScaler, skipped-step total and, mid-epoch, the
  epoch's counters (``step.TrainStep``);
- ``data``: the training loader's bad-sample total of the epoch so far (``data.BadSamples``);
- ``forget_rate``: tau as decided, with the auto estimate (``schedule.ForgetRate``,
  ``autorate.AutoForgetRate``);
- ``history``: which samples were kept in recent epochs (``step.KeptHistory``);
- ``transition``: F-correction's transition matrix and its source (``correction.Transition``),
  None for the other methods and in checkpoints written before it.

Beside them: the position (epoch, step in it, global step), the pair's weights, every
rank's RNG, the resolved config and what the offline commands need to rebuild the pair
(``data_meta``). A file is a plain dict of tensors and containers, so ``torch.load`` reads it
with ``weights_only=True``. ``read_state`` is the one reader, for the trainer and the
offline commands alike; it also reads the format-1 files written before this record.
"""

from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from .checkpoint import CheckpointError, load_checkpoint
from .config import ConfigError, config_from_dict
from .schedule import decide_forget_rate

FORMAT = 2


@dataclass
class TrainingState:
    epoch: int              # the epoch in progress (0-based); every earlier one is done, with its metrics row
    step_in_epoch: int      # steps of it done
    global_step: int
    config: dict            # the resolved config
    world_size: int
    precision: str
    data_meta: dict         # name, classes, in_channels, image_size, normalization
    model: dict             # the pair's state_dict
    step: dict              # TrainStep.state_dict()
    forget_rate: dict       # ForgetRate.state_dict(), plus the auto estimate ("estimate", "final")
    history: dict           # KeptHistory.state_dict()
    rng: list               # every rank's RNG states, by rank
    data: Optional[dict] = None  # BadSamples.state_dict() mid-epoch, else None
    transition: Optional[dict] = None  # Transition.state_dict() where the method corrects with T, else None
    versions: dict = field(default_factory=dict)  # package and torch that wrote it

    @property
    def final_tau(self) -> float:
        """The run's tau now: the fixed one, or with auto the latest estimate (else the fallback)."""
        estimate = self.forget_rate.get("estimate")
        return estimate if self.forget_rate["auto"] and estimate is not None else self.forget_rate["tau"]

    def to_dict(self) -> dict:
        # Not dataclasses.asdict: it would deep-copy every tensor.
        return {"format": FORMAT, **{f.name: getattr(self, f.name) for f in dataclasses.fields(self)}}


def read_state(path: str | Path) -> TrainingState:
    """A checkpoint file as a TrainingState (safely loaded; format 1 converted); errors name the file."""
    raw = load_checkpoint(path)
    try:
        if raw.get("format") == 1:
            raw = _from_format_1(raw)
        elif raw.get("format") != FORMAT:
            raise CheckpointError(f"checkpoint {path}: format {raw.get('format')!r}; this version reads 1 and {FORMAT}")
        names = {f.name for f in dataclasses.fields(TrainingState)}
        return _checked(TrainingState(**{k: v for k, v in raw.items() if k in names}))
    except (KeyError, TypeError, ConfigError) as exc:
        raise CheckpointError(f"checkpoint {path}: incomplete or damaged ({type(exc).__name__}: {exc})") from None


def _checked(state: TrainingState) -> TrainingState:
    """``state`` if each part is of its declared type (and a count not negative), else a
    TypeError naming the part: a damaged field must fail here, not deep in the command that reads it."""
    for name, hint in typing.get_type_hints(TrainingState).items():
        value = getattr(state, name)
        kinds = tuple(typing.get_args(hint)) or (hint,)  # Optional[dict]: (dict, NoneType)
        if not isinstance(value, kinds) or (isinstance(value, bool) and bool not in kinds):
            raise TypeError(f"{name} is a {type(value).__name__}, not a {' or '.join(k.__name__ for k in kinds)}")
        if isinstance(value, int) and value < 0:
            raise TypeError(f"{name} is {value}, a negative count")
    return state


def _from_format_1(old: dict) -> dict:
    """The 22-key dict written before format 2, as the parts of a TrainingState."""
    counters = old["epoch_counters"]
    bad = None
    if counters is not None:  # its fourth count was the bad samples left out so far
        bad = {"bad_samples": int(counters["counts"][3])}
        counters = dict(counters, counts=counters["counts"][:3])
    auto = old.get("forget_rate_auto")
    cfg = config_from_dict(old["config"])
    if auto is not None:  # the trainer estimated tau (asked for, or the labels came noisy)
        forget = {"auto": True, "tau": cfg.method.forget_rate_fallback, "why": "auto", **auto}
    else:
        forget = decide_forget_rate(cfg.method, cfg.noise, labels_noisy=False).state_dict()
    return {
        "epoch": old["epoch"], "step_in_epoch": old["step_in_epoch"], "global_step": old["global_step"],
        "config": old["config"], "world_size": old["world_size"], "precision": old.get("precision", "fp32"),
        "data_meta": old.get("data_meta"), "model": old["model"], "rng": old["rng"], "data": bad,
        "step": {"optimizer": old["optimizer"], "scaler": old["scaler"], "skipped_steps": old["skipped_steps"],
                 "counters": counters},
        "forget_rate": forget,
        "history": {"bits": old.get("kept_history"), "epochs": old.get("kept_history_epochs"),
                    "kept": old.get("kept_epoch")},
        "versions": {"package": old.get("package_version"), "torch": old.get("torch_version")},
    }
