// CPU kernels of the fused elementwise / per-channel-reduction ops: modulate (forward, backward),
// ddpm_step (model head + CFG lerp + DDPM update) and GRN (column sums, apply, apply backward, with
// GELU folded in when the ResBlock feeds the pre-activation).
//
// Layouts: the (B, C, H, W) ops index NCHW or NHWC directly (csrc/layout.h; anything else is copied
// to NCHW first) with the innermost loop over the contiguous axis (H*W pixels for NCHW, C channels
// for NHWC) written with at::vec::Vectorized<float> so it vectorises; GRN operands are (B, H, W, C)
// row-major (channels innermost); GELU and GELU' run on whole vectors too (at::vec erf/exp, see
// csrc/cpu/isa.h), over row tiles padded to a multiple of the vector width. Per-element math float32; reductions (modulate's da, db; GRN's
// Σv², Σdy·v, Σdy) accumulate in float64 (modulate NCHW: float32 over 4 vectors, then float64), as the
// Triton kernels keep them in float64. Parallel over independent rows/column tiles (at::parallel_for).
#include "isa.h"  // first: the instruction set of this file (AVX2 on x86-64)

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <vector>

#include "../fused_host.h"
#include "vec_io.h"

namespace wf {
namespace {

// GELU(x) = ½x(1 + erf(x/√2)) and its derivative ½(1 + erf(x/√2)) + x·φ(x), lane-wise (fused_common.h's
// gelu / gelu_grad, vectorised: the erf and exp of the CPU capability, as eager F.gelu uses).
inline Vec gelu_vec(const Vec& x) {
  return Vec(0.5f) * x * (Vec(1.f) + (x * Vec(kSqrt1_2)).erf());
}
inline Vec gelu_grad_vec(const Vec& x) {
  const Vec cdf = Vec(0.5f) * (Vec(1.f) + (x * Vec(kSqrt1_2)).erf());
  return at::vec::fmadd(x * Vec(kInvSqrt2Pi), (Vec(-0.5f) * x * x).exp(), cdf);
}

// out[0, n) = float(x[0, n)), zero-padded to a whole number of vectors; returns the padded length.
template <typename T>
inline int64_t load_padded(const T* x, float* out, int64_t n) {
  const int64_t np = (n + VL - 1) / VL * VL;
  for (int64_t i = 0; i < n; ++i) out[i] = float(x[i]);
  for (int64_t i = n; i < np; ++i) out[i] = 0.f;
  return np;
}

// v[0, n) = GELU(x[0, n)) as float32 (n <= CT); every lane, tail included, takes the vector path.
template <typename T>
inline void gelu_tile(const T* x, float* v, int64_t n) {
  const int64_t np = load_padded(x, v, n);
  for (int64_t i = 0; i < np; i += VL) gelu_vec(Vec::loadu(v + i)).store(v + i);
}

// fused_common.h's head_eps on whole vectors, in the same order of operations.
inline Vec head_eps_vec(int head, const Vec& x, const Vec& a, const Vec& b) {
  if (head == 0) return a;
  const Vec den = head == 1 ? (Vec(1.f) - b).abs() + Vec(1e-5f)
                            : Vec(1.f) / (Vec(1.f) + b.neg().exp()) * Vec(1.f - 2e-3f) + Vec(1e-3f);
  return (x - a) / den;
}

// ------------------------------------------------------------------------------------ modulate
// y = x * A + Bv along n contiguous elements; A, Bv either scalars (NCHW row) or arrays (NHWC row).
template <typename TI, typename T>
inline void axpb_row(const TI* x, T* y, int64_t n, const float* A, const float* Bv, bool per_elem, float a0, float b0) {
  int64_t i = 0;
  if (per_elem) {
    for (; i + VL <= n; i += VL) st(y + i, at::vec::fmadd(ld(x + i), Vec::loadu(A + i), Vec::loadu(Bv + i)));
    for (; i < n; ++i) y[i] = T(float(x[i]) * A[i] + Bv[i]);
  } else {
    const Vec va(a0), vb(b0);
    for (; i + VL <= n; i += VL) st(y + i, at::vec::fmadd(ld(x + i), va, vb));
    for (; i < n; ++i) y[i] = T(float(x[i]) * a0 + b0);
  }
}

at::Tensor modulate_cpu(const at::Tensor& x_in, const at::Tensor& a, const at::Tensor& b) {
  const ModulateArgs m = modulate_args(x_in, a, &b, "modulate");
  const Dense& d = m.d;
  const at::Tensor& x = d.t;
  const int64_t B = m.B, C = m.C, HW = m.HW;
  const at::Tensor &A = m.A, &Bv = m.Bv;
  at::Tensor y = empty_in_layout(x, d.layout);
  if (x.numel() == 0) return y;
  const float *pa = A.const_data_ptr<float>(), *pb = Bv.const_data_ptr<float>();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "modulate_cpu", [&] {
    const scalar_t* xp = x.const_data_ptr<scalar_t>();
    scalar_t* yp = y.mutable_data_ptr<scalar_t>();
    if (d.layout == Layout::NCHW) {
      at::parallel_for(0, B * C, std::max<int64_t>(1, 32768 / std::max<int64_t>(HW, 1)), [&](int64_t r0, int64_t r1) {
        for (int64_t r = r0; r < r1; ++r) axpb_row(xp + r * HW, yp + r * HW, HW, nullptr, nullptr, false, pa[r], pb[r]);
      });
    } else {
      at::parallel_for(0, B * HW, std::max<int64_t>(1, 32768 / C), [&](int64_t r0, int64_t r1) {
        for (int64_t r = r0; r < r1; ++r) {
          const int64_t bb = r / HW;
          axpb_row(xp + r * C, yp + r * C, C, pa + bb * C, pb + bb * C, true, 0.f, 0.f);
        }
      });
    }
  });
  return y;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> modulate_backward_cpu(const at::Tensor& grad, const at::Tensor& x_in,
                                                                     const at::Tensor& a) {
  const ModulateArgs m = modulate_args(x_in, a, nullptr, "modulate_backward");
  const Dense& d = m.d;
  const at::Tensor& x = d.t;
  const at::Tensor g = like_x(grad, x, d.layout, "modulate_backward", "grad");
  const int64_t B = m.B, C = m.C, HW = m.HW;
  const at::Tensor& A = m.A;
  at::Tensor dx = empty_in_layout(x, d.layout);
  at::Tensor da = at::zeros({B, C}, x.options().dtype(at::kDouble)), db = at::zeros({B, C}, da.options());
  if (x.numel() > 0) {
    const float* pa = A.const_data_ptr<float>();
    double *pda = da.mutable_data_ptr<double>(), *pdb = db.mutable_data_ptr<double>();
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "modulate_backward_cpu", [&] {
      const scalar_t *xp = x.const_data_ptr<scalar_t>(), *gp = g.const_data_ptr<scalar_t>();
      scalar_t* op = dx.mutable_data_ptr<scalar_t>();
      if (d.layout == Layout::NCHW) {
        at::parallel_for(0, B * C, std::max<int64_t>(1, 16384 / std::max<int64_t>(HW, 1)), [&](int64_t r0, int64_t r1) {
          for (int64_t r = r0; r < r1; ++r) {
            const scalar_t *xr = xp + r * HW, *gr = gp + r * HW;
            scalar_t* orow = op + r * HW;
            const Vec va(pa[r]);
            double sx = 0, sg = 0;
            for (int64_t i0 = 0; i0 < HW; i0 += 4 * VL) {  // float32 partials over <= 4 vectors
              Vec ax(0.f), ag(0.f);
              const int64_t i1 = std::min(HW, i0 + 4 * VL);
              int64_t i = i0;
              for (; i + VL <= i1; i += VL) {
                const Vec gv = ld(gr + i), xv = ld(xr + i);
                st(orow + i, gv * va);
                ax = at::vec::fmadd(gv, xv, ax);
                ag = ag + gv;
              }
              float fx = 0, fg = 0;
              for (; i < i1; ++i) {
                const float gv = float(gr[i]);
                orow[i] = scalar_t(gv * pa[r]);
                fx += gv * float(xr[i]);
                fg += gv;
              }
              float bx[VL], bg[VL];
              ax.store(bx);
              ag.store(bg);
              for (int64_t k = 0; k < VL; ++k) { fx += bx[k]; fg += bg[k]; }
              sx += fx;
              sg += fg;
            }
            pda[r] = sx;
            pdb[r] = sg;
          }
        });
      } else {
        // NHWC: tasks are (batch, tile of 64 channels); each walks the batch's pixels.
        constexpr int64_t CT = 64;
        const int64_t ct = (C + CT - 1) / CT;
        at::parallel_for(0, B * ct, 1, [&](int64_t t0, int64_t t1) {
          for (int64_t task = t0; task < t1; ++task) {
            const int64_t bb = task / ct, c0 = (task % ct) * CT, n = std::min(CT, C - c0);
            const float* ab = pa + bb * C + c0;
            double sx[CT] = {0}, sg[CT] = {0};
            for (int64_t p0 = 0; p0 < HW; p0 += 64) {
              double fx[CT] = {0}, fg[CT] = {0};
              for (int64_t p = p0; p < std::min(HW, p0 + 64); ++p) {
                const int64_t off = (bb * HW + p) * C + c0;
                const scalar_t *xr = xp + off, *gr = gp + off;
                scalar_t* orow = op + off;
                for (int64_t i = 0; i < n; ++i) {
                  const float gv = float(gr[i]);
                  orow[i] = scalar_t(gv * ab[i]);
                  fx[i] += double(gv) * float(xr[i]);
                  fg[i] += gv;
                }
              }
              for (int64_t i = 0; i < n; ++i) { sx[i] += fx[i]; sg[i] += fg[i]; }
            }
            for (int64_t i = 0; i < n; ++i) { pda[bb * C + c0 + i] = sx[i]; pdb[bb * C + c0 + i] = sg[i]; }
          }
        });
      }
    });
  }
  return {dx, da.to(a.scalar_type()), db.to(a.scalar_type())};
}

// ------------------------------------------------------------------------------------ ddpm_step
at::Tensor ddpm_step_cpu(const at::Tensor& x_in, const at::Tensor& model_out, const at::Tensor& t,
                         const at::Tensor& t_prev, const at::Tensor& noise, double guidance, c10::string_view head_s,
                         double s, double scaler) {
  const DdpmArgs args = ddpm_args(x_in, model_out, t, t_prev, noise, head_s, s, scaler);
  const Dense& d = args.d;
  const at::Tensor& x = d.t;
  const int head = args.head;
  const bool cfg = args.cfg;
  const int64_t B = args.B, C = args.C, HW = args.HW, Co = args.Co;
  const at::Tensor &o = args.o, &z = args.z, &tt = args.t, &tp = args.tp;
  std::vector<StepCoef> coef(B);
  for (int64_t b = 0; b < B; ++b)
    coef[b] = step_coef<double>(tt.const_data_ptr<float>()[tt.numel() == 1 ? 0 : b],
                                tp.const_data_ptr<float>()[tp.numel() == 1 ? 0 : b], args.q);
  at::Tensor y = empty_in_layout(x, d.layout);
  if (x.numel() == 0) return y;
  const bool nchw = d.layout == Layout::NCHW;
  // (outer, inner) per batch: NCHW (c, p), NHWC (p, c); inner is contiguous in every tensor.
  const int64_t n_outer = nchw ? C : HW, n_inner = nchw ? HW : C;
  const int64_t so_outer = nchw ? HW : Co, half = nchw ? C * HW : C, sob = Co * HW, sxo = n_inner;
  const float w = float(guidance);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "ddpm_step_cpu", [&] {
    const scalar_t *xp = x.const_data_ptr<scalar_t>(), *op = o.const_data_ptr<scalar_t>(),
                   *zp = z.const_data_ptr<scalar_t>();
    scalar_t* yp = y.mutable_data_ptr<scalar_t>();
    at::parallel_for(0, B * n_outer, std::max<int64_t>(1, 16384 / n_inner), [&](int64_t r0, int64_t r1) {
      const Vec wv(w);
      for (int64_t r = r0; r < r1; ++r) {
        const int64_t b = r / n_outer, j = r % n_outer;
        const StepCoef k = coef[b];
        const Vec k0(k.k0), k1(k.k1), k2(k.k2);
        const int64_t xo = b * C * HW + j * sxo, oo = b * sob + j * so_outer;
        const scalar_t *xr = xp + xo, *zr = zp + xo, *oc = op + oo, *ou = cfg ? oc + B * sob : oc;
        scalar_t* yr = yp + xo;
        // One pass: model head (on whole vectors: the Stage B head's sigmoid is an exp per element), CFG
        // lerp, update. The model output's second half (b) exists only for heads 1 and 2.
        int64_t i = 0;
        for (; i + VL <= n_inner; i += VL) {
          const Vec xv = ld(xr + i);
          Vec e = head_eps_vec(head, xv, ld(oc + i), head ? ld(oc + i + half) : Vec(0.f));
          if (cfg) {
            const Vec u = head_eps_vec(head, xv, ld(ou + i), head ? ld(ou + i + half) : Vec(0.f));
            e = u + wv * (e - u);
          }
          st(yr + i, at::vec::fmadd(k0, xv - k1 * e, k2 * ld(zr + i)));
        }
        for (; i < n_inner; ++i) {
          const float xv = float(xr[i]);
          float e = head_eps(head, xv, float(oc[i]), head ? float(oc[i + half]) : 0.f);
          if (cfg) {
            const float u = head_eps(head, xv, float(ou[i]), head ? float(ou[i + half]) : 0.f);
            e = u + w * (e - u);
          }
          yr[i] = scalar_t(k.k0 * (xv - k.k1 * e) + k.k2 * float(zr[i]));
        }
      }
    });
  });
  return y;
}

