"""torch.distributed for training: the process group, DDP or FSDP, gradient sync, values averaged over ranks.

Launch with ``torchrun --nproc-per-node N -m phantom_core train --config run.toml``: torchrun sets ``RANK``,
``WORLD_SIZE``, ``LOCAL_RANK`` and the rendezvous variables; the process group is initialised here (NCCL on
CUDA, gloo on the CPU). Each rank trains on its slice of every global batch (``order.shard``); gradients are
averaged across ranks (DDP's all-reduce, or FSDP's reduce-scatter); rank 0 alone writes checkpoints, logs and
validation videos.

FSDP (``fsdp = true``) shards every parameter, gradient and optimizer state across the ranks
(``torch.distributed.fsdp.fully_shard``, one unit per DiT block plus the rest): for a model that does not fit one
GPU (the 14B). DDP keeps a full copy per rank and is the faster choice when the model fits.
"""

from __future__ import annotations

import contextlib
import gc
import os
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from phantom_core.log import logger


@dataclass(frozen=True)
class DistContext:
    """Where this process stands: ``rank`` of ``world_size``, its ``device``; ``owns_group``: we initialised the
    process group (and destroy it at the end)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")
    owns_group: bool = False

    @property
    def is_main(self) -> bool:
        """True on rank 0, the rank that writes files."""
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1 or dist.is_initialized()


def pick_device(choice: str, local_rank: int = 0) -> torch.device:
    """``auto``: ``cuda:<local_rank>`` when CUDA is available, else the CPU; otherwise ``torch.device(choice)``.

    Raises:
        ValueError: an unknown device name, or CUDA asked for where there is none.
    """
    if choice == "auto":
        return torch.device(f"cuda:{local_rank}") if torch.cuda.is_available() else torch.device("cpu")
    try:
        device = torch.device(choice)
    except (RuntimeError, ValueError) as err:
        raise ValueError(f"device is {choice!r}; expected auto, cpu, cuda, cuda:1, ... ({err})") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device is {choice!r} but CUDA is not available here; use auto or cpu")
    return device


def setup_distributed(device_choice: str = "auto") -> DistContext:
    """Join (or start) the process group when launched by torchrun (``WORLD_SIZE`` > 1) or already initialised.

    A single process without torchrun gets ``DistContext(0, 1, ...)`` and no process group.
    """
    world = int(os.environ.get("WORLD_SIZE", "1"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = pick_device(device_choice, local_rank)
    owns = False
    if world > 1 and not dist.is_initialized():
        if device.type == "cuda":
            torch.cuda.set_device(device)
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
        owns = True
    if not dist.is_initialized():
        return DistContext(device=device)
    rank, world = dist.get_rank(), dist.get_world_size()
    logger.info("torch.distributed: rank %d of %d on %s (%s)", rank, world, device, dist.get_backend())
    return DistContext(rank, world, local_rank, device, owns)


def teardown_distributed(ctx: DistContext) -> None:
    """After a distributed run: destroy the process group if ``setup_distributed`` created it, and collect the run's
    DDP / FSDP wrappers (kept alive by reference cycles) that still hold a group, so that gloo's worker threads end
    now and not during interpreter shutdown (where they can abort the process with SIGABRT after the run)."""
    if ctx.owns_group and dist.is_initialized():
        dist.destroy_process_group()
    if ctx.distributed:
        gc.collect()


def wrap_model(model: nn.Module, ctx: DistContext, fsdp: bool) -> nn.Module:
    """The module the loop trains: ``model`` itself (one process), DDP, or FSDP (each of ``model.blocks``
    sharded as its own unit, then the root). FSDP also works on one rank (for testing its path)."""
    if fsdp:
        from torch.distributed.fsdp import fully_shard

        if not dist.is_initialized():
            raise ValueError("fsdp is true but there is no process group; launch with torchrun")
        for block in getattr(model, "blocks", []):
            fully_shard(block)
        return fully_shard(model)
    if not ctx.distributed:
        return model
    ids = [ctx.device] if ctx.device.type == "cuda" else None
    return nn.parallel.DistributedDataParallel(model, device_ids=ids)


def unwrap(model: nn.Module) -> nn.Module:
    """The user's module inside a DDP wrapper (FSDP2 shards in place, so its module is the user's)."""
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model


@contextlib.contextmanager
def gradient_sync(model: nn.Module, sync: bool) -> Iterator[None]:
    """Skip the cross-rank gradient reduction inside this block unless ``sync`` (accumulation micro-steps before
    the last one), for DDP (``no_sync``) and FSDP (``set_requires_gradient_sync``); nothing for a plain module."""
    if isinstance(model, nn.parallel.DistributedDataParallel) and not sync:
        with model.no_sync():
            yield
        return
    if hasattr(model, "set_requires_gradient_sync"):
        model.set_requires_gradient_sync(sync)
    yield


def mean_over_ranks(value: float, ctx: DistContext) -> float:
    """The mean of ``value`` over all ranks (itself on one process); float64 all-reduce on the CPU for gloo."""
    if not ctx.distributed:
        return value
    device = ctx.device if dist.get_backend() == "nccl" else torch.device("cpu")
    t = torch.tensor([value], dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return float(t) / dist.get_world_size()


def gather_objects(obj: Any, ctx: DistContext) -> list[Any]:
    """``[obj of rank 0, obj of rank 1, ...]`` on every rank (``[obj]`` on one process)."""
    if not ctx.distributed:
        return [obj]
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def barrier(ctx: DistContext) -> None:
    """Wait for every rank (nothing on one process)."""
    if ctx.distributed:
        dist.barrier()
