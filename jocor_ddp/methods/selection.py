"""Small-loss selection: which samples of the batch update the networks.

Global selection is what makes W ranks behave like one big batch. Each rank computes the
per-sample losses of its b samples; the detached losses are all-gathered (rank order =
global batch order), and the k = floor((1 - r) * W * b) smallest are kept, ties broken
by global position (a stable sort), so exactly k samples are kept across all ranks.
Each rank then backpropagates sum(kept local losses) * W / k: DDP averages gradients
over W ranks, which yields exactly the gradient of the mean over the k kept samples.
Sorting and selecting happen on the device: no CPU sort.

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


def smallest_mask(values: torch.Tensor, k: int, eligible: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Boolean mask of the k smallest values (ties: the earlier position wins), chosen
    among the eligible positions only."""
    if eligible is not None:
        values = torch.where(eligible, values, torch.inf)
    order = torch.sort(values, stable=True).indices
    mask = torch.zeros(values.shape, dtype=torch.bool, device=values.device)
    mask[order[:k]] = True
    if eligible is not None:
        mask &= eligible
    return mask


@dataclass
class Kept:
    """One kept set: this rank's part, the whole batch's, and the count normalising the mean."""
    local: torch.Tensor   # bool (b,)
    glob: torch.Tensor    # bool (W*b,)
    count: int            # samples the mean is taken over (global k, or local k for local selection)


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

    def keep_smallest(self, losses_all: torch.Tensor, forget_rate: float,
                      eligible_all: Optional[torch.Tensor] = None) -> Kept:
        """Keep the (1 - r) share with the smallest loss, among the eligible samples.
        ``losses_all`` / ``eligible_all`` are gathered (W*b,) tensors."""
        n_all = losses_all.shape[0]
        b = n_all // self.ctx.world_size
        mine = self._local_slice(b)
        if self.kind == "global":
            # A data-dependent eligible count needs one host sync (Co-teaching+, Decoupling).
            n = n_all if eligible_all is None else int(eligible_all.sum())
            k = num_remember(forget_rate, n) if n else 0
            mask = smallest_mask(losses_all, k, eligible_all)
            return Kept(mask[mine], mask, k)
        eligible = None if eligible_all is None else eligible_all[mine]
        n = b if eligible is None else int(eligible.sum())
        k = num_remember(forget_rate, n) if n else 0
        local = smallest_mask(losses_all[mine], k, eligible)
        return Kept(local, self.gather(local), k)

    def keep_all(self, eligible_all: torch.Tensor) -> Kept:
        """Keep every eligible sample (Decoupling's disagreement set, Standard's whole batch)."""
        b = eligible_all.shape[0] // self.ctx.world_size
        mine = self._local_slice(b)
        if self.kind == "global":
            return Kept(eligible_all[mine], eligible_all, int(eligible_all.sum()))
        return Kept(eligible_all[mine], eligible_all, int(eligible_all[mine].sum()))

    def mean(self, losses_local: torch.Tensor, kept: Kept) -> torch.Tensor:
        """The scalar this rank backpropagates so that DDP's gradient average is the
        gradient of the mean over the kept samples (global: of the whole batch)."""
        # where(), not a product: a dropped sample's inf or NaN must not leak into the sum.
        total = torch.where(kept.local, losses_local, 0.0).sum()
        if kept.count == 0:
            return total * 0.0  # nothing to learn from: a zero loss that still reaches every parameter
        scale = self.ctx.world_size if self.kind == "global" else 1
        return total * (scale / kept.count)

    def objective(self, losses_all: torch.Tensor, kept: Kept) -> torch.Tensor:
        """The batch's objective value from the gathered losses: the same on every rank."""
        if kept.count == 0:
            return torch.zeros((), device=losses_all.device)
        if self.kind == "global":
            return torch.where(kept.glob, losses_all, 0.0).sum() / kept.count
        per_rank = torch.where(kept.glob, losses_all, 0.0).view(self.ctx.world_size, -1).sum(1)
        counts = kept.glob.view(self.ctx.world_size, -1).sum(1).clamp(min=1)
        return (per_rank / counts).mean()
