"""A sweep: a base config and axes whose cross product is a list of ordinary runs.

    base: configs/fashion_mnist_sym50.yaml    # paths are relative to the working directory
    dir: runs/sweeps/fashion_mnist            # run folders go here, one per run
    overrides: {train.epochs: 200}            # optional: every run
    axes:                                     # the first axis varies slowest
      setting:                                # a named axis: value name -> overrides
        sym20: {noise.type: symmetric, noise.rate: 0.2}
        mnist_sym50: {config: configs/mnist_sym50.yaml}   # 'config' replaces the base config
      method.name: [jocor, coteaching]        # a key axis: values of one config key
      train.seed: [1, 2, 3]
    paper:                                    # optional: the paper's figures, setting -> method -> %
      sym20: {jocor: 98.06}

Each run is named from its axis values (``sym20-jocor-seed1``) and is an ordinary run folder
``DIR/NAME`` trained by ``python -m jocor_ddp.train``: its own config.yaml, metrics.jsonl and
checkpoints, resumed by the trainer's auto resume. ``load_sweep`` validates every run's config
before anything starts, naming the run and the key of the first bad value.
"""

from __future__ import annotations

import itertools
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import yaml

from .checkpoint import checkpoint_dir, list_checkpoints
from .config import Config, ConfigError, load_config, read_yaml_mapping
from .runfolder import METRICS, Metrics, read_metrics

TOP_KEYS = ("base", "dir", "overrides", "axes", "paper", "description")
METHOD_AXIS, SEED_AXIS = "method.name", "train.seed"
NAME_OK = re.compile(r"^[A-Za-z0-9_.+=-]+$")


class SweepError(ConfigError):
    """A sweep file or one of its runs is invalid; the message names the file, run and key."""


def yaml_value(value: Any) -> str:
    """A value as the right-hand side of a ``key=value`` override (read back as YAML)."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, list):  # data.eval_splits: [val, test]; JSON is YAML, read back as the list
        return json.dumps(value)
    text = str(value)
    try:
        plain = yaml.safe_load(text) == text and "\n" not in text
    except yaml.YAMLError:  # a character YAML refuses unquoted (a control character): JSON escapes it
        plain = False
    return text if plain else json.dumps(text)


def label(axis: str, value: Any) -> str:
    """How a key axis value names a run: strings as they are, numbers after the key's last
    part (train.seed 1 -> seed1)."""
    if isinstance(value, str):
        return value
    return f"{axis.rsplit('.', 1)[-1]}{yaml_value(value)}"


@dataclass
class Run:
    index: int
    name: str
    dir: Path
    config_path: str
    overrides: list[str]           # key=value, run.dir last
    labels: dict[str, str]         # axis -> the value's label
    cfg: Config = field(repr=False)

    @property
    def method(self) -> str:
        return self.cfg.method.name

    @property
    def seed(self) -> int:
        return self.cfg.train.seed

    @property
    def setting(self) -> str:
        """The run's row in the table: every axis value but the method's and the seed's."""
        parts = [v for a, v in self.labels.items() if a not in (METHOD_AXIS, SEED_AXIS)]
        return "-".join(parts) if parts else "all"

    def train_args(self) -> list[str]:
        return ["--config", self.config_path, *self.overrides]


@dataclass
class RunStatus:
    state: str        # finished, partial, not started
    epochs_done: int
    epochs: int
    metrics: Metrics = field(repr=False)

    @property
    def rows(self) -> list[dict]:
        return self.metrics.rows

    def __str__(self) -> str:
        if self.state == "finished":
            return "finished"
        if self.state == "partial":
            return f"unfinished ({self.epochs_done}/{self.epochs} epochs)"
        return "not started"


def status(run: Run) -> RunStatus:
    """Where a run stands, from its metrics.jsonl read once (a line cut short by a crash is left
    out: the epoch is trained again) and its checkpoints."""
    metrics = read_metrics(run.dir / METRICS)
    done = max((r["epoch"] for r in metrics.rows), default=0)
    epochs = run.cfg.train.epochs
    if done >= epochs:
        return RunStatus("finished", done, epochs, metrics)
    started = bool(metrics.rows) or bool(list_checkpoints(checkpoint_dir(run.dir)))
    return RunStatus("partial" if started else "not started", done, epochs, metrics)


