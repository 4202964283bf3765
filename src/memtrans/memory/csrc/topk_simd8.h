// The plain fused kernel written once with GCC/Clang vector extensions (8 or 4 fp32 lanes, VW), for every CPU without
// the AVX-512 path. topk_avx2.cpp compiles it with -mavx2 -mfma (each vector op one ymm instruction, every
// multiply-add one vfmadd); topk_portable.cpp with the compiler's baseline flags (4-lane SSE2 vectors on x86-64, NEON
// on ARM64), so no machine with a C++ compiler falls back to the torch reference.
//
// Same algorithm as the AVX-512 kernel: per (slot, head), stream the filled ring in L2-sized chunks (bf16 keys
// widened to fp32, exactly), score a register tile of 2 VW queries (two vectors) x 6 keys with fp32 fused
// multiply-adds (12 accumulators + 2 query vectors + 1 broadcast = 15 of the 16 ymm registers), compare the
// tile against each query's running k-th best and hand the rare lanes that beat it to the candidate buffers.
// An entry is dropped only when it provably cannot enter the top-k, so the result is an exact top-k of the
// fp32 scores. Only fp32 scores here: for bf16 scores the caller rounds the queries to bf16 first, which
// gives the AVX-512 kernel's bf16 operands with fp32 sums.
#pragma once
#if defined(__AVX2__)
#include <immintrin.h>
#endif

#include "topk_common.h"

#define MT_BF16_SCORES 0

