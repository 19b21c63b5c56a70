"""The training step: one global batch through both networks, the method's loss and
small-loss selection, one backward pass, Adam, and the epoch's accounting.

The step is written so that a CUDA graph can hold all of it (``train.cuda_graph``):

- its inputs live in static device buffers. Data resident on the device (the memory
  source, the shard cache) is gathered inside the step from the epoch's order and a
  device step counter; a streamed batch's uint8 pixels, indices and crops are copied into
  fixed buffers before each step; either way the pixels are cropped, flipped and made
  floats inside the step (``data/place.py``);
- what changes between epochs (the share to remember, the epoch, the learning rate) is a
  device tensor updated in place, never a Python number, which a capture would freeze;
- the epoch's accumulators (kept counts, loss sum, the audit's kept flags, the first
  non-finite step) are device tensors updated in place;
- nothing reads a device value on the host, and no shape depends on the data.

The same code runs eagerly on CPU and wherever a capture is not possible, so the CPU tests
exercise exactly what a GPU replays. ``tests/test_step.py`` records the dispatched ops of
consecutive steps to keep it that way.
"""

from __future__ import annotations

import dataclasses
import itertools
from contextlib import nullcontext
from typing import Iterable, Optional

import torch

from .config import ConfigError, MethodConfig, TrainConfig
from .data import Batch, ResidentTrainLoader, StreamedTrainLoader, TrainLoader
from .dist import DistContext, all_reduce_sum
from .faults import FaultInjector
from .methods import EpochValues, MethodStep, get_method
from .methods.selection import Selector
from .registry import get_method as method_entry

# Eager steps before the capture: Adam's state, cuBLAS / cuDNN handles and torch.compile's
# kernels are created lazily on first use, and a capture must find them all in place.
WARMUP_STEPS = 3
# Steps between host syncs when train.sync_every is left to auto on CUDA: each sync drains
# the GPU's queue, so it is paid once every this many steps (a SIGTERM waits at most as long).
CUDA_SYNC_EVERY = 50


class NonFiniteError(RuntimeError):
    """A loss or gradient became NaN or infinite."""


class CaptureError(RuntimeError):
    """train.cuda_graph=true, and the step cannot be captured."""


def resolve_precision(requested: str, device: torch.device) -> str:
    if requested != "auto":
        return requested
    if device.type == "cuda" and torch.cuda.is_bf16_supported():
        return "bf16"
    return "fp32"


def autocast(precision: str, device: torch.device):
    """The precision's autocast region (none for fp32). No weight-cast cache: its entries
    would not outlive a CUDA graph capture, and each weight is cast once per step anyway."""
    if precision in ("bf16", "fp16"):
        dtype = torch.bfloat16 if precision == "bf16" else torch.float16
        return torch.autocast(device.type, dtype=dtype, cache_enabled=False)
    return nullcontext()


def resolve_sync_every(train: TrainConfig, device: torch.device) -> int:
    """train.sync_every, with auto (null) = 1 where a sync costs nothing (CPU) or the verdict
    is needed at once (on_nonfinite=skip), else CUDA_SYNC_EVERY."""
    if train.sync_every is not None:
        return train.sync_every
    return 1 if device.type != "cuda" or train.on_nonfinite == "skip" else CUDA_SYNC_EVERY


def build_optimizer(params, lr: float, device: torch.device) -> tuple[torch.optim.Optimizer, Optional[torch.Tensor]]:
    """One Adam over both networks, as the reference. Fused (one kernel per step) and with
    the learning rate as a device tensor, so that a graph replays each epoch's lr; returns
    (optimizer, that tensor). The fused CUDA kernel reads a float32 lr; on the CPU a float64
    lr gives exactly the numbers a Python float gives. Where this torch cannot (no fused Adam
    on this device, no tensor lr), a plain Adam with a float lr and no tensor: the step then
    stays eager."""
    params = list(params)
    lr_t = torch.tensor(lr, dtype=torch.float32 if device.type == "cuda" else torch.float64, device=device)
    try:
        return torch.optim.Adam(params, lr=lr_t, fused=True, capturable=True), lr_t
    except (RuntimeError, TypeError, ValueError):
        return torch.optim.Adam(params, lr=lr), None


