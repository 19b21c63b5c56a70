"""Run a sweep (a grid of ordinary runs): ``python -m jocor_ddp.sweep SWEEP.yaml``.

The sweep file (``configs/sweeps/``; format in ``grid.py``) is validated whole before any run
starts. Then, on this machine, one run per visible GPU at a time (``--runs-per-gpu N`` packs N
small runs onto each GPU, ``--gpus-per-run G`` gives each run G GPUs under torchrun), or
without a GPU ``--procs N`` CPU processes. ``--list`` prints the runs with their index,
``--index I`` runs run I alone (what a Slurm array task calls: launch/sweep.sbatch), and
``--where AXIS=V1,V2`` keeps part of the grid. Rerunning the same command skips the finished
runs and continues the others. ``python -m jocor_ddp.report --sweep SWEEP.yaml`` makes the table.
"""

from __future__ import annotations

import argparse
import json
import sys
import time

from .grid import SweepError, load_sweep, status
from .job import FAILED, OK, guarded
from .runner import Slot, SweepRunner, make_slots, visible_gpus


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m jocor_ddp.sweep", description=__doc__.split("\n\n")[0],
                                epilog="Each run's output goes to RUN/sweep.log; see docs/methods.md, 'Sweeps'.")
    p.add_argument("sweep", metavar="SWEEP.yaml")
    p.add_argument("--list", action="store_true", help="print INDEX NAME STATUS for each run and exit")
    p.add_argument("--index", type=int, metavar="I", help="run only run I (of the list, after --where)")
    p.add_argument("--where", action="append", default=[], metavar="AXIS=V1,V2",
                   help="keep the runs with these axis values (repeatable; e.g. method.name=jocor,coteaching)")
    p.add_argument("--runs-per-gpu", type=int, default=1, metavar="N", help="runs at once on each GPU (default 1)")
    p.add_argument("--gpus-per-run", type=int, default=1, metavar="G", help="GPUs of each run, under torchrun (default 1)")
    p.add_argument("--procs", type=int, default=1, metavar="N", help="runs at once without a GPU (default 1)")
    p.add_argument("--gpus", metavar="LIST", help="the GPUs to use, e.g. 0,1,2,3 (default: all visible; "
                                                   "'none' runs on the CPU)")
    p.add_argument("--dry-run", action="store_true", help="print each run's slot, environment and command")
    return p.parse_args(argv)


def _say(msg: str) -> None:
    print(msg, flush=True)


def run_sweep(args: argparse.Namespace) -> int:
    sweep = load_sweep(args.sweep)
    runs = sweep.select(args.where)
    if args.index is not None:
        if not 0 <= args.index < len(runs):
            raise SweepError(f"--index {args.index}: the sweep has runs 0..{len(runs) - 1}")
        runs = [runs[args.index]]
    if args.list:
        for i, run in enumerate(runs):
            print(f"{args.index if args.index is not None else i}\t{run.name}\t{status(run)}")
        return OK
    gpus = [] if args.gpus == "none" else (args.gpus.split(",") if args.gpus else visible_gpus())
    if args.index is not None:
        # An array task runs in the allocation it was given: its GPUs as they are.
        slots = [Slot("this task", {}, tuple(gpus[:args.gpus_per_run]) if gpus else ())]
    else:
        slots = make_slots(gpus, runs_per_gpu=args.runs_per_gpu, gpus_per_run=args.gpus_per_run, procs=args.procs)
    if args.dry_run:
        for k, run in enumerate(runs):
            slot = slots[k % len(slots)]
            print(json.dumps({"index": run.index, "name": run.name, "slot": slot.name, "env": slot.env,
                              "command": slot.command(run)}))
        return OK
    _say(f"sweep: {sweep.path}: {len(runs)} run(s) in {sweep.dir}, {len(slots)} at a time "
         f"({', '.join(s.name for s in slots)})")
    start = time.monotonic()
    outcomes = SweepRunner(runs, slots, _say).run()
    counts = {state: sum(o.state == state for o in outcomes)
              for state in ("done", "failed", "stopped", "skipped", "not started")}
    minutes, seconds = divmod(int(time.monotonic() - start), 60)
    _say("sweep: " + ", ".join(f"{n} {state}" for state, n in counts.items() if n or state in ("done", "failed"))
         + f" in {minutes} min {seconds} s")
    for o in outcomes:
        if o.state == "failed":
            _say(f"sweep: failed: {o.run.name}: {o.detail} (log: {o.run.dir / 'sweep.log'})")
    if counts["stopped"] or counts["not started"]:
        _say("sweep: stopped; run the same command again to continue")
    return FAILED if counts["failed"] else OK


def main(argv=None) -> int:
    return guarded(run_sweep, parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
