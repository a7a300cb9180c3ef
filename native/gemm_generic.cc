// SGEMM micro-kernel compiled for generic (see gemm_kernel.h; CMakeLists.txt sets this file's ISA flags).
#define EMORL_GEMM_NS isa_generic
#define EMORL_GEMM_NAME "generic"
#define EMORL_GEMM_GETTER gemm_kernel_generic
#define EMORL_VW 4
#define EMORL_MR 6
#include "gemm_kernel.h"
