"""Export one network of a checkpoint for inference:
``python -m jocor_ddp.export CHECKPOINT --out model.pt [--net 1|2|best]``.

The file holds a plain state_dict and what is needed to rebuild the network around it
(architecture, input shape, classes, input normalisation), in plain types only, so that
it loads with ``torch.load(weights_only=True)``; ``load_exported`` rebuilds the module.
No optimizer, RNG or config: an exported file cannot resume training.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from .checkpoint import CheckpointError
from .config import ModelConfig
from .models import build_network
from .restore import CommandError, Restored, atomic_save, guarded, read_metrics, restore, run_dir_of

FORMAT = "jocor_ddp.export/1"


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m jocor_ddp.export",
        description="Write one network of a JoCoR checkpoint as a plain state_dict plus the metadata "
                    "needed to rebuild it (loads with torch.load(weights_only=True); see "
                    "jocor_ddp.export.load_exported).")
    p.add_argument("checkpoint", help="a checkpoint file, e.g. RUN/checkpoints/step-N.pt")
    p.add_argument("--out", required=True, metavar="FILE", help="the file to write, e.g. model.pt")
    p.add_argument("--net", choices=("1", "2", "best"), default="best",
                   help="which network: 1, 2, or best = the one with the higher test accuracy in the "
                        "run's metrics.jsonl row for this checkpoint (net 1 without metrics; default)")
    p.add_argument("--root", metavar="DIR",
                   help="the raw dataset folder, only read when the checkpoint records no data_meta "
                        "(older checkpoints): overrides the config's data.root")
    return p.parse_args(argv)


def choose_net(checkpoint: Path, state: dict) -> tuple[int, str]:
    """(1 or 2, why): the network with the higher test accuracy in the metrics row of the
    checkpoint's epoch in RUN/metrics.jsonl; net 1 on a tie or without such a row (a row of
    another epoch would judge other weights)."""
    run = run_dir_of(checkpoint)
    metrics = run / "metrics.jsonl" if run is not None else None
    if metrics is None or not metrics.is_file():
        return 1, "no metrics.jsonl next to the checkpoint"
    rows = read_metrics(metrics)
    by_epoch = {r["epoch"]: r for r in rows}
    row = by_epoch.get(state.get("completed_epochs"))
    if row is None:
        return 1, f"no row of epoch {state.get('completed_epochs')} in {metrics}"
    net = 2 if row["test_acc2"] > row["test_acc1"] else 1
    return net, (f"epoch {row['epoch']} of {metrics}: test acc {row['test_acc1']:.2f}% / "
                 f"{row['test_acc2']:.2f}%")


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
    atomic_save(payload, out)
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
    r = restore(args.checkpoint, with_data=False, root=args.root, device="cpu")
    if args.net == "best":
        net, why = choose_net(r.path, r.state)
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
