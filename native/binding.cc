// The N-API surface of the addon: argument checking (every problem becomes a JS TypeError or
// RangeError naming the function, the argument and the shape) and the calls into the kernels.
// Nothing here keeps state between calls. Results are new Float32Arrays unless the caller passes
// an `out` array (last argument) of the right length that overlaps no input.
#include <napi.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <exception>
#include <initializer_list>
#include <utility>
#include <limits>
#include <memory>
#include <sstream>
#include <string>
#include <vector>

#include "attention.h"
#include "bf16.h"
#include "common.h"
#include "conv.h"
#include "decoder.h"
#include "encoder_head.h"
#include "encoder_stage.h"
#include "gemm.h"
#include "gpu/gpu.h"
#include "gru.h"
#include "gaussian.h"
#include "layernorm.h"
#include "optimizer.h"
#include "likelihood.h"
#include "nhwc.h"
#include "nccl.h"

#if defined(EMORL_CUDA)
namespace emorl {
int cuda_device_count(std::string* error);
}
#endif

namespace emorl {
// nccl.cc: ncclStatus, ncclGetUniqueId, NcclComm (NCCL loaded at run time).
void register_nccl(Napi::Env env, Napi::Object exports);
}

namespace {

using emorl::ConvGeom;

constexpr int64_t kMaxElems = int64_t(1) << 40;

std::string shape_str(const std::vector<int64_t>& s) {
  std::ostringstream o;
  o << '[';
  for (size_t i = 0; i < s.size(); ++i) o << (i ? "," : "") << s[i];
  o << ']';
  return o.str();
}

// Reads positional arguments of one exported function; errors name the function and argument.
class Args {
 public:
  Args(const Napi::CallbackInfo& info, const char* fn) : info_(info), env_(info.Env()), fn_(fn) {}

  [[noreturn]] void type_error(const std::string& msg) const {
    throw Napi::TypeError::New(env_, std::string("emorl.") + fn_ + ": " + msg);
  }
  [[noreturn]] void range_error(const std::string& msg) const {
    throw Napi::RangeError::New(env_, std::string("emorl.") + fn_ + ": " + msg);
  }

  Napi::Value at(size_t i) const { return i < info_.Length() ? info_[i] : env_.Undefined(); }

  // A Float32Array that must hold exactly prod(shape) elements.
  const float* f32(size_t i, const char* name, const std::vector<int64_t>& shape, const char* shape_name) const {
    Napi::Value v = at(i);
    if (!v.IsTypedArray() || v.As<Napi::TypedArray>().TypedArrayType() != napi_float32_array)
      type_error(std::string("argument '") + name + "' must be a Float32Array");
    auto a = v.As<Napi::Float32Array>();
    const int64_t need = numel(shape, shape_name);
    if (static_cast<int64_t>(a.ElementLength()) != need) {
      std::ostringstream o;
      o << "argument '" << name << "' has " << a.ElementLength() << " elements but " << shape_name << ' '
        << shape_str(shape) << " needs " << need;
      range_error(o.str());
    }
    return need ? a.Data() : nullptr;
  }

  // An optional Float32Array (null/undefined -> nullptr) of exactly n elements.
  const float* f32_opt(size_t i, const char* name, int64_t n, const char* what) const {
    Napi::Value v = at(i);
    if (v.IsNull() || v.IsUndefined()) return nullptr;
    if (!v.IsTypedArray() || v.As<Napi::TypedArray>().TypedArrayType() != napi_float32_array)
      type_error(std::string("argument '") + name + "' must be a Float32Array, null or undefined");
    auto a = v.As<Napi::Float32Array>();
    if (static_cast<int64_t>(a.ElementLength()) != n) {
      std::ostringstream o;
      o << "argument '" << name << "' has " << a.ElementLength() << " elements but " << what << " needs " << n;
      range_error(o.str());
    }
    return a.Data();
  }

  // An array of `rank` (or any of `ranks`) non-negative integers, each >= min_value.
  std::vector<int64_t> ints(size_t i, const char* name, std::vector<size_t> ranks, int64_t min_value = 0) const {
    Napi::Value v = at(i);
    if (!v.IsArray()) type_error(std::string("argument '") + name + "' must be an array of integers");
    auto a = v.As<Napi::Array>();
    bool rank_ok = false;
    for (size_t r : ranks) rank_ok = rank_ok || a.Length() == r;
    if (!rank_ok) {
      std::ostringstream o;
      o << "argument '" << name << "' must have ";
      for (size_t k = 0; k < ranks.size(); ++k) o << (k ? " or " : "") << ranks[k];
      o << " entries, got " << a.Length();
      range_error(o.str());
    }
    std::vector<int64_t> out(a.Length());
    for (uint32_t k = 0; k < a.Length(); ++k) {
      Napi::Value e = a.Get(k);
      if (!e.IsNumber()) type_error(std::string("argument '") + name + "' must contain only numbers");
      const double d = e.As<Napi::Number>().DoubleValue();
      if (!std::isfinite(d) || std::floor(d) != d || d < double(min_value) || d > 2147483647.0) {
        std::ostringstream o;
        o << "argument '" << name << "' entry " << k << " is " << d << "; expected an integer >= " << min_value
          << " (" << name << " = " << (a.Length() ? "" : "[]");
        for (uint32_t m = 0; m < a.Length(); ++m) {
          Napi::Value em = a.Get(m);
          o << (m ? "," : "[");
          if (em.IsNumber()) o << em.As<Napi::Number>().DoubleValue();
          else o << '?';
        }
        o << (a.Length() ? "])" : ")");
        range_error(o.str());
      }
      out[k] = static_cast<int64_t>(d);
    }
    return out;
  }

  bool boolean(size_t i, const char* name, bool dflt) const {
    Napi::Value v = at(i);
    if (v.IsUndefined() || v.IsNull()) return dflt;
    if (!v.IsBoolean()) type_error(std::string("argument '") + name + "' must be a boolean");
    return v.As<Napi::Boolean>().Value();
  }

  int64_t numel(const std::vector<int64_t>& shape, const char* shape_name) const {
    int64_t n = 1;
    for (int64_t d : shape) {
      if (d != 0 && n > kMaxElems / d) range_error(std::string(shape_name) + ' ' + shape_str(shape) + " is too large");
      n *= d;
    }
    return n;
  }

  Napi::Env env() const { return env_; }
  const char* fn() const { return fn_; }

