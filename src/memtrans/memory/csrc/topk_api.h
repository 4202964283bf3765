// The entry points every kernel library exports (after its run_plain(); see topk_common.h).
#pragma once

extern "C" {

// q: [B,H,T,D] (bf16 if mode 0 else fp32); keys: [B,H,NA,D] bf16 or fp32; counts: [B] filled entries.
// out_s/out_i: [B,H,T,kk]. values/out_k/out_v: see RowsOut (values has the keys' dtype and shape; may be null).
// Returns 0 on success.
int mt_topk(int mode, const void* q, const void* keys, int keys_bf16, const int64_t* counts,
            int64_t B, int64_t H, int64_t T, int64_t D, int64_t NA, int64_t kk, float* out_s, int64_t* out_i,
            int nthreads, const void* values, void* out_k, void* out_v) {
    if (D % 2 || (mode == 0 && !keys_bf16)) return 1;
    if (mode == 0 && !MT_BF16_SCORES) return 2;  // the caller rounds the queries to bf16 and asks for mode 1
    const size_t qe = mode == 0 ? 2 : 4, ke = keys_bf16 ? 2 : 4;
    const RowsOut rows{(const char*)keys, (const char*)values, (char*)out_k, (char*)out_v, (size_t)D * ke};
    for_each_task(B, H, T, NA, kk, counts, out_s, out_i, nthreads, rows,
                  [&](int64_t bh, int q0, int q1, int64_t n, int k, float* os, int64_t* oi) {
        run_plain(mode, (const char*)q + (size_t)bh * T * D * qe, (const char*)keys + (size_t)bh * NA * D * ke, keys_bf16,
                  n, T, D, q0, q1, k, os, oi, kk);
    });
    return 0;
}

// dst[i] = src[rows[i]] for rows of row_bytes bytes: torch.index_select spent ~38 ns per 128-byte row on the
// scattered retrieved rows (more than a search at 8K entries); this prefetching copy 3-6x less.
void mt_gather_rows(const char* src, const int64_t* rows, int64_t n, int64_t row_bytes, char* dst) {
    copy_rows(src, rows, n, (size_t)row_bytes, dst);
}

int mt_kernel_version() { return 2; }

}
