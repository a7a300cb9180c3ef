// The GPU GRU step (gru_gpu.cu) built for the SIMT emulator (simt.h).
#include "gru_gpu.cu"
