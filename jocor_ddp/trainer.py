"""The Trainer: the loop over epochs, evaluation, logging and checkpoints.

The step itself (forward, loss, selection, backward, Adam, the epoch's accounting) is
``step.TrainStep``; the Trainer decides when it runs, reads its counters at sync points
and epoch ends, and saves and restores everything it owns.
"""

from __future__ import annotations

import random
import time
from pathlib import Path
from typing import Optional

import numpy as np
import torch
from torch.nn.parallel import DistributedDataParallel as DDP

from . import __version__
from .autorate import AutoForgetRate, score_evidence
from .checkpoint import (CheckpointError, checkpoint_dir, find_resume, list_checkpoints, load_checkpoint,
                         rng_state, save_checkpoint, set_rng_state)
from .config import NO_FORGET_RATE, Config, ConfigError
from .data import DataBundle, agree_on_error, build_data
from .dist import DistContext, agree, all_gather_objects, all_reduce_sum, broadcast_buffers, max_over_ranks
from .models import ModelPair, build_pair, unwrap
from .noise_rate import MIN_SAMPLES_PER_CLASS
from .preemption import Preempted, StopFlag
from .progress import Progress, progress_enabled
from .runlog import RunLog
from .schedule import forget_rate_schedule, lr_beta1_schedule
from .step import TrainStep, autocast, resolve_precision, resolve_sync_every


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


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
        if ctx.distributed:
            ids = [ctx.device.index] if ctx.device.type == "cuda" else None
            self.model: torch.nn.Module = DDP(self.pair, device_ids=ids)
        else:
            self.model = self.pair
        if cfg.train.compile:
            self.model = torch.compile(self.model)
        self.precision = resolve_precision(cfg.train.precision, ctx.device)
        self.sync_every = resolve_sync_every(cfg, ctx.device)
        self.step = TrainStep(cfg, ctx, self.model, self.pair, self.data.train, self.data.train.num_samples,
                              self.precision, memory_format)
        self.auto = self._auto_forget_rate()
        self.forget_rates = self.auto.schedule() if self.auto else forget_rate_schedule(
            cfg.forget_rate, cfg.train.epochs, cfg.method.num_gradual, cfg.method.exponent)
        self.lrs, self.beta1s = lr_beta1_schedule(cfg.train.lr, cfg.train.epochs,
                                                  cfg.train.epoch_decay_start)
        self.epoch = 0          # 0-based index of the epoch in progress
        self.skipped_steps = 0  # over the whole run
        self.stop = StopFlag()
        # Per training sample: bit j set = kept in the j-th most recent finished epoch.
        self.kept_history = torch.zeros(self.data.train.num_samples, dtype=torch.int64, device=ctx.device)
        self.kept_history_epochs = 0
        self.runlog = RunLog(cfg, ctx, self.data.noise.to_dict() if self.data.noise is not None else None)

    @property
    def global_step(self) -> int:
        return self.step.global_step

    @property
    def held_out(self) -> int:
        """Training samples held out as the validation split (data.val_fraction)."""
        return getattr(self.data.val, "num_samples", 0)

    def _auto_forget_rate(self) -> Optional[AutoForgetRate]:
        """The estimator when tau is auto: asked for, or left unset where the noise rate is
        unknown (a label file, shards whose labels came noisy)."""
        cfg, m = self.cfg, self.cfg.method
        unknown = m.forget_rate is None and self.data.labels_noisy and m.name not in NO_FORGET_RATE
        if not (cfg.auto_forget_rate or unknown):
            return None
        # The samples the estimate scores: the training split without the held-out ones.
        n, c = self.data.train.num_samples - self.held_out, self.data.num_classes
        if n < MIN_SAMPLES_PER_CLASS * c:
            raise ConfigError(f"method.forget_rate: auto needs at least {MIN_SAMPLES_PER_CLASS} training samples "
                              f"per class to estimate the noise rate ({MIN_SAMPLES_PER_CLASS * c} for {c} classes); "
                              f"this run trains on {n}: set method.forget_rate to a number")
        return AutoForgetRate(cfg, c)

    # --- one epoch ------------------------------------------------------------------

    def begin_epoch(self, epoch: int, start_step: int = 0, counters: Optional[dict] = None) -> None:
        """Set the step up for epoch ``epoch`` from ``start_step`` (``counters``: the epoch's
        accounting so far, from a mid-epoch checkpoint)."""
        self.epoch = epoch
        self.step.begin_epoch(epoch, start_step, lr=self.lrs[epoch], beta1=self.beta1s[epoch],
                              forget_rate=float(self.forget_rates[epoch]), counters=counters)

    def _sync_point(self) -> int:
        """One small all-reduce and one host sync: the signal any rank got (else 0), so that all
        ranks stop after the same step; a bad input any rank's loader met and the deferred
        non-finite verdict, raised here on every rank."""
        data_error = self.step.feed.error
        flags = torch.cat([torch.tensor([self.stop.signum or 0, int(data_error is not None)], device=self.ctx.device),
                           self.step.counters.first_bad])
        signum, bad_input, step, kind, pos = max_over_ranks(self.ctx, flags).tolist()
        if bad_input:
            agree_on_error(self.ctx, data_error)  # raises on every rank
        if kind > 0:
            self.step.raise_bad(step, kind, pos)
        return signum

    def train_epoch(self, epoch: int, start_step: int = 0, counters: Optional[dict] = None) -> dict:
        """Train epoch ``epoch`` from ``start_step`` on; ``counters`` carries the accounting of
        the steps before it when a run resumes mid-epoch."""
        self.begin_epoch(epoch, start_step, counters)
        steps_per_epoch = self.data.train.steps_per_epoch
        every = self.cfg.checkpoint.every_steps
        bar = Progress(steps_per_epoch - start_step, f"epoch {epoch + 1}/{self.cfg.train.epochs}",
                       progress_enabled(self.cfg.log.progress, self.ctx.is_main))
        start = time.perf_counter()
        step = start_step
        for item in self.step.feed.steps(epoch, start_step):
            self.step.run(item)
            step += 1
            bar.update(step - start_step)
            last = step == steps_per_epoch
            want_save = every and self.global_step % every == 0 and not last
            # A checkpoint is written only after a sync point: it never holds a NaN unnoticed.
            stop = self._sync_point() if last or want_save or step % self.sync_every == 0 else 0
            if stop or want_save:
                self.save(epoch, step, with_counters=True)
            if stop:
                bar.close()
                raise Preempted(f"stopped by signal {stop} at epoch {epoch + 1}, "
                                f"step {step}/{steps_per_epoch}; checkpoint written")
        bar.close()
        self._roll_kept_history()
        if self.ctx.device.type == "cuda":
            torch.cuda.synchronize(self.ctx.device)
        epoch_s = time.perf_counter() - start
        acc = self.step.counters
        self.skipped_steps += acc.skipped_steps
        # A streaming loader counts the bad samples it skipped (data.on_bad_sample: skip).
        counts = all_reduce_sum(self.ctx, acc.counts + torch.tensor(
            [0, 0, 0, float(getattr(self.data.train, "bad_samples", 0))], dtype=torch.float64,
            device=self.ctx.device))
        kept, known, clean, bad = counts.tolist()
        forget_rate = float(self.forget_rates[epoch])
        return {
            "epoch": epoch + 1,
            "lr": self.lrs[epoch],
            "beta1": self.beta1s[epoch],
            # Standard and Decoupling select no small-loss share: their forget rate is 0.
            "forget_rate": forget_rate if self.cfg.method.name not in ("standard", "decoupling") else 0.0,
            "train_loss": acc.loss_sum.item() / max(acc.trained_steps, 1),
            "label_precision": clean / known if known else None,
            "kept": int(kept),
            "steps": steps_per_epoch,
            "skipped_steps": acc.skipped_steps,
            "bad_samples": int(bad),
            "samples_per_s": (step - start_step) * self.cfg.train.batch_size / max(epoch_s, 1e-9),
            "epoch_s": epoch_s,
        }

    def _roll_kept_history(self) -> None:
        kept_epoch = self.step.counters.kept_epoch
        self.kept_history = ((self.kept_history << 1) | kept_epoch.long()) & 0xFFFF
        self.kept_history_epochs = min(self.kept_history_epochs + 1, 16)
        kept_epoch.zero_()

    # --- evaluation -----------------------------------------------------------------

    @torch.no_grad()
    def evaluate(self) -> dict:
        """Accuracy of both networks over every test sample, each scored exactly once."""
        # BatchNorm running statistics drift apart per rank after the last step (DDP broadcasts
        # buffers only before a forward): score with rank 0's, the ones the checkpoint keeps.
        broadcast_buffers(self.ctx, self.pair)
        self.pair.eval()
        start = time.perf_counter()
        row = self._accuracy("test", self.data.test)
        if row["test_samples"] != self.data.test_samples:
            raise RuntimeError(f"evaluation scored {row['test_samples']} samples, the test split has "
                               f"{self.data.test_samples}")
        if self.data.val is not None:  # accuracy against the held-out samples' noisy labels
            row.update(self._accuracy("val", self.data.val))
        row["eval_s"] = time.perf_counter() - start
        return row

    def _scores(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        with autocast(self.precision, self.ctx.device):
            return self.pair(x)

    def _accuracy(self, name: str, batches) -> dict:
        """Both networks' accuracy over a split, every sample scored once (a collective)."""
        counts = torch.zeros(3, dtype=torch.float64, device=self.ctx.device)  # correct1, correct2, scored
        for batch in batches:
            logits1, logits2 = self._scores(batch.x)
            counts += torch.stack([(logits1.argmax(1) == batch.y).sum(), (logits2.argmax(1) == batch.y).sum(),
                                   torch.tensor(batch.y.shape[0], device=counts.device)]).double()
        correct1, correct2, scored = all_reduce_sum(self.ctx, counts).tolist()
        return {f"{name}_acc1": 100.0 * correct1 / max(scored, 1), f"{name}_acc2": 100.0 * correct2 / max(scored, 1),
                f"{name}_samples": int(scored)}

    @torch.no_grad()
    def estimate_noise(self, epoch: int) -> dict:
        """method.forget_rate auto: score every training sample once, unaugmented, estimate the
        noise rate (the same on every rank) and reschedule the forget rate from it."""
        broadcast_buffers(self.ctx, self.pair)
        self.pair.eval()
        start = time.perf_counter()
        row = self.auto.observe(self.ctx, epoch, score_evidence(self.data.train_eval, self._scores))
        row["estimate_s"] = time.perf_counter() - start  # the scoring pass and the estimate
        self.forget_rates = self.auto.schedule()
        line = self.auto.undecided_line(row)
        if line and self.ctx.is_main:
            print(line, flush=True)
        return row

    # --- checkpoints ----------------------------------------------------------------

    def save(self, epoch: int, step_in_epoch: int, with_counters: bool = False) -> None:
        """Checkpoint the position "epoch ``epoch``, ``step_in_epoch`` steps done" (mid-epoch:
        ``with_counters``, the epoch's accounting so far). Every rank calls it (the counters
        and RNG states are gathered); rank 0 writes the file."""
        loader_bad = getattr(self.data.train, "bad_samples", 0)
        acc_state = self.step.counters.state(self.ctx, loader_bad) if with_counters else None
        rngs = all_gather_objects(self.ctx, rng_state())
        # Rank 0 writes; a failed write (disk full, no permission) is raised on every rank.
        self.last_checkpoint = agree(self.ctx, lambda: self._write_checkpoint(epoch, step_in_epoch, acc_state, rngs))

    def _write_checkpoint(self, epoch: int, step_in_epoch: int, acc_state: Optional[dict], rngs: list) -> Path:
        state = {
            "format": 1,
            "package_version": __version__,
            "torch_version": str(torch.__version__),  # TorchVersion is not a plain str
            "model": unwrap(self.pair).state_dict(),
            "optimizer": self.step.optimizer.state_dict(),
            "scaler": self.step.scaler.state_dict(),
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
            "kept_epoch": self.step.counters.kept_epoch.cpu(),
            "forget_rate_auto": self.auto.state_dict() if self.auto else None,
            "data_meta": {"name": self.data.name, "classes": list(self.data.classes),
                          "in_channels": self.data.in_channels, "image_size": self.data.image_size,
                          "normalization": self.data.normalization},
        }
        folder = checkpoint_dir(self.run_dir)
        try:
            return save_checkpoint(state, folder, self.global_step, self.cfg.checkpoint.keep)
        except OSError as exc:
            raise CheckpointError(f"checkpoint {folder}/step-{self.global_step}.pt: cannot be written: {exc}") from None

    def restore(self) -> tuple[int, int, Optional[dict]]:
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
            self.runlog.truncate(state["epoch"])
        return state["epoch"], state["step_in_epoch"], state["epoch_counters"]

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
        self.runlog.truncate(0)

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
            self.step.optimizer.load_state_dict(state["optimizer"])
        except (RuntimeError, ValueError, KeyError) as exc:
            raise CheckpointError(f"checkpoint {path} does not fit this model ({self.cfg.model.arch}): "
                                  f"{str(exc).splitlines()[0]}") from None
        self.step.scaler.load_state_dict(state["scaler"])
        self.step.loaded()
        if state["kept_history"].shape == self.kept_history.shape:
            self.kept_history.copy_(state["kept_history"])
            self.step.counters.kept_epoch.copy_(state["kept_epoch"])
            self.kept_history_epochs = state["kept_history_epochs"]
        if self.auto is not None:
            self.auto.load_state_dict(state.get("forget_rate_auto"))
            self.forget_rates = self.auto.schedule()
        self.step.global_step = state["global_step"]
        self.skipped_steps = state["skipped_steps"]
        rngs = state["rng"]
        set_rng_state(rngs[self.ctx.rank % len(rngs)])
        return state

    # --- the run --------------------------------------------------------------------

    def fit(self) -> list[dict]:
        """Train (resuming per train.resume) to the last epoch; returns this call's rows.
        Raises Preempted after writing a checkpoint when a rank got SIGTERM / SIGINT."""
        start_epoch, start_step, counters = self.restore()
        self._announce()
        rows = []
        self.stop.install()
        try:
            for epoch in range(start_epoch, self.cfg.train.epochs):
                row = self.train_epoch(epoch, start_step, counters)
                start_step, counters = 0, None
                if self.auto is not None and self.auto.wants(epoch):
                    row.update(self.estimate_noise(epoch))
                row.update(self.evaluate())
                self.runlog.write(row, f" ({self.auto.describe(row)})" if "noise_estimate" in row else "")
                self.save(epoch + 1, 0)
                rows.append(row)
                stop = self._sync_point()
                if stop:
                    raise Preempted(f"stopped by signal {stop} after epoch {epoch + 1}; "
                                    f"checkpoint written")
        finally:
            self.stop.restore()
            self.runlog.close()
        return rows

    def _announce(self) -> None:
        if not self.ctx.is_main:
            return
        n = self.data.train.num_samples
        held = self.held_out
        n_s = f"{n - held} train + {held} validation" if held else f"{n} train"
        noise = self.data.noise
        noise_s = (f"{noise.type} {noise.rate:g} (actual {100 * noise.actual_rate:.2f}% wrong)"
                   if noise is not None else "given labels")
        print(f"jocor_ddp: {self.cfg.data.name} ({n_s} / {self.data.test_samples} test), "
              f"{self.cfg.model.arch} pair, noise {noise_s}, {self.ctx.world_size} rank(s) on "
              f"{self.ctx.device.type}, global batch {self.cfg.train.batch_size}, "
              f"{self.data.train.steps_per_epoch} steps/epoch, selection {self.cfg.selection}, "
              f"precision {self.precision}, step {self.step.describe()}", flush=True)
        if self.auto is not None:
            print(f"forget rate: auto, estimated from the data at the end of epochs 1-{self.auto.last_epoch + 1} "
                  f"(method.num_gradual), {self.auto.fallback:g} until then", flush=True)
