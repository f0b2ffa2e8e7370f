// Host-side argument handling of dwconv_ln shared by the CPU and CUDA entry points.
//
// Kernels see: x channels-last dense (B, H, W, C) in its own dtype (or, where the caller asks for it with
// keep_nchw, a contiguous (B, C, H, W) x as it is: the CPU forward reads it without a copy), the taps as float32 (9, C)
// (tap t = 3*ky + kx, channels contiguous, so a vector of channels loads one tap at once) and the
// bias as float32 (C,). Outputs (y, dx) are allocated channels-last.
#pragma once
#include <ATen/ATen.h>

#include "layout.h"

namespace wf {

struct DwArgs {
  at::Tensor x;     // (B, C, H, W), channels-last strides, dense; contiguous when nchw
  at::Tensor taps;  // (9, C) float32
  at::Tensor bias;  // (C,) float32
  int64_t B, C, H, W;
  bool nchw = false;  // x is contiguous (B, C, H, W), not channels-last
};

inline DwArgs dw_args(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& bias, const char* op,
                      bool keep_nchw = false) {
  TORCH_CHECK(x.dim() == 4, op, ": expected a 4-d (B, C, H, W) tensor, got ", x.dim(), " dims");
  check_float_dtype(x, op);
  const int64_t C = x.size(1);
  TORCH_CHECK(weight.dim() == 4 && weight.size(0) == C && weight.size(1) == 1 && weight.size(2) == 3 &&
                  weight.size(3) == 3,
              op, ": weight must be a depthwise 3x3 kernel of shape (", C, ", 1, 3, 3), got ", weight.sizes(),
              " (other kernel sizes and grouped inputs run on the torch backend)");
  TORCH_CHECK(bias.dim() == 1 && bias.size(0) == C, op, ": bias must have shape (", C, "), got ", bias.sizes());
  TORCH_CHECK(weight.device() == x.device() && bias.device() == x.device(), op,
              ": x, weight and bias must be on one device");
  DwArgs a;
  a.nchw = keep_nchw && x.is_contiguous() && !x.is_contiguous(at::MemoryFormat::ChannelsLast);
  a.x = a.nchw ? x : x.contiguous(at::MemoryFormat::ChannelsLast);
  a.taps = weight.reshape({C, 9}).t().to(at::kFloat).contiguous();
  a.bias = bias.to(at::kFloat).contiguous();
  a.B = x.size(0);
  a.C = C;
  a.H = x.size(2);
  a.W = x.size(3);
  return a;
}

inline at::Tensor empty_channels_last(const at::Tensor& like) {
  return at::empty(like.sizes(), like.options().memory_format(at::MemoryFormat::ChannelsLast));
}

}  // namespace wf
