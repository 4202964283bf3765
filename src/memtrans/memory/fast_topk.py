"""Fused exact top-k inner-product search on CPU (a small C++ kernel built on first use, loaded with ctypes).

The reference path (`ExactMemory._topk_reference`) materialises a [B, H, T, n] score block and calls
`torch.topk`, which costs ~6 ns per score here and dominates. This kernel instead fuses the score
computation with a running per-query top-k: for every (slot, head) it streams the filled prefix of the
ring in L2-sized chunks, computes a register tile of 32 queries x 12 keys (AVX-512: `vdpbf16ps` for
bf16 scores, `vfmadd231ps` for fp32 scores, both accumulating in fp32), compares the tile against each
query's current k-th best score with one vector compare, and only the rare entries that beat it are
written to a small per-query candidate buffer (4k entries, compacted to the best k with nth_element
when full). The N-wide score row is never materialised.

Exactness: an entry is dropped only if its score is <= the query's current threshold, which is the
k-th largest score among entries already seen, hence <= the final k-th largest score. So the result
is an exact top-k of the scores the kernel computes (ties at the k-th score may resolve differently
from torch.topk). Scores:
- "fp32" mode: fp32 queries x keys (bf16 keys widened exactly to fp32), fp32 accumulation; equal to the
  reference fp32 scores up to summation order (~1e-7 relative).
- "bf16" mode: queries rounded to bf16 (as the reference does), keys bf16, products accumulated in fp32
  (the reference instead rounds every *score* to bf16, which creates ties and loses recall); recall@32
  vs fp32 is therefore at least as high as the reference bf16 path's. Needs bf16 keys.

int8 prefilter (`topk(..., codes=Int8Codes)`, the default of ExactMemory on CPUs with AVX-512 VNNI): the
ring also keeps int8 codes of its keys (one scale per group of 12 entries). Pass 1 scores every entry with
VNNI int8 products (`vpdpbusd`, twice the bf16 rate here) as a 32 x 12 integer tile compared against one
integer threshold per query; pass 2 scores the few survivors exactly (the same fp32 products as the plain
kernel) and takes their top-k. An entry is dropped only if a rigorous bound on the int8 error (Cauchy-
Schwarz on the stored per-entry code errors, plus fp32 rounding) proves it cannot reach the k-th best
exact score, so the result is the same exact top-k with the same scores (see the comment in _SRC). It pays
only where keys are spread: when a (slot, head)'s band is crowded (measured on trained models: most keys
score alike) a 1,020-entry probe or a later chunk exceeds its candidate limit (chosen by measurement) and
that (slot, head) runs the plain kernel instead.

Build: g++ (>= 10) compiles the source below once per source hash into $MEMTRANS_EXT_CACHE (default
~/.cache/memtrans/ext), a few seconds (7 s measured here under load); functions carry AVX-512 target attributes and `available()` checks the
CPU at run time. If anything fails, `topk` returns None and the caller uses the torch reference path.
"""
from __future__ import annotations

import ctypes
import hashlib
import os
import subprocess
import tempfile
import threading
import warnings
from dataclasses import dataclass

import torch

