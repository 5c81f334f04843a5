"""Several processes (``torchrun --nproc_per_node=N``): which one this is, on which device, and the
few collectives that training and evaluation share. With one process every helper is a no-op.

Restarts (``torchrun --max-restarts=N``): torchrun's agent hosts the key-value store in which the
processes find each other (``TORCHELASTIC_USE_AGENT_STORE=True``) and keeps it when it restarts
them after a failure, with every key the previous processes wrote. A restarted process that read
them would take a dead peer's address for its new one (gloo: ``connectFullMesh`` refused, or a
hang), so each attempt (``TORCHELASTIC_RESTART_COUNT``) meets under keys of its own. Agents on
several nodes may count restarts differently; there ``TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1`` in
torchrun's environment gives every attempt a fresh store instead.
"""

from __future__ import annotations

import os
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.constants import default_pg_timeout

from .runtime import resolve_device


def device_for_rank(name: str) -> torch.device:
    """The device of this process: ``name`` resolved, with torchrun's LOCAL_RANK picking the GPU."""
    device = resolve_device(name)
    if device.type == "cuda" and "LOCAL_RANK" in os.environ:
        device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
        torch.cuda.set_device(device)
    return device


def init_distributed(device: torch.device) -> tuple[int, int]:
    """(rank, world size); initialises the process group when launched by torchrun."""
    if "WORLD_SIZE" not in os.environ or int(os.environ["WORLD_SIZE"]) == 1:
        return 0, 1
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo", store=attempt_store(),
                                rank=int(os.environ["RANK"]), world_size=int(os.environ["WORLD_SIZE"]))
    return dist.get_rank(), dist.get_world_size()


def attempt_store() -> dist.Store | None:
    """The store of torchrun's agent seen through a prefix of this attempt, so that no key of a
    process that ran before a restart is read; None when the agent shares no store (each attempt
    then gets a fresh one from ``init_process_group``)."""
    if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") != "True":
        return None
    store = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), is_master=False,
                          timeout=default_pg_timeout)
    return dist.PrefixStore(f"fractalgen/attempt_{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}", store)


def gather(value: Any, world: int) -> list[Any]:
    """Every process's ``value`` (picklable), in rank order, on every process."""
    if world == 1:
        return [value]
    values: list[Any] = [None] * world
    dist.all_gather_object(values, value)
    return values


def from_rank0(value: Any, world: int) -> Any:
    """Rank 0's ``value`` (picklable) on every process."""
    if world == 1:
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def mean_and_any(value: torch.Tensor, flag: bool, world: int) -> tuple[torch.Tensor, bool]:
    """The mean of a scalar over the processes, and whether ``flag`` is set on any of them (one
    all-reduce): the loss to log and whether every process stops after this step."""
    if world == 1:
        return value, flag
    both = torch.stack([value.detach().float(), torch.tensor(float(flag), device=value.device)])
    dist.all_reduce(both)
    return both[0] / world, bool(both[1] > 0)


def allreduce_grads(model: nn.Module, world: int, bucket_elems: int = 1 << 24) -> None:
    """Average every parameter's gradient over the processes, in flat buckets (what DDP does
    during backward; used when gradients come from several backward passes)."""
    params = [p for p in model.parameters() if p.requires_grad]
    for p in params:  # every process must send the same buckets
        if p.grad is None:
            p.grad = torch.zeros_like(p)
    grads = [p.grad for p in params]
    start = 0
    while start < len(grads):
        end, size = start, 0
        while end < len(grads) and (end == start or size + grads[end].numel() <= bucket_elems):
            size += grads[end].numel()
            end += 1
        bucket = grads[start:end]
        flat = torch.cat([g.flatten() for g in bucket])
        dist.all_reduce(flat)
        flat /= world
        for g, v in zip(bucket, flat.split([g.numel() for g in bucket])):
            g.copy_(v.view_as(g))
        start = end
