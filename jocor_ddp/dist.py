"""The distributed context and the few collectives the trainer needs.

One process or many, the code path is the same: ``DistContext`` says who this process
is (rank, world size, device) and is passed explicitly to everything that needs it.
Without torchrun's environment it describes a single process and the collectives
below return their input unchanged.
"""

from __future__ import annotations

import ctypes
import datetime
import gc
import os
import signal
import sys
from dataclasses import dataclass

import torch
import torch.distributed as dist

from . import PARENT_AT_START
from .config import Config, ConfigError

# prctl(2): the signal the kernel sends this process when its parent ends.
PR_SET_PDEATHSIG = 1


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


def rank_from_env() -> int:
    return _env_int("RANK", 0)


def pick_device(requested: str = "auto", local_rank: int | None = None, what: str = "--device") -> torch.device:
    """``requested`` (cpu, cuda, or auto: CUDA when available) as a device; on CUDA the local
    rank's GPU, or without one the current GPU, made current."""
    if requested == "cuda" or (requested == "auto" and torch.cuda.is_available()):
        if not torch.cuda.is_available():
            raise ConfigError(f"{what}: 'cuda' was requested but CUDA is not available")
        index = torch.cuda.current_device() if local_rank is None else local_rank % torch.cuda.device_count()
        torch.cuda.set_device(index)
        return torch.device("cuda", index)
    return torch.device("cpu")


def die_with_launcher() -> None:
    """Under torchrun (Linux), have the kernel SIGKILL this worker when its launcher ends.

    A launcher killed outright (SIGKILL: the out-of-memory killer, a hand's kill -9) cannot
    stop its workers, and orphaned workers went on: waiting in the rendezvous store for more
    than six minutes, or training and writing checkpoints into the run folder that the next
    attempt, on the same port, uses. SIGKILL, not SIGTERM: a stop checkpoint written by orphans
    would race the next attempt's reads; the work since the last checkpoint is lost, as in any
    crash. A launcher that died before this call (while torch was imported) is seen by the
    parent having changed since the process started, and the worker ends the same way. One
    that died before ``import jocor_ddp`` (the interpreter's first milliseconds) cannot be told
    from the reaper that took over: that orphan ends at the store's timeout, dist.timeout_s."""
    if "TORCHELASTIC_RUN_ID" not in os.environ or not sys.platform.startswith("linux"):
        return
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0) != 0:
        return  # a kernel without it: the store's timeout (dist.timeout_s) still ends an orphan
    if os.getppid() != PARENT_AT_START:
        try:
            sys.stderr.write(f"error (rank {os.environ.get('RANK', '?')}): the launcher (pid {PARENT_AT_START}) "
                             f"is gone; this orphaned worker ends itself\n")
            sys.stderr.flush()
        except OSError:
            pass  # the launcher's stderr may be gone with it
        os.kill(os.getpid(), signal.SIGKILL)


def init_distributed(cfg: Config) -> DistContext:
    """Read torchrun's environment, pick the device, join the process group."""
    die_with_launcher()
    rank = rank_from_env()
    world_size = _env_int("WORLD_SIZE", 1)
    local_rank = _env_int("LOCAL_RANK", 0)
    cfg.check_world_size(world_size)
    device = pick_device(cfg.train.device, local_rank, "train.device")
    backend = cfg.dist.backend
    if backend == "auto":
        backend = "nccl" if device.type == "cuda" else "gloo"
    if backend == "nccl" and device.type != "cuda":
        raise ConfigError("dist.backend: 'nccl' needs CUDA devices; use 'gloo' on CPU")
    if world_size == 1 and not dist.is_initialized():
        return DistContext(0, 0, 1, device, "none")
    if not dist.is_initialized():
        timeout = datetime.timedelta(seconds=cfg.dist.timeout_s)
        kwargs = {}
        if backend == "nccl":
            kwargs["device_id"] = device
        dist.init_process_group(backend=backend, store=_make_store(rank, world_size, timeout), rank=rank,
                                world_size=world_size, timeout=timeout, **kwargs)
    return DistContext(rank, local_rank, world_size, device, backend)


def _make_store(rank: int, world_size: int, timeout: datetime.timedelta) -> dist.Store:
    """The rendezvous store, with a prefix per torchrun attempt.

    torchrun keeps its store across ``--max-restarts``: without the prefix, restarted
    workers read the addresses their dead predecessors published there and the process
    group cannot connect ("Gloo connectFullMesh failed ... Connection refused")."""
    try:
        addr, port = os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"])
    except (KeyError, ValueError):
        raise ConfigError("WORLD_SIZE > 1 but MASTER_ADDR / MASTER_PORT are not set: "
                          "start the workers with torchrun") from None
    # Under torchrun the agent hosts the store; a hand-made launcher leaves it to rank 0.
    agent_store = os.environ.get("TORCHELASTIC_USE_AGENT_STORE", "False") == "True"
    store = dist.TCPStore(addr, port, world_size, is_master=rank == 0 and not agent_store, timeout=timeout)
    attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
    return dist.PrefixStore(f"jocor_ddp/attempt-{attempt}", store)


def close_distributed() -> None:
    if dist.is_initialized():
        # torch.compile leaves the DDP module in a reference cycle, still holding the process
        # group: freed by a later collection, after the group is destroyed or while the
        # interpreter shuts down, it let gloo abort the process now and then ("terminate called
        # without an active exception", after a run had finished). Free it while the group lives.
        gc.collect()
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


def max_over_ranks(ctx: DistContext, tensor: torch.Tensor) -> torch.Tensor:
    """The element-wise largest of the ranks' tensors, on every rank (all ranks must call it)."""
    if ctx.distributed:
        dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
    return tensor


def broadcast_buffers(ctx: DistContext, module: torch.nn.Module) -> None:
    """Give every rank rank 0's buffers (BatchNorm running statistics)."""
    if ctx.distributed:
        for buf in module.buffers():
            dist.broadcast(buf, src=0)


def barrier(ctx: DistContext) -> None:
    if ctx.distributed:
        dist.barrier()


def all_gather_objects(ctx: DistContext, obj):
    """Every rank's picklable object, in rank order (between trusted peers of one job)."""
    if not ctx.distributed:
        return [obj]
    out = [None] * ctx.world_size
    dist.all_gather_object(out, obj)
    return out


def agree(ctx: DistContext, fn, *, every_rank: bool = False):
    """Run ``fn`` on rank 0 (or on every rank) and make its outcome everyone's.

    With ``every_rank=False`` rank 0's result is broadcast; with ``every_rank=True`` each
    rank keeps its own result. Either way, an exception on any rank is raised on every
    rank with the same message, instead of leaving the others waiting in a collective."""
    result, error = None, None
    if every_rank or ctx.is_main:
        try:
            result = fn()
        except Exception as exc:  # re-raised below, on every rank
            error = exc
    if not ctx.distributed:
        if error is not None:
            raise error
        return result
    outcomes = all_gather_objects(ctx, (type(error).__name__, str(error)) if error is not None else None)
    for rank, outcome in enumerate(outcomes):
        if outcome is not None:
            if error is not None:
                raise error
            raise RemoteError(f"{outcome[1]} (raised on rank {rank} as {outcome[0]})")
    if every_rank:
        return result
    payload = [result]
    dist.broadcast_object_list(payload, src=0)
    return payload[0]


class RemoteError(RuntimeError):
    """Another rank failed; the message is its message."""
