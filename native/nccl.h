// What other bindings may ask of an NcclComm (nccl.cc) handed to them from JavaScript: its device,
// and an in-place sum over its ranks of memory already on that device (no host staging). `comm`
// must be a live NcclComm made by this addon (checked by its type tag); `fn` names the calling
// export in the errors, which are JS errors.
#pragma once

#include <napi.h>

#include <cstddef>
#include <string>

namespace emorl {

// The CUDA device the communicator was made on.
int nccl_comm_device(Napi::Env env, Napi::Value comm, const std::string& fn);

// data[0, n) (memory on the communicator's device) := its sum over the ranks; returns when done.
void nccl_sum_in_place(Napi::Env env, Napi::Value comm, float* data, size_t n, const std::string& fn);

}  // namespace emorl
