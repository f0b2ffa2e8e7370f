// layer_norm_2d and Stage A's norm_mod on the CPU: LayerNorm over the channels of a (B, C, H, W)
// tensor, no affine; norm_mod then applies a scalar modulation, y = LN(x)·A + t with A = 1 + s
// (s, t 0-d tensors; layer_norm_2d is A = 1, t = 0, which the arithmetic below leaves bit-exact).
//
// Math (per pixel, over its C values; k = the pixel's first channel, a shift that keeps the
// one-pass variance accurate when |mean| >> std):
//   s1 = Σ (x - k),  s2 = Σ (x - k)^2,  mean = k + s1/C,  var = s2/C - (s1/C)^2,
//   rstd = 1/sqrt(var + eps),  y = (x - mean) * rstd
// Backward (recomputes mean and rstd from x; nothing is saved by the forward):
//   xhat = (x - mean) * rstd
//   dx   = rstd * (dy - mean(dy) - xhat * mean(dy * xhat)),
//   mean(dy * xhat) = rstd * (Σ dy (x - k) - (s1/C) Σ dy) / C
// norm_mod backward: the same with dy -> A·g (A applied to the float64 sums and to the
// coefficient of g), plus ds = Σ_pixels rstd (Σ g (x - k) - (s1/C) Σ g) = Σ g·xhat and dt = Σ g,
// per pixel in float64, summed over the pixels in a fixed order (deterministic).
// Layouts: NCHW (pixels of a channel contiguous: the loops run over a tile of TILE pixels so the
// innermost loop is contiguous and vectorises) and NHWC (a pixel's channels contiguous: one row
// per pixel). Other strides are copied to NCHW. Sums accumulate in float64 (a sequential float32
// sum over C = 1280 channels is ~50x less accurate than torch's own LayerNorm; the loop is memory
// bound, so the wider accumulator costs little), per-element math is float32.
// Parallel over (batch, pixel tile) with at::parallel_for.
#include "isa.h"  // first: the instruction set of this file

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>

#include "../mixing_host.h"

