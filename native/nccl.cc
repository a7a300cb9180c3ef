// NCCL, loaded at run time: dlopen("libnccl.so.2") and dlsym of the few entry points we use,
// with their prototypes declared here, so that building the addon needs no NCCL (or CUDA)
// headers and the addon loads on machines without NCCL. Every problem becomes a JS error that
// names the library or the NCCL call; nothing here aborts.
//
// Exports (registered by binding.cc):
//   ncclStatus(lib?)            -> { available, library, version?, error? }
//   ncclGetUniqueId(lib?)       -> Buffer(128): rank 0 makes it, the launcher hands it to the others
//   new NcclComm(id, nranks, rank, device, lib?)
//                               ncclCommInitRank (blocks until all ranks joined); methods
//                               allreduceSum(Float32Array) -> Float32Array (CUDA builds: staged
//                               through device memory on `device`, kept between calls), destroy(); getters rank, size,
//                               device, destroyed.
// nccl.h: other bindings' in-place allreduce of device memory through an NcclComm they are handed.
// The communicator and its library handle live in the JS-owned NcclComm object (ObjectWrap;
// destroyed by destroy() or the finalizer); the free functions open the library per call. No
// global mutable state. The library is opened RTLD_NODELETE: NCCL starts threads (the bootstrap
// root of ncclGetUniqueId) that must outlive our handle, so dlclose never unmaps it.
#include "nccl.h"

#include <napi.h>
#include <dlfcn.h>

#include <cstddef>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <string>

#if defined(EMORL_CUDA)
#include <cuda_runtime.h>
#endif

namespace emorl {
namespace {

// ---- The NCCL ABI we rely on (nccl.h, stable since NCCL 2.0) ---------------------------------
constexpr size_t kUniqueIdBytes = 128;  // NCCL_UNIQUE_ID_BYTES
struct ncclUniqueId {
  char internal[kUniqueIdBytes];
};
struct ncclComm;  // opaque
using ncclComm_t = ncclComm*;
using ncclResult_t = int;  // enum: ncclSuccess = 0
using ncclDataType_t = int;
using ncclRedOp_t = int;
using cudaStream_t_ = void*;
constexpr ncclDataType_t kNcclFloat32 = 7;
constexpr ncclRedOp_t kNcclSum = 0;
constexpr ncclResult_t kNcclSuccess = 0;

using GetUniqueIdFn = ncclResult_t (*)(ncclUniqueId*);
using CommInitRankFn = ncclResult_t (*)(ncclComm_t*, int, ncclUniqueId, int);
using AllReduceFn = ncclResult_t (*)(const void*, void*, size_t, ncclDataType_t, ncclRedOp_t, ncclComm_t, cudaStream_t_);
using CommDestroyFn = ncclResult_t (*)(ncclComm_t);
using GetErrorStringFn = const char* (*)(ncclResult_t);
using GetVersionFn = ncclResult_t (*)(int*);

constexpr const char* kDefaultLibrary = "libnccl.so.2";

// Marks the JS objects that wrap an NcclComm, so that nccl.h's functions unwrap nothing else.
constexpr napi_type_tag kNcclCommTag = {0x656d6f726c2d6e63ULL, 0x636c2d636f6d6d31ULL};

// One dlopen of the library with its entry points; closes (refcount only: RTLD_NODELETE) on scope exit.
class NcclLibrary {
 public:
  // On failure `error()` says why, naming the library.
  explicit NcclLibrary(const std::string& name) : name_(name) {
    dlerror();
    handle_ = dlopen(name.c_str(), RTLD_NOW | RTLD_LOCAL | RTLD_NODELETE);
    if (!handle_) {
      const char* e = dlerror();
      error_ = "cannot load " + name + " (" + (e ? e : "unknown dlopen error") +
               "); install NCCL 2 (e.g. the nvidia-nccl-cu12 wheel or the libnccl2 package) and make it findable "
               "through LD_LIBRARY_PATH, or give its path in EMORL_NCCL_LIBRARY";
      return;
    }
    bool ok = sym(get_unique_id_, "ncclGetUniqueId") && sym(comm_init_rank_, "ncclCommInitRank") &&
              sym(all_reduce_, "ncclAllReduce") && sym(comm_destroy_, "ncclCommDestroy") &&
              sym(get_error_string_, "ncclGetErrorString");
    if (ok) get_version_ = reinterpret_cast<GetVersionFn>(dlsym(handle_, "ncclGetVersion"));  // optional
  }
  ~NcclLibrary() {
    if (handle_) dlclose(handle_);
  }
  NcclLibrary(const NcclLibrary&) = delete;
  NcclLibrary& operator=(const NcclLibrary&) = delete;

