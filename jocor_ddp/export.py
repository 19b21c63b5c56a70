"""Export one network of a checkpoint for inference:
``python -m jocor_ddp.export CHECKPOINT --out model.pt [--net 1|2|best] [--by auto|val|test]``.

The file holds a plain state_dict and what is needed to rebuild the network around it
(architecture, input shape, classes, input normalisation), in plain types only, so that
it loads with ``torch.load(weights_only=True)``; ``load_exported`` rebuilds the module.
No optimizer, RNG or config: an exported file cannot resume training.

``--net best`` judges the two networks by the run's metrics row of the checkpoint's epoch:
by validation accuracy where the run has a validation split, else by test accuracy. The
validation split is the clean val split where the run scores one (data.eval_splits), else the
noisy held-out one (noisy_val, data.noisy_val_fraction > 0): clean labels measure what is
wanted, noisy ones a biased stand-in. Validation is preferred to test because choosing by the
test set makes the test figure an optimistic one.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import torch

from .checkpoint import CheckpointError
from .config import ModelConfig
from .models import build_network
from .job import CommandError, guarded
from .restore import Restored, check_out, restore
from .runfolder import METRICS, acc_keys, read_metrics, run_dir_of, validation_split
from .state import TrainingState

FORMAT = "jocor_ddp.export/1"
BY = ("auto", "val", "test")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m jocor_ddp.export",
        description="Write one network of a JoCoR checkpoint as a plain state_dict plus the metadata "
                    "needed to rebuild it (loads with torch.load(weights_only=True); see "
                    "jocor_ddp.export.load_exported).")
    p.add_argument("checkpoint", help="a checkpoint file, e.g. RUN/checkpoints/step-N.pt")
    p.add_argument("--out", required=True, metavar="FILE", help="the file to write, e.g. model.pt")
    p.add_argument("--net", choices=("1", "2", "best"), default="best",
                   help="which network: 1, 2, or best = the one with the higher accuracy (see --by) in the "
                        "run's metrics.jsonl row for this checkpoint (net 1 without metrics; default)")
    p.add_argument("--by", choices=BY, default=None,
                   help="with --net best, the figure that judges: val = the validation split's accuracy, "
                        "val_acc (clean val labels, data.eval_splits with val) where the run scores it, else "
                        "noisy_val_acc (the held-out noisy labels, data.noisy_val_fraction > 0); test = "
                        "test_acc; auto = val where the run has a validation split, else test (default)")
    p.add_argument("--root", metavar="DIR",
                   help="the raw dataset folder, only read when the checkpoint records no data_meta "
                        "(older checkpoints): overrides the config's data.root")
    args = p.parse_args(argv)
    if args.by is not None and args.net != "best":
        p.error(f"--by goes with --net best (--net {args.net} names the network)")
    args.by = args.by or "auto"
    return args


def unjudged(by: str, reason: str) -> tuple[int, str]:
    """Net 1 when the metrics cannot judge, unless val was asked for: then that is an error."""
    if by == "val":
        raise CommandError(f"--by val: {reason}, so no validation accuracy to judge the networks by")
    return 1, reason


def choose_net(checkpoint: Path, state: TrainingState, by: str = "auto") -> tuple[int, str]:
    """(1 or 2, why): the network with the higher accuracy in the metrics row of the
    checkpoint's epoch in RUN/metrics.jsonl, by the validation split's accuracy (val_acc, else
    noisy_val_acc) or test_acc (``by``: val, test, or auto = val where the row has one); net 1
    on a tie or without such a row (a row of another epoch would judge other weights), except
    that ``by="val"`` then fails: it was asked for."""
    run = run_dir_of(checkpoint)
    metrics = run / METRICS if run is not None else None
    if metrics is None or not metrics.is_file():
        return unjudged(by, f"no {METRICS} next to the checkpoint {checkpoint}")
    by_epoch = {r["epoch"]: r for r in read_metrics(metrics).checked()}
    row = by_epoch.get(state.epoch)
    if row is None:
        return unjudged(by, f"no row of epoch {state.epoch} in {metrics}")
    split = validation_split([row])
    if by == "val" and split is None:
        raise CommandError(f"--by val: {metrics}, epoch {row['epoch']}: no val_acc1 / val_acc2 and no "
                           "noisy_val_acc1 / noisy_val_acc2: the run has no validation split (score one with "
                           "data.eval_splits: [val, test], or hold one out with data.noisy_val_fraction > 0; "
                           "or use --by test)")
    figure = split if by == "val" or (by == "auto" and split) else "test"
    acc1, acc2 = (row[k] for k in acc_keys(figure))
    net = 2 if acc2 > acc1 else 1
    return net, (f"best by {figure}_acc at epoch {row['epoch']} of {metrics}: "
                 f"{max(acc1, acc2):.2f}% vs {min(acc1, acc2):.2f}%")


def plain_normalization(norm) -> dict | None:
    if norm is None:
        return None
    return {k: [float(v) for v in torch.as_tensor(norm[k]).flatten().tolist()] for k in ("mean", "std")}


def export(r: Restored, net: int, out: Path) -> dict:
    module = r.pair.net1 if net == 1 else r.pair.net2
    payload = {
        "format": FORMAT,
        "state_dict": {k: v.detach().cpu().clone() for k, v in module.state_dict().items()},
        "arch": r.cfg.model.arch,
        "cifar_stem": r.cfg.model.cifar_stem,
        "num_classes": len(r.meta["classes"]),
        "in_channels": int(r.meta["in_channels"]),
        "image_size": int(r.meta["image_size"]),
        "classes": [str(c) for c in r.meta["classes"]],
        "normalization": plain_normalization(r.meta.get("normalization")),
        "source_checkpoint": str(r.path),
        "net": net,
    }
    # torch.save to a temporary file, then rename: a crash leaves no half-written file.
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    torch.save(payload, tmp)
    os.replace(tmp, out)
    return payload


def load_exported(path: str | Path, map_location: str | torch.device = "cpu") -> torch.nn.Module:
    """The exported network, rebuilt and loaded, in eval mode. Its input is what the run
    trained on: float images in [0, 1], then ``normalization`` (mean / std) when not None."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"exported model {path}: not found")
    try:
        payload = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as exc:
        raise CheckpointError(f"exported model {path}: cannot be read safely "
                              f"({type(exc).__name__}: {str(exc).splitlines()[0]})") from None
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise CheckpointError(f"exported model {path}: not a {FORMAT} file")
    net = build_network(ModelConfig(arch=payload["arch"], cifar_stem=payload["cifar_stem"]),
                        payload["in_channels"], payload["num_classes"], payload["image_size"])
    try:
        net.load_state_dict(payload["state_dict"])
    except RuntimeError as exc:
        raise CheckpointError(f"exported model {path}: weights do not fit {payload['arch']}: "
                              f"{str(exc).splitlines()[0]}") from None
    return net.eval()


def run(args: argparse.Namespace) -> None:
    check_out(Path(args.out))
    r = restore(args.checkpoint, with_data=False, root=args.root, device="cpu")
    if args.net == "best":
        net, why = choose_net(r.path, r.state, args.by)
    else:
        net, why = int(args.net), "asked for"
    out = Path(args.out)
    if out.is_dir():
        raise CommandError(f"--out {out}: is a folder; name the file to write, e.g. {out / 'model.pt'}")
    payload = export(r, net, out)
    print(f"wrote {out}: net {net} ({why}), {payload['arch']}, {payload['num_classes']} classes, "
          f"{payload['in_channels']}x{payload['image_size']}x{payload['image_size']} inputs")


def main(argv=None) -> int:
    return guarded(run, parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
