// ISA-neutral parts of the fused exact top-k kernels (memtrans.memory.fast_topk): the candidate buffers and
// their ordering, the task loop over (slot, head) x query ranges on a thread pool, and the prefetching row
// gather. Each ISA's translation unit (topk_avx512.cpp, topk_avx2.cpp, topk_portable.cpp) includes this file,
// defines its tiles and run_plain(), then includes topk_api.h for the exported entry points.
#pragma once
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

// Rare path: some lanes of the tile beat their query's threshold. s holds [NKT][lanes] scores, m the lane masks.
__attribute__((noinline))
void insert(TopK& tk, int qoff, const float* s, const uint32_t* masks, int nkt, int64_t idx0, int lanes = 32) {
    for (int t = 0; t < nkt; t++) {
        for (uint32_t m = masks[t]; m; m &= m - 1) {
            int l = __builtin_ctz(m), q = qoff + l;
            if (s[t * lanes + l] > tk.thr[q]) tk.push(q, s[t * lanes + l], idx0 + t);  // thresholds only rise
        }
    }
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
            for (size_t o = 0; o < row_bytes; o += 64) __builtin_prefetch(p + o, 0, 3);
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
}  // namespace
