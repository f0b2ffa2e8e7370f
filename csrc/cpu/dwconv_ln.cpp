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
// Layout: the forward reads a contiguous NCHW x in place (forward_nchw: vectors along image rows, then
// 8x8 transposes into the output) and channels-last x as it is (forward: a pixel's channels contiguous,
// every inner loop over channels with at::vec::Vectorized<float>); other layouts are copied to
// channels-last first, as is x in the backward. y, dx are channels-last. Accumulation float32: the conv
// in registers, mean and variance two-pass (float32 vector partials summed in double). dw, dbias:
// float32 sums per image row, float64 across rows and threads.
// Parallel over image rows (b, y) with at::parallel_for (OpenMP: setup.py). Limits: 3x3 depthwise
// (one input per group).
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

// d[0:C] = bias + Σ_t taps[t] ⊙ x[n(p, t)] for pixel (b, y, x0), float32: the taps in (ky, kx) order
// accumulate in registers, two vectors of channels at a time, and d is written once.
template <typename T>
inline void conv_pixel(const T* x, const float* taps, const float* bias, float* d, const Geo& g, int64_t b, int64_t y,
                       int64_t x0) {
  const int64_t C = g.C;
  const T* src[9];
  const float* w[9];
  int n = 0;
  for (int64_t ky = 0; ky < 3; ++ky) {
    const int64_t yy = y + ky - 1;
    if (yy < 0 || yy >= g.H) continue;
    for (int64_t kx = 0; kx < 3; ++kx) {
      const int64_t xx = x0 + kx - 1;
      if (xx < 0 || xx >= g.W) continue;
      src[n] = x + ((b * g.H + yy) * g.W + xx) * C;
      w[n++] = taps + (ky * 3 + kx) * C;
    }
  }
  int64_t c = 0;
  for (; c + 2 * VL <= C; c += 2 * VL) {
    Vec a0 = Vec::loadu(bias + c), a1 = Vec::loadu(bias + c + VL);
    for (int i = 0; i < n; ++i) {
      a0 = at::vec::fmadd(ld(src[i] + c), Vec::loadu(w[i] + c), a0);
      a1 = at::vec::fmadd(ld(src[i] + c + VL), Vec::loadu(w[i] + c + VL), a1);
    }
    a0.store(d + c);
    a1.store(d + c + VL);
  }
  for (; c + VL <= C; c += VL) {
    Vec a = Vec::loadu(bias + c);
    for (int i = 0; i < n; ++i) a = at::vec::fmadd(ld(src[i] + c), Vec::loadu(w[i] + c), a);
    a.store(d + c);
  }
  for (; c < C; ++c) {
    float a = bias[c];
    for (int i = 0; i < n; ++i) a = std::fma(float(src[i][c]), w[i][c], a);
    d[c] = a;
  }
}

struct Norm {
  float mean, rstd;
  double mean_d, rstd_d;  // unrounded, for the forward's output
};

// rstd (double) from Σ(d - m_f)² over C values, where m_f is the mean m rounded to float and
// shift = m - m_f: Σ(d - m)² = Σ(d - m_f)² - C (m - m_f)².
inline double rstd_about_float_mean(double sq, int64_t C, double shift, float eps) {
  return 1.0 / std::sqrt(std::max(sq / C - shift * shift, 0.0) + eps);
}

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
  const double rstd_d = rstd_about_float_mean(s + hsum(acc), C, mean_d - mean, eps);
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

// ------------------------------------------------------------------ forward from a contiguous NCHW x
// The blocks hand dwconv_ln their NCHW residual stream; copying it to channels-last first costs more than
// the kernel (a strided transpose of the whole tensor). This path reads the planes as they are, one image
// row (b, y) per task:
//   1. every channel's conv row into D (C, Wp) float32, vectors along the row (the same (ky, kx) fused
//      multiply-add order as the channels-last path, so both give the same d);
//   2. per pixel, mean and variance over D's column (the sum as the rows are made, then Σ(d - m_f)²; both
//      float32 vectors over pixels flushed to double every kFlush channels), mean m_f (rounded) and rstd;
//   3. y = (d - m)·rstd + (m_exact - m)·(-rstd), pixels in lanes, then 8x8 transposes into the
//      channels-last output rows.
// D is C·Wp floats per thread (L2-resident at the released shapes: at most 1536·24 or 320·128).
constexpr int64_t kFlush = 16;

