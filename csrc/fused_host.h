// Host-side argument handling shared by the CPU and CUDA entry points of the fused ops.
#pragma once
#include <ATen/ATen.h>

#include <cmath>
#include <string>

#include "fused_common.h"
#include "layout.h"

namespace wf {

inline int head_index(const std::string& head) {
  if (head == "eps") return 0;
  if (head == "stage_c") return 1;
  if (head == "stage_b") return 2;
  TORCH_CHECK(false, "ddpm_step: unknown model head '", head, "'; expected eps, stage_c or stage_b");
  return -1;
}

// The schedule constants rounded to float32 as schedule._constants does.
inline Schedule make_schedule(double s, double scaler) {
  const float s32 = float(s), ops = 1.f + s32;
  const float c = std::cos(float(double(s32 / ops) * M_PI * 0.5));
  const float init = c * c;
  return {s32, ops, 1.f / init, float(scaler), scaler == 1.0 ? 0 : (scaler > 1.0 ? 1 : 2)};
}

// (B, C) per-(batch, channel) parameters as contiguous float32.
inline at::Tensor bc_float(const at::Tensor& a, int64_t B, int64_t C, const char* what) {
  TORCH_CHECK(a.dim() == 2 && a.size(0) == B && a.size(1) == C, what, " must have shape (", B, ", ", C, "), got ",
              a.sizes());
  return a.to(at::kFloat).contiguous();
}

// A (B, H, W, C) GRN operand as a contiguous tensor (a view when it already is).
inline at::Tensor rows4(const at::Tensor& x, const char* op) {
  TORCH_CHECK(x.dim() == 4, op, ": expected a 4-d (B, H, W, C) tensor, got ", x.dim(), " dims");
  check_float_dtype(x, op);
  return x.contiguous();
}

}  // namespace wf
