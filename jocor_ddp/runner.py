"""Running a sweep's runs on one machine: as many at once as there are slots.

A slot is a GPU (``runs_per_gpu`` runs share one), a group of ``gpus_per_run`` GPUs (a run
there is ``torchrun --standalone`` over them), or without GPUs one of ``procs`` CPU processes.
Each run is a child ``python -m jocor_ddp.train`` with the slot's ``CUDA_VISIBLE_DEVICES`` and a
fair share of the CPU threads, its output appended to ``RUN/sweep.log``. Finished runs are
skipped, unfinished ones continue (the trainer resumes from its newest checkpoint), a failed
run is reported and the others go on. SIGTERM or SIGINT stops the sweep: no run starts, the
running ones get SIGTERM and checkpoint on their own, and the same command later continues.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

from .grid import Run, SweepError, status


@dataclass(frozen=True)
class Slot:
    name: str
    env: dict = field(default_factory=dict)  # added to the child's environment
    gpus: tuple = ()

    def command(self, run: Run) -> list[str]:
        train = ["-m", "jocor_ddp.train", *run.train_args(), "log.progress=never"]
        if len(self.gpus) > 1:
            # --standalone: a rendezvous of its own on a free port, so packed runs never meet.
            return [sys.executable, "-m", "torch.distributed.run", "--standalone",
                    f"--nproc-per-node={len(self.gpus)}", *train]
        return [sys.executable, *train]


def visible_gpus() -> list[str]:
    """The GPUs this process may use: CUDA_VISIBLE_DEVICES when set, else all CUDA devices."""
    if "CUDA_VISIBLE_DEVICES" in os.environ:
        return [g for g in os.environ["CUDA_VISIBLE_DEVICES"].split(",") if g.strip()]
    import torch
    return [str(i) for i in range(torch.cuda.device_count())]


def make_slots(gpus: list[str], *, runs_per_gpu: int = 1, gpus_per_run: int = 1, procs: int = 1,
               cpus: Optional[int] = None) -> list[Slot]:
    """The slots of this machine: GPU groups times runs_per_gpu, or ``procs`` CPU slots."""
    for name, value in (("--runs-per-gpu", runs_per_gpu), ("--gpus-per-run", gpus_per_run), ("--procs", procs)):
        if value < 1:
            raise SweepError(f"{name}: must be at least 1, got {value}")
    cpus = cpus or os.cpu_count() or 1
    if gpus:
        if gpus_per_run > len(gpus):
            raise SweepError(f"--gpus-per-run {gpus_per_run}: only {len(gpus)} GPU(s) visible ({','.join(gpus)})")
        groups = [tuple(gpus[i:i + gpus_per_run]) for i in range(0, len(gpus) - gpus_per_run + 1, gpus_per_run)]
        threads = max(1, cpus // (len(groups) * runs_per_gpu))
        return [Slot(f"gpu {','.join(g)}" + (f" #{k + 1}" if runs_per_gpu > 1 else ""),
                     {"CUDA_VISIBLE_DEVICES": ",".join(g), "OMP_NUM_THREADS": str(threads)}, g)
                for g in groups for k in range(runs_per_gpu)]
    if gpus_per_run > 1:
        raise SweepError(f"--gpus-per-run {gpus_per_run}: no GPU is visible")
    threads = max(1, cpus // procs)
    # No GPU for a CPU slot, even where one exists: the run must not pick one up by itself.
    return [Slot(f"cpu {i + 1}", {"CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": str(threads)})
            for i in range(procs)]


@dataclass
class Outcome:
    run: Run
    state: str          # done, failed, stopped, skipped
    seconds: float = 0.0
    detail: str = ""


def _last_error(log: Path) -> str:
    """The child's own one-line reason: its last 'error' line, else its last line."""
    try:
        lines = [l.strip() for l in log.read_text(errors="replace").splitlines() if l.strip()]
    except OSError:
        return ""
    errors = [l for l in lines if l.startswith("error")]
    return (errors or lines or [""])[-1][:300]


class SweepRunner:
    def __init__(self, runs: list[Run], slots: list[Slot], say: Callable[[str], None] = print,
                 poll_s: float = 0.2):
        self.runs, self.slots, self.say, self.poll_s = runs, slots, say, poll_s
        self.stopping = 0  # the signal that asked to stop, 0 while none did
        self.running: dict[int, tuple[Run, subprocess.Popen, float, Path]] = {}

    def _on_signal(self, signum, frame) -> None:
        if not self.stopping:
            self.say(f"sweep: signal {signum}: no run starts now; the running ones checkpoint and stop")
        self.stopping = signum
        for _, proc, _, _ in self.running.values():
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)

    def _start(self, slot_index: int, run: Run, position: str) -> None:
        slot = self.slots[slot_index]
        run.dir.mkdir(parents=True, exist_ok=True)
        log = run.dir / "sweep.log"
        with open(log, "a") as out:
            out.write(f"--- sweep: {time.strftime('%Y-%m-%d %H:%M:%S')} on {slot.name}: "
                      f"{' '.join(slot.command(run))}\n")
            out.flush()
            proc = subprocess.Popen(slot.command(run), stdout=out, stderr=subprocess.STDOUT,
                                    env={**os.environ, **slot.env})
        self.running[slot_index] = (run, proc, time.monotonic(), log)
        self.say(f"sweep: {position} start {run.name} on {slot.name} (log {log})")

    def _finish(self, slot_index: int, code: int) -> Outcome:
        run, _, started, log = self.running.pop(slot_index)
        seconds = time.monotonic() - started
        now = status(run)
        if now.state == "finished":
            return Outcome(run, "done", seconds)
        if self.stopping:
            return Outcome(run, "stopped", seconds, f"{now.epochs_done}/{now.epochs} epochs; it continues "
                                                    f"from its checkpoint next time")
        return Outcome(run, "failed", seconds, f"exit code {code}: {_last_error(log)}")

    def run(self) -> list[Outcome]:
        outcomes: list[Outcome] = []
        pending = deque()
        for run in self.runs:
            now = status(run)
            if now.state == "finished":
                outcomes.append(Outcome(run, "skipped", detail="finished earlier"))
                self.say(f"sweep: skip {run.name} (finished)")
            else:
                pending.append((run, now))
        total, started = len(pending), 0
        handlers = {s: signal.signal(s, self._on_signal) for s in (signal.SIGTERM, signal.SIGINT)}
        try:
            while self.running or (pending and not self.stopping):
                for i in range(len(self.slots)):
                    if i not in self.running and pending and not self.stopping:
                        run, now = pending.popleft()
                        started += 1
                        resume = f", resuming at epoch {now.epochs_done + 1}" if now.state == "partial" else ""
                        self._start(i, run, f"[{started}/{total}]{resume}")
                time.sleep(self.poll_s)
                for i in list(self.running):
                    code = self.running[i][1].poll()
                    if code is not None:
                        outcome = self._finish(i, code)
                        outcomes.append(outcome)
                        extra = f": {outcome.detail}" if outcome.detail else ""
                        self.say(f"sweep: {outcome.state} {outcome.run.name} in {outcome.seconds:.0f} s{extra}")
        finally:
            for s, h in handlers.items():
                signal.signal(s, h)
        outcomes += [Outcome(run, "not started") for run, _ in pending]
        return outcomes
