"""Estimate the noise rate of a training set before a long run:
``python -m jocor_ddp.estimate_noise --config FILE [key=value ...] [--out FILE.json]``.

It trains the pair only as far as ``method.forget_rate: auto`` needs (the first
max(method.num_gradual, 1) epochs, with the run's schedule), scoring the training split
after each, and prints the estimate with its evidence. No test evaluation and no
checkpoint: a fraction of the run's cost (Fashion-MNIST, MLP pair: 10 of 200 epochs).
The estimate equals the one a training run with ``method.forget_rate: auto`` and the same
config reaches. One process, or several under torchrun.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

from .config import Config
from .dist import DistContext
from .job import run_job
from .trainer import Trainer


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m jocor_ddp.estimate_noise",
        description="Estimate the share of wrong training labels (what method.forget_rate: auto sets tau "
                    "to) by training the pair over the estimator's epochs only, and print it with its "
                    "evidence.",
        epilog="Overrides are dotted keys, as for train; method.forget_rate is set to auto.")
    p.add_argument("--config", help="YAML config file (configs/*.yaml)")
    p.add_argument("--out", metavar="FILE.json", help="also write every epoch's estimate and evidence here")
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


def run(cfg: Config, ctx: DistContext, out: str | None) -> None:
    trainer = Trainer(cfg, ctx)
    if ctx.is_main:
        print(f"estimating the noise rate of {cfg.data.name} ({trainer.data.train.index_range} training "
              f"samples): {trainer.auto.last_epoch + 1} epoch(s) of {cfg.method.name} training", flush=True)
    rows = estimate(trainer)
    if ctx.is_main:
        print(summary(trainer, rows), flush=True)
        if out:
            Path(out).write_text(json.dumps({"estimate": trainer.auto.estimate, "epochs": rows}, indent=1))


def main(argv=None) -> int:
    args = parse_args(argv)
    run_dir = args.run_dir or tempfile.mkdtemp(prefix="jocor_estimate_")
    overrides = args.overrides + ["method.forget_rate=auto", f"run.dir={run_dir}", "train.resume=never",
                                  "log.tensorboard=false"]
    return run_job(args.config, overrides, lambda cfg, ctx: run(cfg, ctx, args.out))


if __name__ == "__main__":
    sys.exit(main())
