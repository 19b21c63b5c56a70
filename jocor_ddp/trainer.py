"""The Trainer: one JoCoR step, one epoch, evaluation and logging.

The step: both networks (one module, one DDP wrapper) run once on the rank's share of
the global batch; the per-sample joint loss is computed in fp32; the small-loss samples
are selected over the whole global batch; one backward pass updates both networks
through one Adam optimizer.
"""

from __future__ import annotations

import json
import math
import os
import random
import time
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np
import torch
from torch.nn.parallel import DistributedDataParallel as DDP

from .config import Config, dump_config
from .data import Batch, DataBundle, build_data
from .dist import DistContext, all_reduce_sum
from .faults import FaultInjector
from .methods.jocor import jocor_loss
from .methods.selection import Selection, select
from .models import ModelPair, build_pair, unwrap
from .progress import Progress, progress_enabled
from .schedule import forget_rate_schedule, lr_beta1_schedule


class NonFiniteError(RuntimeError):
    """A loss or gradient became NaN or infinite."""


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def resolve_precision(requested: str, device: torch.device) -> str:
    if requested != "auto":
        return requested
    if device.type == "cuda" and torch.cuda.is_bf16_supported():
        return "bf16"
    return "fp32"


@dataclass
class StepResult:
    selection: Selection
    skipped: bool