  bool ok() const { return handle_ && error_.empty(); }
  const std::string& error() const { return error_; }
  const std::string& name() const { return name_; }

  std::string describe(const char* call, ncclResult_t r) const {
    const char* s = get_error_string_ ? get_error_string_(r) : nullptr;
    return std::string(call) + " failed: " + (s ? s : "unknown error") + " (ncclResult_t " + std::to_string(r) + ")";
  }
  int version() const {
    int v = 0;
    return get_version_ && get_version_(&v) == kNcclSuccess ? v : 0;
  }

  GetUniqueIdFn get_unique_id_ = nullptr;
  CommInitRankFn comm_init_rank_ = nullptr;
  AllReduceFn all_reduce_ = nullptr;
  CommDestroyFn comm_destroy_ = nullptr;
  GetErrorStringFn get_error_string_ = nullptr;
  GetVersionFn get_version_ = nullptr;

 private:
  template <typename F>
  bool sym(F& f, const char* symbol) {
    dlerror();
    void* p = dlsym(handle_, symbol);
    if (!p) {
      const char* e = dlerror();
      error_ = name_ + " has no symbol " + symbol + " (" + (e ? e : "not found") + "); is it NCCL 2?";
      return false;
    }
    f = reinterpret_cast<F>(p);
    return true;
  }

  std::string name_;
  void* handle_ = nullptr;
  std::string error_;
};

// The library to open: the argument if given, else $EMORL_NCCL_LIBRARY, else libnccl.so.2.
std::string library_arg(const Napi::CallbackInfo& info, size_t i, const char* fn) {
  if (i < info.Length() && !info[i].IsUndefined() && !info[i].IsNull()) {
    if (!info[i].IsString()) throw Napi::TypeError::New(info.Env(), std::string("emorl.") + fn + ": argument 'library' must be a string");
    std::string s = info[i].As<Napi::String>().Utf8Value();
    if (s.empty() || s.find('\0') != std::string::npos) throw Napi::TypeError::New(info.Env(), std::string("emorl.") + fn + ": argument 'library' must be a non-empty path");
    return s;
  }
  const char* env = std::getenv("EMORL_NCCL_LIBRARY");
  return env && *env ? std::string(env) : std::string(kDefaultLibrary);
}

int int_arg(const Napi::CallbackInfo& info, size_t i, const char* fn, const char* name, int lo, int hi) {
  const Napi::Env env = info.Env();
  if (i >= info.Length() || !info[i].IsNumber()) throw Napi::TypeError::New(env, std::string("emorl.") + fn + ": argument '" + name + "' must be a number");
  const double d = info[i].As<Napi::Number>().DoubleValue();
  if (!(d >= lo && d <= hi) || d != static_cast<double>(static_cast<int64_t>(d))) {
    throw Napi::RangeError::New(env, std::string("emorl.") + fn + ": argument '" + name + "' must be an integer in [" + std::to_string(lo) + ", " +
                                         std::to_string(hi) + "], got " + info[i].ToString().Utf8Value());
  }
  return static_cast<int>(d);
}

Napi::Value NcclStatus(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  const std::string name = library_arg(info, 0, "ncclStatus");
  NcclLibrary lib(name);
  Napi::Object o = Napi::Object::New(env);
  o.Set("available", lib.ok());
  o.Set("library", name);
  if (lib.ok()) {
    const int v = lib.version();
    if (v) o.Set("version", v);
  } else {
    o.Set("error", lib.error());
  }
  return o;
}

Napi::Value NcclGetUniqueId(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  NcclLibrary lib(library_arg(info, 0, "ncclGetUniqueId"));
  if (!lib.ok()) throw Napi::Error::New(env, "emorl.ncclGetUniqueId: " + lib.error());
  ncclUniqueId id;
  std::memset(&id, 0, sizeof id);
  const ncclResult_t r = lib.get_unique_id_(&id);
  if (r != kNcclSuccess) throw Napi::Error::New(env, "emorl.ncclGetUniqueId: " + lib.describe("ncclGetUniqueId", r));
  return Napi::Buffer<uint8_t>::Copy(env, reinterpret_cast<const uint8_t*>(id.internal), kUniqueIdBytes);
}

#if defined(EMORL_CUDA)
std::string cuda_describe(const char* call, cudaError_t e) {
  std::string s = std::string(call) + " failed: " + cudaGetErrorString(e);
  cudaGetLastError();  // clear the sticky error state
  return s;
}
#endif

class NcclComm : public Napi::ObjectWrap<NcclComm> {
 public:
  static Napi::Function Define(Napi::Env env) {
    return DefineClass(env, "NcclComm",
                       {InstanceMethod<&NcclComm::AllreduceSum>("allreduceSum"), InstanceMethod<&NcclComm::Destroy>("destroy"),
                        InstanceAccessor<&NcclComm::Rank>("rank"), InstanceAccessor<&NcclComm::Size>("size"),
                        InstanceAccessor<&NcclComm::Device>("device"), InstanceAccessor<&NcclComm::Destroyed>("destroyed")});
  }

