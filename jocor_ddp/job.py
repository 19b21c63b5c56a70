"""How every command ends, and a training job's start (train, estimate_noise): every command
(``python -m jocor_ddp.X``) runs its work through ``guarded``, so that a failure a user can act
on is one line per rank and an exit code, never a traceback or a hang. The exit codes, also in
docs/tools.md (#exit-codes):"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from typing import Callable, Optional

from .checkpoint import CheckpointError
from .config import Config, ConfigError, load_config
from .data import DataError
from .dist import DistContext, RemoteError, close_distributed, init_distributed
from .preemption import Preempted
from .registry import RegistryError
from .runfolder import RunFolderError
from .step import CaptureError, NonFiniteError

OK = 0          # done; also a job stopped by SIGTERM / SIGINT once its checkpoint is written
FAILED = 1      # an unexpected error (its traceback), or a sweep of which a run failed
BAD_INPUT = 2   # a bad argument, config, data, checkpoint or run folder; a failed check; a non-finite step
COLLECTIVE = 3  # a collective did not complete: a peer died, hangs or is unreachable (dist.timeout_s)
# The launchers (launch/*.sh) exit 128 + N when signal N stopped the job: 143 for SIGTERM.


class CommandError(RuntimeError):
    """A command cannot go on; the message says why and names the file."""


# Errors every rank reaches on the same input: each rank says it, none waits for the others.
EXPECTED = (CommandError, ConfigError, DataError, CheckpointError, RunFolderError, NonFiniteError, CaptureError,
            RemoteError, RegistryError)


# What torch's messages say when a collective did not complete.
COLLECTIVE_WORDS = ("Timed out", "timed out", "Connection closed", "Connection reset", "NCCL", "Gloo", "gloo")


def error_line(text: str) -> None:
    """One write for the whole line: the ranks share torchrun's stderr and often fail at the
    same moment (print's separate newline would let their lines interleave)."""
    sys.stderr.write(text + "\n")
    sys.stderr.flush()


@dataclass
class Started:
    """A job's rank and collective timeout once its distributed context exists: what its lines say."""
    ctx: Optional[DistContext] = None
    timeout_s: float = 0.0

    @property
    def who(self) -> str:
        return f" (rank {self.ctx.rank})" if self.ctx else ""


def guarded(body: Callable, *args, job: Optional[Started] = None) -> int:
    """Run ``body(*args)`` and return the exit code: the int it returns, else OK; one line and
    BAD_INPUT for an EXPECTED error, COLLECTIVE for a collective that did not complete; a
    preempted job has written its checkpoint: OK. Anything else is a bug: its traceback."""
    job = job or Started()
    try:
        code = body(*args)
        return code if isinstance(code, int) else OK
    except Preempted as exc:
        if job.ctx is None or job.ctx.is_main:
            print(f"jocor_ddp: {exc}; rerun the same command to continue", flush=True)
        return OK
    except EXPECTED as exc:
        error_line(f"error{job.who}: {exc}")
        return BAD_INPUT
    except RuntimeError as exc:
        if not any(w in str(exc) for w in COLLECTIVE_WORDS):
            raise
        timeout = f"; dist.timeout_s={job.timeout_s:g}" if job.ctx else ""
        error_line(f"error{job.who}: a collective did not complete (a peer died, hangs or is unreachable{timeout}): "
                   f"{str(exc).splitlines()[0]}")
        return COLLECTIVE
    finally:
        close_distributed()


def run_job(config: str | None, overrides: list[str], body: Callable[[Config, DistContext], None]) -> int:
    """Load the config, start the distributed context and run ``body(cfg, ctx)``, guarded."""
    job = Started()

    def start_and_run() -> None:
        cfg = load_config(config, overrides)
        job.ctx, job.timeout_s = init_distributed(cfg), cfg.dist.timeout_s
        body(cfg, job.ctx)
    return guarded(start_and_run, job=job)
