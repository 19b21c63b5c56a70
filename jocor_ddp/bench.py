"""Benchmarks, printed as JSON: ``python -m jocor_ddp.bench SUBCOMMAND ...``.

``step``: the configured model pair's training step (forward, joint loss, selection,
backward, optimizer) on synthetic batches already on the device: the ceiling.
``train``: whole epochs with the real loader, selection and logging (``--skip-steps N``: the
rate leaves out each epoch's first N steps); evaluation separately.
``data --shards SHARD_DIR``: the input pipeline alone (no model), in steady state: what the
training step does per batch with the stream (next item, ``load``, ``gather``) for each
worker count, with CPU decoding and, on a CUDA machine with JPEG shards, GPU decoding; the
main process's CPU time per batch; and the one-time decode of the device cache.
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
from typing import Iterator, Optional

import numpy as np
import torch

from .config import ConfigError, config_from_dict, load_config
from .data import build_data
from .data.memory import MemoryEvalLoader, MemoryTrainLoader
from .data.shards import load_manifest
from .data.shardset import open_shards
from .data.sources import DataError
from .data.types import DataBundle
from .dist import DistContext, init_distributed, pick_device, rank_from_env
from .job import guarded
from .models import build_pair
from .trainer import Trainer


# --- data: the input pipeline alone ------------------------------------------------------

def _sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def _data_config(shards: str, dataset: str, *, cache: str, workers: int, batch_size: int, dev: torch.device,
                 gpu_decode: bool = False, verify: str = "sha256"):
    return config_from_dict({
        "data": {"name": dataset, "source": "shards", "shards": shards, "cache": cache, "num_workers": workers,
                 "gpu_decode": gpu_decode, "verify": verify},
        # The loader only: no noise drawn (the only setting that shards whose labels came noisy accept).
        "noise": {"type": "none", "rate": 0.0},
        "train": {"batch_size": batch_size, "device": dev.type}, "log": {"progress": "never"}})


def _epochs(train) -> Iterator:
    """The stream's items epoch after epoch, so that a small split still gives every batch asked for."""
    for epoch in itertools.count():
        yield from train.items(epoch)


def _time_items(train, dev: torch.device, *, steps: int, warmup: int, gather: bool) -> dict:
    """What the training step does per batch (next item, ``load``, ``gather``), ``warmup``
    batches untimed (worker start-up, the first reads), then ``steps`` timed. CPU time is the
    main thread's only: waiting on a worker's queue costs none, so it is the time the main
    process cannot spend launching the step. Without ``gather``: the feed alone."""
    bufs = train.buffers()
    items = _epochs(train)

    def one() -> tuple[int, float, float]:
        start = time.thread_time()
        train.load(next(items), bufs)
        fed = time.thread_time()
        if train.error:
            raise DataError(train.error)
        if gather:
            train.gather(bufs)
        return bufs.idx.shape[0], fed - start, time.thread_time() - fed

    try:
        for _ in range(warmup):
            one()
        _sync(dev)
        wall = time.perf_counter()
        timed = [one() for _ in range(steps)]
        _sync(dev)
        wall = time.perf_counter() - wall
    finally:
        items.close()  # ends the epoch's feed (and the GPU decoder's thread) before the pool closes
    samples, feed_s, gather_s = (sum(column) for column in zip(*timed))
    ms = 1000 / steps
    return {"samples_per_s": round(samples / wall, 1), "main_ms_per_batch": round((feed_s + gather_s) * ms, 3),
            # next + load: the host's share on any device; gather: the device ops, which on a
            # CPU device compute the float batch here, on CUDA only launch kernels.
            "feed_ms_per_batch": round(feed_s * ms, 3), "gather_ms_per_batch": round(gather_s * ms, 3),
            "wall_ms_per_batch": round(wall * ms, 3), "samples": samples, "seconds": round(wall, 3)}


def _time_stream(shards: str, dataset: str, ctx: DistContext, *, workers: int, gpu_decode: bool, batch_size: int,
                 steps: int, warmup: int, gather: bool) -> dict:
    # The header's open_shards verified every sha256 once; each row only checks sizes again.
    cfg = _data_config(shards, dataset, cache="stream", workers=workers, batch_size=batch_size, dev=ctx.device,
                       gpu_decode=gpu_decode, verify="size")
    train = build_data(cfg, ctx).train
    try:
        timed = _time_items(train, ctx.device, steps=steps, warmup=warmup, gather=gather)
    finally:
        train.pool.close()
    rate = timed.pop("samples_per_s")
    return {"decode": "gpu" if gpu_decode else "cpu", "workers": workers, "samples_per_s": rate,
            "samples_per_s_per_worker": round(rate / max(workers, 1), 1), **timed}


