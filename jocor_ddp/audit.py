"""Rank the training samples by how likely their given label is wrong:
``python -m jocor_ddp.audit CHECKPOINT --out FILE.csv``.

Both networks of the checkpoint score every training sample once, unaugmented. The CSV
has one row per sample, most suspicious first:

    rank, idx, key, given_label, clean_label, pred1, pred2, joint_loss, kept_share,
    probably_mislabelled

``joint_loss`` is JoCoR's per-sample loss with the run's method.co_lambda;
``kept_share`` is the share of the last min(10, E) finished epochs in which the sample
was kept to update the networks (from the checkpoint's kept_history; empty when the
checkpoint has none); ``clean_label`` is empty where the clean label is unknown.

The flag ``probably_mislabelled`` is set when
  (a) both networks predict the same class and it is not the given label, or
  (b) the sample was kept in under half of the recent epochs AND its joint loss is among
      the largest tau * N of the N training samples (tau: the run's final forget rate,
      the share of every batch JoCoR leaves out as probably noisy).
Rule (b) needs the kept history; without it only (a) applies. Rows are ranked flagged
first, then by joint loss, largest first.

Where clean labels are known (synthetic noise, or sets such as Clothing1M's clean
subset), the flag is checked against the truth (mislabelled: given != clean) and its
precision and recall are printed and written beside the CSV as FILE.json.
"""

from __future__ import annotations

import argparse
import csv
import sys
from pathlib import Path
from typing import Optional

import torch

from .checkpoint import CheckpointError
from .methods.jocor import jocor_loss
from .methods.selection import num_remember
from .job import CommandError, guarded
from .restore import Restored, add_restore_args, check_out, restore
from .runfolder import write_json

SHARE_WINDOW = 10  # recent epochs the kept share is taken over
RULE = ("probably_mislabelled = (both networks predict the same class, other than the given label) "
        "or (kept in under half of the last min(10, E) epochs and joint loss in the top "
        "forget-rate share of all training samples)")
RULE_NO_HISTORY = ("probably_mislabelled = both networks predict the same class, other than the given "
                   "label (the checkpoint has no kept_history, so the kept-share rule is off)")
# Epochs that draw a subset (train.steps_per_epoch, train.max_per_class) leave most samples out
# of most epochs: not kept there says nothing of their labels.
RULE_SUBSET_EPOCHS = ("probably_mislabelled = both networks predict the same class, other than the given "
                      "label (the run's epochs draw a subset of the training split, train.steps_per_epoch / "
                      "train.max_per_class, so a sample not kept may not have been drawn: the kept-share rule is off)")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m jocor_ddp.audit",
        description="Score every training sample with both networks of a checkpoint and write a CSV "
                    "ranked by how likely the given label is wrong, with a probably_mislabelled flag "
                    "(rule: see the module docstring or the printed summary).",
        epilog="Where clean labels are known, the flag's precision and recall against them are printed "
               "and written to FILE.json beside the CSV.")
    add_restore_args(p)
    p.add_argument("--out", required=True, metavar="FILE.csv", help="the CSV to write")
    p.add_argument("--top", type=int, default=10, help="rows of the ranking to print (default 10)")
    return p.parse_args(argv)


# --- pure pieces ----------------------------------------------------------------------

def kept_share(history: torch.Tensor, epochs: int, window: int = SHARE_WINDOW) -> Optional[torch.Tensor]:
    """Per sample, the share of the newest min(epochs, window) epochs it was kept in:
    bit j of ``history`` is set when it was kept j epochs before the newest (bit 0)."""
    w = min(int(epochs), window)
    if w <= 0:
        return None
    bits = (history.long().unsqueeze(1) >> torch.arange(w)) & 1
    return bits.sum(1).double() / w


def top_share(losses: torch.Tensor, rate: float) -> torch.Tensor:
    """True for the samples the small-loss rule would leave out at forget rate ``rate``:
    the n - num_remember(rate, n) largest losses (ties: the later index counts as larger)."""
    n = losses.shape[0]
    out = torch.zeros(n, dtype=torch.bool)
    k = n - num_remember(rate, n) if rate > 0 else 0
    if k > 0:
        out[torch.sort(losses, stable=True).indices[n - k:]] = True
    return out


