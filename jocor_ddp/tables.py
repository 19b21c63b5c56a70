"""The paper's table from a sweep: a row per dataset and setting, a column per method, each
cell the mean ± std over seeds of a per-run figure, with the paper's figure beside it.

Per run (``metrics.jsonl``): the test accuracy averaged over its last 10 epochs (the paper's
headline number: the mean over those epochs of (test_acc1 + test_acc2) / 2), the best test
accuracy (the better network at its best epoch) and the label precision of the last epoch.
Only finished runs are averaged; a cell says how many runs are still unfinished, and a cell
with none finished says where they stand: nothing is averaged in silently. The std is the
sample standard deviation over seeds (n - 1), shown from two finished runs on.

Runs with a validation split also log its accuracy: val_acc1 / val_acc2 for a clean val split
of the shards (data.eval_splits), noisy_val_acc1 / noisy_val_acc2 for the held-out share of the
noisy training labels (data.noisy_val_fraction), the only signal a user without clean labels
has. A run is judged by the clean one where it scores it (``runfolder.validation_split``).
``last_epochs_val_mean``, ``best_val_row`` and ``kendall_tau`` say how well it stands in
for the test accuracy, and ``build_pick`` (``report --sweep S --pick AXIS``) picks a
hyperparameter value by it, beside the value the test accuracy would have picked.
"""

from __future__ import annotations

import csv
import io
import statistics
from dataclasses import dataclass, field
from typing import Callable, Optional

from .grid import SEED_AXIS, Run, RunStatus, Sweep, status
from .job import CommandError
from .registry import display_name
from .runfolder import NOISY_VAL, VALIDATION_SPLITS, acc_keys, has_split, split_words, validation_split

DATASETS = {"mnist": "MNIST", "fashion-mnist": "Fashion-MNIST", "cifar10": "CIFAR-10", "cifar100": "CIFAR-100",
            "clothing1m": "Clothing1M", "imagefolder": "ImageFolder"}
LAST_EPOCHS = 10
NO_VAL = "–"  # no figure: a run without a validation split, a choice with no finished run


def mean_acc(row: dict, split: str = "test") -> float:
    """The two networks' mean accuracy on a split (test by default) in one row."""
    acc1, acc2 = acc_keys(split)
    return (row[acc1] + row[acc2]) / 2


def last_epochs_mean(rows: list[dict], n: int = LAST_EPOCHS, split: str = "test") -> float:
    """Mean over the last min(n, E) epochs of the two networks' mean accuracy on a split."""
    tail = rows[-n:]
    return sum(mean_acc(r, split) for r in tail) / len(tail)


def last_epochs_val_mean(rows: list[dict], split: Optional[str] = None) -> Optional[float]:
    """As last_epochs_mean, of a validation split's accuracy (default: the run's, clean val
    before noisy val); None where the rows do not score it."""
    split = split or validation_split(rows)
    return last_epochs_mean(rows, split=split) if split and has_split(rows, split) else None


def pct(v: Optional[float], missing: str = NO_VAL) -> str:
    return missing if v is None else f"{v:.2f}"


def best_val_row(rows: list[dict]) -> tuple[Optional[dict], Optional[str]]:
    """(the row whose mean validation accuracy is highest, the earliest on a tie: where early
    stopping on the validation split would stop; that split): the run's validation split, clean
    val before noisy val; (None, None) without one."""
    split = validation_split(rows)
    return (max(rows, key=lambda r: mean_acc(r, split)), split) if split else (None, None)


def kendall_tau(x: list[float], y: list[float]) -> float:
    """Kendall's tau-a: (concordant - discordant pairs) / all pairs; a pair tied in x or y
    counts as neither, so ties pull tau towards 0."""
    if len(x) != len(y) or len(x) < 2:
        raise ValueError(f"kendall_tau: needs two equally long lists of at least 2 values, got {len(x)} and {len(y)}")
    score, pairs = 0, 0
    for i in range(len(x)):
        for j in range(i + 1, len(x)):
            product = (x[i] - x[j]) * (y[i] - y[j])
            score += (product > 0) - (product < 0)
            pairs += 1
    return score / pairs


def best_acc(rows: list[dict]) -> float:
    return max(max(r["test_acc1"], r["test_acc2"]) for r in rows)


def final_label_precision(rows: list[dict]) -> Optional[float]:
    value = rows[-1].get("label_precision")
    return None if value is None else 100 * value


