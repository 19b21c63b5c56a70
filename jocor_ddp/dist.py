"""The distributed context and the few collectives the trainer needs.

One process or many, the code path is the same: ``DistContext`` says who this process
is (rank, world size, device) and is passed explicitly to everything that needs it.
Without torchrun's environment it describes a single process and the collectives
below return their input unchanged.
"""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from .config import Config, ConfigError


@dataclass(frozen=True)
class DistContext:
    rank: int = 0
    local_rank: int = 0
    world_size: int = 1
    device: torch.device = torch.device("cpu")
    backend: str = "none"

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name)
    if value is None:
        return default
    try:
        return int(value)
    except ValueError:
        raise ConfigError(f"environment variable {name}={value!r} is not an integer") from None


def world_size_from_env() -> int:
    return _env_int("WORLD_SIZE", 1)


def _pick_device(requested: str, local_rank: int) -> torch.device:
    if requested == "cuda" or (requested == "auto" and torch.cuda.is_available()):
        if not torch.cuda.is_available():
            raise ConfigError("train.device: 'cuda' was requested but CUDA is not available")
        index = local_rank % torch.cuda.device_count()
        torch.cuda.set_device(index)
        return torch.device("cuda", index)
    return torch.device("cpu")


def init_distributed(cfg: Config) -> DistContext:
    """Read torchrun's environment, pick the device, join the process group."""
    rank = _env_int("RANK", 0)
    world_size = _env_int("WORLD_SIZE", 1)
    local_rank = _env_int("LOCAL_RANK", 0)
    cfg.check_world_size(world_size)
    device = _pick_device(cfg.train.device, local_rank)
    backend = cfg.dist.backend
    if backend == "auto":
        backend = "nccl" if device.type == "cuda" else "gloo"
    if backend == "nccl" and device.type != "cuda":
        raise ConfigError("dist.backend: 'nccl' needs CUDA devices; use 'gloo' on CPU")
    if world_size == 1 and not dist.is_initialized():
        return DistContext(0, 0, 1, device, "none")
    if not dist.is_initialized():
        kwargs = {}
        if backend == "nccl":
            kwargs["device_id"] = device
        dist.init_process_group(backend=backend, rank=rank, world_size=world_size,
                                timeout=datetime.timedelta(seconds=cfg.dist.timeout_s), **kwargs)
    return DistContext(rank, local_rank, world_size, device, backend)


def close_distributed() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def all_gather_cat(ctx: DistContext, tensor: torch.Tensor) -> torch.Tensor:
    """Concatenate equally shaped tensors from every rank, in rank order."""
    if not ctx.distributed:
        return tensor
    out = torch.empty((ctx.world_size * tensor.shape[0], *tensor.shape[1:]),
                      dtype=tensor.dtype, device=tensor.device)
    _all_gather_single(out, tensor.contiguous())
    return out


# torch 2.14 renamed all_gather_into_tensor (now deprecated); torch 2.4 has only the old name.
_all_gather_single = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor


def all_reduce_sum(ctx: DistContext, tensor: torch.Tensor) -> torch.Tensor:
    if ctx.distributed:
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def any_rank(ctx: DistContext, flag: bool) -> bool:
    """True on every rank when the flag is true on any rank (all ranks must call it)."""
    if not ctx.distributed:
        return flag
    t = torch.tensor([1.0 if flag else 0.0], device=ctx.device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item() > 0)


def barrier(ctx: DistContext) -> None:
    if ctx.distributed:
        dist.barrier()
