// dwconv_ln on the CPU: depthwise 3x3 conv (zero padding 1) + bias, then LayerNorm over channels
// (no affine), the first half of the ConvNeXt ResBlocks of Stage C and Stage B.
//
// Math, per pixel p with channels c (taps t = (ky, kx), n(p, t) = the neighbour (y + ky - 1, x + kx - 1)):
//   d[p, c] = bias[c] + Σ_t w[c, t] x[n(p, t), c]        (zero outside the image)
//   mean, var over c of d[p, :];  rstd = 1/sqrt(var + eps);  y = (d - mean) * rstd
// Backward (recomputes d, mean and rstd from x: nothing but x is saved; xh = (d - mean) * rstd):
//   dd[p, c] = rstd (g - mean_c(g) - xh mean_c(g xh))              (LayerNorm backward, evaluated
//            = rstd g - rstd² mean_c(g xh) (d - mean) - rstd mean_c(g)   as this, with fused multiply-adds)
//   dbias[c] = Σ_p dd[p, c];  dw[c, t] = Σ_p dd[p, c] x[n(p, t), c]
//   dx[q, c] = Σ_t w[c, t] dd[q - (ky - 1, kx - 1), c]            (the conv's transpose, a second pass)
// Layout: x is read channels-last (B, H, W, C) (other layouts are copied to it first), so a pixel's
// channels are contiguous and every inner loop runs over channels with at::vec::Vectorized<float>;
// y, dx are channels-last. Accumulation float32: the conv per pixel in a row buffer of C floats
// (stays in L1), mean and variance two-pass over that buffer (float32 vector partials summed in
// double). dw, dbias: float32 sums per image row, float64 across rows and threads.
// Parallel over image rows (b, y) with at::parallel_for. Limits: 3x3 depthwise (one input per group).
#include "isa.h"  // first: the CPU instruction set of this build

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <vector>

#include "../dwconv_host.h"
#include "vec_io.h"