_SRC = r"""
#include <immintrin.h>
#include <stdint.h>
#include <string.h>
#include <math.h>
#include <vector>
#include <algorithm>
#include <thread>
#include <functional>
#include <new>
#include <atomic>

namespace {

const int QB = 32;     // queries per register tile (2 x 16 lanes)
const int NK = 12;     // keys per register tile
const int GROUP = 12;  // int8 prefilter: keys per tile and per shared code scale (memtrans.memory.fast_topk.GROUP)

struct Cand { float s; int64_t i; };
// Ranking order: higher score first, ties to the lower ring index (a functor, so the sorts inline it).
struct Better { bool operator()(const Cand& a, const Cand& b) const { return a.s > b.s || (a.s == b.s && a.i < b.i); } };
// The Better order as one unsigned integer (larger ranks first): the score's bits mapped to an order-preserving
// uint32 above the complemented ring index (so ties go to the lower index). Ring indices are < 2^32.
inline uint64_t rank_key(const Cand& c) {
    uint32_t u; memcpy(&u, &c.s, 4);
    u ^= (u >> 31) ? 0xFFFFFFFFu : 0x80000000u;
    return ((uint64_t)u << 32) | (uint32_t)~(uint32_t)c.i;
}
inline Cand rank_cand(uint64_t r) {
    uint32_t u = (uint32_t)(r >> 32);
    u ^= (u >> 31) ? 0x80000000u : 0xFFFFFFFFu;
    float s; memcpy(&s, &u, 4);
    return Cand{s, (int64_t)(uint32_t)~(uint32_t)r};
}
inline float bf16_to_float(uint16_t h) { uint32_t u = (uint32_t)h << 16; float f; memcpy(&f, &u, 4); return f; }
template <class T> struct Aligned64 {  // allocator for vectors read with aligned 512-bit loads
    using value_type = T;
    Aligned64() = default;
    template <class U> Aligned64(const Aligned64<U>&) {}
    T* allocate(size_t n) { return static_cast<T*>(::operator new(n * sizeof(T), std::align_val_t(64))); }
    void deallocate(T* p, size_t) { ::operator delete(p, std::align_val_t(64)); }
    template <class U> bool operator==(const Aligned64<U>&) const { return true; }
    template <class U> bool operator!=(const Aligned64<U>&) const { return false; }
};

struct TopK {  // candidate buffers of `nq` queries, `cap` entries each
    int k, cap;
    std::vector<float> s; std::vector<int64_t> i; std::vector<int> n; std::vector<float> thr;
    std::vector<Cand> tmp;
    TopK(int nq, int k_, int cap_) : k(k_), cap(cap_), s((size_t)nq * cap_), i((size_t)nq * cap_), n(nq, 0),
                                     thr(nq, -INFINITY), tmp(cap_) {}
    void compact(int q) {
        int m = n[q];
        float* ps = &s[(size_t)q * cap]; int64_t* pi = &i[(size_t)q * cap];
        for (int t = 0; t < m; t++) tmp[t] = Cand{ps[t], pi[t]};
        if (m > k) { std::nth_element(tmp.begin(), tmp.begin() + (k - 1), tmp.begin() + m, Better()); m = k; }
        for (int t = 0; t < m; t++) { ps[t] = tmp[t].s; pi[t] = tmp[t].i; }
        n[q] = m;
        if (m == k) { float lo = ps[0]; for (int t = 1; t < m; t++) lo = std::min(lo, ps[t]); thr[q] = lo; }
    }
    inline void push(int q, float v, int64_t idx) {
        size_t o = (size_t)q * cap + n[q];
        s[o] = v; i[o] = idx;
        if (++n[q] == cap) compact(q);
    }
    void finish(int q, float* out_s, int64_t* out_i, int kk) {  // best kk, descending
        int m = n[q];
        float* ps = &s[(size_t)q * cap]; int64_t* pi = &i[(size_t)q * cap];
        for (int t = 0; t < m; t++) tmp[t] = Cand{ps[t], pi[t]};
        int r = std::min(m, kk);
        std::partial_sort(tmp.begin(), tmp.begin() + r, tmp.begin() + m, Better());
        for (int t = 0; t < kk; t++) {
            out_s[t] = t < r ? tmp[t].s : -INFINITY;
            out_i[t] = t < r ? tmp[t].i : 0;
        }
    }
};

// Rare path: some lanes of the tile beat their query's threshold. s holds [NKT][32] scores, m the lane masks.
__attribute__((noinline))
void insert(TopK& tk, int qoff, const float* s, const uint32_t* masks, int nkt, int64_t idx0) {
    for (int t = 0; t < nkt; t++) {
        for (uint32_t m = masks[t]; m; m &= m - 1) {
            int l = __builtin_ctz(m), q = qoff + l;
            if (s[t * 32 + l] > tk.thr[q]) tk.push(q, s[t * 32 + l], idx0 + t);  // thresholds only rise
        }
    }
}

// One register tile: 32 queries (two 16-lane blocks) x NKT keys starting at chunk row j.
// MODE 0: bf16 x bf16 (vdpbf16ps), qp holds [D/2][16] uint32 bf16 pairs per block; keys bf16 [n][D].
// MODE 1: fp32 x fp32 (fma), qp holds [D][16] floats per block; keys fp32 [n][D].
// Accumulators are named variables (a GCC array of __m512 here stayed in memory).
#define MT_DECL(t) __m512 a0_##t = _mm512_setzero_ps(), a1_##t = _mm512_setzero_ps();
#define MT_BF(t) if (NKT > t) { __m512bh y = (__m512bh)_mm512_set1_epi32((int)kk[t * P + p]); \
    a0_##t = _mm512_dpbf16_ps(a0_##t, x0, y); a1_##t = _mm512_dpbf16_ps(a1_##t, x1, y); }
#define MT_FM(t) if (NKT > t) { __m512 y = _mm512_set1_ps(kk[t * D + d]); \
    a0_##t = _mm512_fmadd_ps(x0, y, a0_##t); a1_##t = _mm512_fmadd_ps(x1, y, a1_##t); }
#define MT_CHK(t) if (NKT > t) { masks[t] = (uint32_t)_mm512_cmp_ps_mask(a0_##t, thr0, _CMP_GT_OQ) | \
    ((uint32_t)_mm512_cmp_ps_mask(a1_##t, thr1, _CMP_GT_OQ) << 16); any |= masks[t]; }
#define MT_ST(t) if (NKT > t) { _mm512_store_ps(buf + t * 32, a0_##t); _mm512_store_ps(buf + t * 32 + 16, a1_##t); }
#define MT_ALL(M) M(0) M(1) M(2) M(3) M(4) M(5) M(6) M(7) M(8) M(9) M(10) M(11)

template <int MODE, int NKT, int DD>
__attribute__((target("avx512f,avx512bw,avx512vl,avx512bf16,fma"), always_inline)) inline
void tile(const void* qp0, const void* qp1, const void* kp, int Drt, int64_t j, int64_t jbase,
          TopK& tk, int qoff, __m512& thr0, __m512& thr1) {
    static_assert(NKT <= 12, "tile width");
    const int D = DD ? DD : Drt;  // compile-time head_dim where it is common
    MT_ALL(MT_DECL)
    if (MODE == 0) {
        const int P = D / 2;
        const uint32_t* a0 = (const uint32_t*)qp0; const uint32_t* a1 = (const uint32_t*)qp1;
        const uint32_t* kk = (const uint32_t*)kp + (size_t)j * P;
        for (int p = 0; p < P; p++) {
            __m512bh x0 = (__m512bh)_mm512_loadu_si512(a0 + p * 16);
            __m512bh x1 = (__m512bh)_mm512_loadu_si512(a1 + p * 16);
            MT_ALL(MT_BF)
        }
    } else {
        const float* a0 = (const float*)qp0; const float* a1 = (const float*)qp1;
        const float* kk = (const float*)kp + (size_t)j * D;
        for (int d = 0; d < D; d++) {
            __m512 x0 = _mm512_loadu_ps(a0 + d * 16), x1 = _mm512_loadu_ps(a1 + d * 16);
            MT_ALL(MT_FM)
        }
    }
    // No call while accumulators are live (a call would make GCC keep all of them on the stack).
    uint32_t masks[NKT], any = 0;
    MT_ALL(MT_CHK)
    if (__builtin_expect(any != 0, 0)) {
        alignas(64) float buf[NKT * 32];
        MT_ALL(MT_ST)
        insert(tk, qoff, buf, masks, NKT, jbase + j);
        thr0 = _mm512_loadu_ps(&tk.thr[qoff]); thr1 = _mm512_loadu_ps(&tk.thr[qoff + 16]);
    }
}

template <int MODE, int DD>
__attribute__((target("avx512f,avx512bw,avx512vl,avx512bf16,fma")))
void run_task(const void* q, const void* keys, int keys_bf16, int64_t n, int T, int D, int q0, int q1, int k,
              float* out_s, int64_t* out_i, int kk) {
    const int nq = q1 - q0, nb = (nq + QB - 1) / QB, W = MODE == 0 ? D / 2 : D;  // W words per query
    // pack queries: blocks of 16 lanes, [block16][W][16]; padded lanes are zero and get threshold +inf
    std::vector<uint32_t> qp((size_t)nb * 2 * W * 16, 0);
    for (int t = 0; t < nq; t++) {
        int blk = t / 16, lane = t % 16;
        const uint32_t* src = (const uint32_t*)q + (size_t)(q0 + t) * W;  // bf16 pairs or fp32 words
        for (int w = 0; w < W; w++) qp[((size_t)blk * W + w) * 16 + lane] = src[w];
    }
    TopK tk(nb * QB, k, std::max(4 * k, 64));
    for (int t = nq; t < nb * QB; t++) tk.thr[t] = INFINITY;
    const int64_t KC = MODE == 0 ? 2048 : 1024;
    std::vector<float> kbuf(MODE == 1 && keys_bf16 ? (size_t)KC * D : 0);
    for (int64_t c0 = 0; c0 < n; c0 += KC) {
        int64_t c1 = std::min(n, c0 + KC), len = c1 - c0;
        const void* kp;
        if (MODE == 0) kp = (const uint16_t*)keys + (size_t)c0 * D;
        else if (!keys_bf16) kp = (const float*)keys + (size_t)c0 * D;
        else {
            const uint16_t* src = (const uint16_t*)keys + (size_t)c0 * D;
            uint32_t* dst = (uint32_t*)kbuf.data();
            for (int64_t e = 0; e < len * D; e++) dst[e] = (uint32_t)src[e] << 16;
            kp = kbuf.data();
        }
        for (int b = 0; b < nb; b++) {
            const uint32_t* qa = &qp[(size_t)(2 * b) * W * 16];
            const uint32_t* qb = &qp[(size_t)(2 * b + 1) * W * 16];
            __m512 thr0 = _mm512_loadu_ps(&tk.thr[b * QB]), thr1 = _mm512_loadu_ps(&tk.thr[b * QB + 16]);
            int64_t j = 0;
            for (; j + NK <= len; j += NK) tile<MODE, NK, DD>(qa, qb, kp, D, j, c0, tk, b * QB, thr0, thr1);
            for (; j < len; j++) tile<MODE, 1, DD>(qa, qb, kp, D, j, c0, tk, b * QB, thr0, thr1);
        }
    }
    for (int t = 0; t < nq; t++) tk.finish(t, out_s + (size_t)t * kk, out_i + (size_t)t * kk, kk);
}


// ---- int8 prefilter + exact re-rank --------------------------------------------------------------------
// Approximate score a = s_q * s_k * (qhat . khat): int8 codes, one scale per query and one per group of
// GROUP keys, products on VNNI (vpdpbusd: 2x the bf16 rate here). The kernel works in f = a / s_q (so the
// per-query scale drops out of the tile). For query x and key k with codes (s_q, qhat) and (s_k, khat),
// |x.k - a| <= |x|.|k - s_k khat| + |s_k khat|.|x - s_q qhat| <= |x| e_k + (|k| + e_k) e_q (Cauchy-Schwarz),
// so E_q = |x| max e_k + (max |k| + max e_k) e_q, inflated to cover fp32 rounding, bounds the error for every
// key. If A is the k-th best approximate score, k entries have exact score >= A - E_q, so the exact k-th best
// is >= A - E_q and an entry with a < A - 2 E_q has exact score < A - E_q: it cannot enter the top-k.
// Pass 1 keeps, per query, every entry within 2 E_q of the running k-th best a (which only rises, so
// nothing needed is dropped); pass 2 scores the survivors exactly (fp32 products of the same operands as
// the plain kernel) and takes their top-k. The result is the exact top-k of the exact scores.
// What it costs (one thread, 65K entries x 8 heads x 512 queries): the tiles alone run at ~93% of the
// vpdpbusd peak (~100 ms); the rest is the candidates: ~450 per query pass the bound (k ln(n/k) ~ 275 new
// k-th bests plus the 2 E_q band), at ~24 ns each (tile entry, log, compaction, exact re-rank). A tighter
// bound per key (lower side) or per group (upper side) was measured and cost more than it saved.

// max |x[d]| over D floats.
__attribute__((target("avx512f")))
inline float max_abs(const float* x, int D) {
    __m512 m = _mm512_setzero_ps();
    for (int d = 0; d < D; d += 16) {
        const __mmask16 k = D - d >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << (D - d)) - 1);
        m = _mm512_max_ps(m, _mm512_abs_ps(_mm512_maskz_loadu_ps(k, x + d)));
    }
    return _mm512_reduce_max_ps(m);
}

// The int8 code of D floats at scale s: c[d] = round-half-even(x[d] / s) clamped to [-127, 127]. Returns
// sum(c) and adds |x - s c|^2 and |x|^2, computed in double, to e2 and n2 (vectorised: the scalar loop, a
// division and a libm call per value, took ~1 ms per 4K keys or queries here).
__attribute__((target("avx512f,avx512dq")))
inline int quantize(const float* x, int D, float s, int32_t* c, double& e2, double& n2) {
    const __m512 sv = _mm512_set1_ps(s);
    const __m512d sd = _mm512_set1_pd((double)s);
    __m512d ea = _mm512_setzero_pd(), na = _mm512_setzero_pd();
    __m512i sum = _mm512_setzero_si512();
    for (int d = 0; d < D; d += 16) {
        const __mmask16 k = D - d >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << (D - d)) - 1);
        const __m512 v = _mm512_maskz_loadu_ps(k, x + d);
        __m512i q = _mm512_cvt_roundps_epi32(_mm512_div_ps(v, sv), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
        q = _mm512_min_epi32(_mm512_max_epi32(q, _mm512_set1_epi32(-127)), _mm512_set1_epi32(127));
        _mm512_mask_storeu_epi32(c + d, k, q);
        sum = _mm512_add_epi32(sum, q);  // masked-off lanes load 0 and quantize to 0
        for (int h = 0; h < 2; h++) {
            const __m512d vd = _mm512_cvtps_pd(h ? _mm512_extractf32x8_ps(v, 1) : _mm512_castps512_ps256(v));
            const __m512d qd = _mm512_cvtepi32_pd(h ? _mm512_extracti32x8_epi32(q, 1) : _mm512_castsi512_si256(q));
            const __m512d r = _mm512_sub_pd(vd, _mm512_mul_pd(sd, qd));
            ea = _mm512_add_pd(ea, _mm512_mul_pd(r, r));
            na = _mm512_add_pd(na, _mm512_mul_pd(vd, vd));
        }
    }
    e2 += _mm512_reduce_add_pd(ea); n2 += _mm512_reduce_add_pd(na);
    return _mm512_reduce_add_epi32(sum);
}

__attribute__((target("avx512f,avx512bw,avx512vl,fma")))
inline float dot_exact(const float* x, const void* keys, int keys_bf16, int64_t j, int D) {
    __m512 acc = _mm512_setzero_ps();
    for (int d = 0; d < D; d += 16) {
        const __mmask16 m = D - d >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << (D - d)) - 1);
        __m512 a = _mm512_maskz_loadu_ps(m, x + d), b;
        if (keys_bf16) {
            __m256i h = _mm256_maskz_loadu_epi16(m, (const uint16_t*)keys + (size_t)j * D + d);
            b = _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
        } else {
            b = _mm512_maskz_loadu_ps(m, (const float*)keys + (size_t)j * D + d);
        }
        acc = _mm512_fmadd_ps(a, b, acc);
    }
    return _mm512_reduce_add_ps(acc);
}

// The candidates of one block of QB queries, as parallel arrays (appended a key row at a time with vector
// stores): f, the block's query (lane) and the ring index. `cap` leaves room for one row's full-width stores.
struct Log {
    std::vector<float> f; std::vector<int32_t> lane, idx;
    size_t used = 0, cap = 0;
    void reserve(size_t n) { cap = n; f.resize(n + 2 * 16); lane.resize(n + 2 * 16); idx.resize(n + 2 * 16); }
};

// Pass-1 state of a task. Per query: the k best f seen (`tops`, a SIMD substitute for a min-heap), the
// threshold thr = k-th best f - margin below which an entry provably cannot enter the top-k, the margin
// and 1/s_q. Candidates go to one log per block of QB queries (sequential appends, pruned against the
// thresholds, which only rise, when full) instead of per-query lists: pushes are the kernel's main overhead.
struct Band {
    int k, kp;  // kp: k rounded up to 16 lanes
    std::vector<float, Aligned64<float>> tops;  // [nq][kp]: the k best f so far (-inf until filled; pad lanes +inf)
    std::vector<float> kth, margin, thr, inv;
    std::vector<Log> log;  // [nq / QB]
    size_t appends = 0;  // candidates logged so far (the cost that decides whether the prefilter pays)
    Band(int nq, int k_) : k(k_), kp((k_ + 15) / 16 * 16), tops((size_t)nq * kp), kth(nq, -INFINITY), margin(nq, 0.f),
                           thr(nq, -INFINITY), inv(nq, 1.f), log(nq / QB) {
        for (auto& lg : log) lg.reserve(2048);
        for (int q = 0; q < nq; q++)
            for (int t = 0; t < kp; t++) tops[(size_t)q * kp + t] = t < k ? -INFINITY : INFINITY;
    }
    __attribute__((noinline)) void compact(int b) {  // drop what the thresholds exclude now; amortised O(1)
        Log& lg = log[b];
        const float* th = &thr[(size_t)b * QB];
        size_t w = 0;  // branch-free: whether an entry survives is a coin flip to the predictor
        for (size_t r = 0; r < lg.used; r++) {
            const float f = lg.f[r]; const int32_t l = lg.lane[r];
            lg.f[w] = f; lg.lane[w] = l; lg.idx[w] = lg.idx[r];
            w += f > th[l];
        }
        lg.used = w;
        if (2 * w > lg.cap) lg.reserve(2 * lg.cap);
    }
    __attribute__((target("avx512f")))
    void top(int q, float f) {  // f beats the k-th best: replace the first lane holding it, take the new minimum
        float* tp = &tops[(size_t)q * kp];
        const __m512 old = _mm512_set1_ps(kth[q]), nv = _mm512_set1_ps(f);
        __m512 mn;
        if (kp == 32) {  // the common k <= 32: two vectors, no loop (the loop cost 9-12 ms more per search, 65K-262K)
            __m512 v0 = _mm512_load_ps(tp), v1 = _mm512_load_ps(tp + 16);
            const uint32_t e = (uint32_t)_mm512_cmp_ps_mask(v0, old, _CMP_EQ_OQ) |
                               ((uint32_t)_mm512_cmp_ps_mask(v1, old, _CMP_EQ_OQ) << 16);
            const uint32_t first = e & (0u - e);
            v0 = _mm512_mask_mov_ps(v0, (__mmask16)first, nv);
            v1 = _mm512_mask_mov_ps(v1, (__mmask16)(first >> 16), nv);
            _mm512_store_ps(tp, v0); _mm512_store_ps(tp + 16, v1);
            mn = _mm512_min_ps(v0, v1);
        } else {
            __mmask16 done = 0;
            mn = _mm512_set1_ps(INFINITY);
            for (int t = 0; t < kp; t += 16) {
                __m512 v = _mm512_load_ps(tp + t);
                const __mmask16 eq = done ? (__mmask16)0 : _mm512_cmp_ps_mask(v, old, _CMP_EQ_OQ);
                const __mmask16 first = eq & (__mmask16)(-(int)eq);
                v = _mm512_mask_mov_ps(v, first, nv);
                done |= first;
                _mm512_store_ps(tp + t, v);
                mn = _mm512_min_ps(mn, v);
            }
        }
        kth[q] = _mm512_reduce_min_ps(mn);
        thr[q] = std::max(thr[q], kth[q] - margin[q]);
    }
};

// Rare path of a tile: some lanes passed the integer pre-compare. acc holds [NKT][32] accumulators. f (as the
// kernel defines it: s_g * acc) is computed for a whole key row at once and checked against the float
// thresholds; the lanes that beat their k-th best update it (top), and all surviving lanes are appended to the
// block's log with compressing vector stores (per-lane scalar appends: 148.5 against 146.3 ms per 65K search).
__attribute__((noinline, target("avx512f,avx512bw,avx512vl")))
void insert_tile(Band& band, int blk, const int32_t* acc, float sg, const uint32_t* masks, int nkt, int64_t j0) {
    const int qoff = blk * QB;
    const __m512i iota0 = _mm512_set_epi32(15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0);
    const __m512i iota1 = _mm512_add_epi32(iota0, _mm512_set1_epi32(16));
    const __m512 sgv = _mm512_set1_ps(sg);
    Log& lg = band.log[blk];
    alignas(64) float fb[32];
    for (int t = 0; t < nkt; t++) {
        if (!masks[t]) continue;
        const __m512 f0 = _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_load_si512(acc + t * 32)), sgv);
        const __m512 f1 = _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_load_si512(acc + t * 32 + 16)), sgv);
        const __mmask16 a0 = (__mmask16)masks[t] & _mm512_cmp_ps_mask(f0, _mm512_loadu_ps(&band.thr[qoff]), _CMP_GT_OQ);
        const __mmask16 a1 = (__mmask16)(masks[t] >> 16) & _mm512_cmp_ps_mask(f1, _mm512_loadu_ps(&band.thr[qoff + 16]), _CMP_GT_OQ);
        if (!(a0 | a1)) continue;
        uint32_t tops = (uint32_t)(a0 & _mm512_cmp_ps_mask(f0, _mm512_loadu_ps(&band.kth[qoff]), _CMP_GT_OQ)) |
                        ((uint32_t)(a1 & _mm512_cmp_ps_mask(f1, _mm512_loadu_ps(&band.kth[qoff + 16]), _CMP_GT_OQ)) << 16);
        if (tops) {
            _mm512_store_ps(fb, f0); _mm512_store_ps(fb + 16, f1);
            for (; tops; tops &= tops - 1) { const int l = __builtin_ctz(tops); band.top(qoff + l, fb[l]); }
        }
        // compress in registers, then plain stores (vpcompress with a memory destination is microcoded on Zen 4)
        size_t u = lg.used;
        const int n0 = __builtin_popcount(a0), n1 = __builtin_popcount(a1);
        _mm512_storeu_ps(&lg.f[u], _mm512_maskz_compress_ps(a0, f0));
        _mm512_storeu_si512(&lg.lane[u], _mm512_maskz_compress_epi32(a0, iota0));
        _mm512_storeu_ps(&lg.f[u + n0], _mm512_maskz_compress_ps(a1, f1));
        _mm512_storeu_si512(&lg.lane[u + n0], _mm512_maskz_compress_epi32(a1, iota1));
        const __m512i iv = _mm512_set1_epi32((int32_t)(j0 + t));
        _mm512_storeu_si512(&lg.idx[u], iv); _mm512_storeu_si512(&lg.idx[u + 16], iv);
        lg.used = u + n0 + n1;
        band.appends += n0 + n1;
        if (lg.used >= lg.cap) band.compact(blk);
    }
}

// Accumulators start at the key's correction -128 sum(khat), so that they end at qhat.khat.
#define I8_DECL(t) __m512i c0_##t, c1_##t; if (NKT > t) c0_##t = c1_##t = _mm512_set1_epi32(kcorr[j + t]);
#define I8_DP(t) if (NKT > t) { MT_DPBUSD(c0_##t, x0, kw[(t) * W + w]); MT_DPBUSD(c1_##t, x1, kw[(t) * W + w]); }
// In-place accumulate via asm: with the intrinsic GCC copied every accumulator each step (2x slower). The key
// word is the instruction's broadcast memory operand ({1to16}) (in the kernel as fast as a separate broadcast,
// measured; it spares the per-query correction). Operand order (AT&T): vpdpbusd s8, u8, acc: u8 = the query
// codes (+128), s8 = the key codes (the broadcast operand must be the signed one).
#define MT_DPBUSD(acc, u8, s8word) asm("vpdpbusd %2%{1to16%}, %1, %0" : "+v"(acc) : "v"(u8), "m"(s8word))
#define I8_CHK(t) if (NKT > t) { masks[t] = (uint32_t)_mm512_cmpgt_epi32_mask(c0_##t, th0) | \
    ((uint32_t)_mm512_cmpgt_epi32_mask(c1_##t, th1) << 16); }
#define I8_ST(t) if (NKT > t) { _mm512_store_si512(buf + t * 32, c0_##t); _mm512_store_si512(buf + t * 32 + 16, c1_##t); }
#define I8_MAX(t) if (NKT > t && t > 0) { mx0 = _mm512_max_epi32(mx0, c0_##t); mx1 = _mm512_max_epi32(mx1, c1_##t); }
#define I8_ALL(M) M(0) M(1) M(2) M(3) M(4) M(5) M(6) M(7) M(8) M(9) M(10) M(11)

// Integer threshold: f = s_g acc > thr  <=>  acc > thr / s_g. Rounded down, less one and a relative 2^-20
// (covering fp32 rounding), and clamped: it may admit a few extra lanes (insert_tile then checks f itself),
// never drop one. thr = -inf admits everything, +inf (padding) nothing.
__attribute__((target("avx512f"), always_inline)) inline
__m512i int_threshold(__m512 thr, __m512 inv_sg) {
    __m512 t = _mm512_mul_ps(thr, inv_sg);
    t = _mm512_sub_ps(t, _mm512_fmadd_ps(_mm512_abs_ps(t), _mm512_set1_ps(1.f / (1 << 20)), _mm512_set1_ps(1.f)));
    t = _mm512_min_ps(_mm512_max_ps(t, _mm512_set1_ps(-2.0e9f)), _mm512_set1_ps(2.0e9f));
    return _mm512_cvt_roundps_epi32(t, _MM_FROUND_TO_NEG_INF | _MM_FROUND_NO_EXC);
}

// One tile: 32 queries (u8 codes qhat + 128, two 16-lane blocks of [W][16] words) x NKT keys (s8 codes khat)
// from row j, all in one scale group (j is a multiple of GROUP, or NKT == 1). acc = sum (qhat + 128) khat
// + kcorr = qhat.khat (kcorr = -128 sum(khat) per key), so f = s_g acc.
template <int NKT, int DD>
__attribute__((target("avx512f,avx512bw,avx512vl,avx512vnni,fma"), always_inline)) inline
void tile_i8(const uint32_t* qa, const uint32_t* qb, const int8_t* codes, const int32_t* kcorr, const float* kscale,
             int Drt, int64_t j, Band& band, int qoff, __m512 thr0, __m512 thr1) {
    const int D = DD ? DD : Drt, W = D / 4;
    const uint32_t* kw = (const uint32_t*)(codes + (size_t)j * D);
    I8_ALL(I8_DECL)
#pragma GCC unroll 2
    for (int w = 0; w < W; w++) {
        __m512i x0 = _mm512_loadu_si512(qa + w * 16), x1 = _mm512_loadu_si512(qb + w * 16);
        I8_ALL(I8_DP)
    }
    const float sg = kscale[j];
    const __m512 inv = _mm512_set1_ps(1.f / sg);
    const __m512i th0 = int_threshold(thr0, inv), th1 = int_threshold(thr1, inv);
    // Common path: one compare of the per-lane maximum over the tile's keys; the per-key masks only when it passes.
    __m512i mx0 = c0_0, mx1 = c1_0;
    I8_ALL(I8_MAX)
    if (__builtin_expect(((uint32_t)_mm512_cmpgt_epi32_mask(mx0, th0) | (uint32_t)_mm512_cmpgt_epi32_mask(mx1, th1)) != 0, 0)) {
        uint32_t masks[NKT];
        I8_ALL(I8_CHK)
        alignas(64) int32_t buf[NKT * 32];
        I8_ALL(I8_ST)
        insert_tile(band, qoff / QB, buf, sg, masks, NKT, j);
    }
}

struct I8Limits { double probe_live, per_chunk; };  // per query; see run_task_i8 and mt_topk_i8

// Returns false, having written nothing, when the band is too crowded for the prefilter to pay.
template <int DD>
__attribute__((target("avx512f,avx512bw,avx512vl,avx512vnni,fma")))
bool run_task_i8(const float* q, const void* keys, int keys_bf16, const int8_t* codes, const int32_t* kcorr,
                 const float* kscale, const float* kerr, const float* knorm, int64_t n, int D, int q0, int q1,
                 int k, float* out_s, int64_t* out_i, int kk, const I8Limits& limits, const char* values) {
    const int nq = q1 - q0, nb = (nq + QB - 1) / QB, W = D / 4, NQ = nb * QB;
    double maxe = 0, maxn = 0, maxs = 0;
    for (int64_t j = 0; j < n; j++) {
        maxe = std::max(maxe, (double)kerr[j]); maxn = std::max(maxn, (double)knorm[j]); maxs = std::max(maxs, (double)kscale[j]);
    }
    std::vector<uint32_t> qp((size_t)NQ * W, 0x80808080u);  // [block16][W][16] u8 query codes; padded lanes: qhat 0
    uint8_t* qb8 = (uint8_t*)qp.data();
    Band band(NQ, k);
    std::vector<int32_t> code(D);
    for (int t = 0; t < nq; t++) {
        const float* xt = q + (size_t)(q0 + t) * D;
        double n2 = 0, e2 = 0;
        const float m = max_abs(xt, D);
        const float s = m > 0 ? m / 127.f : 1.f;
        const int blk = t / 16, lane = t % 16;
        quantize(xt, D, s, code.data(), e2, n2);
        for (int d = 0; d < D; d++) qb8[(((size_t)blk * W + d / 4) * 16 + lane) * 4 + d % 4] = (uint8_t)(code[d] + 128);
        // 1e-4 |x| max|k| covers the rounding of the exact scores and of the thresholds
        const double nx = sqrt(n2), E = (nx * maxe + (maxn + maxe) * sqrt(e2)) * (1 + 1e-4) + 1e-4 * nx * maxn + 1e-30;
        // in units of f = a / s_q, plus the fp32 rounding of f = s_g * acc for the entry and for the k-th best
        // (|acc| <= D 127^2 < 2^24 is exact in fp32; one rounding of the product: <= 2^-24 D 127^2 max s_g)
        band.margin[t] = (float)(2 * E / s + 2.0 * D * 127 * 127 / 16777216.0 * maxs);
        band.inv[t] = 1.f / s;
    }
    for (int t = nq; t < NQ; t++) band.thr[t] = INFINITY;
    // Chunks of KC entries (a multiple of GROUP: every full tile lies in one scale group), the first one a
    // short probe. Whether the prefilter pays is decided as it goes: after the probe, by the band it left
    // (live candidates per query); after every later chunk, by the candidates that chunk added. Either
    // above its limit (a crowded band: keys that nearly all score alike, as in some trained heads) returns
    // false and the caller runs the plain kernel, having lost at most the probe or one chunk.
    const int64_t KC = 4092, PROBE = 1020;
    double appends_before = 0;
    for (int64_t c0 = 0, c1; c0 < n; c0 = c1) {
        c1 = std::min(n, c0 == 0 ? PROBE : c0 + KC);
        if (c0 == PROBE) {
            size_t live = 0;
            for (int b = 0; b < nb; b++)
                for (size_t u = 0; u < band.log[b].used; u++) live += band.log[b].f[u] > band.thr[b * QB + band.log[b].lane[u]];
            if ((double)live > limits.probe_live * nq) return false;
        } else if (c0 > PROBE && (double)band.appends - appends_before > limits.per_chunk * nq) {
            return false;
        }
        appends_before = (double)band.appends;
        for (int b = 0; b < nb; b++) {
            const uint32_t* qa = &qp[(size_t)(2 * b) * W * 16];
            const uint32_t* qc = &qp[(size_t)(2 * b + 1) * W * 16];
            int64_t j = c0;
            for (; j + GROUP <= c1; j += GROUP)
                tile_i8<GROUP, DD>(qa, qc, codes, kcorr, kscale, D, j, band, b * QB, _mm512_loadu_ps(&band.thr[b * QB]),
                                   _mm512_loadu_ps(&band.thr[b * QB + 16]));
            for (; j < c1; j++)
                tile_i8<1, DD>(qa, qc, codes, kcorr, kscale, D, j, band, b * QB, _mm512_loadu_ps(&band.thr[b * QB]),
                               _mm512_loadu_ps(&band.thr[b * QB + 16]));
        }
    }
    // Pass 2 in two steps: the k entries with the best f are scored exactly first; their k-th best exact
    // score lb is a lower bound on the final k-th best, so a survivor needs its exact score only if its
    // upper bound s_q (f + margin / 2) reaches lb. That halves the rescoring when the band is crowded.
    std::vector<Cand> ex, rest, bucket;
    std::vector<uint64_t> ranked, best;
    std::vector<size_t> start(QB + 1), pos(QB);
    const size_t row = (size_t)D * (keys_bf16 ? 2 : 4);
    for (int t = 0; t < nq; t++) {
        const int blk = t / QB, lane = t % QB;
        if (lane == 0) {  // bucket the block's log by query (counting sort)
            const Log& lg = band.log[blk];
            const size_t used = lg.used;
            std::fill(start.begin(), start.end(), 0);
            for (size_t u = 0; u < used; u++) start[lg.lane[u] + 1]++;
            for (int l = 0; l < QB; l++) { start[l + 1] += start[l]; pos[l] = start[l]; }
            bucket.resize(used);
            for (size_t u = 0; u < used; u++) bucket[pos[lg.lane[u]]++] = Cand{lg.f[u], lg.idx[u]};
        }
        const float thr = band.thr[t], kth = band.kth[t];
        const size_t nb_ = start[lane + 1] - start[lane];
        ex.resize(nb_); rest.resize(nb_);
        size_t nex = 0, nrest = 0;
        for (size_t u = start[lane]; u < start[lane + 1]; u++) {  // branch-free: the three ways are unpredictable
            const Cand e = bucket[u];
            ex[nex] = e; rest[nrest] = e;
            nex += e.s >= kth; nrest += (e.s < kth) & (e.s > thr);
        }
        ex.resize(nex); rest.resize(nrest);
        const float* xt = q + (size_t)(q0 + t) * D;
        auto rescore = [&](std::vector<Cand>& v, size_t from) {  // rows are scattered over the ring: prefetch
            for (size_t u = from; u < v.size(); u++) {
                if (u + 8 < v.size()) {
                    const char* p = (const char*)keys + (size_t)v[u + 8].i * row;
                    for (size_t o = 0; o < row; o += 64) _mm_prefetch(p + o, _MM_HINT_T0);
                }
                v[u].s = dot_exact(xt, keys, keys_bf16, v[u].i, D);
            }
        };
        rescore(ex, 0);
        const size_t first = ex.size();
        if ((int)ex.size() >= k) {
            float lb = ex[0].s;  // the k-th best exact score among ex: its minimum when it holds k entries (the usual case)
            if ((int)ex.size() == k) for (const Cand& e : ex) lb = std::min(lb, e.s);
            else { std::nth_element(ex.begin(), ex.begin() + (k - 1), ex.end(), Better()); lb = ex[k - 1].s; }
            const float cut = lb * band.inv[t] - 0.5f * band.margin[t];
            size_t n = ex.size();
            ex.resize(n + rest.size());
            for (const Cand& e : rest) { ex[n] = e; n += e.s >= cut; }  // branch-free, as above
            ex.resize(n);
        } else {
            ex.insert(ex.end(), rest.begin(), rest.end());
        }
        rescore(ex, first);
        // The best r, ordered, as one integer each (rank_key: integer compares instead of Better's two fields).
        const int r = std::min((int)ex.size(), kk);
        const size_t m = ex.size(), m8 = (m + 7) / 8 * 8;
        ranked.assign(m8, 0);  // padding 0 ranks below every key
        for (size_t u = 0; u < m; u++) ranked[u] = rank_key(ex[u]);
        if (m <= 128) {  // usual: each key's rank = how many keys beat it (the keys are distinct), 8 compares at a time
            best.resize(std::max(r, 1));
            for (size_t u = 0; u < m; u++) {
                const __m512i x = _mm512_set1_epi64((long long)ranked[u]);
                int rank = 0;
                for (size_t v = 0; v < m8; v += 8)
                    rank += __builtin_popcount(_mm512_cmpgt_epu64_mask(_mm512_loadu_si512(&ranked[v]), x));
                if (rank < r) best[rank] = ranked[u];
            }
        } else {
            if (r < (int)m) std::nth_element(ranked.begin(), ranked.begin() + (r - 1), ranked.begin() + m, std::greater<uint64_t>());
            std::sort(ranked.begin(), ranked.begin() + r, std::greater<uint64_t>());
            best.assign(ranked.begin(), ranked.begin() + r);
        }
        for (int u = 0; u < kk; u++) {
            const Cand e = u < r ? rank_cand(best[u]) : Cand{-INFINITY, 0};
            out_s[(size_t)t * kk + u] = e.s;
            out_i[(size_t)t * kk + u] = e.i;
            if (values && u < r)  // for the gather after the task (RowsOut): value rows are otherwise cold
                for (size_t o = 0; o < row; o += 64) _mm_prefetch(values + (size_t)e.i * row + o, _MM_HINT_T1);
        }
    }
    return true;
}

template <class F>
void parallel_tasks(int64_t ntask, int nthreads, F fn) {
    std::atomic<int64_t> next(0);
    auto worker = [&]() { for (int64_t t; (t = next.fetch_add(1)) < ntask;) fn(t); };
    int nt = (int)std::max<int64_t>(1, std::min<int64_t>(nthreads, ntask));
    std::vector<std::thread> pool;
    for (int t = 1; t < nt; t++) pool.emplace_back(worker);
    worker();
    for (auto& th : pool) th.join();
}

int64_t query_split(int64_t B, int64_t H, int64_t T, int nthreads) {  // split queries when B*H < 4 x threads
    return nthreads > 1 ? std::max<int64_t>(1, std::min<int64_t>((T + 127) / 128, (4 * nthreads + B * H - 1) / (B * H))) : 1;
}

// dst[e] = src[rows[e]] for n rows of row_bytes bytes, prefetching ahead (the rows are scattered over the ring).
void copy_rows(const char* src, const int64_t* rows, int64_t n, size_t row_bytes, char* dst) {
    const int64_t ahead = 128;
    for (int64_t e = 0; e < n; e++) {
        if (e + ahead < n) {
            const char* p = src + rows[e + ahead] * row_bytes;
            for (size_t o = 0; o < row_bytes; o += 64) _mm_prefetch(p + o, _MM_HINT_T0);
        }
        memcpy(dst + e * row_bytes, src + rows[e] * row_bytes, row_bytes);
    }
}

// Optional output of a search: the retrieved (key, value) rows, [B,H,T,kk] rows of `row` bytes gathered from the
// rings [B,H,NA] right after each task, while its key rows are still in cache from the exact rescoring
// (gathering them afterwards, from Python, cost ~5 ms per 131K rows here at 65K entries). Null pointers: none.
struct RowsOut { const char* keys; const char* values; char* out_k; char* out_v; size_t row; };

// Runs fn(bh, q0, q1, n, k, out_s, out_i) for every (slot, head) and query range of a search on `nthreads`
// threads; slots with no entries get -inf / 0 here. n: the slot's filled entries, k = min(kk, n).
template <class F>
void for_each_task(int64_t B, int64_t H, int64_t T, int64_t NA, int64_t kk, const int64_t* counts, float* out_s,
                   int64_t* out_i, int nthreads, const RowsOut& rows, F fn) {
    const int64_t qsplit = query_split(B, H, T, nthreads);
    const int64_t per = ((T + qsplit - 1) / qsplit + QB - 1) / QB * QB;
    parallel_tasks(B * H * qsplit, nthreads, [&](int64_t t) {
        const int64_t bh = t / qsplit, part = t % qsplit, b = bh / H;
        const int q0 = (int)std::min(T, part * per), q1 = (int)std::min(T, q0 + per);
        if (q0 >= q1) return;
        float* os = out_s + ((size_t)bh * T + q0) * kk; int64_t* oi = out_i + ((size_t)bh * T + q0) * kk;
        const int64_t n = std::min(counts[b], NA);
        if (n <= 0) {
            for (int64_t e = 0; e < (int64_t)(q1 - q0) * kk; e++) { os[e] = -INFINITY; oi[e] = 0; }
        } else {
            fn(bh, q0, q1, n, (int)std::min<int64_t>(kk, n), os, oi);
        }
        if (rows.out_k) {
            const size_t src = (size_t)bh * NA * rows.row, dst = ((size_t)bh * T + q0) * kk * rows.row;
            copy_rows(rows.keys + src, oi, (int64_t)(q1 - q0) * kk, rows.row, rows.out_k + dst);
            copy_rows(rows.values + src, oi, (int64_t)(q1 - q0) * kk, rows.row, rows.out_v + dst);
        }
    });
}

// The plain kernel for one task, dispatched on mode and head_dim. q: this (slot, head)'s [T][D] queries.
void run_plain(int mode, const void* q, const void* keys, int keys_bf16, int64_t n, int64_t T, int64_t D, int q0, int q1,
               int k, float* os, int64_t* oi, int64_t kk) {
#define MT_RUN(M, DD) run_task<M, DD>(q, keys, keys_bf16, n, (int)T, (int)D, q0, q1, k, os, oi, (int)kk)
    if (mode == 0) { if (D == 64) MT_RUN(0, 64); else if (D == 128) MT_RUN(0, 128); else if (D == 32) MT_RUN(0, 32); else MT_RUN(0, 0); }
    else { if (D == 64) MT_RUN(1, 64); else if (D == 128) MT_RUN(1, 128); else if (D == 32) MT_RUN(1, 32); else MT_RUN(1, 0); }
#undef MT_RUN
}

}  // namespace

extern "C" {

int mt_available() {
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
           __builtin_cpu_supports("avx512bf16") && __builtin_cpu_supports("fma");
}

// q: [B,H,T,D] (bf16 if mode 0 else fp32); keys: [B,H,NA,D] bf16 or fp32; counts: [B] filled entries.
// out_s/out_i: [B,H,T,kk]. values/out_k/out_v: see RowsOut (values has the keys' dtype and shape; may be null).
// Returns 0 on success.
int mt_topk(int mode, const void* q, const void* keys, int keys_bf16, const int64_t* counts,
            int64_t B, int64_t H, int64_t T, int64_t D, int64_t NA, int64_t kk, float* out_s, int64_t* out_i,
            int nthreads, const void* values, void* out_k, void* out_v) {
    if (D % 2 || (mode == 0 && !keys_bf16)) return 1;
    const size_t qe = mode == 0 ? 2 : 4, ke = keys_bf16 ? 2 : 4;
    const RowsOut rows{(const char*)keys, (const char*)values, (char*)out_k, (char*)out_v, (size_t)D * ke};
    for_each_task(B, H, T, NA, kk, counts, out_s, out_i, nthreads, rows,
                  [&](int64_t bh, int q0, int q1, int64_t n, int k, float* os, int64_t* oi) {
        run_plain(mode, (const char*)q + (size_t)bh * T * D * qe, (const char*)keys + (size_t)bh * NA * D * ke, keys_bf16,
                  n, T, D, q0, q1, k, os, oi, kk);
    });
    return 0;
}

// int8 codes of ring rows [r0, r1) (each NA entries of D values, bf16 or fp32), scale groups [g0, g1):
// one scale per group of GROUP entries (max |k| / 127, or 1 for an all-zero group), codes khat, and per entry
// corr = -128 sum(khat), err = |k - scale khat| and norm = |k| (computed in double). Layout: [rows][NA(...)].
void mt_encode_groups(const void* keys, int keys_bf16, int64_t NA, int64_t D, int64_t r0, int64_t r1, int64_t g0,
                      int64_t g1, int8_t* codes, int32_t* corr, float* scale, float* err, float* norm) {
    std::vector<float> x((size_t)GROUP * D);
    std::vector<int32_t> code(D);
    for (int64_t r = r0; r < r1; r++) {
        for (int64_t g = g0; g < g1; g++) {
            const int64_t e0 = g * GROUP, e1 = std::min(NA, e0 + GROUP);
            if (e0 >= e1) break;
            float m = 0.f;
            for (int64_t e = e0; e < e1; e++) {
                float* xe = &x[(e - e0) * D];
                const size_t o = ((size_t)r * NA + e) * D;
                for (int64_t d = 0; d < D; d++) xe[d] = keys_bf16 ? bf16_to_float(((const uint16_t*)keys)[o + d]) : ((const float*)keys)[o + d];
                m = std::max(m, max_abs(xe, (int)D));
            }
            const float sc = m > 0 ? m / 127.f : 1.f;
            for (int64_t e = e0; e < e1; e++) {
                double e2 = 0, n2 = 0;
                const int sum = quantize(&x[(e - e0) * D], (int)D, sc, code.data(), e2, n2);
                int8_t* c = codes + ((size_t)r * NA + e) * D;
                for (int64_t d = 0; d < D; d++) c[d] = (int8_t)code[d];
                corr[(size_t)r * NA + e] = -128 * sum;
                scale[(size_t)r * NA + e] = sc;
                err[(size_t)r * NA + e] = (float)sqrt(e2);
                norm[(size_t)r * NA + e] = (float)sqrt(n2);
            }
        }
    }
}

// dst[i] = src[rows[i]] for rows of row_bytes bytes: torch.index_select spent ~38 ns per 128-byte row on the
// scattered retrieved rows (more than a search at 8K entries); this prefetching copy 3-6x less.
void mt_gather_rows(const char* src, const int64_t* rows, int64_t n, int64_t row_bytes, char* dst) {
    copy_rows(src, rows, n, (size_t)row_bytes, dst);
}

int mt_available_i8() {
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
           __builtin_cpu_supports("avx512vnni") && __builtin_cpu_supports("fma");
}

// int8 prefilter + exact rescoring; returns the number of queries (of B*H*T) that ran the plain kernel
// instead (their (slot, head) has use_i8[b*H+h] == 0, or its band proved too crowded, which clears the flag),
// or -1. q: [B,H,T,D] fp32 (the operands of the exact score: bf16-rounded
// queries for bf16 scores); keys: [B,H,NA,D] bf16 or fp32 ring; codes int8 khat [B,H,NA,D] and per entry
// corr = -128 sum(khat) int32, scale (shared by each group of GROUP entries), err (|k - scale*khat|) and
// norm (|k|) fp32, each [B,H,NA]. D % 4 == 0.
int mt_topk_i8(int mode, const float* q, const void* keys, int keys_bf16, const int8_t* codes, const int32_t* kcorr,
               const float* kscale, const float* kerr, const float* knorm, const int64_t* counts,
               int64_t B, int64_t H, int64_t T, int64_t D, int64_t NA, int64_t kk, float* out_s, int64_t* out_i,
               int nthreads, double budget_scale, uint8_t* use_i8, const void* values, void* out_k, void* out_v) {
    if (D % 4 || (mode == 0 && !keys_bf16) || NA > (int64_t)UINT32_MAX) return -1;  // rank_key: indices < 2^32
    std::atomic<int64_t> fallbacks(0);
    const size_t ke = keys_bf16 ? 2 : 4;
    const RowsOut rows{(const char*)keys, (const char*)values, (char*)out_k, (char*)out_v, (size_t)D * ke};
    for_each_task(B, H, T, NA, kk, counts, out_s, out_i, nthreads, rows,
                  [&](int64_t bh, int q0, int q1, int64_t n, int k, float* os, int64_t* oi) {
        const size_t e0 = (size_t)bh * NA;
        const float* qf = q + (size_t)bh * T * D;
        const char* kb = (const char*)keys + e0 * D * ke;
        // Limits per query (x budget_scale). After the 1020-entry probe a spread key distribution leaves k plus
        // a few dozen live candidates, a crowded one hundreds. Per 4092-entry chunk: 220 added candidates, for
        // both score dtypes, chosen by timing searches at scaled limits on four key sets (README, Speed): a
        // candidate costs ~24 ns and the int8 tile saves ~0.45 (bf16) / ~1.0 (fp32) ns per entry, but an early
        // chunk adds more candidates than the later ones (the thresholds still rise), so the limit sits
        // above the single-chunk break-even (~77 / ~170), and a lower bf16 limit sent spread keys to the plain kernel.
        const I8Limits limits{budget_scale * (k + std::max(2.0 * k, 0.06 * 1020)), budget_scale * 220.0};
        bool done = false;
#define MT_RUN(DD) done = use_i8[bh] && run_task_i8<DD>(qf, kb, keys_bf16, codes + e0 * D, kcorr + e0, kscale + e0, \
            kerr + e0, knorm + e0, n, (int)D, q0, q1, k, os, oi, (int)kk, limits, values ? (const char*)values + e0 * D * ke : nullptr)
        if (D == 64) MT_RUN(64); else if (D == 128) MT_RUN(128); else if (D == 32) MT_RUN(32); else MT_RUN(0);
#undef MT_RUN
        if (done) return;
        use_i8[bh] = 0;  // the caller may skip the prefilter for this (slot, head) next time
        fallbacks += q1 - q0;
        if (mode == 1) {
            run_plain(1, qf, kb, keys_bf16, n, T, D, q0, q1, k, os, oi, kk);
        } else {  // bf16 queries: the fp32 ones were rounded to bf16 already, so the top half is exact
            std::vector<uint16_t> qh((size_t)T * D);
            for (size_t e = 0; e < qh.size(); e++) { uint32_t u; memcpy(&u, qf + e, 4); qh[e] = (uint16_t)(u >> 16); }
            run_plain(0, qh.data(), kb, keys_bf16, n, T, D, q0, q1, k, os, oi, kk);
        }
    });
    return (int)fallbacks.load();
}

}
"""