def _time_device_cache(shards: str, dataset: str, ctx: DistContext, data, *, workers: int,
                       batch_size: int) -> dict:
    """The one-time decode of the device cache, timed as a whole (verification and every
    split), as a run with ``data.cache=device`` starts."""
    cfg = _data_config(shards, dataset, cache="device", workers=workers, batch_size=batch_size, dev=ctx.device)
    start = time.perf_counter()
    build_data(cfg, ctx)
    seconds = time.perf_counter() - start
    n = int(data.train_keep.sum()) + sum(int(s.keep.sum()) for s in data.evals.values())
    return {"decode": "cpu, once into the device cache", "workers": workers, "samples_per_s": round(n / seconds, 1),
            "samples_per_s_per_worker": round(n / seconds / max(workers, 1), 1), "samples": n,
            "seconds": round(seconds, 3)}


def bench_data(shards: str, *, workers: list[int], batch_size: int, steps: int, warmup: int,
               device: str = "auto", gpu_workers: Optional[list[int]] = None, gather: bool = True) -> dict:
    manifest = load_manifest(shards)
    dev = pick_device(device)
    ctx = DistContext(device=dev)
    start = time.perf_counter()
    # sha256 of every shard of the train and evaluation splits, as each rank does before training
    data = open_shards(_data_config(shards, manifest.dataset, cache="stream", workers=0, batch_size=batch_size,
                                    dev=dev), ctx)
    verify_s = time.perf_counter() - start
    common = dict(batch_size=batch_size, steps=steps, warmup=warmup, gather=gather)
    results = [_time_stream(shards, manifest.dataset, ctx, workers=w, gpu_decode=False, **common) for w in workers]
    if dev.type == "cuda" and manifest.image.get("format") in ("jpg", "mixed"):
        results += [_time_stream(shards, manifest.dataset, ctx, workers=w, gpu_decode=True, **common)
                    for w in gpu_workers or [max(workers)]]
    results.append(_time_device_cache(shards, manifest.dataset, ctx, data, workers=max(workers),
                                      batch_size=batch_size))
    return {"bench": "data", "shards": shards, "dataset": manifest.dataset,
            # Which stored images the figures were measured on (original bytes, or resized by prepare).
            "resize": manifest.image.get("resize"), "train_samples": int(data.train_keep.sum()),
            "batch_size": batch_size, "gather": gather, "device": str(dev), "cpu_count": os.cpu_count(),
            "torch_threads": torch.get_num_threads(), "verify_sha256_s": round(verify_s, 3), "results": results}


def _counts(text: str, flag: str) -> list[int]:
    try:
        counts = [int(w) for w in text.split(",")]
    except ValueError:
        counts = []
    if not counts or min(counts) < 0:
        raise ConfigError(f"{flag}: expected comma-separated counts >= 0, got {text!r}")
    return counts


def _data_command(args: argparse.Namespace) -> dict:
    gpu_workers = _counts(args.gpu_workers, "--gpu-workers") if args.gpu_workers else None
    return bench_data(args.shards, workers=_counts(args.workers, "--workers"), batch_size=args.batch_size,
                      steps=args.steps, warmup=args.warmup, device=args.device, gpu_workers=gpu_workers,
                      gather=not args.feed_only)


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
                      image_size=side, train=loader,
                      evals={"test": MemoryEvalLoader(images[:0], labels[:0], rank=ctx.rank, world_size=ctx.world_size,
                                                      device=ctx.device)})


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


class _StepClock:
    """Stands in for ``trainer.step.run``: notes the time once the first ``skip`` steps of an
    epoch are done, so that an epoch's rate can leave out its start (the stream's first reads
    and refill). The trainer's own loop runs unchanged around it."""

    def __init__(self, run, skip: int, device: torch.device):
        self.run, self.skip, self.device = run, skip, device
        self.count, self.start = 0, None

    def begin(self) -> None:
        self.count, self.start = 0, None
        if self.skip == 0:
            self._mark()

    def _mark(self) -> None:
        _sync(self.device)  # the skipped steps' queued work is theirs, not the timed steps'
        self.start = time.perf_counter()

    def __call__(self, item=None) -> None:
        self.run(item)
        self.count += 1
        if self.count == self.skip:
            self._mark()