FIGURES: dict[str, Callable[[list[dict]], Optional[float]]] = {
    "last10": last_epochs_mean, "best": best_acc, "label_precision": final_label_precision}
TITLES = {"last10": "Test accuracy (%), mean of the last 10 epochs",
          "best": "Best test accuracy (%), the better network at its best epoch",
          "label_precision": "Label precision (%) of the last epoch: the share of kept samples whose label is right"}


@dataclass
class Cell:
    finished: list[tuple[Run, RunStatus]] = field(default_factory=list)
    unfinished: list[tuple[Run, RunStatus]] = field(default_factory=list)

    def values(self, figure: str) -> list[float]:
        values = [FIGURES[figure](st.rows) for _, st in self.finished]
        return [v for v in values if v is not None]

    def stats(self, figure: str) -> tuple[Optional[float], Optional[float]]:
        values = self.values(figure)
        if not values:
            return None, None
        return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else None

    def text(self, figure: str) -> str:
        mean, std = self.stats(figure)
        waiting = self._waiting()
        if mean is None:
            if not self.unfinished:
                return "n/a"
            return str(self.unfinished[0][1]) if len(self.unfinished) == 1 else waiting
        out = f"{mean:.2f}" + (f" ± {std:.2f}" if std is not None else "")
        return f"{out} (+{waiting})" if waiting else out

    def _waiting(self) -> str:
        """The runs not averaged: '2 unfinished, 1 not started'."""
        partial = sum(st.state == "partial" for _, st in self.unfinished)
        fresh = len(self.unfinished) - partial
        return ", ".join(part for part in (f"{partial} unfinished" if partial else "",
                                           f"{fresh} not started" if fresh else "") if part)


@dataclass
class Table:
    sweep: Sweep
    rows: list[tuple[str, str]]          # (dataset, setting), in the sweep's order
    methods: list[str]
    cells: dict[tuple[str, str, str], Cell]

    @property
    def runs(self) -> int:
        return sum(len(c.finished) + len(c.unfinished) for c in self.cells.values())

    def cell(self, dataset: str, setting: str, method: str) -> Cell:
        return self.cells.get((dataset, setting, method), Cell())

    def markdown(self) -> str:
        out = [f"# {self.sweep.description or self.sweep.path.stem}", "",
               f"Sweep `{self.sweep.path}`, {self.runs} of its {len(self.sweep.runs)} runs, in `{self.sweep.dir}`. "
               "Each cell: mean ± std over the finished seeds (the sample std, from two seeds on); "
               "'+k unfinished' / 'not started': runs not in the mean."]
        for figure, title in TITLES.items():
            head = " | ".join(map(display_name, self.methods))
            out += ["", f"## {title}", "", f"| dataset | setting | {head} |",
                    "|---|---|" + "---:|" * len(self.methods)]
            for dataset, setting in self.rows:
                cells = [self.cell(dataset, setting, m).text(figure) for m in self.methods]
                out.append(f"| {dataset} | {setting} | " + " | ".join(cells) + " |")
                paper = self.sweep.paper.get(setting)
                if paper and figure == "last10":
                    out.append(f"| | {setting}, paper | " +
                               " | ".join(f"{paper[m]:.2f}" if m in paper else "" for m in self.methods) + " |")
        return "\n".join(out) + "\n"

    def csv(self) -> str:
        buf = io.StringIO()
        w = csv.writer(buf, lineterminator="\n")
        head = ["dataset", "setting", "method", "runs_finished", "runs_unfinished"]
        for figure in FIGURES:
            head += [f"{figure}_mean", f"{figure}_std"]
        w.writerow(head + ["paper_last10"])
        for dataset, setting in self.rows:
            for method in self.methods:
                cell = self.cell(dataset, setting, method)
                line = [dataset, setting, method, len(cell.finished), len(cell.unfinished)]
                for figure in FIGURES:
                    line += ["" if v is None else f"{v:.4f}" for v in cell.stats(figure)]
                w.writerow(line + [self.sweep.paper.get(setting, {}).get(method, "")])
        return buf.getvalue()


def build_table(sweep: Sweep, runs: Optional[list[Run]] = None) -> Table:
    """The table of ``runs`` (default: the whole sweep)."""
    rows, methods, cells = [], [], {}
    for run in sweep.runs if runs is None else runs:
        key = (DATASETS.get(run.cfg.data.name, run.cfg.data.name), run.setting)
        if key not in rows:
            rows.append(key)
        if run.method not in methods:
            methods.append(run.method)
        st = status(run)
        if st.state == "finished":  # what is averaged is read strictly: a damaged line is an error
            st.metrics.checked()
        cell = cells.setdefault((*key, run.method), Cell())
        (cell.finished if st.state == "finished" else cell.unfinished).append((run, st))
    return Table(sweep, rows, methods, cells)


