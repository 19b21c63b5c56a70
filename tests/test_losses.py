"""The joint loss against a float64 reference of the paper's formula, and its numerics."""

import numpy as np
import pytest
import torch

from jocor_ddp.methods.jocor import jocor_loss
from jocor_ddp.methods import EpochValues
from jocor_ddp.methods.selection import Selector, count_remember, num_remember
from jocor_ddp.dist import DistContext


def reference_loss(z1, z2, y, lam):
    """(1 - lam)(CE1 + CE2) + lam (KL(p1||p2) + KL(p2||p1)), straight from the definitions."""
    z1, z2 = np.asarray(z1, np.float64), np.asarray(z2, np.float64)
    p1 = np.exp(z1 - z1.max(1, keepdims=True)); p1 /= p1.sum(1, keepdims=True)
    p2 = np.exp(z2 - z2.max(1, keepdims=True)); p2 /= p2.sum(1, keepdims=True)
    rows = np.arange(len(y))
    ce = -np.log(p1[rows, y]) - np.log(p2[rows, y])
    kl12 = (p1 * np.log(p1 / p2)).sum(1)
    kl21 = (p2 * np.log(p2 / p1)).sum(1)
    return (1 - lam) * ce + lam * (kl12 + kl21)


@pytest.mark.parametrize("lam", [0.0, 0.1, 0.65, 0.9, 1.0])
def test_joint_loss_matches_float64_reference(lam):
    g = torch.Generator().manual_seed(0)
    z1 = torch.randn(256, 10, generator=g) * 3
    z2 = torch.randn(256, 10, generator=g) * 3
    y = torch.randint(0, 10, (256,), generator=g)
    ours = jocor_loss(z1, z2, y, lam)
    ref = reference_loss(z1.numpy(), z2.numpy(), y.numpy(), lam)
    np.testing.assert_allclose(ours.double().numpy(), ref, rtol=1e-5, atol=1e-5)


def test_reference_kl_div_formulation_agrees():
    """The reference's F.kl_div(log_softmax(a), softmax(b)) terms give the same number."""
    g = torch.Generator().manual_seed(1)
    z1, z2 = torch.randn(64, 7, generator=g), torch.randn(64, 7, generator=g)
    y = torch.randint(0, 7, (64,), generator=g)
    F = torch.nn.functional
    kl = lambda a, b: F.kl_div(F.log_softmax(a, 1), F.softmax(b, 1), reduction="none").sum(1)
    ref = 0.3 * (F.cross_entropy(z1, y, reduction="none") + F.cross_entropy(z2, y, reduction="none")) \
        + 0.7 * (kl(z1, z2) + kl(z2, z1))
    torch.testing.assert_close(jocor_loss(z1, z2, y, 0.7), ref, rtol=1e-5, atol=1e-6)