  // new NcclComm(uniqueId: Uint8Array(128), nranks, rank, device, library?)
  explicit NcclComm(const Napi::CallbackInfo& info) : Napi::ObjectWrap<NcclComm>(info) {
    Napi::Env env = info.Env();
    const char* fn = "NcclComm";
    if (!info.IsConstructCall()) throw Napi::TypeError::New(env, "emorl.NcclComm: use `new NcclComm(...)`");
    if (info.Length() < 1 || !info[0].IsTypedArray() || info[0].As<Napi::TypedArray>().TypedArrayType() != napi_uint8_array) {
      throw Napi::TypeError::New(env, "emorl.NcclComm: argument 'uniqueId' must be a Uint8Array or Buffer (from ncclGetUniqueId)");
    }
    auto idArr = info[0].As<Napi::Uint8Array>();
    if (idArr.ElementLength() != kUniqueIdBytes) {
      throw Napi::RangeError::New(env, "emorl.NcclComm: argument 'uniqueId' has " + std::to_string(idArr.ElementLength()) + " bytes, an ncclUniqueId has " +
                                           std::to_string(kUniqueIdBytes));
    }
    nranks_ = int_arg(info, 1, fn, "nranks", 1, 1 << 20);
    rank_ = int_arg(info, 2, fn, "rank", 0, nranks_ - 1);
    device_ = int_arg(info, 3, fn, "device", 0, 1 << 16);
    auto lib = std::make_unique<NcclLibrary>(library_arg(info, 4, fn));
    if (!lib->ok()) throw Napi::Error::New(env, "emorl.NcclComm: " + lib->error());
    ncclUniqueId id;
    std::memcpy(id.internal, idArr.Data(), kUniqueIdBytes);
#if defined(EMORL_CUDA)
    cudaError_t ce = cudaSetDevice(device_);
    if (ce != cudaSuccess) throw Napi::Error::New(env, "emorl.NcclComm: " + cuda_describe("cudaSetDevice", ce) + " (device " + std::to_string(device_) + ")");
    ce = cudaStreamCreateWithFlags(reinterpret_cast<cudaStream_t*>(&stream_), cudaStreamNonBlocking);
    if (ce != cudaSuccess) throw Napi::Error::New(env, "emorl.NcclComm: " + cuda_describe("cudaStreamCreate", ce));
#endif
    ncclComm_t comm = nullptr;
    const ncclResult_t r = lib->comm_init_rank_(&comm, nranks_, id, rank_);
    if (r != kNcclSuccess) {
      release_stream();
      throw Napi::Error::New(env, "emorl.NcclComm: " + lib->describe("ncclCommInitRank", r) + " (rank " + std::to_string(rank_) + " of " +
                                      std::to_string(nranks_) + ", device " + std::to_string(device_) + ")");
    }
    comm_ = comm;
    lib_ = std::move(lib);
    info.This().As<Napi::Object>().TypeTag(&kNcclCommTag);
  }

