"""The paper's table from a sweep: a row per dataset and setting, a column per method, each
cell the mean ± std over seeds of a per-run figure, with the paper's figure beside it.

Per run (``metrics.jsonl``): the test accuracy averaged over its last 10 epochs (the paper's
headline number: the mean over those epochs of (test_acc1 + test_acc2) / 2), the best test
accuracy (the better network at its best epoch) and the label precision of the last epoch.
Only finished runs are averaged; a cell says how many runs are still unfinished, and a cell
with none finished says where they stand: nothing is averaged in silently. The std is the
sample standard deviation over seeds (n - 1), shown from two finished runs on.
"""

from __future__ import annotations

import csv
import io
import statistics
from dataclasses import dataclass, field
from typing import Callable, Optional

from .grid import Run, RunStatus, Sweep, status
from .restore import read_metrics

DATASETS = {"mnist": "MNIST", "fashion-mnist": "Fashion-MNIST", "cifar10": "CIFAR-10", "cifar100": "CIFAR-100",
            "clothing1m": "Clothing1M", "imagefolder": "ImageFolder"}
LAST_EPOCHS = 10


def mean_acc(row: dict) -> float:
    return (row["test_acc1"] + row["test_acc2"]) / 2


def last_epochs_mean(rows: list[dict], n: int = LAST_EPOCHS) -> float:
    """Mean over the last min(n, E) epochs of the two networks' mean test accuracy."""
    tail = rows[-n:]
    return sum(mean_acc(r) for r in tail) / len(tail)


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
            out += ["", f"## {title}", "", "| dataset | setting | " + " | ".join(self.methods) + " |",
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
            st.rows = read_metrics(run.dir / "metrics.jsonl")
        cell = cells.setdefault((*key, run.method), Cell())
        (cell.finished if st.state == "finished" else cell.unfinished).append((run, st))
    return Table(sweep, rows, methods, cells)
