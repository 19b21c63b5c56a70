"""Shards under real torchrun (2 ranks, gloo): each training sample once per epoch when
the shards divide evenly, equal step counts when they do not, evaluation scores every
test sample once, and every bad input stops every rank with an error naming the file
and the sample, within seconds.

This file is also the worker script: ``torchrun tests/test_stream_dist.py MODE SPEC``.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))  # helpers, when run by torchrun

from helpers import child_env, metric_rows, run_python, run_torchrun, train_args  # noqa: E402

WORKER = str(Path(__file__).resolve())


# --- the worker side (runs under torchrun) --------------------------------------------

def _hashes(x) -> list[str]:
    return [hashlib.sha1(row.cpu().numpy().tobytes()).hexdigest()[:16] for row in x]


def worker_epochs(spec: dict) -> None:
    """Per case: the sample indices of every step of two epochs, a resumed epoch, and a
    hash of every evaluation image this rank scored."""
    from jocor_ddp.config import load_config
    from jocor_ddp.data import build_data
    from jocor_ddp.dist import barrier, init_distributed
    for case in spec["cases"]:
        cfg = load_config(None, case["overrides"])
        ctx = init_distributed(cfg)
        bundle = build_data(cfg, ctx)
        epochs = [[b.idx.tolist() for b in bundle.train.epoch(e)] for e in (0, 1)]
        resumed = [b.idx.tolist() for b in bundle.train.epoch(1, start_step=3)]
        scored = [h for b in bundle.test for h in _hashes(b.x)]
        out = {"steps": bundle.train.steps_per_epoch, "epochs": epochs, "resumed": resumed, "scored": scored,
               "test_samples": bundle.test.num_samples - bundle.test.left_out}
        Path(spec["out"], f"{case['name']}-rank{ctx.rank}.json").write_text(json.dumps(out))
        barrier(ctx)


def worker_bad(spec: dict) -> None:
    """Per damaged folder: the error this rank raised and how long it took."""
    from jocor_ddp.config import load_config
    from jocor_ddp.data import DataError, build_data
    from jocor_ddp.dist import barrier, init_distributed
    results = {}
    ctx = None
    for case in spec["cases"]:
        cfg = load_config(None, case["overrides"])
        ctx = init_distributed(cfg)
        start = time.perf_counter()
        try:
            bundle = build_data(cfg, ctx)
            for _ in bundle.train.epoch(0):
                pass
            for _ in bundle.test:
                pass
            results[case["name"]] = {"error": None}
        except DataError as exc:
            results[case["name"]] = {"error": str(exc)}
        results[case["name"]]["seconds"] = time.perf_counter() - start
        barrier(ctx)  # every rank stopped at the same point, so every rank gets here
    Path(spec["out"], f"bad-rank{ctx.rank}.json").write_text(json.dumps(results))


def worker_main(argv: list[str]) -> int:
    mode, spec = argv[0], json.loads(argv[1])
    try:
        {"epochs": worker_epochs, "bad": worker_bad}[mode](spec)
    finally:
        from jocor_ddp.dist import close_distributed
        close_distributed()
    return 0


if __name__ == "__main__":
    sys.exit(worker_main(sys.argv[1:]))


# --- the tests ----------------------------------------------------------------------

from shard_fixtures import (clothing1m_shards, flip_byte, key, member_offset, mnist_shards,  # noqa: E402
                            rewrite_index, rewrite_sample, shard_of, undecodable_png)

pytestmark = pytest.mark.slow  # every test runs torchrun with 2 ranks
GLOO = ["dist.backend=gloo", "train.device=cpu"]


def shard_overrides(shards: Path, *extra: str, dataset: str = "mnist") -> list[str]:
    return [f"data.name={dataset}", "data.source=shards", f"data.shards={shards}", "train.batch_size=8",
            "noise.type=symmetric", "noise.rate=0.4", *GLOO, *extra]


def run_worker(tmp_path: Path, mode: str, cases: list[dict], timeout: float = 150) -> None:
    spec = json.dumps({"out": str(tmp_path), "cases": cases})
    run_torchrun(2, [WORKER, mode, spec], timeout=timeout)


def load(tmp_path: Path, name: str) -> list[dict]:
    return [json.loads((tmp_path / f"{name}-rank{r}.json").read_text()) for r in range(2)]


def test_two_ranks_two_workers_cover_each_sample_once(tmp_path):
    """Stream and device cache, evenly or unevenly sharded: each epoch one global permutation
    (each sample at most once, the last partial batch dropped), the two ranks' halves of step
    s are the one-process batch of step s, and a resumed epoch repeats the same batches."""
    even = mnist_shards(tmp_path / "even", n_train=96, n_test=30, shard_size=12)     # 8 shards
    uneven = mnist_shards(tmp_path / "uneven", n_train=100, n_test=30, shard_size=7)  # 15 shards, one of 2
    stream = ["data.cache=stream", "data.num_workers=2", "data.augment=true"]
    run_worker(tmp_path, "epochs", [
        {"name": "even", "overrides": shard_overrides(even, *stream)},
        {"name": "uneven", "overrides": shard_overrides(uneven, *stream)},
        {"name": "device", "overrides": shard_overrides(uneven, "data.cache=device", "data.num_workers=2",
                                                        "data.augment=true")},
    ])
    from jocor_ddp.config import load_config
    from jocor_ddp.data import build_data
    from jocor_ddp.dist import DistContext
    single = build_data(load_config(None, shard_overrides(uneven, "data.cache=device", "data.augment=true")),
                        DistContext())
    one_process = [b.idx.tolist() for b in single.train.epoch(1)]
    for name, n in (("even", 96), ("uneven", 100), ("device", 100)):
        ranks = load(tmp_path, name)
        steps = n // 8
        for r in ranks:
            assert r["steps"] == steps and all(len(e) == steps for e in r["epochs"])  # same steps on each rank
            assert all(len(b) == 4 for e in r["epochs"] for b in e)
            assert r["resumed"] == r["epochs"][1][3:]  # a resumed epoch repeats the same batches
        for e in (0, 1):
            seen = [i for r in ranks for b in r["epochs"][e] for i in b]
            assert len(set(seen)) == len(seen) == steps * 8 and set(seen) <= set(range(n))
        if name != "even":
            assert [a + b for a, b in zip(ranks[0]["epochs"][1], ranks[1]["epochs"][1])] == one_process
        # Evaluation: every test sample exactly once over the two ranks.
        scored = ranks[0]["scored"] + ranks[1]["scored"]
        assert len(scored) == len(set(scored)) == ranks[0]["test_samples"] == 30
    # The stream and the device cache score the same images (same hashes, same placement).
    assert sorted(load(tmp_path, "uneven")[0]["scored"] + load(tmp_path, "uneven")[1]["scored"]) == \
        sorted(load(tmp_path, "device")[0]["scored"] + load(tmp_path, "device")[1]["scored"])


def damaged_copies(tmp_path: Path) -> list[dict]:
    """One folder per bad input, with what its error must name."""
    clean = mnist_shards(tmp_path / "clean", n_train=96, n_test=30, shard_size=12)
    cases = []

    def case(name, *extra):
        folder = shutil.copytree(clean, tmp_path / name)
        cases.append({"name": name, "overrides": shard_overrides(folder, *extra), "dir": folder})
        return folder

    d = case("truncated")
    _, p = shard_of(d, "train", 30)
    p.write_bytes(p.read_bytes()[:9000])
    cases[-1]["expect"] = [str(p), "sample 000000"]
    d = case("corrupt")
    _, p = shard_of(d, "train", 30)
    off = member_offset(p, f"{key(26)}.png") - 512
    data = bytearray(p.read_bytes())
    data[off:off + 100] = b"\x07" * 100
    p.write_bytes(bytes(data))
    cases[-1]["expect"] = [str(p), f"sample {key(26)}"]
    d = case("missing")
    _, p = shard_of(d, "train", 60)
    p.unlink()
    cases[-1]["expect"] = [str(p), "missing", "samples"]
    d = case("sha256")
    _, p = shard_of(d, "train", 50)
    flip_byte(p, member_offset(p, f"{key(50)}.png") + 40)
    cases[-1]["expect"] = [str(p), "sha256", f"sample {key(50)}"]
    d = case("label")
    p = rewrite_sample(d, "train", 17, cls=12)
    cases[-1]["expect"] = [str(p), f"sample {key(17)}", "label 12"]
    d = case("image-device", "data.cache=device")
    p = rewrite_sample(d, "train", 40, image=undecodable_png())
    cases[-1]["expect"] = [str(p), f"sample {key(40)}", "does not decode"]
    # Streaming: only the rank whose worker reads the damaged shard meets it.
    d = case("image-stream", "data.cache=stream", "data.num_workers=2")
    p = rewrite_sample(d, "train", 40, image=undecodable_png())
    cases[-1]["expect"] = [str(p), f"sample {key(40)}", "does not decode"]
    # An index whose offset for one sample is wrong (manifest consistent): met while reading it.
    d = case("offsets-stream", "data.cache=stream", "data.num_workers=2")
    rows = np.load(d / "train-index.npy")
    rows["offset"][rows["idx"] == 40] += 512
    rewrite_index(d, "train", rows)
    cases[-1]["expect"] = [str(shard_of(d, "train", 40)[1]), f"sample {key(40)}", "image bytes at offset"]
    d = case("test-image-stream", "data.cache=stream", "data.num_workers=1")
    p = rewrite_sample(d, "test", 25, image=undecodable_png())
    cases[-1]["expect"] = [str(p), f"sample {key(25)}", "does not decode"]
    d = case("empty")
    m = json.loads((d / "manifest.json").read_text())
    m["splits"]["test"].update(samples=0, shards=[])
    (d / "manifest.json").write_text(json.dumps(m))
    cases[-1]["expect"] = [str(d / "manifest.json"), "split 'test' is empty"]
    d = case("no-manifest")
    (d / "manifest.json").unlink()
    cases[-1]["expect"] = [str(d / "manifest.json"), "not found"]
    case("ok", "data.cache=stream", "data.num_workers=5")  # more workers than shards per rank: fine
    cases[-1]["expect"] = None
    return cases


def test_every_bad_input_stops_every_rank_by_name(tmp_path):
    cases = damaged_copies(tmp_path)
    run_worker(tmp_path, "bad", [{"name": c["name"], "overrides": c["overrides"]} for c in cases])
    ranks = load(tmp_path, "bad")
    for c in cases:
        for rank, results in enumerate(ranks):
            got = results[c["name"]]
            if c["expect"] is None:
                assert got["error"] is None, got
                continue
            assert got["error"] is not None, f"{c['name']}: rank {rank} raised nothing"
            for part in c["expect"]:
                assert part in got["error"], f"{c['name']}, rank {rank}: {part!r} not in {got['error']!r}"
            assert got["seconds"] < 10, f"{c['name']}: rank {rank} took {got['seconds']:.1f}s"
    # Exactly one rank read the damaged streaming sample; the other says which rank did.
    for name in ("image-stream", "offsets-stream"):
        stream = [results[name]["error"] for results in ranks]
        assert sum(e.startswith("rank ") for e in stream) == 1, stream


def train_cli(tmp_path: Path, overrides: list[str], *, check: bool = True, timeout: float = 150):
    # torchrun stops the other ranks as soon as one exits; a 2 s watch lets both ranks,
    # which fail at the same step, print their own error first.
    return run_torchrun(2, train_args(None, tmp_path / "run", "train.epochs=2", "model.arch=mlp", "dist.timeout_s=60",
                                      *overrides),
                        timeout=timeout, check=check, env=child_env(), extra_torchrun=["--monitor-interval=2"])


def metrics(tmp_path: Path) -> list[dict]:
    return metric_rows(tmp_path / "run", keep_time=True)


def test_train_cli_streams_uneven_shards(tmp_path):
    shards = mnist_shards(tmp_path, n_train=100, n_test=30, shard_size=7)
    train_cli(tmp_path, shard_overrides(shards, "data.cache=stream", "data.num_workers=2", "train.batch_size=16"))
    rows = metrics(tmp_path)
    assert [r["epoch"] for r in rows] == [1, 2]
    assert all(r["steps"] == 100 // 16 and r["test_samples"] == 30 and r["bad_samples"] == 0 for r in rows)


def test_train_cli_clothing1m(tmp_path):
    shards, expected = clothing1m_shards(tmp_path, n_train=32, n_test=10, shard_size=4)
    overrides = shard_overrides(shards, "data.cache=stream", "data.num_workers=1", "data.resize_size=36",
                                "data.crop_size=32", "noise.type=none", "noise.rate=0", "method.forget_rate=0.2",
                                "model.arch=cnn", dataset="clothing1m")
    train_cli(tmp_path, overrides + ["train.epochs=1"])
    (row,) = metrics(tmp_path)
    assert row["steps"] == 32 // 8 and row["test_samples"] == len(expected["test"])
    assert row["label_precision"] is not None  # some training samples have clean labels


@pytest.mark.parametrize("cache", ["stream", "device"])
def test_train_cli_bad_image_error_and_skip(tmp_path, cache):
    shards = mnist_shards(tmp_path, n_train=96, n_test=30, shard_size=12)
    path = rewrite_sample(shards, "train", 40, image=undecodable_png())
    base = shard_overrides(shards, f"data.cache={cache}", "data.num_workers=2")
    start = time.perf_counter()
    proc = train_cli(tmp_path, base, check=False)
    assert proc.returncode != 0
    assert time.perf_counter() - start < 45  # well inside dist.timeout_s: nobody waited on a collective
    for rank in (0, 1):
        line = next((ln for ln in proc.stderr.splitlines() if ln.startswith(f"error (rank {rank}):")), None)
        assert line is not None, f"rank {rank} printed no error line:\n{proc.stderr[-3000:]}"
        assert str(path) in line and f"sample {key(40)}" in line
    shutil.rmtree(tmp_path / "run", ignore_errors=True)
    proc = train_cli(tmp_path, base + ["data.on_bad_sample=skip"])
    assert "skipped a bad sample" in proc.stderr or "left out 1 sample" in proc.stderr
    counts = [r["bad_samples"] for r in metrics(tmp_path)]
    # The device cache leaves the sample out once (counted each epoch); the stream meets it
    # once an epoch (each sample once: one global permutation).
    assert counts == [1, 1]
    # The audit scores every sample but the one left out, and says so.
    from jocor_ddp.checkpoint import list_checkpoints
    ckpt = list_checkpoints(tmp_path / "run" / "checkpoints")[0]
    audit = run_python(["-m", "jocor_ddp.audit", str(ckpt), "--shards", str(shards),
                        "--out", str(tmp_path / "audit.csv")])
    summary = json.loads((tmp_path / "audit.json").read_text())
    assert summary["samples"] == 95 and summary["left_out_bad"] == 1, audit.stdout
    rows = (tmp_path / "audit.csv").read_text().splitlines()[1:]
    assert len(rows) == 95 and all(r.split(",")[1] != "40" for r in rows)
