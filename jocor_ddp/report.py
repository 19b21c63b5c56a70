"""Compare finished (or running) runs: ``python -m jocor_ddp.report RUN_DIR [...] --out DIR``,
or a whole sweep: ``python -m jocor_ddp.report --sweep SWEEP.yaml [--out DIR] [--pick AXIS]``.

Reads each RUN_DIR/metrics.jsonl and RUN_DIR/config.yaml and writes, in the JoCoR
paper's style:
  - DIR/report.md (also printed): one row per run with its method, noise, the mean test
    accuracy of both networks over the last min(10, E) epochs (the paper's headline
    number: the mean over those epochs of (test_acc1 + test_acc2) / 2), the best
    accuracy (the better network's, at its best epoch), the test accuracy at the best
    validation epoch (the mean of both networks at the epoch of the highest mean validation
    accuracy: the field's Clothing1M protocol, what early stopping on it gives) with the
    split that judged (the clean val split where the run scores one, else the noisy held-out
    split) and that split's last-10 mean, and the final label precision; below the table, how
    well validation accuracy ranks the runs against test accuracy (Kendall's tau);
    DIR/report.json holds the same numbers unrounded; for each run that estimated its
    transition matrix (F-correction, method.transition auto) the matrix, with each
    estimator's distance to the drawn labels' empirical T where noise.json has it;
  - DIR/test_accuracy.png and DIR/label_precision.png: one line per run against the
    epoch, the legend naming method and noise; DIR/transition_RUN.png for a run's estimated T.
With ``--sweep`` (``tables.py``): the paper's layout, a row per dataset and setting and a
column per method, each cell the mean ± std over seeds (DIR/table.md, also printed, and
DIR/table.csv; DIR defaults to the sweep's folder + /report), and per setting the test
accuracy and label precision against the epoch, a line per method (the mean over the
finished seeds, a band of ± one std).
With ``--sweep`` and ``--pick AXIS`` instead: per combination of the other axes (seeds
averaged), the AXIS value with the best validation accuracy (clean val where every run scores
it, else noisy val) beside the one the test accuracy would pick (DIR/pick.md, also printed, and
DIR/pick.csv): hyperparameter selection without touching the test split.
The table is written first; the plots need matplotlib (``pip install -e .[report]``).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Optional

import yaml

from .grid import Run, Sweep, load_sweep
from .job import CommandError, guarded
from .registry import display_name
from .runfolder import CONFIG, METRICS, NOISE, TRANSITION, read_metrics, split_words, write_json
from .tables import (LAST_EPOCHS, Table, best_acc, best_val_row, build_pick, build_table, kendall_tau,
                     last_epochs_mean, last_epochs_val_mean, mean_acc, pct)
from .transition import ANCHOR_SET, PATRINI, TITLES, draw_matrices, mean_row_l1

# Matrices of more classes than this are left out of report.md (they are in report.json).
MARKDOWN_MAX_CLASSES = 10



@dataclass
class RunSummary:
    name: str
    method: str
    noise: str
    epochs: int
    last10_acc: float            # percent
    best_acc: float              # percent
    test_acc_at_best_val: Optional[float]   # percent, mean of both nets at the best validation epoch
    val_split: Optional[str]                # the split that judged: val (clean), noisy_val; None without one
    best_val_epoch: Optional[int]
    last10_val_acc: Optional[float]         # percent, that split's last-10 mean
    final_label_precision: Optional[float]  # percent, None when the run has no clean labels
    transition: Optional[dict] = None       # the T it estimated (method.transition auto), see estimated_transition
    rows: list = field(repr=False, default_factory=list)

    @property
    def label(self) -> str:
        return f"{display_name(self.method)} ({self.noise})"


def describe_noise(cfg: dict) -> str:
    noise = cfg.get("noise") or {}
    kind, rate = noise.get("type", "?"), noise.get("rate")
    if kind == "none" or rate == 0:
        return "none"
    if kind == "file" or not isinstance(rate, (int, float)):
        return kind
    return f"{kind} {100 * rate:g}%"


def read_config(run: Path) -> dict:
    path = run / CONFIG
    if not path.is_file():
        print(f"warning: {path}: not found; method and noise unknown", file=sys.stderr)
        return {}
    try:
        cfg = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise CommandError(f"{path}: not valid YAML: {str(exc).splitlines()[0]}") from None
    if not isinstance(cfg, dict):
        raise CommandError(f"{path}: expected a mapping at the top level")
    return cfg


def summarize(run: Path, name: str) -> RunSummary:
    if not run.is_dir():
        raise CommandError(f"{run}: not a run folder")
    rows = read_metrics(run / METRICS).checked()
    cfg = read_config(run)
    precision = rows[-1].get("label_precision")
    best_val, split = best_val_row(rows)
    return RunSummary(name=name, method=str((cfg.get("method") or {}).get("name", "?")),
                      noise=describe_noise(cfg) if cfg else "?", epochs=len(rows),
                      last10_acc=last_epochs_mean(rows), best_acc=best_acc(rows),
                      test_acc_at_best_val=None if best_val is None else mean_acc(best_val), val_split=split,
                      best_val_epoch=None if best_val is None else int(best_val["epoch"]),
                      last10_val_acc=last_epochs_val_mean(rows, split),
                      final_label_precision=100 * precision if precision is not None else None,
                      transition=estimated_transition(run, rows), rows=rows)


def read_json(path: Path) -> Optional[dict]:
    """A run folder's JSON record, or None where it is missing or unreadable (with a warning)."""
    if not path.is_file():
        return None
    try:
        found = json.loads(path.read_text())
    except ValueError as exc:
        print(f"warning: {path}: not valid JSON ({exc}); left out", file=sys.stderr)
        return None
    return found if isinstance(found, dict) else None