def flag_samples(given: torch.Tensor, pred1: torch.Tensor, pred2: torch.Tensor, losses: torch.Tensor,
                 share: Optional[torch.Tensor], forget_rate: float) -> torch.Tensor:
    """The probably_mislabelled rule of the module docstring."""
    flags = (pred1 == pred2) & (pred1 != given)
    if share is not None:
        flags |= (share < 0.5) & top_share(losses, forget_rate)
    return flags


def flag_quality(flags: torch.Tensor, given: torch.Tensor, clean: torch.Tensor) -> Optional[dict]:
    """Precision and recall of ``flags`` at finding mislabelled samples (given != clean),
    over the samples whose clean label is known (clean >= 0); None when none is.
    A ratio with nothing to divide by (no flag, no mislabelled sample) is None."""
    known = clean >= 0
    if not bool(known.any()):
        return None
    wrong = (given != clean) & known
    flagged = flags & known
    tp = int((flagged & wrong).sum())
    fp = int((flagged & ~wrong).sum())
    fn = int((~flagged & wrong).sum())
    return {"known": int(known.sum()), "mislabelled": tp + fn, "flagged": tp + fp,
            "true_positives": tp, "false_positives": fp, "false_negatives": fn,
            "precision": tp / (tp + fp) if tp + fp else None,
            "recall": tp / (tp + fn) if tp + fn else None}


# --- the command ------------------------------------------------------------------------

def history_share(history: dict, path: Path, n: int) -> tuple[Optional[torch.Tensor], int]:
    """(kept share per sample or None, epochs it covers) from the checkpoint's kept history
    (``TrainingState.history``)."""
    history, epochs = history.get("bits"), history.get("epochs")
    if history is None or epochs is None:
        return None, 0
    if not isinstance(history, torch.Tensor) or history.dtype.is_floating_point or tuple(history.shape) != (n,):
        raise CheckpointError(f"checkpoint {path}: kept_history is not an integer tensor of shape ({n},) "
                              f"(one bitmask per training sample)")
    share = kept_share(history, int(epochs))
    return share, min(int(epochs), SHARE_WINDOW) if share is not None else 0


def score_train(r: Restored) -> dict[str, torch.Tensor]:
    """Every training sample's labels, predictions and joint loss, indexed by idx."""
    if r.data.train_eval is None:
        raise CommandError(f"the {r.cfg.data.source} data source offers no pass over the training split "
                           f"(DataBundle.train_eval), which audit needs")
    n = r.data.train.index_range
    cols = {k: torch.full((n,), -1, dtype=torch.long) for k in ("given", "clean", "pred1", "pred2", "seen")}
    cols["loss"] = torch.zeros(n, dtype=torch.float64)
    for batch, logits1, logits2 in r.score(r.data.train_eval, n, "audit train"):
        idx = batch.idx.long().cpu()
        cols["given"][idx] = batch.y.long().cpu()
        cols["clean"][idx] = batch.clean.long().cpu()
        cols["pred1"][idx] = logits1.argmax(1).cpu()
        cols["pred2"][idx] = logits2.argmax(1).cpu()
        cols["loss"][idx] = jocor_loss(logits1, logits2, batch.y, r.cfg.method.co_lambda).double().cpu()
        cols["seen"][idx] += 1
    twice = int((cols["seen"] > 0).sum())
    unscored = int((cols["seen"] < 0).sum())
    # Samples left out as bad (data.on_bad_sample: skip) are never scored: not an error then.
    if twice or (unscored and r.cfg.data.on_bad_sample != "skip"):
        raise CommandError(f"the training pass scored {n - twice - unscored} of {n} training samples "
                           f"exactly once ({twice} more than once, {unscored} never)")
    cols["scored"] = cols["seen"] == 0
    if r.cfg.data.source == "shards":
        from .data.shards import sample_key  # a shard sample's __key__
        cols["keys"] = [sample_key(i) for i in range(n)]
    else:
        cols["keys"] = [None] * n
    return cols


