// AVX-512 kernels (the fastest path; chosen at run time on CPUs with AVX-512 F/BW/VL, BF16 and FMA):
// the plain fused kernel (32-query x 12-key tiles, vdpbf16ps for bf16 scores, FMA for fp32) and the exact
// int8 prefilter on VNNI with its key encoding. Every function carries its target attributes, so the
// library builds with plain flags and mt_cpu_supported() can be asked on any x86 CPU.
#include <immintrin.h>

#include "topk_common.h"

#define MT_BF16_SCORES 1

namespace {
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

const char* mt_isa() { return "avx512"; }

int mt_cpu_supported() {
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
           __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512bf16") && __builtin_cpu_supports("fma");
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

}  // extern "C"

#include "topk_api.h"