# --- picking one axis by validation accuracy -------------------------------------------------

@dataclass
class Choice:
    """One value of the picked axis within one combination of the other axes."""
    value: str
    split: str                        # the validation split that judges (val, noisy_val)
    cell: Cell = field(default_factory=Cell)

    def mean(self, figure: Callable[[list[dict]], Optional[float]]) -> Optional[float]:
        """The mean over the finished seeds of a per-run figure; None when none finished."""
        values = [figure(st.rows) for _, st in self.cell.finished]
        return statistics.fmean(values) if values else None

    @property
    def val(self) -> Optional[float]:
        return self.mean(lambda rows: last_epochs_mean(rows, split=self.split))

    @property
    def test(self) -> Optional[float]:
        return self.mean(last_epochs_mean)


@dataclass
class PickRow:
    combination: tuple[str, ...]      # the labels of the other axes, seeds aside
    choices: dict[str, Choice]        # the picked axis's value label -> its runs

    def _best(self, figure: str) -> Optional[Choice]:
        # max keeps the first of equals: on a tie the earlier value of the axis wins.
        done = [c for c in self.choices.values() if c.cell.finished]
        return max(done, key=lambda c: getattr(c, figure)) if done else None

    @property
    def picked(self) -> Optional[Choice]:
        return self._best("val")

    @property
    def oracle(self) -> Optional[Choice]:
        return self._best("test")

    @property
    def gap(self) -> Optional[float]:
        """What picking by val cost in clean test accuracy (0 when it found the oracle)."""
        return None if self.picked is None else self.oracle.test - self.picked.test

    def runs(self) -> Cell:
        """All runs of the row in one cell, for counting what is and is not in the means."""
        return Cell([x for c in self.choices.values() for x in c.cell.finished],
                    [x for c in self.choices.values() for x in c.cell.unfinished])


@dataclass
class Pick:
    sweep: Sweep
    axis: str
    others: list[str]                 # the axes that make a combination (not the seed, not axis)
    rows: list[PickRow]
    split: str                        # the validation split that judges every run (val, noisy_val)

    def _columns(self) -> list[str]:
        return self.others or ["combination"]

    def _combination(self, row: PickRow) -> list[str]:
        return list(row.combination) or ["all"]

    def markdown(self) -> str:
        out = [f"# {self.sweep.description or self.sweep.path.stem}: {self.axis} picked by validation accuracy", "",
               f"Sweep `{self.sweep.path}`, in `{self.sweep.dir}`. Per combination of the other axes, the "
               f"{self.axis} value whose runs have the best {self._val} acc ({SPLIT_WHAT[self.split]}), its "
               "test acc, the value the test acc would have picked (the oracle) and the gap: oracle test acc − "
               "picked test acc. Each figure: the mean over the finished seeds of the run's mean over its last "
               f"{LAST_EPOCHS} epochs of the two networks' accuracy.", "",
               "| " + " | ".join(self._columns()) + f" | picked by {self._val} | {self._val} acc (%) | test acc (%) "
               "| best by test | test acc (%) | gap | runs |",
               "|" + "---|" * len(self._columns()) + "---|---:|---:|---|---:|---:|---|"]
        for row in self.rows:
            picked, oracle, runs = row.picked, row.oracle, row.runs()
            waiting = runs._waiting()
            cells = [picked and picked.value, pct(picked and picked.val), pct(picked and picked.test),
                     oracle and oracle.value, pct(oracle and oracle.test), pct(row.gap),
                     f"{len(runs.finished)}" + (f" (+{waiting})" if waiting else "")]
            out.append("| " + " | ".join(self._combination(row) + [c or "–" for c in cells]) + " |")
        out += ["", self._verdict()]
        skipped = [f"{run.name} ({st})" for row in self.rows for run, st in row.runs().unfinished]
        if skipped:
            out += ["", "Skipped, not finished: " + ", ".join(skipped) + "."]
        return "\n".join(out) + "\n"

    def _verdict(self) -> str:
        scored = [row for row in self.rows if row.picked is not None]
        if not scored:
            return "No combination has a finished run yet."
        hits = sum(row.picked is row.oracle for row in scored)
        return (f"{self._val.capitalize()} acc picked the oracle's value in {hits} of {len(scored)} combinations; "
                f"mean gap {statistics.fmean(row.gap for row in scored):.2f} points of test accuracy.")

    @property
    def _val(self) -> str:
        return split_words(self.split)

    def csv(self) -> str:
        def num(v: Optional[float]) -> str:
            return "" if v is None else f"{v:.4f}"
        buf = io.StringIO()
        w = csv.writer(buf, lineterminator="\n")
        w.writerow(self._columns() + ["picked", "picked_val", "picked_test", "oracle", "oracle_val",
                                      "oracle_test", "gap", "runs_finished", "runs_unfinished", "val_split"])
        for row in self.rows:
            picked, oracle, runs = row.picked, row.oracle, row.runs()
            w.writerow(self._combination(row) + [
                picked.value if picked else "", num(picked and picked.val), num(picked and picked.test),
                oracle.value if oracle else "", num(oracle and oracle.val), num(oracle and oracle.test),
                num(row.gap), len(runs.finished), len(runs.unfinished), self.split])
        return buf.getvalue()


