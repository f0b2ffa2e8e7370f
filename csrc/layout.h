// Memory-layout helpers shared by the CPU and CUDA kernels of the 2-d (B, C, H, W) ops.
#pragma once
#include <ATen/ATen.h>

namespace wf {

// The two dense layouts the kernels index directly. Anything else is copied to NCHW first.
enum class Layout { NCHW, NHWC };

struct Dense {
  at::Tensor t;
  Layout layout;
};

// x itself when it is contiguous or channels-last, else a contiguous copy. A tensor that is both
// (C == 1, or H == W == 1) is treated as NCHW; the kernels index it correctly either way.
inline Dense as_dense(const at::Tensor& x) {
  TORCH_CHECK(x.dim() == 4, "expected a 4-d (B, C, H, W) tensor, got ", x.dim(), " dims");
  if (x.is_contiguous()) return {x, Layout::NCHW};
  if (x.is_contiguous(at::MemoryFormat::ChannelsLast)) return {x, Layout::NHWC};
  return {x.contiguous(), Layout::NCHW};
}

// `y` in the given layout (a copy only when it differs).
inline at::Tensor in_layout(const at::Tensor& y, Layout layout) {
  return layout == Layout::NCHW ? y.contiguous() : y.contiguous(at::MemoryFormat::ChannelsLast);
}

inline at::Tensor empty_in_layout(const at::Tensor& like, Layout layout) {
  return at::empty_like(like, layout == Layout::NCHW ? at::MemoryFormat::Contiguous
                                                     : at::MemoryFormat::ChannelsLast);
}

inline void check_float_dtype(const at::Tensor& x, const char* op) {
  auto dt = x.scalar_type();
  TORCH_CHECK(dt == at::kFloat || dt == at::kBFloat16 || dt == at::kHalf, op,
              ": supports float32, bfloat16 and float16, got ", dt);
}

// `other` (a gradient) checked against x's shape and dtype, in the given layout.
inline at::Tensor like_x(const at::Tensor& other, const at::Tensor& x, Layout layout, const char* op,
                         const char* name) {
  TORCH_CHECK(other.sizes() == x.sizes() && other.scalar_type() == x.scalar_type(), op, ": ", name,
              " must match x in shape and dtype; got ", other.sizes(), " ", other.scalar_type(), ", x is ",
              x.sizes(), " ", x.scalar_type());
  return in_layout(other, layout);
}

}  // namespace wf