def detached(out: MethodStep) -> MethodStep:
    """The step's outputs without the autograd graph: kept past the step (``TrainStep.last``),
    the graph's nodes would meet the next step's backward on another stream (the warm-up's)."""
    return dataclasses.replace(out, loss=out.loss.detach())


class KeptHistory:
    """Which training samples updated a network: this epoch's flags (filled by the step, in
    place) and, per sample, bit j set = kept in the j-th most recent finished epoch (16 at
    most). Identical on every rank: built from all-gathered indices. For the audit."""

    def __init__(self, num_samples: int, device: torch.device):
        self.kept = torch.zeros(num_samples, dtype=torch.uint8, device=device)
        self.bits = torch.zeros(num_samples, dtype=torch.int64, device=device)
        self.epochs = 0

    def roll(self) -> None:
        """At an epoch's end: its flags become bit 0."""
        self.bits = ((self.bits << 1) | self.kept.long()) & 0xFFFF
        self.epochs = min(self.epochs + 1, 16)
        self.kept.zero_()

    def state_dict(self) -> dict:
        return {"bits": self.bits.cpu(), "epochs": self.epochs, "kept": self.kept.cpu()}

    def load_state_dict(self, state: dict) -> None:
        # A checkpoint of another training split (a changed data.train_subset) has no history here.
        if state.get("bits") is not None and state["bits"].shape == self.bits.shape:
            self.bits.copy_(state["bits"])
            self.kept.copy_(state["kept"])
            self.epochs = state["epochs"]


class EpochCounters:
    """An epoch's accounting, kept on the device and read once at its end. They travel in
    mid-epoch checkpoints, so that a resumed epoch reports what an uninterrupted one would."""

    def __init__(self, kept: torch.Tensor, device: torch.device):
        # kept, kept with a known clean label, kept and clean (integers, in float64)
        self.counts = torch.zeros(3, dtype=torch.float64, device=device)
        # the sum over steps of the batch objective (the same on every rank)
        self.loss_sum = torch.zeros((), dtype=torch.float64, device=device)
        # per training sample: kept by some network this epoch (KeptHistory.kept, for the audit)
        self.kept = kept
        # (global step, kind: 1 loss / 2 gradient, position in the global batch) of the first
        # non-finite step not yet reported; -1 while all is well. Read at sync points.
        self.first_bad = torch.full((3,), -1, dtype=torch.int64, device=device)
        self.trained_steps = 0   # host: the host decides which steps run
        self.skipped_steps = 0

    def start_epoch(self) -> None:
        """In place: a captured step keeps adding to these very tensors."""
        self.counts.zero_()
        self.loss_sum.zero_()
        self.trained_steps = self.skipped_steps = 0

    def add(self, batch: Batch, out: MethodStep, sel: Selector) -> None:
        kept = out.kept_local  # (sets, b): label precision pools the kept sets
        known = batch.clean >= 0
        self.counts.add_(torch.stack([kept.sum(), (kept & known).sum(),
                                      (kept & known & (batch.y == batch.clean)).sum()]))
        self.loss_sum.add_(out.objective.double())
        # Which training samples updated a network this epoch; a scatter, not boolean indexing.
        self.kept.scatter_reduce_(0, sel.gather(batch.idx), out.kept_global.any(0).to(torch.uint8), reduce="amax")

    def note_bad(self, record: torch.Tensor) -> None:
        self.first_bad.copy_(torch.where(self.first_bad[0] < 0, record, self.first_bad))

    def state_dict(self, ctx: DistContext) -> dict:
        """Totals over all ranks (a collective): integers in float64, so the sum is exact
        and a resume with another world size continues the same totals."""
        return {"counts": all_reduce_sum(ctx, self.counts.clone()).cpu(), "loss_sum": self.loss_sum.cpu(),
                "trained_steps": self.trained_steps, "skipped_steps": self.skipped_steps}

    def load_state_dict(self, state: dict, ctx: DistContext) -> None:
        # The totals of all ranks: rank 0 carries them on, the others start from zero.
        self.counts.copy_(state["counts"] if ctx.is_main else torch.zeros(3, dtype=torch.float64))
        self.loss_sum.copy_(state["loss_sum"])
        self.trained_steps, self.skipped_steps = state["trained_steps"], state["skipped_steps"]