// ------------------------------------------------------------------------------------ GRN
// x (B, P, C) contiguous rows. MODE 0: out[b, c] = Σ_p v²; MODE 1: out[b, c] = Σ_p dy·v and
// out_dy[c] = Σ_{b,p} dy. v = x or GELU(x). Tasks: (batch, tile of CT channels).
constexpr int64_t CT = 64;

template <typename T>
void colsum_impl(const T* x, const T* dy, double* out, double* out_dy, int64_t B, int64_t P, int64_t C, bool gelu_on) {
  const int64_t ct = (C + CT - 1) / CT;
  std::vector<double> part_dy(dy ? B * C : 0, 0.0);
  at::parallel_for(0, B * ct, 1, [&](int64_t t0, int64_t t1) {
    for (int64_t task = t0; task < t1; ++task) {
      const int64_t b = task / ct, c0 = (task % ct) * CT, n = std::min(CT, C - c0);
      double s1[CT] = {0}, s2[CT] = {0};
      alignas(64) float vb[CT];
      for (int64_t p0 = 0; p0 < P; p0 += 64) {
        double f1[CT] = {0}, f2[CT] = {0};
        for (int64_t p = p0; p < std::min(P, p0 + 64); ++p) {
          const int64_t off = (b * P + p) * C + c0;
          const T* xr = x + off;
          if (gelu_on) {
            gelu_tile(xr, vb, n);
          } else {
            for (int64_t i = 0; i < n; ++i) vb[i] = float(xr[i]);
          }
          if (!dy) {
            for (int64_t i = 0; i < n; ++i) { const double v = vb[i]; f1[i] += v * v; }
          } else {
            const T* gr = dy + off;
            for (int64_t i = 0; i < n; ++i) {
              const double v = vb[i], g = float(gr[i]);
              f1[i] += g * v;
              f2[i] += g;
            }
          }
        }
        for (int64_t i = 0; i < n; ++i) { s1[i] += f1[i]; s2[i] += f2[i]; }
      }
      for (int64_t i = 0; i < n; ++i) {
        out[b * C + c0 + i] = s1[i];
        if (dy) part_dy[b * C + c0 + i] = s2[i];
      }
    }
  });
  if (dy)
    for (int64_t c = 0; c < C; ++c) {
      double s = 0;
      for (int64_t b = 0; b < B; ++b) s += part_dy[b * C + c];
      out_dy[c] = s;
    }
}

