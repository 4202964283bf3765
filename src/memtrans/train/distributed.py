"""Data-parallel training under `torchrun`: gloo on CPU, NCCL on CUDA.

Each rank owns its own document slots (DocumentStream rank/world_size), XL caches and memories; only
gradients (averaged with one all-reduce per step, i.e. what DDP does, without its module wrapper, which
does not fit a model that carries per-slot state between calls), the logged loss and stop decisions are
shared. Rank 0 writes every file.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist


@dataclass
class DistContext:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    initialized_here: bool = False

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init_distributed(device_kind: str) -> DistContext:
    """Initialise the process group when launched by torchrun (WORLD_SIZE > 1); else a single process."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return DistContext()
    rank, local = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    made = False
    if not dist.is_initialized():
        backend = "nccl" if device_kind == "cuda" else "gloo"
        if device_kind == "cuda":
            torch.cuda.set_device(local)
        dist.init_process_group(backend=backend)
        made = True
    return DistContext(rank, world, local, made)


def shutdown(ctx: DistContext) -> None:
    if ctx.initialized_here and dist.is_initialized():
        dist.destroy_process_group()


def average_gradients(params: list[torch.nn.Parameter], ctx: DistContext) -> None:
    """All-reduce (mean) the gradients of `params` in one flat buffer; missing grads count as zeros."""
    if not ctx.enabled:
        return
    grads = []
    for p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
        grads.append(p.grad)
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat)
    flat /= ctx.world_size
    offset = 0
    for g in grads:
        n = g.numel()
        g.copy_(flat[offset:offset + n].view_as(g))
        offset += n


def mean_scalars(values: list[float], ctx: DistContext, device) -> list[float]:
    if not ctx.enabled:
        return values
    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return (t / ctx.world_size).tolist()


def sum_scalars(values: list[float], ctx: DistContext, device) -> list[float]:
    if not ctx.enabled:
        return values
    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return t.tolist()


def any_flag(flag: bool, ctx: DistContext, device) -> bool:
    """True on every rank when `flag` is true on any rank (for consistent stop decisions)."""
    if not ctx.enabled:
        return flag
    t = torch.tensor([1.0 if flag else 0.0], device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item() > 0)


def broadcast_params(model: torch.nn.Module, ctx: DistContext) -> None:
    if ctx.enabled:
        with torch.no_grad():
            for p in model.parameters():
                dist.broadcast(p.data, 0)


def gather_objects(obj: Any, ctx: DistContext) -> list[Any]:
    """Every rank's `obj` (a list on every rank; for checkpoints of per-rank streams and memories)."""
    if not ctx.enabled:
        return [obj]
    out: list[Any] = [None] * ctx.world_size
    dist.all_gather_object(out, obj)
    return out


def barrier(ctx: DistContext) -> None:
    if ctx.enabled:
        dist.barrier()


def param_checksum(model: torch.nn.Module) -> str:
    """Exact fingerprint of all parameters (sha256 of their bytes), to check ranks stay identical."""
    import hashlib

    h = hashlib.sha256()
    for name, p in sorted(model.named_parameters()):
        h.update(name.encode())
        h.update(p.detach().float().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()[:16]