// d[0:W] for one channel plane and output row yy. Vectors start at x0 = 1, 1 + VL, ... and a last one
// at W - 1 - VL (overlapping the one before: the same values again), so that every vector reads inside
// the row; pixels 0 and W - 1 are scalar. Rows narrower than VL + 2 go through a zero-padded copy.
template <typename T>
inline void conv_row_nchw(const T* plane, const float* taps, int64_t C, int64_t c, float bias, float* d, int64_t yy,
                          int64_t H, int64_t W) {
  const T* rows[3];
  float ws[3][3];
  for (int64_t ky = 0; ky < 3; ++ky) {
    const int64_t ys = yy + ky - 1;
    rows[ky] = (ys >= 0 && ys < H) ? plane + ys * W : nullptr;
    for (int64_t kx = 0; kx < 3; ++kx) ws[ky][kx] = taps[(ky * 3 + kx) * C + c];
  }
  if (W < VL + 2) {
    for (int64_t x0 = 0; x0 < W; x0 += VL) {
      Vec a(bias);
      for (int64_t ky = 0; ky < 3; ++ky) {
        if (rows[ky] == nullptr) continue;
        float buf[VL + 2];
        for (int64_t j = 0; j < VL + 2; ++j) {
          const int64_t xs = x0 - 1 + j;
          buf[j] = (xs >= 0 && xs < W) ? float(rows[ky][xs]) : 0.f;
        }
        for (int64_t kx = 0; kx < 3; ++kx) a = at::vec::fmadd(Vec::loadu(buf + kx), Vec(ws[ky][kx]), a);
      }
      a.store(d + x0);
    }
    return;
  }
  const Vec vb(bias), w00(ws[0][0]), w01(ws[0][1]), w02(ws[0][2]), w10(ws[1][0]), w11(ws[1][1]), w12(ws[1][2]),
      w20(ws[2][0]), w21(ws[2][1]), w22(ws[2][2]);
  auto vec_at = [&](int64_t x0) {  // 1 <= x0 <= W - 1 - VL
    Vec a = vb;
    if (rows[0] != nullptr) {
      const T* r = rows[0] + x0;
      a = at::vec::fmadd(ld(r - 1), w00, a);
      a = at::vec::fmadd(ld(r), w01, a);
      a = at::vec::fmadd(ld(r + 1), w02, a);
    }
    const T* r = rows[1] + x0;
    a = at::vec::fmadd(ld(r - 1), w10, a);
    a = at::vec::fmadd(ld(r), w11, a);
    a = at::vec::fmadd(ld(r + 1), w12, a);
    if (rows[2] != nullptr) {
      r = rows[2] + x0;
      a = at::vec::fmadd(ld(r - 1), w20, a);
      a = at::vec::fmadd(ld(r), w21, a);
      a = at::vec::fmadd(ld(r + 1), w22, a);
    }
    a.store(d + x0);
  };
  int64_t x0 = 1;
  for (; x0 + VL <= W - 1; x0 += VL) vec_at(x0);
  if (x0 < W - 1) vec_at(W - 1 - VL);
  float a0 = bias, a1 = bias;  // the edge pixels 0 and W - 1 (W >= 3 here), taps in the same order
  for (int64_t ky = 0; ky < 3; ++ky) {
    const T* r = rows[ky];
    if (r == nullptr) continue;
    a0 = std::fma(float(r[0]), ws[ky][1], a0);
    a0 = std::fma(float(r[1]), ws[ky][2], a0);
    a1 = std::fma(float(r[W - 2]), ws[ky][0], a1);
    a1 = std::fma(float(r[W - 1]), ws[ky][1], a1);
  }
  d[0] = a0;
  d[W - 1] = a1;
}

// Asks for row ys of a plane (every cache line of it) ahead of its use: a channel's row yy + 1 is the one
// no earlier output row has touched, and its load would otherwise stall the conv on the L3.
constexpr int64_t kAhead = 8;  // channels ahead

template <typename T>
inline void prefetch_row(const T* plane, int64_t ys, int64_t W) {
  const char* p = reinterpret_cast<const char*>(plane + ys * W);
  const int64_t n = W * int64_t(sizeof(T));
  for (int64_t o = 0; o < n; o += 64) __builtin_prefetch(p + o);
  __builtin_prefetch(p + n - 1);
}

// s[0:VL] += Σ over rows c0 <= c < c1 of D (stride Wp) of f(D[c][x0:x0+VL]): float32 within the block
// (at most kFlush rows), then double.
template <typename F>
inline void add_block_sum(const float* D, int64_t c0, int64_t c1, int64_t Wp, int64_t x0, double* s, F f) {
  Vec acc(0.f);
  for (int64_t c = c0; c < c1; ++c) acc = acc + f(Vec::loadu(D + c * Wp + x0));
  float buf[VL];
  acc.store(buf);
  for (int64_t j = 0; j < VL; ++j) s[j] += buf[j];
}

