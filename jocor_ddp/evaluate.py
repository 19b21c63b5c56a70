"""Score a checkpoint on its evaluation splits: ``python -m jocor_ddp.evaluate CHECKPOINT``.

For every split of the run's ``data.eval_splits`` (or the one ``--split`` names), prints and
writes (``--out DIR``) the accuracy of each network and of their averaged prediction (the
mean of the two softmaxes), in percent as metrics.jsonl gives it, to ``evaluate-SPLIT.json``,
and the averaged prediction's confusion matrix (rows: true class, columns: predicted class)
to ``confusion-SPLIT.csv``. The data is rebuilt from the checkpoint's own config;
``--shards DIR`` reads a shard folder instead.
"""

from __future__ import annotations

import argparse
import csv
import sys
from pathlib import Path

import torch

from .job import CommandError, guarded
from .restore import Restored, add_restore_args, restore
from .runfolder import run_dir_of, write_json


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m jocor_ddp.evaluate",
        description="Accuracy of both networks of a checkpoint, and of their averaged softmax, on each "
                    "evaluation split; writes evaluate-SPLIT.json and confusion-SPLIT.csv per split.",
        epilog="The data comes from the checkpoint's config (data.name, data.root); --shards reads a "
               "shard folder written by `python -m jocor_ddp.prepare` instead.")
    add_restore_args(p)
    p.add_argument("--split", default=None,
                   help="score this split only (test, or val for shards that have one); default: every "
                        "split of the config's data.eval_splits")
    p.add_argument("--out", metavar="DIR", default=None,
                   help="output folder (default: RUN/evaluate for RUN/checkpoints/step-N.pt, "
                        "else next to the checkpoint)")
    return p.parse_args(argv)


def default_out(checkpoint: str) -> Path:
    run = run_dir_of(checkpoint)
    return run / "evaluate" if run is not None else Path(checkpoint).resolve().parent


def evaluate(args: argparse.Namespace) -> dict[str, dict]:
    """Each split's result, by name."""
    r = restore(args.checkpoint, with_data=True, shards=args.shards, split=args.split, root=args.root,
                device=args.device)
    out = Path(args.out) if args.out else default_out(args.checkpoint)
    return {split: score_split(r, split, out) for split in ([args.split] if args.split else r.data.evals)}


def score_split(r: Restored, split: str, out: Path) -> dict:
    loader = r.data.evals[split]
    classes = r.meta["classes"]
    c = len(classes)
    counts = torch.zeros(3, dtype=torch.float64, device=r.device)  # correct1, correct2, correct_avg
    confusion = torch.zeros(c * c, dtype=torch.int64, device=r.device)
    scored = 0
    for batch, logits1, logits2 in r.score(loader, loader.num_samples, f"evaluate {split}"):
        avg = (logits1.softmax(1) + logits2.softmax(1)) / 2
        pred = avg.argmax(1)
        counts[0] += (logits1.argmax(1) == batch.y).sum()
        counts[1] += (logits2.argmax(1) == batch.y).sum()
        counts[2] += (pred == batch.y).sum()
        confusion += torch.bincount(batch.y.long() * c + pred, minlength=c * c)
        scored += batch.y.shape[0]
    expected = loader.num_samples - loader.left_out
    if scored != expected:
        raise CommandError(f"scored {scored} samples, the {split} split has {expected}")
    correct1, correct2, correct_avg = counts.tolist()
    result = {
        "checkpoint": str(r.path),
        "dataset": r.data.name,
        "split": split,
        "samples": scored,
        "epoch": r.state.epoch,
        "global_step": r.state.global_step,
        # Percent, computed as the trainer computes SPLIT_acc1 / SPLIT_acc2.
        "acc1": 100.0 * correct1 / scored,
        "acc2": 100.0 * correct2 / scored,
        "acc_avg": 100.0 * correct_avg / scored,
        "classes": classes,
    }
    write_json(out / f"evaluate-{split}.json", result)
    write_confusion(out / f"confusion-{split}.csv", classes, confusion.view(c, c).cpu())
    print(f"{r.path}: {result['dataset']} {split}, {scored} samples: net1 {result['acc1']:.2f}%  "
          f"net2 {result['acc2']:.2f}%  averaged {result['acc_avg']:.2f}%")
    print(f"wrote {out / f'evaluate-{split}.json'} and {out / f'confusion-{split}.csv'}")
    return result


def write_confusion(path: Path, classes: list[str], matrix: torch.Tensor) -> None:
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["true \\ predicted", *classes])
        for name, row in zip(classes, matrix.tolist()):
            w.writerow([name, *row])


def main(argv=None) -> int:
    return guarded(evaluate, parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
