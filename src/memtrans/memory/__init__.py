"""kNN memory backends: one small interface (`add`, `search`, `reset`, `len`, `nbytes`) over several engines."""
from __future__ import annotations

from memtrans.device import DTYPES, model_dtypes
from memtrans.memory.base import MemoryBackend, SearchResult
from memtrans.memory.exact import ExactMemory


def make_memory(cfg, batch_size: int, device="cpu") -> MemoryBackend:
    """Build the memory engine named by `cfg.memory_backend` (a ModelConfig) for `batch_size` slots."""
    args = (batch_size, cfg.heads, cfg.head_dim, cfg.memory_size)
    memory_dtype, score_dtype = model_dtypes(cfg, device)
    kwargs = dict(dtype=memory_dtype, device=device, score_dtype=score_dtype)
    if cfg.memory_backend == "exact":
        return ExactMemory(*args, **kwargs)
    from memtrans.memory import faiss_engines  # faiss is imported only when a faiss engine is asked for

    if cfg.memory_backend == "faiss_flat":
        return faiss_engines.FaissFlatMemory(*args, **kwargs)
    if cfg.memory_backend == "faiss_ivf":
        return faiss_engines.FaissIVFMemory(*args, nlist=cfg.ivf_nlist, nprobe=cfg.ivf_nprobe, **kwargs)
    raise ValueError(f"memory_backend: unknown engine {cfg.memory_backend!r}")


__all__ = ["MemoryBackend", "SearchResult", "ExactMemory", "make_memory", "DTYPES"]
