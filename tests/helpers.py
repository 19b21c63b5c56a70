"""Shared test helpers: generated data in the original formats, and real torchrun runs
under a timeout (a hang fails the test instead of freezing CI)."""

from __future__ import annotations

import gzip
import json
import os
import socket
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]
FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist")
# The real Fashion-MNIST (apt-get install dataset-fashion-mnist; tests/run.sh installs it).
HAVE_FASHION_MNIST = FASHION_MNIST.is_dir()
needs_fashion_mnist = pytest.mark.skipif(not HAVE_FASHION_MNIST, reason="dataset-fashion-mnist is not installed "
                                         "(tests/run.sh installs it)")
# metrics.jsonl fields that measure time: they differ between otherwise identical runs.
TIME_FIELDS = {"epoch_s", "samples_per_s", "eval_s", "estimate_s"}


def metric_rows(run_dir: Path, *, keep_time: bool = False) -> list[dict]:
    """A run's metrics.jsonl rows, time fields aside (what equal runs must share), or whole
    with keep_time=True. The one reader of metrics.jsonl in the tests."""
    rows = [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]
    if keep_time:
        return rows
    return [{k: v for k, v in row.items() if k not in TIME_FIELDS} for row in rows]


def train_args(data: Path | None, run_dir: Path, *overrides: str, config: str | None = None,
               entry: tuple[str, ...] = ("-m", "jocor_ddp.train")) -> list[str]:
    """The one training command line of the tests, for run_torchrun / run_python:
    ``ENTRY [--config CONFIG] [data.name=mnist data.root=DATA] log.progress=never run.dir=RUN_DIR
    OVERRIDES...`` (the overrides last: they win over the defaults here). ``data=None`` leaves the
    dataset to the config; ``entry`` names another script that takes the same overrides, and
    ``entry=()`` gives the overrides alone, for load_config in the test's own process."""
    return [*entry, *(["--config", config] if config else []),
            *(["data.name=mnist", f"data.root={data}"] if data is not None else []),
            "log.progress=never", f"run.dir={run_dir}", *overrides]


def method_args(name: str) -> list[str]:
    """``method.name=NAME`` and what that method cannot train without: the true transition
    matrix where its registry entry reads method.transition (F-correction)."""
    from jocor_ddp.registry import get_method
    return [f"method.name={name}", *(["method.transition=true"] if "transition" in get_method(name).uses else [])]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def child_env(**extra: str) -> dict:
    env = dict(os.environ)
    env.setdefault("OMP_NUM_THREADS", "1")
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    env.update(extra)
    return env


def run_torchrun(nproc: int, args: list[str], *, timeout: float = 180, env: dict | None = None,
                 extra_torchrun: list[str] | None = None, check: bool = True) -> subprocess.CompletedProcess:
    """``torchrun --nproc_per_node=nproc -m ARGS...`` on loopback, killed after ``timeout``."""
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}",
           "--master_addr=127.0.0.1", f"--master_port={free_port()}", *(extra_torchrun or []), *args]
    proc = subprocess.run(cmd, cwd=REPO, env=env or child_env(), capture_output=True, text=True,
                          timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} exited {proc.returncode}\n--- stdout\n{proc.stdout[-4000:]}"
                             f"\n--- stderr\n{proc.stderr[-6000:]}")
    return proc


def run_python(args: list[str], *, timeout: float = 180, env: dict | None = None,
               check: bool = True) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, *args], cwd=REPO, env=env or child_env(),
                          capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"{args} exited {proc.returncode}\n--- stdout\n{proc.stdout[-4000:]}"
                             f"\n--- stderr\n{proc.stderr[-6000:]}")
    return proc


def write_idx(path: Path, array: np.ndarray) -> None:
    """Write an IDX file (gzipped when the name ends in .gz), the MNIST format."""
    codes = {np.dtype(np.uint8): 0x08}
    header = struct.pack(">BBBB", 0, 0, codes[array.dtype], array.ndim)
    header += struct.pack(f">{array.ndim}I", *array.shape)
    data = header + array.tobytes()
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "wb") as f:
        f.write(data)


def make_mnist(root: Path, n_train: int = 512, n_test: int = 200, *, gz: bool = True,
               seed: int = 0, side: int = 28) -> Path:
    """A learnable MNIST-format set: each class is a noisy template image."""
    rng = np.random.default_rng(seed)
    templates = rng.integers(0, 256, size=(10, side, side))
    root.mkdir(parents=True, exist_ok=True)
    ext = ".gz" if gz else ""
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        labels = rng.integers(0, 10, size=n).astype(np.uint8)
        images = np.clip(templates[labels] * 0.7 + rng.integers(0, 77, size=(n, side, side)), 0, 255).astype(np.uint8)
        write_idx(root / f"{prefix}-images-idx3-ubyte{ext}", images)
        write_idx(root / f"{prefix}-labels-idx1-ubyte{ext}", labels)
    return root


def make_cifar(root: Path, *, classes: int = 10, n_train_per_batch: int = 40, n_test: int = 50,
               seed: int = 0) -> Path:
    """CIFAR-10 / CIFAR-100 python pickles in their release layout."""
    import pickle
    rng = np.random.default_rng(seed)
    if classes == 10:
        folder = root / "cifar-10-batches-py"
        folder.mkdir(parents=True, exist_ok=True)
        for i in range(1, 6):
            batch = {b"batch_label": f"training batch {i} of 5".encode(),
                     b"labels": rng.integers(0, 10, n_train_per_batch).tolist(),
                     b"data": rng.integers(0, 256, (n_train_per_batch, 3072), dtype=np.uint8),
                     b"filenames": [f"img_{i}_{j}.png".encode() for j in range(n_train_per_batch)]}
            (folder / f"data_batch_{i}").write_bytes(pickle.dumps(batch))
        test = {b"batch_label": b"testing batch 1 of 1", b"labels": rng.integers(0, 10, n_test).tolist(),
                b"data": rng.integers(0, 256, (n_test, 3072), dtype=np.uint8)}
        (folder / "test_batch").write_bytes(pickle.dumps(test))
        meta = {b"label_names": [n.encode() for n in ["airplane", "automobile", "bird", "cat", "deer",
                                                       "dog", "frog", "horse", "ship", "truck"]]}
        (folder / "batches.meta").write_bytes(pickle.dumps(meta))
    else:
        folder = root / "cifar-100-python"
        folder.mkdir(parents=True, exist_ok=True)
        for split, n in (("train", 5 * n_train_per_batch), ("test", n_test)):
            d = {b"fine_labels": rng.integers(0, 100, n).tolist(), b"coarse_labels": rng.integers(0, 20, n).tolist(),
                 b"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8)}
            (folder / split).write_bytes(pickle.dumps(d))
        (folder / "meta").write_bytes(pickle.dumps({b"fine_label_names": [f"class{i}".encode() for i in range(100)],
                                                    b"coarse_label_names": [f"super{i}".encode() for i in range(20)]}))
    return folder


def fake_bin(folder: Path, scripts: dict[str, str]) -> Path:
    """A folder of executable stand-ins (srun, scontrol, python, ...) to put first on PATH."""
    folder.mkdir(parents=True, exist_ok=True)
    for name, text in scripts.items():
        (folder / name).write_text(text)
        (folder / name).chmod(0o755)
    return folder