  ~NcclComm() override { release(); }

  // The live communicator `v` wraps; a JS error (prefix `fn`) otherwise.
  static NcclComm& of(Napi::Env env, Napi::Value v, const std::string& fn) {
    if (!v.IsObject() || !v.As<Napi::Object>().CheckTypeTag(&kNcclCommTag))
      throw Napi::TypeError::New(env, "emorl." + fn + ": argument 'comm' must be an NcclComm");
    NcclComm* c = Unwrap(v.As<Napi::Object>());
    if (!c->comm_) throw Napi::Error::New(env, "emorl." + fn + ": the communicator was destroyed");
    return *c;
  }

  int device() const { return device_; }

  void sum_in_place(Napi::Env env, float* data, size_t n, const std::string& fn) {
    const std::string where = "emorl." + fn + ": ";
    if (n == 0) return;
#if defined(EMORL_CUDA)
    cudaError_t ce = cudaSetDevice(device_);
    if (ce != cudaSuccess) throw Napi::Error::New(env, where + cuda_describe("cudaSetDevice", ce));
    const ncclResult_t r = lib_->all_reduce_(data, data, n, kNcclFloat32, kNcclSum, comm_, stream_);
    if (r != kNcclSuccess) throw Napi::Error::New(env, where + lib_->describe("ncclAllReduce", r));
    ce = cudaStreamSynchronize(reinterpret_cast<cudaStream_t>(stream_));
    if (ce != cudaSuccess) throw Napi::Error::New(env, where + cuda_describe("cudaStreamSynchronize", ce));
#else
    (void)data;
    throw Napi::Error::New(env, where + "this addon was built without CUDA (EMORL_CUDA=OFF): there is no device memory to reduce");
#endif
  }

 private:
  void release_stream() {
#if defined(EMORL_CUDA)
    if (stream_) cudaStreamDestroy(reinterpret_cast<cudaStream_t>(stream_));
#endif
    stream_ = nullptr;
  }
  void release_staging() {
#if defined(EMORL_CUDA)
    if (staging_) {
      cudaSetDevice(device_);
      cudaFree(staging_);
    }
#endif
    staging_ = nullptr;
    staging_floats_ = 0;
  }

  // Destroys the communicator, its stream and our library handle; returns ncclCommDestroy's
  // error, if any (empty when there was nothing to destroy).
  std::string release() {
    std::string err;
    if (comm_ && lib_) {
      const ncclResult_t r = lib_->comm_destroy_(comm_);
      if (r != kNcclSuccess) err = lib_->describe("ncclCommDestroy", r);
    }
    comm_ = nullptr;
    release_staging();
    release_stream();
    lib_.reset();
    return err;
  }

  void check_live(Napi::Env env, const char* what) const {
    if (!comm_) throw Napi::Error::New(env, std::string("emorl.NcclComm.") + what + ": the communicator was destroyed");
  }

