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
from .autorate import AutoForgetRate, gather_evidence, score_evidence
from .checkpoint import CheckpointError, checkpoint_dir, find_resume, list_checkpoints, rng_state, save_checkpoint, set_rng_state
from .config import Config
from .correction import WARMUP_SOURCE, Transition, estimate_source, resolve_transition
from .data import DataBundle, EvalLoader, agree_on_error, build_data
from .dist import DistContext, agree, all_gather_objects, all_reduce_sum, broadcast_buffers, max_over_ranks
from .models import ModelPair, build_pair
from .preemption import Preempted, StopFlag
from .progress import Progress, progress_enabled
from .registry import get_method as method_entry
from .runfolder import NOISY_VAL, TRANSITION, split_words
from .runlog import RunLog
from .schedule import decide_forget_rate, forget_rate_schedule, lr_beta1_schedule
from .state import TrainingState, read_state
from .step import KeptHistory, TrainStep, autocast, resolve_precision, resolve_sync_every
from .transition import correction_estimate


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def _load_part(path: str, name: str, load):
    """``load()``, a part of a checkpoint's state taken in by its owner; a part of the wrong shape
    (a damaged file whose types read_state passed) is named instead of failing deep in the owner."""
    try:
        return load()
    except (AttributeError, KeyError, TypeError, ValueError, IndexError, ZeroDivisionError) as exc:
        raise CheckpointError(f"checkpoint {path}: its {name} part is incomplete or damaged "
                              f"({type(exc).__name__}: {(str(exc).splitlines() or [''])[0]})") from None