def estimated_transition(run: Path, rows: list[dict]) -> Optional[dict]:
    """The transition matrix a run estimated (method.transition auto), None where it estimated
    none: the anchor set's T it trained with (RUN/transition.json, exact; the metrics row's
    4-decimal copy where that file is gone) and Patrini's estimate from the same scoring pass
    (the row's), each with its mean row L1 distance to the drawn labels' empirical T where
    RUN/noise.json records one."""
    estimates = [r for r in rows if isinstance(r.get("transition_estimate"), dict)]
    if not estimates:
        return None
    row = estimates[-1]  # the last: the first estimate, or its last refinement (method.refine_rounds)
    found = row["transition_estimate"]
    trained = read_json(run / TRANSITION) or {}
    exact = trained.get("matrix") if str(trained.get("source", "")).startswith("auto: anchor set") else None
    empirical = (read_json(run / NOISE) or {}).get("empirical_transition")

    def errors(matrices: dict) -> dict:
        return {name: mean_row_l1(m, empirical) if m and empirical else None for name, m in matrices.items()}

    def matrices(record: dict) -> dict:
        return {ANCHOR_SET: record.get("matrix"), PATRINI: (record.get(PATRINI) or {}).get("matrix")}
    earlier = [{"epoch": r["transition_estimate"].get("epoch", r["epoch"]),
                "refinement": r["transition_estimate"].get("refinement", 0),
                "error": errors(matrices(r["transition_estimate"]))} for r in estimates[:-1]]
    final = {**matrices(found), ANCHOR_SET: exact or found.get("matrix")}
    return {"epoch": found.get("epoch", row["epoch"]), "refinement": found.get("refinement", 0),
            "undecided": found.get("undecided", {}), **final, "empirical": empirical, "error": errors(final),
            "earlier": earlier}


def run_names(runs: list[Path]) -> list[str]:
    """Folder names, or the paths as given where two runs share a folder name."""
    names = [r.name or str(r) for r in runs]
    return [n if names.count(n) == 1 else str(r) for n, r in zip(names, runs)]


def markdown_table(summaries: list[RunSummary]) -> str:
    lines = ["| run | method | noise | epochs | test acc, last-10 mean (%) | best test acc (%) "
             "| test acc at best val epoch (%) | val split | val acc, last-10 mean (%) | final label precision (%) |",
             "|---|---|---|---:|---:|---:|---:|---|---:|---:|"]
    for s in summaries:
        lines.append(f"| {s.name} | {s.method} | {s.noise} | {s.epochs} | {pct(s.last10_acc)} | "
                     f"{pct(s.best_acc)} | {pct(s.test_acc_at_best_val, 'n/a')} | "
                     f"{split_words(s.val_split) if s.val_split else 'n/a'} | {pct(s.last10_val_acc, 'n/a')} | "
                     f"{pct(s.final_label_precision, 'n/a')} |")
    lines += ["", f"Test acc, last-10 mean: the mean over the last min({LAST_EPOCHS}, epochs) epochs of "
                  "(test_acc1 + test_acc2) / 2. Best: the better network at its best epoch. Test acc at best "
                  "val epoch: (test_acc1 + test_acc2) / 2 at the epoch whose mean validation accuracy is the "
                  "highest (the first of equals), what early stopping on it gives; val split: the split that "
                  "judged, val (clean labels, data.eval_splits) where the run scores it, else noisy val (the "
                  "held-out share of the noisy training labels, data.noisy_val_fraction); n/a without either. "
                  "Val acc: that split's last-10 mean of (acc1 + acc2) / 2. Label precision: the share of the "
                  "samples kept for the update whose label is clean, in the last epoch (n/a without clean "
                  "labels)."]
    ranking = val_ranking(summaries)
    if ranking:
        lines += ["", ranking]
    for s in summaries:
        if s.transition:
            lines += ["", *transition_markdown(s.name, s.transition)]
    return "\n".join(lines) + "\n"


