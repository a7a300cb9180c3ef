// The GPU decoding stage's kernels built for the SIMT emulator (simt.h): the same source as the
// CUDA build, run on the CPU, so tests check the kernels on machines without a GPU.
#include "decoder_gpu.cu"
