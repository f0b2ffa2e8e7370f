// Stage A's mixing_dwconv on the CPU: y = x + (depthwise3x3(pad_rep(xn)) + bias) · gamma.
//
// Math, per (b, c) plane, P = xn replication-padded by 1 ((H+2) x (W+2)), w = weight[c] (3x3):
//   conv[h, w'] = bias[c] + Σ_{ky,kx} w[ky, kx] · P[h + ky, w' + kx]
//   y = x + conv · gamma
// Backward (g = dy; nothing saved but the inputs):
//   S[c, ky, kx] = Σ_{b,h,w'} g · P[h + ky, w' + kx],   G[c] = Σ g
//   dweight = gamma · S,  dbias = gamma · G,  dgamma = Σ_c (Σ_k w[c, k] S[c, k] + bias[c] G[c])
//     (so dgamma needs no second pass over the conv output)
//   dxn = fold(conv_transpose(g · gamma)): the full transposed conv over the padded grid, whose
//     border rows / columns then add onto the edge pixels they replicated.
// dx is the incoming gradient itself (the residual), returned by the autograd formula in Python.
//
// Layout: NCHW planes (the layout Stage A's convolutions produce); channels-last or strided inputs
// are copied to NCHW first and the output is returned in x's layout. Each task is one (b, c) plane:
// the plane is staged as padded float32 rows in a per-thread buffer (bf16/fp16 converted once),
// then every output row is 9 vector FMAs per Vectorized<float> over its W pixels (no edge cases:
// the padding is in the buffer). Accumulation: per-element float32; S and G per plane in float32
// over one row, in float64 across rows, planes and batches. Parallel over planes (at::parallel_for).
#include "isa.h"  // first: the instruction set of this file

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <torch/library.h>

#include <algorithm>
#include <vector>

#include "../mixing_host.h"