template <typename T>
void forward_nchw(const T* x, const float* taps, const float* bias, T* y, const Geo& g, float eps) {
  const int64_t C = g.C, H = g.H, W = g.W, Wp = (W + VL - 1) / VL * VL;
  at::parallel_for(0, g.B * H, row_grain(g), [&](int64_t r0, int64_t r1) {
    std::vector<float> Dbuf(C * Wp), stat(3 * Wp), tile(2 * VL * VL);
    std::vector<double> sums(Wp);
    float *D = Dbuf.data(), *mean = stat.data(), *rstd = mean + Wp, *corr = rstd + Wp;
    double* Sd = sums.data();
    float *t0 = tile.data(), *t1 = t0 + VL * VL;
    const auto identity = [](const Vec& v) { return v; };
    // y[p, c] = (d - m_f)·rstd + corr, as the vector loops compute it
    const auto norm_at = [&](int64_t c, int64_t p) { return T(std::fma(D[c * Wp + p] - mean[p], rstd[p], corr[p])); };
    for (int64_t r = r0; r < r1; ++r) {
      const int64_t b = r / H, yy = r % H;
      // the conv rows and their column sums (flushed to double in Sd every kFlush channels, while in L1)
      std::fill(Sd, Sd + Wp, 0.0);
      for (int64_t c0 = 0; c0 < C; c0 += kFlush) {
        const int64_t c1 = std::min(C, c0 + kFlush);
        for (int64_t c = c0; c < c1; ++c) {
          if (c + kAhead < C && yy + 1 < H) prefetch_row(x + (b * C + c + kAhead) * H * W, yy + 1, W);
          conv_row_nchw(x + (b * C + c) * H * W, taps, C, c, bias[c], D + c * Wp, yy, H, W);
        }
        for (int64_t x0 = 0; x0 < Wp; x0 += VL) add_block_sum(D, c0, c1, Wp, x0, Sd + x0, identity);
      }
      for (int64_t x0 = 0; x0 < Wp; x0 += VL) {
        double md[VL];
        for (int64_t j = 0; j < VL; ++j) {
          md[j] = Sd[x0 + j] / C;
          mean[x0 + j] = float(md[j]);
        }
        const Vec vm = Vec::loadu(mean + x0);
        double sq[VL] = {};
        for (int64_t c0 = 0; c0 < C; c0 += kFlush)
          add_block_sum(D, c0, std::min(C, c0 + kFlush), Wp, x0, sq, [&](const Vec& v) {
            const Vec e = v - vm;
            return e * e;
          });
        for (int64_t j = 0; j < VL; ++j) {
          const double shift = md[j] - mean[x0 + j], rs = rstd_about_float_mean(sq[j], C, shift, eps);
          rstd[x0 + j] = float(rs);
          corr[x0 + j] = float(-shift * rs);
        }
      }
      T* out = y + r * W * C;  // channels-last row: pixel p's channels at out + p·C
      int64_t x0 = 0;
      for (; x0 + VL <= W; x0 += VL) {
        const Vec vm = Vec::loadu(mean + x0), vr = Vec::loadu(rstd + x0), vc = Vec::loadu(corr + x0);
        int64_t c = 0;
        for (; c + VL <= C; c += VL) {
          for (int64_t i = 0; i < VL; ++i)
            at::vec::fmadd(Vec::loadu(D + (c + i) * Wp + x0) - vm, vr, vc).store(t0 + i * VL);
          if constexpr (std::is_same_v<T, float>) {
            at::vec::transpose_mxn<float, VL, VL>(t0, VL, out + x0 * C + c, C);
          } else {
            at::vec::transpose_mxn<float, VL, VL>(t0, VL, t1, VL);
            for (int64_t j = 0; j < VL; ++j) st(out + (x0 + j) * C + c, Vec::loadu(t1 + j * VL));
          }
        }
        for (; c < C; ++c)
          for (int64_t p = x0; p < x0 + VL; ++p) out[p * C + c] = norm_at(c, p);
      }
      for (; x0 < W; ++x0)
        for (int64_t c = 0; c < C; ++c) out[x0 * C + c] = norm_at(c, x0);
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
        // dd = rstd g + kd (d - mean) + k0 with kd = -rstd² mean(g xh), k0 = -rstd mean(g): three roundings.
        // The loops use the float mean m_f; the exact one is m_d. Both corrections are constants per pixel,
        // taken in double: xh = (d - m_f) rstd + (m_f - m_d) rstd, and kd (d - m_d) = kd (d - m_f) + kd (m_f - m_d).
        const double mg = (s1 + hsum(a1)) / C, rs = n.rstd_d, shift = double(n.mean) - n.mean_d;
        const double mgx = (s2 + hsum(a2)) / C * (rs / n.rstd) + shift * rs * mg, kdd = -rs * rs * mgx;
        const float kd = float(kdd), k0 = float(-rs * mg + kdd * shift);
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
  const DwArgs a = dw_args(x_in, weight, bias, "dwconv_ln", /*keep_nchw=*/true);
  at::Tensor y = empty_channels_last(a.x);
  if (y.numel() == 0) return y;
  const Geo g{a.B, a.C, a.H, a.W};
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, a.x.scalar_type(), "dwconv_ln_cpu", [&] {
    const scalar_t* xp = a.x.const_data_ptr<scalar_t>();
    const float *taps = a.taps.const_data_ptr<float>(), *bp = a.bias.const_data_ptr<float>();
    scalar_t* yp = y.mutable_data_ptr<scalar_t>();
    if (a.nchw) {
      forward_nchw<scalar_t>(xp, taps, bp, yp, g, float(eps));
    } else {
      forward<scalar_t>(xp, taps, bp, yp, g, float(eps));
    }
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
