"""Benchmarks, printed as JSON: ``python -m jocor_ddp.bench SUBCOMMAND ...``.

``step``: the configured model pair's training step (forward, joint loss, selection,
backward, optimizer) on synthetic batches already on the device: the ceiling.
``train``: whole epochs with the real loader, selection and logging; evaluation separately.
``data --shards SHARD_DIR``: samples/s of the input pipeline alone (no model): the
streaming loader with CPU decoding for each worker count, the one-time decode of the
device cache, and on a CUDA machine with JPEG shards, GPU decoding.
``comm``: bytes per step of the loss all-gather and the gradient all-reduce, on paper.
Every figure comes with the device, torch version, precision and batch it was measured at.
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import json
import os
import platform
import statistics
import sys
import tempfile
import time

import numpy as np
import torch

from .config import ConfigError, config_from_dict, load_config
from .data.memory import MemoryTrainLoader
from .data.shards import load_manifest
from .data.sources import DataError
from .data.cache import decode_split
from .data.shardset import open_shards
from .data.stream import stream_loaders
from .data.types import DataBundle
from .dist import DistContext, close_distributed, init_distributed
from .models import build_pair
from .trainer import Trainer


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
        # The loader only: no noise drawn, and a forget rate so that noisy-label shards open too.
        "noise": {"type": "none", "rate": 0.0}, "method": {"forget_rate": 0.0},
        "train": {"batch_size": batch_size, "device": dev.type}})
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


# --- step and train: the model pair's speed ---------------------------------------------

# The input each dataset feeds the model: (channels, side, classes).
SHAPES = {"mnist": (1, 28, 10), "fashion-mnist": (1, 28, 10), "cifar10": (3, 32, 10),
          "cifar100": (3, 32, 100), "clothing1m": (3, 224, 14), "imagefolder": (3, 224, 1000)}


def device_name(dev: torch.device) -> str:
    if dev.type == "cuda":
        return torch.cuda.get_device_name(dev)
    return f"cpu ({platform.processor() or platform.machine()}, {os.cpu_count()} cores, {torch.get_num_threads()} threads)"


def _synthetic_bundle(cfg, ctx, steps: int) -> DataBundle:
    """Random uint8 images of the dataset's shape, already on the device."""
    channels, side, classes = SHAPES[cfg.data.name]
    n = cfg.train.batch_size * steps
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, size=(n, side, side, channels), dtype=np.uint8)
    labels = rng.integers(0, classes, size=n).astype(np.int64)
    loader = MemoryTrainLoader(images, labels, labels, global_batch=cfg.train.batch_size, rank=ctx.rank,
                               world_size=ctx.world_size, seed=cfg.train.seed, device=ctx.device)
    return DataBundle(name=cfg.data.name, classes=[str(i) for i in range(classes)], in_channels=channels,
                      image_size=side, train=loader, test=[], test_samples=0)


def _sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def _header(cfg, trainer, ctx) -> dict:
    return {"device": device_name(ctx.device), "torch": str(torch.__version__), "precision": trainer.precision,
            "model": cfg.model.arch, "method": cfg.method.name, "selection": cfg.selection,
            "global_batch": cfg.train.batch_size, "world_size": ctx.world_size,
            "channels_last": cfg.train.channels_last, "compile": cfg.train.compile,
            "sync_every": trainer.sync_every,
            # Whether the timed steps were graph replays, and if not, why.
            "cuda_graph": trainer.step.captured,
            "step": "cuda graph replay" if trainer.step.captured else trainer.step.describe()}


def bench_step(cfg, *, steps: int, repeats: int, warmup: int) -> dict:
    """The training step alone (forward, joint loss, selection, backward, optimizer) on
    synthetic batches already on the device: the ceiling for this model and batch. No sync
    point between steps: the figure is what the step costs, not the loop around it."""
    ctx = init_distributed(cfg)
    trainer = Trainer(cfg, ctx, data=_synthetic_bundle(cfg, ctx, steps))
    n = trainer.data.train.steps_per_epoch

    def run(count: int) -> None:
        for i in range(count):
            if i % n == 0:  # the synthetic split holds `steps` batches: start it again
                trainer.begin_epoch(0)
            trainer.step.run(None)

    run(warmup)  # compilation, the CUDA graph's warm-up and capture
    rates = []
    for _ in range(repeats):
        _sync(ctx.device)
        start = time.perf_counter()
        run(steps)
        _sync(ctx.device)
        rates.append(steps * cfg.train.batch_size / (time.perf_counter() - start))
    return {"bench": "step", **_header(cfg, trainer, ctx), "steps": steps, "repeats": repeats,
            "samples_per_s": round(statistics.median(rates), 1),
            "samples_per_s_all": [round(r, 1) for r in rates]}