namespace {

// Lanes per vector: 8 (one ymm) where the build has AVX, else 4, the native width of SSE2 and NEON (8-wide
// vectors emulated on 128-bit registers ran ~35x slower than the AVX2 build: passed through memory).
#ifndef MT_VW
#if defined(__AVX__)
#define MT_VW 8
#else
#define MT_VW 4
#endif
#endif
const int VW = MT_VW;
typedef float vf8 __attribute__((vector_size(4 * MT_VW)));
typedef int32_t vi8 __attribute__((vector_size(4 * MT_VW)));

const int GQ = 2 * VW;  // queries per tile (two vectors)
const int GK = 6;   // keys per tile: 12 accumulators + 2 query vectors + 1 broadcast fit 16 registers

inline __attribute__((always_inline)) vf8 load8(const float* p) { vf8 v; memcpy(&v, p, sizeof v); return v; }
inline __attribute__((always_inline)) void store8(float* p, vf8 v) { memcpy(p, &v, sizeof v); }

// Bit l set where a[l] > t[l] (NaN compares false).
inline __attribute__((always_inline)) uint32_t lanes_gt(vf8 a, vf8 t) {
#if defined(__AVX2__)
    return (uint32_t)_mm256_movemask_ps((__m256)(a > t));
#else
    const vi8 m = a > t;
    uint32_t r = 0;
    for (int l = 0; l < VW; l++) r |= (uint32_t)(m[l] & 1) << l;
    return r;
#endif
}

// Accumulators are named variables, as in the AVX-512 kernel (an array of vectors stayed in memory).
#define G_DECL(t) vf8 a0_##t = {}, a1_##t = {};
#define G_FM(t) if (NKT > t) { const float y = kk[t * D + d]; a0_##t += x0 * y; a1_##t += x1 * y; }
#define G_CHK(t) if (NKT > t) { masks[t] = lanes_gt(a0_##t, thr0) | (lanes_gt(a1_##t, thr1) << VW); any |= masks[t]; }
#define G_ST(t) if (NKT > t) { store8(buf + t * GQ, a0_##t); store8(buf + t * GQ + VW, a1_##t); }
#define G_ALL(M) M(0) M(1) M(2) M(3) M(4) M(5)

// One register tile: GQ queries (qa, qb: [D][VW] floats each) x NKT keys starting at chunk row j (fp32 [n][D]).
template <int NKT, int DD>
inline __attribute__((always_inline))
void tile8(const float* qa, const float* qb, const float* kp, int Drt, int64_t j, int64_t jbase, TopK& tk, int qoff,
           vf8& thr0, vf8& thr1) {
    static_assert(NKT <= GK, "tile width");
    const int D = DD ? DD : Drt;  // compile-time head_dim where it is common
    const float* kk = kp + (size_t)j * D;
    G_ALL(G_DECL)
    for (int d = 0; d < D; d++) {
        const vf8 x0 = load8(qa + d * VW), x1 = load8(qb + d * VW);
        G_ALL(G_FM)
    }
    uint32_t masks[NKT], any = 0;
    G_ALL(G_CHK)
    if (__builtin_expect(any != 0, 0)) {
        alignas(32) float buf[NKT * GQ];
        G_ALL(G_ST)
        insert(tk, qoff, buf, masks, NKT, jbase + j, GQ);
        thr0 = load8(&tk.thr[qoff]); thr1 = load8(&tk.thr[qoff + VW]);
    }
}

template <int DD>
void run_task8(const float* q, const void* keys, int keys_bf16, int64_t n, int D, int q0, int q1, int k,
               float* out_s, int64_t* out_i, int kk) {
    const int nq = q1 - q0, nb = (nq + GQ - 1) / GQ;
    // pack queries: blocks of VW lanes, [block][D][VW]; padded lanes are zero and get threshold +inf
    std::vector<float> qp((size_t)nb * 2 * D * VW, 0.f);
    for (int t = 0; t < nq; t++) {
        const int blk = t / VW, lane = t % VW;
        const float* src = q + (size_t)(q0 + t) * D;
        for (int d = 0; d < D; d++) qp[((size_t)blk * D + d) * VW + lane] = src[d];
    }
    TopK tk(nb * GQ, k, std::max(4 * k, 64));
    for (int t = nq; t < nb * GQ; t++) tk.thr[t] = INFINITY;
    const int64_t KC = 1024;  // 1024 keys x 64 dims x 4 bytes: a quarter of a 1 MiB L2, half of a 512 KiB one
    std::vector<float> kbuf(keys_bf16 ? (size_t)KC * D : 0);
    for (int64_t c0 = 0; c0 < n; c0 += KC) {
        const int64_t c1 = std::min(n, c0 + KC), len = c1 - c0;
        const float* kp;
        if (!keys_bf16) {
            kp = (const float*)keys + (size_t)c0 * D;
        } else {  // bf16 -> fp32 is exact: the bits shifted into the top half
            const uint16_t* src = (const uint16_t*)keys + (size_t)c0 * D;
            uint32_t* dst = (uint32_t*)kbuf.data();
            for (int64_t e = 0; e < len * D; e++) dst[e] = (uint32_t)src[e] << 16;
            kp = kbuf.data();
        }
        for (int b = 0; b < nb; b++) {
            const float* qa = &qp[(size_t)(2 * b) * D * VW];
            const float* qb = &qp[(size_t)(2 * b + 1) * D * VW];
            vf8 thr0 = load8(&tk.thr[b * GQ]), thr1 = load8(&tk.thr[b * GQ + VW]);
            int64_t j = 0;
            for (; j + GK <= len; j += GK) tile8<GK, DD>(qa, qb, kp, D, j, c0, tk, b * GQ, thr0, thr1);
            for (; j < len; j++) tile8<1, DD>(qa, qb, kp, D, j, c0, tk, b * GQ, thr0, thr1);
        }
    }
    for (int t = 0; t < nq; t++) tk.finish(t, out_s + (size_t)t * kk, out_i + (size_t)t * kk, kk);
}

// The plain kernel for one task (fp32 scores only, mode 1), dispatched on head_dim. q: [T][D] fp32 queries.
void run_plain(int mode, const void* q, const void* keys, int keys_bf16, int64_t n, int64_t T, int64_t D, int q0, int q1,
               int k, float* os, int64_t* oi, int64_t kk) {
    (void)mode; (void)T;  // mode 0 is refused in mt_topk (MT_BF16_SCORES)
    const float* qf = (const float*)q;
#define MT_RUN(DD) run_task8<DD>(qf, keys, keys_bf16, n, (int)D, q0, q1, k, os, oi, (int)kk)
    if (D == 64) MT_RUN(64); else if (D == 128) MT_RUN(128); else if (D == 32) MT_RUN(32); else MT_RUN(0);
#undef MT_RUN
}

}  // namespace
