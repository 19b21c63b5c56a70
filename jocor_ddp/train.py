"""Train JoCoR: ``python -m jocor_ddp.train --config FILE [key=value ...]``, one process or
under ``torchrun --nproc_per_node=N``."""

from __future__ import annotations

import argparse
import sys

from .config import dump_config, load_config
from .job import CommandError, guarded, run_job
from .reference import config_reference, replace_reference
from .trainer import Trainer


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


def write_reference(target: str) -> None:
    if target == "-":
        print(config_reference(), end="")
        return
    try:
        replace_reference(target)
    except (OSError, ValueError) as exc:
        raise CommandError(f"--config-reference {target}: {exc}") from None
    print(f"{target}: config reference rewritten")


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.config_reference:
        return guarded(write_reference, args.config_reference)
    if args.print_config:
        return guarded(lambda: print(dump_config(load_config(args.config, args.overrides)), end=""))
    return run_job(args.config, args.overrides, lambda cfg, ctx: Trainer(cfg, ctx).fit())


if __name__ == "__main__":
    sys.exit(main())
