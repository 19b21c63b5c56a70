"""Graceful stop on SIGTERM / SIGINT: the handler only raises a flag; the trainer checks
it between steps, all ranks agree on it (a reduced flag), write a checkpoint at that step
and exit 0, inside torchrun's 30-second grace period."""

from __future__ import annotations

import signal


class StopFlag:
    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self):
        self.signum: int | None = None
        self._previous = {}

    def install(self) -> "StopFlag":
        for sig in self.SIGNALS:
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame) -> None:
        if self.signum is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt  # a second Ctrl-C: stop now, without a checkpoint
        self.signum = signum

    @property
    def requested(self) -> bool:
        return self.signum is not None

    def restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()


class Preempted(Exception):
    """Raised once the stop checkpoint is written; the entry point exits 0."""