std::tuple<at::Tensor, at::Tensor> grn_colsum_cpu(const at::Tensor& x_in, const c10::optional<at::Tensor>& dy_in,
                                                  bool gelu_on) {
  const at::Tensor x = rows4(x_in, "grn_colsum");
  const int64_t B = x.size(0), P = x.size(1) * x.size(2), C = x.size(3);
  const at::Tensor dy = dy_in.has_value() ? grn_dy(*dy_in, x, "grn_colsum") : at::Tensor();
  at::Tensor out = at::zeros({B, C}, x.options().dtype(at::kDouble));
  at::Tensor out_dy = at::zeros({dy.defined() ? C : 1}, out.options());
  if (x.numel() == 0) return {out, out_dy};
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "grn_colsum_cpu", [&] {
    colsum_impl<scalar_t>(x.const_data_ptr<scalar_t>(), dy.defined() ? dy.const_data_ptr<scalar_t>() : nullptr,
                          out.mutable_data_ptr<double>(), out_dy.mutable_data_ptr<double>(), B, P, C, gelu_on);
  });
  return {out, out_dy};
}

// out = v·s[b, c] (+ β[c]); DX = (dy·s + v·t)(·GELU'(x)).
at::Tensor grn_apply_cpu(const at::Tensor& x_in, const at::Tensor& scale, const c10::optional<at::Tensor>& beta,
                         bool gelu_on) {
  const at::Tensor x = rows4(x_in, "grn_apply");
  const int64_t B = x.size(0), P = x.size(1) * x.size(2), C = x.size(3);
  const at::Tensor sc = bc_float(scale, B, C, "grn_apply: scale");
  at::Tensor bt = grn_beta(beta, C);
  if (!bt.defined()) bt = at::zeros({C}, sc.options());
  at::Tensor y = at::empty_like(x);
  if (x.numel() == 0) return y;
  const float *ps = sc.const_data_ptr<float>(), *pb = bt.const_data_ptr<float>();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "grn_apply_cpu", [&] {
    const scalar_t* xp = x.const_data_ptr<scalar_t>();
    scalar_t* yp = y.mutable_data_ptr<scalar_t>();
    at::parallel_for(0, B * P, std::max<int64_t>(1, 16384 / C), [&](int64_t r0, int64_t r1) {
      alignas(64) float buf[CT];
      for (int64_t r = r0; r < r1; ++r) {
        const float* sb = ps + (r / P) * C;
        const scalar_t* xr = xp + r * C;
        scalar_t* yr = yp + r * C;
        if (!gelu_on) {
          axpb_row(xr, yr, C, sb, pb, true, 0.f, 0.f);
          continue;
        }
        for (int64_t c0 = 0; c0 < C; c0 += CT) {
          const int64_t n = std::min(CT, C - c0);
          gelu_tile(xr + c0, buf, n);
          axpb_row(buf, yr + c0, n, sb + c0, pb + c0, true, 0.f, 0.f);
        }
      }
    });
  });
  return y;
}