namespace wf {
namespace {

constexpr int64_t TILE = 256;  // pixels per task in NCHW: 4 float rows of 1 KiB stay in L1

using acc_t = double;

struct Stats {
  float mean_s, rstd;  // mean of (x - k), 1/std
};

inline Stats finish(acc_t s1, acc_t s2, int64_t C, float eps) {
  const acc_t m = s1 / C;
  const acc_t var = std::max(s2 / C - m * m, acc_t(0));
  return {float(m), float(1.0 / std::sqrt(var + eps))};
}

// dx = a*dy + b*x + c per pixel, from the shifted sums of x, x^2, dy and dy*x.
struct Coef {
  float a, b, c;
};

// The scalar modulation y = LN(x)·a + b of norm_mod; {1, 0} for layer_norm_2d.
struct Affine {
  float a = 1.f, b = 0.f;
};

// Per-pixel outputs of norm_mod's backward (nullptr for layer_norm_2d): Σ_c g·xhat and Σ_c g.
struct PixelSums {
  acc_t* ds = nullptr;
  acc_t* dt = nullptr;
};

// g1 = Σ g, g2 = Σ g (x - k) of the raw incoming gradient; the LayerNorm sees dy = A·g.
inline Coef bwd_coef(acc_t s1, acc_t s2, acc_t g1, acc_t g2, float k, int64_t C, float eps, float A,
                     const PixelSums& ps, int64_t pix) {
  const acc_t m = s1 / C, var = std::max(s2 / C - m * m, acc_t(0)), rstd = 1.0 / std::sqrt(var + eps);
  if (ps.ds) {
    ps.ds[pix] = rstd * (g2 - m * g1);
    ps.dt[pix] = g1;
  }
  g1 *= A;
  g2 *= A;
  const acc_t mdyx = rstd * (g2 - m * g1) / C;  // mean(dy * xhat)
  const acc_t b = -rstd * rstd * mdyx;
  return {float(rstd * A), float(b), float(-rstd * (g1 / C) - b * (k + m))};
}

// ---------------------------------------------------------------- NCHW: tiles of pixels
template <typename T>
void fwd_nchw(const T* x, T* y, int64_t B, int64_t C, int64_t HW, float eps, Affine af) {
  const int64_t tiles = (HW + TILE - 1) / TILE;
  at::parallel_for(0, B * tiles, 1, [&](int64_t begin, int64_t end) {
    float k[TILE], a[TILE];
    acc_t s1[TILE], s2[TILE];
    for (int64_t task = begin; task < end; ++task) {
      const int64_t b = task / tiles, p0 = (task % tiles) * TILE, n = std::min(TILE, HW - p0);
      const T* xb = x + b * C * HW + p0;
      T* yb = y + b * C * HW + p0;
      for (int64_t i = 0; i < n; ++i) { k[i] = float(xb[i]); s1[i] = 0; s2[i] = 0; }
      for (int64_t c = 0; c < C; ++c) {
        const T* row = xb + c * HW;
        for (int64_t i = 0; i < n; ++i) {
          const acc_t v = float(row[i]) - k[i];
          s1[i] += v;
          s2[i] += v * v;
        }
      }
      for (int64_t i = 0; i < n; ++i) {  // y = a*x + k with a = rstd·A, k <- -mean*rstd·A + t
        const Stats st = finish(s1[i], s2[i], C, eps);
        a[i] = st.rstd * af.a;
        k[i] = -(k[i] + st.mean_s) * a[i] + af.b;
      }
      for (int64_t c = 0; c < C; ++c) {
        const T* row = xb + c * HW;
        T* out = yb + c * HW;
        for (int64_t i = 0; i < n; ++i) out[i] = T(a[i] * float(row[i]) + k[i]);
      }
    }
  });
}

template <typename T>
void bwd_nchw(const T* dy, const T* x, T* dx, int64_t B, int64_t C, int64_t HW, float eps, float A, PixelSums ps) {
  const int64_t tiles = (HW + TILE - 1) / TILE;
  at::parallel_for(0, B * tiles, 1, [&](int64_t begin, int64_t end) {
    float k[TILE], ca[TILE], cb[TILE], cc[TILE];
    acc_t s1[TILE], s2[TILE], g1[TILE], g2[TILE];
    for (int64_t task = begin; task < end; ++task) {
      const int64_t b = task / tiles, p0 = (task % tiles) * TILE, n = std::min(TILE, HW - p0);
      const int64_t off = b * C * HW + p0;
      const T *xb = x + off, *gb = dy + off;
      T* ob = dx + off;
      for (int64_t i = 0; i < n; ++i) { k[i] = float(xb[i]); s1[i] = s2[i] = g1[i] = g2[i] = 0; }
      for (int64_t c = 0; c < C; ++c) {
        const T *xr = xb + c * HW, *gr = gb + c * HW;
        for (int64_t i = 0; i < n; ++i) {
          const acc_t v = float(xr[i]) - k[i], g = float(gr[i]);
          s1[i] += v;
          s2[i] += v * v;
          g1[i] += g;
          g2[i] += g * v;
        }
      }
      // Per pixel: dx = a*dy + b*x + c0 with a = rstd, b = -rstd^2*mean(dy xhat), c0 folds the rest.
      for (int64_t i = 0; i < n; ++i) {
        const Coef q = bwd_coef(s1[i], s2[i], g1[i], g2[i], k[i], C, eps, A, ps, b * HW + p0 + i);
        ca[i] = q.a;
        cb[i] = q.b;
        cc[i] = q.c;
      }
      for (int64_t c = 0; c < C; ++c) {
        const T *xr = xb + c * HW, *gr = gb + c * HW;
        T* out = ob + c * HW;
        for (int64_t i = 0; i < n; ++i) out[i] = T(ca[i] * float(gr[i]) + cb[i] * float(xr[i]) + cc[i]);
      }
    }
  });
}

// ---------------------------------------------------------------- NHWC: one row per pixel
template <typename T>
void fwd_nhwc(const T* x, T* y, int64_t P, int64_t C, float eps, Affine af) {
  at::parallel_for(0, P, std::max<int64_t>(1, 16384 / C), [&](int64_t begin, int64_t end) {
    for (int64_t p = begin; p < end; ++p) {
      const T* row = x + p * C;
      T* out = y + p * C;
      const float k = float(row[0]);
      acc_t s1 = 0, s2 = 0;
      for (int64_t c = 0; c < C; ++c) {
        const acc_t v = float(row[c]) - k;
        s1 += v;
        s2 += v * v;
      }
      const Stats st = finish(s1, s2, C, eps);
      const float mean = k + st.mean_s, ra = st.rstd * af.a;
      for (int64_t c = 0; c < C; ++c) out[c] = T((float(row[c]) - mean) * ra + af.b);
    }
  });
}

template <typename T>
void bwd_nhwc(const T* dy, const T* x, T* dx, int64_t P, int64_t C, float eps, float A, PixelSums ps) {
  at::parallel_for(0, P, std::max<int64_t>(1, 16384 / C), [&](int64_t begin, int64_t end) {
    for (int64_t p = begin; p < end; ++p) {
      const T *xr = x + p * C, *gr = dy + p * C;
      T* out = dx + p * C;
      const float k = float(xr[0]);
      acc_t s1 = 0, s2 = 0, g1 = 0, g2 = 0;
      for (int64_t c = 0; c < C; ++c) {
        const acc_t v = float(xr[c]) - k, g = float(gr[c]);
        s1 += v;
        s2 += v * v;
        g1 += g;
        g2 += g * v;
      }
      const Coef q = bwd_coef(s1, s2, g1, g2, k, C, eps, A, ps, p);
      for (int64_t c = 0; c < C; ++c) out[c] = T(q.a * float(gr[c]) + q.b * float(xr[c]) + q.c);
    }
  });
}

// y = LN(x)·af.a + af.b in x's layout (a copy to NCHW for any other strides).
at::Tensor forward(const at::Tensor& x_in, double eps, Affine af, const char* op) {
  check_float_dtype(x_in, op);
  const Dense d = as_dense(x_in);
  const at::Tensor& x = d.t;
  at::Tensor y = empty_in_layout(x, d.layout);
  const int64_t B = x.size(0), C = x.size(1), HW = x.size(2) * x.size(3);
  if (x.numel() == 0) return y;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "layer_norm_2d_cpu", [&] {
    if (d.layout == Layout::NCHW)
      fwd_nchw<scalar_t>(x.const_data_ptr<scalar_t>(), y.mutable_data_ptr<scalar_t>(), B, C, HW, float(eps), af);
    else
      fwd_nhwc<scalar_t>(x.const_data_ptr<scalar_t>(), y.mutable_data_ptr<scalar_t>(), B * HW, C, float(eps), af);
  });
  return y;
}

// dx of forward with the incoming gradient scaled by A; fills ps per pixel when asked.
at::Tensor backward(const at::Tensor& grad, const at::Tensor& x_in, double eps, float A, PixelSums ps,
                    const Dense& d, const char* op) {
  const at::Tensor& x = d.t;
  const at::Tensor g = like_x(grad, x, d.layout, op, "grad");
  at::Tensor dx = empty_in_layout(x, d.layout);
  const int64_t B = x.size(0), C = x.size(1), HW = x.size(2) * x.size(3);
  if (x.numel() == 0) return dx;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "layer_norm_2d_backward_cpu", [&] {
    const scalar_t *gp = g.const_data_ptr<scalar_t>(), *xp = x.const_data_ptr<scalar_t>();
    scalar_t* op_ = dx.mutable_data_ptr<scalar_t>();
    if (d.layout == Layout::NCHW)
      bwd_nchw<scalar_t>(gp, xp, op_, B, C, HW, float(eps), A, ps);
    else
      bwd_nhwc<scalar_t>(gp, xp, op_, B * HW, C, float(eps), A, ps);
  });
  return dx;
}

