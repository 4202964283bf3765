"""Fused exact top-k inner-product search on CPU: C++ kernels (csrc/, package data) built on first use, loaded
with ctypes. This module is the thin loader and the one place that picks the kernel.

The reference path (`ExactMemory._topk_reference`) materialises a [B, H, T, n] score block and calls
`torch.topk`, which costs ~6 ns per score. The kernels instead fuse the score computation with a running
per-query top-k: for every (slot, head) they stream the filled prefix of the ring in L2-sized chunks, compute
a register tile of queries x keys, compare it against each query's current k-th best score with one vector
compare, and only the rare entries that beat it go to a small per-query candidate buffer. The N-wide score
row is never materialised.

Kernels, one library each, best first; one run-time dispatch takes the best this CPU runs and this machine
builds (`MEMTRANS_CPU_ISA=avx2|portable|reference` caps it, so one machine tests the lower paths):
- `avx512` (csrc/topk_avx512.cpp; AVX-512 F/BW/VL + BF16 + FMA): 32-query x 12-key tiles, `vdpbf16ps` for bf16
  scores, FMA for fp32; plus the exact int8 prefilter on VNNI (below).
- `avx2` (csrc/topk_avx2.cpp: csrc/topk_simd8.h built with -mavx2 -mfma): 16-query x 6-key fp32 FMA tiles.
- `portable` (csrc/topk_portable.cpp: the same 8-lane source with baseline flags; ARM64 NEON, any x86-64).
The ISA-neutral parts (candidate buffers, task loop, row gather) are csrc/topk_common.h.

Exactness: an entry is dropped only if its score is <= the query's current threshold, which is the k-th largest
score among entries already seen, hence <= the final k-th largest score. So the result is an exact top-k of
the scores the kernel computes (ties at the k-th score may resolve differently from torch.topk). Scores:
- "fp32" mode: fp32 queries x keys (bf16 keys widened exactly to fp32), fp32 accumulation; equal to the
  reference fp32 scores up to summation order (~1e-7 relative).
- "bf16" mode: queries rounded to bf16, keys bf16, products summed in fp32 (AVX-512 in `vdpbf16ps`, the 8-lane
  kernels by rounding the queries and running fp32 mode). Needs bf16 keys.

int8 prefilter (`topk(..., codes=Int8Codes)`, the default of ExactMemory on CPUs with AVX-512 VNNI): the
ring also keeps int8 codes of its keys (one scale per group of 12 entries). Pass 1 scores every entry with
VNNI int8 products (`vpdpbusd`) as a 32 x 12 integer tile compared against one integer threshold per query;
pass 2 scores the few survivors exactly (the same fp32 products as the plain kernel) and takes their top-k.
An entry is dropped only if a rigorous bound on the int8 error (Cauchy-Schwarz on the stored per-entry code
errors, plus fp32 rounding) proves it cannot reach the k-th best exact score, so the result is the same exact
top-k with the same scores (see the comment in topk_avx512.cpp). It pays only where keys are spread: when a
(slot, head)'s band is crowded (measured on trained models: most keys score alike) a 1,020-entry probe or a
later chunk exceeds its candidate limit and that (slot, head) runs the plain kernel instead.

Build: $CXX (default g++) compiles a library once per (sources, compiler, flags) into $MEMTRANS_EXT_CACHE
(default ~/.cache/memtrans/ext), 4-15 s. A failed build leaves a `.failed` file there, so later processes skip
that level at once and `memtrans info` says why. If no kernel loads, `topk` returns None and the caller uses
the torch reference path.
"""
from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import subprocess
import tempfile
import threading
from dataclasses import dataclass

import torch

# Counters of the int8 prefilter since import: queries searched (x slots x heads), and how many of them were in
# a (slot, head) task whose band was too crowded, so the plain kernel ran instead (benchmarks print them).
stats = {"int8_queries": 0, "int8_fallback_queries": 0}

