// Portable build of the 8-lane kernel (topk_simd8.h) with the compiler's baseline flags: any CPU a C++ compiler
// targets (ARM64 NEON, x86-64 SSE2, ...). -ffp-contract=fast lets the compiler fuse the multiply-adds where the
// CPU has FMA (ARM64 always does).
#include "topk_simd8.h"

extern "C" {

const char* mt_isa() { return "portable"; }

int mt_cpu_supported() { return 1; }

}  // extern "C"

#include "topk_api.h"
