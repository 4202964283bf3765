"""Exact kNN: the reference engine (batched matmul + top-k) with a fused CPU fast path."""
from __future__ import annotations

import os

import torch

from memtrans.memory.base import MemoryBackend


class ExactMemory(MemoryBackend):
    """Brute-force inner-product search over each slot's filled ring prefix.

    Two paths compute the same top-k:
    - fast (default on every CPU with a C++ compiler): `memtrans.memory.fast_topk`, C++ kernels (AVX-512, AVX2,
      portable; the best one this CPU runs) that fuse the score tiles with a running per-query top-k, so the
      [T, n] score row is never materialised. With fp32 scores they are exact (same scores up to fp32
      summation order); with bf16 scores they round the queries to bf16 and sum the products in fp32.
    - reference (`fast=False`, `ExactMemory.use_fast = False`, env MEMTRANS_EXACT_PATH=reference, and the
      fallback whenever no kernel is available, e.g. on CUDA or without a compiler): chunked torch matmul
      (operands in `score_dtype`, fp32 sums and scores) + torch.topk, the score block bounded by
      `max_block_elements`.
    On CPUs with AVX-512 VNNI the fast path first runs an int8 prefilter (`prefilter="int8"`, the default;
    `"none"` or env MEMTRANS_EXACT_PREFILTER=none turns it off): the ring keeps int8 codes of its keys
    (`fast_topk.Int8Codes`, 80 bytes per entry and head next to the 256 of bf16 keys and values; re-encoded
    where `add` writes, rebuilt when the ring grows or is loaded), the kernel scores every entry with VNNI
    int8 products (2x the bf16 rate here), drops those whose approximate score plus a rigorous error bound
    cannot reach the k-th best exact score, and scores the rest exactly. Same top-k, same scores, for both
    score dtypes (so fp32 scores now cost what bf16 ones do). Where keys nearly all score alike (as in the
    trained models we measured) the bound cannot separate them: the kernel notices within a short probe and
    runs the plain kernel for that (slot, head), and this memory remembers it (`_int8_ok`) until the slot is
    reset or `reprobe_every` searches pass.
    Both only score the filled prefix [0, count[b]), so a partly filled memory costs only its filled part.
    """

    name = "exact"
    max_block_elements = 1 << 25  # reference path: scores held at once, B*H*T*chunk (64 MiB in bf16)
    use_fast = os.environ.get("MEMTRANS_EXACT_PATH", "fast") != "reference"  # class-wide default
    default_prefilter = os.environ.get("MEMTRANS_EXACT_PREFILTER", "int8")  # class-wide default
    reprobe_every = 16  # searches after which a (slot, head) that fell back tries the prefilter again

    def __init__(self, *args, fast: bool | None = None, prefilter: str | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        self.fast = self.use_fast if fast is None else fast
        self.prefilter = self.default_prefilter if prefilter is None else prefilter
        if self.prefilter not in ("int8", "none"):
            raise ValueError(f"prefilter must be 'int8' or 'none', got {self.prefilter!r}")
        self._codes = None  # fast_topk.Int8Codes of the ring, built on the first prefiltered search
        # Per (slot, head): 1 = try the int8 prefilter. A (slot, head) whose band was too crowded (it ran the
        # plain kernel) skips the prefilter's probe until its slot is reset or `reprobe_every` searches pass.
        self._int8_ok = torch.ones(self.batch_size, self.heads, dtype=torch.uint8)
        self._searches = 0

    def active_path(self, queries: torch.Tensor | None = None) -> str:
        """'fused-int8', 'fused' or 'reference': which path `search` takes for this ring and score dtype
        (`fast_topk.isa()` names the kernel's ISA level)."""
        return self.explain_path()[0]

    def explain_path(self) -> tuple[str, str]:
        """(path, why): the path `search` takes and the reason, for `memtrans info` and bug reports."""
        from memtrans.memory import fast_topk
        if not self.fast:
            return "reference", "fast=False or MEMTRANS_EXACT_PATH=reference"
        if self.device.type != "cpu":
            return "reference", f"the fused kernels are CPU code; torch matmul + top-k on {self.device.type}"
        if not fast_topk.available():
            return "reference", f"no kernel loaded ({fast_topk.unavailable_reason()})"
        if not fast_topk.supports(self.keys, self.score_dtype):
            return "reference", (f"the kernel does not handle head_dim {self.head_dim}, a {self.dtype} ring with "
                                 f"{self.score_dtype} scores (odd head_dim, or bf16 scores over a non-bf16 ring)")
        if self._use_int8():
            return "fused-int8", f"{fast_topk.isa()} kernel with the exact int8 prefilter (VNNI)"
        why = "" if fast_topk.isa() != "avx512" else (" (prefilter off)" if self.prefilter == "none" else
                                                      " (no VNNI or head_dim % 4 != 0)")
        return "fused", f"{fast_topk.isa()} kernel{why}"

    def _use_int8(self) -> bool:
        from memtrans.memory import fast_topk
        return self.prefilter == "int8" and self.head_dim % 4 == 0 and fast_topk.int8_available()

    def _topk(self, queries: torch.Tensor, k: int, filled: int) -> tuple[torch.Tensor, ...]:
        if self.fast and self.device.type == "cpu":
            from memtrans.memory import fast_topk
            codes = None
            if self.active_path() == "fused-int8":
                if self._codes is None or self._codes.entries != self.keys.shape[2]:
                    self._codes = fast_topk.Int8Codes.of(self.keys)
                codes = self._codes
                self._searches += 1
                if self._searches % self.reprobe_every == 0:
                    self._int8_ok.fill_(1)
            out = fast_topk.topk(queries, self.keys, self.count, k, self.score_dtype, codes=codes, use_int8=self._int8_ok,
                                 values=self.values)
            if out is not None:
                return out
        return self._topk_reference(queries, k, filled)

    # The int8 codes follow the ring: re-encoded where `add` wrote, rebuilt when the ring grows or is loaded.
    def _on_add(self, idx: torch.Tensor) -> None:
        if self._codes is None:
            return
        if self._codes.entries != self.keys.shape[2]:
            self._codes = None
            return
        for b in range(idx.shape[0]):
            self._codes.update(self.keys, b, idx[b])

    def _on_reset(self, slots: torch.Tensor) -> None:
        self._int8_ok[slots] = 1  # a new document: its keys may be spread again

    def load_state_dict(self, d: dict) -> None:
        super().load_state_dict(d)
        self._codes = None

    def _index_nbytes(self) -> int:
        return 0 if self._codes is None else self._codes.nbytes

    def _topk_reference(self, queries: torch.Tensor, k: int, filled: int) -> tuple[torch.Tensor, torch.Tensor]:
        B, H, T, D = queries.shape
        # bf16 scores: bf16 operands summed in fp32, like the fused kernels. Rounding each score to bf16 instead
        # tied the crowded top scores of trained keys (recall@32 0.51-0.83), and ties broke by the matmul's shape,
        # which depends on how full the other slots are: a document's logits then depended on other documents.
        q = queries.to(self.score_dtype).float()
        valid = self._valid_entries(filled)  # [B, filled]
        chunk = max(k, self.max_block_elements // max(1, B * H * T))
        best_s = best_i = None
        for start in range(0, filled, chunk):
            stop = min(filled, start + chunk)
            keys = self.keys[:, :, start:stop].to(self.score_dtype).float()
            s = torch.matmul(q, keys.transpose(-1, -2))  # [B, H, T, n] fp32
            s.masked_fill_(~valid[:, None, None, start:stop], float("-inf"))
            s, i = s.topk(min(k, stop - start), dim=-1)
            i += start
            if best_s is not None:
                s, j = torch.cat([best_s, s], -1).topk(k, dim=-1)
                i = torch.cat([best_i, i], -1).gather(-1, j)
            best_s, best_i = s, i
        return best_s, best_i