# Kernel sources (package data, csrc/): one library per ISA level, best first. Each entry: the translation unit,
# the extra compiler flags, and whether this machine can run it at all (asked before the library is loaded).
_CSRC = os.path.join(os.path.dirname(__file__), "csrc")
ISAS = ("avx512", "avx2", "portable")
_X86 = platform.machine().lower() in ("x86_64", "amd64", "i686", "i386")
_ISA_FLAGS = {"avx512": [], "avx2": ["-mavx2", "-mfma"], "portable": []}
# -fno-math-errno lets nearbyintf/sqrt compile to instructions instead of libm calls (the int8 encoding of keys
# and queries spent ~1 ms each per 65K search on the calls); -ffp-contract=fast fuses the 8-lane kernel's
# multiply-adds (ISO C++ mode would keep them apart).
_CXXFLAGS = ["-O3", "-fno-math-errno", "-ffp-contract=fast", "-std=c++17", "-shared", "-fPIC", "-pthread"]
_lock = threading.Lock()
_lib = None  # the loaded library of the active ISA
_isa: str | None = None
_error: str | None = None  # why no kernel loaded at all (then the torch reference path runs)
_failures: dict[str, str] = {}  # ISA -> why it was not used (not this CPU, build failed, forced lower)


def _cache_dir() -> str:
    return os.environ.get("MEMTRANS_EXT_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "memtrans", "ext")


def _sources_digest() -> str:
    h = hashlib.sha256()
    for name in sorted(os.listdir(_CSRC)):
        if name.endswith((".cpp", ".h")):
            with open(os.path.join(_CSRC, name), "rb") as f:
                h.update(name.encode() + f.read())
    return h.hexdigest()


def _cpu_may_run(isa: str) -> str | None:
    """None if this CPU may load `isa`'s library, else why not (the AVX2 library is built for AVX2 throughout,
    so it must not even be loaded elsewhere; the AVX-512 one carries target attributes and asks itself)."""
    if isa == "portable":
        return None
    if not _X86:
        return f"not an x86 CPU ({platform.machine()})"
    cap = torch.backends.cpu.get_cpu_capability()
    if isa == "avx2" and cap not in ("AVX2", "AVX512"):
        return f"CPU lacks AVX2 + FMA (torch reports {cap})"
    if isa == "avx512" and not (cap == "AVX512" and torch.cpu._is_avx512_bf16_supported()):
        return f"CPU lacks AVX-512 with BF16 (torch reports {cap}, AVX512_BF16 " \
               f"{'yes' if torch.cpu._is_avx512_bf16_supported() else 'no'})"  # not built where it cannot run
    return None


def _build(isa: str) -> str:
    """Path of `isa`'s library, compiled once per (sources, compiler, flags). A failed build is remembered in the
    cache (a .failed file with the compiler's message) so that every later process skips it at once; delete the
    file, or change the sources or the compiler, to try again."""
    cxx = os.environ.get("CXX", "g++")
    flags = _CXXFLAGS + _ISA_FLAGS[isa]
    tag = hashlib.sha256((_sources_digest() + cxx + " ".join(flags)).encode()).hexdigest()[:16]
    d = _cache_dir()
    os.makedirs(d, exist_ok=True)
    so = os.path.join(d, f"memtrans_topk_{isa}_{tag}.so")
    failed = so[:-3] + ".failed"
    if os.path.exists(so):
        return so
    if os.path.exists(failed):
        with open(failed) as f:
            raise RuntimeError(f"an earlier build failed ({failed}): {f.read()[-500:]}")
    with tempfile.TemporaryDirectory(dir=d) as tmp:
        out = os.path.join(tmp, "topk.so")
        try:
            r = subprocess.run([cxx, *flags, os.path.join(_CSRC, f"topk_{isa}.cpp"), "-o", out],
                               capture_output=True, text=True, timeout=300)
            message = None if r.returncode == 0 else f"{cxx} failed: {r.stderr[-2000:]}"
        except (OSError, subprocess.TimeoutExpired) as e:
            message = f"{cxx} could not run: {e}"
        if message is not None:
            with open(failed, "w") as f:
                f.write(message)
            raise RuntimeError(message)
        os.replace(out, so)  # atomic: concurrent builders never load a half-written file
    return so


def _open(isa: str):
    lib = ctypes.CDLL(_build(isa))
    lib.mt_isa.restype = ctypes.c_char_p
    lib.mt_cpu_supported.restype = ctypes.c_int
    if not lib.mt_cpu_supported():
        raise RuntimeError("this CPU lacks the instructions it needs")
    lib.mt_topk.restype = ctypes.c_int
    lib.mt_topk.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int, ctypes.c_void_p] + \
        [ctypes.c_int64] * 6 + [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int] + [ctypes.c_void_p] * 3
    lib.mt_gather_rows.restype = None
    lib.mt_gather_rows.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64, ctypes.c_void_p]
    if isa == "avx512":
        lib.mt_available_i8.restype = ctypes.c_int
        lib.mt_topk_i8.restype = ctypes.c_int
        lib.mt_topk_i8.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int] + [ctypes.c_void_p] * 6 + \
            [ctypes.c_int64] * 6 + [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int, ctypes.c_double, ctypes.c_void_p] + \
            [ctypes.c_void_p] * 3
        lib.mt_encode_groups.restype = None
        lib.mt_encode_groups.argtypes = [ctypes.c_void_p, ctypes.c_int] + [ctypes.c_int64] * 6 + [ctypes.c_void_p] * 5
    return lib