namespace wf {
namespace {

struct Geo {
  int64_t B, C, H, W;
};

// d[0:C] = bias + Σ_t taps[t] ⊙ x[n(p, t)] for pixel (b, y, x0), float32.
template <typename T>
inline void conv_pixel(const T* x, const float* taps, const float* bias, float* d, const Geo& g, int64_t b, int64_t y,
                       int64_t x0) {
  const int64_t C = g.C;
  std::memcpy(d, bias, C * sizeof(float));
  for (int64_t ky = 0; ky < 3; ++ky) {
    const int64_t yy = y + ky - 1;
    if (yy < 0 || yy >= g.H) continue;
    for (int64_t kx = 0; kx < 3; ++kx) {
      const int64_t xx = x0 + kx - 1;
      if (xx < 0 || xx >= g.W) continue;
      const T* src = x + ((b * g.H + yy) * g.W + xx) * C;
      const float* w = taps + (ky * 3 + kx) * C;
      int64_t c = 0;
      for (; c + VL <= C; c += VL) at::vec::fmadd(ld(src + c), Vec::loadu(w + c), Vec::loadu(d + c)).store(d + c);
      for (; c < C; ++c) d[c] += float(src[c]) * w[c];
    }
  }
}

struct Norm {
  float mean, rstd;
  double mean_d, rstd_d;  // unrounded, for the forward's output
};

// Two-pass mean and variance of d[0:C] (float32 vector partials, summed in double).
inline Norm norm_stats(const float* d, int64_t C, float eps) {
  Vec acc(0.f);
  double s = 0;
  int64_t c = 0;
  for (; c + VL <= C; c += VL) acc = acc + Vec::loadu(d + c);
  for (; c < C; ++c) s += d[c];
  const double mean_d = (s + hsum(acc)) / C;
  const float mean = float(mean_d);
  const Vec vm(mean);
  acc = Vec(0.f);
  s = 0;
  for (c = 0; c + VL <= C; c += VL) {
    const Vec v = Vec::loadu(d + c) - vm;
    acc = at::vec::fmadd(v, v, acc);
  }
  for (; c < C; ++c) s += double(d[c] - mean) * (d[c] - mean);
  const double shift = mean_d - mean;  // Σ(d - m)² = Σ(d - m_f)² - C (m - m_f)²
  const double var = std::max((s + hsum(acc)) / C - shift * shift, 0.0), rstd_d = 1.0 / std::sqrt(var + eps);
  return {mean, float(rstd_d), mean_d, rstd_d};
}

inline int64_t row_grain(const Geo& g) { return std::max<int64_t>(1, 32768 / std::max<int64_t>(1, g.W * g.C)); }

template <typename T>
void forward(const T* x, const float* taps, const float* bias, T* y, const Geo& g, float eps) {
  at::parallel_for(0, g.B * g.H, row_grain(g), [&](int64_t r0, int64_t r1) {
    std::vector<float> buf(g.C);
    float* d = buf.data();
    const int64_t C = g.C;
    for (int64_t r = r0; r < r1; ++r) {
      const int64_t b = r / g.H, yy = r % g.H;
      for (int64_t x0 = 0; x0 < g.W; ++x0) {
        conv_pixel(x, taps, bias, d, g, b, yy, x0);
        const Norm n = norm_stats(d, C, eps);
        T* out = y + (r * g.W + x0) * C;
        // One rounding per value: (d - mean) * rstd in double (the loop auto-vectorises).
        for (int64_t c = 0; c < C; ++c) out[c] = T(float((double(d[c]) - n.mean_d) * n.rstd_d));
      }
    }
  });
}

// Pass 1 of the backward: dd (float32, channels-last rows) and the weight/bias gradient partials.
// part: one (10, C) float64 slot per thread, rows 0..8 dw per tap, row 9 dbias.
template <typename T>
void backward_dd(const T* x, const T* gy, const float* taps, const float* bias, float* dd, double* part,
                 const Geo& g, float eps) {
  const int64_t C = g.C;
  at::parallel_for(0, g.B * g.H, row_grain(g), [&](int64_t r0, int64_t r1) {
    std::vector<float> buf(C), rowacc(10 * C);
    float* d = buf.data();
    double* mine = part + int64_t(at::get_thread_num()) * 10 * C;
    for (int64_t r = r0; r < r1; ++r) {
      const int64_t b = r / g.H, yy = r % g.H;
      std::fill(rowacc.begin(), rowacc.end(), 0.f);
      for (int64_t x0 = 0; x0 < g.W; ++x0) {
        conv_pixel(x, taps, bias, d, g, b, yy, x0);
        const Norm n = norm_stats(d, C, eps);
        const Vec vm(n.mean), vr(n.rstd);
        const T* gp = gy + (r * g.W + x0) * C;
        float* ddp = dd + (r * g.W + x0) * C;
        // Σg and Σg·xh, then dd = rstd (g - Σg/C - xh Σg·xh/C)
        Vec a1(0.f), a2(0.f);
        double s1 = 0, s2 = 0;
        int64_t c = 0;
        for (; c + VL <= C; c += VL) {
          const Vec gv = ld(gp + c), xh = (Vec::loadu(d + c) - vm) * vr;
          a1 = a1 + gv;
          a2 = at::vec::fmadd(gv, xh, a2);
        }
        for (; c < C; ++c) {
          const float gv = float(gp[c]);
          s1 += gv;
          s2 += double(gv) * ((d[c] - n.mean) * n.rstd);
        }
        // dd = rstd g + kd (d - mean) + k0 with kd = -rstd² mean(g xh), k0 = -rstd mean(g): three roundings
        const double mg = (s1 + hsum(a1)) / C, mgx = (s2 + hsum(a2)) / C, rs = n.rstd;
        const float kd = float(-rs * rs * mgx), k0 = float(-rs * mg);
        const Vec vkd(kd), vk0(k0);
        for (c = 0; c + VL <= C; c += VL)
          at::vec::fmadd(vr, ld(gp + c), at::vec::fmadd(vkd, Vec::loadu(d + c) - vm, vk0)).store(ddp + c);
        for (; c < C; ++c) ddp[c] = std::fma(n.rstd, float(gp[c]), std::fma(kd, d[c] - n.mean, k0));
        // dw[t] += dd ⊙ x[n(p, t)],  dbias += dd
        for (int64_t ky = 0; ky < 3; ++ky) {
          const int64_t ys = yy + ky - 1;
          if (ys < 0 || ys >= g.H) continue;
          for (int64_t kx = 0; kx < 3; ++kx) {
            const int64_t xs = x0 + kx - 1;
            if (xs < 0 || xs >= g.W) continue;
            const T* src = x + ((b * g.H + ys) * g.W + xs) * C;
            float* acc = rowacc.data() + (ky * 3 + kx) * C;
            for (c = 0; c + VL <= C; c += VL)
              at::vec::fmadd(Vec::loadu(ddp + c), ld(src + c), Vec::loadu(acc + c)).store(acc + c);
            for (; c < C; ++c) acc[c] += ddp[c] * float(src[c]);
          }
        }
        float* accb = rowacc.data() + 9 * C;
        for (c = 0; c + VL <= C; c += VL) (Vec::loadu(accb + c) + Vec::loadu(ddp + c)).store(accb + c);
        for (; c < C; ++c) accb[c] += ddp[c];
      }
      for (int64_t i = 0; i < 10 * C; ++i) mine[i] += rowacc[i];
    }
  });
}

// Pass 2: dx[q] = Σ_t taps[t] ⊙ dd[q - (ky - 1, kx - 1)].
template <typename T>
void backward_dx(const float* dd, const float* taps, T* dx, const Geo& g) {
  const int64_t C = g.C;
  at::parallel_for(0, g.B * g.H, row_grain(g), [&](int64_t r0, int64_t r1) {
    std::vector<float> buf(C);
    float* acc = buf.data();
    for (int64_t r = r0; r < r1; ++r) {
      const int64_t b = r / g.H, yy = r % g.H;
      for (int64_t x0 = 0; x0 < g.W; ++x0) {
        std::fill(buf.begin(), buf.end(), 0.f);
        for (int64_t ky = 0; ky < 3; ++ky) {
          const int64_t ys = yy - (ky - 1);
          if (ys < 0 || ys >= g.H) continue;
          for (int64_t kx = 0; kx < 3; ++kx) {
            const int64_t xs = x0 - (kx - 1);
            if (xs < 0 || xs >= g.W) continue;
            const float* src = dd + ((b * g.H + ys) * g.W + xs) * C;
            const float* w = taps + (ky * 3 + kx) * C;
            int64_t c = 0;
            for (; c + VL <= C; c += VL)
              at::vec::fmadd(Vec::loadu(src + c), Vec::loadu(w + c), Vec::loadu(acc + c)).store(acc + c);
            for (; c < C; ++c) acc[c] += src[c] * w[c];
          }
        }
        T* out = dx + (r * g.W + x0) * C;
        int64_t c = 0;
        for (; c + VL <= C; c += VL) st(out + c, Vec::loadu(acc + c));
        for (; c < C; ++c) out[c] = T(acc[c]);
      }
    }
  });
}

at::Tensor dwconv_ln_cpu(const at::Tensor& x_in, const at::Tensor& weight, const at::Tensor& bias, double eps) {
  const DwArgs a = dw_args(x_in, weight, bias, "dwconv_ln");
  at::Tensor y = empty_channels_last(a.x);
  if (y.numel() == 0) return y;
  const Geo g{a.B, a.C, a.H, a.W};
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, a.x.scalar_type(), "dwconv_ln_cpu", [&] {
    forward<scalar_t>(a.x.const_data_ptr<scalar_t>(), a.taps.const_data_ptr<float>(), a.bias.const_data_ptr<float>(),
                      y.mutable_data_ptr<scalar_t>(), g, float(eps));
  });
  return y;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> dwconv_ln_backward_cpu(const at::Tensor& grad, const at::Tensor& x_in,
                                                                      const at::Tensor& weight,
                                                                      const at::Tensor& bias, double eps) {
  const DwArgs a = dw_args(x_in, weight, bias, "dwconv_ln_backward");
  TORCH_CHECK(grad.sizes() == x_in.sizes() && grad.scalar_type() == x_in.scalar_type(),
              "dwconv_ln_backward: grad must match x in shape and dtype, got ", grad.sizes(), " ", grad.scalar_type());
  const at::Tensor gy = grad.contiguous(at::MemoryFormat::ChannelsLast);
  at::Tensor dx = empty_channels_last(a.x);
  const Geo g{a.B, a.C, a.H, a.W};
  const int64_t nt = at::get_num_threads();
  at::Tensor part = at::zeros({nt, 10, a.C}, a.x.options().dtype(at::kDouble));
  if (dx.numel() > 0) {
    at::Tensor dd = at::empty({a.B * a.H * a.W, a.C}, a.x.options().dtype(at::kFloat));
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, a.x.scalar_type(), "dwconv_ln_backward_cpu", [&] {
      const float* taps = a.taps.const_data_ptr<float>();
      backward_dd<scalar_t>(a.x.const_data_ptr<scalar_t>(), gy.const_data_ptr<scalar_t>(), taps,
                            a.bias.const_data_ptr<float>(), dd.mutable_data_ptr<float>(),
                            part.mutable_data_ptr<double>(), g, float(eps));
      backward_dx<scalar_t>(dd.const_data_ptr<float>(), taps, dx.mutable_data_ptr<scalar_t>(), g);
    });
  }
  const at::Tensor tot = part.sum(0);  // (10, C) float64
  at::Tensor dw = tot.narrow(0, 0, 9).t().contiguous().reshape(weight.sizes()).to(weight.scalar_type());
  at::Tensor db = tot.select(0, 9).to(bias.scalar_type());
  return {dx, dw, db};
}

}  // namespace
}  // namespace wf

TORCH_LIBRARY_IMPL(wuerstchen_fast_C, CPU, m) {
  m.impl("dwconv_ln", &wf::dwconv_ln_cpu);
  m.impl("dwconv_ln_backward", &wf::dwconv_ln_backward_cpu);
}
