// AVX2 + FMA build of the 8-lane kernel (topk_simd8.h): built with -mavx2 -mfma, loaded only on CPUs that have
// both (memtrans.memory.fast_topk checks before loading). No int8 prefilter here: AVX2 has no VNNI, and its
// int8 dot product (vpmaddubsw + vpmaddwd, saturating) buys too little over fp32 FMA to pay for the candidates.
#include "topk_simd8.h"

extern "C" {

const char* mt_isa() { return "avx2"; }

int mt_cpu_supported() {
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
}

}  // extern "C"

#include "topk_api.h"
