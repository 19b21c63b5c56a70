"""The training step as it was before it became graph-ready (main at 5badc48), frozen here
as the eager reference of ``test_step.py``, for one process.

Everything that changed is written the old way: the kept count k is a Python int read
from the host (``int(eligible.sum())`` for the disagreement methods), the mask is built by
indexing with ``order[:k]``, the mean is scaled by a Python float, the schedule's lr and
beta1 are plain floats in the optimizer's param groups, and the non-finite verdict is read
with ``.tolist()`` every step. The loss functions themselves did not change and are shared.
"""

from __future__ import annotations

import torch

from jocor_ddp.methods.coteaching import cross_entropies
from jocor_ddp.methods.fcorrection import forward_loss
from jocor_ddp.methods.jocor import jocor_loss
from jocor_ddp.methods.selection import num_remember


def smallest_mask(values, k: int, eligible=None):
    if eligible is not None:
        values = torch.where(eligible, values, torch.inf)
    order = torch.sort(values, stable=True).indices
    mask = torch.zeros(values.shape, dtype=torch.bool, device=values.device)
    mask[order[:k]] = True
    if eligible is not None:
        mask &= eligible
    return mask


def keep_smallest(losses, forget_rate: float, eligible=None):
    n = losses.shape[0] if eligible is None else int(eligible.sum())
    k = num_remember(forget_rate, n) if n else 0
    return smallest_mask(losses, k, eligible), k


def mean(losses, mask, k: int):
    total = torch.where(mask, losses, 0.0).sum()
    return total * 0.0 if k == 0 else total * (1 / k)


def method_step(name: str, z1, z2, y, forget_rate: float, epoch: int, co_lambda: float, init_epoch: int,
                log_transition=None):
    """(loss to backpropagate, kept sets (s, b), checked losses (m, b))."""
    if name == "jocor":
        losses = jocor_loss(z1, z2, y, co_lambda)
        mask, k = keep_smallest(losses.detach(), forget_rate)
        return mean(losses, mask, k), mask[None], losses.detach()[None]
    if name == "fcorrection":  # F-correction came later: Standard's rule on the corrected loss
        ce = torch.stack([forward_loss(z1, y, log_transition), forward_loss(z2, y, log_transition)])
        name = "standard"
    else:
        ce = cross_entropies(z1, z2, y)
    disagree = z1.detach().argmax(1) != z2.detach().argmax(1)
    if name in ("standard", "decoupling"):
        mask = torch.ones_like(disagree) if name == "standard" else disagree
        k = int(mask.sum())
        return mean(ce[0], mask, k) + mean(ce[1], mask, k), mask[None], ce.detach()
    eligible = disagree if name == "coteaching_plus" and epoch >= init_epoch else None
    kept1, k1 = keep_smallest(ce[0].detach(), forget_rate, eligible)
    kept2, k2 = keep_smallest(ce[1].detach(), forget_rate, eligible)
    return mean(ce[0], kept2, k2) + mean(ce[1], kept1, k1), torch.stack([kept1, kept2]), ce.detach()


class ReferenceStep:
    """The old Trainer.train_step for one process, fp32, on_nonfinite=error, sync_every=1."""

    def __init__(self, pair, cfg, log_transition=None):
        self.pair, self.cfg, self.log_transition = pair, cfg, log_transition
        self.optimizer = torch.optim.Adam(pair.parameters(), lr=cfg.train.lr, fused=True)
        self.global_step = 0

    def begin_epoch(self, epoch: int, lr: float, beta1: float, forget_rate: float) -> None:
        for group in self.optimizer.param_groups:
            group["lr"] = lr
            group["betas"] = (beta1, 0.999)
        self.epoch, self.forget_rate = epoch, forget_rate

    def run(self, batch) -> torch.Tensor:
        """One step; returns the kept sets (s, b)."""
        self.pair.train()
        z1, z2 = self.pair(batch.x)
        m = self.cfg.method
        loss, kept, checked = method_step(m.name, z1, z2, batch.y, self.forget_rate, self.epoch,
                                          m.co_lambda, m.init_epoch, self.log_transition)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        bad_columns = ~torch.isfinite(checked).all(0)
        norms = torch._foreach_norm([p.grad for p in self.pair.parameters()])
        grad_bad = ~torch.isfinite(torch.stack(norms)).all()
        record = torch.stack([torch.full((), self.global_step),
                              torch.where(bad_columns.any(), 1, torch.where(grad_bad, 2, 0)),
                              torch.argmax(bad_columns.to(torch.uint8))]).long()
        step, kind, pos = record.tolist()
        assert kind == 0, f"non-finite value at step {step}"
        self.optimizer.step()
        self.global_step += 1
        return kept
