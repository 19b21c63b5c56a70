"""Train JoCoR: ``python -m jocor_ddp.train --config FILE [key=value ...]``, one process or
under ``torchrun --nproc_per_node=N``."""

from __future__ import annotations

import argparse
import sys

from .config import ConfigError, dump_config, load_config
from .data import DataError
from .dist import close_distributed, init_distributed
from .trainer import NonFiniteError, Trainer


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m jocor_ddp.train",
        description="Train a JoCoR network pair on noisy labels (one process, or DDP workers "
                    "started by torchrun).",
        epilog="Overrides are dotted keys, e.g. train.epochs=5 noise.rate=0.2 selection=local. "
               "See README.md for every key.")
    p.add_argument("--config", help="YAML config file (configs/*.yaml)")
    p.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    p.add_argument("overrides", nargs="*", metavar="key=value")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
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
        trainer = Trainer(cfg, ctx)
        trainer.fit()
        return 0
    except (ConfigError, DataError, NonFiniteError) as exc:
        # Every rank reaches the same verdict on the same input, so every rank says it.
        print(f"error (rank {ctx.rank}): {exc}", file=sys.stderr, flush=True)
        return 2
    finally:
        close_distributed()


if __name__ == "__main__":
    sys.exit(main())
