"""The chaos soak in CI (tests/chaos_soak.py: a real 2-rank job hit by one fault of each cheap
kind at random moments, ending bit-identical to the uninterrupted run), and one test for each
thing the soak found:

- workers orphaned by a launcher's SIGKILL went on (in the store's rendezvous for minutes, or
  training into the run folder the next launch uses): they now end with it;
- torch.load does not check the zip's CRC-32, so a checkpoint with a flipped bit in a tensor
  loaded as if whole and a resume from it diverged silently: load_checkpoint checks them (the
  fuzz found it too: its test is test_fuzz.py's test_a_flipped_bit_in_a_checkpoints_tensor_is_refused);
- a full disk during torch.save was a RuntimeError ("unexpected pos") naming no cause, so the
  trainer printed a traceback, and the temporary file stayed, keeping the disk full: the
  write now raises the OSError and removes its file, and later writes remove the files of
  writers that died."""

from __future__ import annotations

import os
import resource
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from chaos_soak import KINDS, alive, children, run_soak
from helpers import REPO, child_env, free_port

from jocor_ddp.checkpoint import save_checkpoint

# The short soak: every kind but stop_rank (its peers wait dist.timeout_s, then torchrun's own
# 30 s grace before it kills the stopped rank: the long soak has it).
SHORT_KINDS = [k for k in KINDS if k != "stop_rank"]


@pytest.mark.slow
def test_short_chaos_soak_ends_bit_identical(tmp_path):
    result = run_soak(tmp_path, faults=len(SHORT_KINDS), seed=7, kinds=SHORT_KINDS, source="memory",
                      epochs=3 * len(SHORT_KINDS))
    assert result["problems"] == [] and result["not_injected"] == 0, result
    assert result["faults"] == len(SHORT_KINDS) == result["survived"], result["fault_log"]
    assert all(v["injected"] == 1 for v in result["by_kind"].values())
    # Bit for bit; the resize's other world size may round differently on another CPU, and is
    # held to the documented guarantee there (parameters within chaos_soak.RESIZE_ATOL).
    assert result["held"].startswith(("final checkpoint bit-identical", "final parameters within")), result["held"]


WORKER = """
import os, sys, time
import jocor_ddp                      # first, as in python -m jocor_ddp.train
open(sys.argv[2] + "-started." + os.environ["RANK"], "w").close()
time.sleep(float(sys.argv[1]))        # importing torch and the rest takes this long
from jocor_ddp.config import load_config
from jocor_ddp.dist import init_distributed
init_distributed(load_config(None, ["dist.timeout_s=60"]))  # the trainer's start: the store, the group
open(sys.argv[2] + "." + os.environ["RANK"], "w").close()
time.sleep(120)                       # training, long after the launcher
"""


@pytest.mark.parametrize("launcher_dies", ["before the workers can ask", "after they asked"])
def test_workers_end_with_their_launcher(tmp_path, launcher_dies):
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    delay = 6.0 if launcher_dies.startswith("before") else 0.0
    marker = tmp_path / "asked"
    launcher = subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
                                 "--master_addr=127.0.0.1", f"--master_port={free_port()}", str(script), str(delay),
                                 str(marker)], cwd=REPO, env=child_env(), stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL, start_new_session=True)
    workers: list[int] = []
    try:
        end = time.monotonic() + 60
        while len(workers := children(launcher.pid)) < 2 and time.monotonic() < end:
            time.sleep(0.05)
        # Past `import jocor_ddp`: a launcher that dies before it is the blind window that
        # dist.die_with_launcher documents (the parent is then already the reaper).
        while len(list(tmp_path.glob("asked-started.*"))) < 2 and time.monotonic() < end:
            time.sleep(0.05)
        if delay == 0.0:
            while len(list(tmp_path.glob("asked.*"))) < 2 and time.monotonic() < end:
                time.sleep(0.05)
        assert len(workers) == 2
        launcher.send_signal(signal.SIGKILL)
        launcher.wait()
        end = time.monotonic() + delay + 15
        while any(alive(p) for p in workers) and time.monotonic() < end:
            time.sleep(0.05)
        assert not any(alive(p) for p in workers), f"orphaned workers still alive: {workers}"
        if delay:
            assert not list(tmp_path.glob("asked.*"))  # they ended instead of going on
    finally:  # orphans are no longer the launcher's children: kill them by their pids
        for p in set(workers + children(launcher.pid) + [launcher.pid]):
            if alive(p):
                os.kill(p, signal.SIGKILL)


def _checkpoint(tmp_path: Path) -> Path:
    state = {"format": 2, "model": {"w": torch.arange(4096, dtype=torch.float32)}, "epoch": 3}
    return save_checkpoint(state, tmp_path / "checkpoints", 7, keep=3)


def _save_under_a_file_size_limit(folder: str) -> None:
    resource.setrlimit(resource.RLIMIT_FSIZE, (20000, 20000))
    save_checkpoint({"format": 2, "w": torch.zeros(100000)}, Path(folder), 9, keep=3)


def test_a_full_disk_is_the_oserror_and_leaves_no_file(tmp_path):
    # In a child: the file-size limit must not outlive the test (Python ignores SIGXFSZ, so a
    # write past the limit fails with EFBIG, as a full disk fails with ENOSPC).
    folder = tmp_path / "checkpoints"
    proc = subprocess.run([sys.executable, "-c", "import sys; sys.path[:0] = sys.argv[1:3]; from test_chaos import "
                           "_save_under_a_file_size_limit as f; f(sys.argv[3])", str(Path(__file__).parent),
                           str(REPO), str(folder)], env=child_env(), capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1 and "OSError: [Errno 27] File too large" in proc.stderr, proc.stderr[-2000:]
    assert "unexpected pos" not in proc.stderr
    assert list(folder.iterdir()) == []


def test_a_dead_writers_temporary_file_is_removed_by_the_next_write(tmp_path):
    folder = tmp_path / "checkpoints"
    folder.mkdir()
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    stale = folder / f".step-4.pt.tmp-{int(dead.stdout)}"
    stale.write_bytes(b"half a checkpoint")
    live = folder / f".step-5.pt.tmp-{os.getppid()}"  # a writer still alive: left alone
    live.write_bytes(b"being written")
    _checkpoint(tmp_path)
    assert not stale.exists() and live.exists()
