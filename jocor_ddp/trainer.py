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

from . import __version__
from .checkpoint import (CheckpointError, checkpoint_dir, find_resume, list_checkpoints, load_checkpoint,
                         rng_state, save_checkpoint, set_rng_state)
from .config import Config, ConfigError, dump_config
from .data import Batch, DataBundle, build_data
from .dist import (DistContext, agree, all_gather_objects, all_reduce_sum, broadcast_buffers,
                   max_over_ranks)
from .faults import FaultInjector
from .methods import MethodStep, get_method
from .methods.selection import Selector
from .models import ModelPair, build_pair, unwrap
from .preemption import Preempted, StopFlag
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
    step: MethodStep
    skipped: bool


@dataclass
class EpochAccumulator:
    """An epoch's counters, kept on the device and read once at its end. They travel in
    mid-epoch checkpoints, so that a resumed epoch reports what an uninterrupted one would."""
    counts: torch.Tensor    # float64 (4,): kept, kept with a known clean label, kept and clean, bad samples
    loss_sum: torch.Tensor  # float64: sum over steps of the mean kept loss (the same on every rank)
    trained_steps: int = 0
    skipped_steps: int = 0

    @classmethod
    def zeros(cls, device: torch.device) -> "EpochAccumulator":
        return cls(torch.zeros(4, dtype=torch.float64, device=device),
                   torch.zeros((), dtype=torch.float64, device=device))

    def add(self, result: StepResult, batch: Batch) -> None:
        if result.skipped:
            self.skipped_steps += 1
            return
        kept = result.step.kept_local  # (sets, b): label precision pools the kept sets
        known = batch.clean >= 0
        self.counts[0] += kept.sum()
        self.counts[1] += (kept & known).sum()
        self.counts[2] += (kept & known & (batch.y == batch.clean)).sum()
        self.loss_sum += result.step.objective.double()
        self.trained_steps += 1

    def state(self, ctx: DistContext, loader_bad: int = 0) -> dict:
        """Totals over all ranks (a collective): integers in float64, so the sum is exact
        and a resume with another world size continues the same totals. ``loader_bad``: the
        bad samples this rank's loader met so far this epoch (data.on_bad_sample: skip)."""
        counts = self.counts.clone()
        counts[3] += loader_bad
        totals = all_reduce_sum(ctx, counts)
        return {"counts": totals.cpu(), "loss_sum": self.loss_sum.cpu(),
                "trained_steps": self.trained_steps, "skipped_steps": self.skipped_steps}

    @classmethod
    def from_state(cls, state: dict, ctx: DistContext) -> "EpochAccumulator":
        counts = state["counts"] if ctx.is_main else torch.zeros(4, dtype=torch.float64)
        return cls(counts.to(ctx.device), state["loss_sum"].to(ctx.device),
                   state["trained_steps"], state["skipped_steps"])


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
        elif cfg.model.sync_bn and ctx.is_main:
            print("warning: model.sync_bn needs CUDA and several ranks; using plain BatchNorm", flush=True)
        memory_format = torch.channels_last if cfg.train.channels_last else torch.contiguous_format
        self.pair: ModelPair = pair.to(ctx.device, memory_format=memory_format)
        self.memory_format = memory_format
        if ctx.distributed:
            ids = [ctx.device.index] if ctx.device.type == "cuda" else None
            self.model: torch.nn.Module = DDP(self.pair, device_ids=ids)
        else:
            self.model = self.pair
        if cfg.train.compile:
            self.model = torch.compile(self.model)
        # One Adam over both networks, as the reference; fused on CUDA (one kernel per step).
        self.optimizer = torch.optim.Adam(self.pair.parameters(), lr=cfg.train.lr,
                                          fused=True if ctx.device.type == "cuda" else None)
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
        self.stop = StopFlag()
        self.method = get_method(cfg.method.name, cfg.method.co_lambda, cfg.method.init_epoch)
        self.selector = Selector(cfg.selection, ctx)
        # Per training sample: bit j set = kept in the j-th most recent finished epoch.
        n_train = self.data.train.num_samples
        self.kept_history = torch.zeros(n_train, dtype=torch.int64, device=ctx.device)
        self.kept_history_epochs = 0
        self.kept_epoch = torch.zeros(n_train, dtype=torch.uint8, device=ctx.device)
        # The first non-finite step not yet reported (see _check_finite); -1 = none.
        self.first_bad = torch.full((3,), -1, dtype=torch.int64, device=ctx.device)
        # Rank 0 writes; a failure (an unwritable run.dir) is raised on every rank.
        agree(ctx, self._prepare_run_dir)
        self.tensorboard = self._open_tensorboard()

    def _prepare_run_dir(self) -> None:
        try:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            (self.run_dir / "config.yaml").write_text(dump_config(self.cfg))
            if self.data.noise is not None:
                (self.run_dir / "noise.json").write_text(json.dumps(self.data.noise.to_dict(), indent=1))
        except OSError as exc:
            raise ConfigError(f"run.dir: cannot write the run folder {self.run_dir}: {exc}") from None

    def _open_tensorboard(self):
        if not self.cfg.log.tensorboard:
            return None
        try:  # checked on every rank (the same environment), so no rank waits for a failed one
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            raise ConfigError("log.tensorboard: true needs the tensorboard package: "
                              "pip install -e .[tensorboard]") from None
        return SummaryWriter(str(self.run_dir / "tensorboard")) if self.ctx.is_main else None

    # --- one step -------------------------------------------------------------------

    def _autocast(self):
        if self.precision in ("bf16", "fp16"):
            dtype = torch.bfloat16 if self.precision == "bf16" else torch.float16
            return torch.autocast(self.ctx.device.type, dtype=dtype)
        return nullcontext()

    def train_step(self, batch: Batch, forget_rate: float) -> StepResult:
        self.model.train()
        self.faults.before_step(self.global_step)
        x = batch.x.contiguous(memory_format=self.memory_format) if batch.x.dim() == 4 else batch.x
        with self._autocast():
            logits1, logits2 = self.model(x)
        logits1 = self.faults.corrupt(self.global_step, logits1)
        out = self.method(logits1, logits2, batch.y, forget_rate, self.epoch, self.selector)
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(out.loss).backward()
        if self.scaler.is_enabled():
            self.scaler.unscale_(self.optimizer)
        skipped = self._check_finite(out, batch)
        if not skipped:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            self.optimizer.zero_grad(set_to_none=True)
        if not skipped:
            # Which training samples updated a network this epoch (for the audit); a scatter,
            # not boolean indexing, so no host sync.
            self.kept_epoch.scatter_reduce_(0, self.selector.gather(batch.idx),
                                            out.kept_global.any(0).to(torch.uint8), reduce="amax")
        self.global_step += 1
        return StepResult(out, skipped)

    def _check_finite(self, out: MethodStep, batch: Batch) -> bool:
        """Every rank reaches the same verdict: the losses were all-gathered and the gradients
        all-reduced before this point. With train.sync_every=1 the verdict is read now (one
        host sync); otherwise the first bad step is recorded on the device and read at the
        next sync point (``_sync_point``)."""
        dev = out.checked.device
        bad_columns = ~torch.isfinite(out.checked).all(0)
        loss_bad = bad_columns.any()
        if self.scaler.is_enabled():
            grad_bad = torch.zeros((), dtype=torch.bool, device=dev)  # inf gradients are the scaler's job
        else:
            grads = [p.grad for p in self.pair.parameters() if p.grad is not None]
            norms = torch._foreach_norm(grads) if grads else [torch.zeros((), device=dev)]
            grad_bad = ~torch.isfinite(torch.stack(norms)).all()
        # (step, kind: 1 loss / 2 gradient, position in the global batch), -1 while all is well
        record = torch.stack([torch.full((), self.global_step, device=dev),
                              torch.where(loss_bad, 1, torch.where(grad_bad, 2, 0)),
                              torch.argmax(bad_columns.to(torch.uint8))]).long()
        record = torch.where(loss_bad | grad_bad, record, -1)
        if self.cfg.train.sync_every > 1:
            self.first_bad = torch.where(self.first_bad[0] < 0, record, self.first_bad)
            return False
        step, kind, pos = record.tolist()
        if kind < 0:
            return False
        if self.cfg.train.on_nonfinite == "skip":
            self.skipped_steps += 1
            if self.ctx.is_main:
                print(f"warning: {self._describe_bad(step, kind, pos, batch.y.shape[0])}: "
                      f"step skipped (train.on_nonfinite=skip)", flush=True)
            return True
        self._raise_bad(step, kind, pos, batch.y.shape[0])

    def _describe_bad(self, step: int, kind: int, pos: int, b: int) -> str:
        if kind == 1:
            what = "joint loss" if self.cfg.method.name == "jocor" else "loss"
            what = f"non-finite {what} at rank {pos // b}, batch position {pos % b}"
        else:
            what = "non-finite gradient"
        return f"{what} in epoch {self.epoch + 1}, step {step} (global)"

    def _raise_bad(self, step: int, kind: int, pos: int, b: int):
        raise NonFiniteError(f"{self._describe_bad(step, kind, pos, b)}, seen on rank {self.ctx.rank}; "
                             f"set train.on_nonfinite=skip to skip such steps")

    def _sync_point(self) -> int:
        """One small all-reduce and one host sync: the signal any rank got (else 0), so that all
        ranks stop after the same step; and the deferred non-finite verdict, raised here."""
        local_b = self.cfg.train.batch_size // self.ctx.world_size
        flags = torch.cat([torch.tensor([self.stop.signum or 0], device=self.ctx.device), self.first_bad])
        signum, step, kind, pos = max_over_ranks(self.ctx, flags).tolist()
        if kind > 0:
            self._raise_bad(step, kind, pos, local_b)
        return signum

    # --- one epoch ------------------------------------------------------------------

    def _set_schedule(self, epoch: int) -> None:
        for group in self.optimizer.param_groups:
            group["lr"] = self.lrs[epoch]
            group["betas"] = (self.beta1s[epoch], 0.999)

    def train_epoch(self, epoch: int, start_step: int = 0, acc: Optional[EpochAccumulator] = None) -> dict:
        """Train epoch ``epoch`` from ``start_step`` on; ``acc`` carries the counters of the
        steps before it when a run resumes mid-epoch."""
        self.epoch = epoch
        self._set_schedule(epoch)
        forget_rate = float(self.forget_rates[epoch])
        loader = self.data.train
        acc = acc or EpochAccumulator.zeros(self.ctx.device)
        every = self.cfg.checkpoint.every_steps
        bar = Progress(loader.steps_per_epoch - start_step, f"epoch {epoch + 1}/{self.cfg.train.epochs}",
                       progress_enabled(self.cfg.log.progress, self.ctx.is_main))
        start = time.perf_counter()
        step = start_step
        for batch in loader.epoch(epoch, start_step):
            result = self.train_step(batch, forget_rate)
            acc.add(result, batch)
            step += 1
            bar.update(step - start_step)
            last = step == loader.steps_per_epoch
            want_save = every and self.global_step % every == 0 and not last
            # A checkpoint is written only after a sync point: it never holds a NaN unnoticed.
            stop = self._sync_point() if last or want_save or step % self.cfg.train.sync_every == 0 else 0
            if stop or want_save:
                self.save(epoch, step, acc)
            if stop:
                bar.close()
                raise Preempted(f"stopped by signal {stop} at epoch {epoch + 1}, "
                                f"step {step}/{loader.steps_per_epoch}; checkpoint written")
        bar.close()
        self._roll_kept_history()
        if self.ctx.device.type == "cuda":
            torch.cuda.synchronize(self.ctx.device)
        epoch_s = time.perf_counter() - start
        done = step - start_step
        # A streaming loader counts the bad samples it skipped (data.on_bad_sample: skip).
        counts = all_reduce_sum(self.ctx, acc.counts + torch.tensor(
            [0, 0, 0, float(getattr(loader, "bad_samples", 0))], dtype=torch.float64, device=self.ctx.device))
        kept, known, clean, bad = counts.tolist()
        trained = acc.trained_steps
        return {
            "epoch": epoch + 1,
            "lr": self.lrs[epoch],
            "beta1": self.beta1s[epoch],
            # Standard and Decoupling select no small-loss share: their forget rate is 0.
            "forget_rate": forget_rate if self.cfg.method.name not in ("standard", "decoupling") else 0.0,
            "train_loss": acc.loss_sum.item() / max(trained, 1),
            "label_precision": clean / known if known else None,
            "kept": int(kept),
            "steps": loader.steps_per_epoch,
            "skipped_steps": acc.skipped_steps,
            "bad_samples": int(bad),
            "samples_per_s": done * self.cfg.train.batch_size / max(epoch_s, 1e-9),
            "epoch_s": epoch_s,
        }

    def _roll_kept_history(self) -> None:
        self.kept_history = ((self.kept_history << 1) | self.kept_epoch.long()) & 0xFFFF
        self.kept_history_epochs = min(self.kept_history_epochs + 1, 16)
        self.kept_epoch.zero_()

    # --- evaluation -----------------------------------------------------------------

    @torch.no_grad()
    def evaluate(self) -> dict:
        """Accuracy of both networks over every test sample, each scored exactly once."""
        # BatchNorm running statistics drift apart per rank after the last step (DDP broadcasts
        # buffers only before a forward): score with rank 0's, the ones the checkpoint keeps.
        broadcast_buffers(self.ctx, self.pair)
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
        if self.tensorboard is not None:
            for key, value in row.items():
                if key != "epoch" and isinstance(value, (int, float)):
                    self.tensorboard.add_scalar(key, value, row["epoch"])
            self.tensorboard.flush()
        precision = row["label_precision"]
        precision_s = f"{100 * precision:.2f}%" if precision is not None else "n/a"
        print(f"epoch {row['epoch']:>3}/{self.cfg.train.epochs}  lr {row['lr']:.2e}  "
              f"forget {row['forget_rate']:.3f}  loss {row['train_loss']:.4f}  "
              f"label precision {precision_s}  test acc {row['test_acc1']:.2f}% / {row['test_acc2']:.2f}%  "
              f"{row['samples_per_s']:.0f} samples/s  {row['epoch_s']:.1f}s", flush=True)

    # --- checkpoints ----------------------------------------------------------------

    def save(self, epoch: int, step_in_epoch: int, acc: Optional[EpochAccumulator]) -> None:
        """Checkpoint the position "epoch ``epoch``, ``step_in_epoch`` steps done". Every rank
        calls it (the counters and RNG states are gathered); rank 0 writes the file."""
        loader_bad = getattr(self.data.train, "bad_samples", 0)
        acc_state = acc.state(self.ctx, loader_bad) if acc is not None else None
        rngs = all_gather_objects(self.ctx, rng_state())
        # Rank 0 writes; a failed write (disk full, no permission) is raised on every rank.
        self.last_checkpoint = agree(self.ctx, lambda: self._write_checkpoint(epoch, step_in_epoch, acc_state, rngs))

    def _write_checkpoint(self, epoch: int, step_in_epoch: int, acc_state: Optional[dict], rngs: list) -> Path:
        state = {
            "format": 1,
            "package_version": __version__,
            "torch_version": str(torch.__version__),  # TorchVersion is not a plain str
            "model": unwrap(self.pair).state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scaler": self.scaler.state_dict(),
            "epoch": epoch,
            "step_in_epoch": step_in_epoch,
            "global_step": self.global_step,
            "completed_epochs": epoch,  # epochs before `epoch` are done, with their metrics rows
            "skipped_steps": self.skipped_steps,
            "data_position": {"epoch": epoch, "step": step_in_epoch, "seed": self.cfg.train.seed,
                              "global_batch": self.cfg.train.batch_size},
            "epoch_counters": acc_state,
            "rng": rngs,
            "config": self.cfg.to_dict(),
            "world_size": self.ctx.world_size,
            "precision": self.precision,
            # Identical on every rank (built from all-gathered indices): rank 0's is everyone's.
            "kept_history": self.kept_history.cpu(),
            "kept_history_epochs": self.kept_history_epochs,
            "kept_epoch": self.kept_epoch.cpu(),
            "data_meta": {"name": self.data.name, "classes": list(self.data.classes),
                          "in_channels": self.data.in_channels, "image_size": self.data.image_size,
                          "normalization": self.data.normalization},
        }
        folder = checkpoint_dir(self.run_dir)
        try:
            return save_checkpoint(state, folder, self.global_step, self.cfg.checkpoint.keep)
        except OSError as exc:
            raise CheckpointError(f"checkpoint {folder}/step-{self.global_step}.pt: cannot be written: {exc}") from None

    def restore(self) -> tuple[int, int, Optional[EpochAccumulator]]:
        """Continue from a checkpoint per train.resume; returns (epoch, step, counters)."""
        folder = checkpoint_dir(self.run_dir)
        # Rank 0 chooses (so all ranks agree on the file), every rank loads it (run.dir is on
        # storage all nodes share); a failure anywhere is raised on every rank.
        chosen = agree(self.ctx, lambda: str(p) if (p := find_resume(self.cfg.train.resume, folder)[0]) else None)
        if chosen is None:
            agree(self.ctx, self._start_fresh)
            return 0, 0, None
        state = agree(self.ctx, lambda: self._load_state(load_checkpoint(chosen), chosen), every_rank=True)
        if self.ctx.is_main:
            print(f"resumed from {chosen}: epoch {state['epoch'] + 1}, step {state['step_in_epoch']}, "
                  f"global step {state['global_step']}", flush=True)
            self._truncate_metrics(state["epoch"])
        acc = EpochAccumulator.from_state(state["epoch_counters"], self.ctx) if state["epoch_counters"] else None
        return state["epoch"], state["step_in_epoch"], acc

    def _start_fresh(self) -> None:
        """A fresh start in a used run folder: the earlier run's metrics rows would mislead, and
        its checkpoints (higher step numbers) would outrank this run's, be resumed from later,
        and make checkpoint.keep prune this run's own files. Set them aside, never delete them."""
        folder = checkpoint_dir(self.run_dir)
        if list_checkpoints(folder):
            k = 1
            while folder.with_name(f"checkpoints.replaced-{k}").exists():
                k += 1
            aside = folder.with_name(f"checkpoints.replaced-{k}")
            folder.rename(aside)
            reason = "none could be loaded" if self.cfg.train.resume == "auto" else "train.resume=never"
            print(f"warning: starting fresh ({reason}); the earlier checkpoints were moved to {aside}", flush=True)
        self._truncate_metrics(0)

    def _load_state(self, state: dict, path: str) -> dict:
        saved_batch = state["config"]["train"]["batch_size"]
        if saved_batch != self.cfg.train.batch_size:
            raise CheckpointError(f"checkpoint {path} was trained with global batch {saved_batch}, this run "
                                  f"asks for {self.cfg.train.batch_size}: set train.batch_size={saved_batch} "
                                  f"or start a new run.dir")
        if state["world_size"] != self.ctx.world_size and state["step_in_epoch"] > 0 \
                and not getattr(self.data.train, "world_size_invariant", False):
            raise CheckpointError(
                f"checkpoint {path} stopped mid-epoch under {state['world_size']} ranks; this loader's "
                f"order depends on the world size, so {self.ctx.world_size} ranks cannot continue that "
                f"epoch exactly: resume with {state['world_size']} ranks or from an epoch-end checkpoint")
        try:
            self.pair.load_state_dict(state["model"])
            self.optimizer.load_state_dict(state["optimizer"])
        except (RuntimeError, ValueError, KeyError) as exc:
            raise CheckpointError(f"checkpoint {path} does not fit this model ({self.cfg.model.arch}): "
                                  f"{str(exc).splitlines()[0]}") from None
        self.scaler.load_state_dict(state["scaler"])
        if state["kept_history"].shape == self.kept_history.shape:
            self.kept_history.copy_(state["kept_history"])
            self.kept_epoch.copy_(state["kept_epoch"])
            self.kept_history_epochs = state["kept_history_epochs"]
        self.global_step = state["global_step"]
        self.skipped_steps = state["skipped_steps"]
        rngs = state["rng"]
        set_rng_state(rngs[self.ctx.rank % len(rngs)])
        return state

    def _truncate_metrics(self, completed_epochs: int) -> None:
        """Drop rows of epochs after the checkpoint: a crash between a row and its checkpoint
        must not leave the row twice once the epoch is trained again."""
        path = self.run_dir / "metrics.jsonl"
        if not path.is_file():
            return
        rows = [line for line in path.read_text().splitlines() if line.strip()]
        keep = [line for line in rows if json.loads(line)["epoch"] <= completed_epochs]
        if len(keep) != len(rows):
            path.write_text("".join(line + "\n" for line in keep))

    # --- the run --------------------------------------------------------------------

    def fit(self) -> list[dict]:
        """Train (resuming per train.resume) to the last epoch; returns this call's rows.
        Raises Preempted after writing a checkpoint when a rank got SIGTERM / SIGINT."""
        start_epoch, start_step, acc = self.restore()
        self._announce()
        rows = []
        self.stop.install()
        try:
            for epoch in range(start_epoch, self.cfg.train.epochs):
                row = self.train_epoch(epoch, start_step, acc)
                start_step, acc = 0, None
                row.update(self.evaluate())
                self.log(row)
                self.save(epoch + 1, 0, None)
                rows.append(row)
                stop = self._sync_point()
                if stop:
                    raise Preempted(f"stopped by signal {stop} after epoch {epoch + 1}; "
                                    f"checkpoint written")
        finally:
            self.stop.restore()
            if self.tensorboard is not None:
                self.tensorboard.close()
        return rows

    def _announce(self) -> None:
        if not self.ctx.is_main:
            return
        n = self.data.train.num_samples
        noise = self.data.noise
        noise_s = (f"{noise.type} {noise.rate:g} (actual {100 * noise.actual_rate:.2f}% wrong)"
                   if noise is not None else "given labels")
        print(f"jocor_ddp: {self.cfg.data.name} ({n} train / {self.data.test_samples} test), "
              f"{self.cfg.model.arch} pair, noise {noise_s}, {self.ctx.world_size} rank(s) on "
              f"{self.ctx.device.type}, global batch {self.cfg.train.batch_size}, "
              f"{self.data.train.steps_per_epoch} steps/epoch, selection {self.cfg.selection}, "
              f"precision {self.precision}", flush=True)
