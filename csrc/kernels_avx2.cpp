// The kernels for AVX2 + FMA (chosen at load time when the CPU has them).
#include "kernel_table.h"
#ifdef ATTNRES_X86_DISPATCH
#pragma GCC diagnostic ignored "-Wpsabi"
#pragma GCC target("avx2,fma,f16c")
namespace k_avx2 {
#include "attnres_kernels.h"
}
extern const KernelTable attnres_kernels_avx2 = k_avx2::kTable;
#endif