class IndexFeed:
    """Data resident on the device: the step gathers its batch from the epoch's order with a
    device step counter, so a replayed graph needs nothing from the host between steps."""

    def __init__(self, loader: ResidentTrainLoader, device: torch.device):
        self.loader = loader
        self.plan: Optional[dict] = None  # the epoch's device tensors (order, crops), fixed shapes
        self.position = torch.zeros((), dtype=torch.int64, device=device)

    def begin_epoch(self, epoch: int, start_step: int) -> None:
        plan = self.loader.epoch_plan(epoch, start_step)
        if self.plan is None:
            self.plan = plan
        else:  # in place: a captured step reads these very tensors
            for key, value in plan.items():
                self.plan[key].copy_(value)
        self.position.fill_(start_step)

    def steps(self, epoch: int, start_step: int) -> Iterable[None]:
        return itertools.repeat(None, self.loader.steps_per_epoch - start_step)

    def load(self, item: None) -> None:
        pass

    def batch(self) -> Batch:
        batch = self.loader.gather(self.plan, self.position)
        self.position.add_(1)
        return batch

    error = None  # resident data was decoded before training: nothing can go wrong per step


class CopyFeed:
    """Streamed data: each batch's uint8 pixels, indices and crop parameters are copied into
    fixed device buffers; the step gathers the labels and places the pixels from them."""

    def __init__(self, loader: StreamedTrainLoader):
        self.loader = loader
        self.buffers = loader.buffers()

    def begin_epoch(self, epoch: int, start_step: int) -> None:
        pass

    def steps(self, epoch: int, start_step: int) -> Iterable:
        return self.loader.items(epoch, start_step)

    def load(self, item) -> None:
        self.loader.load(item, self.buffers)

    def batch(self) -> Batch:
        return self.loader.gather(self.buffers)

    @property
    def error(self) -> Optional[str]:
        """A bad input this rank met since the epoch began, raised at the next sync point."""
        return self.loader.error


def capture_blocker(train: TrainConfig, ctx: DistContext, tensor_lr: bool) -> Optional[str]:
    """Why this run's step cannot be captured, or None when it can."""
    if ctx.device.type != "cuda":
        return "the training device is not CUDA"
    if ctx.world_size > 1:
        # PyTorch can capture DDP's NCCL all-reduce (warm-up inside a side stream, async
        # error handling off), but that path has not been verified here on several GPUs.
        return (f"{ctx.world_size} ranks: only a one-process step is captured (several ranks run the "
                f"same sync-free step eagerly)")
    if train.on_nonfinite == "skip":
        return "train.on_nonfinite=skip reads every step's verdict on the host before the update"
    if not tensor_lr:
        return f"this torch ({torch.__version__}) has no fused Adam with a tensor learning rate on {ctx.device.type}"
    return None