class Trainer:
    def __init__(self, cfg: Config, ctx: DistContext, data: Optional[DataBundle] = None):
        self.cfg = cfg
        self.ctx = ctx
        self.run_dir = Path(cfg.run.dir)
        seed_everything(cfg.train.seed)
        self.data = data if data is not None else build_data(cfg, ctx)
        # F-correction's T (method.transition), read and checked on every rank before the pair's
        # first collective; any rank's error is every rank's (a file missing on one node).
        self.transition: Optional[Transition] = None
        if "transition" in method_entry(cfg.method.name).uses:
            self.transition = agree(ctx, lambda: resolve_transition(
                cfg.method, cfg.noise.type, self.data.num_classes, self.data.noise, self.data.labels_noisy),
                every_rank=True)
        # method.transition auto: the identity until the end of epoch warmup_epochs, then estimated,
        # then refined method.refine_rounds times (MethodConfig.transition_estimate_epochs).
        self.transition_auto = self.transition is not None and cfg.method.transition == "auto"
        self.transition_epochs = cfg.method.transition_estimate_epochs() if self.transition_auto else []
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
        self.sync_every = resolve_sync_every(cfg.train, ctx.device)
        self.history = KeptHistory(self.data.train.index_range, ctx.device)
        self.step = TrainStep(cfg.train, cfg.method, cfg.selection, ctx, self.model, self.pair, self.data.train,
                              self.history, self.precision, memory_format)
        if self.transition is not None:
            self.step.values.set_transition(self.transition.matrix)
        # tau, decided once: the schedule, the metrics rows, the checkpoint and the audit read it.
        self.forget = decide_forget_rate(cfg.method, cfg.noise, self.data.labels_noisy)
        self.auto = None
        if self.forget.auto:  # estimated from the training split without the held-out samples
            self.auto = AutoForgetRate(cfg.method, cfg.train.epochs, self.data.num_classes,
                                       self.data.train.index_range - self.data.noisy_val_samples)
        self.forget_rates = self.auto.forget_rates() if self.auto else forget_rate_schedule(
            self.forget.tau, cfg.train.epochs, cfg.method.num_gradual, cfg.method.exponent)
        self.lrs, self.beta1s = lr_beta1_schedule(cfg.train.lr, cfg.train.epochs,
                                                  cfg.train.epoch_decay_start)
        self.epoch = 0          # 0-based index of the epoch in progress
        self.stop = StopFlag()
        self.runlog = RunLog(cfg, ctx, self.data.noise.to_dict() if self.data.noise is not None else None)

    @property
    def global_step(self) -> int:
        return self.step.global_step

    # --- one epoch ------------------------------------------------------------------

    def begin_epoch(self, epoch: int, start_step: int = 0, resumed: Optional[TrainingState] = None) -> None:
        """Set the step up for epoch ``epoch`` from ``start_step`` (``resumed``: the mid-epoch
        checkpoint it continues, with the epoch's accounting so far)."""
        self.epoch = epoch
        self.step.begin_epoch(epoch, start_step, lr=self.lrs[epoch], beta1=self.beta1s[epoch],
                              forget_rate=float(self.forget_rates[epoch]),
                              counters=resumed.step["counters"] if resumed else None)
        self.data.train.bad.load_state_dict(resumed.data if resumed else None, self.ctx)

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

    def train_epoch(self, epoch: int, start_step: int = 0, resumed: Optional[TrainingState] = None) -> dict:
        """Train epoch ``epoch`` from ``start_step`` on (``resumed``: the mid-epoch checkpoint
        that holds the accounting of the steps before it)."""
        self.begin_epoch(epoch, start_step, resumed)
        steps_per_epoch = self.data.train.steps_per_epoch
        every = self.cfg.checkpoint.every_steps
        bar = Progress(steps_per_epoch - start_step, f"epoch {epoch + 1}/{self.cfg.train.epochs}",
                       progress_enabled(self.cfg.log.progress, self.ctx.is_main))
        start = time.perf_counter()
        done = start_step  # steps of this epoch done
        for item in self.step.feed.steps(epoch, start_step):
            self.step.run(item)
            done += 1
            bar.update(done - start_step)
            last = done == steps_per_epoch
            want_save = every and self.global_step % every == 0 and not last
            # A checkpoint is written only after a sync point: it never holds a NaN unnoticed.
            stop = self._sync_point() if last or want_save or done % self.sync_every == 0 else 0
            if stop or want_save:
                self.save(epoch, done)
            if stop:
                bar.close()
                raise Preempted(f"stopped by signal {stop} at epoch {epoch + 1}, "
                                f"step {done}/{steps_per_epoch}; checkpoint written")
        bar.close()
        self.history.roll()
        self.step.end_epoch()
        if self.ctx.device.type == "cuda":
            torch.cuda.synchronize(self.ctx.device)
        epoch_s = time.perf_counter() - start
        acc = self.step.counters
        # One all-reduce: the kept counts and the bad samples left out (data.on_bad_sample: skip).
        counts = all_reduce_sum(self.ctx, torch.cat([acc.counts, torch.tensor(
            [float(self.data.train.bad.local())], dtype=torch.float64, device=self.ctx.device)]))
        kept, known, clean, bad = counts.tolist()
        return {
            "epoch": epoch + 1,
            "lr": self.lrs[epoch],
            "beta1": self.beta1s[epoch],
            "forget_rate": float(self.forget_rates[epoch]),
            "train_loss": acc.loss_sum.item() / max(acc.trained_steps, 1),
            "label_precision": clean / known if known else None,
            "kept": int(kept),
            "steps": steps_per_epoch,
            "skipped_steps": acc.skipped_steps,
            "bad_samples": int(bad),
            "samples_per_s": (done - start_step) * self.cfg.train.batch_size / max(epoch_s, 1e-9),
            "epoch_s": epoch_s,
        }

    # --- evaluation -----------------------------------------------------------------

    @torch.no_grad()
    def evaluate(self) -> dict:
        """Accuracy of both networks over every sample of each evaluation split, in the order of
        data.eval_splits, then over the noisy held-out split; each sample scored exactly once."""
        # BatchNorm running statistics drift apart per rank after the last step (DDP broadcasts
        # buffers only before a forward): score with rank 0's, the ones the checkpoint keeps.
        broadcast_buffers(self.ctx, self.pair)
        self.pair.eval()
        start = time.perf_counter()
        row = {}
        for name, loader in self.data.evals.items():
            row.update(self._accuracy(name, loader))
        if self.data.noisy_val is not None:  # accuracy against the held-out samples' noisy labels
            row.update(self._accuracy(NOISY_VAL, self.data.noisy_val))
        row["eval_s"] = time.perf_counter() - start
        return row

    def _scores(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        with autocast(self.precision, self.ctx.device):
            return self.pair(x)

    def _accuracy(self, name: str, loader: EvalLoader) -> dict:
        """Both networks' accuracy over a split, every sample scored once (a collective)."""
        counts = torch.zeros(3, dtype=torch.float64, device=self.ctx.device)  # correct1, correct2, scored
        for batch in loader:
            logits1, logits2 = self._scores(batch.x)
            counts += torch.stack([(logits1.argmax(1) == batch.y).sum(), (logits2.argmax(1) == batch.y).sum(),
                                   torch.tensor(batch.y.shape[0], device=counts.device)]).double()
        correct1, correct2, scored = all_reduce_sum(self.ctx, counts).tolist()
        if scored != loader.num_samples - loader.left_out:
            raise RuntimeError(f"evaluation scored {int(scored)} samples, the {name} split has "
                               f"{loader.num_samples - loader.left_out}")
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
        self.forget_rates = self.auto.forget_rates()
        line = self.auto.undecided_line(row)
        if line and self.ctx.is_main:
            print(line, flush=True)
        return row

    @torch.no_grad()
    def score_training_split(self) -> dict:
        """Every training sample scored once, unaugmented, by the pair: the gathered evidence
        with the mean softmax (``autorate.gather_evidence``), the same on every rank (another
        world size scores other batches, whose logits round differently: transition.py says
        what that moves). A collective."""
        broadcast_buffers(self.ctx, self.pair)
        self.pair.eval()
        return gather_evidence(self.ctx, score_evidence(self.data.train_eval, self._scores),
                               self.data.num_classes, probs=True)

    def use_transition(self, transition: Transition) -> None:
        """Train with ``transition`` from the next step: into the step's buffer (a captured step
        reads it there) and, with the next checkpoint, the checkpoint."""
        self.transition = transition
        self.step.values.set_transition(transition.matrix)

    def estimate_transition(self, epoch: int) -> dict:
        """method.transition auto, at the end of the last warm-up epoch and of each refinement
        round: estimate T from the training split's scoring pass and put it in the step's
        buffer, the run folder and (with the epoch's checkpoint) the checkpoint. A collective."""
        start = time.perf_counter()
        refinement = self.transition_epochs.index(epoch)
        matrix, record, lines = correction_estimate(self.score_training_split(), self.data.num_classes, epoch,
                                                    refinement, previous=self.transition.matrix)
        self.use_transition(Transition(matrix, estimate_source(epoch, refinement)))
        self.runlog.write_transition(self.transition.record())
        if self.ctx.is_main:
            for line in lines:
                print(line, flush=True)
        return {"transition_estimate": record, "estimate_s": time.perf_counter() - start}

    def reinitialise(self) -> None:
        """method.reinit_after_warmup: fresh networks (seeded by train.seed + 1: the same on
        every rank and world size, not the first pair) and a zeroed Adam, in place. The global
        RNG streams are left as they were."""
        with torch.random.fork_rng(devices=[]):
            fresh = build_pair(self.cfg.model, self.data.in_channels, self.data.num_classes,
                               self.data.image_size, seed=self.cfg.train.seed + 1)
        self.step.reinitialise(fresh)

    # --- checkpoints ----------------------------------------------------------------

    def save(self, epoch: int, step_in_epoch: int) -> None:
        """Checkpoint the position "epoch ``epoch``, ``step_in_epoch`` steps done" (mid-epoch
        with the epoch's accounting so far). Every rank calls it (the counters and RNG states
        are gathered); rank 0 writes the file."""
        # The parts that are collectives (the epoch's totals, every rank's RNG), on every rank.
        mid_epoch = step_in_epoch > 0
        step = self.step.state_dict(mid_epoch)
        data = self.data.train.bad.state_dict(self.ctx) if mid_epoch else None
        rngs = all_gather_objects(self.ctx, rng_state())

        def write() -> Path:  # the rest on rank 0 alone (the history's copies to the host included)
            state = TrainingState(
                epoch=epoch, step_in_epoch=step_in_epoch, global_step=self.global_step, config=self.cfg.to_dict(),
                world_size=self.ctx.world_size, precision=self.precision, data_meta=self.data.meta,
                model=self.pair.state_dict(), step=step, data=data, rng=rngs, history=self.history.state_dict(),
                forget_rate={**self.forget.state_dict(), **(self.auto.state_dict() if self.auto else {})},
                transition=self.transition.state_dict() if self.transition is not None else None,
                versions={"package": __version__, "torch": str(torch.__version__)})  # TorchVersion: no plain str
            return self._write_checkpoint(state)
        # Rank 0 writes; a failed write (disk full, no permission) is raised on every rank.
        self.last_checkpoint = agree(self.ctx, write)

    def _write_checkpoint(self, state: TrainingState) -> Path:
        folder = checkpoint_dir(self.run_dir)
        try:
            return save_checkpoint(state.to_dict(), folder, self.global_step, self.cfg.checkpoint.keep)
        except OSError as exc:
            raise CheckpointError(f"checkpoint {folder}/step-{self.global_step}.pt: cannot be written: {exc}") from None

    def restore(self) -> Optional[TrainingState]:
        """Continue from a checkpoint per train.resume; returns its state (None: a fresh start)."""
        folder = checkpoint_dir(self.run_dir)
        # Rank 0 chooses (so all ranks agree on the file), every rank loads it (run.dir is on
        # storage all nodes share); a failure anywhere is raised on every rank.
        chosen = agree(self.ctx, lambda: str(p) if (p := find_resume(self.cfg.train.resume, folder, read_state)[0])
                       else None)
        if chosen is None:
            agree(self.ctx, self._start_fresh)
            return None
        state = agree(self.ctx, lambda: self._load_state(read_state(chosen), chosen), every_rank=True)
        if self.ctx.is_main:
            print(f"resumed from {chosen}: epoch {state.epoch + 1}, step {state.step_in_epoch}, "
                  f"global step {state.global_step}", flush=True)
        agree(self.ctx, lambda: self.runlog.begin(state.epoch))
        return state

    def _start_fresh(self) -> None:
        """A fresh start in a used run folder: the earlier run's metrics rows would mislead, and
        its checkpoints (higher step numbers) would outrank this run's, be resumed from later,
        and make checkpoint.keep prune this run's own files. Set them aside, never delete them:
        the checkpoints and the rows they belong to go into one folder (with train.resume auto
        and no checkpoint that loads, the rows are the only record of the run left)."""
        folder = checkpoint_dir(self.run_dir)
        if list_checkpoints(folder):
            k = 1
            while folder.with_name(f"checkpoints.replaced-{k}").exists():
                k += 1
            aside = folder.with_name(f"checkpoints.replaced-{k}")
            folder.rename(aside)
            moved = "checkpoints"
            if self.runlog.metrics.is_file():
                self.runlog.metrics.rename(aside / self.runlog.metrics.name)
                moved += f" and their {self.runlog.metrics.name}"
            reason = "none could be loaded" if self.cfg.train.resume == "auto" else "train.resume=never"
            print(f"warning: starting fresh ({reason}); the earlier {moved} were moved to {aside}", flush=True)
        self.runlog.begin(0)

    def _load_state(self, state: TrainingState, path: str) -> TrainingState:
        """Each part loads its own; the epoch's counters wait for ``begin_epoch``."""
        saved_batch = state.config["train"]["batch_size"]
        if saved_batch != self.cfg.train.batch_size:
            raise CheckpointError(f"checkpoint {path} was trained with global batch {saved_batch}, this run "
                                  f"asks for {self.cfg.train.batch_size}: set train.batch_size={saved_batch} "
                                  f"or start a new run.dir")
        if state.step_in_epoch > 0:  # the epoch's draw must be the one the checkpoint stopped in
            for key in ("steps_per_epoch", "max_per_class"):
                saved, now = state.config["train"].get(key), getattr(self.cfg.train, key)
                if saved != now:
                    raise CheckpointError(f"checkpoint {path} stopped mid-epoch with train.{key}={saved}, this run "
                                          f"asks for {now}: the epoch would not continue with the same samples; "
                                          f"set train.{key}={saved} or resume from an epoch-end checkpoint")
        if state.world_size != self.ctx.world_size and state.step_in_epoch > 0 \
                and not self.data.train.world_size_invariant:
            raise CheckpointError(
                f"checkpoint {path} stopped mid-epoch under {state.world_size} ranks; this loader's "
                f"order depends on the world size, so {self.ctx.world_size} ranks cannot continue that "
                f"epoch exactly: resume with {state.world_size} ranks or from an epoch-end checkpoint")
        try:
            self.pair.load_state_dict(state.model)
            self.step.load_state_dict(state.step)
        except (RuntimeError, ValueError, KeyError) as exc:
            raise CheckpointError(f"checkpoint {path} does not fit this model ({self.cfg.model.arch}): "
                                  f"{str(exc).splitlines()[0]}") from None
        _load_part(path, "history", lambda: self.history.load_state_dict(state.history))
        if self.auto is not None:
            _load_part(path, "forget_rate", lambda: self.auto.load_state_dict(state.forget_rate))
            self.forget_rates = _load_part(path, "forget_rate", self.auto.forget_rates)
        if self.transition_auto and state.transition is not None:  # the warm-up's identity or the estimate
            self.transition = Transition.from_state(state.transition)
            self.step.values.set_transition(self.transition.matrix)
        elif self.transition is not None and state.transition is not None:
            self.transition = self.transition.resumed(state.transition, path)
            self.step.values.set_transition(self.transition.matrix)
        self.step.global_step = state.global_step
        _load_part(path, "rng", lambda: set_rng_state(state.rng[self.ctx.rank % len(state.rng)]))
        return state

    # --- the run --------------------------------------------------------------------

    def fit(self) -> list[dict]:
        """Train (resuming per train.resume) to the last epoch; returns this call's rows.
        Raises Preempted after writing a checkpoint when a rank got SIGTERM / SIGINT."""
        resumed = self.restore()
        start_epoch, start_step = (resumed.epoch, resumed.step_in_epoch) if resumed else (0, 0)
        if self.transition is not None:  # the one the run trains with: a checkpoint's, once resumed
            self.runlog.write_transition(self.transition.record())
        self._announce()
        rows = []
        self.stop.install()
        try:
            for epoch in range(start_epoch, self.cfg.train.epochs):
                row = self.train_epoch(epoch, start_step, resumed if start_step else None)
                start_step, resumed = 0, None
                if self.auto is not None and self.auto.wants(epoch):
                    row.update(self.estimate_noise(epoch))
                estimate = self._estimates_transition(epoch)
                if estimate is not None:
                    row.update(self.estimate_transition(epoch))
                row.update(self.evaluate())
                if estimate == 0 and self.cfg.method.reinit_after_warmup:
                    self.reinitialise()  # after the evaluation: the row scores the warm-up's pair
                self.runlog.write(row, f" ({self.auto.describe(row)})" if "noise_estimate" in row else
                                  f" (transition matrix estimated: {self.transition.source})"
                                  if "transition_estimate" in row else "")
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

    def _estimates_transition(self, epoch: int) -> Optional[int]:
        """Whether the end of (0-based) epoch ``epoch`` estimates T: None, or 0 for the first
        estimate (the last warm-up epoch) and k for the k-th refinement. A resumed run keeps
        its checkpoint's estimate: a checkpoint written at the end of such an epoch holds the
        estimate, and the resumed run starts after it."""
        if epoch not in self.transition_epochs:
            return None
        k = self.transition_epochs.index(epoch)
        return k if k or self.transition.source == WARMUP_SOURCE else None

    def _epoch_kind(self) -> str:
        t = self.cfg.train
        kinds = ([f"class-balanced, at most {t.max_per_class} a class"] if t.max_per_class else []) + \
            (["fixed length"] if t.steps_per_epoch else [])
        return f" ({', '.join(kinds)})" if kinds else ""

    def _announce(self) -> None:
        if not self.ctx.is_main:
            return
        n = self.data.train.index_range
        held = self.data.noisy_val_samples
        n_s = f"{n - held} train + {held} {split_words(NOISY_VAL)}" if held else f"{n} train"
        scored = " / ".join(f"{loader.num_samples} {split_words(name)}" for name, loader in self.data.evals.items())
        noise = self.data.noise
        noise_s = (f"{noise.type} {noise.rate:g} (actual {100 * noise.actual_rate:.2f}% wrong)"
                   if noise is not None else "given labels")
        print(f"jocor_ddp: {self.cfg.data.name} ({n_s} / {scored}), "
              f"{self.cfg.model.arch} pair, noise {noise_s}, {self.ctx.world_size} rank(s) on "
              f"{self.ctx.device.type}, global batch {self.cfg.train.batch_size}, "
              f"{self.data.train.steps_per_epoch} steps/epoch{self._epoch_kind()}, selection {self.cfg.selection}, "
              f"precision {self.precision}, step {self.step.describe()}", flush=True)
        if self.auto is not None:
            print(f"forget rate: auto ({self.forget.why}), estimated from the data at the end of epochs "
                  f"1-{self.auto.last_epoch + 1} (method.num_gradual), {self.auto.fallback:g} until then", flush=True)
        else:
            print(f"forget rate: tau {self.forget.tau:g} ({self.forget.why})", flush=True)
        if self.transition is not None:
            until = ""
            if self.transition.source == WARMUP_SOURCE:
                first, *refined = [e + 1 for e in self.transition_epochs]
                until = f"; estimated (anchor set) at the end of epoch {first}"
                if refined:
                    until += f", refined at the end of epoch{'s' * (len(refined) > 1)} {', '.join(map(str, refined))}"
            print(f"transition matrix: {self.transition.source}{until} (RUN/{TRANSITION})", flush=True)