 private:
  const Napi::CallbackInfo& info_;
  Napi::Env env_;
  const char* fn_;
};

Napi::Float32Array new_f32(const Args& a, int64_t n) {
  if (n > int64_t(std::numeric_limits<uint32_t>::max()))
    a.range_error("output of " + std::to_string(n) + " elements is too large for a Float32Array");
  return Napi::Float32Array::New(a.env(), static_cast<size_t>(n));
}

// A result object with these fields, in this order.
Napi::Object object_of(Napi::Env env, std::initializer_list<std::pair<const char*, Napi::Value>> fields) {
  Napi::Object o = Napi::Object::New(env);
  for (const auto& f : fields) o.Set(f.first, f.second);
  return o;
}

// The result array: a new one, or the caller's `out` (argument i: a Float32Array of exactly n
// elements that shares no memory with any input), so hot loops can reuse their buffers.
Napi::Float32Array out_or_new(const Args& a, size_t i, int64_t n, std::initializer_list<std::pair<size_t, const char*>> inputs) {
  Napi::Value v = a.at(i);
  if (v.IsUndefined() || v.IsNull()) return new_f32(a, n);
  if (!v.IsTypedArray() || v.As<Napi::TypedArray>().TypedArrayType() != napi_float32_array)
    a.type_error("argument 'out' must be a Float32Array, null or undefined");
  auto out = v.As<Napi::Float32Array>();
  if (static_cast<int64_t>(out.ElementLength()) != n) {
    std::ostringstream o;
    o << "argument 'out' has " << out.ElementLength() << " elements but the result has " << n;
    a.range_error(o.str());
  }
  const char* ob = reinterpret_cast<const char*>(out.Data());
  const char* oe = ob + out.ByteLength();
  for (const auto& in : inputs) {
    Napi::Value iv = a.at(in.first);
    if (!iv.IsTypedArray()) continue;
    auto t = iv.As<Napi::TypedArray>();
    const char* ib = static_cast<const char*>(t.ArrayBuffer().Data()) + t.ByteOffset();
    const char* ie = ib + t.ByteLength();
    if (ib < oe && ob < ie && out.ByteLength() && t.ByteLength())
      a.range_error(std::string("argument 'out' overlaps argument '") + in.second + "'");
  }
  return out;
}

// Wraps a binding so that C++ exceptions other than Napi::Error (e.g. std::bad_alloc) become JS
// errors instead of terminating the process.
template <Napi::Value (*F)(const Napi::CallbackInfo&, bool)>
Napi::Value guarded(const Napi::CallbackInfo& info, bool reference) {
  try {
    return F(info, reference);
  } catch (const Napi::Error&) {
    throw;
  } catch (const std::bad_alloc&) {
    throw Napi::RangeError::New(info.Env(), "emorl: out of memory");
  } catch (const std::exception& e) {
    throw Napi::Error::New(info.Env(), std::string("emorl: ") + e.what());
  }
}

// Conv geometry from the (forward) conv's input shape, weight shape, stride and 4-sided padding.
// wShape = [Co, C, kh, kw] in the forward conv's orientation.
ConvGeom conv_geom(const Args& a, const std::vector<int64_t>& xs, const char* xname, const std::vector<int64_t>& ws,
                   const char* wname, int64_t w_in_dim, const std::vector<int64_t>& stride,
                   const std::vector<int64_t>& pad) {
  ConvGeom g{};
  g.N = xs[0];
  g.C = xs[1];
  g.H = xs[2];
  g.W = xs[3];
  const int64_t w_in = ws[w_in_dim];
  if (w_in != g.C) {
    std::ostringstream o;
    o << wname << ' ' << shape_str(ws) << " has " << w_in << " input channels but " << xname << ' ' << shape_str(xs)
      << " has " << g.C;
    a.range_error(o.str());
  }
  g.Co = ws[1 - w_in_dim];
  g.kh = ws[2];
  g.kw = ws[3];
  if (g.kh < 1 || g.kw < 1) a.range_error(std::string(wname) + ' ' + shape_str(ws) + " has an empty kernel");
  g.sh = stride[0];
  g.sw = stride.size() > 1 ? stride[1] : stride[0];
  g.pt = pad[0];
  g.pl = pad[2];
  const int64_t hp = g.H + pad[0] + pad[1] - g.kh, wp = g.W + pad[2] + pad[3] - g.kw;
  if (hp < 0 || wp < 0) {
    std::ostringstream o;
    o << "kernel " << g.kh << 'x' << g.kw << " is larger than the padded input (" << xname << ' ' << shape_str(xs)
      << ", pad " << shape_str(pad) << ')';
    a.range_error(o.str());
  }
  g.Ho = hp / g.sh + 1;
  g.Wo = wp / g.sw + 1;
  return g;
}

void expect_shape(const Args& a, const char* name, const std::vector<int64_t>& got, const std::vector<int64_t>& want) {
  if (got != want) a.range_error(std::string(name) + ' ' + shape_str(got) + " does not match the expected " + shape_str(want));
}

int threads() { return emorl::max_threads(); }

// conv2d(x, xShape[N,C,H,W], w, wShape[Co,C,kh,kw], bias|null, stride[sh,sw], pad[t,b,l,r], out?) -> y
Napi::Value Conv2d(const Napi::CallbackInfo& info, bool reference) {
  Args a(info, "conv2d");
  auto xs = a.ints(1, "xShape", {4});
  auto ws = a.ints(3, "wShape", {4});
  auto stride = a.ints(5, "stride", {1, 2}, 1);
  auto pad = a.ints(6, "pad", {4});
  const float* x = a.f32(0, "x", xs, "xShape");
  const float* w = a.f32(2, "w", ws, "wShape");
  ConvGeom g = conv_geom(a, xs, "xShape", ws, "wShape", 1, stride, pad);
  const float* bias = a.f32_opt(4, "bias", g.Co, "wShape[0]");
  auto y = out_or_new(a, 7, a.numel({g.N, g.Co, g.Ho, g.Wo}, "output"), {{0, "x"}, {2, "w"}, {4, "bias"}});
  if (reference) emorl::ref::conv2d_forward(g, x, w, bias, y.Data());
  else emorl::conv2d_forward(g, x, w, bias, y.Data(), threads());
  return y;
}

// conv2dBackwardInput(dy, dyShape, w, wShape, xShape, stride, pad, out?) -> dx
Napi::Value Conv2dBackwardInput(const Napi::CallbackInfo& info, bool reference) {
  Args a(info, "conv2dBackwardInput");
  auto dys = a.ints(1, "dyShape", {4});
  auto ws = a.ints(3, "wShape", {4});
  auto xs = a.ints(4, "xShape", {4});
  auto stride = a.ints(5, "stride", {1, 2}, 1);
  auto pad = a.ints(6, "pad", {4});
  const float* dy = a.f32(0, "dy", dys, "dyShape");
  const float* w = a.f32(2, "w", ws, "wShape");
  ConvGeom g = conv_geom(a, xs, "xShape", ws, "wShape", 1, stride, pad);
  expect_shape(a, "dyShape", dys, {g.N, g.Co, g.Ho, g.Wo});
  auto dx = out_or_new(a, 7, a.numel(xs, "xShape"), {{0, "dy"}, {2, "w"}});
  if (reference) emorl::ref::conv2d_backward_input(g, dy, w, dx.Data());
  else emorl::conv2d_backward_input(g, dy, w, dx.Data(), threads());
  return dx;
}

Napi::Value grads_object(const Args& a, Napi::Float32Array dw, Napi::Value db) {
  Napi::Object o = Napi::Object::New(a.env());
  o.Set("dw", dw);
  o.Set("db", db);
  return o;
}

// conv2dBackwardFilter(x, xShape, dy, dyShape, wShape, stride, pad, withBias) -> {dw, db|null}
Napi::Value Conv2dBackwardFilter(const Napi::CallbackInfo& info, bool reference) {
  Args a(info, "conv2dBackwardFilter");
  auto xs = a.ints(1, "xShape", {4});
  auto dys = a.ints(3, "dyShape", {4});
  auto ws = a.ints(4, "wShape", {4});
  auto stride = a.ints(5, "stride", {1, 2}, 1);
  auto pad = a.ints(6, "pad", {4});
  const bool with_bias = a.boolean(7, "withBias", false);
  const float* x = a.f32(0, "x", xs, "xShape");
  const float* dy = a.f32(2, "dy", dys, "dyShape");
  ConvGeom g = conv_geom(a, xs, "xShape", ws, "wShape", 1, stride, pad);
  expect_shape(a, "dyShape", dys, {g.N, g.Co, g.Ho, g.Wo});
  auto dw = new_f32(a, a.numel(ws, "wShape"));
  Napi::Value dbv = a.env().Null();
  float* db = nullptr;
  if (with_bias) {
    auto dbArr = new_f32(a, g.Co);
    db = dbArr.Data();
    dbv = dbArr;
  }
  if (reference) emorl::ref::conv2d_backward_filter(g, x, dy, dw.Data(), db);
  else emorl::conv2d_backward_filter(g, x, dy, dw.Data(), db, threads());
  return grads_object(a, dw, dbv);
}

// The forward-conv geometry matching a transposed conv with input xShape [N,Ci,H,W], weight
// [Ci,Co,kh,kw], stride, padding [ph,pw], outputPadding [oph,opw]: its image side is the
// transposed conv's output [N,Co,Ho,Wo], Ho = (H-1)*sh - 2ph + kh + oph.
ConvGeom convt_geom(const Args& a, const std::vector<int64_t>& xs, const std::vector<int64_t>& ws,
                    const std::vector<int64_t>& stride, const std::vector<int64_t>& padding,
                    const std::vector<int64_t>& outpad) {
  if (ws[0] != xs[1]) {
    std::ostringstream o;
    o << "wShape " << shape_str(ws) << " has " << ws[0] << " input channels but xShape " << shape_str(xs) << " has "
      << xs[1];
    a.range_error(o.str());
  }
  if (ws[2] < 1 || ws[3] < 1) a.range_error("wShape " + shape_str(ws) + " has an empty kernel");
  const int64_t sh = stride[0], sw = stride.size() > 1 ? stride[1] : stride[0];
  const int64_t ph = padding[0], pw = padding.size() > 1 ? padding[1] : padding[0];
  const int64_t oph = outpad[0], opw = outpad.size() > 1 ? outpad[1] : outpad[0];
  if (oph >= sh || opw >= sw)
    a.range_error("outputPadding " + shape_str(outpad) + " must be smaller than stride " + shape_str(stride));
  if (xs[2] < 1 || xs[3] < 1) a.range_error("xShape " + shape_str(xs) + " has an empty image");
  const int64_t Ho = (xs[2] - 1) * sh - 2 * ph + ws[2] + oph, Wo = (xs[3] - 1) * sw - 2 * pw + ws[3] + opw;
  if (Ho < 1 || Wo < 1) {
    std::ostringstream o;
    o << "output size " << Ho << 'x' << Wo << " is not positive (xShape " << shape_str(xs) << ", padding "
      << shape_str(padding) << ')';
    a.range_error(o.str());
  }
  ConvGeom g{};
  g.N = xs[0];
  g.C = ws[1];
  g.H = Ho;
  g.W = Wo;
  g.Co = xs[1];
  g.Ho = xs[2];
  g.Wo = xs[3];
  g.kh = ws[2];
  g.kw = ws[3];
  g.sh = sh;
  g.sw = sw;
  g.pt = ph;
  g.pl = pw;
  return g;
}

// conv2dTranspose(x, xShape[N,Ci,H,W], w, wShape[Ci,Co,kh,kw], bias|null, stride, padding[ph,pw],
//                 outputPadding[oph,opw], out?) -> y[N,Co,Ho,Wo]
Napi::Value Conv2dTranspose(const Napi::CallbackInfo& info, bool reference) {
  Args a(info, "conv2dTranspose");
  auto xs = a.ints(1, "xShape", {4});
  auto ws = a.ints(3, "wShape", {4});
  auto stride = a.ints(5, "stride", {1, 2}, 1);
  auto padding = a.ints(6, "padding", {1, 2});
  auto outpad = a.ints(7, "outputPadding", {1, 2});
  const float* x = a.f32(0, "x", xs, "xShape");
  const float* w = a.f32(2, "w", ws, "wShape");
  ConvGeom g = convt_geom(a, xs, ws, stride, padding, outpad);
  const float* bias = a.f32_opt(4, "bias", g.C, "wShape[1]");
  auto y = out_or_new(a, 8, a.numel({g.N, g.C, g.H, g.W}, "output"), {{0, "x"}, {2, "w"}, {4, "bias"}});
  if (reference) emorl::ref::conv2d_transpose_forward(g, x, w, bias, y.Data());
  else emorl::conv2d_transpose_forward(g, x, w, bias, y.Data(), threads());
  return y;
}

// conv2dTransposeBackwardInput(dy, dyShape, w, wShape, xShape, stride, padding, outputPadding, out?) -> dx
Napi::Value Conv2dTransposeBackwardInput(const Napi::CallbackInfo& info, bool reference) {
  Args a(info, "conv2dTransposeBackwardInput");
  auto dys = a.ints(1, "dyShape", {4});
  auto ws = a.ints(3, "wShape", {4});
  auto xs = a.ints(4, "xShape", {4});
  auto stride = a.ints(5, "stride", {1, 2}, 1);
  auto padding = a.ints(6, "padding", {1, 2});
  auto outpad = a.ints(7, "outputPadding", {1, 2});
  const float* dy = a.f32(0, "dy", dys, "dyShape");
  const float* w = a.f32(2, "w", ws, "wShape");
  ConvGeom g = convt_geom(a, xs, ws, stride, padding, outpad);
  expect_shape(a, "dyShape", dys, {g.N, g.C, g.H, g.W});
  auto dx = out_or_new(a, 8, a.numel(xs, "xShape"), {{0, "dy"}, {2, "w"}});
  if (reference) emorl::ref::conv2d_transpose_backward_input(g, dy, w, dx.Data());
  else emorl::conv2d_transpose_backward_input(g, dy, w, dx.Data(), threads());
  return dx;
}

// conv2dTransposeBackwardFilter(x, xShape, dy, dyShape, wShape, stride, padding, outputPadding,
//                               withBias) -> {dw, db|null}
Napi::Value Conv2dTransposeBackwardFilter(const Napi::CallbackInfo& info, bool reference) {
  Args a(info, "conv2dTransposeBackwardFilter");
  auto xs = a.ints(1, "xShape", {4});
  auto dys = a.ints(3, "dyShape", {4});
  auto ws = a.ints(4, "wShape", {4});
  auto stride = a.ints(5, "stride", {1, 2}, 1);
  auto padding = a.ints(6, "padding", {1, 2});
  auto outpad = a.ints(7, "outputPadding", {1, 2});
  const bool with_bias = a.boolean(8, "withBias", false);
  const float* x = a.f32(0, "x", xs, "xShape");
  const float* dy = a.f32(2, "dy", dys, "dyShape");
  ConvGeom g = convt_geom(a, xs, ws, stride, padding, outpad);
  expect_shape(a, "dyShape", dys, {g.N, g.C, g.H, g.W});
  auto dw = new_f32(a, a.numel(ws, "wShape"));
  Napi::Value dbv = a.env().Null();
  float* db = nullptr;
  if (with_bias) {
    auto dbArr = new_f32(a, g.C);
    db = dbArr.Data();
    dbv = dbArr;
  }
  if (reference) emorl::ref::conv2d_transpose_backward_filter(g, x, dy, dw.Data(), db);
  else emorl::conv2d_transpose_backward_filter(g, x, dy, dw.Data(), db, threads());
  return grads_object(a, dw, dbv);
}

// matmul(a, aShape[(B,)M,K], b, bShape[(B,)K,N], transA, transB, out?) -> c[(B,)M,N]
// With transA, a is stored [(B,)K,M]; with transB, b is stored [(B,)N,K]. A batch of 1 (or a
// 2-D operand) broadcasts against the other operand's batch.
// matmul(a, aShape, b, bShape, transA, transB, out?, bias?, act?) -> act(op(a)·op(b) (+ bias)); act: true
// (ReLU), or an activation code 0 (linear), 1 (ReLU), 2 (ELU)
Napi::Value Matmul(const Napi::CallbackInfo& info, bool reference) {
  Args a(info, "matmul");
  auto as = a.ints(1, "aShape", {2, 3});
  auto bs = a.ints(3, "bShape", {2, 3});
  const bool ta = a.boolean(4, "transA", false), tb = a.boolean(5, "transB", false);
  const float* A = a.f32(0, "a", as, "aShape");
  const float* B = a.f32(2, "b", bs, "bShape");
  const int64_t ba = as.size() == 3 ? as[0] : 1, bb = bs.size() == 3 ? bs[0] : 1;
  const int64_t ar = as[as.size() - 2], ac = as[as.size() - 1], br = bs[bs.size() - 2], bc = bs[bs.size() - 1];
  const int64_t M = ta ? ac : ar, K = ta ? ar : ac, Kb = tb ? bc : br, N = tb ? br : bc;
  if (K != Kb) {
    std::ostringstream o;
    o << "inner dimensions differ: aShape " << shape_str(as) << (ta ? " (transposed)" : "") << " gives K=" << K
      << ", bShape " << shape_str(bs) << (tb ? " (transposed)" : "") << " gives K=" << Kb;
    a.range_error(o.str());
  }
  if (ba != bb && ba != 1 && bb != 1)
    a.range_error("batch sizes " + std::to_string(ba) + " and " + std::to_string(bb) + " do not broadcast");
  const int64_t batch = ba == 1 ? bb : ba;  // a batch of 1 broadcasts (also against 0)
  const bool out3 = as.size() == 3 || bs.size() == 3;
  auto c = out_or_new(a, 6, a.numel(out3 ? std::vector<int64_t>{batch, M, N} : std::vector<int64_t>{M, N}, "output"),
                      {{0, "a"}, {2, "b"}});
  const int64_t sa = ba == 1 ? 0 : M * K, sb = bb == 1 ? 0 : K * N;
  // optional epilogue (the linear layers): + bias [N] per row, then the activation
  const float* bias = a.f32_opt(7, "bias", N, "the output's N columns");
  emorl::Act act = emorl::Act::Linear;
  if (a.at(8).IsNumber()) {
    const double code = a.at(8).As<Napi::Number>().DoubleValue();
    if (code != 0 && code != 1 && code != 2) a.range_error("argument 'act' must be 0 (linear), 1 (relu) or 2 (elu)");
    act = static_cast<emorl::Act>(static_cast<int>(code));
  } else if (a.boolean(8, "act", false)) {
    act = emorl::Act::Relu;
  }
  if (reference) {
    for (int64_t i = 0; i < batch; ++i) emorl::ref::matmul(ta, tb, M, N, K, A + i * sa, B + i * sb, c.Data() + i * M * N);
  } else if (M * N > 0) {
    emorl::GemmCall g{ta, tb, M, N, K, A, ta ? M : K, B, tb ? K : N, c.Data(), N, false};
    emorl::sgemm_batched(g, batch, sa, sb, M * N, threads());
  }
  emorl::bias_act(c.Data(), batch * M, N, bias, act, reference ? 1 : threads());
  return c;
}

// ---- NHWC convolutions (lib/ops/native.ts) ----

emorl::Act act_arg(const Args& a, size_t i) {
  auto v = a.ints(i, "act", {1});
  if (v[0] > 2) a.range_error("argument 'act' must be [0] (linear), [1] (relu) or [2] (elu)");
  return static_cast<emorl::Act>(v[0]);
}

// Conv2d geometry: x [N,H,W,C], w [Co,C,kh,kw], stride [sh,sw], pad [ph,pw] (symmetric).
emorl::NhwcGeom nhwc_conv_geom(const Args& a, const std::vector<int64_t>& xs, const std::vector<int64_t>& ws,
                               const std::vector<int64_t>& stride, const std::vector<int64_t>& pad) {
  if (ws[1] != xs[3])
    a.range_error("wShape " + shape_str(ws) + " expects " + std::to_string(ws[1]) + " input channels but xShape " +
                  shape_str(xs) + " has " + std::to_string(xs[3]));
  emorl::NhwcGeom g{};
  g.N = xs[0]; g.H = xs[1]; g.W = xs[2]; g.C = xs[3];
  g.kh = ws[2]; g.kw = ws[3]; g.sh = stride[0]; g.sw = stride[1]; g.pt = pad[0]; g.pl = pad[1];
  if (g.kh < 1 || g.kw < 1) a.range_error("wShape " + shape_str(ws) + " has an empty kernel");
  const int64_t hp = g.H + 2 * pad[0] - g.kh, wp = g.W + 2 * pad[1] - g.kw;
  if (hp < 0 || wp < 0) a.range_error("kernel larger than the padded input " + shape_str(xs));
  g.Ho = hp / g.sh + 1;
  g.Wo = wp / g.sw + 1;
  return g;
}

// Transposed: x [N,h,w,Ci], w [Ci,Co,kh,kw]; the geometry of the forward conv from y [N,H,W,Co].
emorl::NhwcGeom nhwc_convt_geom(const Args& a, const std::vector<int64_t>& xs, const std::vector<int64_t>& ws,
                                const std::vector<int64_t>& stride, const std::vector<int64_t>& pad,
                                const std::vector<int64_t>& opad) {
  if (ws[0] != xs[3])
    a.range_error("wShape " + shape_str(ws) + " expects " + std::to_string(ws[0]) + " input channels but xShape " +
                  shape_str(xs) + " has " + std::to_string(xs[3]));
  if (opad[0] >= stride[0] || opad[1] >= stride[1]) a.range_error("outputPadding must be below the stride");
  emorl::NhwcGeom g{};
  g.N = xs[0]; g.Ho = xs[1]; g.Wo = xs[2]; g.C = ws[1];
  g.kh = ws[2]; g.kw = ws[3]; g.sh = stride[0]; g.sw = stride[1]; g.pt = pad[0]; g.pl = pad[1];
  if (g.kh < 1 || g.kw < 1) a.range_error("wShape " + shape_str(ws) + " has an empty kernel");
  if (g.Ho < 1 || g.Wo < 1) a.range_error("xShape " + shape_str(xs) + " is empty");
  g.H = (g.Ho - 1) * g.sh - 2 * pad[0] + g.kh + opad[0];
  g.W = (g.Wo - 1) * g.sw - 2 * pad[1] + g.kw + opad[1];
  if (g.H < 1 || g.W < 1 || g.H + 2 * pad[0] < g.kh || g.W + 2 * pad[1] < g.kw)
    a.range_error("the padding leaves no output for xShape " + shape_str(xs));
  return g;
}

// nhwcConv2d(x, xShape[N,H,W,C], w, wShape[Co,C,kh,kw], bias|null, stride[2], pad[2], act[1],
//   device?, workspace?, precision?) -> y   (device 'cuda:N' / 'simt': the GPU kernels,
//   gpu/conv_gpu.cu; precision 'fp32' | 'bf16', nhwc.h)
// The GPU path of nhwcConv2d / nhwcConv2dBackward (defined with the workspace class below): false
// when the `device` argument at `arg` is absent or 'cpu'; argument arg + 1 is an optional
// DecoderWorkspace.
bool gpu_conv_forward(const Args& a, size_t arg, const emorl::NhwcGeom& g, int64_t Co, const float* x, const float* w,
                      const float* bias, emorl::Act act, float* y);
bool gpu_conv_backward(const Args& a, size_t arg, const emorl::NhwcGeom& g, int64_t Co, const float* x, const float* w,
                       const float* y, const float* dy, emorl::Act act, float* dx, float* dw, float* db);
// The precision argument at `arg`, which follows the device argument at arg - 2.
emorl::Precision conv_precision(const Args& a, size_t arg);

Napi::Value NhwcConv2d(const Napi::CallbackInfo& info, bool) {
  Args a(info, "nhwcConv2d");
  auto xs = a.ints(1, "xShape", {4});
  auto ws = a.ints(3, "wShape", {4});
  auto stride = a.ints(5, "stride", {2}, 1);
  auto pad = a.ints(6, "pad", {2});
  const emorl::Act act = act_arg(a, 7);
  const float* x = a.f32(0, "x", xs, "xShape");
  const float* w = a.f32(2, "w", ws, "wShape");
  auto g = nhwc_conv_geom(a, xs, ws, stride, pad);
  const float* bias = a.f32_opt(4, "bias", ws[0], "wShape[0]");
  auto y = new_f32(a, a.numel({g.N, g.Ho, g.Wo, ws[0]}, "output"));
  const emorl::Precision prec = conv_precision(a, 10);
  if (!gpu_conv_forward(a, 8, g, ws[0], x, w, bias, act, y.Data()))
    emorl::nhwc_conv2d_forward(g, ws[0], x, w, bias, act, y.Data(), threads(), prec);
  return y;
}

Napi::Value nhwc_grads(const Args& a, Napi::Value dx, Napi::Value dw, Napi::Value db) {
  Napi::Object o = Napi::Object::New(a.env());
  o.Set("dx", dx);
  o.Set("dw", dw);
  o.Set("db", db);
  return o;
}

// nhwcConv2dBackward(x, xShape, w, wShape, y|null, dy, stride, pad, act, needDx, needParams,
//   device?, workspace?, precision?)
//   -> {dx|null, dw|null, db|null}
Napi::Value NhwcConv2dBackward(const Napi::CallbackInfo& info, bool) {
  Args a(info, "nhwcConv2dBackward");
  auto xs = a.ints(1, "xShape", {4});
  auto ws = a.ints(3, "wShape", {4});
  auto stride = a.ints(6, "stride", {2}, 1);
  auto pad = a.ints(7, "pad", {2});
  const emorl::Act act = act_arg(a, 8);
  const bool need_dx = a.boolean(9, "needDx", true), need_params = a.boolean(10, "needParams", true);
  const float* x = a.f32(0, "x", xs, "xShape");
  const float* w = a.f32(2, "w", ws, "wShape");
  auto g = nhwc_conv_geom(a, xs, ws, stride, pad);
  const std::vector<int64_t> ys{g.N, g.Ho, g.Wo, ws[0]};
  const float* y = a.f32_opt(4, "y", a.numel(ys, "output"), "the output");
  if (!y && act != emorl::Act::Linear) a.type_error("argument 'y' is needed for an activation");
  const float* dy = a.f32(5, "dy", ys, "the output shape");
  Napi::Value dxv = a.env().Null(), dwv = a.env().Null(), dbv = a.env().Null();
  float *dx = nullptr, *dw = nullptr, *db = nullptr;
  if (need_dx) { auto t = new_f32(a, a.numel(xs, "xShape")); dx = t.Data(); dxv = t; }
  if (need_params) {
    auto t = new_f32(a, a.numel(ws, "wShape")); dw = t.Data(); dwv = t;
    auto u = new_f32(a, ws[0]); db = u.Data(); dbv = u;
  }
  const emorl::Precision prec = conv_precision(a, 13);
  if (!gpu_conv_backward(a, 11, g, ws[0], x, w, y, dy, act, dx, dw, db))
    emorl::nhwc_conv2d_backward(g, ws[0], x, w, y, dy, act, dx, dw, db, threads(), prec);
  return nhwc_grads(a, dxv, dwv, dbv);
}

// nhwcConvTranspose2d(x, xShape[N,h,w,Ci], w, wShape[Ci,Co,kh,kw], bias|null, stride[2], pad[2],
//   outputPad[2], act[1]) -> y
Napi::Value NhwcConvTranspose2d(const Napi::CallbackInfo& info, bool) {
  Args a(info, "nhwcConvTranspose2d");
  auto xs = a.ints(1, "xShape", {4});
  auto ws = a.ints(3, "wShape", {4});
  auto stride = a.ints(5, "stride", {2}, 1);
  auto pad = a.ints(6, "pad", {2});
  auto opad = a.ints(7, "outputPad", {2});
  const emorl::Act act = act_arg(a, 8);
  const float* x = a.f32(0, "x", xs, "xShape");
  const float* w = a.f32(2, "w", ws, "wShape");
  auto g = nhwc_convt_geom(a, xs, ws, stride, pad, opad);
  const float* bias = a.f32_opt(4, "bias", ws[1], "wShape[1]");
  auto y = new_f32(a, a.numel({g.N, g.H, g.W, g.C}, "output"));
  emorl::nhwc_conv_transpose2d_forward(g, xs[3], x, w, bias, act, y.Data(), threads());
  return y;
}

// nhwcConvTranspose2dBackward(x, xShape, w, wShape, y|null, dy, stride, pad, outputPad, act,
//   needDx, needParams) -> {dx|null, dw|null, db|null}
Napi::Value NhwcConvTranspose2dBackward(const Napi::CallbackInfo& info, bool) {
  Args a(info, "nhwcConvTranspose2dBackward");
  auto xs = a.ints(1, "xShape", {4});
  auto ws = a.ints(3, "wShape", {4});
  auto stride = a.ints(6, "stride", {2}, 1);
  auto pad = a.ints(7, "pad", {2});
  auto opad = a.ints(8, "outputPad", {2});
  const emorl::Act act = act_arg(a, 9);
  const bool need_dx = a.boolean(10, "needDx", true), need_params = a.boolean(11, "needParams", true);
  const float* x = a.f32(0, "x", xs, "xShape");
  const float* w = a.f32(2, "w", ws, "wShape");
  auto g = nhwc_convt_geom(a, xs, ws, stride, pad, opad);
  const std::vector<int64_t> ys{g.N, g.H, g.W, g.C};
  const float* y = a.f32_opt(4, "y", a.numel(ys, "output"), "the output");
  if (!y && act != emorl::Act::Linear) a.type_error("argument 'y' is needed for an activation");
  const float* dy = a.f32(5, "dy", ys, "the output shape");
  Napi::Value dxv = a.env().Null(), dwv = a.env().Null(), dbv = a.env().Null();
  float *dx = nullptr, *dw = nullptr, *db = nullptr;
  if (need_dx) { auto t = new_f32(a, a.numel(xs, "xShape")); dx = t.Data(); dxv = t; }
  if (need_params) {
    auto t = new_f32(a, a.numel(ws, "wShape")); dw = t.Data(); dwv = t;
    auto u = new_f32(a, ws[1]); db = u.Data(); dbv = u;
  }
  emorl::nhwc_conv_transpose2d_backward(g, xs[3], x, w, y, dy, act, dx, dw, db, threads());
  return nhwc_grads(a, dxv, dwv, dbv);
}

// ---- the decoder stage and the fused likelihood (lib/ops/native.ts decoderNll) ----

// Reads the properties of an options object; errors name the function and the property.
class Props {
 public:
  Props(const Args& a, Napi::Value v, std::string path) : a_(a), path_(std::move(path)) {
    if (!v.IsObject() || v.IsArray()) a_.type_error("'" + path_ + "' must be an object");
    o_ = v.As<Napi::Object>();
  }
  std::string name(const char* key) const { return path_ + "." + key; }
  Napi::Value get(const char* key) const { return o_.Get(key); }
  bool has(const char* key) const {
    Napi::Value v = get(key);
    return !v.IsUndefined() && !v.IsNull();
  }
  // A Float32Array of exactly n elements (what: the shape it must fit, for the message).
  const float* f32(const char* key, int64_t n, const std::string& what) const {
    Napi::Value v = get(key);
    if (!v.IsTypedArray() || v.As<Napi::TypedArray>().TypedArrayType() != napi_float32_array)
      a_.type_error("'" + name(key) + "' must be a Float32Array");
    auto t = v.As<Napi::Float32Array>();
    if (static_cast<int64_t>(t.ElementLength()) != n) {
      std::ostringstream o;
      o << "'" << name(key) << "' has " << t.ElementLength() << " elements but " << what << " needs " << n;
      a_.range_error(o.str());
    }
    return n ? t.Data() : nullptr;
  }
  int64_t length(const char* key) const {
    Napi::Value v = get(key);
    if (!v.IsTypedArray() || v.As<Napi::TypedArray>().TypedArrayType() != napi_float32_array)
      a_.type_error("'" + name(key) + "' must be a Float32Array");
    return static_cast<int64_t>(v.As<Napi::Float32Array>().ElementLength());
  }
  int64_t integer(const char* key, int64_t min_value, int64_t dflt = -1) const {
    Napi::Value v = get(key);
    if ((v.IsUndefined() || v.IsNull()) && dflt >= min_value) return dflt;
    if (!v.IsNumber()) a_.type_error("'" + name(key) + "' must be an integer");
    const double d = v.As<Napi::Number>().DoubleValue();
    if (!std::isfinite(d) || std::floor(d) != d || d < double(min_value) || d > 2147483647.0) {
      std::ostringstream o;
      o << "'" << name(key) << "' is " << d << "; expected an integer >= " << min_value;
      a_.range_error(o.str());
    }
    return static_cast<int64_t>(d);
  }
  double number(const char* key) const {
    Napi::Value v = get(key);
    if (!v.IsNumber() || !std::isfinite(v.As<Napi::Number>().DoubleValue()))
      a_.type_error("'" + name(key) + "' must be a finite number");
    return v.As<Napi::Number>().DoubleValue();
  }
  bool boolean(const char* key, bool dflt) const {
    Napi::Value v = get(key);
    if (v.IsUndefined() || v.IsNull()) return dflt;
    if (!v.IsBoolean()) a_.type_error("'" + name(key) + "' must be a boolean");
    return v.As<Napi::Boolean>().Value();
  }
  // An array of 4 integers in [1, max] (a shape), into out.
  void shape4(const char* key, int64_t* out, double max = 2147483647.0) const {
    Napi::Value v = get(key);
    if (!v.IsArray() || v.As<Napi::Array>().Length() != 4) a_.type_error("'" + name(key) + "' must be an array of 4 integers");
    for (uint32_t k = 0; k < 4; ++k) {
      Napi::Value e = v.As<Napi::Array>().Get(k);
      const double d = e.IsNumber() ? e.As<Napi::Number>().DoubleValue() : -1;
      if (!std::isfinite(d) || std::floor(d) != d || d < 1 || d > max) a_.range_error("'" + name(key) + "' entries must be integers >= 1");
      out[k] = static_cast<int64_t>(d);
    }
  }
  // An optional id (a stamp, a kept set's id): an integer in [1, 2^53]; absent: 0. what: the
  // message's "must be ..." for a bad value.
  uint64_t id(const char* key, const char* what) const {
    if (!has(key)) return 0;
    const double d = number(key);
    if (!(d >= 1 && d <= 9007199254740992.0) || std::floor(d) != d) a_.range_error("'" + name(key) + "' must be " + what);
    return static_cast<uint64_t>(d);
  }
  // An array of finite numbers.
  std::vector<double> numbers(const char* key) const {
    Napi::Value v = get(key);
    if (!v.IsArray()) a_.type_error("'" + name(key) + "' must be an array of numbers");
    auto arr = v.As<Napi::Array>();
    std::vector<double> out;
    for (uint32_t i = 0; i < arr.Length(); ++i) {
      Napi::Value e = arr.Get(i);
      if (!e.IsNumber() || !std::isfinite(e.As<Napi::Number>().DoubleValue()))
        a_.type_error("'" + name(key) + "[" + std::to_string(i) + "]' must be a finite number");
      out.push_back(e.As<Napi::Number>().DoubleValue());
    }
    return out;
  }
  // An optional content tag (lib/ops/addon.ts contentTag): an integer in [0, 2^53]; absent: 0.
  uint64_t tag(const char* key) const {
    Napi::Value v = get(key);
    if (v.IsUndefined() || v.IsNull()) return 0;
    const double d = v.IsNumber() ? v.As<Napi::Number>().DoubleValue() : -1;
    if (!std::isfinite(d) || std::floor(d) != d || d < 0 || d > 9007199254740992.0)
      a_.type_error("'" + name(key) + "' must be a content tag (an integer >= 0)");
    return static_cast<uint64_t>(d);
  }