def test_gradients_match_float64_autograd():
    g = torch.Generator().manual_seed(2)
    z1 = (torch.randn(32, 5, generator=g) * 4).requires_grad_()
    z2 = (torch.randn(32, 5, generator=g) * 4).requires_grad_()
    y = torch.randint(0, 5, (32,), generator=g)
    jocor_loss(z1, z2, y, 0.8).sum().backward()
    d1, d2 = z1.detach().double().requires_grad_(), z2.detach().double().requires_grad_()
    p1, p2 = d1.softmax(1), d2.softmax(1)
    ce = -(p1.log()[torch.arange(32), y] + p2.log()[torch.arange(32), y])
    kl = (p1 * (p1.log() - p2.log())).sum(1) + (p2 * (p2.log() - p1.log())).sum(1)
    (0.2 * ce + 0.8 * kl).sum().backward()
    torch.testing.assert_close(z1.grad.double(), d1.grad, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(z2.grad.double(), d2.grad, rtol=1e-4, atol=1e-5)


def test_saturated_logits_stay_finite():
    """Logits around 1e3: softmax is exactly 0 in places, where the reference's KL has an
    infinite gradient. Loss and gradients of both networks must stay finite."""
    z1 = torch.tensor([[1000.0, -1000.0, 0.0], [-800.0, 900.0, 1000.0]], requires_grad=True)
    z2 = torch.tensor([[-1000.0, 1000.0, 500.0], [1000.0, -1000.0, -1000.0]], requires_grad=True)
    assert (z1.softmax(1) == 0).any() and (z2.softmax(1) == 0).any()
    y = torch.tensor([0, 2])
    loss = jocor_loss(z1, z2, y, 0.9)
    assert torch.isfinite(loss).all()
    loss.sum().backward()
    assert torch.isfinite(z1.grad).all() and torch.isfinite(z2.grad).all()
    # The reference formulation does produce NaN gradients here: the case is a real one.
    F = torch.nn.functional
    a, b = z1.detach().clone().requires_grad_(), z2.detach().clone().requires_grad_()
    F.kl_div(F.log_softmax(a, 1), F.softmax(b, 1), reduction="sum").backward()
    assert not torch.isfinite(b.grad).all()


def test_global_selection_single_process_keeps_k_smallest_ties_by_position():
    sel = Selector("global", DistContext())
    losses = torch.tensor([0.5, 0.1, 0.5, 0.5, 0.2, 0.9], requires_grad=True)
    kept = sel.keep_smallest(sel.gather(losses.detach()), EpochValues.at(0.5).remember)
    assert kept.count == 3
    # 0.1 and 0.2 are the smallest; of the tied 0.5s the first by position is kept.
    assert kept.local.tolist() == [True, True, False, False, True, False]
    loss = sel.mean(losses, kept)
    loss.backward()
    assert torch.allclose(loss, torch.tensor((0.5 + 0.1 + 0.2) / 3))
    assert losses.grad.tolist() == pytest.approx([1 / 3, 1 / 3, 0, 0, 1 / 3, 0])


def test_dropped_nonfinite_loss_does_not_poison_the_kept_mean():
    sel = Selector("global", DistContext())
    losses = torch.tensor([0.3, float("inf"), 0.1, 0.2])
    loss = sel.mean(losses, sel.keep_smallest(losses, EpochValues.at(0.5).remember))
    assert torch.isfinite(loss) and loss.item() == pytest.approx(0.15)


def test_num_remember_matches_reference_and_never_zero():
    assert num_remember(0.5, 128) == 64
    assert num_remember(0.2, 128) == int((1 - 0.2) * 128)
    assert num_remember(0.99, 10) == 1


@pytest.mark.parametrize("n", [1, 7, 10, 64, 128, 1000, 4096])
def test_device_count_equals_the_host_formula(n):
    """k on the device (float64) is the reference's int((1 - r) * n) for every forget rate
    the ramp produces, including rates like 0.1 * 3 that are not exact in binary."""
    import numpy as np
    rates = set(np.linspace(0, 0.5, 10)) | set(np.linspace(0, 0.8, 10)) | {0.0, 0.2, 0.45, 0.3, 0.7, 0.99}
    for r in rates:
        remember = EpochValues.at(float(r)).remember
        assert count_remember(remember, n).item() == num_remember(float(r), n), (r, n)
        assert count_remember(remember, torch.tensor(n)).item() == num_remember(float(r), n), (r, n)
    assert count_remember(EpochValues.at(0.5).remember, torch.tensor(0)).item() == 0


# --- F-correction's forward-corrected loss ---------------------------------------------------

def _random_transition(c, seed, zeros=False):
    """A random row-stochastic T (float64); with ``zeros``, some off-diagonal entries exactly 0."""
    rng = np.random.default_rng(seed)
    t = rng.random((c, c)) ** 3
    if zeros:
        t[rng.random((c, c)) < 0.4] = 0.0
        np.fill_diagonal(t, rng.random(c) + 0.5)
    return t / t.sum(1, keepdims=True)


def _forward(z, y, t):
    from jocor_ddp.methods.fcorrection import forward_loss
    values = EpochValues.on()
    values.set_transition(t)
    return forward_loss(z, y, values.log_transition)


def reference_forward_loss(z, y, t):
    """-log((softmax(z) T)[y]) in float64, straight from the definition (torch, for autograd)."""
    return -(z.double().softmax(1) @ torch.from_numpy(t))[torch.arange(len(y)), y].log()


@pytest.mark.parametrize("c,zeros", [(10, False), (10, True), (4, True), (100, False)])
def test_forward_loss_and_gradient_match_float64_reference(c, zeros):
    g = torch.Generator().manual_seed(c)
    z = (torch.randn(256, c, generator=g) * 3).requires_grad_()
    y = torch.randint(0, c, (256,), generator=g)
    t = _random_transition(c, c, zeros)
    ours = _forward(z, y, t)
    ours.sum().backward()
    d = z.detach().double().requires_grad_()
    ref = reference_forward_loss(d, y, t)
    ref.sum().backward()
    np.testing.assert_allclose(ours.double().detach().numpy(), ref.detach().numpy(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(z.grad.double(), d.grad, rtol=1e-4, atol=1e-6)
    # The correction matters here: plain cross-entropy is another number.
    assert not np.allclose(ours.detach().numpy(), torch.nn.functional.cross_entropy(z, y, reduction="none")
                           .detach().numpy(), atol=1e-3)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_forward_loss_with_the_identity_is_standards_cross_entropy_bit_for_bit(dtype):
    """logsumexp over one finite term and -inf's is that term exactly, and so is its gradient."""
    g = torch.Generator().manual_seed(5)
    z = (torch.randn(512, 10, generator=g) * 6).to(dtype).requires_grad_()
    y = torch.randint(0, 10, (512,), generator=g)
    ours = _forward(z, y, np.eye(10))
    ours.sum().backward()
    ours_grad, z.grad = z.grad, None
    from jocor_ddp.methods.coteaching import cross_entropies
    standard = cross_entropies(z, z, y)[0]  # Standard's per-sample loss
    standard.sum().backward()
    assert torch.equal(ours, standard) and torch.equal(ours_grad, z.grad)


def test_forward_loss_of_saturated_logits_stays_finite():
    """Logits around 1e3: softmax(z) T is 0 in float64 where the label's column misses the
    predicted class, so the product form's log is infinite; the log-space form is finite as
    long as the column has a positive entry somewhere."""
    z = torch.tensor([[1000.0, -1000.0, 0.0], [-800.0, 900.0, 1000.0], [0.0, 0.0, 1000.0]], requires_grad=True)
    y = torch.tensor([1, 0, 1])
    t = np.array([[1.0, 0.0, 0.0], [0.0, 0.6, 0.4], [0.0, 0.5, 0.5]])  # column 1: never from class 0
    loss = _forward(z, y, t)
    loss.sum().backward()
    assert torch.isfinite(loss).all() and torch.isfinite(z.grad).all()
    # -log(0.6 p_1 + 0.5 p_2) with p_1 = e^-2000 and p_2 = e^-1000: 1000 + log 2
    assert loss[0].item() == pytest.approx(1000 + np.log(2), rel=1e-6)
    assert not torch.isfinite(reference_forward_loss(z.detach(), y, t)).all()  # the case is a real one
