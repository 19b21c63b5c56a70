"""Atomic checkpoint files, and finding the one to resume from (what a file holds:
``state.TrainingState``).

A checkpoint counts only once complete: rank 0 writes a temporary file, flushes and
fsyncs it, renames it over ``RUN/checkpoints/step-N.pt`` and fsyncs the folder, so a
crash or a preemption mid-write leaves the previous checkpoints intact; a failed write (a
full disk) removes its temporary file, and the next write removes those of writers that
died. Files are read with ``torch.load(weights_only=True)``: a tampered checkpoint cannot
run code. Before that, every record's CRC-32 (torch.save writes them into the zip) is
checked: torch.load does not, and loads a copy with a flipped bit in its tensors as if it
were whole (the chaos soak and the fuzz both found it: a resume from such a file diverges
silently).
"""

from __future__ import annotations

import os
import pickle
import re
import sys
import warnings
import zipfile
from pathlib import Path
from typing import Any, Callable, Optional

import torch

from .faults import chaos_armed, checkpoint_window

CHECKPOINT_RE = re.compile(r"^step-(\d+)\.pt$")
TEMPORARY_RE = re.compile(r"^\.step-\d+\.pt\.tmp-(\d+)$")


class CheckpointError(RuntimeError):
    """A checkpoint cannot be used; the message names the file."""


class UnsafeCheckpointError(CheckpointError):
    """The file holds objects that only an unrestricted unpickler could build."""


def checkpoint_dir(run_dir: str | Path) -> Path:
    return Path(run_dir) / "checkpoints"


def list_checkpoints(folder: Path) -> list[Path]:
    """Complete checkpoints, newest (highest step) first."""
    if not folder.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in folder.iterdir() if (m := CHECKPOINT_RE.match(p.name))]
    return [p for _, p in sorted(found, reverse=True)]


def _fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # someone else's process
    return True


def remove_dead_temporaries(folder: Path) -> None:
    """The temporary files of writers killed mid-write: never a checkpoint, only space."""
    for p in folder.iterdir():
        if (m := TEMPORARY_RE.match(p.name)) and int(m.group(1)) != os.getpid() and not _alive(int(m.group(1))):
            p.unlink(missing_ok=True)


class _Writes:
    """The file torch.save writes through (it writes a file object through its ``write``
    anyway). It keeps the OSError of a failed write: torch.save reports a full disk as
    "unexpected pos", a RuntimeError that names no cause. Under the chaos soak it opens the
    ``mid`` window once the first bytes are written (faults.py)."""

    def __init__(self, f):
        self.f, self.error, self.window = f, None, chaos_armed()

    def write(self, data) -> int:
        try:
            n = self.f.write(data)
        except OSError as exc:
            self.error = exc
            raise
        if self.window:
            self.window = False
            self.f.flush()  # the partial file is on disk while the window is open
            checkpoint_window("mid")
        return n

    def flush(self) -> None:
        self.f.flush()


def save_checkpoint(state: dict, folder: Path, step: int, keep: int) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    remove_dead_temporaries(folder)
    final = folder / f"step-{step}.pt"
    tmp = folder / f".step-{step}.pt.tmp-{os.getpid()}"
    try:
        with open(tmp, "wb") as f:
            out = _Writes(f)
            try:
                torch.save(state, out)
            except RuntimeError:
                if out.error is None:
                    raise
                raise out.error from None
            f.flush()
            os.fsync(f.fileno())
        checkpoint_window("rename")
        os.replace(tmp, final)
    except BaseException:
        tmp.unlink(missing_ok=True)  # a full disk must not be kept full by a file that is no checkpoint
        raise
    _fsync_dir(folder)
    for old in list_checkpoints(folder)[keep:]:
        old.unlink(missing_ok=True)
    return final


def damaged_record(path: Path) -> Optional[str]:
    """The first record of a torch zip file whose CRC-32 does not match its bytes, or None.
    torch's reader does not check them: a flipped bit inside a tensor would load unnoticed."""
    if not zipfile.is_zipfile(path):
        return None  # not a zip (torch's legacy format, garbage): torch.load says what it is
    try:
        with zipfile.ZipFile(path) as zf:
            return zf.testzip()
    except Exception as exc:  # a damaged directory or header: zipfile's errors are of many kinds
        return f"the zip directory ({type(exc).__name__}: {exc})"


def load_weights_only(path: Path) -> Any:
    """``torch.load(weights_only=True)`` of a file its CRC-32s vouch for. Errors are one line
    that does not name the file (the caller does): CheckpointError, or UnsafeCheckpointError
    for a pickle that only a full unpickler could build."""
    bad = damaged_record(path)
    if bad is not None:
        raise CheckpointError(f"damaged: {bad} fails its CRC-32 check (a flipped bit or a partial copy)")
    try:
        with warnings.catch_warnings():
            # torch warns about a foreign pickle protocol before refusing the file: the refusal says it.
            warnings.simplefilter("ignore", UserWarning)
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        # weights_only refuses any global outside tensors and plain containers.
        lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
        detail = next((line for line in lines if "Unsupported" in line or "unsupported" in line), lines[-1])
        raise UnsafeCheckpointError(
            f"refused: it holds objects that only a full unpickler could build (they could run code), so "
            f"nothing in it was loaded or run. Detail: {detail}") from None
    except Exception as exc:  # truncated zip, bad magic, EOF, ...
        raise CheckpointError(f"cannot be read ({type(exc).__name__}: {(str(exc).splitlines() or [''])[0]})") from None


def load_checkpoint(path: str | Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path}: not found")
    try:
        state = load_weights_only(path)
    except UnsafeCheckpointError as exc:
        raise UnsafeCheckpointError(f"checkpoint {path} {exc}. Delete it unless you made it yourself.") from None
    except CheckpointError as exc:
        raise CheckpointError(f"checkpoint {path}: {exc}") from None
    if not isinstance(state, dict) or not isinstance(state.get("format"), int):
        raise CheckpointError(f"checkpoint {path}: not a jocor_ddp checkpoint (no format marker)")
    return state


def find_resume(resume: str, folder: Path, read: Callable[[Path], Any] = load_checkpoint) -> tuple[Optional[Path], Any]:
    """The checkpoint to continue from, and what ``read`` made of it: ``never`` -> none; a
    path -> that file (errors are fatal); ``auto`` -> the newest that reads, skipping
    unreadable ones with a warning. An unsafe file stops an auto resume too: falling back
    past a tampered file would hide it."""
    if resume == "never":
        return None, None
    if resume != "auto":
        return Path(resume), read(Path(resume))
    for path in list_checkpoints(folder):
        try:
            return path, read(path)
        except UnsafeCheckpointError:
            raise
        except CheckpointError as exc:
            print(f"warning: {exc}; trying an older checkpoint", file=sys.stderr, flush=True)
    return None, None


# --- RNG state as plain tensors and lists, so that weights_only can load it -------------

def rng_state() -> dict[str, Any]:
    import random

    import numpy as np
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state = {
        "python": list(random.getstate()[1]),
        "python_version": random.getstate()[0],
        "numpy": {"keys": torch.from_numpy(keys.astype("int64")), "pos": int(pos),
                  "has_gauss": int(has_gauss), "cached": float(cached)},
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    import random

    import numpy as np
    random.setstate((state["python_version"], tuple(state["python"]), None))
    n = state["numpy"]
    np.random.set_state(("MT19937", n["keys"].numpy().astype("uint32"), n["pos"], n["has_gauss"], n["cached"]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
