"""The forget rate tau, decided once per run, and the reference's per-epoch schedules,
indexed by the 0-based epoch.

- tau (``decide_forget_rate``): a fixed number, or auto with its fallback, from the config
  and whether the given labels came noisy. The trainer, the step, the metrics rows, the
  checkpoint and the audit all read the one ``ForgetRate`` decided here.

- Forget rate r(t): linear from 0 to tau**c over the first Tk epochs (numpy's linspace,
  so epoch Tk-1 already reaches tau**c), then tau.
- Learning rate and Adam's beta1: lr and 0.9 until epoch_decay_start, then the lr falls
  linearly towards 0 ((E - t) / (E - start) * lr) and beta1 is 0.1.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np

from .config import MethodConfig, NoiseConfig
from .registry import get_method


@dataclass(frozen=True)
class ForgetRate:
    """tau as decided for a run: a fixed number, or auto (``tau`` is then the fallback
    until the first estimate, and where the estimator cannot decide)."""
    auto: bool
    tau: float
    why: str  # where the number comes from, for the start-up line and checkpoints

    def state_dict(self) -> dict:
        return asdict(self)


def decide_forget_rate(method: MethodConfig, noise: NoiseConfig, labels_noisy: bool) -> ForgetRate:
    """The one decision of tau, from the method's and the noise's settings and whether the
    given labels came noisy (shards such as Clothing1M's, whose noise rate is unknown)."""
    if not get_method(method.name).selects:
        return ForgetRate(False, 0.0, f"{method.name} keeps no small-loss share")
    if method.forget_rate == "auto":
        return ForgetRate(True, method.forget_rate_fallback, "method.forget_rate: auto")
    if method.forget_rate is not None:
        return ForgetRate(False, float(method.forget_rate), "method.forget_rate")
    if noise.type == "file" or labels_noisy:
        unknown = "noise.type: file" if noise.type == "file" else "the labels came noisy"
        return ForgetRate(True, method.forget_rate_fallback, f"auto: the noise rate is unknown ({unknown})")
    if noise.type == "asymmetric":
        return ForgetRate(False, noise.rate / 2, "half the asymmetric noise rate, as the reference")
    return ForgetRate(False, noise.rate, "the noise rate, as the reference")


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
