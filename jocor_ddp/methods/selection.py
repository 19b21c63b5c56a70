"""Small-loss selection: which samples of the batch update the networks.

Global selection is what makes W ranks behave like one big batch. Each rank computes the
per-sample losses of its b samples; the detached losses are all-gathered (rank order =
global batch order), and the k = floor((1 - r) * W * b) smallest are kept, ties broken
by global position (a stable sort), so exactly k samples are kept across all ranks.
Each rank then backpropagates sum(kept local losses) * W / k: DDP averages gradients
over W ranks, which yields exactly the gradient of the mean over the k kept samples.
Everything happens on the device: no host sync, no CPU sort.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ..dist import DistContext, all_gather_cat


def num_remember(forget_rate: float, n: int) -> int:
    """The reference's int((1 - r) * n), never below one sample (a mean of nothing is NaN)."""
    return max(1, int(math.floor((1.0 - forget_rate) * n)))


@dataclass
class Selection:
    local_mask: torch.Tensor    # bool (b,): which of this rank's samples are kept
    global_losses: torch.Tensor  # fp32 (W*b,): the detached losses of the whole batch
    global_mask: torch.Tensor   # bool (W*b,): which samples of the whole batch are kept
    loss: torch.Tensor          # the scalar to backpropagate on this rank
    num_kept: int               # kept samples across all ranks


def _smallest_mask(losses: torch.Tensor, k: int) -> torch.Tensor:
    order = torch.sort(losses, stable=True).indices
    mask = torch.zeros_like(losses, dtype=torch.bool)
    mask[order[:k]] = True
    return mask


def select_global(losses: torch.Tensor, forget_rate: float, ctx: DistContext) -> Selection:
    b = losses.shape[0]
    all_losses = all_gather_cat(ctx, losses.detach().float())
    k = num_remember(forget_rate, all_losses.shape[0])
    mask = _smallest_mask(all_losses, k)
    local = mask[ctx.rank * b:(ctx.rank + 1) * b]
    # where(), not a product: a dropped sample's inf or NaN must not leak into the sum.
    loss = torch.where(local, losses, 0.0).sum() * (ctx.world_size / k)
    return Selection(local, all_losses, mask, loss, k)


def select_local(losses: torch.Tensor, forget_rate: float, ctx: DistContext) -> Selection:
    """The naive alternative: each rank keeps its own small-loss fraction."""
    b = losses.shape[0]
    k_local = num_remember(forget_rate, b)
    local = _smallest_mask(losses.detach().float(), k_local)
    loss = torch.where(local, losses, 0.0).sum() / k_local  # DDP's average over ranks: mean of the local means
    all_losses = all_gather_cat(ctx, losses.detach().float())
    all_mask = all_gather_cat(ctx, local.to(torch.uint8)).bool()
    return Selection(local, all_losses, all_mask, loss, k_local * ctx.world_size)


def select(kind: str, losses: torch.Tensor, forget_rate: float, ctx: DistContext) -> Selection:
    if kind == "global":
        return select_global(losses, forget_rate, ctx)
    return select_local(losses, forget_rate, ctx)