class TrainStep:
    """The step and everything it owns: optimizer, scaler, the epoch's values, input feed,
    counters and, on CUDA, the captured graph."""

    def __init__(self, train: TrainConfig, method: MethodConfig, selection: str, ctx: DistContext,
                 model: torch.nn.Module, pair: torch.nn.Module, loader: TrainLoader, history: KeptHistory,
                 precision: str, memory_format: torch.memory_format):
        self.train_cfg, self.ctx = train, ctx
        self.model, self.pair = model, pair
        self.params = list(pair.parameters())
        self.precision = precision
        self.memory_format = memory_format
        dev = ctx.device
        self.optimizer, self.lr = build_optimizer(self.params, train.lr, dev)
        self.optimizer_flags = {k: self.optimizer.defaults[k] for k in ("fused", "capturable", "foreach")}
        self.scaler = torch.amp.GradScaler(dev.type, enabled=precision == "fp16")
        self.method_entry = method_entry(method.name)
        self.method = get_method(method.name, method)
        self.selector = Selector(selection, ctx)
        self.values = EpochValues.on(dev)
        self.counters = EpochCounters(history.kept, dev)
        self.feed = IndexFeed(loader, dev) if loader.resident else CopyFeed(loader)
        # The global step on the device, for the non-finite record; the host keeps its own.
        self.device_step = torch.zeros((), dtype=torch.int64, device=dev)
        self.global_step = 0
        self.skipped_steps = 0  # over the whole run
        self.skip_nonfinite = train.on_nonfinite == "skip"
        self.faults = FaultInjector(ctx.rank)
        # The nan fault multiplies the logits by a device scalar set before each step (1, or
        # NaN on the chosen step), so that it reaches a replayed graph too.
        self.nan_gate = torch.ones((), device=dev) if self.faults.has("nan") else None
        self.last: Optional[tuple[Batch, MethodStep]] = None  # the latest step's batch and outputs

        blocker = capture_blocker(train, ctx, self.lr is not None)
        wanted = train.cuda_graph
        if wanted is True and blocker:
            raise ConfigError(f"train.cuda_graph: true, but the step cannot be captured: {blocker}")
        self.capture = wanted is not False and blocker is None
        self.not_captured = "train.cuda_graph=false" if wanted is False else blocker
        self.graph: Optional[torch.cuda.CUDAGraph] = None
        self.graph_beta1: Optional[float] = None
        self.eager_steps = 0
        self.side_stream = torch.cuda.Stream(dev) if self.capture else None

    @property
    def captured(self) -> bool:
        return self.graph is not None

    def describe(self) -> str:
        """One phrase for the start-up line."""
        if self.capture:
            return f"cuda graph (captured after {WARMUP_STEPS} eager steps)"
        return f"eager ({self.not_captured})" if self.ctx.device.type == "cuda" else "eager"

    # --- between steps (host) ---------------------------------------------------------

    def begin_epoch(self, epoch: int, start_step: int, *, lr: float, beta1: float, forget_rate: float,
                    counters: Optional[dict] = None) -> None:
        """Point the step at epoch ``epoch``, step ``start_step``: every change in place."""
        self.values.set(forget_rate, epoch)
        for group in self.optimizer.param_groups:
            if self.lr is not None:
                self.lr.fill_(lr)
                group["lr"] = self.lr  # also after a checkpoint's state_dict replaced it
            else:
                group["lr"] = lr
            group["betas"] = (beta1, 0.999)
        if self.graph is not None and beta1 != self.graph_beta1:
            # The fused kernel takes beta1 as a number (a tensor beta1 is read with .item()),
            # so its graph holds the old value; beta1 changes once a run (0.9 -> 0.1 at
            # train.epoch_decay_start): capture once more, at the next step.
            self.graph = None
        self.feed.begin_epoch(epoch, start_step)
        self.device_step.fill_(self.global_step)
        if counters is not None:
            self.counters.load_state_dict(counters, self.ctx)
        else:
            self.counters.start_epoch()

    def end_epoch(self) -> None:
        self.skipped_steps += self.counters.skipped_steps

    # --- checkpoints --------------------------------------------------------------------

    def state_dict(self, mid_epoch: bool) -> dict:
        """Optimizer, scaler, skipped steps and, ``mid_epoch``, the epoch's counters so far
        (totals over the ranks: a collective, on every rank)."""
        return {"optimizer": self.optimizer.state_dict(), "scaler": self.scaler.state_dict(),
                "skipped_steps": self.skipped_steps,
                "counters": self.counters.state_dict(self.ctx) if mid_epoch else None}

    def load_state_dict(self, state: dict) -> Optional[dict]:
        """Everything but the epoch's counters, which ``begin_epoch`` takes; returns them.

        The optimizer's loaded tensors are new, so a graph captured before would update the
        old ones: capture again. A checkpoint may come from another Adam (an older version,
        another device): the loaded param groups carry its flags, so this step's own flags
        come back, with the step counts where they need to be (on the parameters' device,
        for the fused kernel)."""
        self.optimizer.load_state_dict(state["optimizer"])
        self.scaler.load_state_dict(state["scaler"])
        self.skipped_steps = state["skipped_steps"]
        self.graph = None
        for group in self.optimizer.param_groups:
            group.update(self.optimizer_flags)
        if self.lr is not None:
            for param_state in self.optimizer.state.values():
                if "step" in param_state:
                    param_state["step"] = param_state["step"].to(device=self.ctx.device, dtype=torch.float32)
        return state["counters"]

    @torch.no_grad()
    def reinitialise(self, fresh: torch.nn.Module) -> None:
        """Restart from ``fresh``'s weights and buffers and an Adam that has taken no step,
        every change in place: a captured graph holds pointers to the parameters and to
        Adam's state (step counts included). A zeroed state is a fresh Adam's: its first
        update increments the step to 1 before the bias correction, as a new one's does."""
        mine, new = self.pair.state_dict(), fresh.state_dict()
        if list(mine) != list(new):
            raise ValueError("reinitialise: the fresh pair has other tensors than the trained one")
        for key, tensor in mine.items():
            tensor.copy_(new[key])
        for param_state in self.optimizer.state.values():
            for value in param_state.values():
                if torch.is_tensor(value):
                    value.zero_()

    def run(self, item: Optional[Batch] = None) -> None:
        """One training step on ``item`` (a streamed batch; None for resident data)."""
        self.faults.before_step(self.global_step)
        if self.nan_gate is not None:
            self.nan_gate.fill_(float("nan") if self.faults.fires("nan", self.global_step) else 1.0)
        self.feed.load(item)
        if self.graph is not None:
            self.graph.replay()
            self.counters.trained_steps += 1
        elif self.capture and self.eager_steps >= WARMUP_STEPS:
            self._capture_and_replay()
        else:
            self._eager()
        self.global_step += 1

    # --- the step (device only) -----------------------------------------------------

    def _forward_backward(self) -> tuple[Batch, MethodStep, torch.Tensor]:
        self.model.train()
        batch = self.feed.batch()
        x = batch.x.contiguous(memory_format=self.memory_format) if batch.x.dim() == 4 else batch.x
        with autocast(self.precision, self.ctx.device):
            logits1, logits2 = self.model(x)
        if self.nan_gate is not None:
            logits1 = logits1 * self.nan_gate
        out = self.method(logits1, logits2, batch.y, self.values, self.selector)
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(out.loss).backward()
        if self.scaler.is_enabled():
            self.scaler.unscale_(self.optimizer)
        record = self._nonfinite_record(out)
        self.device_step.add_(1)
        return batch, out, record

    def _nonfinite_record(self, out: MethodStep) -> torch.Tensor:
        """(step, kind, position) of a non-finite loss or gradient in this step, else -1s.
        Every rank reaches the same record: the losses were all-gathered and the gradients
        all-reduced before this point."""
        dev = out.checked.device
        bad_columns = ~torch.isfinite(out.checked).all(0)
        loss_bad = bad_columns.any()
        if self.scaler.is_enabled():
            grad_bad = torch.zeros((), dtype=torch.bool, device=dev)  # inf gradients are the scaler's job
        else:
            grads = [p.grad for p in self.params if p.grad is not None]
            norms = torch._foreach_norm(grads) if grads else [torch.zeros((), device=dev)]
            grad_bad = ~torch.isfinite(torch.stack(norms)).all()
        kind = torch.where(loss_bad, 1, torch.where(grad_bad, 2, 0))
        record = torch.stack([self.device_step, kind, torch.argmax(bad_columns.to(torch.uint8))])
        return torch.where(loss_bad | grad_bad, record, -1)

    def _update(self, batch: Batch, out: MethodStep) -> None:
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.counters.add(batch, out, self.selector)

    def _body(self) -> tuple[Batch, MethodStep]:
        """The whole step, as captured: the non-finite record is kept for the next sync point."""
        batch, out, record = self._forward_backward()
        self.counters.note_bad(record)
        self._update(batch, out)
        return batch, detached(out)

    # --- eager, capture, replay -----------------------------------------------------

    def _eager(self) -> None:
        # Warm-up steps for a capture run on a side stream, as PyTorch's CUDA graph notes ask.
        stream = torch.cuda.stream(self.side_stream) if self.side_stream is not None else nullcontext()
        if self.side_stream is not None:
            self.side_stream.wait_stream(torch.cuda.current_stream(self.ctx.device))
        with stream:
            if self.skip_nonfinite:
                self._eager_with_verdict()
            else:
                self.last = self._body()
                self.counters.trained_steps += 1
        if self.side_stream is not None:
            torch.cuda.current_stream(self.ctx.device).wait_stream(self.side_stream)
        self.eager_steps += 1

    def _eager_with_verdict(self) -> None:
        """train.on_nonfinite=skip: the verdict is read now (one host sync) and a bad step
        updates nothing."""
        batch, out, record = self._forward_backward()
        step, kind, pos = record.tolist()
        if kind < 0:
            self._update(batch, out)
            self.counters.trained_steps += 1
            self.last = (batch, detached(out))
            return
        self.optimizer.zero_grad(set_to_none=True)
        if self.scaler.is_enabled():
            self.scaler.update()  # backs the scale off; the next step may unscale again
        self.counters.skipped_steps += 1
        if self.ctx.is_main:
            print(f"warning: {self.describe_bad(step, kind, pos)}: step skipped (train.on_nonfinite=skip)",
                  flush=True)

    def _capture_and_replay(self) -> None:
        graph = torch.cuda.CUDAGraph()
        self.optimizer.zero_grad(set_to_none=True)  # backward then allocates .grad from the graph's pool
        scaler_state = self.scaler.state_dict() if self.scaler.is_enabled() else None
        try:
            # thread_local: the GPU decoder's feeder thread may call CUDA while this captures.
            with torch.cuda.graph(graph, capture_error_mode="thread_local"):
                outputs = self._body()
        except Exception as exc:  # a speed feature never ends a run: say why, train eagerly
            cause = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
            if self.train_cfg.cuda_graph is True:
                raise CaptureError(f"train.cuda_graph: true, but capturing the step failed: {cause}") from exc
            if self.ctx.is_main:
                print(f"warning: cuda graph: capturing the step failed ({cause}); training eagerly", flush=True)
            self.capture, self.not_captured = False, f"capture failed: {cause}"
            self.side_stream = None
            self.optimizer.zero_grad(set_to_none=True)
            if scaler_state is not None:  # nothing ran, but the scaler noted an unscale
                self.scaler = torch.amp.GradScaler(self.ctx.device.type)
                self.scaler.load_state_dict(scaler_state)
            self._eager()
            return
        self.graph, self.graph_beta1 = graph, self.optimizer.param_groups[0]["betas"][0]
        self.last = outputs  # graph outputs: rewritten by every replay
        graph.replay()
        self.counters.trained_steps += 1

    # --- reporting --------------------------------------------------------------------

    def describe_bad(self, step: int, kind: int, pos: int) -> str:
        b = self.train_cfg.batch_size // self.ctx.world_size
        if kind == 1:
            what = f"non-finite {self.method_entry.loss_name} at rank {pos // b}, batch position {pos % b}"
        else:
            what = "non-finite gradient"
        epoch = int(self.values.epoch)
        return f"{what} in epoch {epoch + 1}, step {step} (global)"

    def raise_bad(self, step: int, kind: int, pos: int):
        raise NonFiniteError(f"{self.describe_bad(step, kind, pos)}, seen on rank {self.ctx.rank}; "
                             f"set train.on_nonfinite=skip to skip such steps")
