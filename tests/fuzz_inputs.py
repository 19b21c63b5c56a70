"""What tests/test_fuzz.py needs besides its strategies: one command run in this process under a
time limit and judged (one clear line naming the thing, the documented exit code, no traceback),
run folders snapshotted and compared, and the tally of what was tried, printed at the end of the
session by conftest.py."""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import re
import signal
import time
import traceback
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable

from jocor_ddp.job import BAD_INPUT

# Examples per family: a CI-sized default, JOCOR_FUZZ_EXAMPLES for the long run.
EXAMPLES = int(os.environ.get("JOCOR_FUZZ_EXAMPLES", "0"))
LIMIT_S = 20.0  # one malformed input, start to error line; a hang fails its example
FAMILIES = {"config": "config", "labels": "labels", "shards": "shards", "checkpoints": "checkpoints",
            "arguments": "sweeps/arguments"}
OUTCOMES = ("clear", "traceback", "hang", "damaged", "unclear")
TALLY: dict[str, Counter] = {f: Counter() for f in FAMILIES}

# The lines besides the error that a command may print on stderr: argparse's usage, and the
# warning of an auto resume that passes over an unreadable checkpoint.
BENIGN = re.compile(r"^(usage:|\s|warning: )")
ERROR_LINE = re.compile(r"^(error( \(rank \d+\))?: |python -m jocor_ddp\.\w+: error: )")


def examples(default: int) -> int:
    return EXAMPLES or default


class Hang(Exception):
    """The input took longer than LIMIT_S."""


@contextlib.contextmanager
def time_limit(seconds: float):
    """SIGALRM raises Hang in this (the main) thread; a run stuck in C code raises it on return."""
    def on_alarm(signum, frame):
        raise Hang(f"no verdict after {seconds:g} s")
    previous = signal.signal(signal.SIGALRM, on_alarm)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


@dataclass
class Verdict:
    code: object
    stderr: str
    seconds: float
    outcome: str = "clear"
    why: str = ""
    argv: str = ""

    def __str__(self) -> str:
        return (f"{self.outcome}: {self.why} (exit {self.code}, {self.seconds:.1f} s)\n--- argv {self.argv[:500]}"
                f"\n--- stderr\n{self.stderr[-3000:]}")


def judge(code, stderr: str, seconds: float, names: Iterable[str]) -> Verdict:
    """A malformed input's end: exit BAD_INPUT, one error line that names one of ``names``,
    nothing else but usage and warnings; else the outcome that says what went wrong."""
    v = Verdict(code, stderr, seconds)
    lines = [line for line in stderr.splitlines() if line.strip()]
    errors = [line for line in lines if ERROR_LINE.match(line)]
    if "Traceback (most recent call last)" in stderr or code == 1:
        v.outcome, v.why = "traceback", "a traceback"
    elif code != BAD_INPUT:
        v.outcome, v.why = "unclear", f"exit {code}, not {BAD_INPUT}"
    elif len(errors) != 1 or any(line not in errors and not BENIGN.match(line) for line in lines):
        v.outcome, v.why = "unclear", f"{len(errors)} error lines among {len(lines)}"
    elif not any(n in errors[0] for n in names):
        v.outcome, v.why = "unclear", f"the line names none of {list(names)}"
    return v


def judge_ranks(stderr: str, returncode: int, names: Iterable[str], ranks: int = 2) -> list[Verdict]:
    """A torchrun job's end, one verdict per rank: its own line (``error (rank N): ``, or
    ``error: `` from a rank that failed before the process group existed) and the exit code
    torchrun reports for the first rank that failed (torchrun itself exits 1)."""
    lines = [line for line in stderr.splitlines() if ERROR_LINE.match(line)]
    root = re.search(r"Root Cause.*?exitcode\s*:\s*(-?\d+)", stderr, re.S)
    code = int(root.group(1)) if root else returncode
    if not any("(rank " in line for line in lines):  # one unlabelled line per process
        if len(lines) != ranks:
            return [Verdict(code, stderr, 0.0, "unclear", f"{len(lines)} error lines from {ranks} ranks")]
        return [judge(code, line, 0.0, names) for line in lines]
    return [judge(code, "\n".join(line for line in lines if line.startswith(f"error (rank {r}): ")), 0.0, names)
            for r in range(ranks)]


def call(main: Callable[[list[str]], int], argv: list[str], names: Iterable[str]) -> Verdict:
    """``main(argv)`` in this process, its stdout and stderr captured, judged."""
    err, out = io.StringIO(), io.StringIO()
    start = time.monotonic()
    try:
        with time_limit(LIMIT_S), contextlib.redirect_stderr(err), contextlib.redirect_stdout(out):
            code = main(argv)
    except SystemExit as exc:  # argparse
        code = exc.code
    except Hang as exc:
        return Verdict("-", err.getvalue(), time.monotonic() - start, "hang", str(exc))
    except Exception:
        err.write(traceback.format_exc())
        code = 1
    verdict = judge(code, err.getvalue(), time.monotonic() - start, names)
    verdict.argv = repr(argv)
    return verdict


def snapshot(run: Path) -> dict:
    """Every file's sha256 under ``run``, and its metrics rows."""
    files = {str(p.relative_to(run)): hashlib.sha256(p.read_bytes()).hexdigest()
             for p in sorted(run.rglob("*")) if p.is_file()}
    metrics = run / "metrics.jsonl"
    rows = [json.loads(line) for line in metrics.read_text().splitlines()] if metrics.is_file() else []
    return {"files": files, "rows": rows}


def damage(before: dict, after: dict, *, ignore: Iterable[str] = ()) -> str:
    """What a command did to a run folder that it must not: a file gone or changed (new files,
    such as evaluate's outputs, are fine), a metrics row lost. Empty when nothing."""
    gone = [f for f, h in before["files"].items() if f not in ignore and after["files"].get(f) != h]
    lost = before["rows"] != after["rows"][:len(before["rows"])]
    return "; ".join(filter(None, [gone and f"changed or deleted: {gone}", lost and "metrics rows lost"]))


def record(family: str, verdict: Verdict, damaged: str = "") -> None:
    """Count the input, then fail the example unless it ended as it must."""
    if damaged:
        verdict.outcome, verdict.why = "damaged", damaged
    TALLY[family]["tried"] += 1
    TALLY[family][verdict.outcome] += 1
    if verdict.outcome != "clear" and os.environ.get("JOCOR_FUZZ_LOG"):
        # Shrinking keeps one failure per test: the others it met are only here.
        with open(os.environ["JOCOR_FUZZ_LOG"], "a") as f:
            f.write(f"=== {family}: {verdict}\n")
    assert verdict.outcome == "clear", str(verdict)


def summary() -> str:
    """The session's line: "M malformed inputs tried (config A, ...): M clear errors, 0 tracebacks, ..."."""
    total = Counter()
    for counts in TALLY.values():
        total.update(counts)
    per = ", ".join(f"{label} {TALLY[f]['tried']}" for f, label in FAMILIES.items())
    line = (f"{total['tried']} malformed inputs tried ({per}): {total['clear']} clear errors, "
            f"{total['traceback']} tracebacks, {total['hang']} hangs, {total['damaged']} damaged run folders")
    return line + (f", {total['unclear']} unclear or wrong exit codes" if total["unclear"] else "")
