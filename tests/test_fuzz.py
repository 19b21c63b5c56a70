"""Fuzzed bad input: every input a user hands the trainer, mutated (hypothesis draws the
mutations and shrinks a failure to its smallest input), must end in one clear line that names the
file, key or sample, exit code 2 (docs/tools.md, Exit codes), within LIMIT_S seconds, and leave
the run folder as it was: every file's name and sha256, every metrics row. Five families: config
files and overrides, label files, shards, checkpoints, sweep files and the offline commands'
arguments. Most inputs run in this process (a command's main, or the loader every rank calls); a
sample of each family runs as the real command, and the inputs every rank reads also under a
2-rank torchrun, where each rank must say its line and the job end at once.

The default run is CI-sized, with hypothesis's derandomized draws. The long run (every family
at 500 inputs, about 2,500 in all):

    JOCOR_FUZZ_EXAMPLES=500 .venv/bin/python -m pytest -q tests/test_fuzz.py

The session ends with the count of what was tried (conftest.py prints fuzz_inputs.summary()).
JOCOR_FUZZ_LOG=FILE also writes every input that did not end as it must to FILE: shrinking
reports one failure per test, and may pass over others of the same test.
"""

from __future__ import annotations

import json
import math
import os
import pickle
import re
import shutil
import warnings
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from hypothesis import HealthCheck, Phase, assume, given, settings, strategies as st

from fuzz_inputs import call, damage, examples, judge, judge_ranks, record, snapshot
from helpers import run_python, run_torchrun, train_args
from shard_fixtures import mnist_shards
from tiny_run import N_TEST, N_TRAIN, final_checkpoint

from jocor_ddp import audit, evaluate, export, report, sweep, train
from jocor_ddp.config import DATASETS, MODELS, NOISE_TYPES, PRECISIONS, PROGRESS
from jocor_ddp.data import build_data
from jocor_ddp.dist import DistContext
from jocor_ddp.job import guarded
from jocor_ddp.noise import load_label_file

# No explain phase: it traces every line, which makes a legitimate slow parse (YAML nested
# thousands deep) look like a hang.
FUZZ = settings(derandomize=True, deadline=None, database=None, print_blob=False,
                phases=[Phase.explicit, Phase.reuse, Phase.generate, Phase.target, Phase.shrink],
                suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow,
                                       HealthCheck.data_too_large, HealthCheck.filter_too_much])


def fuzz(default: int):
    return settings(FUZZ, max_examples=examples(default))


# --- shared inputs -------------------------------------------------------------------

@pytest.fixture(scope="module")
def data(mnist_data):
    return mnist_data(N_TRAIN, N_TEST)


@pytest.fixture(scope="module")
def run(tiny_run, tmp_path_factory):
    """A private copy of the tiny run, which every command below is pointed at."""
    return shutil.copytree(tiny_run, tmp_path_factory.mktemp("fuzz") / "run")


@pytest.fixture(scope="module")
def scratch(tmp_path_factory):
    return tmp_path_factory.mktemp("scratch")


def tiny_run_args(data: Path, run: Path, *more: str) -> list[str]:
    """The tiny run's own command line (tests/tiny_run.py), with ``more`` after it."""
    return train_args(data, run, "model.arch=mlp", "train.batch_size=32", "train.epochs=2", *more, entry=())


def guarded_main(fn):
    """A loader as a command: ``fn(*argv)`` through job.guarded, as every rank calls it."""
    return lambda argv: guarded(fn, *argv)


def in_run(family: str, run: Path, main, argv: list[str], names, *, ignore=()) -> None:
    before = snapshot(run)
    verdict = call(main, argv, names)
    record(family, verdict, damage(before, snapshot(run), ignore=ignore))


# --- 1. config files and key=value overrides ------------------------------------------

def _not(allowed):
    return st.text(max_size=12).filter(lambda s: s not in allowed)


WRONG_TYPE = st.one_of(st.lists(st.integers(), max_size=2), st.dictionaries(st.text(max_size=3), st.integers(),
                                                                            max_size=2), st.booleans())
NOT_A_NUMBER = st.one_of(WRONG_TYPE, st.text(max_size=8))
NAN_INF = st.sampled_from([math.nan, math.inf, -math.inf])
HUGE = st.integers(min_value=2**63, max_value=2**200)


def _ints(lo: int) -> st.SearchStrategy:
    """Values an integer key at least ``lo`` refuses."""
    return st.one_of(st.integers(max_value=lo - 1), st.floats(allow_nan=False).filter(lambda f: f != int(f) if
                                                                                     math.isfinite(f) else True),
                     NAN_INF, NOT_A_NUMBER)


def _floats_outside(lo: float, hi: float) -> st.SearchStrategy:
    return st.one_of(st.floats(max_value=lo, exclude_max=True), st.floats(min_value=hi, exclude_min=True),
                     st.just(math.nan), NOT_A_NUMBER)


