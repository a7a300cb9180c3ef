// SGEMM micro-kernel compiled for avx512 (see gemm_kernel.h; CMakeLists.txt sets this file's ISA flags).
#define EMORL_GEMM_NS isa_avx512
#define EMORL_GEMM_NAME "avx512"
#define EMORL_GEMM_GETTER gemm_kernel_avx512
#define EMORL_VW 16
#define EMORL_MR 8
#include "gemm_kernel.h"