def transition_markdown(name: str, t: dict) -> list[str]:
    """A run's estimated T: how far each estimate is from the empirical T, then the matrix."""
    refined = f", refinement {t['refinement']}" if t.get("refinement") else ""
    lines = [f"### Transition matrix of {name}: T[i, j] = P(given label j | clean class i), estimated after "
             f"epoch {t['epoch']} (the {TITLES[ANCHOR_SET]}{refined}, what the run trained with)", ""]

    def errors(error: dict) -> str:
        return ", ".join(f"{TITLES[n]} {error[n]:.3f}" for n in (ANCHOR_SET, PATRINI) if error[n] is not None)
    if errors(t["error"]):
        lines += [f"Mean row L1 distance to the empirical T of the drawn labels (noise.json): {errors(t['error'])} "
                  "(Patrini's estimator from the same scoring pass, for comparison).", ""]
    before = [f"epoch {e['epoch']}" + (f" (refinement {e['refinement']})" if e["refinement"] else "")
              + f": {errors(e['error'])}" for e in t.get("earlier", []) if errors(e["error"])]
    if before:
        lines += [f"The estimates before it, the same distances: {'; '.join(before)}.", ""]
    if t["undecided"]:
        lines += [f"Undecided rows, the identity: {', '.join(sorted(t['undecided'], key=int))}.", ""]
    matrix = t[ANCHOR_SET]
    if len(matrix) > MARKDOWN_MAX_CLASSES:
        return lines + [f"({len(matrix)} x {len(matrix)}: in report.json)"]
    lines += ["| i \\ j | " + " | ".join(map(str, range(len(matrix)))) + " |", "|---|" + "---:|" * len(matrix)]
    return lines + [f"| {i} | " + " | ".join(f"{v:.3f}" for v in row) + " |" for i, row in enumerate(matrix)]


def val_ranking(summaries: list[RunSummary]) -> Optional[str]:
    """How well validation accuracy ranks the runs against the test accuracy, per noise setting
    and kind of validation split (noisy labels of different settings put noisy val accuracy on
    different scales, and clean val is another scale again, so runs are only compared within
    one); None where no group has two runs."""
    groups: dict[tuple[str, str], list[RunSummary]] = {}
    for s in summaries:
        if s.val_split is not None:
            groups.setdefault((s.noise, s.val_split), []).append(s)
    lines = [_val_ranking(noise, split, runs) for (noise, split), runs in groups.items() if len(runs) >= 2]
    return "\n\n".join(lines) if lines else None


def _val_ranking(noise: str, split: str, runs: list[RunSummary]) -> str:
    tau = kendall_tau([s.last10_val_acc for s in runs], [s.last10_acc for s in runs])
    by_val = max(runs, key=lambda s: s.last10_val_acc)  # the first of equals
    by_test = max(runs, key=lambda s: s.last10_acc)
    words = split_words(split)
    same = ("is also the best by test acc" if by_val is by_test
            else f"is not the best by test acc ({by_test.name}: {by_test.last10_acc:.2f}% vs "
                 f"{by_val.last10_acc:.2f}%)")
    return (f"{words.capitalize()} acc against test acc over the {len(runs)} {noise} runs judged by {words} "
            f"(last-10 means): Kendall's tau = {tau:.2f} (1: the same order, -1: reversed); the best by {words} "
            f"acc, {by_val.name}, {same}.")