# key -> values it refuses: out of range, of the wrong type, not one of its words.
BAD_VALUES = {
    "train.epochs": _ints(1), "train.batch_size": _ints(1), "checkpoint.keep": _ints(1),
    "checkpoint.every_steps": _ints(0), "data.num_workers": _ints(0),
    "train.seed": st.one_of(_ints(0), HUGE), "noise.seed": st.one_of(_ints(0), HUGE),
    "train.lr": st.one_of(st.floats(max_value=0), st.just(math.nan), NOT_A_NUMBER),
    "noise.rate": st.one_of(_floats_outside(0, 1), st.just(1.0)),
    "method.co_lambda": _floats_outside(0, 1),
    "data.noisy_val_fraction": _floats_outside(0, 0.5),
    "dist.timeout_s": st.one_of(st.floats(max_value=0), st.just(math.nan), NOT_A_NUMBER),
    "model.arch": _not(MODELS), "noise.type": _not(NOISE_TYPES), "data.name": _not(DATASETS),
    "train.precision": _not(PRECISIONS), "log.progress": _not(PROGRESS), "selection": _not(("global", "local")),
    "method.name": _not(("jocor", "coteaching", "coteaching_plus", "decoupling", "standard", "fcorrection")),
    "data.eval_splits": st.one_of(st.just([]), st.just(["train"]), st.just(["test", "test"]), WRONG_TYPE,
                                  st.integers()),
    "train.cuda_graph": st.one_of(_not(("auto",)), st.integers(), st.lists(st.booleans(), max_size=2)),
    "data.augment": st.one_of(st.integers(), st.text(), st.lists(st.booleans(), max_size=1)),
    "run.dir": st.one_of(st.just(""), st.text(min_size=1, max_size=5).map(lambda s: s + "\0")),
}
SECTIONS = ["run", "data", "noise", "model", "method", "train", "checkpoint", "dist", "log"]


def _nest(key: str, value) -> dict:
    tree = value
    for part in reversed(key.split(".")):
        tree = {part: tree}
    return tree


@st.composite
def bad_configs(draw):
    """(YAML file bytes, overrides, names): a config that load_config must refuse."""
    kind = draw(st.sampled_from(["value", "override", "unknown", "garbage", "tab", "duplicate", "deep", "huge",
                                 "top", "nul", "unclosed"]))
    base = b"train:\n  epochs: 2\n  batch_size: 32\nmodel:\n  arch: mlp\n"
    if kind in ("value", "override"):
        key = draw(st.sampled_from(sorted(BAD_VALUES)))
        value = draw(BAD_VALUES[key])
        if kind == "override" or key == "run.dir":  # the command line's run.dir would win over the file's
            return base, [f"{key}={yaml.safe_dump(value, default_flow_style=True).strip().removesuffix('...').strip()}"], [key]
        return yaml.safe_dump(_nest(key, value)).encode(), [], [key]
    if kind == "unknown":
        section = draw(st.sampled_from(SECTIONS + [""]))
        name = draw(st.from_regex(r"[a-z_][a-z0-9_]{0,10}", fullmatch=True).filter(
            lambda n: n not in SECTIONS + ["selection"] and n not in BAD_VALUES and
            not any(k.endswith("." + n) for k in BAD_VALUES)))
        key = f"{section}.{name}" if section else name
        return base, [f"{key}={draw(st.integers())}"], [key]
    if kind == "garbage":  # bytes that are not UTF-8 somewhere in the file
        junk = draw(st.binary(min_size=1, max_size=40))
        at = draw(st.integers(0, len(base)))
        return base[:at] + b"\xff" + junk + base[at:], [], []
    if kind == "tab":
        return base.replace(b"  epochs", b"\tepochs"), [], []
    if kind == "duplicate":
        line = draw(st.sampled_from([b"  epochs: 3\n", b"  batch_size: 64\n"]))
        return base.replace(b"model:", line + b"model:"), [], ["given twice"]
    if kind == "deep":
        depth = draw(st.integers(200, 4000))
        opener, closer = draw(st.sampled_from([(b"[", b"]"), (b"{a: ", b"}")]))
        return b"train: " + opener * depth + closer * depth + b"\n", [], ["train", "nested"]
    if kind == "huge":
        digits = draw(st.integers(4301, 8000))
        return base.replace(b"epochs: 2", b"epochs: " + b"9" * digits), [], []
    if kind == "top":
        return draw(st.sampled_from([b"- 1\n- 2\n", b"42\n", b"just text\n", b"[train, model]\n"])), [], []
    if kind == "nul":
        return base + b"data:\n  root: \"r\\0\"\n", [], ["data.root"]
    return base + b"data: {name: mnist\n", [], []


@fuzz(40)
@given(case=bad_configs())
def test_bad_configs_and_overrides(case, data, run, scratch):
    text, overrides, names = case
    path = scratch / "fuzzed.yaml"
    path.write_bytes(text)
    argv = ["--config", str(path), f"run.dir={run}", *overrides]
    in_run("config", run, train.main, argv, [str(path), *names])


# --- 2. label files for noise.type: file -----------------------------------------------

N_LABELS, CLASSES = 64, 10
GOOD = np.arange(N_LABELS) % CLASSES


def _write_labels(path: Path, labels, key=None) -> None:
    if path.suffix == ".npy":
        np.save(path, np.asarray(labels), allow_pickle=False)
    elif path.suffix in (".txt", ".csv"):
        path.write_text("".join(f"{i},{v}\n" if path.suffix == ".csv" else f"{v}\n" for i, v in enumerate(labels)))
    elif path.suffix == ".json":
        path.write_text(json.dumps({key: list(labels)} if key else list(labels)))
    else:
        torch.save({key: torch.as_tensor(np.asarray(labels))} if key else torch.as_tensor(np.asarray(labels)), path)