at::Tensor layer_norm_2d_cpu(const at::Tensor& x_in, double eps) {
  return forward(x_in, eps, Affine{}, "layer_norm_2d");
}

at::Tensor layer_norm_2d_backward_cpu(const at::Tensor& grad, const at::Tensor& x_in, double eps) {
  check_float_dtype(x_in, "layer_norm_2d_backward");
  return backward(grad, x_in, eps, 1.f, PixelSums{}, as_dense(x_in), "layer_norm_2d_backward");
}

// A 0-d (one-element) modulation parameter as float (checked by csrc/mixing_host.h).
float scalar_value(const at::Tensor& t, const char* op, const char* name) {
  return scalar_param(t, t.device(), op, name).item<float>();
}

at::Tensor norm_mod_cpu(const at::Tensor& x, const at::Tensor& scale, const at::Tensor& shift, double eps) {
  const float s = scalar_value(scale, "norm_mod", "scale"), t = scalar_value(shift, "norm_mod", "shift");
  return forward(x, eps, Affine{1.f + s, t}, "norm_mod");
}

// (dx, ds, dt); ds, dt 0-d in scale's dtype, reduced in float64.
std::tuple<at::Tensor, at::Tensor, at::Tensor> norm_mod_backward_cpu(const at::Tensor& grad, const at::Tensor& x_in,
                                                                     const at::Tensor& scale, double eps) {
  check_float_dtype(x_in, "norm_mod_backward");
  const float A = 1.f + scalar_value(scale, "norm_mod_backward", "scale");
  const Dense d = as_dense(x_in);
  const int64_t pixels = d.t.size(0) * d.t.size(2) * d.t.size(3);
  at::Tensor sums = at::zeros({2, pixels}, x_in.options().dtype(at::kDouble));
  acc_t* sp = sums.mutable_data_ptr<acc_t>();
  at::Tensor dx = backward(grad, x_in, eps, A, PixelSums{sp, sp + pixels}, d, "norm_mod_backward");
  acc_t ds = 0, dt = 0;
  for (int64_t p = 0; p < pixels; ++p) {
    ds += sp[p];
    dt += sp[pixels + p];
  }
  const auto opt = scale.options();
  return {dx, at::scalar_tensor(ds, opt.dtype(at::kDouble)).to(scale.scalar_type()),
          at::scalar_tensor(dt, opt.dtype(at::kDouble)).to(scale.scalar_type())};
}

}  // namespace
}  // namespace wf

TORCH_LIBRARY_IMPL(wuerstchen_fast_C, CPU, m) {
  m.impl("layer_norm_2d", &wf::layer_norm_2d_cpu);
  m.impl("layer_norm_2d_backward", &wf::layer_norm_2d_backward_cpu);
  m.impl("norm_mod", &wf::norm_mod_cpu);
  m.impl("norm_mod_backward", &wf::norm_mod_backward_cpu);
}
