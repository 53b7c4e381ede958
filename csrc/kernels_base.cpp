// The kernels for the compiler's default target (baseline x86-64 on x86, the platform's on others).
#include "kernel_table.h"
#pragma GCC diagnostic ignored "-Wpsabi"
namespace k_base {
#include "attnres_kernels.h"
}
extern const KernelTable attnres_kernels_base = k_base::kTable;
