// Host-side argument handling of Stage A's mixing-block ops (norm_mod, mixing_dwconv) shared by the
// CPU and CUDA entry points, so both backends accept and reject the same inputs with the same
// messages. Device independent: the float32 parameter copies are made on the activation's device
// (the CPU kernels read the 0-d ones with .item(), the CUDA kernels from device memory, no sync).
#pragma once
#include <ATen/ATen.h>

#include "layout.h"

namespace wf {

// A 0-d (one-element) modulation parameter (norm_mod's scale / shift, mixing_dwconv's gamma) as a
// float32 (1,) tensor on `device`.
inline at::Tensor scalar_param(const at::Tensor& t, const at::Device& device, const char* op, const char* name) {
  TORCH_CHECK(t.numel() == 1, op, ": ", name, " must be a 0-d tensor (one value), got shape ", t.sizes());
  return t.reshape({1}).to(device, at::kFloat);
}

// mixing_dwconv's operands: xn dense (csrc/layout.h: contiguous or channels-last as it is, else a
// contiguous copy), the 3x3 depthwise weight as float32 (C, 9) rows (tap 3*ky + kx), bias float32 (C),
// gamma float32 (1,), all on xn's device.
struct MixDwArgs {
  Dense d;
  int64_t B, C, H, W;
  at::Tensor w, bias, gamma;
};

inline MixDwArgs mix_dw_args(const at::Tensor& xn_in, const at::Tensor& weight, const at::Tensor& bias,
                             const at::Tensor& gamma, const char* op) {
  check_float_dtype(xn_in, op);
  MixDwArgs a{as_dense(xn_in), 0, 0, 0, 0, {}, {}, {}};
  const at::Tensor& xn = a.d.t;
  a.B = xn.size(0), a.C = xn.size(1), a.H = xn.size(2), a.W = xn.size(3);
  TORCH_CHECK(weight.dim() == 4 && weight.size(0) == a.C && weight.size(1) == 1 && weight.size(2) == 3 &&
                  weight.size(3) == 3,
              op, ": weight must have shape (", a.C, ", 1, 3, 3), got ", weight.sizes());
  TORCH_CHECK(bias.numel() == a.C, op, ": bias needs ", a.C, " elements, got ", bias.numel());
  TORCH_CHECK(weight.device() == xn.device() && bias.device() == xn.device(), op,
              ": xn, weight and bias must be on one device, got ", xn.device(), ", ", weight.device(), ", ",
              bias.device());
  a.w = weight.reshape({a.C, 9}).to(at::kFloat).contiguous();
  a.bias = bias.reshape({a.C}).to(at::kFloat).contiguous();
  a.gamma = scalar_param(gamma, xn.device(), op, "gamma");
  return a;
}

// mixing_dwconv's residual x: xn's shape and dtype (xn as given, before any layout copy).
inline void check_mix_residual(const at::Tensor& x, const at::Tensor& xn, const char* op) {
  TORCH_CHECK(x.sizes() == xn.sizes() && x.scalar_type() == xn.scalar_type(), op,
              ": x and xn must have one shape and dtype; got ", x.sizes(), " ", x.scalar_type(), " and ",
              xn.sizes(), " ", xn.scalar_type());
  TORCH_CHECK(x.device() == xn.device(), op, ": x and xn must be on one device, got ", x.device(), " and ",
              xn.device());
}

// The layout of mixing_dwconv's output: x's own when it is channels-last only, else NCHW (layout.h's
// rule, without as_dense's copy).
inline Layout mix_out_layout(const at::Tensor& x) {
  return !x.is_contiguous() && x.is_contiguous(at::MemoryFormat::ChannelsLast) ? Layout::NHWC : Layout::NCHW;
}

}  // namespace wf