# Counters of the int8 prefilter since import: queries searched (x slots x heads), and how many of them were in
# a (slot, head) task whose band was too crowded, so the plain kernel ran instead (benchmarks print them).
stats = {"int8_queries": 0, "int8_fallback_queries": 0}

# -fno-math-errno lets nearbyintf/sqrt compile to instructions instead of libm calls (the int8 encoding of keys
# and queries spent ~1 ms each per 65K search on the calls).
_CXXFLAGS = ["-O3", "-fno-math-errno", "-std=c++17", "-shared", "-fPIC", "-pthread"]
_lock = threading.Lock()
_lib = None
_error: str | None = None


def _cache_dir() -> str:
    return os.environ.get("MEMTRANS_EXT_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "memtrans", "ext")


def _load():
    """Build (once per source hash) and load the kernel; None if the compiler or CPU cannot run it."""
    global _lib, _error
    if _lib is not None or _error is not None:
        return _lib
    with _lock:
        if _lib is not None or _error is not None:
            return _lib
        try:
            cxx = os.environ.get("CXX", "g++")
            tag = hashlib.sha256((_SRC + cxx + " ".join(_CXXFLAGS)).encode()).hexdigest()[:16]
            d = _cache_dir()
            os.makedirs(d, exist_ok=True)
            so = os.path.join(d, f"memtrans_topk_{tag}.so")
            if not os.path.exists(so):
                with tempfile.TemporaryDirectory(dir=d) as tmp:
                    src, out = os.path.join(tmp, "topk.cpp"), os.path.join(tmp, "topk.so")
                    with open(src, "w") as f:
                        f.write(_SRC)
                    r = subprocess.run([cxx, *_CXXFLAGS, src, "-o", out],
                                       capture_output=True, text=True, timeout=300)
                    if r.returncode != 0:
                        raise RuntimeError(f"{cxx} failed: {r.stderr[-2000:]}")
                    os.replace(out, so)  # atomic: concurrent builders never load a half-written file
            lib = ctypes.CDLL(so)
            lib.mt_available.restype = ctypes.c_int
            lib.mt_topk.restype = ctypes.c_int
            lib.mt_topk.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int, ctypes.c_void_p] + \
                [ctypes.c_int64] * 6 + [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int] + [ctypes.c_void_p] * 3
            lib.mt_available_i8.restype = ctypes.c_int
            lib.mt_topk_i8.restype = ctypes.c_int
            lib.mt_topk_i8.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int] + [ctypes.c_void_p] * 6 + \
                [ctypes.c_int64] * 6 + [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int, ctypes.c_double, ctypes.c_void_p] + \
                [ctypes.c_void_p] * 3
            lib.mt_encode_groups.restype = None
            lib.mt_encode_groups.argtypes = [ctypes.c_void_p, ctypes.c_int] + [ctypes.c_int64] * 6 + [ctypes.c_void_p] * 5
            lib.mt_gather_rows.restype = None
            lib.mt_gather_rows.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64, ctypes.c_void_p]
            if not lib.mt_available():
                raise RuntimeError("CPU lacks AVX-512 BF16")
            _lib = lib
        except Exception as e:  # noqa: BLE001 - any failure means: use the reference path
            _error = f"{type(e).__name__}: {e}"
            warnings.warn(f"memtrans fused top-k kernel unavailable, using the torch reference path ({_error})")
    return _lib


def available() -> bool:
    return _load() is not None


def unavailable_reason() -> str | None:
    _load()
    return _error


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
    return available() and bool(_lib.mt_available_i8())


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
    q = queries.detach().to(torch.bfloat16 if mode == 0 else torch.float32).contiguous()
    rc = _lib.mt_topk(mode, q.data_ptr(), keys.data_ptr(), int(keys.dtype == torch.bfloat16), counts.data_ptr(),
                      B, H, T, D, keys.shape[2], k, out_s.data_ptr(), out_i.data_ptr(),
                      nthreads, *row_ptrs)
    if rc != 0:
        return None
    return (out_s, out_i) + rows
