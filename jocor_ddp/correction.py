"""``method.transition``: the transition matrix F-correction corrects with, resolved once per
run, checked, kept in every checkpoint (``TrainingState.transition``) and written to
RUN/transition.json.

T[i, j] = P(noisy j | clean i), C x C for the data's C classes, float64 on the host. It comes
from a file (.json, .csv, .npy), is the matrix of the noise the config drew (``true``) or is
estimated inside the run (``auto``: the identity, "auto: warm-up", for method.warmup_epochs,
then ``transition.correction_estimate`` at the end of the last warm-up epoch and again at the
end of each of method.refine_rounds rounds of method.refine_epochs). The step reads it as log T
from one device buffer (``methods.EpochValues.set_transition``): the estimate is copied into
the same buffer, so a captured step reads it.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from .checkpoint import CheckpointError
from .config import TRANSITION_FILES, ConfigError, MethodConfig, true_transition_unknown
from .noise import NoiseInfo
from .registry import get_method

# A file's rows must sum to 1 within this, as read in float64 (six decimals written out, or a
# float32 matrix saved as such); they are then divided by their sums, so T's rows sum to 1 to
# float64 rounding.
ROW_SUM_TOLERANCE = 1e-6
# method.transition auto: the source of T before the estimate (the identity).
WARMUP_SOURCE = "auto: warm-up"


def estimate_source(epoch: int, refinement: int) -> str:
    """method.transition auto: the source of T estimated at the end of (0-based) ``epoch``, the
    first estimate (``refinement`` 0) or the k-th refinement."""
    return f"auto: anchor set, epoch {epoch + 1}" + (f" (refinement {refinement})" if refinement else "")


@dataclass
class Transition:
    """The run's T and where it came from."""
    matrix: np.ndarray  # float64 (C, C), rows summing to 1
    source: str         # for the start-up line, transition.json and checkpoints

    def state_dict(self) -> dict:
        return {"matrix": torch.from_numpy(self.matrix.copy()), "source": self.source}

    @classmethod
    def from_state(cls, state: dict) -> "Transition":
        return cls(state["matrix"].double().numpy().copy(), state["source"])

    def record(self) -> dict:
        """RUN/transition.json."""
        return {"source": self.source, "classes": len(self.matrix), "matrix": self.matrix.tolist()}

    def resumed(self, saved: dict, path: str) -> "Transition":
        """A checkpoint's T, which the resumed run uses; refused where this run's config gives
        another (the file changed under a running job)."""
        old = Transition.from_state(saved)
        if old.matrix.shape != self.matrix.shape:
            diff = f"{len(old.matrix)} classes against {len(self.matrix)}"
        elif not np.array_equal(old.matrix, self.matrix):
            i, j = np.unravel_index(np.argmax(np.abs(old.matrix - self.matrix)), self.matrix.shape)
            diff = f"row {i}, column {j}: {float(old.matrix[i, j])!r} against {float(self.matrix[i, j])!r}"
        else:
            return old
        raise CheckpointError(f"checkpoint {path} was trained with the transition matrix from {old.source}; "
                              f"method.transition now gives another ({self.source}; {diff}): restore what it "
                              f"was trained with, or start a new run.dir")


def resolve_transition(method: MethodConfig, noise_type: str, num_classes: int, noise: Optional[NoiseInfo],
                       labels_noisy: bool) -> Optional[Transition]:
    """The run's T where its method corrects with one (else None), from ``method.transition``
    and the data: its classes, the noise drawn (``noise``: None where none was) and whether
    the given labels came noisy. Errors name the key, the file and the row."""
    if "transition" not in get_method(method.name).uses:
        return None
    if method.transition == "auto":  # plain cross-entropy until the estimate
        return Transition(np.eye(num_classes), WARMUP_SOURCE)
    if method.transition is True:
        why = true_transition_unknown(noise_type, labels_noisy)
        if why is None and (noise is None or noise.transition is None):
            why = f"no matrix was recorded for noise.type {noise_type}"
        if why:
            raise ConfigError(f"method.transition: true: {why}")
        return Transition(np.array(noise.transition, dtype=np.float64),
                          f"true: the requested matrix of {noise.type} noise, rate {noise.rate:g}, seed {noise.seed}")
    return Transition(read_transition_file(method.transition, num_classes), f"file {method.transition}")


def read_transition_file(path: str, num_classes: int) -> np.ndarray:
    """A C x C row-stochastic matrix from a .json (a list of C lists), .csv (C lines of C
    numbers) or .npy file, checked, each row divided by its sum (float64)."""
    where = f"method.transition: {path}"
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"{where}: not found")
    suffix = p.suffix.lower()
    if suffix not in TRANSITION_FILES:
        raise ConfigError(f"{where}: unsupported format {suffix!r} (use {', '.join(TRANSITION_FILES)})")
    try:
        if suffix == ".npy":
            array = np.load(p, allow_pickle=False)
            if array.ndim != 2 or array.dtype.kind not in "biuf":
                raise ConfigError(f"{where}: holds a {array.dtype} array of shape {array.shape}, "
                                  f"expected a {num_classes} x {num_classes} matrix of numbers")
            rows = array.astype(np.float64).tolist()
        elif suffix == ".json":
            rows = json.loads(p.read_text())
            if not isinstance(rows, list) or not all(isinstance(r, list) for r in rows):
                raise ConfigError(f"{where}: expected a list of {num_classes} lists of {num_classes} numbers")
        else:
            rows = [line.split(",") for line in p.read_text().splitlines() if line.strip()]
    except ConfigError:
        raise
    except (OSError, ValueError) as exc:  # unreadable, not JSON, not an .npy (UnicodeDecodeError included)
        raise ConfigError(f"{where}: cannot be read: {exc}") from None
    return _checked(rows, num_classes, where)


def _number(value, where: str) -> float:
    """One entry: a JSON number, or a CSV field that reads as one (bools and words are not)."""
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            pass
    elif isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    raise ConfigError(f"{where}: {(value.strip() if isinstance(value, str) else value)!r} is not a number")


def _checked(rows: list, c: int, where: str) -> np.ndarray:
    if len(rows) != c:
        raise ConfigError(f"{where}: {len(rows)} rows, expected {c} (a {c} x {c} matrix for {c} classes)")
    for i, row in enumerate(rows):
        if len(row) != c:
            raise ConfigError(f"{where}: row {i} has {len(row)} entries, expected {c}")
    m = np.array([[_number(v, f"{where}: row {i}, column {j}") for j, v in enumerate(row)]
                  for i, row in enumerate(rows)], dtype=np.float64)
    for test, what in ((~np.isfinite(m), "is not finite"), (m < 0, "is negative")):
        if test.any():
            i, j = np.argwhere(test)[0]
            raise ConfigError(f"{where}: row {i}, column {j}: {float(m[i, j])!r} {what}")
    sums = m.sum(axis=1)
    off = np.flatnonzero(np.abs(sums - 1.0) > ROW_SUM_TOLERANCE)
    if off.size:
        raise ConfigError(f"{where}: row {off[0]} sums to {float(sums[off[0]])!r}, not 1 (within {ROW_SUM_TOLERANCE:g})")
    empty = np.flatnonzero(m.sum(axis=0) == 0)
    if empty.size:
        raise ConfigError(f"{where}: column {empty[0]} is all zeros: no class would ever be labelled "
                          f"{empty[0]}, and a sample that is has an infinite loss")
    return m / sums[:, None]
