// The type-erased entry points of one build of the depth-attention kernels (attnres_kernels.h).
// attnres_cpu.cpp holds one table per instruction-set target and picks one at load time.
#pragma once
#include <cmath>
#include <cstdint>
#include <cstring>

typedef void (*fwd_fn)(const void* const*, const int64_t*, int, const float*, float, float, void*, int64_t, int64_t,
                       int64_t, float*, float*, const void**);
typedef void (*bwd_fn)(const void*, int64_t, int64_t, const void* const*, const int64_t*, void* const*, int,
                       const float*, float, float, float*, int64_t, int64_t, int64_t, int64_t, int64_t, float*, float*,
                       const void**, void**);
typedef void (*p1_fn)(const void* const*, const int64_t*, int, const float*, int64_t, float, void*, float*, float*,
                      int64_t, int64_t, int64_t, int64_t, float*, float*, float*, float*, const void**);
typedef void (*p2_fn)(const void*, int64_t, const float*, const float*, const void*, int64_t, const float*, float,
                      float, void*, int64_t, int64_t, int64_t);
struct KernelTable {
  fwd_fn fwd[3];  // by dtype: 0 float32, 1 bfloat16, 2 float16
  bwd_fn bwd[3];
  p1_fn p1[3];
  p2_fn p2[3];
};

#if defined(__x86_64__) && defined(__GNUC__)
#define ATTNRES_X86_DISPATCH 1
#endif

extern const KernelTable attnres_kernels_base;
#ifdef ATTNRES_X86_DISPATCH
extern const KernelTable attnres_kernels_avx2;
extern const KernelTable attnres_kernels_avx512;
#endif
