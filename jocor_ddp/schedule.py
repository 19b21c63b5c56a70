"""The reference's per-epoch schedules, indexed by the 0-based epoch.

- Forget rate r(t): linear from 0 to tau**c over the first Tk epochs (numpy's linspace,
  so epoch Tk-1 already reaches tau**c), then tau.
- Learning rate and Adam's beta1: lr and 0.9 until epoch_decay_start, then the lr falls
  linearly towards 0 ((E - t) / (E - start) * lr) and beta1 is 0.1.
"""

from __future__ import annotations

import numpy as np


def forget_rate_schedule(tau: float, epochs: int, num_gradual: int, exponent: float) -> np.ndarray:
    rates = np.ones(epochs) * tau
    ramp = min(num_gradual, epochs)
    rates[:ramp] = np.linspace(0, tau ** exponent, num_gradual)[:ramp]
    return rates


def lr_beta1_schedule(lr: float, epochs: int, decay_start: int) -> tuple[list[float], list[float]]:
    lrs = [lr] * epochs
    beta1 = [0.9] * epochs
    for t in range(decay_start, epochs):
        lrs[t] = float(epochs - t) / (epochs - decay_start) * lr
        beta1[t] = 0.1
    return lrs, beta1