def pyplot(table: Path):
    try:
        import matplotlib
    except ImportError:
        raise CommandError(f"the plots need matplotlib: pip install -e .[report] (the table is in {table})") from None
    matplotlib.use("Agg")  # no display needed
    import matplotlib.pyplot as plt
    return plt


def plot(summaries: list[RunSummary], out: Path, acc: str) -> list[Path]:
    plt = pyplot(out / "report.md")

    labels = [s.label for s in summaries]
    labels = [lab if labels.count(lab) == 1 else f"{lab}, {s.name}" for lab, s in zip(labels, summaries)]
    written = []
    for what, ylabel in (("test_accuracy", "test accuracy (%)"), ("label_precision", "label precision (%)")):
        fig, ax = plt.subplots(figsize=(6, 4.5))
        for s, label in zip(summaries, labels):
            epochs = [r["epoch"] for r in s.rows]
            if what == "test_accuracy" and acc == "both":
                line, = ax.plot(epochs, [r["test_acc1"] for r in s.rows], label=f"{label}, net 1")
                ax.plot(epochs, [r["test_acc2"] for r in s.rows], "--", color=line.get_color(),
                        label=f"{label}, net 2")
            elif what == "test_accuracy":
                ax.plot(epochs, [mean_acc(r) for r in s.rows], label=label)
            else:
                points = [(r["epoch"], 100 * r["label_precision"]) for r in s.rows
                          if r.get("label_precision") is not None]
                if points:
                    ax.plot(*zip(*points), label=label)
        written.append(save_figure(plt, fig, ax, ylabel, out / f"{what}.png", "no run records it"))
    for s, label in zip(summaries, labels):
        t = s.transition
        if t:
            at = f", epoch {t['epoch']}" + (f" (refinement {t['refinement']})" if t.get("refinement") else "")
            panels = [(TITLES[n] + at + ("" if t["error"][n] is None else f"\nmean row L1 {t['error'][n]:.3f}"), t[n])
                      for n in (ANCHOR_SET, PATRINI) if t[n]]
            if t["empirical"]:
                panels.append(("empirical (drawn labels)", t["empirical"]))
            path = out / f"transition_{s.name.strip('/').replace('/', '_')}.png"
            draw_matrices(plt, panels, path)
            written.append(path)
    return written


def save_figure(plt, fig, ax, ylabel: str, path: Path, empty: str) -> Path:
    """Label, legend (or say why there is no line) and write one plot."""
    ax.set_xlabel("epoch")
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    if ax.lines:
        ax.legend(fontsize="small")
    else:
        ax.text(0.5, 0.5, empty, ha="center", va="center", transform=ax.transAxes)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def plot_sweep(table: Table, out: Path) -> list[Path]:
    """Per setting: test accuracy and label precision against the epoch, a line per method
    (mean over the finished seeds) in a band of ± one std; unfinished runs are left out and
    counted in the legend."""
    plt = pyplot(out / "table.md")
    written = []
    for dataset, setting in table.rows:
        if not any(table.cell(dataset, setting, m).finished for m in table.methods):
            continue  # nothing finished in this setting yet
        for what, ylabel in (("test_accuracy", "test accuracy (%)"), ("label_precision", "label precision (%)")):
            fig, ax = plt.subplots(figsize=(6, 4.5))
            for method in table.methods:
                cell = table.cell(dataset, setting, method)
                get = mean_acc if what == "test_accuracy" else (
                    lambda r: None if r.get("label_precision") is None else 100 * r["label_precision"])
                series = [[get(r) for r in st.rows] for _, st in cell.finished]
                series = [s for s in series if s and None not in s]
                if not series:
                    continue  # a method with no finished run draws nothing; the table says why
                n = min(len(s) for s in series)
                per_epoch = [[s[e] for s in series] for e in range(n)]
                mean = [sum(v) / len(v) for v in per_epoch]
                epochs = list(range(1, n + 1))
                name = f"{display_name(method)} ({len(series)} run{'s' if len(series) > 1 else ''}"
                name += f"; {len(cell.unfinished)} unfinished left out)" if cell.unfinished else ")"
                line, = ax.plot(epochs, mean, label=name)
                if len(series) > 1:
                    std = [statistics.stdev(v) for v in per_epoch]
                    ax.fill_between(epochs, [m - d for m, d in zip(mean, std)], [m + d for m, d in zip(mean, std)],
                                    color=line.get_color(), alpha=0.2, linewidth=0)
            ax.set_title(f"{dataset}, {setting}")
            written.append(save_figure(plt, fig, ax, ylabel, out / f"{dataset.lower()}_{setting}_{what}.png",
                                       "no finished run records it"))
    return written


