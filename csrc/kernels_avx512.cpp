// The kernels for AVX-512 F/BW/VL/DQ (chosen at load time when the CPU has them).
#include "kernel_table.h"
#ifdef ATTNRES_X86_DISPATCH
#pragma GCC diagnostic ignored "-Wpsabi"
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,avx2,fma,f16c")
namespace k_avx512 {
#include "attnres_kernels.h"
}
extern const KernelTable attnres_kernels_avx512 = k_avx512::kTable;
#endif
