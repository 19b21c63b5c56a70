"""The chaos soak: one small real training job (2 ranks, gloo, CPU) hit from outside by faults
at random moments drawn from a seed, restarted after each as a scheduler would, until it
completes; then compared with the same job run without faults.

    python tests/chaos_soak.py --faults 50 --seed 1 --out /tmp/soak            # every kind
    python tests/chaos_soak.py --faults 20 --source stream --out /tmp/soak-stream
    python tests/chaos_soak.py --faults 6 --kinds kill_rank,term_launcher --out /tmp/s

Fault kinds (``KINDS``):
  kill_rank          SIGKILL of a random rank, mostly in the middle of a step; torchrun
                     (--max-restarts) restarts the worker group
  kill_ckpt_mid      SIGKILL of rank 0 in the middle of writing a checkpoint (the trainer's
  kill_ckpt_rename   write waits in a window the driver arms: jocor_ddp/faults.py), or between
                     the complete temporary file and its rename
  term_launcher      SIGTERM to torchrun, as a scheduler's preemption sends it; a new launch
  kill_launcher      SIGKILL of torchrun alone (start-up included): its workers must end by
                     themselves within ORPHAN_GRACE_S; a new launch on the same port
  corrupt_ckpt       the newest checkpoint truncated or one bit flipped between two launches
  stop_rank          SIGSTOP of a random rank: its peers must give up after dist.timeout_s
  disk_full          a file-size limit on rank 0 (RLIMIT_FSIZE: writes past it fail, as on a
                     full disk) before its next checkpoint; the write fails, the job exits and
                     torchrun restarts it without the limit
  resize             a new launch under 1 rank for a while, then 2 again (the memory source:
                     the shard stream refuses another world size mid-epoch)
Every launch uses train.resume=auto (the default). The verdict: every epoch's metrics row
present exactly once and, without resize, identical to the uninterrupted run's except time
fields, and its final checkpoint identical bit for bit (weights, optimizer, RNG states, every
counter); with resize, the checkpoint bit for bit where that holds (it did on this CPU: one
process and two ranks sum this MLP's gradients to the same bits), else what the docs promise
across world sizes (docs/checkpoints.md, Another world size): parameters within RESIZE_ATOL,
and the rows of every epoch present once, equal or not; every
checkpoint left in the folder readable, no temporary file left. A table of faults by kind
(injected, survived), restarts and wall time, and the verdict; OUT/soak.json holds it all.
Exit code 0 when the verdict holds."""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

TESTS = Path(__file__).resolve().parent
sys.path.insert(0, str(TESTS))
from helpers import REPO, TIME_FIELDS, child_env, free_port, make_mnist  # noqa: E402

sys.path.insert(0, str(REPO))
from jocor_ddp.checkpoint import list_checkpoints, load_checkpoint  # noqa: E402

KINDS = ("kill_rank", "kill_ckpt_mid", "kill_ckpt_rename", "term_launcher", "kill_launcher", "corrupt_ckpt",
         "stop_rank", "disk_full", "resize")
# An orphaned worker must be gone this soon after its launcher's SIGKILL.
ORPHAN_GRACE_S = 10.0
# Another world size sums the gradients in another order: parameters agree to rounding.
RESIZE_ATOL = 1e-4
# dist.timeout_s of the soak's job: how long the peers of a stopped rank wait.
TIMEOUT_S = 8
# Launches the job gets after the last fault to complete.
FINAL_LAUNCHES = 5
# In rank 0's start-up line (trainer._announce), printed by every start of the workers.
STARTED = " rank(s) on "


@dataclass
class Fault:
    kind: str
    launch: int
    at_s: float                    # seconds after its launch started
    survived: bool = False
    detail: str = ""


