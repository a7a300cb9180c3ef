// The device-resident parameters' kernels (params_gpu.cu) built for the SIMT emulator (simt.h).
#include "params_gpu.cu"