 private:
  const Args& a_;
  Napi::Object o_;
  std::string path_;
};

std::string shape4(const int64_t* s) { return shape_str({s[0], s[1], s[2], s[3]}); }

// A decoder workspace owned by JS (`new DecoderWorkspace()`): the buffers decoderStage keeps
// between calls. Its memory is reported to V8 as external memory, and freed with the object.
class DecoderWorkspace : public Napi::ObjectWrap<DecoderWorkspace> {
 public:
  static Napi::Function Define(Napi::Env env) {
    return DefineClass(env, "DecoderWorkspace",
                       {InstanceMethod("bytes", &DecoderWorkspace::Bytes), InstanceMethod("traffic", &DecoderWorkspace::Traffic)});
  }
  explicit DecoderWorkspace(const Napi::CallbackInfo& info) : Napi::ObjectWrap<DecoderWorkspace>(info) {}
  void Finalize(Napi::Env env) override {
    if (reported_) Napi::MemoryManagement::AdjustExternalMemory(env, -static_cast<int64_t>(reported_));
    reported_ = 0;
  }
  emorl::Workspace& ws() { return ws_; }
  // which CPU encoder pass's activations ws() holds
  emorl::StageStamps& cpu_stamps() { return cpu_stamps_; }
  // The GPU stage's buffers for one backend and device (a change of either starts afresh).
  emorl::GpuWorkspace& gpu(bool emulated, int device) {
    if (!gpu_ || gpu_->emulated() != emulated || gpu_->device() != device) {
      past_ = total_traffic();
      gpu_.reset();
      gpu_ = make_gpu_workspace(emulated, device);
    }
    return *gpu_;
  }
  static std::unique_ptr<emorl::GpuWorkspace> make_gpu_workspace(bool emulated, int device) {
#if defined(EMORL_CUDA)
    if (!emulated) return emorl::cuda::make_workspace(device);
#endif
    if (!emulated) throw std::logic_error("the addon was built without CUDA");
    return emorl::simt::make_workspace(device);
  }
  // Tells V8 about growth since the last report.
  void report(Napi::Env env) {
    // host memory only: device buffers are not V8's business
    const size_t now = ws_.bytes() + (gpu_ && gpu_->emulated() ? gpu_->bytes() : 0);
    if (now != reported_) {
      Napi::MemoryManagement::AdjustExternalMemory(env, static_cast<int64_t>(now) - static_cast<int64_t>(reported_));
      reported_ = now;
    }
  }