def bench_train(cfg, *, epochs: int, skip_steps: int = 0) -> dict:
    """Whole epochs with the configured loader (shards or memory), selection and logging;
    evaluation timed separately. The first epoch is a warm-up (compilation, worker start);
    ``skip_steps``: the rate counts only the steps after that many of each timed epoch."""
    ctx = init_distributed(cfg)
    trainer = Trainer(cfg, ctx)
    try:
        return _time_epochs(cfg, ctx, trainer, epochs, skip_steps)
    finally:
        # The stream's decoding workers ignore SIGTERM (the trainer checkpoints first), so the
        # interpreter's exit, which terminates and then joins them, would wait for ever: close them.
        trainer.data.train.close()


def _time_epochs(cfg, ctx, trainer: Trainer, epochs: int, skip_steps: int) -> dict:
    n = trainer.data.train.steps_per_epoch
    if not 0 <= skip_steps < n:
        raise ConfigError(f"--skip-steps: expected 0 <= N < {n} (the steps of an epoch), got {skip_steps}")
    clock = _StepClock(trainer.step.run, skip_steps, ctx.device)
    trainer.step.run = clock  # an instance attribute: train_epoch calls it in the method's place
    rates, whole, eval_s = [], [], []
    for epoch in range(epochs + 1):
        clock.begin()
        row = trainer.train_epoch(epoch)
        seconds = time.perf_counter() - clock.start  # train_epoch has synchronised the device
        start = time.perf_counter()
        trainer.evaluate()
        if epoch > 0 or epochs == 0:
            rates.append((n - skip_steps) * cfg.train.batch_size / seconds)
            whole.append(row["samples_per_s"])
            eval_s.append(time.perf_counter() - start)
    return {"bench": "train", **_header(cfg, trainer, ctx), "source": cfg.data.source,
            "steps_per_epoch": n, "skip_steps": skip_steps, "epochs_timed": len(rates),
            "samples_per_s": round(statistics.median(rates), 1),
            "samples_per_s_all": [round(r, 1) for r in rates],
            # The trainer's own figure, every step of the epoch counted: start-up included.
            "samples_per_s_whole_epoch": round(statistics.median(whole), 1),
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
    return bench_train(_model_config(args), epochs=args.epochs, skip_steps=args.skip_steps)


def _comm_command(args):
    return bench_comm(_model_config(args), world_sizes=[int(w) for w in args.world_sizes.split(",")])


def _add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", help="YAML config (configs/*.yaml); key=value overrides follow")
    p.add_argument("overrides", nargs="*", metavar="key=value")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m jocor_ddp.bench", description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="command", required=True)
    d = sub.add_parser("data", help="steady-state samples/s of the shard input pipeline alone")
    d.add_argument("--shards", required=True, help="shard folder written by python -m jocor_ddp.prepare")
    d.add_argument("--workers", default="1,2", help="decoding worker counts to time (default 1,2)")
    d.add_argument("--gpu-workers", default=None,
                   help="worker counts for GPU decoding (CUDA, JPEG shards; default: the largest --workers)")
    d.add_argument("--batch-size", type=int, default=128)
    d.add_argument("--steps", type=int, default=40, help="timed batches per setting")
    d.add_argument("--warmup", type=int, default=10, help="untimed batches first (worker start-up, first reads)")
    d.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    # On a CPU device gather is the step's own compute (crop, float, normalise: about 0.2 s a
    # batch of 128 at 224 on one thread), which hides what the workers can decode.
    d.add_argument("--feed-only", action="store_true",
                   help="time next item + load only, without gather (the step's first device ops)")
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
    tr.add_argument("--skip-steps", type=int, default=0,
                    help="untimed steps at the start of each timed epoch (the stream's refill)")
    tr.set_defaults(func=_train_command)
    cm = sub.add_parser("comm", help="bytes per step moved by the loss all-gather and the all-reduce")
    _add_model_args(cm)
    cm.add_argument("--world-sizes", default="1,2,8,16,64")
    cm.set_defaults(func=_comm_command)
    return p.parse_args(argv)


def run(args: argparse.Namespace) -> None:
    result = args.func(args)
    if rank_from_env() == 0:
        print(json.dumps(result, indent=1))


def main(argv=None) -> int:
    return guarded(run, parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