namespace wf {
namespace {

using Vec = at::vec::Vectorized<float>;
constexpr int64_t VL = Vec::size();

inline float hsum(const Vec& v) {
  alignas(64) float b[VL];
  v.store(b);
  float s = 0.f;
  for (int64_t i = 0; i < VL; ++i) s += b[i];
  return s;
}

// P = the plane replication-padded by 1, as float32 rows of stride W + 2 (+ slack for whole vectors).
template <typename T>
void stage_padded(const T* src, float* P, int64_t H, int64_t W) {
  const int64_t S = W + 2;
  for (int64_t h = 0; h < H; ++h) {
    float* row = P + (h + 1) * S;
    const T* s = src + h * W;
    for (int64_t i = 0; i < W; ++i) row[i + 1] = float(s[i]);
    row[0] = row[1];
    row[W + 1] = row[W];
  }
  std::copy(P + S, P + 2 * S, P);                      // top pad row = row 0
  std::copy(P + H * S, P + (H + 1) * S, P + (H + 1) * S);  // bottom pad row = row H-1
}

// out[0, W) = Σ_{ky,kx} k[ky*3+kx] · P[(r + ky) * S + i + kx] + b, whole vectors then a scalar tail.
inline void conv_row(const float* P, int64_t S, int64_t r, int64_t W, const float* k, float b, float* out) {
  const float *r0 = P + r * S, *r1 = r0 + S, *r2 = r1 + S;
  int64_t i = 0;
  for (; i + VL <= W; i += VL) {
    Vec acc(b);
    acc = at::vec::fmadd(Vec(k[0]), Vec::loadu(r0 + i), acc);
    acc = at::vec::fmadd(Vec(k[1]), Vec::loadu(r0 + i + 1), acc);
    acc = at::vec::fmadd(Vec(k[2]), Vec::loadu(r0 + i + 2), acc);
    acc = at::vec::fmadd(Vec(k[3]), Vec::loadu(r1 + i), acc);
    acc = at::vec::fmadd(Vec(k[4]), Vec::loadu(r1 + i + 1), acc);
    acc = at::vec::fmadd(Vec(k[5]), Vec::loadu(r1 + i + 2), acc);
    acc = at::vec::fmadd(Vec(k[6]), Vec::loadu(r2 + i), acc);
    acc = at::vec::fmadd(Vec(k[7]), Vec::loadu(r2 + i + 1), acc);
    acc = at::vec::fmadd(Vec(k[8]), Vec::loadu(r2 + i + 2), acc);
    acc.store(out + i);
  }
  for (; i < W; ++i) {
    float acc = b;
    for (int64_t t = 0; t < 3; ++t) acc = std::fma(k[t], r0[i + t], acc);
    for (int64_t t = 0; t < 3; ++t) acc = std::fma(k[3 + t], r1[i + t], acc);
    for (int64_t t = 0; t < 3; ++t) acc = std::fma(k[6 + t], r2[i + t], acc);
    out[i] = acc;
  }
}

at::Tensor mixing_dwconv_cpu(const at::Tensor& x_in, const at::Tensor& xn_in, const at::Tensor& weight,
                             const at::Tensor& bias, const at::Tensor& gamma) {
  const MixDwArgs a = mix_dw_args(xn_in, weight, bias, gamma, "mixing_dwconv");
  check_mix_residual(x_in, xn_in, "mixing_dwconv");
  const Layout out_layout = mix_out_layout(x_in);
  const at::Tensor xn = a.d.t.contiguous(), x = x_in.contiguous();
  at::Tensor y = at::empty_like(x, at::MemoryFormat::Contiguous);
  const int64_t B = a.B, C = a.C, H = a.H, W = a.W, S = W + 2;
  if (y.numel() > 0) {
    const float *wp = a.w.const_data_ptr<float>(), *bp = a.bias.const_data_ptr<float>();
    const float g = a.gamma.item<float>();
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "mixing_dwconv_cpu", [&] {
      const scalar_t *xp = x.const_data_ptr<scalar_t>(), *np = xn.const_data_ptr<scalar_t>();
      scalar_t* yp = y.mutable_data_ptr<scalar_t>();
      at::parallel_for(0, B * C, 1, [&](int64_t t0, int64_t t1) {
        std::vector<float> P((H + 2) * S + VL), row(W);
        for (int64_t t = t0; t < t1; ++t) {
          const int64_t c = t % C, off = t * H * W;
          stage_padded(np + off, P.data(), H, W);
          for (int64_t h = 0; h < H; ++h) {
            conv_row(P.data(), S, h, W, wp + c * 9, bp[c], row.data());
            const scalar_t* xr = xp + off + h * W;
            scalar_t* yr = yp + off + h * W;
            for (int64_t i = 0; i < W; ++i) yr[i] = scalar_t(float(xr[i]) + row[i] * g);
          }
        }
      });
    });
  }
  return in_layout(y, out_layout);
}

// (dxn, dweight, dbias, dgamma); see the file header.
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> mixing_dwconv_backward_cpu(
    const at::Tensor& grad, const at::Tensor& xn_in, const at::Tensor& weight, const at::Tensor& bias,
    const at::Tensor& gamma) {
  const MixDwArgs a = mix_dw_args(xn_in, weight, bias, gamma, "mixing_dwconv_backward");
  const at::Tensor xn = a.d.t.contiguous();
  const at::Tensor g = like_x(grad, xn, Layout::NCHW, "mixing_dwconv_backward", "grad");
  at::Tensor dxn = at::empty_like(xn, at::MemoryFormat::Contiguous);
  const int64_t B = a.B, C = a.C, H = a.H, W = a.W, S = W + 2;
  // Per plane: S[9] then G, float64.
  at::Tensor sums = at::zeros({B * C, 10}, xn.options().dtype(at::kDouble));
  if (xn.numel() > 0) {
    const float* wp = a.w.const_data_ptr<float>();
    const float gm = a.gamma.item<float>();
    double* sp = sums.mutable_data_ptr<double>();
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, xn.scalar_type(), "mixing_dwconv_backward_cpu", [&] {
      const scalar_t *np = xn.const_data_ptr<scalar_t>(), *gp = g.const_data_ptr<scalar_t>();
      scalar_t* op = dxn.mutable_data_ptr<scalar_t>();
      at::parallel_for(0, B * C, 1, [&](int64_t t0, int64_t t1) {
        // P: padded xn; U: g·gamma zero-padded by 2 (stride W + 4); D: the transposed conv on the
        // padded grid (stride S), folded in place onto the plane.
        const int64_t SU = W + 4;
        std::vector<float> P((H + 2) * S + VL), U((H + 4) * SU + VL, 0.f), D((H + 2) * S + VL), gr(W);
        for (int64_t t = t0; t < t1; ++t) {
          const int64_t c = t % C, off = t * H * W;
          const float* k = wp + c * 9;
          stage_padded(np + off, P.data(), H, W);
          double acc[10] = {0};
          for (int64_t h = 0; h < H; ++h) {
            const scalar_t* grow = gp + off + h * W;
            float* urow = U.data() + (h + 2) * SU + 2;
            for (int64_t i = 0; i < W; ++i) {
              gr[i] = float(grow[i]);
              urow[i] = gr[i] * gm;
            }
            // S and G of this row: float32 vectors over the row, then float64.
            for (int64_t q = 0; q < 9; ++q) {
              const float* pr = P.data() + (h + q / 3) * S + q % 3;
              Vec v(0.f);
              int64_t i = 0;
              for (; i + VL <= W; i += VL) v = at::vec::fmadd(Vec::loadu(gr.data() + i), Vec::loadu(pr + i), v);
              float s = hsum(v);
              for (; i < W; ++i) s += gr[i] * pr[i];
              acc[q] += s;
            }
            float s = 0.f;
            for (int64_t i = 0; i < W; ++i) s += gr[i];
            acc[9] += s;
          }
          for (int64_t q = 0; q < 10; ++q) sp[t * 10 + q] = acc[q];
          // D[i, j] = Σ_{ky,kx} k[ky, kx] · u[i - ky, j - kx] over the padded grid (i < H+2, j < W+2):
          // with U zero-padded by 2, u[i - ky, j - kx] = U[i - ky + 2, j - kx + 2].
          for (int64_t i = 0; i < H + 2; ++i) {
            const float *u0 = U.data() + (i + 2) * SU, *u1 = u0 - SU, *u2 = u1 - SU;  // rows for ky = 0, 1, 2
            float* d = D.data() + i * S;
            int64_t j = 0;
            for (; j + VL <= S; j += VL) {
              Vec v(0.f);
              v = at::vec::fmadd(Vec(k[0]), Vec::loadu(u0 + j + 2), v);
              v = at::vec::fmadd(Vec(k[1]), Vec::loadu(u0 + j + 1), v);
              v = at::vec::fmadd(Vec(k[2]), Vec::loadu(u0 + j), v);
              v = at::vec::fmadd(Vec(k[3]), Vec::loadu(u1 + j + 2), v);
              v = at::vec::fmadd(Vec(k[4]), Vec::loadu(u1 + j + 1), v);
              v = at::vec::fmadd(Vec(k[5]), Vec::loadu(u1 + j), v);
              v = at::vec::fmadd(Vec(k[6]), Vec::loadu(u2 + j + 2), v);
              v = at::vec::fmadd(Vec(k[7]), Vec::loadu(u2 + j + 1), v);
              v = at::vec::fmadd(Vec(k[8]), Vec::loadu(u2 + j), v);
              v.store(d + j);
            }
            for (; j < S; ++j) {
              float v = 0.f;
              for (int64_t ky = 0; ky < 3; ++ky)
                for (int64_t kx = 0; kx < 3; ++kx) v = std::fma(k[ky * 3 + kx], U[(i - ky + 2) * SU + j - kx + 2], v);
              d[j] = v;
            }
          }
          // Fold the pad's border onto the edge pixels it replicated: columns, then rows.
          for (int64_t i = 0; i < H + 2; ++i) {
            float* d = D.data() + i * S;
            d[1] += d[0];
            d[W] += d[W + 1];
          }
          {
            float *top = D.data() + S, *bot = D.data() + H * S;
            for (int64_t j = 1; j <= W; ++j) {
              top[j] += D[j];
              bot[j] += D[(H + 1) * S + j];
            }
          }
          for (int64_t h = 0; h < H; ++h) {
            const float* d = D.data() + (h + 1) * S + 1;
            scalar_t* o = op + off + h * W;
            for (int64_t i = 0; i < W; ++i) o[i] = scalar_t(d[i]);
          }
        }
      });
    });
  }
  // Reduce the per-plane sums over the batch (fixed order) and finish the parameter gradients.
  const at::Tensor per_c = sums.view({B, C, 10}).sum(0);  // (C, 10) float64
  const at::Tensor Sm = per_c.narrow(1, 0, 9), Gm = per_c.select(1, 9);
  const at::Tensor w64 = a.w.to(at::kDouble), b64 = a.bias.to(at::kDouble);
  const at::Tensor dgamma = ((w64 * Sm).sum() + (b64 * Gm).sum()).to(gamma.scalar_type());
  const double g64 = a.gamma.item<double>();
  const at::Tensor dweight = (Sm * g64).reshape(weight.sizes()).to(weight.scalar_type());
  const at::Tensor dbias = (Gm * g64).reshape(bias.sizes()).to(bias.scalar_type());
  return {in_layout(dxn, a.d.layout), dweight, dbias, dgamma.reshape({})};
}

}  // namespace
}  // namespace wf

TORCH_LIBRARY_IMPL(wuerstchen_fast_C, CPU, m) {
  m.impl("mixing_dwconv", &wf::mixing_dwconv_cpu);
  m.impl("mixing_dwconv_backward", &wf::mixing_dwconv_backward_cpu);
}
