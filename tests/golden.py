"""The golden comparison: the numbers a run produces, from this tree against another commit's.

    .venv/bin/python tests/golden.py --base c9f7fb6      # run both, compare, exit 1 on a difference

A refactor must not change a single number a run writes. This runs a few short, real runs
(Fashion-MNIST at 50% symmetric noise in 1 process and on 2 ranks; the same with
method.forget_rate auto, a noisy validation split, Co-teaching+ and mid-epoch checkpoints;
a miniature Clothing1M release streamed from shards on 2 ranks, labels that came noisy)
in this tree and in a checkout of ``--base``, and compares their metrics.jsonl row for row,
time fields aside. It is a script, not a test: the runs take a few minutes on 2 cores.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from helpers import REPO, TIME_FIELDS, child_env, free_port  # noqa: E402
from shard_fixtures import clothing1m_shards  # noqa: E402

sys.path.insert(0, str(REPO))  # this tree's package, whatever the environment has installed
from jocor_ddp.runfolder import METRICS, read_metrics  # noqa: E402

FMNIST = ["--config", "configs/fashion_mnist_sym50.yaml", "data.train_subset=2000", "data.test_subset=500",
          "train.epochs=3", "train.batch_size=64", "log.progress=never"]


def scenarios(shards: Path) -> dict[str, tuple[int, list[str]]]:
    return {
        "fmnist_1proc": (1, FMNIST),
        "fmnist_2ranks": (2, FMNIST),
        # data.val_fraction: the earlier name of data.noisy_val_fraction, which both trees read.
        "fmnist_auto": (1, FMNIST + ["method.name=coteaching_plus", "method.init_epoch=1", "method.forget_rate=auto",
                                     "method.num_gradual=2", "data.val_fraction=0.1", "checkpoint.every_steps=7"]),
        "clothing1m_stream": (2, ["data.name=clothing1m", "data.source=shards", f"data.shards={shards}",
                                  "data.cache=stream", "data.num_workers=1", "data.resize_size=40",
                                  "data.crop_size=32", "noise.type=none", "noise.rate=0", "model.arch=mlp", "train.batch_size=16", "train.epochs=3",
                                  "method.num_gradual=2", "log.progress=never"]),
    }


def metric_rows(run_dir: Path) -> list[dict]:
    """A run's rows in this tree's names (runfolder.read_metrics renames an earlier version's),
    time fields aside."""
    return [{k: v for k, v in row.items() if k not in TIME_FIELDS} for row in read_metrics(run_dir / METRICS).rows]


def run_all(tree: Path, out: Path, shards: Path, reuse: bool = False) -> dict:
    results = {}
    for name, (nproc, args) in scenarios(shards).items():
        run_dir = out / name
        if reuse and (run_dir / "metrics.jsonl").is_file():  # --keep: the base's runs from an earlier call
            results[name] = metric_rows(run_dir)
            continue
        cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}",
               "--master_addr=127.0.0.1", f"--master_port={free_port()}", "-m", "jocor_ddp.train", *args,
               f"run.dir={run_dir}", "train.resume=never"]
        env = child_env()
        env["PYTHONPATH"] = str(tree)
        proc = subprocess.run(cmd, cwd=tree, env=env, capture_output=True, text=True, timeout=900)
        if proc.returncode:
            raise SystemExit(f"{name} in {tree} exited {proc.returncode}:\n{proc.stderr[-3000:]}")
        results[name] = metric_rows(run_dir)
        print(f"{tree.name}: {name}: {len(results[name])} epochs, last test acc {results[name][-1]['test_acc1']:.2f}",
              flush=True)
    return results


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--base", required=True, help="the commit to compare against")
    p.add_argument("--keep", metavar="DIR", help="work in DIR and keep it (default: a temporary folder)")
    args = p.parse_args()
    work = Path(args.keep or tempfile.mkdtemp(prefix="golden-"))
    work.mkdir(parents=True, exist_ok=True)
    shards = work / "clothing1m" / "shards"
    if not shards.is_dir():
        clothing1m_shards(work / "clothing1m", n_train=320, n_val=20, n_test=40, shard_size=40)
    base = work / "base"
    if not base.is_dir():
        subprocess.run(["git", "worktree", "add", "--detach", str(base), args.base], cwd=REPO, check=True,
                       capture_output=True)
    try:
        got = {"base": run_all(base, work / "runs-base", shards, reuse=bool(args.keep)),
               "this": run_all(REPO, work / "runs-this", shards)}
    finally:
        if not args.keep:
            subprocess.run(["git", "worktree", "remove", "--force", str(base)], cwd=REPO, capture_output=True)
    differ = 0
    for name in got["base"]:
        a, b = got["base"][name], got["this"][name]
        if a == b:
            print(f"same: {name} ({len(a)} rows)")
            continue
        differ += 1
        print(f"DIFFERENT: {name}")
        for i, (ra, rb) in enumerate(zip(a, b)):
            for k in sorted(set(ra) | set(rb)):
                if ra.get(k) != rb.get(k):
                    print(f"  epoch {i + 1} {k}: {args.base} {ra.get(k)!r} / this {rb.get(k)!r}")
        if len(a) != len(b):
            print(f"  rows: {len(a)} / {len(b)}")
    print(f"{len(got['base']) - differ} of {len(got['base'])} scenarios identical to {args.base}")
    return 1 if differ else 0


if __name__ == "__main__":
    sys.exit(main())
