"""Convert a dataset in its original format into WebDataset shards, once:

    python -m jocor_ddp.prepare DATASET --src RAW_DIR --out SHARD_DIR [--shard-size N]
        [--resize S [--quality Q]] [--workers N]

DATASET is one of mnist, fashion-mnist, cifar10, cifar100, clothing1m, imagefolder. The
small sets are written as PNG (lossless: the shards decode to the very pixels of the IDX
and pickle files); Clothing1M and ImageFolder images keep their original bytes, or with
--resize are re-encoded as baseline JPEG whose shorter side is S. Labels are written as
the source gives them, never noised: train with any noise setting from the same shards
(``data.source=shards data.shards=SHARD_DIR``).
"""

from __future__ import annotations

import argparse
import os
import sys

from .config import DATASETS, PROGRESS
from .convert import DEFAULT_SHARD_SIZE, prepare
from .convert.sources import DEFAULT_QUALITY
from .job import guarded
from .progress import progress_enabled


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m jocor_ddp.prepare",
        description="Write a dataset as WebDataset shards plus manifest.json, once; every noise "
                    "setting then trains from the same shards.")
    p.add_argument("dataset", choices=DATASETS)
    p.add_argument("--src", required=True, help="folder of the raw files in their original format")
    p.add_argument("--out", required=True, help="shard folder to write (SHARD_DIR)")
    p.add_argument("--shard-size", type=int, default=DEFAULT_SHARD_SIZE,
                   help=f"samples per shard (default {DEFAULT_SHARD_SIZE}); keep shards >= ranks x workers")
    p.add_argument("--resize", type=int, default=None, metavar="S",
                   help="clothing1m and imagefolder only: decode each image, resize it so that its shorter side "
                        "is S and re-encode it as baseline 4:2:0 JPEG. Default: none, the original bytes are kept. "
                        "256 covers the 224 crop the configs use (data.resize_size: 256, data.crop_size: 224) "
                        "with smaller files that decode faster: on 256-400 px JPEGs, decode + resize + crop "
                        "measured 950 µs an image on the original bytes, 380 µs re-encoded at 256 with q90")
    p.add_argument("--quality", type=int, default=DEFAULT_QUALITY, metavar="Q",
                   help=f"JPEG quality of --resize (default {DEFAULT_QUALITY}); lower is smaller and faster to "
                        f"decode: measured at 256, q90 380 µs, q85 338 µs, q75 279 µs an image")
    p.add_argument("--workers", type=int, default=os.cpu_count() or 1, metavar="N",
                   help="processes that read (and with --resize re-encode) the images of clothing1m and "
                        "imagefolder (default: one a CPU; 0: in this process); the shards are the same bytes "
                        "whatever N")
    p.add_argument("--force", action="store_true", help="overwrite a folder holding another dataset's shards")
    p.add_argument("--progress", choices=PROGRESS, default="auto", help="progress bar (default: on a terminal)")
    return p.parse_args(argv)


def run(args: argparse.Namespace) -> None:
    m = prepare(args.dataset, args.src, args.out, shard_size=args.shard_size, force=args.force,
                progress=progress_enabled(args.progress, True), resize=args.resize, quality=args.quality,
                workers=args.workers)
    for name, split in m.splits.items():
        print(f"{args.out}: {name}: {split.samples} samples in {len(split.shards)} shards")
    print(f"train with: data.name={args.dataset} data.source=shards data.shards={args.out}")


def main(argv=None) -> int:
    return guarded(run, parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
