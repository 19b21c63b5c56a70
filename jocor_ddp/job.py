"""Running a training job under torchrun or in one process, for the commands that train
(train, estimate_noise): the distributed context made from the config, and every failure
a user can act on turned into one line per rank and an exit code, never a traceback or a
hang."""

from __future__ import annotations

import sys
from typing import Callable

from .checkpoint import CheckpointError
from .config import Config, ConfigError, load_config
from .data import DataError
from .dist import DistContext, RemoteError, close_distributed, init_distributed
from .preemption import Preempted
from .step import CaptureError, NonFiniteError

# Errors every rank reaches on the same input: each rank says it, none waits for the others.
EXPECTED = (ConfigError, DataError, NonFiniteError, CheckpointError, RemoteError, CaptureError)


def is_collective_failure(exc: BaseException) -> bool:
    text = str(exc)
    return any(s in text for s in ("Timed out", "timed out", "Connection closed", "Connection reset",
                                   "NCCL", "Gloo", "gloo"))


def error_line(text: str) -> None:
    """One write for the whole line: the ranks share torchrun's stderr and often fail at the
    same moment (print's separate newline would let their lines interleave)."""
    sys.stderr.write(text + "\n")
    sys.stderr.flush()


def run_job(config: str | None, overrides: list[str], body: Callable[[Config, DistContext], None]) -> int:
    """Load the config, start the distributed context and run ``body(cfg, ctx)``: exit code 0;
    2 for a bad config or input, a failed check or a non-finite step; 3 when a collective did
    not complete. A preempted job (SIGTERM, SIGINT) has written its checkpoint: 0."""
    try:
        cfg = load_config(config, overrides)
        ctx = init_distributed(cfg)
    except ConfigError as exc:
        error_line(f"error: {exc}")
        return 2
    try:
        body(cfg, ctx)
        return 0
    except Preempted as exc:
        if ctx.is_main:
            print(f"jocor_ddp: {exc}; rerun the same command to continue", flush=True)
        return 0
    except EXPECTED as exc:
        error_line(f"error (rank {ctx.rank}): {exc}")
        return 2
    except RuntimeError as exc:
        if not is_collective_failure(exc):
            raise
        error_line(f"error (rank {ctx.rank}): a collective did not complete (a peer died, hangs or is "
                   f"unreachable; dist.timeout_s={cfg.dist.timeout_s:g}): {str(exc).splitlines()[0]}")
        return 3
    finally:
        close_distributed()