def forced_isa() -> str | None:
    """MEMTRANS_CPU_ISA=avx2|portable caps the kernel at that level (as ATEN_CPU_CAPABILITY does for torch), so
    one machine tests the lower paths; `reference` turns the kernels off."""
    v = os.environ.get("MEMTRANS_CPU_ISA", "").strip().lower() or None
    if v is not None and v not in ISAS + ("reference",):
        raise ValueError(f"MEMTRANS_CPU_ISA: {v!r} is not allowed; choose one of {', '.join(ISAS)}, reference")
    return v


def _load():
    """Load the best kernel library this CPU runs and this machine builds (at most the forced level); None if none."""
    global _lib, _isa, _error
    if _lib is not None or _error is not None:
        return _lib
    with _lock:
        if _lib is not None or _error is not None:
            return _lib
        cap = forced_isa()
        if cap == "reference":
            _error = "MEMTRANS_CPU_ISA=reference"
            return None
        for isa in ISAS[ISAS.index(cap) if cap else 0:]:
            why = _cpu_may_run(isa)
            if why is None:
                try:
                    _lib, _isa = _open(isa), isa
                    break
                except Exception as e:  # noqa: BLE001 - any failure: try the next level
                    why = f"{type(e).__name__}: {e}"
            _failures[isa] = why
        if cap:
            for isa in ISAS[:ISAS.index(cap)]:
                _failures[isa] = f"skipped: MEMTRANS_CPU_ISA={cap}"
        if _lib is None:
            _error = "; ".join(f"{k}: {v}" for k, v in _failures.items())
    return _lib


def use_isa(isa: str | None) -> str | None:
    """Switch this process to `isa`'s kernel (None: the best again); returns the active ISA, or None where it
    cannot run here. For tests and benchmarks that compare the paths in one process."""
    global _lib, _isa, _error
    with _lock:
        _lib = _isa = _error = None
        _failures.clear()
    if isa is None:
        _load()
        return _isa
    if isa == "reference":
        _error = "reference forced"
        return None
    why = _cpu_may_run(isa)
    if why is None:
        try:
            _lib, _isa = _open(isa), isa
            return isa
        except Exception as e:  # noqa: BLE001
            why = f"{type(e).__name__}: {e}"
    _failures[isa] = why
    _error = why
    return None


def runnable_isas() -> list[str]:
    """Every kernel level this machine can run and build (best first), for tests that exercise them all; a
    MEMTRANS_CPU_ISA cap applies (`reference`: none), so a forced run simulates the lower machine throughout."""
    cap = forced_isa()
    if cap == "reference":
        return []
    active = isa()
    allowed = ISAS[ISAS.index(cap):] if cap else ISAS
    out = [i for i in allowed if _cpu_may_run(i) is None and _try_open(i)]
    use_isa(active) if active else None
    return out


def _try_open(isa: str) -> bool:
    try:
        _open(isa)
        return True
    except Exception:  # noqa: BLE001
        return False


def isa() -> str | None:
    """The active kernel's ISA level (avx512 | avx2 | portable), or None when the torch reference runs."""
    _load()
    return _isa


def available() -> bool:
    return _load() is not None


def unavailable_reason() -> str | None:
    _load()
    return _error


def failures() -> dict[str, str]:
    """Why each better level than the active one is not used (for `memtrans info`)."""
    _load()
    return dict(_failures)