class Trainer:
    def __init__(self, cfg: Config, ctx: DistContext, data: Optional[DataBundle] = None):
        self.cfg = cfg
        self.ctx = ctx
        self.run_dir = Path(cfg.run.dir)
        seed_everything(cfg.train.seed)
        self.data = data if data is not None else build_data(cfg, ctx)
        # The same seed on every rank and for every world size: identical initial networks.
        pair = build_pair(cfg.model, self.data.in_channels, self.data.num_classes,
                          self.data.image_size, seed=cfg.train.seed)
        if cfg.model.sync_bn and ctx.device.type == "cuda" and ctx.distributed:
            pair = torch.nn.SyncBatchNorm.convert_sync_batchnorm(pair)
        self.pair: ModelPair = pair.to(ctx.device)
        if ctx.distributed:
            ids = [ctx.device.index] if ctx.device.type == "cuda" else None
            self.model: torch.nn.Module = DDP(self.pair, device_ids=ids)
        else:
            self.model = self.pair
        self.optimizer = torch.optim.Adam(self.pair.parameters(), lr=cfg.train.lr)
        self.precision = resolve_precision(cfg.train.precision, ctx.device)
        self.scaler = torch.amp.GradScaler(ctx.device.type, enabled=self.precision == "fp16")
        self.forget_rates = forget_rate_schedule(cfg.forget_rate, cfg.train.epochs,
                                                 cfg.method.num_gradual, cfg.method.exponent)
        self.lrs, self.beta1s = lr_beta1_schedule(cfg.train.lr, cfg.train.epochs,
                                                  cfg.train.epoch_decay_start)
        self.epoch = 0          # 0-based index of the epoch in progress
        self.global_step = 0
        self.skipped_steps = 0
        self.faults = FaultInjector(ctx.rank)
        if ctx.is_main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            (self.run_dir / "config.yaml").write_text(dump_config(cfg))
            if self.data.noise is not None:
                (self.run_dir / "noise.json").write_text(json.dumps(self.data.noise.to_dict(), indent=1))

    # --- one step -------------------------------------------------------------------

    def _autocast(self):
        if self.precision in ("bf16", "fp16"):
            dtype = torch.bfloat16 if self.precision == "bf16" else torch.float16
            return torch.autocast(self.ctx.device.type, dtype=dtype)
        return nullcontext()

    def train_step(self, batch: Batch, forget_rate: float) -> StepResult:
        self.model.train()
        self.faults.before_step(self.global_step)
        with self._autocast():
            logits1, logits2 = self.model(batch.x)
        logits1 = self.faults.corrupt(self.global_step, logits1)
        losses = jocor_loss(logits1, logits2, batch.y, self.cfg.method.co_lambda)
        sel = select(self.cfg.selection, losses, forget_rate, self.ctx)
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(sel.loss).backward()
        if self.scaler.is_enabled():
            self.scaler.unscale_(self.optimizer)
        skipped = self._check_finite(sel, batch)
        if not skipped:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            self.optimizer.zero_grad(set_to_none=True)
        self.global_step += 1
        return StepResult(sel, skipped)

    def _check_finite(self, sel: Selection, batch: Batch) -> bool:
        """One host sync per step; every rank reaches the same verdict, because the losses
        were all-gathered and the gradients all-reduced before this point."""
        loss_bad = ~torch.isfinite(sel.global_losses).all()
        if self.scaler.is_enabled():
            grad_bad = torch.zeros((), dtype=torch.bool, device=loss_bad.device)  # the scaler's job
        else:
            grads = [p.grad for p in self.pair.parameters() if p.grad is not None]
            norms = torch._foreach_norm(grads) if grads else [torch.zeros((), device=loss_bad.device)]
            grad_bad = ~torch.isfinite(torch.stack(norms)).all()
        loss_bad_v, grad_bad_v = torch.stack([loss_bad, grad_bad]).tolist()
        if not (loss_bad_v or grad_bad_v):
            return False
        b = batch.y.shape[0]
        if loss_bad_v:
            pos = int(torch.nonzero(~torch.isfinite(sel.global_losses))[0])
            what = f"non-finite joint loss at rank {pos // b}, batch position {pos % b}"
        else:
            what = "non-finite gradient"
        where = f"epoch {self.epoch + 1}, step {self.global_step} (global)"
        if self.cfg.train.on_nonfinite == "skip":
            self.skipped_steps += 1
            if self.ctx.is_main:
                print(f"warning: {what} in {where}: step skipped (train.on_nonfinite=skip)", flush=True)
            return True
        raise NonFiniteError(f"{what} in {where}, seen on rank {self.ctx.rank}; "
                             f"set train.on_nonfinite=skip to skip such steps")

    # --- one epoch ------------------------------------------------------------------

    def _set_schedule(self, epoch: int) -> None:
        for group in self.optimizer.param_groups:
            group["lr"] = self.lrs[epoch]
            group["betas"] = (self.beta1s[epoch], 0.999)

    def train_epoch(self, epoch: int, start_step: int = 0) -> dict:
        self.epoch = epoch
        self._set_schedule(epoch)
        forget_rate = float(self.forget_rates[epoch])
        loader = self.data.train
        dev = self.ctx.device
        # Counters live on the device; they are read once, at the end of the epoch.
        kept = torch.zeros((), dtype=torch.float64, device=dev)
        kept_known = torch.zeros((), dtype=torch.float64, device=dev)
        kept_clean = torch.zeros((), dtype=torch.float64, device=dev)
        loss_sum = torch.zeros((), dtype=torch.float64, device=dev)
        steps = 0
        skipped_before = self.skipped_steps
        bar = Progress(loader.steps_per_epoch - start_step, f"epoch {epoch + 1}/{self.cfg.train.epochs}",
                       progress_enabled(self.cfg.log.progress, self.ctx.is_main))
        start = time.perf_counter()
        for batch in loader.epoch(epoch, start_step):
            result = self.train_step(batch, forget_rate)
            sel = result.selection
            if not result.skipped:
                known = batch.clean >= 0
                kept += sel.local_mask.sum()
                kept_known += (sel.local_mask & known).sum()
                kept_clean += (sel.local_mask & known & (batch.y == batch.clean)).sum()
                # The global mean of the kept losses is the same number on every rank.
                loss_sum += sel.global_losses[sel.global_mask].double().mean() / self.ctx.world_size
            steps += 1
            bar.update(steps)
        bar.close()
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)
        epoch_s = time.perf_counter() - start
        # A streaming loader counts the bad samples it skipped (data.on_bad_sample: skip).
        bad = torch.tensor(float(getattr(loader, "bad_samples", 0)), dtype=torch.float64, device=dev)
        totals = all_reduce_sum(self.ctx, torch.stack([kept, kept_known, kept_clean, loss_sum, bad]))
        kept_v, known_v, clean_v, loss_v, bad_v = totals.tolist()
        trained = steps - (self.skipped_steps - skipped_before)
        return {
            "epoch": epoch + 1,
            "lr": self.lrs[epoch],
            "beta1": self.beta1s[epoch],
            "forget_rate": forget_rate,
            "train_loss": loss_v / max(trained, 1),
            "label_precision": clean_v / known_v if known_v else None,
            "kept": int(kept_v),
            "steps": steps,
            "skipped_steps": self.skipped_steps - skipped_before,
            "bad_samples": int(bad_v),
            "samples_per_s": steps * self.cfg.train.batch_size / max(epoch_s, 1e-9),
            "epoch_s": epoch_s,
        }

    # --- evaluation -----------------------------------------------------------------

    @torch.no_grad()
    def evaluate(self) -> dict:
        """Accuracy of both networks over every test sample, each scored exactly once."""
        self.pair.eval()
        dev = self.ctx.device
        counts = torch.zeros(3, dtype=torch.float64, device=dev)  # correct1, correct2, scored
        start = time.perf_counter()
        for batch in self.data.test:
            with self._autocast():
                logits1, logits2 = self.pair(batch.x)
            counts[0] += (logits1.argmax(1) == batch.y).sum()
            counts[1] += (logits2.argmax(1) == batch.y).sum()
            counts[2] += batch.y.shape[0]
        correct1, correct2, scored = all_reduce_sum(self.ctx, counts).tolist()
        if int(scored) != self.data.test_samples:
            raise RuntimeError(f"evaluation scored {int(scored)} samples, the test split has "
                               f"{self.data.test_samples}")
        return {"test_acc1": 100.0 * correct1 / scored, "test_acc2": 100.0 * correct2 / scored,
                "test_samples": int(scored), "eval_s": time.perf_counter() - start}

    # --- the run --------------------------------------------------------------------

    def log(self, row: dict) -> None:
        if not self.ctx.is_main:
            return
        with open(self.run_dir / "metrics.jsonl", "a") as f:
            f.write(json.dumps(row) + "\n")
        precision = row["label_precision"]
        precision_s = f"{100 * precision:.2f}%" if precision is not None else "n/a"
        print(f"epoch {row['epoch']:>3}/{self.cfg.train.epochs}  lr {row['lr']:.2e}  "
              f"forget {row['forget_rate']:.3f}  loss {row['train_loss']:.4f}  "
              f"label precision {precision_s}  test acc {row['test_acc1']:.2f}% / {row['test_acc2']:.2f}%  "
              f"{row['samples_per_s']:.0f} samples/s  {row['epoch_s']:.1f}s", flush=True)

    def fit(self, start_epoch: int = 0) -> list[dict]:
        rows = []
        if self.ctx.is_main:
            n = self.data.train.num_samples
            noise = self.data.noise
            noise_s = (f"{noise.type} {noise.rate:g} (actual {100 * noise.actual_rate:.2f}% wrong)"
                       if noise is not None else "given labels")
            print(f"jocor_ddp: {self.cfg.data.name} ({n} train / {self.data.test_samples} test), "
                  f"{self.cfg.model.arch} pair, noise {noise_s}, {self.ctx.world_size} rank(s) on "
                  f"{self.ctx.device.type}, global batch {self.cfg.train.batch_size}, "
                  f"{self.data.train.steps_per_epoch} steps/epoch, selection {self.cfg.selection}, "
                  f"precision {self.precision}", flush=True)
        for epoch in range(start_epoch, self.cfg.train.epochs):
            row = self.train_epoch(epoch)
            row.update(self.evaluate())
            self.log(row)
            rows.append(row)
        return rows
