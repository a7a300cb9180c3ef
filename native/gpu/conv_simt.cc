// The GPU convolutions (conv_gpu.cu) built for the SIMT emulator (simt.h).
#include "conv_gpu.cu"