def gather_rows(table: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """table[rows] for a contiguous CPU table [R, ...] and int64 row ids: the kernel's prefetching copy where it
    is built (3-6x faster than index_select on scattered rows here), else index_select."""
    rows = rows.to(torch.int64).contiguous()
    if table.device.type != "cpu" or not table.is_contiguous() or rows.device.type != "cpu" or _load() is None:
        return table.index_select(0, rows)
    out = torch.empty((rows.numel(),) + tuple(table.shape[1:]), dtype=table.dtype)
    if rows.numel():
        if int(rows.min()) < 0 or int(rows.max()) >= table.shape[0]:
            raise IndexError(f"row ids must lie in [0, {table.shape[0]}), got [{int(rows.min())}, {int(rows.max())}]")
        _lib.mt_gather_rows(table.data_ptr(), rows.data_ptr(), rows.numel(), table[0].numel() * table.element_size(),
                            out.data_ptr())
    return out


def int8_available() -> bool:
    """Whether the int8 (AVX-512 VNNI) prefilter can run on this CPU."""
    return available() and _isa == "avx512" and bool(_lib.mt_available_i8())


GROUP = 12  # entries per shared code scale; equals the kernel's tile width (GROUP in _SRC)


@dataclass
class Int8Codes:
    """int8 codes of a key ring for the prefilter: k ~ scale * codes, one scale per group of GROUP ring entries
    [GROUP*g, GROUP*g + GROUP) (so a kernel tile compares integers against one threshold). err = |k - scale *
    codes| and norm = |k|, computed in double from the stored codes, give the kernel its error bound; they do
    not depend on how the scale was chosen, so stale entries in a group only cost precision, never correctness.
    corr = -128 * sum(codes) per entry: the kernel's products take the queries as unsigned bytes (q + 128) and
    start from corr, so they end at the signed product."""
    codes: torch.Tensor  # int8 [B, H, N, D], in [-127, 127]
    corr: torch.Tensor  # int32 [B, H, N]
    scale: torch.Tensor  # fp32 [B, H, N], equal within a group
    err: torch.Tensor  # fp32 [B, H, N]
    norm: torch.Tensor  # fp32 [B, H, N]

    @classmethod
    def of(cls, keys: torch.Tensor) -> "Int8Codes":
        """Codes of a whole ring [B, H, N, D] (contiguous CPU, bf16 or fp32; needs the kernel library)."""
        B, H, N, D = keys.shape
        out = cls(torch.empty(B, H, N, D, dtype=torch.int8), torch.empty(B, H, N, dtype=torch.int32), torch.empty(B, H, N),
                  torch.empty(B, H, N), torch.empty(B, H, N))
        out._encode(keys, 0, B * H, 0, (N + GROUP - 1) // GROUP)
        return out

    def update(self, keys: torch.Tensor, slot: int, entries: torch.Tensor) -> None:
        """After the ring entries `entries` of `slot` were written: re-encode the groups they touch."""
        H = keys.shape[1]
        g = torch.unique(entries // GROUP).tolist()  # sorted; a FIFO write touches one or two runs of groups
        start = 0
        for i in range(1, len(g) + 1):
            if i == len(g) or g[i] != g[i - 1] + 1:
                self._encode(keys, slot * H, (slot + 1) * H, g[start], g[i - 1] + 1)
                start = i

    def _encode(self, keys: torch.Tensor, r0: int, r1: int, g0: int, g1: int) -> None:
        if _load() is None or keys.device.type != "cpu" or not keys.is_contiguous() or keys.dtype not in (torch.bfloat16, torch.float32):
            raise RuntimeError("Int8Codes needs the fused kernel library and a contiguous bf16/fp32 CPU ring")
        B, H, N, D = keys.shape
        _lib.mt_encode_groups(keys.data_ptr(), int(keys.dtype == torch.bfloat16), N, D, r0, r1, g0, g1,
                              self.codes.data_ptr(), self.corr.data_ptr(), self.scale.data_ptr(), self.err.data_ptr(),
                              self.norm.data_ptr())

    @property
    def entries(self) -> int:
        return self.codes.shape[2]

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.codes, self.corr, self.scale, self.err, self.norm))


def supports(keys: torch.Tensor, score_dtype: torch.dtype) -> bool:
    """Whether the kernel handles this ring (CPU, contiguous bf16/fp32 keys, even head_dim) and score dtype."""
    if keys.device.type != "cpu" or not keys.is_contiguous() or keys.shape[-1] % 2:
        return False
    if score_dtype == torch.bfloat16:
        ok = keys.dtype == torch.bfloat16
    else:
        ok = score_dtype == torch.float32 and keys.dtype in (torch.bfloat16, torch.float32)
    return ok and available()


def topk(queries: torch.Tensor, keys: torch.Tensor, counts: torch.Tensor, k: int, score_dtype: torch.dtype,
         threads: int | None = None, codes: Int8Codes | None = None,
         int8_budget: float = 1.0, use_int8: torch.Tensor | None = None,
         values: torch.Tensor | None = None) -> tuple[torch.Tensor, ...] | None:
    """Exact top-k of queries [B,H,T,D] against each slot's filled ring prefix keys[b, :, :counts[b]].

    With `codes` (the ring's Int8Codes, head_dim % 4 == 0, VNNI CPU) an int8 prefilter drops the entries that
    provably cannot enter the top-k and only the rest are scored exactly; the result is the same top-k. A
    (slot, head) whose candidates exceed int8_budget x the kernel's limits (keys that nearly all score alike,
    as in some trained heads) switches to the plain kernel; inf never switches, 0 always does (tests).
    `use_int8` (uint8 [B, H], updated in place) lets a caller remember which (slot, head)s fell back: 0 runs
    the plain kernel straight away.
    Returns (scores fp32 [B,H,T,k], ring indices int64 [B,H,T,k]) with -inf / 0 where a slot holds fewer
    than k entries, or None when the kernel cannot handle the inputs (the caller then falls back). With
    `values` (the value ring, the keys' dtype and shape) it also returns the retrieved rows, keys and values
    [B,H,T,k,D] (row 0 where invalid), gathered per (slot, head) right after its search while the key rows are
    still in cache.
    """
    if not supports(keys, score_dtype):
        return None
    if values is not None and (values.dtype != keys.dtype or values.shape != keys.shape or not values.is_contiguous()
                               or values.device != keys.device):
        raise ValueError(f"values must be a contiguous ring like keys {tuple(keys.shape)} {keys.dtype}, "
                         f"got {tuple(values.shape)} {values.dtype}")
    B, H, T, D = queries.shape
    mode = 0 if score_dtype == torch.bfloat16 else 1
    counts = counts.to(torch.int64).contiguous()
    out_s = torch.empty(B, H, T, k, dtype=torch.float32)
    out_i = torch.empty(B, H, T, k, dtype=torch.int64)
    nthreads = int(threads or torch.get_num_threads())
    rows = () if values is None else (torch.empty(B, H, T, k, D, dtype=keys.dtype), torch.empty(B, H, T, k, D, dtype=keys.dtype))
    row_ptrs = (None, None, None) if values is None else (values.data_ptr(), rows[0].data_ptr(), rows[1].data_ptr())
    if codes is not None and D % 4 == 0 and codes.entries == keys.shape[2] and int8_available():
        # exact scores use the same operands as the plain kernel: bf16-rounded queries in bf16 mode
        q = queries.detach().to(torch.bfloat16 if mode == 0 else torch.float32).float().contiguous()
        flags = torch.ones(B, H, dtype=torch.uint8) if use_int8 is None else use_int8
        if flags.dtype != torch.uint8 or flags.shape != (B, H) or not flags.is_contiguous():
            raise ValueError(f"use_int8 must be a contiguous uint8 tensor of shape {(B, H)}")
        rc = _lib.mt_topk_i8(mode, q.data_ptr(), keys.data_ptr(), int(keys.dtype == torch.bfloat16), codes.codes.data_ptr(),
                             codes.corr.data_ptr(), codes.scale.data_ptr(), codes.err.data_ptr(), codes.norm.data_ptr(),
                             counts.data_ptr(), B, H, T, D, keys.shape[2], k, out_s.data_ptr(), out_i.data_ptr(),
                             nthreads, float(int8_budget), flags.data_ptr(), *row_ptrs)
        if rc < 0:
            return None
        stats["int8_queries"] += B * H * T
        stats["int8_fallback_queries"] += rc
        return (out_s, out_i) + rows
    if mode == 0 and _isa != "avx512":  # the 8-lane kernels sum bf16 operands as fp32: round the queries first
        q, mode = queries.detach().to(torch.bfloat16).float().contiguous(), 1
    else:
        q = queries.detach().to(torch.bfloat16 if mode == 0 else torch.float32).contiguous()
    rc = _lib.mt_topk(mode, q.data_ptr(), keys.data_ptr(), int(keys.dtype == torch.bfloat16), counts.data_ptr(),
                      B, H, T, D, keys.shape[2], k, out_s.data_ptr(), out_i.data_ptr(),
                      nthreads, *row_ptrs)
    if rc != 0:
        return None
    return (out_s, out_i) + rows