at::Tensor grn_apply_backward_cpu(const at::Tensor& x_in, const at::Tensor& dy_in, const at::Tensor& scale,
                                  const at::Tensor& t, bool gelu_on) {
  const at::Tensor x = rows4(x_in, "grn_apply_backward");
  const at::Tensor dy = grn_dy(dy_in, x, "grn_apply_backward");
  const int64_t B = x.size(0), P = x.size(1) * x.size(2), C = x.size(3);
  const at::Tensor sc = bc_float(scale, B, C, "grn_apply_backward: scale"), tc = bc_float(t, B, C, "grn_apply_backward: t");
  at::Tensor dx = at::empty_like(x);
  if (x.numel() == 0) return dx;
  const float *ps = sc.const_data_ptr<float>(), *pt = tc.const_data_ptr<float>();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "grn_apply_backward_cpu", [&] {
    const scalar_t *xp = x.const_data_ptr<scalar_t>(), *gp = dy.const_data_ptr<scalar_t>();
    scalar_t* op = dx.mutable_data_ptr<scalar_t>();
    at::parallel_for(0, B * P, std::max<int64_t>(1, 16384 / C), [&](int64_t r0, int64_t r1) {
      alignas(64) float xb[CT], gb[CT], sv[CT], tv[CT];
      for (int64_t r = r0; r < r1; ++r) {
        const float *sb = ps + (r / P) * C, *tb = pt + (r / P) * C;
        const scalar_t *xr = xp + r * C, *gr = gp + r * C;
        scalar_t* orow = op + r * C;
        if (gelu_on) {  // (dy·s + GELU(x)·t)·GELU'(x), a tile of CT channels at a time
          for (int64_t c0 = 0; c0 < C; c0 += CT) {
            const int64_t n = std::min(CT, C - c0);
            const int64_t np = load_padded(xr + c0, xb, n);
            load_padded(gr + c0, gb, n);
            for (int64_t i = 0; i < n; ++i) { sv[i] = sb[c0 + i]; tv[i] = tb[c0 + i]; }
            for (int64_t i = n; i < np; ++i) { sv[i] = 0.f; tv[i] = 0.f; }
            for (int64_t i = 0; i < np; i += VL) {
              const Vec xv = Vec::loadu(xb + i);
              const Vec r = at::vec::fmadd(Vec::loadu(gb + i), Vec::loadu(sv + i), gelu_vec(xv) * Vec::loadu(tv + i));
              (r * gelu_grad_vec(xv)).store(xb + i);
            }
            for (int64_t i = 0; i < n; ++i) orow[c0 + i] = scalar_t(xb[i]);
          }
        } else {
          int64_t c = 0;
          for (; c + VL <= C; c += VL)
            st(orow + c, at::vec::fmadd(ld(gr + c), Vec::loadu(sb + c), ld(xr + c) * Vec::loadu(tb + c)));
          for (; c < C; ++c) orow[c] = scalar_t(float(gr[c]) * sb[c] + float(xr[c]) * tb[c]);
        }
      }
    });
  });
  return dx;
}

}  // namespace

const char* cpu_isa() { return WF_CPU_ISA; }

int64_t cpu_parallel_chunks(int64_t n) {
  std::atomic<int64_t> chunks{0};
  at::parallel_for(0, n, 1, [&](int64_t, int64_t) { chunks.fetch_add(1); });
  return chunks.load();
}

}  // namespace wf

TORCH_LIBRARY_IMPL(wuerstchen_fast_C, CPU, m) {
  m.impl("modulate", &wf::modulate_cpu);
  m.impl("modulate_backward", &wf::modulate_backward_cpu);
  m.impl("ddpm_step", &wf::ddpm_step_cpu);
  m.impl("grn_colsum", &wf::grn_colsum_cpu);
  m.impl("grn_apply", &wf::grn_apply_cpu);
  m.impl("grn_apply_backward", &wf::grn_apply_backward_cpu);
}