class Payload:
    """A pickle that runs code when a full unpickler loads it: it must be refused, never run."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@st.composite
def bad_labels(draw):
    """(suffix, writer(path), key, names): a label file the loader must refuse."""
    suffix = draw(st.sampled_from([".npy", ".txt", ".csv", ".json", ".pt"]))
    keyed = suffix in (".json", ".pt") and draw(st.booleans())
    key = "worse_label" if keyed else None
    kind = draw(st.sampled_from(["length", "float", "range", "key", "empty", "garbage", "truncate", "payload",
                                 "text"]))
    labels: list = [int(v) for v in GOOD]
    if kind == "length":
        n = draw(st.integers(0, 3 * N_LABELS).filter(lambda n: n != N_LABELS))
        labels = [int(v) for v in np.resize(GOOD, n)]
    elif kind == "float" and suffix not in (".txt", ".csv"):
        at = draw(st.integers(0, N_LABELS - 1))
        labels = [float(v) for v in labels]
        labels[at] = draw(st.one_of(NAN_INF, st.floats(0, 9).filter(lambda f: f != int(f))))
    elif kind == "range" or kind == "float":
        at = draw(st.integers(0, N_LABELS - 1))
        labels[at] = draw(st.one_of(st.integers(-2**62, -1), st.integers(CLASSES, 2**62)))
    elif kind == "key" and keyed:
        return suffix, lambda p: _write_labels(p, labels, "clean_label"), key, ["noise.file_key", key]
    elif kind == "key":
        return suffix, lambda p: _write_labels(p, labels), "worse_label", ["noise.file_key"]
    elif kind == "text":
        word = draw(st.text(min_size=1, max_size=6).filter(lambda w: w.strip() and "," not in w and "\n" not in w
                                                              and "\r" not in w))
        labels[draw(st.integers(0, N_LABELS - 1))] = word
        if suffix == ".npy":
            return suffix, lambda p: np.save(p, np.array(labels, dtype=str)), None, []
        if suffix == ".pt":
            return suffix, lambda p: torch.save({key: labels} if key else labels, p), key, []
    if kind == "empty":
        return suffix, lambda p: p.write_bytes(b""), key, []
    if kind == "garbage":
        junk = draw(st.binary(min_size=1, max_size=200))
        return suffix, lambda p: p.write_bytes(b"\x93\xff" + junk), key, []
    if kind == "truncate":
        def truncated(p, cut=draw(st.floats(0.0, 0.45))):
            _write_labels(p, labels, key)
            p.write_bytes(p.read_bytes()[:int(p.stat().st_size * cut)])
        return suffix, truncated, key, []
    if kind == "payload":
        return ".pt", lambda p: p.write_bytes(pickle.dumps(Payload(str(p) + ".ran"), protocol=draw(
            st.integers(2, 5)))), None, []
    return suffix, lambda p: _write_labels(p, labels, key), key, []


@fuzz(60)
@given(case=bad_labels())
def test_bad_label_files(case, scratch):
    suffix, write, key, names = case
    path = scratch / f"labels{suffix}"
    path.unlink(missing_ok=True)
    write(path)
    verdict = call(guarded_main(load_label_file), [str(path), key, N_LABELS, CLASSES], [str(path), *names])
    record("labels", verdict)
    assert not Path(str(path) + ".ran").exists(), "the pickle's code ran"


# --- 3. shards ------------------------------------------------------------------------

@pytest.fixture(scope="module")
def clean_shards(tmp_path_factory):
    return mnist_shards(tmp_path_factory.mktemp("shards"))  # 96 train in 8 tars, 30 test in 3


def shard_config(shards: Path) -> list:
    from jocor_ddp.config import config_from_dict
    return config_from_dict({"data": {"name": "mnist", "source": "shards", "shards": str(shards), "num_workers": 0,
                                      "cache": "device"},
                             "train": {"batch_size": 8}, "noise": {"type": "symmetric", "rate": 0.4}})


@st.composite
def shard_damage(draw, files: list[str]):
    """(file, operation, argument) on one file of the shard folder."""
    name = draw(st.sampled_from(files))
    op = draw(st.sampled_from(["flip", "truncate", "delete", "garbage"]))
    return name, op, draw(st.floats(0, 1, exclude_max=True)), draw(st.integers(0, 7))


def damage_file(path: Path, op: str, where: float, bit: int) -> None:
    data = bytearray(path.read_bytes())
    at = int(len(data) * where)
    if op == "flip":
        data[at] ^= 1 << bit
    elif op == "truncate":
        del data[at:]
    elif op == "garbage":
        data[at:at + 64] = os.urandom(64)
    if op == "delete":
        path.unlink()
    else:
        path.write_bytes(bytes(data))


@fuzz(40)
@given(data=st.data())
def test_damaged_shards(data, clean_shards, scratch):
    files = sorted(p.name for p in clean_shards.iterdir())
    name, op, where, bit = data.draw(shard_damage(files))
    shards = scratch / "shards"
    shutil.rmtree(shards, ignore_errors=True)
    shutil.copytree(clean_shards, shards)
    damage_file(shards / name, op, where, bit)
    # A manifest entry that changed makes the file it describes fail its check: it may be named.
    names = [name] if name != "manifest.json" else files
    verdict = call(guarded_main(lambda cfg: build_data(cfg, DistContext()) and None),
                   [shard_config(shards)], names)
    record("shards", verdict)


# --- 4. checkpoints -------------------------------------------------------------------

def _edited(state: dict, field: str, value) -> dict:
    out = dict(state)
    if value == "DROP":
        out.pop(field)
    elif field == "config" and isinstance(value, dict):
        out["config"] = json.loads(json.dumps(state["config"]))
        for key, v in value.items():
            section, name = key.split(".")
            out["config"][section][name] = v
    elif field == "model" and value == "SLICED":
        out["model"] = {k: v[..., :1] if v.ndim else v for k, v in state["model"].items()}
    else:
        out[field] = value
    return out


COMMANDS = ["evaluate", "export", "audit", "train"]
ALL, OFFLINE = tuple(COMMANDS), ("evaluate", "export", "audit")
# (field, value, the commands that read it and so must refuse it): train takes its config and
# data from the command line, export reads no data, evaluate no history or optimizer state.
STATE_EDITS = st.sampled_from([
    ("format", 99, ALL), ("format", "2", ALL), ("format", "DROP", ALL), ("epoch", "x", ALL), ("epoch", "DROP", ALL),
    ("global_step", None, ALL), ("config", None, ALL), ("config", {"model.arch": "cnn"}, OFFLINE),
    ("config", {"model.arch": "resnet18"}, OFFLINE), ("config", {"train.lr": "x"}, OFFLINE),
    ("config", {"data.name": "cifar10"}, ("evaluate", "audit")), ("config", {"data.name": "nosuch"}, OFFLINE),
    ("config", {"model.bogus": 1}, OFFLINE), ("model", {}, ALL), ("model", "SLICED", ALL), ("model", None, ALL),
    ("model", "DROP", ALL), ("data_meta", {}, OFFLINE), ("data_meta", "x", ALL),
    ("data_meta", {"classes": [], "in_channels": 1, "image_size": 28}, OFFLINE),
    ("data_meta", {"classes": ["a"] * 10, "in_channels": 3, "image_size": 28}, OFFLINE),
    ("forget_rate", None, ALL), ("history", None, ALL), ("history", {"bits": 1, "epochs": 2}, ("audit", "train")),
    ("rng", None, ALL), ("step", None, ALL), ("step", {}, ("train",)), ("world_size", "two", ALL),
    ("precision", 16, ALL),
])


@st.composite
def bad_checkpoints(draw):
    kind = draw(st.sampled_from(["truncate", "flip", "edit", "foreign", "payload"]))
    if kind == "truncate":
        return kind, draw(st.floats(0, 1, exclude_max=True))
    if kind == "flip":
        return kind, (draw(st.floats(0, 1, exclude_max=True)), draw(st.integers(0, 7)))
    if kind == "edit":
        return kind, draw(STATE_EDITS)
    if kind == "foreign":
        return kind, draw(st.sampled_from([[1, 2], {"a": torch.zeros(3)}, torch.zeros(2), "text", None, {"format": "2"}]))
    return kind, draw(st.integers(2, 5))


def write_checkpoint(path: Path, good: Path, kind: str, arg) -> None:
    if kind in ("truncate", "flip"):
        shutil.copyfile(good, path)
        damage_file(path, "truncate" if kind == "truncate" else "flip", *(arg if kind == "flip" else (arg, 0)))
    elif kind == "edit":
        torch.save(_edited(torch.load(good, weights_only=True), *arg[:2]), path)
    elif kind == "foreign":
        torch.save(arg, path)
    else:
        path.write_bytes(pickle.dumps(Payload(str(path) + ".ran"), protocol=arg))


def _same_records(a: Path, b: Path) -> bool:
    try:
        with zipfile.ZipFile(a) as za, zipfile.ZipFile(b) as zb:
            return za.namelist() == zb.namelist() and all(za.read(n) == zb.read(n) for n in zb.namelist())
    except Exception:  # not even a readable zip: damaged
        return False


def checkpoint_argv(command: str, ck: Path, data: Path, run: Path, out: Path) -> list[str]:
    if command == "train":
        return tiny_run_args(data, run, f"train.resume={ck}")
    return [str(ck), "--out", str(out / ("model.pt" if command == "export" else "audit.csv" if command == "audit"
                                         else "evaluate"))]


@fuzz(40)
@given(case=bad_checkpoints(), command=st.sampled_from(COMMANDS))
def test_bad_checkpoints(case, command, data, run, scratch, tiny_run):
    if case[0] == "edit":
        assume(command in case[1][2])
    ck = run / "checkpoints" / "step-99.pt"  # the newest: where a damaged file does most harm
    write_checkpoint(ck, final_checkpoint(tiny_run), *case)
    # A flip in zip metadata no reader uses (the central directory's "version made by", ...)
    # leaves every record intact: that file is not damaged.
    assume(case[0] != "flip" or not _same_records(ck, final_checkpoint(tiny_run)))
    main = {"evaluate": evaluate.main, "export": export.main, "audit": audit.main, "train": train.main}[command]
    try:
        in_run("checkpoints", run, main, checkpoint_argv(command, ck, data, run, scratch), [str(ck)],
               ignore=[f"checkpoints/{ck.name}"])
    finally:
        ck.unlink(missing_ok=True)
    assert not Path(str(ck) + ".ran").exists(), "the pickle's code ran"


# --- 5. sweep files, and the arguments of report, evaluate, export, audit ----------------

SWEEP_BASE = {"data": {"name": "mnist", "root": "/nonexistent"}, "model": {"arch": "mlp"},
              "train": {"batch_size": 32, "epochs": 2}, "log": {"progress": "never"}}


@st.composite
def bad_sweeps(draw, folder: Path):
    """(sweep file bytes, names): a sweep file load_sweep must refuse (``--list`` runs nothing)."""
    base = folder / "base.yaml"
    good = {"base": str(base), "dir": str(folder / "sweep"), "axes": {"method.name": ["jocor", "coteaching"]}}
    kind = draw(st.sampled_from(["unknown", "missing", "axes", "value", "names", "paper", "garbage", "top",
                                 "duplicate", "empty", "overrides", "base"]))
    spec, names = dict(good), []
    if kind == "unknown":
        key = draw(st.from_regex(r"[a-z]{1,8}", fullmatch=True).filter(
            lambda k: k not in ("base", "dir", "axes", "overrides", "paper", "description")))
        spec[key], names = 1, [key]
    elif kind == "missing":
        key = draw(st.sampled_from(["base", "dir", "axes"]))
        del spec[key]
        names = [key]
    elif kind == "axes":
        spec["axes"] = draw(st.one_of(st.just({}), st.just([]), st.integers(), st.just({"train.seed": []}),
                                      st.just({"train.seed": 3}), st.just({"setting": {"a": 5}})))
        names = ["axes"]
    elif kind == "value":
        key = draw(st.sampled_from(sorted(BAD_VALUES)))
        spec["axes"] = {key: [draw(BAD_VALUES[key])]}
        names = [key, "axes"]
    elif kind == "names":
        spec["axes"] = {"train.seed": draw(st.sampled_from([[1, 1], ["a b", 2], ["x/y"], [1.0, 1]]))}
    elif kind == "paper":
        spec["paper"] = draw(st.sampled_from([5, [1], {"s": 3}, {"s": {"jocor": "x"}}, {"s": {"jocor": [1]}}]))
        names = ["paper"]
    elif kind == "overrides":
        spec["overrides"] = draw(st.one_of(st.just([1]), st.just("x"),
                                           st.sampled_from(sorted(set(BAD_VALUES) - {"method.name"})).map(
                                               lambda k: {k: None})))  # method.name: the axis sets it
        names = ["overrides"]
    elif kind == "base":
        spec["base"] = draw(st.sampled_from([str(folder / "missing.yaml"), str(folder), "", 5]))
        names = ["base", "config file"]
    text = yaml.safe_dump(spec).encode()
    if kind == "garbage":
        text = text + b"\xff" + draw(st.binary(max_size=30))
    elif kind == "top":
        text = b"- base\n- dir\n"
    elif kind == "duplicate":
        text = text + b"dir: again\n"
        names = ["given twice"]
    elif kind == "empty":
        text = draw(st.sampled_from([b"", b"\n", b"# nothing\n"]))
    return text, names


def _args_case(draw, run: Path, ck: Path, folder: Path):
    """(main, argv, names): a bad argument of an offline command."""
    command = draw(st.sampled_from(["report", "evaluate", "export", "audit"]))
    missing = str(folder / draw(st.from_regex(r"[a-z]{1,8}", fullmatch=True)))
    file_not_folder = str(ck)
    if command == "report":
        main = lambda argv: report.main([*argv, "--out", str(folder / "report")])  # noqa: E731
        case = draw(st.sampled_from(["missing", "file", "empty", "where", "pick", "metrics", "acc", "sweep"]))
        if case == "missing":
            return main, [missing], [missing]
        if case == "file":
            return main, [file_not_folder], [file_not_folder]
        if case == "empty":
            (folder / "empty").mkdir(exist_ok=True)
            return main, [str(folder / "empty")], [str(folder / "empty")]
        if case == "where":
            return main, [str(run), "--where", draw(st.sampled_from(["x", "=1", "a=1"]))], ["--where"]
        if case == "pick":
            return main, [str(run), "--pick", draw(st.sampled_from(["nosuch", ""]))], ["--pick"]
        if case == "acc":
            return main, [str(run), "--acc", draw(st.text(max_size=5))], ["--acc"]
        if case == "sweep":
            return main, ["--sweep", missing], [missing]
        broken = folder / "broken"
        shutil.rmtree(broken, ignore_errors=True)
        shutil.copytree(run, broken)
        lines = (broken / "metrics.jsonl").read_text().splitlines()
        at = draw(st.integers(0, len(lines) - 1))
        lines[at] = draw(st.sampled_from(["{", "[]", "{\"epoch\": \"x\"}", "null", lines[at][: len(lines[at]) // 2],
                                          "{\"epoch\": 1, \"test_acc1\": \"NaN\"}"]))
        (broken / "metrics.jsonl").write_text("\n".join(lines) + "\n")
        return main, [str(broken)], [str(broken)]
    main = {"evaluate": evaluate.main, "export": export.main, "audit": audit.main}[command]
    out = ["--out", str(folder / ("m.pt" if command == "export" else "a.csv" if command == "audit" else "ev"))]
    # export reads no data: --root is read only for a checkpoint without data_meta
    case = draw(st.sampled_from(["missing", "folder", "shards", "device", "extra", "overwrite"] +
                                (["root"] if command != "export" else []) +
                                (["split"] if command == "evaluate" else []) +
                                (["top"] if command == "audit" else []) + (["net", "by"] if command == "export" else [])))
    if case == "missing":
        return main, [missing, *out], [missing]
    if case == "overwrite" and command != "evaluate":  # the run's own files as the output
        target = draw(st.sampled_from([ck, run / "metrics.jsonl", run / "config.yaml", run / "noise.csv"]))
        return main, [str(ck), "--out", str(target)], ["would overwrite the run's own"]
    if case == "folder":
        return main, [str(run), *out], [str(run)]
    if case == "shards":
        return main, [str(ck), *out, "--shards", missing], [missing]
    if case == "root":
        return main, [str(ck), *out, "--root", missing], [missing]
    if case == "device":
        return main, [str(ck), *out, "--device", draw(st.sampled_from(["tpu", "cuda:99", ""]))], ["device"]
    if case == "extra":
        return main, [str(ck), *out, draw(st.sampled_from(["--bogus", "extra.pt", "-x"]))], ["unrecognized", "argument"]
    if case == "split":
        split = draw(st.sampled_from(["nosuch", "train", "", "../x"]))
        return main, [str(ck), *out, "--split", split], ["split", split or "''"]
    if case == "top":
        return main, [str(ck), *out, "--top", draw(st.sampled_from(["x", "1.5", ""]))], ["--top"]
    if case == "net":
        return main, [str(ck), *out, "--net", draw(st.sampled_from(["3", "0", "both"]))], ["--net"]
    return main, [str(ck), *out, "--by", draw(st.sampled_from(["loss", "", "val_acc"]))], ["--by"]


@fuzz(40)
@given(data=st.data())
def test_bad_sweep_files_and_arguments(data, run, scratch, tiny_run):
    folder = scratch / "arguments"
    folder.mkdir(exist_ok=True)
    (folder / "base.yaml").write_text(yaml.safe_dump(SWEEP_BASE))
    ck = final_checkpoint(run)
    if data.draw(st.booleans()):
        text, names = data.draw(bad_sweeps(folder))
        path = folder / "fuzzed-sweep.yaml"
        path.write_bytes(text)
        in_run("arguments", run, sweep.main, [str(path), "--list"], [str(path), *names])
    else:
        in_run("arguments", run, *_args_case(data.draw, run, ck, folder))


# --- the real command line: a sample of each family, and 2 ranks where every rank reads it -----

def _label_file(folder: Path) -> Path:
    path = folder / "labels.json"
    path.write_text(json.dumps([0.5] * N_TRAIN))
    return path


def _sample_inputs(folder: Path, data: Path, run: Path, good_ck: Path, clean_shards: Path) -> dict:
    """family -> (argv after python, names): one malformed input of each, for a subprocess."""
    folder.mkdir(exist_ok=True)
    (folder / "bad.yaml").write_bytes(b"train:\n  epochs: 2\n  epochs: 3\n")
    damaged = folder / "step-99.pt"
    shutil.copyfile(good_ck, damaged)
    damage_file(damaged, "flip", 0.5, 3)
    sweep_file = folder / "sweep.yaml"
    sweep_file.write_text(yaml.safe_dump({"base": str(folder / "missing.yaml"), "dir": "x", "axes": {"a": [1]}}))
    return {
        "config": (["-m", "jocor_ddp.train", "--config", str(folder / "bad.yaml"), f"run.dir={run}"],
                   ["given twice"]),
        "labels": (train_args(data, run, "noise.type=file", f"noise.file={_label_file(folder)}", "model.arch=mlp"),
                   ["not a whole number"]),
        "checkpoints": (train_args(data, run, "model.arch=mlp", "train.batch_size=32", "train.epochs=2",
                                   f"train.resume={damaged}"), [str(damaged), "CRC-32"]),
        "arguments": (["-m", "jocor_ddp.sweep", str(sweep_file), "--list"], ["missing.yaml"]),
        "shards": _shard_argv(folder, clean_shards, run),
    }


def _shard_argv(folder: Path, clean_shards: Path, run: Path) -> tuple[list[str], list[str]]:
    shards = folder / "shards"
    shutil.rmtree(shards, ignore_errors=True)
    shutil.copytree(clean_shards, shards)
    damage_file(shards / "train-000003.tar", "truncate", 0.4, 0)
    return (train_args(None, run, "data.name=mnist", "data.source=shards", f"data.shards={shards}",
                       "data.num_workers=0", "model.arch=mlp", "train.batch_size=8"), ["train-000003.tar"])


@pytest.mark.slow
def test_each_family_through_the_real_command_line(data, run, scratch, tiny_run, clean_shards):
    cases = _sample_inputs(scratch / "cli", data, run, final_checkpoint(tiny_run), clean_shards)
    for family, (argv, names) in cases.items():
        before = snapshot(run)
        proc = run_python(argv, timeout=60, check=False)
        record(family, judge(proc.returncode, proc.stderr, 0.0, names), damage(before, snapshot(run)))


@pytest.mark.slow
def test_every_rank_says_its_line_and_the_job_ends(data, run, scratch, tiny_run, clean_shards):
    """Config, label file, checkpoint and shards: each of the 2 ranks says the line; no hang."""
    cases = _sample_inputs(scratch / "ranks", data, run, final_checkpoint(tiny_run), clean_shards)
    del cases["arguments"]
    if not examples(0):  # CI: two of the four (each torchrun costs ~12 s on 2 cores); the long run: all
        cases = {f: cases[f] for f in ("labels", "checkpoints")}
    for family, (argv, names) in cases.items():
        before = snapshot(run)
        proc = run_torchrun(2, [*argv, "dist.backend=gloo", "dist.timeout_s=30"], timeout=90, check=False)
        for verdict in judge_ranks(proc.stderr, proc.returncode, names):
            record(family, verdict, damage(before, snapshot(run)))


# --- what the fuzz found: each input once, as a plain test --------------------------------

@pytest.mark.parametrize("text, words", [
    (b"train:\n  lr: 0.1\xff\n", "not UTF-8 text"),
    (b"train: " + b"[" * 3000 + b"]" * 3000 + b"\n", "nested too deeply"),
    (b"train:\n  epochs: " + b"9" * 5000 + b"\n", "integer string conversion"),
    (b"train:\n  lr: 0.1\n  lr: 0.2\n", "line 3, column 3: key 'lr' is given twice"),
])
def test_a_config_file_yaml_cannot_read_is_one_line(tmp_path, capsys, text, words):
    path = tmp_path / "c.yaml"
    path.write_bytes(text)
    # data.root: a config read as valid would fail at once, not train
    assert train.main(["--config", str(path), f"run.dir={tmp_path / 'run'}", "data.root=/nonexistent"]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: config file {path}: ") and words in err and err.count("\n") == 1


@pytest.mark.parametrize("override, words", [
    ("train.seed=-1", "train.seed: must be >= 0"), ("noise.seed=-1", "noise.seed: must be >= 0"),
    (f"train.seed={2**64}", "train.seed: must be below 2**63"), ("data.root=a\0b", "data.root: holds a NUL"),
    ("train.lr=" + "[" * 3000, "train.lr: expected a number"),
])
def test_values_that_failed_after_the_config_check_are_refused_by_it(data, tmp_path, capsys, override, words):
    assert train.main(tiny_run_args(data, tmp_path / "run", override)) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {words}") and err.count("\n") == 1
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("name, write, key, words", [
    ("l.npy", lambda p: np.save(p, np.array(["1"] * N_LABELS)), None, "sample 0 has label '1', not a whole number"),
    ("l.npy", lambda p: np.save(p, np.full(N_LABELS, np.nan)), None, "sample 0 has label nan, not a whole number"),
    ("l.npy", lambda p: np.save(p, np.full(N_LABELS, 2.5)), None, "sample 0 has label 2.5, not a whole number"),
    ("l.json", lambda p: p.write_text(json.dumps(["3"] * N_LABELS)), None, "label '3', not a whole number"),
    ("l.npy", lambda p: np.save(p, GOOD), "worse_label", "noise.file_key: 'worse_label', but"),
    ("l.json", lambda p: p.write_text(json.dumps({"a": list(map(int, GOOD))})), "b", "noise.file_key: 'b' not in"),
    ("l.pt", lambda p: p.write_bytes(pickle.dumps(Payload(str(p) + ".ran"))), None,
     "refused: it holds objects that only a full unpickler could build"),
])
def test_label_files_the_loader_misread(tmp_path, capsys, name, write, key, words):
    path = tmp_path / name
    write(path)
    assert guarded(load_label_file, str(path), key, N_LABELS, CLASSES) == 2
    err = capsys.readouterr().err
    assert str(path) in err and words in err and err.count("\n") == 1
    assert not Path(str(path) + ".ran").exists()


def test_a_flipped_bit_in_a_checkpoints_tensor_is_refused(tiny_run, tmp_path, capsys):
    ck = tmp_path / "step-16.pt"
    shutil.copyfile(final_checkpoint(tiny_run), ck)
    damage_file(ck, "flip", 0.5, 3)  # inside a weight tensor: torch.load alone reads it
    assert evaluate.main([str(ck), "--out", str(tmp_path / "ev")]) == 2
    err = capsys.readouterr().err
    assert re.fullmatch(rf"error: checkpoint {re.escape(str(ck))}: damaged: \S+/data/\d+ fails its CRC-32 check "
                        r"\(a flipped bit or a partial copy\)\n", err)


def test_a_foreign_pickle_is_refused_in_one_line(tmp_path, capsys):
    ck = tmp_path / "step-1.pt"
    ck.write_bytes(pickle.dumps(Payload(str(ck) + ".ran"), protocol=4))
    with warnings.catch_warnings(record=True) as caught:  # pytest would hide them from stderr
        warnings.simplefilter("always")
        assert export.main([str(ck), "--out", str(tmp_path / "m.pt")]) == 2
    # torch's warning about the pickle protocol came first, over three lines of stderr
    assert [str(w.message) for w in caught] == []
    err = capsys.readouterr().err
    assert err.startswith(f"error: checkpoint {ck} refused: ") and err.count("\n") == 1
    assert not Path(str(ck) + ".ran").exists()


@pytest.mark.parametrize("field, value, words", [
    ("data_meta", {"classes": ["0"]}, "its data_meta is incomplete or damaged"),
    ("epoch", "x", "incomplete or damaged (TypeError: epoch is a str"),
    ("global_step", -3, "incomplete or damaged (TypeError: global_step is -3"),
])
def test_a_damaged_checkpoint_field_is_named(tiny_run, tmp_path, capsys, field, value, words):
    ck = tmp_path / "step-16.pt"
    torch.save(_edited(torch.load(final_checkpoint(tiny_run), weights_only=True), field, value), ck)
    assert export.main([str(ck), "--out", str(tmp_path / "m.pt")]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: checkpoint {ck}: ") and words in err and err.count("\n") == 1


def test_a_resume_refused_leaves_config_yaml_as_it_was(data, tiny_run, tmp_path, capsys):
    run = shutil.copytree(tiny_run, tmp_path / "run")
    before = snapshot(run)
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"not a checkpoint")
    assert train.main(tiny_run_args(data, run, f"train.resume={bad}")) == 2
    assert str(bad) in capsys.readouterr().err
    assert damage(before, snapshot(run)) == ""


def test_a_sweep_files_paper_figure_that_is_not_a_number_is_named(tmp_path, capsys):
    path = tmp_path / "s.yaml"
    (tmp_path / "base.yaml").write_text(yaml.safe_dump(SWEEP_BASE))
    path.write_text(yaml.safe_dump({"base": str(tmp_path / "base.yaml"), "dir": str(tmp_path / "sweep"),
                                    "axes": {"method.name": ["jocor"]}, "paper": {"sym50": {"jocor": "x"}}}))
    assert sweep.main([str(path), "--list"]) == 2
    assert capsys.readouterr().err == (f"error: {path}: paper.sym50.jocor: expected a number (the paper's figure) "
                                       f"or null, got 'x'\n")


@pytest.mark.parametrize("command, name", [(export.main, "checkpoints/step-16.pt"), (export.main, "metrics.jsonl"),
                                           (audit.main, "config.yaml"), (audit.main, "noise.csv")])
def test_an_output_onto_the_runs_own_files_is_refused(tiny_run, tmp_path, capsys, command, name):
    run = shutil.copytree(tiny_run, tmp_path / "run")
    before = snapshot(run)
    assert command([str(final_checkpoint(run)), "--out", str(run / name)]) == 2
    assert "would overwrite the run's own" in capsys.readouterr().err
    assert damage(before, snapshot(run)) == ""


def test_a_sweep_axis_value_yaml_refuses_unquoted_is_named_by_its_key(tmp_path, capsys):
    path = tmp_path / "s.yaml"
    (tmp_path / "base.yaml").write_text(yaml.safe_dump(SWEEP_BASE))
    path.write_text(yaml.safe_dump({"base": str(tmp_path / "base.yaml"), "dir": str(tmp_path / "sweep"),
                                    "axes": {"setting": {"a": {"model.arch": "mlp\x1f"}}}}))
    assert sweep.main([str(path), "--list"]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {path}: run 0 (a): model.arch: 'mlp\\x1f' is not one of") and err.count("\n") == 1


def test_a_checkpoint_of_another_dataset_is_named_with_its_data(tiny_run, tmp_path, capsys):
    ck = tmp_path / "step-16.pt"
    torch.save(_edited(torch.load(final_checkpoint(tiny_run), weights_only=True), "config", {"data.name": "cifar10"}), ck)
    assert evaluate.main([str(ck), "--out", str(tmp_path / "ev")]) == 2
    assert capsys.readouterr().err.startswith(f"error: checkpoint {ck}: its data (cifar10): cifar10: data_batch_1 not found")


@pytest.mark.parametrize("field, value", [("history", {"bits": 1}), ("rng", []), ("rng", [1])])
def test_a_resume_from_a_damaged_part_is_named(data, tiny_run, tmp_path, capsys, field, value):
    run = shutil.copytree(tiny_run, tmp_path / "run")
    ck = run / "checkpoints" / "step-99.pt"
    torch.save(_edited(torch.load(final_checkpoint(tiny_run), weights_only=True), field, value), ck)
    assert train.main(tiny_run_args(data, run, f"train.resume={ck}")) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error (rank 0): checkpoint {ck}: its {field} part is incomplete or damaged") and \
        err.count("\n") == 1


def test_report_pick_that_names_no_axis_is_an_error(tmp_path, capsys):
    path = tmp_path / "s.yaml"
    (tmp_path / "base.yaml").write_text(yaml.safe_dump(SWEEP_BASE))
    path.write_text(yaml.safe_dump({"base": str(tmp_path / "base.yaml"), "dir": str(tmp_path / "sweep"),
                                    "axes": {"method.name": ["jocor"]}}))
    assert report.main(["--sweep", str(path), "--pick", "", "--out", str(tmp_path / "out")]) == 2
    assert "--pick" in capsys.readouterr().err
