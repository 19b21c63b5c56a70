"""The per-epoch schedules reproduce the reference implementation's arrays."""

import numpy as np

from jocor_ddp.schedule import forget_rate_schedule, lr_beta1_schedule


def test_forget_rate_ramp_is_the_reference_linspace():
    r = forget_rate_schedule(0.5, 200, 10, 1.0)
    assert r[0] == 0.0 and r[9] == 0.5 and r[10] == 0.5 and r[-1] == 0.5
    np.testing.assert_allclose(r[:10], np.linspace(0, 0.5, 10))
    assert forget_rate_schedule(0.5, 200, 10, 2.0)[9] == 0.25
    assert len(forget_rate_schedule(0.2, 3, 10, 1.0)) == 3
    assert (forget_rate_schedule(0.3, 5, 0, 1.0) == 0.3).all()


def test_lr_and_beta1_decay_from_epoch_decay_start():
    lrs, beta1 = lr_beta1_schedule(0.001, 200, 80)
    assert lrs[79] == 0.001 and beta1[79] == 0.9
    assert lrs[80] == 0.001 and beta1[80] == 0.1  # (200 - 80) / 120 * lr
    assert abs(lrs[140] - 0.0005) < 1e-12 and abs(lrs[199] - 0.001 / 120) < 1e-12