  Napi::Value AllreduceSum(const Napi::CallbackInfo& info) {
    Napi::Env env = info.Env();
    check_live(env, "allreduceSum");
    if (info.Length() < 1 || !info[0].IsTypedArray() || info[0].As<Napi::TypedArray>().TypedArrayType() != napi_float32_array) {
      throw Napi::TypeError::New(env, "emorl.NcclComm.allreduceSum: argument 'data' must be a Float32Array");
    }
    auto in = info[0].As<Napi::Float32Array>();
    const size_t n = in.ElementLength();
    auto out = Napi::Float32Array::New(env, n);
    if (n == 0) return out;
#if defined(EMORL_CUDA)
    cudaError_t ce = cudaSetDevice(device_);
    if (ce != cudaSuccess) throw Napi::Error::New(env, "emorl.NcclComm.allreduceSum: " + cuda_describe("cudaSetDevice", ce));
    // the staging buffer is kept from call to call (a cudaFree per step would wait for the device)
    if (staging_floats_ < n) {
      release_staging();
      ce = cudaMalloc(&staging_, n * sizeof(float));
      if (ce != cudaSuccess) {
        staging_ = nullptr;
        throw Napi::Error::New(env, "emorl.NcclComm.allreduceSum: " + cuda_describe("cudaMalloc", ce));
      }
      staging_floats_ = n;
    }
    void* dev = staging_;
    auto stream = reinterpret_cast<cudaStream_t>(stream_);
    ce = cudaMemcpyAsync(dev, in.Data(), n * sizeof(float), cudaMemcpyHostToDevice, stream);
    if (ce != cudaSuccess) throw Napi::Error::New(env, "emorl.NcclComm.allreduceSum: " + cuda_describe("cudaMemcpyAsync", ce));
    const ncclResult_t r = lib_->all_reduce_(dev, dev, n, kNcclFloat32, kNcclSum, comm_, stream_);
    if (r != kNcclSuccess) throw Napi::Error::New(env, "emorl.NcclComm.allreduceSum: " + lib_->describe("ncclAllReduce", r));
    ce = cudaMemcpyAsync(out.Data(), dev, n * sizeof(float), cudaMemcpyDeviceToHost, stream);
    if (ce == cudaSuccess) ce = cudaStreamSynchronize(stream);
    if (ce != cudaSuccess) throw Napi::Error::New(env, "emorl.NcclComm.allreduceSum: " + cuda_describe("cudaMemcpy/cudaStreamSynchronize", ce));
    return out;
#else
    throw Napi::Error::New(env,
                           "emorl.NcclComm.allreduceSum: this addon was built without CUDA (EMORL_CUDA=OFF); NCCL needs device buffers. "
                           "Rebuild with EMORL_CUDA=1 npm run build:native");
#endif
  }

  // Idempotent; the communicator is gone afterwards even when ncclCommDestroy reports an error.
  Napi::Value Destroy(const Napi::CallbackInfo& info) {
    const std::string err = release();
    if (!err.empty()) throw Napi::Error::New(info.Env(), "emorl.NcclComm.destroy: " + err);
    return info.Env().Undefined();
  }

  Napi::Value Rank(const Napi::CallbackInfo& info) { return Napi::Number::New(info.Env(), rank_); }
  Napi::Value Size(const Napi::CallbackInfo& info) { return Napi::Number::New(info.Env(), nranks_); }
  Napi::Value Device(const Napi::CallbackInfo& info) { return Napi::Number::New(info.Env(), device_); }
  Napi::Value Destroyed(const Napi::CallbackInfo& info) { return Napi::Boolean::New(info.Env(), comm_ == nullptr); }

  std::unique_ptr<NcclLibrary> lib_;
  ncclComm_t comm_ = nullptr;
  void* stream_ = nullptr;
  void* staging_ = nullptr;  // device memory allreduceSum stages host data through
  size_t staging_floats_ = 0;
  int nranks_ = 0;
  int rank_ = 0;
  int device_ = 0;
};

}  // namespace

int nccl_comm_device(Napi::Env env, Napi::Value comm, const std::string& fn) { return NcclComm::of(env, comm, fn).device(); }

void nccl_sum_in_place(Napi::Env env, Napi::Value comm, float* data, size_t n, const std::string& fn) {
  NcclComm::of(env, comm, fn).sum_in_place(env, data, n, fn);
}

void register_nccl(Napi::Env env, Napi::Object exports) {
  exports.Set("ncclStatus", Napi::Function::New(env, NcclStatus, "ncclStatus"));
  exports.Set("ncclGetUniqueId", Napi::Function::New(env, NcclGetUniqueId, "ncclGetUniqueId"));
  exports.Set("NcclComm", NcclComm::Define(env));
}

}  // namespace emorl