def sweep_report(args: argparse.Namespace) -> None:
    sweep = load_sweep(args.sweep)
    out = Path(args.out) if args.out else sweep.dir / "report"
    if args.pick is not None:  # --pick '' names no axis: an error, not the table
        pick_report(sweep, args.pick, sweep.select(args.where), out)
        return
    out.mkdir(parents=True, exist_ok=True)
    table = build_table(sweep, sweep.select(args.where))
    markdown = table.markdown()
    (out / "table.md").write_text(markdown)
    (out / "table.csv").write_text(table.csv())
    print(markdown, end="")
    if not args.no_plots:
        for path in plot_sweep(table, out):
            print(f"wrote {path}")
    print(f"wrote {out / 'table.md'} and {out / 'table.csv'}")


def pick_report(sweep: Sweep, axis: str, runs: list[Run], out: Path) -> None:
    pick = build_pick(sweep, axis, runs)  # checks the axis and the runs before anything is written
    out.mkdir(parents=True, exist_ok=True)
    markdown = pick.markdown()
    (out / "pick.md").write_text(markdown)
    (out / "pick.csv").write_text(pick.csv())
    print(markdown, end="")
    print(f"wrote {out / 'pick.md'} and {out / 'pick.csv'}")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m jocor_ddp.report",
        description="Compare runs: a Markdown table (DIR/report.md, also printed; with the test accuracy at "
                    "the best validation epoch for runs with a validation split: a clean val split in "
                    "data.eval_splits, else data.noisy_val_fraction > 0) and PNG plots of test accuracy and "
                    "label precision against the epoch, one line per run. With --sweep: the sweep's "
                    "table, or with --pick AXIS the AXIS value chosen by validation accuracy.",
        epilog="The plots need matplotlib: pip install -e .[report]. The table is written without it.")
    p.add_argument("runs", nargs="*", metavar="RUN_DIR", help="run folders (each with metrics.jsonl "
                                                             "and config.yaml)")
    p.add_argument("--sweep", metavar="SWEEP.yaml", help="the table of a whole sweep (configs/sweeps/)")
    p.add_argument("--where", action="append", default=[], metavar="AXIS=V1,V2",
                   help="with --sweep: the table of these runs only (as python -m jocor_ddp.sweep --where)")
    p.add_argument("--pick", metavar="AXIS",
                   help="with --sweep, instead of the table: per combination of the other axes (seeds "
                        "averaged), the AXIS value (e.g. method.forget_rate) with the best last-10 mean "
                        "validation accuracy (clean val where every run scores it, else noisy val), beside the "
                        "value the test accuracy would pick and the gap (DIR/pick.md and DIR/pick.csv); needs "
                        "runs with a validation split (val in data.eval_splits, or data.noisy_val_fraction > 0)")
    p.add_argument("--out", metavar="DIR", help="output folder (with --sweep: default SWEEP_DIR/report)")
    p.add_argument("--acc", choices=("mean", "both"), default="mean",
                   help="plot the mean of the two networks' test accuracy (default) or both networks")
    p.add_argument("--no-plots", action="store_true", help="write only the table")
    args = p.parse_args(argv)
    if bool(args.sweep) == bool(args.runs):
        p.error("give run folders or --sweep SWEEP.yaml (one of the two)")
    if args.runs and not args.out:
        p.error("--out DIR is required with run folders")
    if args.where and not args.sweep:
        p.error("--where goes with --sweep")
    if args.pick is not None and not args.sweep:
        p.error("--pick goes with --sweep")
    return args


def report(args: argparse.Namespace) -> None:
    runs = [Path(r) for r in args.runs]
    summaries = [summarize(run, name) for run, name in zip(runs, run_names(runs))]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    table = markdown_table(summaries)
    (out / "report.md").write_text(table)
    write_json(out / "report.json", [{k: v for k, v in asdict(s).items() if k != "rows"} for s in summaries])
    print(table, end="")
    if not args.no_plots:
        for path in plot(summaries, out, args.acc):
            print(f"wrote {path}")
    print(f"wrote {out / 'report.md'}")


def main(argv=None) -> int:
    args = parse_args(argv)
    return guarded(sweep_report if args.sweep else report, args)


if __name__ == "__main__":
    sys.exit(main())