@dataclass
class Soak:
    out: Path
    overrides: list[str]
    epochs: int
    rng: random.Random
    world: int = 2
    port: int = field(default_factory=free_port)
    launches: int = 0
    faults: list[Fault] = field(default_factory=list)
    proc: subprocess.Popen | None = None
    started: float = 0.0
    log: Path | None = None
    seen: int = 0                  # training starts in this launch's log at the last fault

    @property
    def run_dir(self) -> Path:
        return self.out / "run"

    @property
    def chaos_dir(self) -> Path:
        return self.out / "chaos"

    # --- the job ---------------------------------------------------------------------------

    def launch(self, world: int | None = None) -> None:
        self.world = world or self.world
        self.launches += 1
        self.log = self.out / "logs" / f"launch-{self.launches:03d}-w{self.world}.log"
        self.log.parent.mkdir(parents=True, exist_ok=True)
        self.proc = subprocess.Popen(
            torchrun(self.world, self.port, [*self.overrides, f"run.dir={self.run_dir}"]), cwd=REPO,
            env=child_env(JOCOR_CHAOS_DIR=str(self.chaos_dir)), stdout=self.log.open("w"), stderr=subprocess.STDOUT,
            start_new_session=True)
        self.started, self.seen = time.monotonic(), 0

    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def wait(self, timeout: float = 120) -> int:
        return self.proc.wait(timeout=timeout)

    def complete(self) -> bool:
        return metrics_epochs(self.run_dir) == list(range(1, self.epochs + 1))

    def workers(self) -> dict[int, int]:
        """rank -> pid of the launcher's live workers."""
        found = {}
        for pid in children(self.proc.pid):
            rank = environ(pid).get("RANK")
            if rank is not None and alive(pid):
                found[int(rank)] = pid
        return found

    def stop_and_wait(self) -> None:
        """SIGTERM to the launcher (a preemption) and the launch's end."""
        if self.running():
            self.proc.send_signal(signal.SIGTERM)
        self.wait()

    def sleep_while_running(self, seconds: float) -> bool:
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            if not self.running():
                return False
            time.sleep(0.05)
        return True

    def some_worker(self, rank: int | None = None, within: float = 60) -> int | None:
        end = time.monotonic() + within
        while time.monotonic() < end and self.running():
            found = self.workers()
            if found:
                return found.get(rank) if rank is not None else found[self.rng.choice(sorted(found))]
            time.sleep(0.05)
        return None

    # --- the faults ------------------------------------------------------------------------

    def inject(self, kind: str) -> Fault | None:
        """One fault of ``kind`` into the running launch, at a random moment of its training
        (kill_launcher: half of them in the start-up, where the imports, the store and the
        data are); None where the launch ended first."""
        if kind == "kill_launcher" and self.rng.random() < 0.5:
            moment = self.sleep_while_running(self.rng.uniform(0.2, 3.0))
        else:
            moment = self.training() and self.sleep_while_running(self.rng.uniform(0.1, 2.0))
        if not moment:
            return None
        fault = Fault(kind, self.launches, round(time.monotonic() - self.started, 2))
        launch, before = self.launches, starts(self.log)
        fault = getattr(self, kind)(fault)
        if fault is not None and self.launches == launch:
            # The workers restart inside this launch: the next fault waits for a start after the
            # ones before this fault (the restart may have printed its own already). A new
            # launch has a new log, and launch() counted none.
            self.seen = before
        return fault

    def training(self, within: float = 180) -> bool:
        """Wait until the workers (re)started training since the last fault."""
        end = time.monotonic() + within
        while time.monotonic() < end and self.running():
            if starts(self.log) > self.seen:
                return True
            time.sleep(0.05)
        return False

    def kill_rank(self, fault: Fault) -> Fault | None:
        pid = self.some_worker()
        if pid is None:
            return None
        os.kill(pid, signal.SIGKILL)
        fault.survived = self.restarted_after(pid)
        return fault

    def kill_ckpt_mid(self, fault: Fault) -> Fault | None:
        return self._kill_in_window(fault, "mid")

    def kill_ckpt_rename(self, fault: Fault) -> Fault | None:
        return self._kill_in_window(fault, "rename")

    def _kill_in_window(self, fault: Fault, where: str) -> Fault | None:
        self.chaos_dir.mkdir(parents=True, exist_ok=True)
        for old in self.chaos_dir.glob("at-*"):
            old.unlink()
        arm = self.chaos_dir / f"arm-{where}"
        arm.touch()
        end = time.monotonic() + 120
        while time.monotonic() < end and self.running():
            hit = list(self.chaos_dir.glob(f"at-{where}-*"))
            if hit:
                pid = int(hit[0].name.rsplit("-", 1)[1])
                temporary = list((self.run_dir / "checkpoints").glob(".step-*.pt.tmp-*"))
                os.kill(pid, signal.SIGKILL)
                fault.detail = f"killed rank 0 (pid {pid}) with {len(temporary)} temporary file(s) on disk"
                fault.survived = self.restarted_after(pid)
                return fault
            time.sleep(0.05)
        arm.unlink(missing_ok=True)
        return None

    def term_launcher(self, fault: Fault) -> Fault:
        self.stop_and_wait()
        fault.detail = f"launcher exit {self.proc.returncode}"
        fault.survived = True  # judged by the verdict: the rows and the final state
        self.launch()
        return fault

    def kill_launcher(self, fault: Fault) -> Fault:
        workers = children(self.proc.pid)
        os.kill(self.proc.pid, signal.SIGKILL)
        self.proc.wait()
        start, gone = time.monotonic(), False
        while time.monotonic() - start < ORPHAN_GRACE_S:
            if not any(alive(pid) for pid in workers):
                gone = True
                break
            time.sleep(0.05)
        waited = time.monotonic() - start
        for pid in workers:  # never left running into the next launch, whatever happened
            if alive(pid):
                os.kill(pid, signal.SIGKILL)
        fault.survived = gone
        fault.detail = (f"{len(workers)} worker(s) ended {waited:.2f} s after the launcher" if gone else
                        f"ORPHANS: {len(workers)} worker(s) still alive {ORPHAN_GRACE_S:g} s after the launcher")
        self.launch()  # the same port and run folder
        return fault

    def corrupt_ckpt(self, fault: Fault) -> Fault | None:
        self.stop_and_wait()
        newest = list_checkpoints(self.run_dir / "checkpoints")
        if not newest:
            self.launch()
            return None
        path, data = newest[0], bytearray(newest[0].read_bytes())
        if self.rng.random() < 0.5:
            cut = self.rng.randrange(len(data))
            path.write_bytes(bytes(data[:cut]))
            fault.detail = f"{path.name} truncated to {cut} of {len(data)} bytes"
        else:
            pos = self.rng.randrange(len(data))
            data[pos] ^= 1 << self.rng.randrange(8)
            path.write_bytes(bytes(data))
            fault.detail = f"{path.name}: one bit flipped at byte {pos} of {len(data)}"
        self.launch()
        # find_resume's warning: the damaged file was refused and an older one tried.
        fault.survived = self.sleep_until_logged(self.log, f"{path.name}: ", 60, also="trying an older checkpoint")
        return fault

    def stop_rank(self, fault: Fault) -> Fault | None:
        pid = self.some_worker()
        if pid is None:
            return None
        os.kill(pid, signal.SIGSTOP)
        end = time.monotonic() + TIMEOUT_S + 90  # the peers' timeout, then torchrun's 30 s grace
        while time.monotonic() < end and alive(pid):
            time.sleep(0.1)
        if alive(pid):
            os.kill(pid, signal.SIGKILL)
            fault.detail = "the stopped rank was never ended"
            return fault
        fault.survived = True
        fault.detail = f"the stopped rank ended {time.monotonic() - self.started - fault.at_s:.1f} s after SIGSTOP"
        return fault

    def disk_full(self, fault: Fault) -> Fault | None:
        pid = self.some_worker(rank=0)
        if pid is None:
            return None
        limit = self.fsize_limit()
        try:
            resource.prlimit(pid, resource.RLIMIT_FSIZE, (limit, limit))
        except ProcessLookupError:
            return None
        end = time.monotonic() + 120
        while time.monotonic() < end and alive(pid):
            time.sleep(0.05)
        failed = any("cannot be written" in line and "File too large" in line
                     for line in self.log.read_text(errors="replace").splitlines())
        if not failed and self.complete():
            return None  # the job wrote no checkpoint after the limit: nothing was injected
        fault.survived = failed and not alive(pid)
        fault.detail = f"file size limit {limit} bytes on rank 0: its checkpoint write failed, the job exited"
        return fault

    def resize(self, fault: Fault) -> Fault | None:
        self.stop_and_wait()
        self.launch(world=1)
        self.sleep_while_running(self.rng.uniform(1.0, 4.0))
        fault.detail = "2 -> 1 -> 2 ranks"
        self.stop_and_wait()
        fault.survived = True  # judged by the verdict
        self.launch(world=2)
        return fault

    def restarted_after(self, pid: int, within: float = 120) -> bool:
        """Whether the launch went on after ``pid`` died: new workers, or the job's end."""
        end = time.monotonic() + within
        while time.monotonic() < end:
            if not self.running():
                return self.complete() or self.proc.returncode is not None
            if any(p != pid for p in self.workers().values()) and not alive(pid):
                return True
            time.sleep(0.05)
        return False

    def sleep_until_logged(self, log: Path, text: str, within: float, also: str = "") -> bool:
        """Whether a line of ``log`` holds ``text`` (and ``also``) within ``within`` seconds."""
        def found() -> bool:
            return any(text in line and also in line for line in log.read_text(errors="replace").splitlines())
        end = time.monotonic() + within
        while time.monotonic() < end:
            if found():
                return True
            if not self.running():
                return found()
            time.sleep(0.1)
        return False

    def fsize_limit(self) -> int:
        """Below a checkpoint's size, above every other file rank 0 writes to."""
        newest = list_checkpoints(self.run_dir / "checkpoints")
        others = [p.stat().st_size for p in [self.log, self.run_dir / "metrics.jsonl"] if p.exists()]
        size = newest[0].stat().st_size if newest else 1 << 22
        return max(size // 2, 4 * max(others, default=0), 1 << 16)


def starts(log: Path) -> int:
    """How often the workers of a launch started training: rank 0's start-up line."""
    return sum(STARTED in line for line in log.read_text(errors="replace").splitlines())


# --- processes, from /proc --------------------------------------------------------------------

def children(pid: int) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
                found.append(int(entry.name))
    return found


def environ(pid: int) -> dict[str, str]:
    try:
        raw = Path(f"/proc/{pid}/environ").read_bytes()
    except OSError:
        return {}
    return dict(item.split("=", 1) for item in raw.decode(errors="replace").split("\0") if "=" in item)


def alive(pid: int) -> bool:
    """Running, sleeping or stopped; not gone and not a zombie."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state not in ("Z", "X")


def torchrun(world: int, port: int, args: list[str]) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={world}", "--master_addr=127.0.0.1",
            f"--master_port={port}", "--max-restarts=100", "-m", "jocor_ddp.train", *args]


# --- the comparison ---------------------------------------------------------------------------

def metrics_epochs(run: Path) -> list[int]:
    path = run / "metrics.jsonl"
    if not path.exists():
        return []
    return [json.loads(line)["epoch"] for line in path.read_text().splitlines() if line.strip()]


def metric_rows(run: Path) -> list[dict]:
    return [{k: v for k, v in json.loads(line).items() if k not in TIME_FIELDS}
            for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]


def first_difference(a, b, path: str = "", atol: float = 0.0) -> str | None:
    """Where two checkpoints differ (None: nowhere); tensors bit for bit, or within atol."""
    if isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor):
        if a.shape != b.shape or a.dtype != b.dtype:
            return f"{path}: {a.dtype}{list(a.shape)} vs {b.dtype}{list(b.shape)}"
        if atol and a.is_floating_point():
            diff = (a - b).abs().max().item() if a.numel() else 0.0
            return None if diff <= atol else f"{path}: max |difference| {diff:.3g} > {atol:g}"
        return None if torch.equal(a, b) else f"{path}: tensors differ"
    if isinstance(a, dict) and isinstance(b, dict):
        if a.keys() != b.keys():
            return f"{path}: keys {sorted(map(str, a.keys() ^ b.keys()))} in one only"
        for k in a:
            found = first_difference(a[k], b[k], f"{path}/{k}", atol)
            if found:
                return found
        return None
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        if len(a) != len(b):
            return f"{path}: length {len(a)} vs {len(b)}"
        for i, (x, y) in enumerate(zip(a, b)):
            found = first_difference(x, y, f"{path}[{i}]", atol)
            if found:
                return found
        return None
    return None if a == b else f"{path}: {a!r} vs {b!r}"


def verdict(soak: Soak, reference: Path) -> tuple[list[str], str]:
    """What is wrong with the soaked job against the reference (empty: nothing), and what held."""
    problems, run = [], soak.run_dir
    epochs = metrics_epochs(run)
    if epochs != list(range(1, soak.epochs + 1)):
        problems.append(f"metrics.jsonl epochs {epochs}, expected 1..{soak.epochs} once each")
    resized = any(f.kind == "resize" for f in soak.faults)
    same_rows = metric_rows(run) == metric_rows(reference)
    if not same_rows and not resized:
        problems.append("the metrics rows differ from the uninterrupted run's")
    held = ""
    final, ref_final = list_checkpoints(run / "checkpoints"), list_checkpoints(reference / "checkpoints")
    if not final or final[0].name != ref_final[0].name:
        problems.append(f"final checkpoint {final[0].name if final else None}, expected {ref_final[0].name}")
    else:
        a, b = load_checkpoint(final[0]), load_checkpoint(ref_final[0])
        for drop in ("config", "versions"):  # run.dir differs; versions are the same package
            a.pop(drop, None), b.pop(drop, None)
        exact = first_difference(a, b)
        if exact is None:
            held = "final checkpoint bit-identical to the uninterrupted run's (weights, optimizer, RNG states, counters)"
        elif resized and first_difference(a["model"], b["model"], "", RESIZE_ATOL) is None:
            held = (f"final parameters within {RESIZE_ATOL:g} of the uninterrupted run's, the guarantee across "
                    f"world sizes (bit for bit it differs at {exact})")
        else:
            problems.append(f"final checkpoint differs from the uninterrupted run's at {exact}")
    if resized:
        held += "; metrics rows " + ("identical" if same_rows else "for every epoch, not all identical (another "
                                                                      "world size)")
    for path in list_checkpoints(run / "checkpoints"):
        try:
            load_checkpoint(path)
        except Exception as exc:  # noqa: BLE001 - any failure is a finding
            problems.append(f"unusable checkpoint left: {path.name}: {exc}")
    left = list((run / "checkpoints").glob(".step-*.tmp-*"))
    if left:
        problems.append(f"temporary files left: {[p.name for p in left]}")
    return problems, held


# --- the driver -------------------------------------------------------------------------------

def job_overrides(out: Path, source: str, epochs: int) -> list[str]:
    data = make_mnist(out / "data", n_train=2048, n_test=256)  # 64 steps, about 1 s an epoch here
    base = ["data.name=mnist", f"data.root={data}", "model.arch=mlp", "train.batch_size=32", f"train.epochs={epochs}",
            "checkpoint.every_steps=10", "checkpoint.keep=3", f"dist.timeout_s={TIMEOUT_S}", "log.progress=never",
            "train.resume=auto", "noise.rate=0.4"]
    if source == "stream":
        from jocor_ddp.prepare import prepare
        prepare("mnist", str(data), str(out / "shards"), shard_size=256)
        base += ["data.source=shards", f"data.shards={out / 'shards'}", "data.cache=stream", "data.num_workers=1"]
    return base


def plan(rng: random.Random, kinds: list[str], n: int) -> list[str]:
    """Every kind once in a random order, then random kinds: each kind is covered."""
    order = rng.sample(kinds, len(kinds))
    return (order + [rng.choice(kinds) for _ in range(max(0, n - len(kinds)))])[:n]


def run_soak(out: Path, faults: int, seed: int, kinds: list[str], source: str, epochs: int) -> dict:
    out.mkdir(parents=True, exist_ok=True)
    if source == "stream":
        kinds = [k for k in kinds if k != "resize"]  # refused mid-epoch by design (module docstring)
    overrides = job_overrides(out, source, epochs)
    start = time.monotonic()
    ref = out / "reference"
    ref_log = out / "logs" / "reference.log"
    ref_log.parent.mkdir(parents=True, exist_ok=True)
    with ref_log.open("w") as f:
        subprocess.run(torchrun(2, free_port(), [*overrides, f"run.dir={ref}"]), cwd=REPO, env=child_env(),
                       stdout=f, stderr=subprocess.STDOUT, timeout=1800, check=True)
    reference_s = time.monotonic() - start
    soak = Soak(out, overrides, epochs, random.Random(seed))
    todo = plan(soak.rng, kinds, faults)
    print(f"chaos soak: {faults} faults ({', '.join(sorted(set(todo)))}), seed {seed}, {source} source, "
          f"{epochs} epochs (uninterrupted: {reference_s:.0f} s)", flush=True)
    soak.launch()
    missed = 0
    while todo:
        if not soak.running():
            if soak.complete() and soak.proc.returncode == 0:
                break  # the job finished before the remaining faults: the plan was too long for it
            soak.launch()
        fault = soak.inject(todo[0])
        if fault is None:
            missed += 1
            if missed > 3 * faults:
                break
            continue
        todo.pop(0)
        soak.faults.append(fault)
        print(f"  fault {len(soak.faults):3d}: {fault.kind:16s} launch {fault.launch:3d} at {fault.at_s:5.2f} s  "
              f"{'ok' if fault.survived else 'NOT SURVIVED'}  {fault.detail}", flush=True)
    # The faults are done: the job must now finish, within a few launches (a job that fails at
    # every start is a finding, not a reason to relaunch it for ever).
    relaunches = 0
    while not soak.complete() and relaunches <= FINAL_LAUNCHES:
        if soak.running():
            soak.wait(timeout=1800)
        else:
            relaunches += 1
            soak.launch()
    if soak.running():
        soak.wait(timeout=600)
    wall = time.monotonic() - start
    problems, held = verdict(soak, ref)
    if not soak.complete():
        problems.insert(0, f"the job did not complete in {FINAL_LAUNCHES} launches after the last fault "
                           f"(logs: {out / 'logs'})")
    restarts = sum(max(0, starts(p) - 1) for p in (out / "logs").glob("launch-*.log"))
    by_kind = {k: {"injected": sum(f.kind == k for f in soak.faults),
                   "survived": sum(f.kind == k and f.survived for f in soak.faults)} for k in kinds}
    result = {"faults": len(soak.faults), "survived": sum(f.survived for f in soak.faults), "by_kind": by_kind,
              "not_injected": len(todo), "launches": soak.launches, "torchrun_restarts": restarts,
              "wall_s": round(wall, 1), "reference_s": round(reference_s, 1), "seed": seed, "source": source,
              "epochs": epochs, "problems": problems, "held": held,
              "ok": not problems and not todo and all(f.survived for f in soak.faults),
              "fault_log": [f.__dict__ for f in soak.faults]}
    (out / "soak.json").write_text(json.dumps(result, indent=1))
    print(table(result), flush=True)
    return result


def table(r: dict) -> str:
    lines = ["", "| fault | injected | survived |", "|---|---:|---:|"]
    lines += [f"| {k} | {v['injected']} | {v['survived']} |" for k, v in r["by_kind"].items()]
    lines += [f"| all | {r['faults']} | {r['survived']} |", "",
              f"launches {r['launches']} (the first and each relaunch), torchrun restarts {r['torchrun_restarts']}, "
              f"wall time {r['wall_s']:.0f} s (the uninterrupted run: {r['reference_s']:.0f} s)"]
    if r["not_injected"]:
        lines.append(f"NOT INJECTED: {r['not_injected']} planned fault(s): the job completed first (more epochs)")
    lines += [f"PROBLEM: {p}" for p in r["problems"]]
    lines.append(f"verdict: PASS: {r['faults']} faults injected at random, {r['survived']} survived; every epoch's "
                 f"metrics row once; {r['held']}" if r["ok"] else "verdict: FAIL")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--faults", type=int, default=50)
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--kinds", default=",".join(KINDS), help=f"a comma-separated subset of {', '.join(KINDS)}")
    p.add_argument("--source", choices=("memory", "stream"), default="memory")
    p.add_argument("--epochs", type=int, help="the job's epochs (default: enough for the faults)")
    p.add_argument("--out", required=True, help="a new folder for the data, the runs and the logs")
    args = p.parse_args(argv)
    kinds = [k for k in args.kinds.split(",") if k]
    unknown = [k for k in kinds if k not in KINDS]
    if unknown:
        p.error(f"--kinds: unknown {unknown}; the kinds are {', '.join(KINDS)}")
    epochs = args.epochs or max(6, 3 * args.faults)  # a fault costs 1-2 epochs: training till it, lost after it
    result = run_soak(Path(args.out), args.faults, args.seed, kinds, args.source, epochs)
    return 0 if result["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
