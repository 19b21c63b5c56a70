"""Estimate the noise rate of a training set before a long run:
``python -m jocor_ddp.estimate_noise --config FILE [key=value ...] [--out FILE.json]``.

It trains the pair only as far as ``method.forget_rate: auto`` needs (the first
max(method.num_gradual, 1) epochs, with the run's schedule), scoring the training split
after each, and prints the estimate with its evidence. No test evaluation and no
checkpoint: a fraction of the run's cost (Fashion-MNIST, MLP pair: 10 of 200 epochs).
The estimate equals the one a training run with ``method.forget_rate: auto`` and the same
config reaches. One process, or several under torchrun.

After it, the noise transition matrix estimated from the last epoch's scoring pass, both ways
of ``transition.py`` (the anchor set and Patrini's), and where the labels' clean ones are known
(noise.json's ``empirical_transition``) that matrix and each estimate's mean row L1 distance
to it; ``--heatmap FILE.png`` draws them side by side (matplotlib, the ``[report]`` extra).
Then the refinement of ``method.transition: auto`` (method.refine_rounds rounds of
method.refine_epochs; 0 rounds: none): a fresh pair trained with F-correction on the anchor
set's T, the anchor set read again from it after each round (docs/methods.md says why).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Optional

from .config import Config
from .correction import Transition
from .dist import DistContext, agree
from .job import CommandError, run_job
from .noise_rate import ANCHOR_SHARE
from .trainer import Trainer
from .transition import (ANCHOR_SET, PATRINI, PATRINI_PERCENTILE, TITLES, correction_estimate, draw_matrices,
                         estimate_transitions, mean_row_l1, undecided_line)

# Matrices of more classes than this are not printed (they are in --out and --heatmap).
PRINT_MAX_CLASSES = 20
EMPIRICAL = "empirical"


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m jocor_ddp.estimate_noise",
        description="Estimate the share of wrong training labels (what method.forget_rate: auto sets tau "
                    "to) by training the pair over the estimator's epochs only, and print it with its "
                    "evidence.",
        epilog="Overrides are dotted keys, as for train; method.forget_rate is set to auto.")
    p.add_argument("--config", help="YAML config file (configs/*.yaml)")
    p.add_argument("--out", metavar="FILE.json", help="also write every epoch's estimate and evidence, and the "
                                                         "transition matrices with their errors, here")
    p.add_argument("--heatmap", metavar="FILE.png",
                   help="also draw the estimated transition matrices and the empirical one side by side "
                        "(needs matplotlib: pip install -e .[report])")
    p.add_argument("--run-dir", metavar="DIR",
                   help="the folder for the short run's config and noise files (default: a temporary one)")
    p.add_argument("overrides", nargs="*", metavar="key=value")
    return p.parse_args(argv)


def estimate(trainer: Trainer) -> list[dict]:
    """Train epoch by epoch until the estimate is final; one row per estimate."""
    rows, epoch = [], 0
    while trainer.auto.wants(epoch):
        row = trainer.train_epoch(epoch)
        row.update(trainer.estimate_noise(epoch))
        rows.append({"epoch": epoch + 1, "forget_rate": row["forget_rate"], "epoch_s": row["epoch_s"],
                     "estimate_s": row["estimate_s"], "forget_rate_estimate": row["forget_rate_estimate"],
                     **row["noise_estimate"]})
        if trainer.ctx.is_main:
            ev = row["noise_estimate"]
            print(f"epoch {epoch + 1}/{trainer.auto.last_epoch + 1}: {trainer.auto.describe(row)}; both networks "
                  f"predict against the label for {100 * ev['disagreement']:.1f}% "
                  f"({row['epoch_s']:.1f}s training, {row['estimate_s']:.1f}s scoring)", flush=True)
        epoch += 1
    return rows


def summary(trainer: Trainer, rows: list[dict]) -> str:
    last = rows[-1]
    if last["undecided"] and trainer.auto.estimate is None:
        return (f"noise rate: undecided ({last['undecided']}); a training run would use the fallback "
                f"method.forget_rate_fallback={trainer.auto.fallback:g}")
    text = f"noise rate estimate: {trainer.auto.estimate:.3f} (the share of wrong training labels)"
    noise = trainer.data.noise
    if noise is not None and noise.type != "file":
        text += f"; actual {noise.actual_rate:.3f} ({noise.type} {noise.rate:g} noise drawn by this config)"
    return text


def transitions(trainer: Trainer, epoch: int, evidence: Optional[dict] = None) -> dict:
    """Both transition-matrix estimates from the last scoring pass (``evidence``; default: the
    noise-rate estimate's), and where the clean labels are known the empirical matrix and each
    estimate's mean row L1 distance to it."""
    found = estimate_transitions(trainer.auto.evidence if evidence is None else evidence, trainer.data.num_classes)
    noise = trainer.data.noise
    empirical = None if noise is None else noise.empirical_transition
    result = {"epoch": epoch, "anchor_share": ANCHOR_SHARE, "percentile": PATRINI_PERCENTILE,
              EMPIRICAL: empirical, "requested": None if noise is None else noise.transition}
    for name, est in found.items():
        result[name] = {**est.to_dict(), "error": error(est.matrix, empirical)}
    return result


def error(matrix, empirical) -> Optional[float]:
    return None if empirical is None else mean_row_l1(matrix, empirical)


def refine(trainer: Trainer, first: dict) -> list[dict]:
    """method.transition auto's refinement, from the anchor set of the noise-rate pass (``first``,
    from ``transitions``): a fresh pair of the same config trained with F-correction on it for
    method.refine_epochs, the anchor set read again from that pair's scoring pass (its undecided
    rows keep the T it trained with, as in a run), and so on for method.refine_rounds. Returns a
    ``transitions`` record per round, whose anchor set is the refined T. The pair is the first
    pass's data with fresh weights (train.seed), not the run's warm-up pair: F-correction's run
    warms up with plain cross-entropy instead (docs/methods.md)."""
    cfg, ctx, c = trainer.cfg, trainer.ctx, trainer.data.num_classes
    rounds, epochs = cfg.method.refine_rounds, cfg.method.refine_epochs
    # The rounds are driven from here (Trainer.fit never runs): the warm-up and refinement keys
    # are set only so that the config validates; train.epochs so that the schedules cover them.
    method = dataclasses.replace(cfg.method, name="fcorrection", transition="auto", forget_rate=None,
                                 warmup_epochs=1, refine_rounds=0)
    train = dataclasses.replace(cfg.train, epochs=max(cfg.train.epochs, rounds * epochs + 1))
    run = dataclasses.replace(cfg.run, dir=str(Path(cfg.run.dir) / "refine"))
    pair = Trainer(dataclasses.replace(cfg, method=method, train=train, run=run), ctx, data=trainer.data)
    # The first T as a run would train with it (correction_estimate: a label no anchor carries
    # gets its identity row, not a column of zeros and an infinite loss).
    first_t, _, _ = correction_estimate(trainer.auto.evidence, c, first["epoch"] - 1)
    pair.use_transition(Transition(first_t, f"anchor set, epoch {first['epoch']}"))
    found = []
    for k in range(1, rounds + 1):
        start = time.perf_counter()
        for epoch in range((k - 1) * epochs, k * epochs):
            pair.train_epoch(epoch)
        trained_s = time.perf_counter() - start
        evidence = pair.score_training_split()
        matrix, record, lines = correction_estimate(evidence, c, k * epochs - 1, k, previous=pair.transition.matrix)
        pair.use_transition(Transition(matrix, f"anchor set, refinement {k}"))
        result = transitions(trainer, k * epochs, evidence)
        result[ANCHOR_SET] = {"matrix": matrix.tolist(), "undecided": record["undecided"],
                              "error": error(matrix, result[EMPIRICAL])}
        result["refinement"] = k
        found.append(result)
        if ctx.is_main:
            for line in lines:
                print(line, flush=True)
            errors = ("" if result[EMPIRICAL] is None else
                      f": mean row L1 to the empirical T {result[ANCHOR_SET]['error']:.3f} (Patrini's from the "
                      f"same pass {result[PATRINI]['error']:.3f})")
            print(f"refinement {k}/{rounds}: {epochs} epoch(s) of F-correction with the last estimate, then the anchor "
                  f"set again{errors} ({trained_s:.1f}s training, {time.perf_counter() - start - trained_s:.1f}s "
                  f"scoring)", flush=True)
    return found


def matrix_lines(matrix: list) -> list[str]:
    if len(matrix) > PRINT_MAX_CLASSES:
        return [f"  ({len(matrix)} x {len(matrix)}: in --out and --heatmap)"]
    return [f"  {i:>2}: " + " ".join(f"{v:.3f}" for v in row) for i, row in enumerate(matrix)]


def refined_lines(found: dict, rounds: int) -> list[str]:
    """The refined T under its heading, 3 decimals."""
    error = found[ANCHOR_SET]["error"]
    return [f"refined (the anchor set after {rounds} round(s) of F-correction, method.transition auto's refinement)"
            + ("" if error is None else f": mean row L1 to the empirical T {error:.3f}"),
            *matrix_lines(found[ANCHOR_SET]["matrix"])]


def transition_lines(found: dict) -> list[str]:
    """The warnings of undecided rows, then each matrix under its heading, 3 decimals."""
    lines = [undecided_line(name, i, why)
             for name in (ANCHOR_SET, PATRINI) for i, why in found[name]["undecided"].items()]
    lines.append(f"transition matrix T[i, j] = P(given label j | clean class i), row i, from epoch {found['epoch']}'s "
                 f"scoring pass:")
    rules = {ANCHOR_SET: f"the given labels among the {100 * ANCHOR_SHARE:g}% most confident samples predicted as i",
             PATRINI: f"the mean softmax of the sample with the highest p(i | x) below its {PATRINI_PERCENTILE:g}th "
                      f"percentile"}
    for name in (ANCHOR_SET, PATRINI):
        error = found[name]["error"]
        lines.append(f"{TITLES[name]} ({rules[name]})" +
                     ("" if error is None else f": mean row L1 to the empirical T {error:.3f}"))
        lines += matrix_lines(found[name]["matrix"])
    if found[EMPIRICAL] is not None:
        lines.append("empirical (the given labels against the clean ones, noise.json's empirical_transition)")
        lines += matrix_lines(found[EMPIRICAL])
    return lines


def pyplot():
    """matplotlib's pyplot, or one line saying how to install it."""
    try:
        import matplotlib
    except ImportError:
        raise CommandError("--heatmap needs matplotlib: pip install -e .[report]") from None
    matplotlib.use("Agg")  # no display needed
    import matplotlib.pyplot as plt
    return plt


def draw_heatmap(found: dict, path: str, refined: Optional[dict] = None) -> None:
    """The estimated matrices (the refined one where there is one) and the empirical one, side
    by side."""
    def title(name, record):
        return name + ("" if record["error"] is None else f"\nmean row L1 {record['error']:.3f}")
    panels = [(title(TITLES[name], found[name]), found[name]["matrix"]) for name in (ANCHOR_SET, PATRINI)]
    if refined is not None:
        panels.append((title(f"{TITLES[ANCHOR_SET]}, refined", refined[ANCHOR_SET]), refined[ANCHOR_SET]["matrix"]))
    if found[EMPIRICAL] is not None:
        panels.append(("empirical (drawn labels)", found[EMPIRICAL]))
    draw_matrices(pyplot(), panels, path)


def run(cfg: Config, ctx: DistContext, out: Optional[str], heatmap: Optional[str]) -> None:
    if heatmap:
        pyplot()  # before the training, not after it
    trainer = Trainer(cfg, ctx)
    agree(ctx, trainer.runlog.record)
    trainer.auto.probs = True  # the scoring pass also keeps the mean softmax: the matrices need it
    if ctx.is_main:
        print(f"estimating the noise rate of {cfg.data.name} ({trainer.data.train.index_range} training "
              f"samples): {trainer.auto.last_epoch + 1} epoch(s) of {cfg.method.name} training", flush=True)
    rows = estimate(trainer)
    found = transitions(trainer, rows[-1]["epoch"])  # the gathered evidence: the same on every rank
    if ctx.is_main:
        print(summary(trainer, rows), flush=True)
        print("\n".join(transition_lines(found)), flush=True)
    refined = refine(trainer, found) if cfg.method.refine_rounds else []  # collectives: every rank
    if ctx.is_main:
        if refined:
            print("\n".join(refined_lines(refined[-1], cfg.method.refine_rounds)), flush=True)
        if out:
            Path(out).write_text(json.dumps({"estimate": trainer.auto.estimate, "epochs": rows,
                                             "transition": found, "refinements": refined}, indent=1))
        if heatmap:
            draw_heatmap(found, heatmap, refined[-1] if refined else None)
            print(f"heatmap: {heatmap}", flush=True)


def main(argv=None) -> int:
    args = parse_args(argv)
    run_dir = args.run_dir or tempfile.mkdtemp(prefix="jocor_estimate_")
    overrides = args.overrides + ["method.forget_rate=auto", f"run.dir={run_dir}", "train.resume=never",
                                  "log.tensorboard=false"]
    return run_job(args.config, overrides, lambda cfg, ctx: run(cfg, ctx, args.out, args.heatmap))


if __name__ == "__main__":
    sys.exit(main())
