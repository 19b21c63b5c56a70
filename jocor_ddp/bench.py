"""Benchmarks, printed as JSON: ``python -m jocor_ddp.bench SUBCOMMAND ...``.

``data --shards SHARD_DIR``: samples/s of the input pipeline alone (no model): the
streaming loader with CPU decoding for each worker count, the one-time decode of the
device cache, and on a CUDA machine with JPEG shards, GPU decoding.
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import json
import os
import sys
import time

import torch

from .config import ConfigError, config_from_dict
from .data.shards import load_manifest
from .data.sources import DataError
from .data.stream import decode_split, open_shards, stream_loaders
from .dist import DistContext


def _time_stream(cfg, ctx, data, *, raw_jpeg: bool, steps: int, warmup: int) -> dict:
    train = stream_loaders(cfg, ctx, data, raw_jpeg=raw_jpeg).train
    # Epoch after epoch, so that a small split still gives `steps` timed batches.
    batches = itertools.chain.from_iterable(train.epoch(e) for e in itertools.count())
    for _ in range(warmup):  # worker start-up and the first shard reads
        next(batches)
    start = time.perf_counter()
    samples = 0
    for _ in range(steps):
        samples += next(batches).x.shape[0]
    if ctx.device.type == "cuda":
        torch.cuda.synchronize(ctx.device)
    seconds = time.perf_counter() - start
    return {"decode": "gpu" if raw_jpeg else "cpu", "workers": cfg.data.num_workers,
            "samples_per_s": round(samples / seconds, 1), "samples": samples, "seconds": round(seconds, 3)}


def bench_data(shards: str, *, workers: list[int], batch_size: int, steps: int, warmup: int,
               device: str = "auto") -> dict:
    manifest = load_manifest(shards)
    dev = torch.device("cuda" if device == "cuda" or (device == "auto" and torch.cuda.is_available()) else "cpu")
    ctx = DistContext(device=dev)
    cfg = config_from_dict({
        "data": {"name": manifest.dataset, "source": "shards", "shards": shards, "cache": "stream"},
        "noise": {"type": "none", "rate": 0.0}, "train": {"batch_size": batch_size, "device": dev.type}})
    start = time.perf_counter()
    data = open_shards(cfg, ctx)  # sha256 of every train and test shard, as each rank does
    verify_s = time.perf_counter() - start
    results = []
    for w in workers:
        run_cfg = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, num_workers=w))
        results.append(_time_stream(run_cfg, ctx, data, raw_jpeg=False, steps=steps, warmup=warmup))
    if dev.type == "cuda" and manifest.image.get("format") in ("jpg", "mixed"):
        run_cfg = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, num_workers=max(workers)))
        results.append(_time_stream(run_cfg, ctx, data, raw_jpeg=True, steps=steps, warmup=warmup))
    # The device cache decodes the train split once; how long that takes at the most workers.
    cache_cfg = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, num_workers=max(workers)))
    start = time.perf_counter()
    decode_split(cache_cfg, ctx, data, data.train, data.train_keep)
    cache_s = time.perf_counter() - start
    n = int(data.train_keep.sum())
    results.append({"decode": "cpu, once into the device cache", "workers": max(workers),
                    "samples_per_s": round(n / cache_s, 1), "samples": n, "seconds": round(cache_s, 3)})
    return {"bench": "data", "shards": shards, "dataset": manifest.dataset, "train_samples": n,
            "batch_size": batch_size, "device": str(dev), "cpu_count": os.cpu_count(),
            "torch_threads": torch.get_num_threads(), "verify_sha256_s": round(verify_s, 3), "results": results}


def _data_command(args: argparse.Namespace) -> dict:
    workers = [int(w) for w in args.workers.split(",")]
    if not workers or min(workers) < 0:
        raise ConfigError(f"--workers: expected comma-separated counts >= 0, got {args.workers!r}")
    return bench_data(args.shards, workers=workers, batch_size=args.batch_size, steps=args.steps,
                      warmup=args.warmup, device=args.device)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m jocor_ddp.bench", description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="command", required=True)
    d = sub.add_parser("data", help="samples/s of the shard input pipeline alone")
    d.add_argument("--shards", required=True, help="shard folder written by python -m jocor_ddp.prepare")
    d.add_argument("--workers", default="0,1,2", help="DataLoader worker counts to time (default 0,1,2)")
    d.add_argument("--batch-size", type=int, default=256)
    d.add_argument("--steps", type=int, default=50, help="timed batches per setting")
    d.add_argument("--warmup", type=int, default=5, help="untimed batches first")
    d.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    d.set_defaults(func=_data_command)
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        result = args.func(args)
    except (ConfigError, DataError) as exc:
        print(f"error: {exc}", file=sys.stderr, flush=True)
        return 2
    print(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