def check_pick_axis(sweep: Sweep, axis: str) -> None:
    allowed = [a for a in sweep.axes if a != SEED_AXIS]
    why = "seeds are averaged, not picked" if axis == SEED_AXIS else f"not an axis of {sweep.path}"
    if axis not in allowed:
        raise CommandError(f"--pick {axis}: {why}; the sweep's axes: {', '.join(allowed) or 'train.seed only'}")


# What each validation split measures, as the pick's page says it.
SPLIT_WHAT = {"val": "the clean validation split",
              NOISY_VAL: "the held-out split's noisy labels: what a user without clean labels sees"}
VAL_NEEDED = ("--pick needs runs with a validation split, a clean one (data.eval_splits with val) or a noisy "
              "one (data.noisy_val_fraction > 0) (narrow the sweep with --where if only some have one)")


def pick_split(runs: list[Run]) -> str:
    """The validation split that judges every run of a pick, read from the configs (so that a run
    without one is named before it has even started): the clean val split where every run scores
    it, else the noisy held-out one where every run has it; runs judged by different kinds of
    split are not compared."""
    offered = [(run, run.cfg.data.validation_splits()) for run in runs]
    for run, splits in offered:
        if not splits:
            raise CommandError(f"{VAL_NEEDED}: run {run.dir} has neither (data.eval_splits: "
                               f"[{', '.join(run.cfg.data.eval_splits)}], data.noisy_val_fraction = "
                               f"{run.cfg.data.noisy_val_fraction})")
    for split in VALIDATION_SPLITS:
        if all(split in splits for _, splits in offered):
            return split
    clean = next(run for run, splits in offered if NOISY_VAL not in splits)
    noisy = next(run for run, splits in offered if "val" not in splits)
    raise CommandError(f"--pick: the runs compared must be judged by the same kind of validation split, but run "
                       f"{clean.dir} scores a clean val split without a noisy one (data.noisy_val_fraction = 0) and "
                       f"run {noisy.dir} only a noisy one (no val in data.eval_splits); narrow the sweep with --where")


def check_val_rows(st: RunStatus, split: str) -> None:
    """That a finished run's rows, read strictly, hold the split's accuracy in every one."""
    if not has_split(st.metrics.checked(), split):
        raise CommandError(f"{VAL_NEEDED}: {st.metrics.path} has no {' / '.join(acc_keys(split))} in every row")


def build_pick(sweep: Sweep, axis: str, runs: Optional[list[Run]] = None) -> Pick:
    """Per combination of the axes other than ``axis`` and the seed: the value of ``axis``
    with the best validation accuracy, beside the best by test accuracy (of ``runs``, default all)."""
    check_pick_axis(sweep, axis)
    runs = sweep.runs if runs is None else runs
    split = pick_split(runs)
    others = [a for a in sweep.axes if a not in (axis, SEED_AXIS)]
    rows: dict[tuple[str, ...], PickRow] = {}
    for run in runs:
        combination = tuple(run.labels[a] for a in others)
        row = rows.setdefault(combination, PickRow(combination, {}))
        choice = row.choices.setdefault(run.labels[axis], Choice(run.labels[axis], split))
        st = status(run)
        if st.state == "finished":  # what is averaged is read strictly, as in build_table
            check_val_rows(st, split)
            choice.cell.finished.append((run, st))
        else:
            choice.cell.unfinished.append((run, st))
    return Pick(sweep, axis, others, list(rows.values()), split)
