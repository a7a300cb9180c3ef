// SGEMM micro-kernel compiled for avx2 (see gemm_kernel.h; CMakeLists.txt sets this file's ISA flags).
#define EMORL_GEMM_NS isa_avx2
#define EMORL_GEMM_NAME "avx2"
#define EMORL_GEMM_GETTER gemm_kernel_avx2
#define EMORL_VW 8
#define EMORL_MR 6
#include "gemm_kernel.h"
