"""Fault injection for tests: ``JOCOR_FAULT=KIND:RANK:STEP[,KIND:RANK:STEP...]``.

KIND is ``crash`` (the rank kills itself with SIGKILL before that global step),
``sigterm`` (it sends itself SIGTERM, as a preempting scheduler would), ``hang`` (it
stops answering, so its peers wait in a collective) or ``nan`` (its logits turn NaN on
that step). Faults fire only in a job's first attempt
(TORCHELASTIC_RESTART_COUNT 0), so a job restarted by ``torchrun --max-restarts`` runs on.
Without the variable nothing here costs anything.

``JOCOR_CHAOS_DIR=DIR`` opens windows for the chaos soak (tests/chaos_soak.py), which kills
from outside the job: a checkpoint write that finds the file DIR/arm-WHERE (WHERE: ``mid``,
once the first bytes are in the temporary file; ``rename``, once that file is complete and
synced, before its rename) removes it, writes DIR/at-WHERE-PID and waits CHAOS_WINDOW_S
there. Without the variable it costs one lookup of the environment per checkpoint.
"""

from __future__ import annotations

import os
import signal
import time
from dataclasses import dataclass
from pathlib import Path

KINDS = ("crash", "sigterm", "hang", "nan")
CHAOS_DIR = "JOCOR_CHAOS_DIR"
# Long enough for a driver polling every 50 ms on a loaded machine to see the marker and kill.
CHAOS_WINDOW_S = 5.0


@dataclass(frozen=True)
class Fault:
    kind: str
    rank: int
    step: int


def parse_faults(text: str) -> list[Fault]:
    faults = []
    for item in filter(None, (t.strip() for t in text.split(","))):
        parts = item.split(":")
        if len(parts) != 3 or parts[0] not in KINDS:
            raise ValueError(f"JOCOR_FAULT: {item!r} is not KIND:RANK:STEP with KIND one of {KINDS}")
        faults.append(Fault(parts[0], int(parts[1]), int(parts[2])))
    return faults


class FaultInjector:
    def __init__(self, rank: int):
        active = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") == "0"
        self.faults = [f for f in parse_faults(os.environ.get("JOCOR_FAULT", "")) if f.rank == rank] if active else []

    def before_step(self, step: int) -> None:
        for f in self.faults:
            if f.step == step and f.kind == "crash":
                os.kill(os.getpid(), signal.SIGKILL)
            if f.step == step and f.kind == "sigterm":
                os.kill(os.getpid(), signal.SIGTERM)
            if f.step == step and f.kind == "hang":
                # Wedged, yet still ended by torchrun's SIGTERM when the peers give up.
                signal.signal(signal.SIGTERM, signal.SIG_DFL)
                while True:
                    time.sleep(3600)

    def has(self, kind: str) -> bool:
        return any(f.kind == kind for f in self.faults)

    def fires(self, kind: str, step: int) -> bool:
        """Whether a fault of ``kind`` is due at ``step`` (the step applies ``nan`` itself)."""
        return any(f.kind == kind and f.step == step for f in self.faults)


def chaos_armed() -> bool:
    return bool(os.environ.get(CHAOS_DIR))


def checkpoint_window(where: str) -> None:
    """Wait in the window WHERE of a checkpoint write if the soak armed it (module docstring)."""
    folder = os.environ.get(CHAOS_DIR)
    if not folder:
        return
    try:
        (Path(folder) / f"arm-{where}").unlink()
    except FileNotFoundError:
        return
    (Path(folder) / f"at-{where}-{os.getpid()}").touch()
    time.sleep(CHAOS_WINDOW_S)
