"""Train JoCoR: ``python -m jocor_ddp.train --config FILE [key=value ...]``, one process or
under ``torchrun --nproc_per_node=N``."""

from __future__ import annotations

import argparse
import sys

from .checkpoint import CheckpointError
from .config import ConfigError, dump_config, load_config
from .data import DataError
from .dist import RemoteError, close_distributed, init_distributed
from .preemption import Preempted
from .reference import config_reference, replace_reference
from .step import CaptureError, NonFiniteError
from .trainer import Trainer

# Errors every rank reaches on the same input: each rank says it, none waits for the others.
EXPECTED = (ConfigError, DataError, NonFiniteError, CheckpointError, RemoteError, CaptureError)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m jocor_ddp.train",
        description="Train a JoCoR network pair on noisy labels (one process, or DDP workers "
                    "started by torchrun). Resumes from RUN/checkpoints by default.",
        epilog="Overrides are dotted keys, e.g. train.epochs=5 noise.rate=0.2 selection=local. "
               "docs/config.md lists every key.")
    p.add_argument("--config", help="YAML config file (configs/*.yaml)")
    p.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    p.add_argument("--config-reference", nargs="?", const="-", metavar="FILE",
                   help="print the table of every config key (type, default, allowed values, meaning), "
                        "generated from the code, and exit; with FILE, rewrite the table between its "
                        "markers in FILE (docs/config.md)")
    p.add_argument("overrides", nargs="*", metavar="key=value")
    return p.parse_args(argv)


def is_collective_failure(exc: BaseException) -> bool:
    text = str(exc)
    return any(s in text for s in ("Timed out", "timed out", "Connection closed", "Connection reset",
                                   "NCCL", "Gloo", "gloo"))


def write_reference(target: str) -> int:
    if target == "-":
        print(config_reference(), end="")
        return 0
    try:
        replace_reference(target)
    except (OSError, ValueError) as exc:
        error_line(f"error: --config-reference {target}: {exc}")
        return 2
    print(f"{target}: config reference rewritten")
    return 0


def error_line(text: str) -> None:
    """One write for the whole line: the ranks share torchrun's stderr and often fail at the
    same moment (print's separate newline would let their lines interleave)."""
    sys.stderr.write(text + "\n")
    sys.stderr.flush()


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.config_reference:
        return write_reference(args.config_reference)
    try:
        cfg = load_config(args.config, args.overrides)
        if args.print_config:
            print(dump_config(cfg), end="")
            return 0
        ctx = init_distributed(cfg)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr, flush=True)
        return 2
    try:
        Trainer(cfg, ctx).fit()
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


if __name__ == "__main__":
    sys.exit(main())