def bench_train(cfg, *, epochs: int) -> dict:
    """Whole epochs with the configured loader (shards or memory), selection and logging;
    evaluation timed separately. The first epoch is a warm-up (compilation, worker start)."""
    ctx = init_distributed(cfg)
    trainer = Trainer(cfg, ctx)
    train_rates, eval_s = [], []
    for epoch in range(epochs + 1):
        row = trainer.train_epoch(epoch)
        start = time.perf_counter()
        trainer.evaluate()
        if epoch > 0 or epochs == 0:
            train_rates.append(row["samples_per_s"])
            eval_s.append(time.perf_counter() - start)
    return {"bench": "train", **_header(cfg, trainer, ctx), "source": cfg.data.source,
            "steps_per_epoch": trainer.data.train.steps_per_epoch, "epochs_timed": len(train_rates),
            "samples_per_s": round(statistics.median(train_rates), 1),
            "samples_per_s_all": [round(r, 1) for r in train_rates],
            "eval_s": round(statistics.median(eval_s), 3)}


def bench_comm(cfg, *, world_sizes: list[int]) -> dict:
    """Bytes each rank moves per step, on paper: the loss all-gather and DDP's ring
    all-reduce of the gradients (2 (W-1)/W of the gradient bytes, sent and received)."""
    channels, side, classes = SHAPES[cfg.data.name]
    # Only the shapes matter: no initial-weights file is needed to count them.
    pair = build_pair(dataclasses.replace(cfg.model, weights=None), channels, classes, side)
    params = sum(p.numel() for p in pair.parameters())
    grad_bytes = params * 4  # DDP all-reduces fp32 gradients, whatever the autocast precision
    rows = []
    for w in world_sizes:
        b = cfg.train.batch_size // w
        gather_bytes = (w - 1) * b * 4 + (w - 1) * b * 8  # fp32 losses in, plus int64 indices (audit)
        rows.append({"world_size": w, "local_batch": b,
                     "loss_all_gather_bytes_in": gather_bytes,
                     "grad_all_reduce_bytes_each_way": int(2 * (w - 1) / w * grad_bytes)})
    return {"bench": "comm", "model": cfg.model.arch, "dataset": cfg.data.name, "parameters_pair": params,
            "gradient_bytes": grad_bytes, "global_batch": cfg.train.batch_size, "per_world_size": rows}


def _model_config(args: argparse.Namespace):
    overrides = list(args.overrides)
    if not any(o.startswith("run.dir=") for o in overrides):
        # Benchmarks write nothing worth keeping: the Trainer's config.yaml goes to a temp dir.
        overrides.append(f"run.dir={tempfile.mkdtemp(prefix='jocor_bench_')}")
    return load_config(args.config, overrides + ["log.progress=never", "train.resume=never"])


def _step_command(args):
    return bench_step(_model_config(args), steps=args.steps, repeats=args.repeats, warmup=args.warmup)


def _train_command(args):
    return bench_train(_model_config(args), epochs=args.epochs)


def _comm_command(args):
    return bench_comm(_model_config(args), world_sizes=[int(w) for w in args.world_sizes.split(",")])


def _add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", help="YAML config (configs/*.yaml); key=value overrides follow")
    p.add_argument("overrides", nargs="*", metavar="key=value")


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
    st = sub.add_parser("step", help="the training step alone, synthetic data on the device")
    _add_model_args(st)
    st.add_argument("--steps", type=int, default=50, help="timed steps per repeat")
    st.add_argument("--repeats", type=int, default=5, help="the median of the repeats is reported")
    st.add_argument("--warmup", type=int, default=10, help="untimed steps first (compilation, cudagraphs)")
    st.set_defaults(func=_step_command)
    tr = sub.add_parser("train", help="whole epochs with the real loader; evaluation timed apart")
    _add_model_args(tr)
    tr.add_argument("--epochs", type=int, default=3, help="timed epochs, after one warm-up epoch")
    tr.set_defaults(func=_train_command)
    cm = sub.add_parser("comm", help="bytes per step moved by the loss all-gather and the all-reduce")
    _add_model_args(cm)
    cm.add_argument("--world-sizes", default="1,2,8,16,64")
    cm.set_defaults(func=_comm_command)
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        result = args.func(args)
    except (ConfigError, DataError) as exc:
        print(f"error: {exc}", file=sys.stderr, flush=True)
        return 2
    finally:
        close_distributed()
    if int(os.environ.get("RANK", "0")) == 0:
        print(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
