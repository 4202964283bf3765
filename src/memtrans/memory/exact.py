"""Exact kNN: the reference engine (batched matmul + top-k) with a fused CPU fast path."""
from __future__ import annotations

import contextlib
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
      (operands in `score_dtype`, fp32 sums and scores) + torch.topk, every slot and head in one batched
      matmul per chunk of ring entries, chunks merged by a running top-k on the device (no host reads). The
      fp32 score block is bounded by `max_block_elements` (None = by device: 2**25 on CPU; on CUDA 1/16 of
      the GPU's memory, e.g. 8.8 GB on an H200, so B=8 x 8 heads x 512 queries over 65K entries is one chunk
      and the paper's B=32 over 65K four). On CUDA the fp32 products are IEEE fp32 (TF32 off, whatever
      torch's global setting; `cuda_fp32_precision = "tf32"` opts in), and bf16 operands (bf16 scores, or
      bf16 queries over a bf16 ring, as under bf16 autocast) run as one bf16 matmul with fp32 output where
      torch has it (`bmm(..., out_dtype=float32)`), else upcast: exact either way, since bf16 products are
      exact in fp32. No fused matmul + top-k kernel on CUDA yet (the [B, H, T, chunk] scores are written
      and read once).
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
    max_block_elements: int | None = None  # reference path: fp32 scores held at once, B*H*T*chunk (None: by device)
    cpu_block_elements = 1 << 25  # 128 MiB of fp32 scores
    cuda_memory_fraction = 1 / 16  # of the GPU's total memory for the score block (fixed per GPU: same chunks every run)
    cuda_fp32_precision = "ieee"  # fp32 operands on CUDA: "ieee" (exact) or "tf32" (10-bit mantissa products)
    _bmm_out_dtype = None  # whether torch.bmm(bf16, bf16, out_dtype=float32) runs here (probed once per process)
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

    @property
    def host_path(self) -> bool:
        return self.fast and self.device.type == "cpu"  # the reference path is what CUDA runs: device ops only

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

    def _on_reset(self, slots: list[int]) -> None:
        if self.host_path:  # host state of the CPU kernels
            self._int8_ok[slots] = 1  # a new document: its keys may be spread again

    def load_state_dict(self, d: dict) -> None:
        super().load_state_dict(d)
        self._codes = None

    def _index_nbytes(self) -> int:
        return 0 if self._codes is None else self._codes.nbytes

    def block_elements(self) -> int:
        """fp32 scores the reference path holds at once (see the class docstring)."""
        if self.max_block_elements is not None:
            return self.max_block_elements
        if self.device.type == "cuda":
            total = torch.cuda.get_device_properties(self.device).total_memory  # host-side query, no sync
            return max(self.cpu_block_elements, int(total * self.cuda_memory_fraction) // 4)
        return self.cpu_block_elements

    def _topk_reference(self, queries: torch.Tensor, k: int, filled: int) -> tuple[torch.Tensor, torch.Tensor]:
        B, H, T, D = queries.shape
        # bf16 scores: bf16 operands summed in fp32, like the fused kernels. Rounding each score to bf16 instead
        # tied the crowded top scores of trained keys (recall@32 0.51-0.83), and ties broke by the matmul's shape,
        # which depends on how full the other slots are: a document's logits then depended on other documents.
        # fp32 scores of bf16 queries over a bf16 ring are the same sums of bf16 products: the bf16 matmul computes them
        bf16_operands = self.score_dtype == torch.bfloat16 or (
            self.score_dtype == torch.float32 and queries.dtype == torch.bfloat16 and self.dtype == torch.bfloat16)
        q = queries.to(torch.bfloat16 if bf16_operands else self.score_dtype)
        valid = self._valid_entries(filled)  # [B, filled] on the ring's device
        chunk = max(k, self.block_elements() // max(1, B * H * T))
        best_s = best_i = None
        with self._matmul_precision():
            for start in range(0, filled, chunk):  # ceil(filled / chunk) launches of matmul + topk (+ merge)
                stop = min(filled, start + chunk)
                s = self._scores(q, self.keys[:, :, start:stop], bf16_operands)  # [B, H, T, n] fp32
                if not (self._filled_exact and min(self._filled) >= stop):  # else every slot holds [start, stop)
                    s.masked_fill_(~valid[:, None, None, start:stop], float("-inf"))
                s, i = s.topk(min(k, stop - start), dim=-1)
                i += start
                if best_s is not None:  # running top-k over the candidates so far
                    s, j = torch.cat([best_s, s], -1).topk(k, dim=-1)
                    i = torch.cat([best_i, i], -1).gather(-1, j)
                best_s, best_i = s, i
        return best_s, best_i

    def _scores(self, q: torch.Tensor, keys: torch.Tensor, bf16_operands: bool) -> torch.Tensor:
        """q [B, H, T, D] . keys [B, H, n, D] -> fp32 [B, H, T, n]: fp32 sums of exact products."""
        if bf16_operands and q.device.type != "cpu" and ExactMemory._bmm_out_dtype is not False:  # CUDA (and meta)
            B, H, T, D = q.shape
            try:
                s = torch.bmm(q.reshape(B * H, T, D), keys.to(torch.bfloat16).reshape(B * H, -1, D).transpose(1, 2),
                              out_dtype=torch.float32)
                ExactMemory._bmm_out_dtype = True
                return s.view(B, H, T, -1)
            except (RuntimeError, TypeError):  # an older torch: no bf16 -> fp32 bmm
                ExactMemory._bmm_out_dtype = False
        if bf16_operands:  # TF32 is exact for bf16 values (8-bit significands), so CUDA may use it here
            with _cuda_fp32_precision("tf32") if q.device.type == "cuda" else contextlib.nullcontext():
                return torch.matmul(q.float(), keys.to(torch.bfloat16).float().transpose(-1, -2))
        return torch.matmul(q.float(), keys.to(self.score_dtype).float().transpose(-1, -2))

    def _matmul_precision(self):
        """IEEE fp32 matmuls on CUDA for the fp32 scores (torch's TF32 setting is global; this restores it)."""
        if self.device.type != "cuda":
            return contextlib.nullcontext()
        return _cuda_fp32_precision(self.cuda_fp32_precision)


@contextlib.contextmanager
def _cuda_fp32_precision(value: str):
    m = torch.backends.cuda.matmul
    if hasattr(m, "fp32_precision"):
        old = m.fp32_precision
        m.fp32_precision = value
        try:
            yield
        finally:
            m.fp32_precision = old
    else:  # torch < 2.9
        old = m.allow_tf32
        m.allow_tf32 = value == "tf32"
        try:
            yield
        finally:
            m.allow_tf32 = old
