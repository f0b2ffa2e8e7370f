// Shared helpers of the fused elementwise / reduction kernels (CPU and CUDA): exact-erf GELU, the
// Würstchen cosine schedule ᾱ(t) and the DDPM model heads, written once for host and device.
#pragma once
#include <cmath>

#if defined(__CUDACC__)
#define WF_HD __host__ __device__ __forceinline__
#else
#define WF_HD inline
#endif

namespace wf {

constexpr float kSqrt1_2 = 0.70710678118654752f;
constexpr float kInvSqrt2Pi = 0.39894228040143268f;
constexpr double kGrnEps = 1e-6;

WF_HD float gelu(float x) { return 0.5f * x * (1.f + erff(x * kSqrt1_2)); }
WF_HD float gelu_grad(float x) {
  return 0.5f * (1.f + erff(x * kSqrt1_2)) + x * kInvSqrt2Pi * expf(-0.5f * x * x);
}

// ᾱ(t) as schedule.alpha_cumprod, float32. mode 0: no warp, 1: t = 1 - (1-t)^k, 2: t = t^k.
struct Schedule {
  float s, one_plus_s, inv_init, scaler;
  int mode;
};

// R = float on the device; the CPU computes its per-batch coefficients once, in double.
template <typename R>
WF_HD R alpha_cumprod(R t, const Schedule& q) {
  if (q.mode == 1) t = R(1) - pow(R(1) - t, R(q.scaler));
  else if (q.mode == 2) t = pow(t, R(q.scaler));
  const R c = cos((t + R(q.s)) / R(q.one_plus_s) * R(1.5707963267948966));
  return fmin(fmax(c * c * R(q.inv_init), R(1e-4)), R(0.9999));
}

// Per-batch step coefficients: y = k0*(x - k1*eps) + k2*z (the reference's order of operations).
struct StepCoef {
  float k0, k1, k2;
};

template <typename R>
WF_HD StepCoef step_coef(R t, R tp, const Schedule& q) {
  const R a_t = alpha_cumprod<R>(t, q), a_p = alpha_cumprod<R>(tp, q);
  const R alpha = a_t / a_p;
  const R r = sqrt(R(1) / alpha);
  const R std = sqrt((R(1) - alpha) * (R(1) - a_p) / (R(1) - a_t));
  return {float(r), float((R(1) - alpha) / sqrt(R(1) - a_t)), tp != R(0) ? float(std) : 0.f};
}

// head 0: eps = a; 1 (Stage C): (x - a) / (|1 - b| + 1e-5); 2 (Stage B): (x - a) / (sigmoid(b)(1 - 2e-3) + 1e-3)
WF_HD float head_eps(int head, float x, float a, float b) {
  if (head == 0) return a;
  const float den = head == 1 ? fabsf(1.f - b) + 1e-5f : (1.f / (1.f + expf(-b))) * (1.f - 2e-3f) + 1e-3f;
  return (x - a) / den;
}

}  // namespace wf
