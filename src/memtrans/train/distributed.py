"""Data-parallel training under `torchrun`: gloo on CPU, NCCL on CUDA.

Each rank owns its own document slots (DocumentStream rank/world_size), XL caches and memories, and saves
and restores them itself (one checkpoint file per rank, see trainer.checkpoint); nothing of them passes
through another rank. Gradients are averaged by torch's DistributedDataParallel, bucket by bucket while
backward runs (`wrap_model`); the logged loss, token counts and stop decisions are all-reduced scalars.
Rank 0 writes every shared file (config, metrics, status, summary, the shared checkpoint).
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


def wrap_model(model: torch.nn.Module, ctx: DistContext) -> torch.nn.Module:
    """The module the training step calls: `model` itself in one process, else DistributedDataParallel over it
    (which broadcasts rank 0's parameters now and all-reduces gradients during backward).

    The model's stateful forward `(tokens, state) -> (logits, state)` passes through DDP unchanged: with
    device_ids=None DDP moves no inputs (they are on the rank's device already), and it looks for tensors in
    the output only to find the parameters the step used (the state's XL caches are detached; memories hold
    no graph). find_unused_parameters=True keeps any config whose step leaves a parameter unused working,
    and it keeps the bucket layout fixed (DDP rebuilds buckets only without it), so a resumed run reduces
    exactly as the uninterrupted one. No buffers are broadcast (the model has none that change).
    """
    if not ctx.enabled:
        return model
    from torch.nn.parallel import DistributedDataParallel

    return DistributedDataParallel(model, device_ids=None, broadcast_buffers=False, find_unused_parameters=True)


def any_failed(error: BaseException | None, ctx: DistContext, device, what: str) -> None:
    """A collective check after a step that may fail on some ranks only (writing or reading a rank's own
    file): every rank raises when any rank failed (its own error, or a ValueError naming `what`), so that no
    rank waits forever in the next collective. No-op in one process (the error, if any, is raised)."""
    if not ctx.enabled:
        if error is not None:
            raise error
        return
    failed = any_flag(error is not None, ctx, device)
    if error is not None:
        raise error
    if failed:
        raise ValueError(f"another rank failed {what} (its message says why); rank {ctx.rank} stopped too")


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


def gather_objects(obj: Any, ctx: DistContext) -> list[Any]:
    """Every rank's `obj` (a list on every rank); for small objects only (parameter checksums), never memories."""
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