 private:
  Napi::Value Bytes(const Napi::CallbackInfo& info) { return Napi::Number::New(info.Env(), static_cast<double>(ws_.bytes())); }
  // traffic() -> {upBytes, downBytes, uploads, downloads}: host <-> device copies so far (GPU devices)
  Napi::Value Traffic(const Napi::CallbackInfo& info) {
    const emorl::GpuTraffic t = total_traffic();
    Napi::Object o = Napi::Object::New(info.Env());
    o.Set("upBytes", static_cast<double>(t.up_bytes));
    o.Set("downBytes", static_cast<double>(t.down_bytes));
    o.Set("uploads", static_cast<double>(t.uploads));
    o.Set("downloads", static_cast<double>(t.downloads));
    return o;
  }
  emorl::GpuTraffic total_traffic() const {
    emorl::GpuTraffic t = past_;
    if (gpu_) {
      const emorl::GpuTraffic g = gpu_->traffic();
      t.up_bytes += g.up_bytes;
      t.down_bytes += g.down_bytes;
      t.uploads += g.uploads;
      t.downloads += g.downloads;
    }
    return t;
  }
  emorl::Workspace ws_;
  emorl::StageStamps cpu_stamps_;
  std::unique_ptr<emorl::GpuWorkspace> gpu_;
  emorl::GpuTraffic past_;  // of the GPU workspaces replaced so far
  size_t reported_ = 0;
};

// Where a decoding stage runs: spec.device "cpu" (default), "cuda:N", or "simt" (the CUDA
// kernels run by the SIMT emulator on the CPU: for tests).
struct StageDevice {
  enum Kind { Cpu, Cuda, Simt } kind = Cpu;
  int index = 0;
};

// `what`: the argument's name for messages.
StageDevice parse_device(const Args& a, Napi::Value v, const std::string& what) {
  StageDevice d;
  if (v.IsUndefined() || v.IsNull()) return d;
  if (!v.IsString()) a.type_error("'" + what + "' must be a string: 'cpu', 'cuda:N' or 'simt'");
  const std::string s = v.As<Napi::String>().Utf8Value();
  if (s == "cpu") return d;
  if (s == "simt") {
    d.kind = StageDevice::Simt;
    return d;
  }
  const std::string digits = s.rfind("cuda:", 0) == 0 ? s.substr(5) : std::string();
  if (digits.empty() || digits.size() > 4 || digits.find_first_not_of("0123456789") != std::string::npos)
    a.range_error("'" + what + "' must be 'cpu', 'cuda:N' or 'simt', not '" + s + "'");
  d.kind = StageDevice::Cuda;
  d.index = std::stoi(digits);
#if defined(EMORL_CUDA)
  std::string err;
  const int n = emorl::cuda_device_count(&err);
  if (d.index >= n) {
    std::ostringstream o;
    o << "device " << s << ": " << n << " CUDA device" << (n == 1 ? "" : "s") << " visible";
    if (!err.empty()) o << " (" << err << ")";
    a.range_error(o.str());
  }
#else
  a.range_error("device " + s + ": the addon was built without CUDA (rebuild with EMORL_CUDA=1 npm run build:native)");
#endif
  return d;
}

StageDevice stage_device(const Args& a, const Props& p) { return parse_device(a, p.get("device"), p.name("device")); }

// 'fp32' (default when absent) or 'bf16' (nhwc.h Precision); bf16 is a CPU-kernel option.
emorl::Precision parse_precision(const Args& a, Napi::Value v, const std::string& what, const StageDevice& d) {
  if (v.IsUndefined() || v.IsNull()) return emorl::Precision::Fp32;
  const std::string s = v.IsString() ? v.As<Napi::String>().Utf8Value() : std::string();
  if (s != "fp32" && s != "bf16") a.type_error("'" + what + "' must be 'fp32' or 'bf16'");
  if (s == "bf16" && d.kind != StageDevice::Cpu) a.range_error("'" + what + "' bf16 is for the CPU kernels; the GPU ones compute in fp32");
  return s == "bf16" ? emorl::Precision::Bf16 : emorl::Precision::Fp32;
}

// An optional DecoderWorkspace argument (null when absent); `what` names it in the error.
DecoderWorkspace* workspace_arg(const Args& a, Napi::Value wv, const std::string& what) {
  if (wv.IsUndefined() || wv.IsNull()) return nullptr;
  if (!wv.IsObject() || !wv.As<Napi::Object>().InstanceOf(a.env().GetInstanceData<Napi::FunctionReference>()->Value()))
    a.type_error("'" + what + "' must be a DecoderWorkspace");
  return DecoderWorkspace::Unwrap(wv.As<Napi::Object>());
}

// The GPU workspace for a call on device d: the owner's (kept between calls), or `local`.
emorl::GpuWorkspace& gpu_workspace(const StageDevice& d, DecoderWorkspace* owner, std::unique_ptr<emorl::GpuWorkspace>& local) {
  const bool emulated = d.kind == StageDevice::Simt;
  if (owner) return owner->gpu(emulated, d.index);
  local = DecoderWorkspace::make_gpu_workspace(emulated, d.index);
  return *local;
}

// Where a call runs: its device ('cpu': no GPU) and, on a GPU, the workspace (the caller's
// DecoderWorkspace, kept between calls, or one for this call alone).
struct GpuCall {
  StageDevice device;
  DecoderWorkspace* owner = nullptr;
  std::unique_ptr<emorl::GpuWorkspace> local;
  emorl::GpuWorkspace* ws = nullptr;
  GpuCall(const Args& a, Napi::Value dv, const std::string& device_name, Napi::Value wv, const std::string& workspace_name)
      : device(parse_device(a, dv, device_name)) {
    if (device.kind == StageDevice::Cpu) return;
    owner = workspace_arg(a, wv, workspace_name);
    ws = &gpu_workspace(device, owner, local);
  }
  // spec.device and spec.workspace
  GpuCall(const Args& a, const Props& p) : GpuCall(a, p.get("device"), p.name("device"), p.get("workspace"), p.name("workspace")) {}
  bool on_gpu() const { return ws != nullptr; }
  bool simt() const { return device.kind == StageDevice::Simt; }
  void done(Napi::Env env) const {
    if (owner) owner->report(env);
  }
};

// fn(args...) of the GPU build that `call`'s device belongs to: the emulator's or CUDA's (without
// CUDA, parse_device admits no other GPU device than 'simt').
#if defined(EMORL_CUDA)
#define EMORL_ON_GPU(call, fn, ...) ((call).simt() ? emorl::simt::fn(__VA_ARGS__) : emorl::cuda::fn(__VA_ARGS__))
#else
#define EMORL_ON_GPU(call, fn, ...) emorl::simt::fn(__VA_ARGS__)
#endif

emorl::Precision conv_precision(const Args& a, size_t arg) {
  return parse_precision(a, a.at(arg), "precision", parse_device(a, a.at(arg - 2), "device"));
}

bool gpu_conv_forward(const Args& a, size_t arg, const emorl::NhwcGeom& g, int64_t Co, const float* x, const float* w,
                      const float* bias, emorl::Act act, float* y) {
  GpuCall gpu(a, a.at(arg), "device", a.at(arg + 1), "workspace");
  if (!gpu.on_gpu()) return false;
  EMORL_ON_GPU(gpu, conv2d_forward, g, Co, x, w, bias, act, y, *gpu.ws);
  gpu.done(a.env());
  return true;
}

bool gpu_conv_backward(const Args& a, size_t arg, const emorl::NhwcGeom& g, int64_t Co, const float* x, const float* w,
                       const float* y, const float* dy, emorl::Act act, float* dx, float* dw, float* db) {
  GpuCall gpu(a, a.at(arg), "device", a.at(arg + 1), "workspace");
  if (!gpu.on_gpu()) return false;
  EMORL_ON_GPU(gpu, conv2d_backward, g, Co, x, w, y, dy, act, dx, dw, db, *gpu.ws);
  gpu.done(a.env());
  return true;
}

// A spec's tensors marked resident (`what`) live in its GPU workspace only, under their tags
// (`tags`: what the message calls them).
void check_resident(const Args& a, const Props& p, const std::string& what, bool tagged, const char* tags) {
  if (stage_device(a, p).kind == StageDevice::Cpu) a.range_error("'" + what + "' is for GPU devices");
  if (!tagged || !p.has("workspace")) a.range_error("'" + what + "' needs " + tags + " and the workspace that holds them");
}

// decoderStage({ z, n, c, pos, gh, gw, layers: [{ kind, w, wShape, b, stride, pad,
//   outputPad, act }], target, B, K, H, W, C, logVar, gmm, needDz, needParams, needOutputs,
//   workspace?, device?, profile?, precision?, keepParamGrads? })  profile (GPU devices): milliseconds
//   per phase, in result.profile; precision 'fp32' | 'bf16' (CPU only): of the conv layers' products
//   (nhwc.h); keepParamGrads (GPU devices, with needParams and a workspace): an id (integer >= 1)
//   under which dpos, dw and db stay on the device (DecoderStageOut::keep_param_grads) for
//   decoderParamGradSums, instead of being returned. A layer with resident: true (GPU devices,
//   with its tags and the workspace) has no w or b: the workspace holds them (deviceAdam's)
//   -> { nll, dz|null, dpos|null, dw: [..|null], db: [..|null], means|null, logMasks|null }
// kind: 0 broadcast conv, 1 spatial broadcast, 2 conv, 3 transposed conv (decoder.h).
Napi::Value DecoderStageFn(const Napi::CallbackInfo& info, bool) {
  Args a(info, "decoderStage");
  Props p(a, a.at(0), "spec");
  emorl::DecoderStage s;
  s.n = p.integer("n", 1);
  s.c = p.integer("c", 1);
  s.gh = p.integer("gh", 1);
  s.gw = p.integer("gw", 1);
  s.z = p.f32("z", a.numel({s.n, s.c}, "[n,c]"), "[n,c] = " + shape_str({s.n, s.c}));
  s.pos = p.f32("pos", a.numel({s.gh, s.gw, s.c}, "[gh,gw,c]"), "[gh,gw,c] = " + shape_str({s.gh, s.gw, s.c}));
  s.lik.B = p.integer("B", 1);
  s.lik.K = p.integer("K", 1);
  s.lik.H = p.integer("H", 1);
  s.lik.W = p.integer("W", 1);
  s.lik.C = p.integer("C", 1);
  if (s.lik.B * s.lik.K != s.n) {
    std::ostringstream o;
    o << "n = " << s.n << " slots but B x K = " << s.lik.B << " x " << s.lik.K;
    a.range_error(o.str());
  }
  const std::vector<int64_t> ts{s.lik.B, s.lik.H, s.lik.W, s.lik.C};
  s.target = p.f32("target", a.numel(ts, "[B,H,W,C]"), "[B,H,W,C] = " + shape_str(ts));
  s.target_tag = p.tag("targetTag");
  s.pos_tag = p.tag("posTag");
  s.log_var = static_cast<float>(p.number("logVar"));
  s.gmm = p.boolean("gmm", false);
  const bool need_dz = p.boolean("needDz", false), need_params = p.boolean("needParams", false);
  const bool need_outputs = p.boolean("needOutputs", false);
  const StageDevice device = stage_device(a, p);
  const uint64_t keep_id = p.id("keepParamGrads", "an id (an integer >= 1)");
  if (keep_id) {
    if (device.kind == StageDevice::Cpu) a.range_error("'" + p.name("keepParamGrads") + "' is for GPU devices (the CPU stage returns its gradients)");
    if (!need_params) a.range_error("'" + p.name("keepParamGrads") + "' needs needParams");
    if (p.get("workspace").IsUndefined() || p.get("workspace").IsNull())
      a.range_error("'" + p.name("keepParamGrads") + "' needs a workspace (the kept gradients live in it)");
  }
  const bool want_profile = p.boolean("profile", false);
  s.precision = parse_precision(a, p.get("precision"), p.name("precision"), device);

  Napi::Value lv = p.get("layers");
  if (!lv.IsArray()) a.type_error("'spec.layers' must be an array");
  auto la = lv.As<Napi::Array>();
  std::vector<Props> lp;
  for (uint32_t i = 0; i < la.Length(); ++i) {
    lp.emplace_back(a, la.Get(i), "spec.layers[" + std::to_string(i) + "]");
    const Props& q = lp.back();
    emorl::DecoderLayer L;
    const int64_t kind = q.integer("kind", 0);
    if (kind > 3) a.range_error("'" + q.name("kind") + "' must be 0 (broadcast conv), 1 (spatial broadcast), 2 (conv) or 3 (transposed conv)");
    L.kind = static_cast<emorl::DecoderLayerKind>(kind);
    if (L.kind != emorl::DecoderLayerKind::SpatialBroadcast) {
      q.shape4("wShape", L.w_shape, 1e6);
      const int64_t cout = L.kind == emorl::DecoderLayerKind::ConvTranspose ? L.w_shape[1] : L.w_shape[0];
      L.w_tag = q.tag("wTag");
      L.b_tag = q.tag("bTag");
      if (q.boolean("resident", false)) {
        // w and b live on the device only (an optimizer there updates them): no host copy to read
        check_resident(a, p, q.name("resident"), L.w_tag && L.b_tag, "wTag, bTag");
        a.numel({L.w_shape[0], L.w_shape[1], L.w_shape[2], L.w_shape[3]}, "wShape");
      } else {
        L.w = q.f32("w", a.numel({L.w_shape[0], L.w_shape[1], L.w_shape[2], L.w_shape[3]}, "wShape"), "wShape " + shape4(L.w_shape));
        L.b = q.f32("b", cout, "its " + std::to_string(cout) + " output channels");
      }
      L.stride = q.integer("stride", 1, 1);
      L.pad = q.integer("pad", 0, 0);
      L.out_pad = q.integer("outputPad", 0, 0);
      const int64_t act = q.integer("act", 0, 0);
      if (act > 2) a.range_error("'" + q.name("act") + "' must be 0 (linear), 1 (relu) or 2 (elu)");
      L.act = static_cast<emorl::Act>(act);
    }
    s.layers.push_back(L);
  }
  const std::string err = emorl::decoder_plan(s);
  if (!err.empty()) a.range_error(err);

  Napi::Env env = a.env();
  Napi::Object r = Napi::Object::New(env);
  emorl::DecoderStageOut o;
  auto nll = new_f32(a, s.lik.B);
  o.nll = nll.Data();
  r.Set("nll", nll);
  r.Set("dz", env.Null());
  r.Set("dpos", env.Null());
  r.Set("means", env.Null());
  r.Set("logMasks", env.Null());
  if (need_dz) {
    auto t = new_f32(a, s.n * s.c);
    o.dz = t.Data();
    r.Set("dz", t);
  }
  Napi::Array dws = Napi::Array::New(env, s.layers.size()), dbs = Napi::Array::New(env, s.layers.size());
  o.dw.assign(s.layers.size(), nullptr);
  o.db.assign(s.layers.size(), nullptr);
  for (size_t i = 0; i < s.layers.size(); ++i) {
    const emorl::DecoderLayer& L = s.layers[i];
    dws.Set(static_cast<uint32_t>(i), env.Null());
    dbs.Set(static_cast<uint32_t>(i), env.Null());
    if (!need_params || keep_id || L.kind == emorl::DecoderLayerKind::SpatialBroadcast) continue;
    auto w = new_f32(a, a.numel({L.w_shape[0], L.w_shape[1], L.w_shape[2], L.w_shape[3]}, "wShape"));
    std::memset(w.Data(), 0, w.ByteLength());  // the tap-sum gradient is added into it
    auto b = new_f32(a, L.out[3]);
    o.dw[i] = w.Data();
    o.db[i] = b.Data();
    dws.Set(static_cast<uint32_t>(i), w);
    dbs.Set(static_cast<uint32_t>(i), b);
  }
  r.Set("dw", dws);
  r.Set("db", dbs);
  if (need_params && !keep_id) {
    auto t = new_f32(a, s.gh * s.gw * s.c);
    o.dpos = t.Data();
    r.Set("dpos", t);
  }
  o.keep_param_grads = keep_id;
  if (need_outputs) {
    auto m = new_f32(a, a.numel({s.n, s.lik.H, s.lik.W, s.lik.C}, "means"));
    auto l = new_f32(a, a.numel({s.n, s.lik.H, s.lik.W}, "log masks"));
    o.means = m.Data();
    o.log_masks = l.Data();
    r.Set("means", m);
    r.Set("logMasks", l);
  }
  DecoderWorkspace* owned = workspace_arg(a, p.get("workspace"), p.name("workspace"));
  if (device.kind == StageDevice::Cpu) {
    emorl::Workspace local;
    emorl::decoder_stage(s, o, owned ? owned->ws() : local, threads());
  } else {
    const bool emulated = device.kind == StageDevice::Simt;
    std::unique_ptr<emorl::GpuWorkspace> local;
    emorl::GpuWorkspace& gws = gpu_workspace(device, owned, local);
    emorl::StageProfile profile;
    emorl::StageProfile* prof = want_profile ? &profile : nullptr;
    if (emulated) {
      emorl::simt::decoder_stage(s, o, gws, prof);
    } else {
#if defined(EMORL_CUDA)
      emorl::cuda::decoder_stage(s, o, gws, prof);
#endif
    }
    if (prof) {
      Napi::Object po = Napi::Object::New(env);
      for (const auto& e : profile.ms) po.Set(e.first, e.second);
      r.Set("profile", po);
    }
  }
  if (owned) owned->report(env);
  return r;
}

// A stage's device-resident parameters (gpu.h DeviceParams): spec.stage ('decoder' | 'encoder' |
// 'gru'), spec.layers (the stack's length; a GRU's 1 or 2) and spec.params [{ index, bias, size, tag }].
emorl::DeviceParams device_params(const Args& a, const Props& p) {
  emorl::DeviceParams d;
  Napi::Value sv = p.get("stage");
  const std::string stage = sv.IsString() ? sv.As<Napi::String>().Utf8Value() : "";
  if (stage != "decoder" && stage != "encoder" && stage != "gru") a.type_error("'" + p.name("stage") + "' must be 'decoder', 'encoder' or 'gru'");
  d.stage = stage == "decoder" ? emorl::DeviceParams::Stage::Decoder
            : stage == "encoder" ? emorl::DeviceParams::Stage::Encoder
                                 : emorl::DeviceParams::Stage::Gru;
  d.layers = static_cast<size_t>(p.integer("layers", 1));
  if (d.stage == emorl::DeviceParams::Stage::Gru && d.layers > 2)
    a.range_error("'" + p.name("layers") + "' must be 1 (a GRU cell) or 2 (the DualGRU) for the GRU stage");
  // the encoder's head tensors follow its conv layers; a GRU stage has 4 or 12 tensors (gpu.h DeviceParams)
  const size_t indices = d.stage == emorl::DeviceParams::Stage::Gru ? (d.layers == 2 ? 12 : 4)
                         : d.layers + (d.stage == emorl::DeviceParams::Stage::Encoder ? 10 : 0);
  Napi::Value v = p.get("params");
  if (!v.IsArray()) a.type_error("'" + p.name("params") + "' must be an array of { index, bias, size, tag }");
  auto arr = v.As<Napi::Array>();
  for (uint32_t j = 0; j < arr.Length(); ++j) {
    Props q(a, arr.Get(j), p.name("params") + "[" + std::to_string(j) + "]");
    emorl::DeviceParams::Param e;
    e.index = static_cast<size_t>(q.integer("index", 0));
    if (e.index >= indices) a.range_error("'" + q.name("index") + "' is " + std::to_string(e.index) + ", past the stage's " + std::to_string(indices) + " places");
    e.bias = q.boolean("bias", false);
    e.n = static_cast<size_t>(q.integer("size", 1));
    e.tag = q.tag("tag");
    if (!e.tag) a.range_error("'" + q.name("tag") + "' must be a content tag >= 1");
    d.params.push_back(e);
  }
  return d;
}

// Adam's float32 scalars of one step (optimizer.h AdamScalars) from spec.b1, c1, b2, c2, eps,
// bc2Sqrt, stepSize, scale and first.
emorl::AdamScalars adam_scalars(const Args& a, const Props& p) {
  auto scalar = [&](const char* key) {
    const double d = p.number(key);
    if (static_cast<double>(static_cast<float>(d)) != d) a.range_error("'" + p.name(key) + "' must be a float32 value (Math.fround)");
    return static_cast<float>(d);
  };
  emorl::AdamScalars sc{scalar("b1"), scalar("c1"),      scalar("b2"),       scalar("c2"), scalar("eps"),
                        scalar("bc2Sqrt"), scalar("stepSize"), scalar("scale"), p.boolean("first", false)};
  if (!(sc.bc2_sqrt > 0)) a.range_error("'" + p.name("bc2Sqrt") + "' must be > 0");
  return sc;
}

// spec.workspace on spec.device, which must be a GPU device (what: the message's subject)
GpuCall device_workspace(const Args& a, const Props& p, const char* what) {
  GpuCall gpu(a, p);
  if (!gpu.on_gpu()) a.range_error("'" + p.name("device") + "' must be 'cuda:N' or 'simt': " + what + " live on a GPU device");
  if (!gpu.owner) a.range_error("'" + p.name("workspace") + "' is required: " + what + " live in it");
  return gpu;
}

// decoderParamGradSums({ workspace, device, ids: number[], us: number[], sizes: number[], keep? })
//   -> (Float32Array | null)[]; keep: { layers, params } (decoder_params): buffers 1 onwards are
//   summed into those parameters' gradients on the device and come back null
//   per buffer b (sizes[b] floats) of the kept sets `ids` (decoderStage's keepParamGrads), the sum
//   over the sets in that order of us[k]·set_k[b] (gpu.h decoder_param_grad_sums); the sets are freed.
Napi::Value DecoderParamGradSumsFn(const Napi::CallbackInfo& info, bool) {
  Args a(info, "decoderParamGradSums");
  Props p(a, a.at(0), "spec");
  GpuCall gpu = device_workspace(a, p, "kept gradients");
  std::unique_ptr<emorl::DeviceParams> keep;
  if (p.has("keep")) {
    keep.reset(new emorl::DeviceParams(device_params(a, Props(a, p.get("keep"), p.name("keep")))));
    if (keep->stage != emorl::DeviceParams::Stage::Decoder) a.range_error("'" + p.name("keep") + "' must be the decoder's parameters (stage 'decoder')");
  }
  const std::vector<double> ids_d = p.numbers("ids"), us_d = p.numbers("us"), sizes_d = p.numbers("sizes");
  if (ids_d.empty() || ids_d.size() != us_d.size())
    a.range_error("'" + p.name("ids") + "' and '" + p.name("us") + "' must be non-empty and of one length (one u per kept set)");
  std::vector<uint64_t> ids;
  for (double d : ids_d) {
    if (d < 1 || std::floor(d) != d || d > 9007199254740992.0) a.type_error("'" + p.name("ids") + "' must hold kept-set ids (integers >= 1)");
    ids.push_back(static_cast<uint64_t>(d));
  }
  std::vector<float> us(us_d.begin(), us_d.end());
  std::vector<size_t> sizes;
  Napi::Array out = Napi::Array::New(a.env(), sizes_d.size());
  std::vector<float*> outs;
  for (size_t b = 0; b < sizes_d.size(); ++b) {
    const double d = sizes_d[b];
    if (d < 1 || std::floor(d) != d || d > 1e9) a.type_error("'" + p.name("sizes") + "' must hold buffer sizes (integers >= 1)");
    sizes.push_back(static_cast<size_t>(d));
    if (keep && b > 0) {
      outs.push_back(nullptr);
      out.Set(static_cast<uint32_t>(b), a.env().Null());
      continue;
    }
    auto t = new_f32(a, static_cast<int64_t>(d));
    outs.push_back(t.Data());
    out.Set(static_cast<uint32_t>(b), t);
  }
  EMORL_ON_GPU(gpu, decoder_param_grad_sums, ids, us, sizes, outs, *gpu.ws, keep.get());
  gpu.done(a.env());
  return out;
}

// What the calls on a stage's device-resident parameters share: spec.workspace on spec.device
// (a GPU device) and the parameters (device_params).
struct ParamsCall {
  Props p;
  GpuCall gpu;
  emorl::DeviceParams d;
  explicit ParamsCall(const Args& a)
      : p(a, a.at(0), "spec"), gpu(device_workspace(a, p, "device-resident parameters")), d(device_params(a, p)) {}
};

// deviceGradNorms({ workspace, device, layers, params }) -> Float32Array: per parameter, the L2
// norm of its summed gradient on the device (l2Norm's bits)
Napi::Value DeviceGradNormsFn(const Napi::CallbackInfo& info, bool) {
  Args a(info, "deviceGradNorms");
  ParamsCall c(a);
  auto norms = new_f32(a, static_cast<int64_t>(c.d.params.size()));
  EMORL_ON_GPU(c.gpu, device_grad_norms, c.d, norms.Data(), *c.gpu.ws);
  c.gpu.done(a.env());
  return norms;
}

// deviceAdam({ workspace, device, layers, params, newTags: number[], b1, c1, b2, c2, eps, bc2Sqrt,
//   stepSize, scale, first }): adamUpdate on the device of every parameter from its summed
//   gradient; each then lies in the workspace under its new tag
Napi::Value DeviceAdamFn(const Napi::CallbackInfo& info, bool) {
  Args a(info, "deviceAdam");
  ParamsCall c(a);
  const emorl::AdamScalars sc = adam_scalars(a, c.p);
  std::vector<uint64_t> tags;
  for (double t : c.p.numbers("newTags")) {
    if (!(t >= 1 && t <= 9007199254740992.0) || std::floor(t) != t) a.range_error("'" + c.p.name("newTags") + "' must hold content tags >= 1");
    tags.push_back(static_cast<uint64_t>(t));
  }
  if (tags.size() != c.d.params.size()) a.range_error("'" + c.p.name("newTags") + "' must hold one tag per parameter");
  EMORL_ON_GPU(c.gpu, device_adam, c.d, tags, sc, *c.gpu.ws);
  c.gpu.done(a.env());
  return a.env().Undefined();
}

// spec.part: 'weights', 'grads', 'm' or 'v'; `writable`: not the weights (they go up through the
// stages)
emorl::DeviceParamPart param_part(const Args& a, const Props& p, bool writable) {
  Napi::Value v = p.get("part");
  const std::string s = v.IsString() ? v.As<Napi::String>().Utf8Value() : "";
  if (s == "m") return emorl::DeviceParamPart::FirstMoments;
  if (s == "v") return emorl::DeviceParamPart::SecondMoments;
  if (s == "grads") return emorl::DeviceParamPart::Grads;
  if (writable) a.range_error("'" + p.name("part") + "' must be 'grads', 'm' or 'v' (weights go up through the stages)");
  if (s == "weights") return emorl::DeviceParamPart::Weights;
  a.range_error("'" + p.name("part") + "' must be 'weights', 'grads', 'm' or 'v'");
  return emorl::DeviceParamPart::Weights;
}

// deviceParamsRead({ workspace, device, layers, params, part: 'weights' | 'grads' | 'm' | 'v' })
//   -> Float32Array: that part of every parameter, end to end
// deviceParamsWrite({ workspace, device, layers, params, part: 'grads' | 'm' | 'v', data: Float32Array }):
//   that part of every parameter, end to end, onto the device: the moments of a restored optimizer
//   state, or the ranks' sum of the gradients a pass left (data parallel through the host)
template <bool Write>
Napi::Value DeviceParamsCopyFn(const Napi::CallbackInfo& info, bool) {
  Args a(info, Write ? "deviceParamsWrite" : "deviceParamsRead");
  ParamsCall c(a);
  const emorl::DeviceParamPart part = param_part(a, c.p, Write);
  const int64_t n = static_cast<int64_t>(c.d.total());
  if (Write) {
    const float* data = c.p.f32("data", n, "the parameters' " + std::to_string(n) + " values");
    EMORL_ON_GPU(c.gpu, device_params_copy, c.d, part, nullptr, data, *c.gpu.ws);
  }
  auto out = new_f32(a, Write ? 0 : n);
  if (!Write) EMORL_ON_GPU(c.gpu, device_params_copy, c.d, part, out.Data(), nullptr, *c.gpu.ws);
  c.gpu.done(a.env());
  return Write ? a.env().Undefined() : Napi::Value(out);
}

// deviceGradAllreduce({ workspace, device, layers, params }, comm: NcclComm): the summed gradients a
//   pass left on the device, summed over the communicator's ranks in place (ncclAllReduce on the
//   device's memory: nothing crosses the bus). The parameters must be on the communicator's CUDA
//   device; the emulator's memory is the host's, so its ranks reduce through the host instead.
Napi::Value DeviceGradAllreduceFn(const Napi::CallbackInfo& info, bool) {
  Args a(info, "deviceGradAllreduce");
  ParamsCall c(a);
  if (c.gpu.simt())
    a.range_error("'" + c.p.name("device") + "' is 'simt', whose memory is the host's; NCCL reduces CUDA device memory (the emulator's ranks reduce " +
                  "their gradients through the host: deviceParamsRead and deviceParamsWrite, part 'grads')");
#if defined(EMORL_CUDA)
  const int comm_device = emorl::nccl_comm_device(a.env(), a.at(1), "deviceGradAllreduce");
  if (comm_device != c.gpu.device.index)
    a.range_error("the communicator is on cuda:" + std::to_string(comm_device) + ", the parameters on cuda:" + std::to_string(c.gpu.device.index));
  float* g = emorl::cuda::device_grad_state(c.d, *c.gpu.ws);
  emorl::nccl_sum_in_place(a.env(), a.at(1), g, c.d.total(), "deviceGradAllreduce");
#endif
  c.gpu.done(a.env());
  return a.env().Undefined();
}

// A Float64Array property of exactly n elements.
const double* f64_prop(const Args& a, const Props& p, const char* key, int64_t n) {
  Napi::Value v = p.get(key);
  if (!v.IsTypedArray() || v.As<Napi::TypedArray>().TypedArrayType() != napi_float64_array ||
      v.As<Napi::Float64Array>().ElementLength() != static_cast<size_t>(n))
    a.type_error("'" + p.name(key) + "' must be a Float64Array of " + std::to_string(n) + " elements");
  return v.As<Napi::Float64Array>().Data();
}

// The sizes of a slotAttention call: {B, K, N, d, C} with q [B,K,d], k [B,N,d], v [B,N,C], and eps.
struct AttentionCall {
  emorl::SlotAttentionDims d;
  double eps;
  const float *q, *k, *v;
};
AttentionCall attention_call(const Args& a, const Props& p) {
  AttentionCall c;
  c.d = {p.integer("B", 1), p.integer("K", 1), p.integer("N", 1), p.integer("d", 1), p.integer("C", 1)};
  const int64_t B = c.d.B, K = c.d.K, N = c.d.N;
  c.q = p.f32("q", a.numel({B, K, c.d.d}, "q"), "[B,K,d] = " + shape_str({B, K, c.d.d}));
  c.k = p.f32("k", a.numel({B, N, c.d.d}, "k"), "[B,N,d] = " + shape_str({B, N, c.d.d}));
  c.v = p.f32("v", a.numel({B, N, c.d.C}, "v"), "[B,N,C] = " + shape_str({B, N, c.d.C}));
  a.numel({B, K, N}, "[B,K,N]");
  c.eps = p.number("eps");
  if (!(c.eps >= 0 && c.eps < 1)) a.range_error("'" + p.name("eps") + "' must be in [0, 1)");
  return c;
}

// Arrays a call writes in place must each be their own memory, apart from every other array of the
// call: the first of arrays[0, written) that shares memory with another, and that other ({-1, -1}: none).
std::pair<int, int> first_overlap(std::initializer_list<std::pair<const float*, int64_t>> arrays, size_t written) {
  const auto* v = arrays.begin();
  for (size_t o = 0; o < written; ++o)
    for (size_t i = 0; i < arrays.size(); ++i)
      if (i != o && v[o].second && v[i].second && v[i].first < v[o].first + v[o].second && v[o].first < v[i].first + v[i].second)
        return {static_cast<int>(o), static_cast<int>(i)};
  return {-1, -1};
}

// slotAttention({q, k, v, B, K, N, d, C, eps}) -> {updates [B,K,C], p [B,K,N], s [B,K] (Float64Array)}
// slotAttentionBackward({...the same, p, s, updates, dU [B,K,C], dkInto?, dvInto?}) -> {dq, dk, dv}
//   With dkInto and dvInto, dk and dv are added onto them (and returned as null).
// (attention.h: the slot competition, fused, on the CPU).
Napi::Value SlotAttentionFn(const Napi::CallbackInfo& info, bool) {
  Args a(info, "slotAttention");
  Props p(a, a.at(0), "spec");
  const AttentionCall c = attention_call(a, p);
  const int64_t B = c.d.B, K = c.d.K;
  auto updates = new_f32(a, B * K * c.d.C), pv = new_f32(a, B * K * c.d.N);
  auto sv = Napi::Float64Array::New(a.env(), static_cast<size_t>(B * K));
  emorl::slot_attention_forward(c.d, c.q, c.k, c.v, c.eps, pv.Data(), sv.Data(), updates.Data(), threads());
  return object_of(a.env(), {{"updates", updates}, {"p", pv}, {"s", sv}});
}

Napi::Value SlotAttentionBackwardFn(const Napi::CallbackInfo& info, bool) {
  Args a(info, "slotAttentionBackward");
  Props p(a, a.at(0), "spec");
  const AttentionCall c = attention_call(a, p);
  const int64_t B = c.d.B, K = c.d.K, N = c.d.N;
  const std::string kc = "[B,K,C] = " + shape_str({B, K, c.d.C});
  const float* pr = p.f32("p", B * K * N, "[B,K,N] = " + shape_str({B, K, N}));
  const double* sd = f64_prop(a, p, "s", B * K);
  const float* updates = p.f32("updates", B * K * c.d.C, kc);
  const float* dU = p.f32("dU", B * K * c.d.C, kc);
  auto dq = new_f32(a, B * K * c.d.d);
  const bool into = p.has("dkInto") || p.has("dvInto");
  if (into) {
    // written in place: each must be its own memory, apart from every input's and the other's
    float* dk = const_cast<float*>(p.f32("dkInto", B * N * c.d.d, "[B,N,d] = " + shape_str({B, N, c.d.d})));
    float* dv = const_cast<float*>(p.f32("dvInto", B * N * c.d.C, "[B,N,C] = " + shape_str({B, N, c.d.C})));
    const int o = first_overlap({{dk, B * N * c.d.d}, {dv, B * N * c.d.C}, {c.q, B * K * c.d.d}, {c.k, B * N * c.d.d}, {c.v, B * N * c.d.C},
                                 {pr, B * K * N}, {updates, B * K * c.d.C}, {dU, B * K * c.d.C}}, 2).first;
    if (o >= 0) a.range_error("'" + p.name(o ? "dvInto" : "dkInto") + "' overlaps another array of the spec");
    emorl::slot_attention_backward(c.d, c.q, c.k, c.v, pr, sd, updates, dU, c.eps, dq.Data(), dk, dv, true, threads());
    return object_of(a.env(), {{"dq", dq}, {"dk", a.env().Null()}, {"dv", a.env().Null()}});
  }
  auto dk = new_f32(a, B * N * c.d.d), dv = new_f32(a, B * N * c.d.C);
  emorl::slot_attention_backward(c.d, c.q, c.k, c.v, pr, sd, updates, dU, c.eps, dq.Data(), dk.Data(), dv.Data(), false, threads());
  return object_of(a.env(), {{"dq", dq}, {"dk", dk}, {"dv", dv}});
}

// layerNorm({ x [rows,D], rows, D, weight?, bias?, eps }) -> { y, mean, rstd (Float64Array [rows]) }
// layerNormBackward({ g, x [rows,D], rows, D, weight?, mean, rstd, withParams })
//   -> { dx, dw|null, db|null (Float64Array [D]) }   (layernorm.h)
// A layer-norm spec's sizes: rows x D (n elements), `what` its shape for messages.
struct RowsOfD {
  int64_t rows, D, n;
  std::string what;
  // an optional [D] parameter
  const float* param(const Props& p, const char* key) const {
    return p.has(key) ? p.f32(key, D, "[D] = [" + std::to_string(D) + "]") : nullptr;
  }
};

RowsOfD rows_of_d(const Args& a, const Props& p) {
  RowsOfD r{p.integer("rows", 1), p.integer("D", 1), 0, ""};
  const std::vector<int64_t> shape{r.rows, r.D};
  r.n = a.numel(shape, "[rows,D]");
  r.what = "[rows,D] = " + shape_str(shape);
  return r;
}

Napi::Value LayerNormFn(const Napi::CallbackInfo& info, bool) {
  Args a(info, "layerNorm");
  Props p(a, a.at(0), "spec");
  const RowsOfD s = rows_of_d(a, p);
  const int64_t rows = s.rows, D = s.D, n = s.n;
  const float* x = p.f32("x", n, s.what);
  const float* w = s.param(p, "weight");
  const float* b = s.param(p, "bias");
  const double eps = p.number("eps");
  if (!(eps > 0)) a.range_error("'spec.eps' must be > 0");
  auto y = new_f32(a, n);
  auto mean = Napi::Float64Array::New(a.env(), static_cast<size_t>(rows));
  auto rstd = Napi::Float64Array::New(a.env(), static_cast<size_t>(rows));
  emorl::layer_norm_forward(x, rows, D, w, b, eps, y.Data(), mean.Data(), rstd.Data(), threads());
  return object_of(a.env(), {{"y", y}, {"mean", mean}, {"rstd", rstd}});
}

Napi::Value LayerNormBackwardFn(const Napi::CallbackInfo& info, bool) {
  Args a(info, "layerNormBackward");
  Props p(a, a.at(0), "spec");
  const RowsOfD s = rows_of_d(a, p);
  const int64_t rows = s.rows, D = s.D, n = s.n;
  const float* g = p.f32("g", n, s.what);
  const float* x = p.f32("x", n, s.what);
  const float* w = s.param(p, "weight");
  const double* mean = f64_prop(a, p, "mean", rows);
  const double* rstd = f64_prop(a, p, "rstd", rows);
  const bool with_params = p.boolean("withParams", false);
  auto dx = new_f32(a, n);
  Napi::Object r = Napi::Object::New(a.env());
  r.Set("dx", dx);
  r.Set("dw", a.env().Null());
  r.Set("db", a.env().Null());
  double *dw = nullptr, *db = nullptr;
  if (with_params) {
    auto tw = Napi::Float64Array::New(a.env(), static_cast<size_t>(D));
    auto tb = Napi::Float64Array::New(a.env(), static_cast<size_t>(D));
    dw = tw.Data();
    db = tb.Data();
    r.Set("dw", tw);
    r.Set("db", tb);
  }
  emorl::layer_norm_backward(g, x, rows, D, w, mean, rstd, dx.Data(), dw, db, threads());
  return r;
}

// ---- diagonal Gaussians (gaussian.h; lib/model/priors.ts) ----

// softplusStd({ s }) -> σ;  softplusStdBackward({ g, s, std }) -> ds   (all the same length)
Napi::Value SoftplusStdFn(const Napi::CallbackInfo& info, bool) {
  Args a(info, "softplusStd");
  Props p(a, a.at(0), "spec");
  const int64_t n = p.length("s");
  const float* s = p.f32("s", n, "'spec.s'");
  auto y = new_f32(a, n);
  emorl::softplus_std_forward(s, n, y.Data());
  return y;
}

Napi::Value SoftplusStdBackwardFn(const Napi::CallbackInfo& info, bool) {
  Args a(info, "softplusStdBackward");
  Props p(a, a.at(0), "spec");
  const int64_t n = p.length("s");
  const std::string what = "'spec.s' (" + std::to_string(n) + " elements)";
  const float* s = p.f32("s", n, what);
  const float* g = p.f32("g", n, what);
  const float* sd = p.f32("std", n, what);
  auto ds = new_f32(a, n);
  emorl::softplus_std_backward(g, s, sd, n, ds.Data());
  return ds;
}

// klDiag({ qLoc, qStd [rows,D], pLoc?, pStd? [rows,D], rows, D }) -> kl [rows]
// klDiagBackward({ g [rows], qLoc, qStd, pLoc?, pStd?, rows, D }) -> { dqLoc, dqStd, dpLoc|null, dpStd|null }
struct KlArgs {
  int64_t rows, D;
  const float *q_loc, *q_std, *p_loc, *p_std;
};

KlArgs kl_args(const Args& a, const Props& p) {
  const RowsOfD s = rows_of_d(a, p);
  KlArgs k{s.rows, s.D, p.f32("qLoc", s.n, s.what), p.f32("qStd", s.n, s.what), nullptr, nullptr};
  if (p.has("pLoc") != p.has("pStd")) a.type_error("'spec.pLoc' and 'spec.pStd' go together: give both or neither");
  if (p.has("pLoc")) {
    k.p_loc = p.f32("pLoc", s.n, s.what);
    k.p_std = p.f32("pStd", s.n, s.what);
  }
  return k;
}

Napi::Value KlDiagFn(const Napi::CallbackInfo& info, bool) {
  Args a(info, "klDiag");
  Props p(a, a.at(0), "spec");
  const KlArgs k = kl_args(a, p);
  auto kl = new_f32(a, k.rows);
  emorl::kl_diag_forward(k.q_loc, k.q_std, k.p_loc, k.p_std, k.rows, k.D, kl.Data());
  return kl;
}

Napi::Value KlDiagBackwardFn(const Napi::CallbackInfo& info, bool) {
  Args a(info, "klDiagBackward");
  Props p(a, a.at(0), "spec");
  const KlArgs k = kl_args(a, p);
  const float* g = p.f32("g", k.rows, "[rows] = [" + std::to_string(k.rows) + "]");
  const int64_t n = k.rows * k.D;
  auto dq_loc = new_f32(a, n), dq_std = new_f32(a, n);
  Napi::Value dp_loc_v = a.env().Null(), dp_std_v = a.env().Null();
  float *dp_loc = nullptr, *dp_std = nullptr;
  if (k.p_std) {
    auto t = new_f32(a, n), u = new_f32(a, n);
    dp_loc = t.Data();
    dp_std = u.Data();
    dp_loc_v = t;
    dp_std_v = u;
  }
  emorl::kl_diag_backward(g, k.q_loc, k.q_std, k.p_loc, k.p_std, k.rows, k.D, dq_loc.Data(), dq_std.Data(), dp_loc, dp_std);
  return object_of(a.env(), {{"dqLoc", dq_loc}, {"dqStd", dq_std}, {"dpLoc", dp_loc_v}, {"dpStd", dp_std_v}});
}

// ---- the optimizer (optimizer.h; lib/optim/adam.ts) ----

// adamUpdate({ p, g, m, v, first, scale, b1, c1, b2, c2, eps, bc2Sqrt, stepSize }) -> p_next:
// m and v are updated in place (each its own memory, apart from p's, g's and the other's); the
// scalars must be float32 values (the reference's roundings start from them).
Napi::Value AdamUpdateFn(const Napi::CallbackInfo& info, bool) {
  Args a(info, "adamUpdate");
  Props p(a, a.at(0), "spec");
  const int64_t n = p.length("p");
  const std::string what = "p's " + std::to_string(n) + " elements";
  const float* param = p.f32("p", n, what);
  const float* g = p.f32("g", n, what);
  float* m = const_cast<float*>(p.f32("m", n, what));
  float* v = const_cast<float*>(p.f32("v", n, what));
  const auto [o, i] = first_overlap({{m, n}, {v, n}, {param, n}, {g, n}}, 2);
  const char* names[] = {"m", "v", "p", "g"};
  if (o >= 0) a.range_error("'" + p.name(names[o]) + "' overlaps '" + p.name(names[i]) + "' (it is updated in place)");
  const emorl::AdamScalars sc = adam_scalars(a, p);
  auto next = new_f32(a, n);
  emorl::adam_update(param, g, m, v, next.Data(), n, sc, threads());
  return next;
}

// l2Norm(x: Float32Array) -> number (optimizer.h l2_norm_f32: tf.norm's roundings)
Napi::Value L2NormFn(const Napi::CallbackInfo& info, bool) {
  Args a(info, "l2Norm");
  Napi::Value v = a.at(0);
  if (!v.IsTypedArray() || v.As<Napi::TypedArray>().TypedArrayType() != napi_float32_array) a.type_error("'x' must be a Float32Array");
  auto x = v.As<Napi::Float32Array>();
  return Napi::Number::New(a.env(), emorl::l2_norm_f32(x.Data(), static_cast<int64_t>(x.ElementLength())));
}

// ---- the GRU step (gru.h; lib/ops/native-gru.ts) ----

// The dimensions N, I, H of a GRU spec, the shapes they imply (for the messages), and the arrays
// both directions take: x, h and the weights.
struct GruSpec {
  emorl::GruDims d;
  const float *x = nullptr, *h = nullptr, *wih = nullptr, *whh = nullptr;
  std::string what(const char* tensor) const {
    const std::string t(tensor);
    if (t == "x") return "[N,I] = " + shape_str({d.N, d.I});
    if (t == "h") return "[N,H] = " + shape_str({d.N, d.H});
    if (t == "w_ih") return "[3H,I] = " + shape_str({d.G(), d.I});
    if (t == "w_hh") return "[3H,H] = " + shape_str({d.G(), d.H});
    if (t == "gates") return "[4,N,H] = " + shape_str({emorl::kGruPlanes, d.N, d.H});
    return "[3H] = " + shape_str({d.G()});
  }
};

GruSpec gru_spec(const Args& a, const Props& p) {
  GruSpec s;
  s.d = {p.integer("N", 1), p.integer("I", 1), p.integer("H", 1)};
  const emorl::GruDims& d = s.d;
  a.numel({d.N, d.G(), std::max(d.I, d.H)}, "[N,3H,max(I,H)]");  // size check
  s.x = p.f32("x", d.N * d.I, s.what("x"));
  s.h = p.f32("h", d.N * d.H, s.what("h"));
  if (p.has("resident")) return s;  // the weights are on the device (gru_resident)
  s.wih = p.f32("wIh", d.G() * d.I, s.what("w_ih"));
  s.whh = p.f32("wHh", d.G() * d.H, s.what("w_hh"));
  return s;
}

// The weights' content tags of a GRU spec (GPU calls keep tagged weights on the device).
emorl::GruTags gru_tags(const Props& p) { return {p.tag("wIhTag"), p.tag("wHhTag"), p.tag("bIhTag"), p.tag("bHhTag")}; }

// spec.resident = { stage: 'gru', layers, params, data, cell, keepGrads?, first? }: the call's weights
// are a GRU stage's device-resident parameters (gpu.h GruResident); data[j] is parameter j's host
// data (Float32Array of its size) when the host's copy is current, else null. Absent: none.
struct GruResidentArg {
  emorl::DeviceParams params;
  emorl::GruResident r;  // r.params points at params: not to be copied
  bool given = false;
  GruResidentArg() = default;
  GruResidentArg(const GruResidentArg&) = delete;
  GruResidentArg& operator=(const GruResidentArg&) = delete;
};
void gru_resident(const Args& a, const Props& p, const GpuCall& gpu, bool backward, GruResidentArg& out) {
  if (!p.has("resident")) return;
  if (!gpu.on_gpu()) a.range_error("'" + p.name("resident") + "' is for GPU devices");
  Props rp(a, p.get("resident"), p.name("resident"));
  const Napi::Value stage = rp.get("stage");
  if (!stage.IsString() || stage.As<Napi::String>().Utf8Value() != "gru") a.range_error("'" + rp.name("stage") + "' must be 'gru'");
  out.params = device_params(a, rp);
  Napi::Value dv = rp.get("data");
  if (!dv.IsArray() || dv.As<Napi::Array>().Length() != out.params.params.size())
    a.type_error("'" + rp.name("data") + "' must be an array of one Float32Array (or null) per parameter");
  auto data = dv.As<Napi::Array>();
  for (uint32_t j = 0; j < data.Length(); ++j) {
    Napi::Value v = data.Get(j);
    const std::string name = rp.name("data") + "[" + std::to_string(j) + "]";
    if (v.IsNull() || v.IsUndefined()) {
      out.r.host.push_back(nullptr);
      continue;
    }
    if (!v.IsTypedArray() || v.As<Napi::TypedArray>().TypedArrayType() != napi_float32_array) a.type_error("'" + name + "' must be a Float32Array or null");
    auto t = v.As<Napi::Float32Array>();
    if (t.ElementLength() != out.params.params[j].n)
      a.range_error("'" + name + "' has " + std::to_string(t.ElementLength()) + " elements, the parameter " + std::to_string(out.params.params[j].n));
    out.r.host.push_back(t.Data());
  }
  out.r.cell = static_cast<int>(rp.integer("cell", 0));
  out.r.keep_grads = backward && rp.boolean("keepGrads", false);
  out.r.first = backward && rp.boolean("first", false);
  out.r.params = &out.params;
  out.given = true;
}

// gruCell({x, h, wIh, wHh, bIh, bHh, N, I, H, keep?, device?, workspace?, resident?}) -> {y [N,H], gates [4,N,H] | null, kept}
//   gates (r, u, n, c_n) are what gruCellBackward needs besides the inputs. On a GPU, x, h and the
//   gates also stay on the device under the id `kept` (0 on the CPU); with keep they are not
//   downloaded at all. With resident (gru_resident) the weights and biases are not given.
Napi::Value GruCellFn(const Napi::CallbackInfo& info, bool) {
  Args a(info, "gruCell");
  Props p(a, a.at(0), "spec");
  const GruSpec s = gru_spec(a, p);
  const emorl::GruDims& d = s.d;
  const float *x = s.x, *h = s.h, *wih = s.wih, *whh = s.whh;
  GpuCall gpu(a, p);
  GruResidentArg res;
  gru_resident(a, p, gpu, false, res);
  const float* bih = res.given ? nullptr : p.f32("bIh", d.G(), s.what("b"));
  const float* bhh = res.given ? nullptr : p.f32("bHh", d.G(), s.what("b"));
  const bool keep = p.boolean("keep", false);
  if (keep && !gpu.on_gpu()) a.range_error("'" + p.name("keep") + "' is for GPU devices (the CPU's backward takes the gates)");
  auto y = new_f32(a, d.N * d.H);
  Napi::Value gv = a.env().Null();
  float* gd = nullptr;
  if (!keep) {
    auto gates = new_f32(a, emorl::kGruPlanes * d.N * d.H);
    gd = gates.Data();
    gv = gates;
  }
  uint64_t kept = 0;
  if (!gpu.on_gpu())
    emorl::gru_forward(d, x, h, wih, whh, bih, bhh, y.Data(), gd, threads());
  else
    kept = EMORL_ON_GPU(gpu, gru_forward, d, x, h, wih, whh, bih, bhh, y.Data(), gd, *gpu.ws, gru_tags(p), res.given ? &res.r : nullptr);
  gpu.done(a.env());
  return object_of(a.env(), {{"y", y}, {"gates", gv}, {"kept", Napi::Number::New(a.env(), static_cast<double>(kept))}});
}

// gruCellBackward({x, h, wIh, wHh, gates, dy, N, I, H, needParams, device?, workspace?})
//   -> {dx, dh, dwIh|null, dwHh|null, dbIh|null, dbHh|null}
//   On a GPU also {kept}: the forward's id, whose x, h and gates on the device are used while they
//   are there; gates may then be left out if bIh and bHh are given (to recompute them otherwise).
//   With resident (gru_resident) the weights and biases are not given, and with its keepGrads the
//   parameter gradients go into the device's gradient state buffer (their results null).
Napi::Value GruCellBackwardFn(const Napi::CallbackInfo& info, bool) {
  Args a(info, "gruCellBackward");
  Props p(a, a.at(0), "spec");
  const GruSpec s = gru_spec(a, p);
  const emorl::GruDims& d = s.d;
  const float *x = s.x, *h = s.h, *wih = s.wih, *whh = s.whh;
  GpuCall gpu(a, p);
  GruResidentArg res;
  gru_resident(a, p, gpu, true, res);
  // on a GPU the forward's kept activations (spec.kept), else the gates, else recomputed from the biases
  const bool gpu_without_gates = gpu.on_gpu() && !p.has("gates");
  const float* gates = gpu_without_gates ? nullptr : p.f32("gates", emorl::kGruPlanes * d.N * d.H, s.what("gates"));
  const float* bih = gpu_without_gates && !res.given ? p.f32("bIh", d.G(), s.what("b")) : nullptr;
  const float* bhh = gpu_without_gates && !res.given ? p.f32("bHh", d.G(), s.what("b")) : nullptr;
  const double kept_id = p.has("kept") ? p.number("kept") : 0;
  if (!(kept_id >= 0) || std::floor(kept_id) != kept_id) a.range_error("'" + p.name("kept") + "' must be the id gruCell returned");
  const float* dy = p.f32("dy", d.N * d.H, s.what("h"));
  const bool need_params = p.boolean("needParams", true);
  if (!need_params) res.r.keep_grads = false;
  auto dx = new_f32(a, d.N * d.I);
  auto dh = new_f32(a, d.N * d.H);
  Napi::Object r = Napi::Object::New(a.env());
  r.Set("dx", dx);
  r.Set("dh", dh);
  float *dwih = nullptr, *dwhh = nullptr, *dbih = nullptr, *dbhh = nullptr;
  const std::pair<const char*, float**> params[] = {{"dwIh", &dwih}, {"dwHh", &dwhh}, {"dbIh", &dbih}, {"dbHh", &dbhh}};
  const int64_t sizes[] = {d.G() * d.I, d.G() * d.H, d.G(), d.G()};
  for (size_t i = 0; i < 4; ++i) {
    if (!need_params || res.r.keep_grads) {  // kept: summed into the device's gradients instead
      r.Set(params[i].first, a.env().Null());
      continue;
    }
    auto t = new_f32(a, sizes[i]);
    *params[i].second = t.Data();
    r.Set(params[i].first, t);
  }
  if (!gpu.on_gpu())
    emorl::gru_backward(d, x, h, wih, whh, gates, dy, dx.Data(), dh.Data(), dwih, dwhh, dbih, dbhh, threads());
  else
    EMORL_ON_GPU(gpu, gru_backward, d, x, h, wih, whh, bih, bhh, gates, dy, dx.Data(), dh.Data(), dwih, dwhh, dbih, dbhh, *gpu.ws,
                 gru_tags(p), static_cast<uint64_t>(kept_id), res.given ? &res.r : nullptr);
  gpu.done(a.env());
  return r;
}

// ---- a stack of convolutions as one GPU stage (gpu.h ConvStack; lib/ops/native.ts convStack) ----


// The stack described by spec {x, xShape [N,H,W,C], layers: [{w, wShape [Co,Ci,kh,kw], b, stride?,
// pad, act}]}, every shape checked (each layer's Ci must be the previous layer's Co).
emorl::ConvStack conv_stack_spec(const Args& a, const Props& p) {
  emorl::ConvStack s;
  int64_t xs[4];
  p.shape4("xShape", xs);
  s.N = xs[0];
  s.H = xs[1];
  s.W = xs[2];
  s.C = xs[3];
  s.x = p.f32("x", a.numel({s.N, s.H, s.W, s.C}, "xShape"), "xShape " + shape_str({s.N, s.H, s.W, s.C}));
  Napi::Value lv = p.get("layers");
  if (!lv.IsArray() || lv.As<Napi::Array>().Length() == 0) a.type_error("'" + p.name("layers") + "' must be a non-empty array");
  auto la = lv.As<Napi::Array>();
  int64_t channels = s.C;
  for (uint32_t i = 0; i < la.Length(); ++i) {
    const Props q(a, la.Get(i), p.name("layers") + "[" + std::to_string(i) + "]");
    int64_t w[4];
    q.shape4("wShape", w, 1e6);
    const std::vector<int64_t> wshape{w[0], w[1], w[2], w[3]};
    if (w[1] != channels) {
      std::ostringstream o;
      o << "'" << q.name("wShape") << "' " << shape_str(wshape) << " takes " << w[1] << " input channels, but "
        << (i ? "the previous layer gives " : "xShape has ") << channels;
      a.range_error(o.str());
    }
    emorl::ConvStackLayer L;
    L.w_tag = q.tag("wTag");
    L.b_tag = q.tag("bTag");
    if (q.boolean("resident", false)) {
      // w and b live on the device only (an optimizer there updates them): no host copy to read
      check_resident(a, p, q.name("resident"), L.w_tag && L.b_tag, "wTag, bTag");
      a.numel(wshape, "wShape");
    } else {
      L.w = q.f32("w", a.numel(wshape, "wShape"), "wShape " + shape_str(wshape));
      L.b = q.f32("b", w[0], "wShape[0] = " + std::to_string(w[0]));
    }
    L.Co = w[0];
    L.kh = w[2];
    L.kw = w[3];
    L.stride = q.integer("stride", 1, 1);
    L.pad = q.integer("pad", 0);
    const int64_t act = q.integer("act", 0, 0);
    if (act > 2) a.range_error("'" + q.name("act") + "' must be 0 (linear), 1 (relu) or 2 (elu)");
    L.act = static_cast<emorl::Act>(act);
    s.layers.push_back(L);
    channels = w[0];
  }
  for (size_t i = 0; i < s.layers.size(); ++i) {
    try {
      (void)s.geom(i);
    } catch (const std::invalid_argument&) {
      a.range_error("'" + p.name("layers") + "[" + std::to_string(i) + "]': the kernel and padding leave no output for xShape " +
                    shape_str({s.N, s.H, s.W, s.C}));
    }
  }
  return s;
}

// The GPU (never the CPU: per-layer calls are the CPU's way) for a conv stack call.
GpuCall conv_stack_device(const Args& a, const Props& p) {
  GpuCall gpu(a, p);
  if (!gpu.on_gpu()) a.range_error("'" + p.name("device") + "' must be 'cuda:N' or 'simt': a conv stack is a GPU stage (on the CPU, call nhwcConv2d per layer)");
  return gpu;
}

// spec.stamp: a stamp from `from` (absent: 0, which no workspace holds).
uint64_t stamp_prop(const Args& a, const Props& p, const char* from) {
  const double st = p.has("stamp") ? p.number("stamp") : 0;
  if (st < 0 || std::floor(st) != st) a.range_error("'" + p.name("stamp") + "' must be a stamp from " + from);
  return static_cast<uint64_t>(st);
}

// The conv stack's parameter gradients, new arrays per layer as r.dw and r.db (null when not
// needed), with dw and db pointing into them (null pointers: skipped).
void stack_grads(const Args& a, const emorl::ConvStack& s, bool need, Napi::Object r, std::vector<float*>& dw, std::vector<float*>& db) {
  dw.assign(s.layers.size(), nullptr);
  db.assign(s.layers.size(), nullptr);
  if (!need) {
    r.Set("dw", a.env().Null());
    r.Set("db", a.env().Null());
    return;
  }
  Napi::Array dwa = Napi::Array::New(a.env(), s.layers.size()), dba = Napi::Array::New(a.env(), s.layers.size());
  for (size_t i = 0; i < s.layers.size(); ++i) {
    auto tw = new_f32(a, s.layers[i].Co * s.geom(i).P());
    auto tb = new_f32(a, s.layers[i].Co);
    dw[i] = tw.Data();
    db[i] = tb.Data();
    dwa.Set(static_cast<uint32_t>(i), tw);
    dba.Set(static_cast<uint32_t>(i), tb);
  }
  r.Set("dw", dwa);
  r.Set("db", dba);
}

// convStack({x, xShape, layers, device, workspace?}) -> {y [N,Ho,Wo,Co], yShape, stamp}
//   stamp: hand it to convStackBackward; its maps stay in the workspace until the next forward.
Napi::Value ConvStackFn(const Napi::CallbackInfo& info, bool) {
  Args a(info, "convStack");
  Props p(a, a.at(0), "spec");
  const emorl::ConvStack s = conv_stack_spec(a, p);
  GpuCall gpu = conv_stack_device(a, p);
  const emorl::NhwcGeom g = s.geom(s.layers.size() - 1);
  const int64_t Co = s.layers.back().Co;
  auto y = new_f32(a, a.numel({g.N, g.Ho, g.Wo, Co}, "output"));
  const uint64_t stamp = EMORL_ON_GPU(gpu, conv_stack_forward, s, y.Data(), *gpu.ws);
  gpu.done(a.env());
  Napi::Array shape = Napi::Array::New(a.env(), 4);
  const int64_t dims[4] = {g.N, g.Ho, g.Wo, Co};
  for (uint32_t k = 0; k < 4; ++k) shape.Set(k, Napi::Number::New(a.env(), static_cast<double>(dims[k])));
  return object_of(a.env(), {{"y", y}, {"yShape", shape}, {"stamp", Napi::Number::New(a.env(), static_cast<double>(stamp))}});
}

// convStackBackward({x, xShape, layers, dy, stamp, needDx, needParams, device, workspace?})
//   -> {dx|null, dw: [per layer]|null, db: [per layer]|null}. With the stamp of the workspace's latest
//   forward the maps it left are used; otherwise the forward runs again first.
Napi::Value ConvStackBackwardFn(const Napi::CallbackInfo& info, bool) {
  Args a(info, "convStackBackward");
  Props p(a, a.at(0), "spec");
  const emorl::ConvStack s = conv_stack_spec(a, p);
  GpuCall gpu = conv_stack_device(a, p);
  const emorl::NhwcGeom g = s.geom(s.layers.size() - 1);
  const std::vector<int64_t> ys{g.N, g.Ho, g.Wo, s.layers.back().Co};
  const float* dy = p.f32("dy", a.numel(ys, "output"), "the output " + shape_str(ys));
  const uint64_t stamp = stamp_prop(a, p, "convStack");
  const bool need_dx = p.boolean("needDx", false), need_params = p.boolean("needParams", true);
  Napi::Object r = Napi::Object::New(a.env());
  float* dx = nullptr;
  if (need_dx) {
    auto t = new_f32(a, s.N * s.H * s.W * s.C);
    dx = t.Data();
    r.Set("dx", t);
  } else {
    r.Set("dx", a.env().Null());
  }
  std::vector<float*> dw, db;
  stack_grads(a, s, need_params, r, dw, db);
  EMORL_ON_GPU(gpu, conv_stack_backward, s, stamp, dy, dx, dw, db, *gpu.ws);
  gpu.done(a.env());
  return r;
}

// ---- the whole encoder as one GPU stage: the conv stack, then gpu.h's EncoderHead ----

// spec.head = {pos [H·W, pc], posW [D, pc], posB [D], lnW, lnB [D], eps, w1, w2 [D, D], b1, b2 [D],
//   wk, wv [Z, D], tags?: 11 content tags in that order}, D the stack's last channels.
emorl::EncoderHead encoder_head_spec(const Args& a, const Props& p, int64_t D, int64_t hw, const char* d_is) {
  const Props q(a, p.get("head"), p.name("head"));
  emorl::EncoderHead h;
  h.D = D;
  const std::string dn = "D = " + std::to_string(h.D) + " (" + d_is + ")";
  const int64_t npos = q.length("pos");
  if (npos == 0 || npos % hw) {
    std::ostringstream o;
    o << "'" << q.name("pos") << "' has " << npos << " elements, not a positive multiple of the last map's " << hw << " pixels";
    a.range_error(o.str());
  }
  h.pos_c = npos / hw;
  h.p.pos = q.f32("pos", npos, "[H·W, pc]");
  h.p.eps = q.number("eps");
  if (!(h.p.eps > 0)) a.range_error("'" + q.name("eps") + "' must be > 0");
  const bool resident = q.boolean("resident", false);
  if (resident) {
    // the head's parameters live on the device only (an optimizer there updates them): their sizes
    // follow from D, pc and Z
    h.Z = q.integer("Z", 1);
  } else {
    h.p.pos_w = q.f32("posW", h.D * h.pos_c, "[D, pc] = " + shape_str({h.D, h.pos_c}));
    h.p.pos_b = q.f32("posB", h.D, dn);
    h.p.ln_w = q.f32("lnW", h.D, dn);
    h.p.ln_b = q.f32("lnB", h.D, dn);
    h.p.w1 = q.f32("w1", h.D * h.D, "[D, D] = " + shape_str({h.D, h.D}));
    h.p.b1 = q.f32("b1", h.D, dn);
    h.p.w2 = q.f32("w2", h.D * h.D, "[D, D] = " + shape_str({h.D, h.D}));
    h.p.b2 = q.f32("b2", h.D, dn);
    const int64_t nk = q.length("wk");
    if (nk == 0 || nk % h.D) a.range_error("'" + q.name("wk") + "' has " + std::to_string(nk) + " elements, not [Z, D] for " + dn);
    h.Z = nk / h.D;
    h.p.wk = q.f32("wk", h.Z * h.D, "[Z, D]");
    h.p.wv = q.f32("wv", h.Z * h.D, "[Z, D] = " + shape_str({h.Z, h.D}) + " (as wk)");
  }
  Napi::Value tv = q.get("tags");
  if (!tv.IsUndefined() && !tv.IsNull()) {
    if (!tv.IsArray() || tv.As<Napi::Array>().Length() != 11) a.type_error("'" + q.name("tags") + "' must be an array of 11 content tags");
    for (uint32_t i = 0; i < 11; ++i) {
      Napi::Value e = tv.As<Napi::Array>().Get(i);
      const double d = e.IsNumber() ? e.As<Napi::Number>().DoubleValue() : -1;
      if (!std::isfinite(d) || std::floor(d) != d || d < 0 || d > 9007199254740992.0)
        a.type_error("'" + q.name("tags") + "' entries must be content tags (integers >= 0)");
      h.tags[i] = static_cast<uint64_t>(d);
    }
  }
  if (resident) check_resident(a, p, q.name("resident"), std::all_of(h.tags + 1, h.tags + 11, [](uint64_t t) { return t != 0; }), "its tags");
  return h;
}

emorl::EncoderHead encoder_head_spec(const Args& a, const Props& p, const emorl::ConvStack& s) {
  const emorl::NhwcGeom g = s.geom(s.layers.size() - 1);
  return encoder_head_spec(a, p, s.layers.back().Co, g.Ho * g.Wo, "the last layer's channels");
}

// The head's parameter gradients as new arrays {posW, posB, lnW, lnB, w1, b1, w2, b2, wk, wv}, g
// pointing into them.
Napi::Object head_grads_object(const Args& a, const emorl::EncoderHead& h, emorl::EncoderHeadParamGrads& g) {
  const int64_t D = h.D, Z = h.Z;
  const std::pair<const char*, std::pair<float**, int64_t>> outs[] = {
      {"posW", {&g.pos_w, D * h.pos_c}}, {"posB", {&g.pos_b, D}}, {"lnW", {&g.ln_w, D}}, {"lnB", {&g.ln_b, D}},
      {"w1", {&g.w1, D * D}},            {"b1", {&g.b1, D}},      {"w2", {&g.w2, D * D}}, {"b2", {&g.b2, D}},
      {"wk", {&g.wk, Z * D}},            {"wv", {&g.wv, Z * D}}};
  Napi::Object o = Napi::Object::New(a.env());
  for (const auto& e : outs) {
    auto t = new_f32(a, e.second.second);
    *e.second.first = t.Data();
    o.Set(e.first, t);
  }
  return o;
}

// ---- the encoder head on the CPU (encoder_head.h; lib/ops/native.ts encoderHead) ----

struct HeadCall {
  emorl::EncoderHead h;
  emorl::EncoderHeadDims d;
};

// {h [rows, D], rows, hw, D, head} as the encoder stage's head (spec.head).
HeadCall head_call(const Args& a, const Props& p) {
  HeadCall c;
  const int64_t rows = p.integer("rows", 1), hw = p.integer("hw", 1), D = p.integer("D", 1);
  if (rows % hw) a.range_error("'" + p.name("rows") + "' = " + std::to_string(rows) + " is not a multiple of hw = " + std::to_string(hw));
  c.h = encoder_head_spec(a, p, D, hw, "spec.D");
  c.d = {rows, hw, D, c.h.Z, c.h.pos_c};
  a.numel({rows, std::max(D, c.h.Z)}, "[rows, max(D, Z)]");
  return c;
}

// encoderHead({h, rows, hw, D, head}) -> {k, v [rows, Z], f1, f2, f3 [rows, D], mean, rstd [rows] (Float64Array)}
Napi::Value EncoderHeadFn(const Napi::CallbackInfo& info, bool) {
  Args a(info, "encoderHead");
  Props p(a, a.at(0), "spec");
  const HeadCall c = head_call(a, p);
  const int64_t R = c.d.rows, D = c.d.D, Z = c.d.Z;
  const float* h = p.f32("h", R * D, "[rows, D] = " + shape_str({R, D}));
  auto k = new_f32(a, R * Z), v = new_f32(a, R * Z);
  auto f1 = new_f32(a, R * D), f2 = new_f32(a, R * D), f3 = new_f32(a, R * D);
  auto mean = Napi::Float64Array::New(a.env(), static_cast<size_t>(R)), rstd = Napi::Float64Array::New(a.env(), static_cast<size_t>(R));
  emorl::encoder_head_forward(c.d, h, c.h.p, k.Data(), v.Data(), {f1.Data(), f2.Data(), f3.Data(), mean.Data(), rstd.Data()}, threads());
  return object_of(a.env(), {{"k", k}, {"v", v}, {"f1", f1}, {"f2", f2}, {"f3", f3}, {"mean", mean}, {"rstd", rstd}});
}

// encoderHeadBackward({h, rows, hw, D, head, f1, f2, f3, mean, rstd, dk, dv, needParams})
//   -> {dh [rows, D], head: {posW, posB, lnW, lnB, w1, b1, w2, b2, wk, wv} | null}
Napi::Value EncoderHeadBackwardFn(const Napi::CallbackInfo& info, bool) {
  Args a(info, "encoderHeadBackward");
  Props p(a, a.at(0), "spec");
  const HeadCall c = head_call(a, p);
  const int64_t R = c.d.rows, D = c.d.D, Z = c.d.Z;
  const std::string rd = "[rows, D] = " + shape_str({R, D}), rz = "[rows, Z] = " + shape_str({R, Z});
  const float* h = p.f32("h", R * D, rd);
  const emorl::EncoderHeadKept sv{p.f32("f1", R * D, rd), p.f32("f2", R * D, rd), p.f32("f3", R * D, rd), f64_prop(a, p, "mean", R),
                                  f64_prop(a, p, "rstd", R)};
  const float* dk = p.f32("dk", R * Z, rz);
  const float* dv = p.f32("dv", R * Z, rz);
  auto dh = new_f32(a, R * D);
  emorl::EncoderHeadParamGrads g{};
  const Napi::Value head = p.boolean("needParams", true) ? Napi::Value(head_grads_object(a, c.h, g)) : a.env().Null();
  emorl::encoder_head_backward(c.d, h, c.h.p, sv, dk, dv, dh.Data(), g, threads());
  return object_of(a.env(), {{"dh", dh}, {"head", head}});
}

// An encoder stage's spec: {x, xShape, layers} for the conv stack and `head` after it.
struct EncoderSpec {
  emorl::ConvStack s;
  emorl::EncoderHead h;
};
EncoderSpec encoder_spec(const Args& a, const Props& p) {
  EncoderSpec e{conv_stack_spec(a, p), {}};
  e.h = encoder_head_spec(a, p, e.s);
  return e;
}

// An encoder stage on the CPU (encoder_stage.h): its workspace (required: the activations live
// there from the forward call to the backward call) and the convolutions' precision.
struct CpuEncoderCall {
  DecoderWorkspace* owner;
  emorl::Precision prec;
};
CpuEncoderCall cpu_encoder_call(const Args& a, const Props& p, const GpuCall& gpu) {
  DecoderWorkspace* owner = workspace_arg(a, p.get("workspace"), p.name("workspace"));
  if (!owner) a.type_error("'" + p.name("workspace") + "' is needed on the CPU: a DecoderWorkspace keeps the activations between the calls");
  return {owner, parse_precision(a, p.get("precision"), p.name("precision"), gpu.device)};
}

// encoderStage({x, xShape, layers, head, keep?, kInto?, vInto?, device, workspace?, precision?}) -> {k, v [N·H·W, Z] | null, rows, Z, stamp}
//   keep: k and v stay on the device only (null here), for encoderAttention (GPU devices).
//   kInto, vInto: Float32Arrays k and v are written into (and returned as), instead of new ones.
//   device 'cpu' (or absent): the CPU kernels, the activations in `workspace` (required);
//   precision: the CPU convolutions' (nhwc.h).
Napi::Value EncoderStageFn(const Napi::CallbackInfo& info, bool) {
  Args a(info, "encoderStage");
  Props p(a, a.at(0), "spec");
  const auto [s, h] = encoder_spec(a, p);
  GpuCall gpu(a, p);
  const int64_t rows = s.geom(s.layers.size() - 1).M();
  const bool keep = p.boolean("keep", false);
  if (keep && !gpu.on_gpu()) a.range_error("'" + p.name("keep") + "' is for GPU devices (on the CPU, k and v are returned)");
  Napi::Value k = a.env().Null(), v = a.env().Null();
  float *kd = nullptr, *vd = nullptr;
  if (!keep && (p.has("kInto") || p.has("vInto"))) {
    // written in place: each must be its own memory, apart from the images and the other
    const int64_t n = a.numel({rows, h.Z}, "k");
    const std::string rz = "[rows, Z] = " + shape_str({rows, h.Z});
    kd = const_cast<float*>(p.f32("kInto", n, rz));
    vd = const_cast<float*>(p.f32("vInto", n, rz));
    const int o = first_overlap({{kd, n}, {vd, n}, {s.x, s.N * s.H * s.W * s.C}}, 2).first;
    if (o >= 0) a.range_error("'" + p.name(o ? "vInto" : "kInto") + "' overlaps another array of the spec");
    k = p.get("kInto");
    v = p.get("vInto");
  } else if (!keep) {
    auto kt = new_f32(a, a.numel({rows, h.Z}, "k")), vt = new_f32(a, a.numel({rows, h.Z}, "v"));
    kd = kt.Data();
    vd = vt.Data();
    k = kt;
    v = vt;
  }
  uint64_t stamp;
  if (gpu.on_gpu()) {
    if (p.has("precision")) (void)parse_precision(a, p.get("precision"), p.name("precision"), gpu.device);  // bf16: a clear error
    stamp = EMORL_ON_GPU(gpu, encoder_forward, s, h, kd, vd, *gpu.ws);
    gpu.done(a.env());
  } else {
    const CpuEncoderCall c = cpu_encoder_call(a, p, gpu);
    stamp = emorl::encoder_forward_cpu(s, h, kd, vd, c.prec, c.owner->ws(), c.owner->cpu_stamps(), threads());
    c.owner->report(a.env());
  }
  const auto num = [&](double x) { return Napi::Number::New(a.env(), x); };
  return object_of(a.env(), {{"k", k}, {"v", v}, {"rows", num(static_cast<double>(rows))}, {"Z", num(static_cast<double>(h.Z))},
                             {"stamp", num(static_cast<double>(stamp))}});
}

// spec.sumId: the id under which encoderAttentionBackward sums dk and dv on the device (a stamp
// of encoderStage; absent: 0, none).
uint64_t sum_id_prop(const Props& p) { return p.id("sumId", "a stamp of encoderStage"); }

// encoderStageBackward({x, xShape, layers, head, dk?, dv?, sumId?, stamp, needParams, keep?, device, workspace?, precision?})
//   -> {dw, db: [per layer] | null, head: {posW, posB, lnW, lnB, w1, b1, w2, b2, wk, wv} | null}
//   Without dk and dv: the sums encoderAttentionBackward made on the device under sumId (GPU devices).
//   keep: {stage: 'encoder', layers, params} (device_params): the parameter gradients stay in the
//   workspace for deviceAdam (GPU devices; dw, db and head come back null).
Napi::Value EncoderStageBackwardFn(const Napi::CallbackInfo& info, bool) {
  Args a(info, "encoderStageBackward");
  Props p(a, a.at(0), "spec");
  const auto [s, h] = encoder_spec(a, p);
  GpuCall gpu(a, p);
  const int64_t rows = s.geom(s.layers.size() - 1).M();
  const std::string kv = "[rows, Z] = " + shape_str({rows, h.Z});
  const uint64_t sum_id = sum_id_prop(p);
  const bool summed = !p.has("dk") && !p.has("dv");
  if (summed && (!sum_id || !gpu.on_gpu()))
    a.type_error("'" + p.name("dk") + "' and '" + p.name("dv") + "' are needed" + (gpu.on_gpu() ? " (or a sumId)" : ""));
  const float* dk = summed ? nullptr : p.f32("dk", rows * h.Z, kv);
  const float* dv = summed ? nullptr : p.f32("dv", rows * h.Z, kv);
  const uint64_t stamp = stamp_prop(a, p, "encoderStage");
  const bool need_params = p.boolean("needParams", true);
  std::unique_ptr<emorl::DeviceParams> keep;
  if (p.has("keep")) {
    if (!gpu.on_gpu() || !need_params) a.range_error("'" + p.name("keep") + "' is for GPU devices, with needParams");
    keep.reset(new emorl::DeviceParams(device_params(a, Props(a, p.get("keep"), p.name("keep")))));
    if (keep->stage != emorl::DeviceParams::Stage::Encoder) a.range_error("'" + p.name("keep") + "' must be the encoder's parameters (stage 'encoder')");
  }
  const bool host_params = need_params && !keep;
  Napi::Object r = Napi::Object::New(a.env());
  std::vector<float*> dw, db;
  stack_grads(a, s, host_params, r, dw, db);
  emorl::EncoderHeadParamGrads g{};
  r.Set("head", host_params ? Napi::Value(head_grads_object(a, h, g)) : a.env().Null());
  if (gpu.on_gpu()) {
    EMORL_ON_GPU(gpu, encoder_backward, s, h, stamp, dk, dv, dw, db, g, *gpu.ws, sum_id, keep.get());
    gpu.done(a.env());
  } else {
    const CpuEncoderCall c = cpu_encoder_call(a, p, gpu);
    emorl::encoder_backward_cpu(s, h, stamp, dk, dv, dw, db, g, c.prec, c.owner->ws(), c.owner->cpu_stamps(), threads());
    c.owner->report(a.env());
  }
  return r;
}

// An encoderAttention call's spec: the encoder's, and the queries {q [B, K, Z], B, K, eps}.
struct AttentionSpec {
  emorl::ConvStack s;
  emorl::EncoderHead h;
  emorl::EncoderAttention e;
};
AttentionSpec encoder_attention_spec(const Args& a, const Props& p) {
  auto [stack, head] = encoder_spec(a, p);
  AttentionSpec c{std::move(stack), head, {}};
  const emorl::ConvStack& s = c.s;
  const emorl::EncoderHead& h = c.h;
  emorl::EncoderAttention& e = c.e;
  e.B = p.integer("B", 1);
  e.K = p.integer("K", 1);
  if (e.B != s.N) a.range_error("'" + p.name("B") + "' = " + std::to_string(e.B) + " differs from the encoder's " + std::to_string(s.N) + " images");
  const double eps = p.number("eps");
  if (!(eps >= 0)) a.range_error("'" + p.name("eps") + "' must be >= 0");
  e.eps = static_cast<float>(eps);
  e.q = p.f32("q", a.numel({e.B, e.K, h.Z}, "q"), "[B, K, Z] = " + shape_str({e.B, e.K, h.Z}));
  return c;
}

// encoderAttention({...encoderStage's spec, stamp, q, B, K, eps, wantP?}) -> {updates [B, K, Z], p [B, K, H·W] | null, stamp}
//   The slot competition of q against the keys and values encoderStage({keep: true}) left on the
//   device under `stamp` (recomputed there when another forward ran since; hand on the returned stamp).
Napi::Value EncoderAttentionFn(const Napi::CallbackInfo& info, bool) {
  Args a(info, "encoderAttention");
  Props p(a, a.at(0), "spec");
  const auto [s, h, e] = encoder_attention_spec(a, p);
  GpuCall gpu = conv_stack_device(a, p);
  const emorl::NhwcGeom g = s.geom(s.layers.size() - 1);
  auto updates = new_f32(a, e.B * e.K * h.Z);
  Napi::Value pv = a.env().Null();
  float* pd = nullptr;
  if (p.boolean("wantP", false)) {
    auto pt = new_f32(a, a.numel({e.B, e.K, g.Ho * g.Wo}, "p"));
    pd = pt.Data();
    pv = pt;
  }
  const uint64_t stamp = EMORL_ON_GPU(gpu, encoder_attention_forward, s, h, stamp_prop(a, p, "encoderStage"), e, updates.Data(), pd, *gpu.ws);
  gpu.done(a.env());
  return object_of(a.env(), {{"updates", updates}, {"p", pv}, {"stamp", Napi::Number::New(a.env(), static_cast<double>(stamp))}});
}

// encoderAttentionBackward({...encoderAttention's spec, dU [B, K, Z], sumId}) -> {dq [B, K, Z], stamp}
//   dk and dv are summed on the device under sumId, for encoderStageBackward({sumId}).
Napi::Value EncoderAttentionBackwardFn(const Napi::CallbackInfo& info, bool) {
  Args a(info, "encoderAttentionBackward");
  Props p(a, a.at(0), "spec");
  const auto [s, h, e] = encoder_attention_spec(a, p);
  const float* dU = p.f32("dU", e.B * e.K * h.Z, "[B, K, Z] = " + shape_str({e.B, e.K, h.Z}));
  const uint64_t sum_id = sum_id_prop(p);
  if (!sum_id) a.type_error("'" + p.name("sumId") + "' is needed");
  GpuCall gpu = conv_stack_device(a, p);
  auto dq = new_f32(a, e.B * e.K * h.Z);
  const uint64_t stamp =
      EMORL_ON_GPU(gpu, encoder_attention_backward, s, h, stamp_prop(a, p, "encoderStage"), sum_id, e, dU, dq.Data(), *gpu.ws);
  gpu.done(a.env());
  return object_of(a.env(), {{"dq", dq}, {"stamp", Napi::Number::New(a.env(), static_cast<double>(stamp))}});
}

// imageNll(raw [B*K,H,W,C+1], target [B,H,W,C], B, K, H, W, C, logVar, gmm, needGrad)
//   -> { nll [B], draw|null }: the fused likelihood alone (likelihood.h), for tests and the
//   Slot Attention loss.
Napi::Value ImageNllFn(const Napi::CallbackInfo& info, bool) {
  Args a(info, "imageNll");
  Props p(a, a.at(0), "spec");
  emorl::ImageNllShape s{p.integer("B", 1), p.integer("K", 1), p.integer("H", 1), p.integer("W", 1), p.integer("C", 1)};
  const std::vector<int64_t> rs{s.B * s.K, s.H, s.W, s.C + 1}, ts{s.B, s.H, s.W, s.C};
  const float* raw = p.f32("raw", a.numel(rs, "raw"), "[B*K,H,W,C+1] = " + shape_str(rs));
  const float* target = p.f32("target", a.numel(ts, "target"), "[B,H,W,C] = " + shape_str(ts));
  const float log_var = static_cast<float>(p.number("logVar"));
  const bool gmm = p.boolean("gmm", false), need_grad = p.boolean("needGrad", false);
  Napi::Object r = Napi::Object::New(a.env());
  auto nll = new_f32(a, s.B);
  r.Set("nll", nll);
  r.Set("draw", a.env().Null());
  float* draw = nullptr;
  if (need_grad) {
    auto t = new_f32(a, a.numel(rs, "raw"));
    draw = t.Data();
    r.Set("draw", t);
  }
  emorl::image_nll(s, raw, target, log_var, gmm, nll.Data(), draw, nullptr, nullptr, threads());
  return r;
}

// gpuPeakGflops(device, seconds?) -> the FP32 FMA throughput of CUDA device N (gpu/probe.cu)
Napi::Value GpuPeakGflops(const Napi::CallbackInfo& info, bool) {
  Args a(info, "gpuPeakGflops");
  if (!a.at(0).IsNumber()) a.type_error("device must be a CUDA device index");
  double seconds = 0.5;
  if (a.at(1).IsNumber()) seconds = a.at(1).As<Napi::Number>().DoubleValue();
  if (!(seconds > 0 && seconds <= 10)) a.range_error("seconds must be in (0, 10]");
#if defined(EMORL_CUDA)
  const int device = a.at(0).As<Napi::Number>().Int32Value();
  std::string err;
  const int n = emorl::cuda_device_count(&err);
  if (device < 0 || device >= n) a.range_error("device " + std::to_string(device) + ": " + std::to_string(n) + " CUDA devices visible" + (err.empty() ? "" : " (" + err + ")"));
  return Napi::Number::New(a.env(), emorl::cuda::peak_gflops(device, seconds));
#else
  a.range_error("the addon was built without CUDA (EMORL_CUDA=1 npm run build:native)");
  return a.env().Undefined();
#endif
}

// peakGflops(seconds?) -> the FMA throughput of all threads (gemm.h peak_gflops)
Napi::Value PeakGflops(const Napi::CallbackInfo& info, bool) {
  Args a(info, "peakGflops");
  double seconds = 0.3;
  if (a.at(0).IsNumber()) seconds = a.at(0).As<Napi::Number>().DoubleValue();
  if (!(seconds > 0 && seconds <= 10)) a.range_error("seconds must be in (0, 10]");
  return Napi::Number::New(a.env(), emorl::peak_gflops(threads(), seconds));
}

// setEnvironment(name, value | null): sets (null: removes) one of the addon's EMORL_* settings in
// the process environment, where the kernels read them (EMORL_GPU_GEMM, EMORL_SIMT_SCHEDULE). For
// tests: Jest gives each test file a copy of process.env, which native code never sees.
Napi::Value SetEnvironment(const Napi::CallbackInfo& info, bool) {
  Args a(info, "setEnvironment");
  if (!a.at(0).IsString()) a.type_error("name must be a string");
  const std::string name = a.at(0).As<Napi::String>().Utf8Value();
  if (name.rfind("EMORL_", 0) != 0 || name.size() == 6 || name.find('=') != std::string::npos ||
      name.find('\0') != std::string::npos)
    a.range_error("name must be an EMORL_* variable, not '" + name + "'");
  if (a.at(1).IsNull() || a.at(1).IsUndefined()) {
    unsetenv(name.c_str());
  } else {
    if (!a.at(1).IsString()) a.type_error("value must be a string or null");
    const std::string value = a.at(1).As<Napi::String>().Utf8Value();
    if (value.find('\0') != std::string::npos) a.range_error("the value of " + name + " holds a NUL character");
    if (setenv(name.c_str(), value.c_str(), 1) != 0) a.range_error("setenv failed for " + name);
  }
  return a.env().Undefined();
}

Napi::Value Info(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  Napi::Object o = Napi::Object::New(env);
  o.Set("gemmIsa", emorl::gemm_kernel().name);
  o.Set("threads", emorl::max_threads());
#if defined(EMORL_OPENMP)
  o.Set("openmp", true);
#else
  o.Set("openmp", false);
#endif
#if defined(EMORL_CUDA)
  o.Set("cudaBuilt", true);
  std::string err;
  const int n = emorl::cuda_device_count(&err);
  o.Set("cudaDevices", n);
  if (!err.empty()) o.Set("cudaError", err);
#else
  o.Set("cudaBuilt", false);
  o.Set("cudaDevices", 0);
#endif
  o.Set("simtEmulator", true);  // decoderStage's device 'simt': the CUDA kernels on the CPU
  // precision 'bf16': 'avx512bf16' (about twice the fp32 rate) or 'emulated' (same numbers, slower)
  o.Set("bf16", emorl::bf16_kernel().name);
  // how stride-1 3x3 and 5x5 convolutions run: 'winograd' (F(4x4,5x5), F(6x6,3x3)) or 'direct'
  o.Set("convAlgo", emorl::winograd_enabled() ? "winograd" : "direct");
  return o;
}

template <Napi::Value (*F)(const Napi::CallbackInfo&, bool), bool Ref>
Napi::Value entry(const Napi::CallbackInfo& info) {
  return guarded<F>(info, Ref);
}

template <Napi::Value (*F)(const Napi::CallbackInfo&, bool)>
void add(Napi::Env env, Napi::Object fast, Napi::Object ref, const char* name) {
  fast.Set(name, Napi::Function::New(env, entry<F, false>, name));
  ref.Set(name, Napi::Function::New(env, entry<F, true>, name));
}

Napi::Object Init(Napi::Env env, Napi::Object exports) {
  Napi::Object ref = Napi::Object::New(env);
  add<Conv2d>(env, exports, ref, "conv2d");
  add<Conv2dBackwardInput>(env, exports, ref, "conv2dBackwardInput");
  add<Conv2dBackwardFilter>(env, exports, ref, "conv2dBackwardFilter");
  add<Conv2dTranspose>(env, exports, ref, "conv2dTranspose");
  add<Conv2dTransposeBackwardInput>(env, exports, ref, "conv2dTransposeBackwardInput");
  add<Conv2dTransposeBackwardFilter>(env, exports, ref, "conv2dTransposeBackwardFilter");
  add<Matmul>(env, exports, ref, "matmul");
  exports.Set("setEnvironment", Napi::Function::New(env, entry<SetEnvironment, false>, "setEnvironment"));
  exports.Set("decoderParamGradSums", Napi::Function::New(env, entry<DecoderParamGradSumsFn, false>, "decoderParamGradSums"));
  exports.Set("deviceGradNorms", Napi::Function::New(env, entry<DeviceGradNormsFn, false>, "deviceGradNorms"));
  exports.Set("deviceAdam", Napi::Function::New(env, entry<DeviceAdamFn, false>, "deviceAdam"));
  exports.Set("deviceParamsRead", Napi::Function::New(env, entry<DeviceParamsCopyFn<false>, false>, "deviceParamsRead"));
  exports.Set("deviceParamsWrite", Napi::Function::New(env, entry<DeviceParamsCopyFn<true>, false>, "deviceParamsWrite"));
  exports.Set("deviceGradAllreduce", Napi::Function::New(env, entry<DeviceGradAllreduceFn, false>, "deviceGradAllreduce"));
  exports.Set("nhwcConv2d", Napi::Function::New(env, entry<NhwcConv2d, false>, "nhwcConv2d"));
  exports.Set("nhwcConv2dBackward", Napi::Function::New(env, entry<NhwcConv2dBackward, false>, "nhwcConv2dBackward"));
  exports.Set("nhwcConvTranspose2d", Napi::Function::New(env, entry<NhwcConvTranspose2d, false>, "nhwcConvTranspose2d"));
  exports.Set("nhwcConvTranspose2dBackward",
              Napi::Function::New(env, entry<NhwcConvTranspose2dBackward, false>, "nhwcConvTranspose2dBackward"));
  exports.Set("decoderStage", Napi::Function::New(env, entry<DecoderStageFn, false>, "decoderStage"));
  Napi::Function ws_class = DecoderWorkspace::Define(env);
  env.SetInstanceData(new Napi::FunctionReference(Napi::Persistent(ws_class)));  // per-environment, freed with it
  exports.Set("DecoderWorkspace", ws_class);
  exports.Set("imageNll", Napi::Function::New(env, entry<ImageNllFn, false>, "imageNll"));
  exports.Set("slotAttention", Napi::Function::New(env, entry<SlotAttentionFn, false>, "slotAttention"));
  exports.Set("gruCell", Napi::Function::New(env, entry<GruCellFn, false>, "gruCell"));
  exports.Set("convStack", Napi::Function::New(env, entry<ConvStackFn, false>, "convStack"));
  exports.Set("encoderStage", Napi::Function::New(env, entry<EncoderStageFn, false>, "encoderStage"));
  exports.Set("encoderHead", Napi::Function::New(env, entry<EncoderHeadFn, false>, "encoderHead"));
  exports.Set("encoderHeadBackward", Napi::Function::New(env, entry<EncoderHeadBackwardFn, false>, "encoderHeadBackward"));
  exports.Set("encoderStageBackward", Napi::Function::New(env, entry<EncoderStageBackwardFn, false>, "encoderStageBackward"));
  exports.Set("encoderAttention", Napi::Function::New(env, entry<EncoderAttentionFn, false>, "encoderAttention"));
  exports.Set("encoderAttentionBackward", Napi::Function::New(env, entry<EncoderAttentionBackwardFn, false>, "encoderAttentionBackward"));
  exports.Set("convStackBackward", Napi::Function::New(env, entry<ConvStackBackwardFn, false>, "convStackBackward"));
  exports.Set("gruCellBackward", Napi::Function::New(env, entry<GruCellBackwardFn, false>, "gruCellBackward"));
  exports.Set("layerNorm", Napi::Function::New(env, entry<LayerNormFn, false>, "layerNorm"));
  exports.Set("layerNormBackward", Napi::Function::New(env, entry<LayerNormBackwardFn, false>, "layerNormBackward"));
  exports.Set("softplusStd", Napi::Function::New(env, entry<SoftplusStdFn, false>, "softplusStd"));
  exports.Set("softplusStdBackward", Napi::Function::New(env, entry<SoftplusStdBackwardFn, false>, "softplusStdBackward"));
  exports.Set("klDiag", Napi::Function::New(env, entry<KlDiagFn, false>, "klDiag"));
  exports.Set("klDiagBackward", Napi::Function::New(env, entry<KlDiagBackwardFn, false>, "klDiagBackward"));
  exports.Set("slotAttentionBackward", Napi::Function::New(env, entry<SlotAttentionBackwardFn, false>, "slotAttentionBackward"));
  exports.Set("adamUpdate", Napi::Function::New(env, entry<AdamUpdateFn, false>, "adamUpdate"));
  exports.Set("l2Norm", Napi::Function::New(env, entry<L2NormFn, false>, "l2Norm"));
  exports.Set("peakGflops", Napi::Function::New(env, entry<PeakGflops, false>, "peakGflops"));
  exports.Set("gpuPeakGflops", Napi::Function::New(env, entry<GpuPeakGflops, false>, "gpuPeakGflops"));
  exports.Set("reference", ref);
  exports.Set("info", Napi::Function::New(env, Info, "info"));
  exports.Set("abiVersion", Napi::Number::New(env, 1));
  emorl::register_nccl(env, exports);
  return exports;
}

}  // namespace

NODE_API_MODULE(emorl_native, Init)