def audit(args: argparse.Namespace) -> dict:
    out = Path(args.out)
    if out.suffix == ".json" or out.is_dir():
        raise CommandError(f"--out {out}: name a CSV file (the summary goes beside it as .json)")
    for written in (out, out.with_suffix(".json")):
        check_out(written)
    r = restore(args.checkpoint, with_data=True, shards=args.shards, root=args.root, device=args.device)
    cols = score_train(r)
    n = cols["given"].shape[0]
    share, window = history_share(r.state.history, r.path, n)
    subset_epochs = bool(r.cfg.train.steps_per_epoch or r.cfg.train.max_per_class)
    if subset_epochs:
        share, window = None, 0
    tau = r.state.final_tau  # the run's tau, as the trainer decided and estimated it
    scored = cols["scored"]
    flags = flag_samples(cols["given"], cols["pred1"], cols["pred2"], cols["loss"], share, tau) & scored
    cols["clean"] = torch.where(scored, cols["clean"], -1)  # unscored samples do not count in quality
    # Flagged first, then by joint loss, largest first; ties by idx (stable sorts). Samples left
    # out as bad have no row.
    order = torch.argsort(-cols["loss"], stable=True)
    order = order[torch.argsort((~flags[order]).int(), stable=True)]
    order = order[scored[order]].tolist()
    table = [cols["keys"], *(cols[k].tolist() for k in ("given", "clean", "pred1", "pred2", "loss")),
             share.tolist() if share is not None else [None] * n, flags.int().tolist()]
    write_csv(out, order, table)
    quality = flag_quality(flags, cols["given"], cols["clean"])
    summary = {
        "checkpoint": str(r.path), "dataset": r.data.name, "samples": int(scored.sum()),
        "left_out_bad": int(n - scored.sum()), "flagged": int(flags.sum()),
        "rule": RULE if share is not None else RULE_SUBSET_EPOCHS if subset_epochs else RULE_NO_HISTORY,
        "forget_rate": tau,
        "co_lambda": r.cfg.method.co_lambda, "kept_share_epochs": window, "classes": r.meta["classes"],
        "quality": quality,
    }
    write_json(out.with_suffix(".json"), summary)
    print_summary(summary, out, order[:max(args.top, 0)], table)
    return summary


CSV_HEADER = ["rank", "idx", "key", "given_label", "clean_label", "pred1", "pred2", "joint_loss",
              "kept_share", "probably_mislabelled"]


def write_csv(out: Path, order: list[int], table: list[list]) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(CSV_HEADER)
        for rank, i in enumerate(order, start=1):
            w.writerow(csv_row(rank, i, table))


def csv_row(rank: int, i: int, table: list[list]) -> list:
    """``table``: per-sample columns key, given, clean, pred1, pred2, loss, share, flag."""
    key, given, clean, pred1, pred2, loss, share, flag = (col[i] for col in table)
    return [rank, i, key if key is not None else i, given, clean if clean >= 0 else "", pred1, pred2,
            f"{loss:.6g}", f"{share:.4g}" if share is not None else "", flag]


def print_summary(s: dict, out: Path, top: list[int], table: list[list]) -> None:
    print(f"{s['checkpoint']}: {s['samples']} training samples of {s['dataset']}, "
          f"{s['flagged']} flagged probably_mislabelled")
    print(f"rule: {s['rule']}; forget rate {s['forget_rate']:g}, kept share over "
          f"{s['kept_share_epochs']} epoch(s)")
    q = s["quality"]
    if q is None:
        print("no clean labels known: the flag's precision and recall cannot be checked")
    else:
        pct = lambda v: "n/a" if v is None else f"{100 * v:.2f}%"  # noqa: E731
        print(f"against the {q['known']} known clean labels ({q['mislabelled']} mislabelled): "
              f"precision {pct(q['precision'])}, recall {pct(q['recall'])}")
    if top:
        print("most suspicious: " + ", ".join(CSV_HEADER))
        for rank, i in enumerate(top, start=1):
            print("  " + ", ".join(str(v) for v in csv_row(rank, i, table)))
    print(f"wrote {out} and {out.with_suffix('.json')}")


def main(argv=None) -> int:
    return guarded(audit, parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
