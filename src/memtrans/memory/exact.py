"""Exact kNN: the reference engine (batched matmul + top-k) with a fused CPU fast path."""
from __future__ import annotations

import os

import torch

from memtrans.memory.base import MemoryBackend


class ExactMemory(MemoryBackend):
    """Brute-force inner-product search over each slot's filled ring prefix.

    Two paths compute the same top-k:
    - fast (default on CPUs with AVX-512 BF16): `memtrans.memory.fast_topk`, a C++ kernel that fuses the
      score tiles with a running per-query top-k, so the [T, n] score row is never materialised. With
      fp32 scores it is exact (same scores up to fp32 summation order); with bf16 scores it rounds the
      queries to bf16 like the reference but accumulates products in fp32 instead of rounding each score
      to bf16, so its recall against fp32 is at least the reference bf16 path's.
    - reference (`fast=False`, `ExactMemory.use_fast = False`, env MEMTRANS_EXACT_PATH=reference, and the
      fallback whenever the kernel is unavailable, e.g. on CUDA or without a compiler): chunked torch
      matmul in `score_dtype` + torch.topk, the score block bounded by `max_block_elements`.
    Both only score the filled prefix [0, count[b]), so a partly filled memory costs only its filled part.
    """

    name = "exact"
    max_block_elements = 1 << 25  # reference path: scores held at once, B*H*T*chunk (64 MiB in bf16)
    use_fast = os.environ.get("MEMTRANS_EXACT_PATH", "fast") != "reference"  # class-wide default

    def __init__(self, *args, fast: bool | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        self.fast = self.use_fast if fast is None else fast

    def active_path(self, queries: torch.Tensor | None = None) -> str:
        """'fused' or 'reference': which path `search` takes for this memory's ring and score dtype."""
        if not self.fast or self.device.type != "cpu":
            return "reference"
        from memtrans.memory import fast_topk
        return "fused" if fast_topk.supports(self.keys, self.score_dtype) else "reference"

    def _topk(self, queries: torch.Tensor, k: int, filled: int) -> tuple[torch.Tensor, torch.Tensor]:
        if self.fast and self.device.type == "cpu":
            from memtrans.memory import fast_topk
            out = fast_topk.topk(queries, self.keys, self.count, k, self.score_dtype)
            if out is not None:
                return out
        return self._topk_reference(queries, k, filled)

    def _topk_reference(self, queries: torch.Tensor, k: int, filled: int) -> tuple[torch.Tensor, torch.Tensor]:
        B, H, T, D = queries.shape
        q = queries.to(self.score_dtype)
        valid = self._valid_entries(filled)  # [B, filled]
        chunk = max(k, self.max_block_elements // max(1, B * H * T))
        best_s = best_i = None
        for start in range(0, filled, chunk):
            stop = min(filled, start + chunk)
            keys = self.keys[:, :, start:stop].to(self.score_dtype)
            s = torch.matmul(q, keys.transpose(-1, -2)).float()  # [B, H, T, n]
            s.masked_fill_(~valid[:, None, None, start:stop], float("-inf"))
            s, i = s.topk(min(k, stop - start), dim=-1)
            i += start
            if best_s is not None:
                s, j = torch.cat([best_s, s], -1).topk(k, dim=-1)
                i = torch.cat([best_i, i], -1).gather(-1, j)
            best_s, best_i = s, i
        return best_s, best_i
