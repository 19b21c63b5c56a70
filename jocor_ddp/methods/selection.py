"""Small-loss selection: which samples of the batch update the networks.

Global selection is what makes W ranks behave like one big batch. Each rank computes the
per-sample losses of its b samples; the detached losses are all-gathered (rank order =
global batch order), and the k = floor((1 - r) * W * b) smallest are kept, ties broken
by global position (a stable sort), so exactly k samples are kept across all ranks.
Each rank then backpropagates sum(kept local losses) * W / k: DDP averages gradients
over W ranks, which yields exactly the gradient of the mean over the k kept samples.

Nothing here reads a device value on the host: k is a device tensor computed from the
share to remember (1 - r, a device scalar that the step updates in place between epochs)
and, for the disagreement methods, from the eligible count, so that a CUDA graph of the
step stays right when the forget rate changes. The mask is "rank in the stable order < k",
a fixed-shape comparison, instead of indexing with a Python k.

Local selection (``selection: local``) is the naive alternative kept for comparison: each
rank keeps the k_local = floor((1 - r) * b) smallest of its own samples and averages over
them; DDP then averages the per-rank means.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch

from ..dist import DistContext, all_gather_cat


def num_remember(forget_rate: float, n: int) -> int:
    """The reference's int((1 - r) * n), never below one sample (a mean of nothing is NaN)."""
    return max(1, int(math.floor((1.0 - forget_rate) * n)))


def count_remember(remember: torch.Tensor, n: torch.Tensor | int) -> torch.Tensor:
    """``num_remember`` on the device: ``remember`` = 1 - r (float64 scalar), ``n`` the
    candidates (an integer tensor, or the fixed batch size). float64 throughout, so k
    equals the host formula's exactly; 0 when there is no candidate."""
    if isinstance(n, int):  # the batch size: the same number at every step
        return torch.floor(remember * float(n)).long().clamp(min=1)
    k = torch.floor(remember * n.double()).long().clamp(min=1)
    return torch.where(n > 0, k, 0)


def smallest_mask(values: torch.Tensor, k: torch.Tensor, eligible: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Boolean mask of the k smallest values (ties: the earlier position wins), chosen
    among the eligible positions only; k is a device integer."""
    if eligible is not None:
        values = torch.where(eligible, values, torch.inf)
    order = torch.sort(values, stable=True).indices
    # Each position's place in the stable order: the inverse permutation, by a scatter.
    place = torch.empty_like(order).scatter_(0, order, torch.arange(order.numel(), device=order.device))
    mask = place < k
    if eligible is not None:
        mask &= eligible
    return mask


@dataclass
class Kept:
    """One kept set: this rank's part, the whole batch's, and the count normalising the mean."""
    local: torch.Tensor   # bool (b,)
    glob: torch.Tensor    # bool (W*b,)
    count: torch.Tensor   # int64 scalar: samples the mean is taken over (global k, or local k)


class Selector:
    """Global or local selection over a batch spread across ``ctx.world_size`` ranks."""

    def __init__(self, kind: str, ctx: DistContext):
        if kind not in ("global", "local"):
            raise ValueError(f"selection: {kind!r}")
        self.kind = kind
        self.ctx = ctx

    def gather(self, t: torch.Tensor) -> torch.Tensor:
        """The whole batch's values (last dimension = samples), identical on every rank."""
        if t.dtype == torch.bool:  # gloo gathers no bool tensors
            return self.gather(t.to(torch.uint8)).bool()
        if t.dim() == 1:
            return all_gather_cat(self.ctx, t)
        return all_gather_cat(self.ctx, t.mT.contiguous()).mT

    def _local_slice(self, b: int) -> slice:
        return slice(self.ctx.rank * b, (self.ctx.rank + 1) * b)

    def keep_smallest(self, losses_all: torch.Tensor, remember: torch.Tensor,
                      eligible_all: Optional[torch.Tensor] = None) -> Kept:
        """Keep the ``remember`` (= 1 - r) share with the smallest loss, among the eligible
        samples. ``losses_all`` / ``eligible_all`` are gathered (W*b,) tensors."""
        n_all = losses_all.shape[0]
        b = n_all // self.ctx.world_size
        mine = self._local_slice(b)
        if self.kind == "global":
            k = count_remember(remember, n_all if eligible_all is None else eligible_all.sum())
            mask = smallest_mask(losses_all, k, eligible_all)
            return Kept(mask[mine], mask, k)
        eligible = None if eligible_all is None else eligible_all[mine]
        k = count_remember(remember, b if eligible is None else eligible.sum())
        local = smallest_mask(losses_all[mine], k, eligible)
        return Kept(local, self.gather(local), k)

    def keep_all(self, eligible_all: torch.Tensor) -> Kept:
        """Keep every eligible sample (Decoupling's disagreement set, Standard's whole batch)."""
        b = eligible_all.shape[0] // self.ctx.world_size
        mine = self._local_slice(b)
        if self.kind == "global":
            return Kept(eligible_all[mine], eligible_all, eligible_all.sum())
        return Kept(eligible_all[mine], eligible_all, eligible_all[mine].sum())

    def mean(self, losses_local: torch.Tensor, kept: Kept) -> torch.Tensor:
        """The scalar this rank backpropagates so that DDP's gradient average is the
        gradient of the mean over the kept samples (global: of the whole batch)."""
        # where(), not a product: a dropped sample's inf or NaN must not leak into the sum.
        total = torch.where(kept.local, losses_local, 0.0).sum()
        scale = self.ctx.world_size if self.kind == "global" else 1
        # scale / count in float64, then rounded once to the loss's dtype: the same factor as
        # a Python float would give. With nothing kept the factor is 0: a zero loss that still
        # reaches every parameter.
        count = kept.count.clamp(min=1).double()
        factor = torch.where(kept.count > 0, torch.full_like(count, scale) / count, 0.0)
        return total * factor.to(total.dtype)

    def objective(self, losses_all: torch.Tensor, kept: Kept) -> torch.Tensor:
        """The batch's objective value from the gathered losses: the same on every rank."""
        if self.kind == "global":
            total = torch.where(kept.glob, losses_all, 0.0).sum()
            return torch.where(kept.count > 0, total / kept.count.clamp(min=1).to(total.dtype), 0.0)
        per_rank = torch.where(kept.glob, losses_all, 0.0).view(self.ctx.world_size, -1).sum(1)
        counts = kept.glob.view(self.ctx.world_size, -1).sum(1).clamp(min=1)
        return (per_rank / counts).mean()
