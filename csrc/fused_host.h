// Host-side argument handling shared by the CPU and CUDA entry points of the fused ops: every check
// and every preparation (layout, parameter casts, schedule) is written once here, so the two
// backends accept and reject exactly the same inputs with the same messages. Device independent:
// tensors are created on (or moved to) x's device.
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

// ------------------------------------------------------------------------------------ modulate
// x (B, C, H, W) dense, A = 1 + a and Bv = b as (B, C) float32, the output allocated in x's layout.
struct ModulateArgs {
  Dense d;
  int64_t B, C, HW;
  at::Tensor A, Bv;
};

inline ModulateArgs modulate_args(const at::Tensor& x_in, const at::Tensor& a, const at::Tensor* b, const char* op) {
  check_float_dtype(x_in, op);
  ModulateArgs r{as_dense(x_in), 0, 0, 0, {}, {}};
  const at::Tensor& x = r.d.t;
  r.B = x.size(0), r.C = x.size(1), r.HW = x.size(2) * x.size(3);
  const std::string what = std::string(op) + ": ";
  r.A = bc_float(a, r.B, r.C, (what + "a").c_str()).add(1.0);
  if (b) r.Bv = bc_float(*b, r.B, r.C, (what + "b").c_str());
  return r;
}

// ------------------------------------------------------------------------------------ ddpm_step
// x dense, model output and noise in x's dtype and layout, t / t_prev as float32 on x's device.
struct DdpmArgs {
  Dense d;
  int head;
  bool cfg;
  int64_t B, C, HW, Co;
  at::Tensor o, z, t, tp;
  Schedule q;
};

inline DdpmArgs ddpm_args(const at::Tensor& x_in, const at::Tensor& model_out, const at::Tensor& t,
                          const at::Tensor& t_prev, const at::Tensor& noise, c10::string_view head_s, double s,
                          double scaler) {
  check_float_dtype(x_in, "ddpm_step");
  DdpmArgs r{as_dense(x_in), head_index(std::string(head_s)), false, 0, 0, 0, 0, {}, {}, {}, {}, {}};
  const at::Tensor& x = r.d.t;
  const int64_t B = x.size(0), C = x.size(1);
  r.B = B, r.C = C, r.HW = x.size(2) * x.size(3), r.Co = r.head == 0 ? C : 2 * C;
  TORCH_CHECK(model_out.dim() == 4 && (model_out.size(0) == B || model_out.size(0) == 2 * B) &&
                  model_out.size(1) == r.Co && model_out.size(2) == x.size(2) && model_out.size(3) == x.size(3),
              "ddpm_step: model_out has shape ", model_out.sizes(), ", expected (", B, " or ", 2 * B, ", ", r.Co,
              ", H, W)");
  TORCH_CHECK(noise.sizes() == x.sizes(), "ddpm_step: noise must have x's shape ", x.sizes(), ", got ",
              noise.sizes());
  TORCH_CHECK(t.numel() == 1 || t.numel() == B, "ddpm_step: t needs 1 or B values, got ", t.numel());
  TORCH_CHECK(t_prev.numel() == 1 || t_prev.numel() == B, "ddpm_step: t_prev needs 1 or B values, got ",
              t_prev.numel());
  r.cfg = model_out.size(0) == 2 * B;
  r.o = in_layout(model_out.to(x.scalar_type()), r.d.layout);
  r.z = in_layout(noise.to(x.scalar_type()), r.d.layout);
  r.t = t.reshape(-1).to(x.device(), at::kFloat).contiguous();
  r.tp = t_prev.reshape(-1).to(x.device(), at::kFloat).contiguous();
  r.q = make_schedule(s, scaler);
  return r;
}

// ------------------------------------------------------------------------------------ GRN
// dy of grn_colsum (optional) / grn_apply_backward: x's shape and dtype, contiguous.
inline at::Tensor grn_dy(const at::Tensor& dy, const at::Tensor& x, const char* op) {
  TORCH_CHECK(dy.sizes() == x.sizes() && dy.scalar_type() == x.scalar_type(), op, ": dy must match x in shape and dtype",
              "; got ", dy.sizes(), " ", dy.scalar_type(), ", x is ", x.sizes(), " ", x.scalar_type());
  return dy.contiguous();
}

// grn_apply's beta as C contiguous float32 values (undefined when absent).
inline at::Tensor grn_beta(const c10::optional<at::Tensor>& beta, int64_t C) {
  if (!beta.has_value()) return {};
  at::Tensor bt = beta->reshape(-1).to(at::kFloat).contiguous();
  TORCH_CHECK(bt.numel() == C, "grn_apply: beta needs ", C, " elements, got ", bt.numel());
  return bt;
}

}  // namespace wf