@dataclass
class Sweep:
    path: Path
    dir: Path
    axes: dict[str, list[str]]           # axis -> its value labels, in order
    runs: list[Run]
    paper: dict[str, dict[str, float]]   # setting -> method -> the paper's figure
    description: str = ""

    def select(self, where: list[str]) -> list[Run]:
        """The runs whose axis labels match every ``AXIS=V1,V2`` filter (all runs without)."""
        runs = self.runs
        for item in where:
            axis, sep, values = item.partition("=")
            if not sep or axis not in self.axes:
                raise SweepError(f"--where {item!r}: expected AXIS=VALUE[,VALUE...] with AXIS one of "
                                 f"{', '.join(self.axes)}")
            wanted = [v.strip() for v in values.split(",") if v.strip()]
            unknown = [v for v in wanted if v not in self.axes[axis] and
                       label(axis, yaml.safe_load(v)) not in self.axes[axis]]
            if unknown:
                raise SweepError(f"--where {item!r}: {axis} has no value {unknown[0]!r}; its values: "
                                 f"{', '.join(self.axes[axis])}")
            keep = set(wanted) | {label(axis, yaml.safe_load(v)) for v in wanted}
            runs = [r for r in runs if r.labels[axis] in keep]
        return runs


def _where(path: Path, key: str) -> str:
    return f"{path}: {key}"


def _axis_values(path: Path, axis: str, spec: Any) -> list[tuple[str, Optional[str], list[str]]]:
    """(label, config or None, overrides) for each value of an axis."""
    if isinstance(spec, dict):  # a named axis
        values = []
        for name, overrides in spec.items():
            if not isinstance(overrides, dict):
                raise SweepError(f"{_where(path, f'axes.{axis}.{name}')}: expected a mapping of config "
                                 f"keys to values, got {overrides!r}")
            overrides = dict(overrides)
            config = overrides.pop("config", None)
            values.append((str(name), None if config is None else str(config),
                           [f"{k}={yaml_value(v)}" for k, v in overrides.items()]))
        return values
    if isinstance(spec, list):  # a key axis
        return [(label(axis, v), None, [f"{axis}={yaml_value(v)}"]) for v in spec]
    raise SweepError(f"{_where(path, f'axes.{axis}')}: expected a list of values or a mapping of named "
                     f"values to overrides, got {spec!r}")


def load_sweep(path: str | Path) -> Sweep:
    """Read and validate a sweep file: every run's config is built (and so checked) here."""
    path = Path(path)
    try:
        spec = read_yaml_mapping(path, "sweep file", empty_ok=False)
    except ConfigError as exc:
        raise SweepError(str(exc)) from None
    for key in spec:
        if key not in TOP_KEYS:
            raise SweepError(f"{_where(path, key)}: unknown key; allowed: {', '.join(TOP_KEYS)}")
    for key in ("base", "dir", "axes"):
        if key not in spec:
            raise SweepError(f"{_where(path, key)}: missing")
    axes_spec = spec["axes"]
    if not isinstance(axes_spec, dict) or not axes_spec:
        raise SweepError(f"{_where(path, 'axes')}: expected a mapping of at least one axis")
    common = spec.get("overrides") or {}
    if not isinstance(common, dict):
        raise SweepError(f"{_where(path, 'overrides')}: expected a mapping of config keys to values")
    common_args = [f"{k}={yaml_value(v)}" for k, v in common.items()]
    axes = {axis: _axis_values(path, str(axis), values) for axis, values in axes_spec.items()}
    for axis, values in axes.items():
        if not values:
            raise SweepError(f"{_where(path, f'axes.{axis}')}: has no value")
    base_dir = Path(str(spec["dir"]))
    runs, seen = [], {}
    for index, combo in enumerate(itertools.product(*axes.values())):
        labels = {axis: value[0] for axis, value in zip(axes, combo)}
        name = "-".join(labels.values())
        if not NAME_OK.match(name):
            raise SweepError(f"{path}: run {name!r}: a run name takes letters, digits and . _ + = - only; "
                             f"rename the axis values")
        if name in seen:
            raise SweepError(f"{path}: runs {seen[name]} and {index} are both named {name!r}")
        seen[name] = index
        config = next((c for _, c, _ in combo if c is not None), str(spec["base"]))
        overrides = common_args + [o for _, _, args in combo for o in args]
        run_dir = base_dir / name
        overrides.append(f"run.dir={run_dir}")
        try:
            cfg = load_config(config, overrides)
        except ConfigError as exc:
            raise SweepError(f"{path}: run {index} ({name}): {exc}") from None
        runs.append(Run(index, name, run_dir, config, overrides, labels, cfg))
    paper = spec.get("paper") or {}
    if not isinstance(paper, dict) or not all(isinstance(v, dict) for v in paper.values()):
        raise SweepError(f"{_where(path, 'paper')}: expected setting -> method -> figure")
    for s, row in paper.items():
        for m, f in row.items():
            if f is not None and (isinstance(f, bool) or not isinstance(f, (int, float))):
                raise SweepError(f"{_where(path, f'paper.{s}.{m}')}: expected a number (the paper's figure) "
                                 f"or null, got {f!r}")
    return Sweep(path, base_dir, {a: [v[0] for v in vals] for a, vals in axes.items()}, runs,
                 {str(s): {str(m): float(f) for m, f in row.items() if f is not None} for s, row in paper.items()},
                 str(spec.get("description") or ""))
