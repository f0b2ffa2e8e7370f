// CUDA kernels of the fused elementwise / per-channel-reduction ops: modulate (forward, backward),
// ddpm_step (model head + CFG lerp + DDPM update) and GRN (column sums, apply, apply backward, GELU
// folded in for the ResBlock). Same math as csrc/cpu/fused_elementwise.cpp (shared helpers in
// csrc/fused_common.h).
//
// Loads: elementwise kernels move 16 bytes per thread per access (float4 of fp32, 8 x bf16/fp16)
// when the innermost extent and the pointers allow it, else one element; consecutive threads take
// consecutive vectors along the contiguous axis (coalesced). Accumulation float32; the per-(b, c)
// reductions of GRN and modulate's backward accumulate float32 per thread and float64 across threads
// (atomicAdd on double, sm_60+). Launched on the current stream, every launch checked.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <cstdint>

#include "../../csrc/fused_host.h"

namespace wf {
namespace {

constexpr int THREADS = 256;

// 16-byte packets of T.
template <typename T>
struct alignas(16) Pack {
  static constexpr int N = 16 / sizeof(T);
  T v[N];
};

template <typename T>
inline bool aligned16(const T* p) {
  return reinterpret_cast<std::uintptr_t>(p) % 16 == 0;
}

inline int64_t blocks_for(int64_t n, int threads = THREADS) {
  return std::min<int64_t>((n + threads - 1) / threads, int64_t(1) << 20);
}

// ------------------------------------------------------------------------------------ modulate
// y = x * A[b, c] + Bv[b, c] with A = 1 + a. Element e of a dense tensor has (b, c) index
// NCHW: e / HW;  NHWC: (e / (HW*C)) * C + e % C.  VEC: packets never straddle a (b, c) row
// (HW % N == 0 for NCHW, C % N == 0 for NHWC).
template <typename T, bool NHWC, bool VEC>
__global__ void __launch_bounds__(THREADS)
modulate_kernel(const T* __restrict__ x, const float* __restrict__ A, const float* __restrict__ Bv, T* __restrict__ y,
                int64_t n, int64_t HW, int64_t C) {
  constexpr int N = VEC ? Pack<T>::N : 1;
  const int64_t np = n / N;
  for (int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < np; i += int64_t(gridDim.x) * blockDim.x) {
    const int64_t e = i * N;
    if constexpr (VEC) {
      Pack<T> px = reinterpret_cast<const Pack<T>*>(x)[i], py;
      const int64_t bc = NHWC ? (e / (HW * C)) * C + e % C : e / HW;  // packets never straddle a row
#pragma unroll
      for (int k = 0; k < N; ++k) {
        const int64_t j = NHWC ? bc + k : bc;
        py.v[k] = T(float(px.v[k]) * A[j] + Bv[j]);
      }
      reinterpret_cast<Pack<T>*>(y)[i] = py;
    } else {
      const int64_t bc = NHWC ? (e / (HW * C)) * C + e % C : e / HW;
      y[e] = T(float(x[e]) * A[bc] + Bv[bc]);
    }
  }
}

// Backward: dx = g * A; da[b, c] += Σ g·x, db[b, c] += Σ g. One block per (row of 32 (b, c) pairs in
// NHWC | one (b, c) in NCHW) x pixel chunk.
template <typename T>
__global__ void __launch_bounds__(THREADS)
modulate_bwd_nchw_kernel(const T* __restrict__ g, const T* __restrict__ x, const float* __restrict__ A,
                         T* __restrict__ dx, double* __restrict__ da, double* __restrict__ db, int64_t HW) {
  const int64_t bc = blockIdx.y;
  const float a = A[bc];
  float sx = 0.f, sg = 0.f;
  for (int64_t p = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; p < HW; p += int64_t(gridDim.x) * blockDim.x) {
    const int64_t e = bc * HW + p;
    const float gv = float(g[e]);
    dx[e] = T(gv * a);
    sx += gv * float(x[e]);
    sg += gv;
  }
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) {
    sx += __shfl_xor_sync(0xffffffffu, sx, off);
    sg += __shfl_xor_sync(0xffffffffu, sg, off);
  }
  if ((threadIdx.x & 31) == 0) {
    atomicAdd(da + bc, double(sx));
    atomicAdd(db + bc, double(sg));
  }
}

// NHWC (and GRN's (B, P, C) rows): a block of 32 x 8 threads; lanes take 32 consecutive channels,
// warps stride pixels; column sums merged in shared memory, then one double atomic per column.
// MODE 0: s1 += v², MODE 1: s1 += g·v and s2 += g (GRN, v = x or GELU(x)), MODE 2: modulate
// backward (dx = g·A written, s1 += g·x, s2 += g).
template <typename T, int MODE, bool GELU>
__global__ void __launch_bounds__(256)
colsum_rows_kernel(const T* __restrict__ x, const T* __restrict__ g, const float* __restrict__ A, T* __restrict__ dx,
                   double* __restrict__ s1, double* __restrict__ s2, int64_t P, int64_t C, int64_t chunk) {
  const int64_t c = int64_t(blockIdx.x) * 32 + threadIdx.x;
  const int64_t b = blockIdx.z;
  const int64_t p0 = int64_t(blockIdx.y) * chunk, p1 = min(P, p0 + chunk);
  float a1 = 0.f, a2 = 0.f;
  if (c < C) {
    const float av = MODE == 2 ? A[b * C + c] : 0.f;
    for (int64_t p = p0 + threadIdx.y; p < p1; p += 8) {
      const int64_t e = (b * P + p) * C + c;
      float v = float(x[e]);
      if constexpr (GELU) v = gelu(v);
      if constexpr (MODE == 0) {
        a1 += v * v;
      } else {
        const float gv = float(g[e]);
        a1 += gv * v;
        a2 += gv;
        if constexpr (MODE == 2) dx[e] = T(gv * av);
      }
    }
  }
  __shared__ float buf[2][8][32];
  buf[0][threadIdx.y][threadIdx.x] = a1;
  buf[1][threadIdx.y][threadIdx.x] = a2;
  __syncthreads();
  if (threadIdx.y == 0 && c < C) {
    float t1 = 0.f, t2 = 0.f;
#pragma unroll
    for (int w = 0; w < 8; ++w) {
      t1 += buf[0][w][threadIdx.x];
      t2 += buf[1][w][threadIdx.x];
    }
    atomicAdd(s1 + b * C + c, double(t1));
    if constexpr (MODE == 1) atomicAdd(s2 + c, double(t2));
    if constexpr (MODE == 2) atomicAdd(s2 + b * C + c, double(t2));
  }
}

template <typename T, int MODE, bool GELU>
void launch_colsum(const T* x, const T* g, const float* A, T* dx, double* s1, double* s2, int64_t B, int64_t P,
                   int64_t C, cudaStream_t stream) {
  const int64_t ctiles = (C + 31) / 32;
  const int64_t splits = std::max<int64_t>(1, std::min<int64_t>((P + 63) / 64, (1024 + B * ctiles - 1) / (B * ctiles)));
  const int64_t chunk = (P + splits - 1) / splits;
  TORCH_CHECK(B <= 65535 && splits <= 65535, "colsum: too many batches");
  const dim3 grid(ctiles, (P + chunk - 1) / chunk, B), block(32, 8);
  colsum_rows_kernel<T, MODE, GELU><<<grid, block, 0, stream>>>(x, g, A, dx, s1, s2, P, C, chunk);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

at::Tensor modulate_cuda(const at::Tensor& x_in, const at::Tensor& a, const at::Tensor& b) {
  const c10::cuda::CUDAGuard guard(x_in.device());
  const ModulateArgs m = modulate_args(x_in, a, &b, "modulate");
  const Dense& d = m.d;
  const at::Tensor& x = d.t;
  const int64_t C = m.C, HW = m.HW, n = x.numel();
  const at::Tensor &A = m.A, &Bv = m.Bv;
  at::Tensor y = empty_in_layout(x, d.layout);
  if (n == 0) return y;
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "modulate_cuda", [&] {
    using T = scalar_t;
    const T* xp = x.const_data_ptr<T>();
    T* yp = y.mutable_data_ptr<T>();
    constexpr int N = Pack<T>::N;
    const bool nhwc = d.layout == Layout::NHWC;
    const bool vec = aligned16(xp) && aligned16(yp) && ((nhwc ? C : HW) % N == 0) && !std::is_same_v<T, double>;
    const float *pa = A.const_data_ptr<float>(), *pb = Bv.const_data_ptr<float>();
    const int64_t grid = blocks_for(vec ? n / N : n);
    if (nhwc) {
      if (vec) modulate_kernel<T, true, true><<<grid, THREADS, 0, stream>>>(xp, pa, pb, yp, n, HW, C);
      else modulate_kernel<T, true, false><<<grid, THREADS, 0, stream>>>(xp, pa, pb, yp, n, HW, C);
    } else {
      if (vec) modulate_kernel<T, false, true><<<grid, THREADS, 0, stream>>>(xp, pa, pb, yp, n, HW, C);
      else modulate_kernel<T, false, false><<<grid, THREADS, 0, stream>>>(xp, pa, pb, yp, n, HW, C);
    }
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return y;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> modulate_backward_cuda(const at::Tensor& grad, const at::Tensor& x_in,
                                                                      const at::Tensor& a) {
  const c10::cuda::CUDAGuard guard(x_in.device());
  const ModulateArgs m = modulate_args(x_in, a, nullptr, "modulate_backward");
  const Dense& d = m.d;
  const at::Tensor& x = d.t;
  const at::Tensor g = like_x(grad, x, d.layout, "modulate_backward", "grad");
  const int64_t B = m.B, C = m.C, HW = m.HW;
  const at::Tensor& A = m.A;
  at::Tensor dx = empty_in_layout(x, d.layout);
  at::Tensor da = at::zeros({B, C}, x.options().dtype(at::kDouble)), db = at::zeros({B, C}, da.options());
  if (x.numel() > 0) {
    const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "modulate_backward_cuda", [&] {
      using T = scalar_t;
      const T *xp = x.const_data_ptr<T>(), *gp = g.const_data_ptr<T>();
      T* op = dx.mutable_data_ptr<T>();
      double *pda = da.mutable_data_ptr<double>(), *pdb = db.mutable_data_ptr<double>();
      if (d.layout == Layout::NCHW) {
        TORCH_CHECK(B * C <= 65535, "modulate_backward: B*C above 65535 in NCHW");
        const dim3 grid(std::min<int64_t>((HW + THREADS - 1) / THREADS, 64), B * C);
        modulate_bwd_nchw_kernel<T><<<grid, THREADS, 0, stream>>>(gp, xp, A.const_data_ptr<float>(), op, pda, pdb, HW);
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      } else {
        launch_colsum<T, 2, false>(xp, gp, A.const_data_ptr<float>(), op, pda, pdb, B, HW, C, stream);
      }
    });
  }
  return {dx, da.to(a.scalar_type()), db.to(a.scalar_type())};
}

// ------------------------------------------------------------------------------------ ddpm_step
// One thread per VEC-packet of consecutive elements along the contiguous axis.
template <typename T, int HEAD, bool CFG>
__global__ void __launch_bounds__(THREADS)
ddpm_kernel(const T* __restrict__ x, const T* __restrict__ o, const T* __restrict__ z, const float* __restrict__ t,
            const float* __restrict__ tp, T* __restrict__ y, int64_t n, int64_t C, int64_t HW, int64_t B, bool nhwc,
            int64_t st, int64_t stp, float w, Schedule q) {
  const int64_t Co = HEAD == 0 ? C : 2 * C, sob = Co * HW, half = nhwc ? C : C * HW;
  for (int64_t e = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; e < n; e += int64_t(gridDim.x) * blockDim.x) {
    const int64_t b = e / (C * HW), r = e - b * C * HW;
    // r = c*HW + p (NCHW) or p*C + c (NHWC): the model output's index in its own (Co-channel) layout
    const int64_t oo = b * sob + (nhwc ? (r / C) * Co + r % C : r);
    const StepCoef k = step_coef<float>(t[b * st], tp[b * stp], q);
    const float xv = float(x[e]);
    float eps = head_eps(HEAD, xv, float(o[oo]), HEAD ? float(o[oo + half]) : 0.f);
    if constexpr (CFG) {
      const int64_t ou = oo + B * sob;
      const float u = head_eps(HEAD, xv, float(o[ou]), HEAD ? float(o[ou + half]) : 0.f);
      eps = u + w * (eps - u);
    }
    y[e] = T(k.k0 * (xv - k.k1 * eps) + k.k2 * float(z[e]));
  }
}

at::Tensor ddpm_step_cuda(const at::Tensor& x_in, const at::Tensor& model_out, const at::Tensor& t,
                          const at::Tensor& t_prev, const at::Tensor& noise, double guidance, c10::string_view head_s,
                          double s, double scaler) {
  const c10::cuda::CUDAGuard guard(x_in.device());
  const DdpmArgs args = ddpm_args(x_in, model_out, t, t_prev, noise, head_s, s, scaler);
  const Dense& d = args.d;
  const at::Tensor& x = d.t;
  const int head = args.head;
  const bool cfg = args.cfg;
  const int64_t B = args.B, C = args.C, HW = args.HW;
  const at::Tensor &o = args.o, &z = args.z, &tt = args.t, &tp = args.tp;
  const Schedule q = args.q;
  at::Tensor y = empty_in_layout(x, d.layout);
  const int64_t n = x.numel();
  if (n == 0) return y;
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const bool nhwc = d.layout == Layout::NHWC;
  const int64_t st = tt.numel() == 1 ? 0 : 1, stp = tp.numel() == 1 ? 0 : 1;
#define WF_DDPM(H, G) \
  ddpm_kernel<T, H, G><<<grid, THREADS, 0, stream>>>(xp, op, zp, ptt, ptp, yp, n, C, HW, B, nhwc, st, stp, w, q)
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "ddpm_step_cuda", [&] {
    using T = scalar_t;
    const T *xp = x.const_data_ptr<T>(), *op = o.const_data_ptr<T>(), *zp = z.const_data_ptr<T>();
    T* yp = y.mutable_data_ptr<T>();
    const float *ptt = tt.const_data_ptr<float>(), *ptp = tp.const_data_ptr<float>();
    const int64_t grid = blocks_for(n);
    const float w = float(guidance);
    if (head == 0) { if (cfg) WF_DDPM(0, true); else WF_DDPM(0, false); }
    else if (head == 1) { if (cfg) WF_DDPM(1, true); else WF_DDPM(1, false); }
    else { if (cfg) WF_DDPM(2, true); else WF_DDPM(2, false); }
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
#undef WF_DDPM
  return y;
}

// ------------------------------------------------------------------------------------ GRN
template <typename T, bool BWD, bool GELU, bool HAS_BETA>
__global__ void __launch_bounds__(THREADS)
grn_apply_kernel(const T* __restrict__ x, const T* __restrict__ g, const float* __restrict__ sc,
                 const float* __restrict__ tt, const float* __restrict__ beta, T* __restrict__ y, int64_t n, int64_t P,
                 int64_t C) {
  constexpr int N = Pack<T>::N;  // the launcher guarantees C % N == 0 and 16-byte alignment
  const int64_t np = n / N;
  for (int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < np; i += int64_t(gridDim.x) * blockDim.x) {
    const int64_t e = i * N, c0 = e % C, bc = (e / (P * C)) * C + c0;
    const Pack<T> px = reinterpret_cast<const Pack<T>*>(x)[i];
    Pack<T> pg, py;
    if constexpr (BWD) pg = reinterpret_cast<const Pack<T>*>(g)[i];
#pragma unroll
    for (int k = 0; k < N; ++k) {
      const float xv = float(px.v[k]);
      const float v = GELU ? gelu(xv) : xv;
      float r;
      if constexpr (BWD) {
        r = float(pg.v[k]) * sc[bc + k] + v * tt[bc + k];
        if constexpr (GELU) r *= gelu_grad(xv);
      } else {
        r = v * sc[bc + k];
        if constexpr (HAS_BETA) r += beta[c0 + k];
      }
      py.v[k] = T(r);
    }
    reinterpret_cast<Pack<T>*>(y)[i] = py;
  }
}

template <typename T, bool BWD, bool GELU, bool HAS_BETA>
__global__ void __launch_bounds__(THREADS)
grn_apply_scalar_kernel(const T* __restrict__ x, const T* __restrict__ g, const float* __restrict__ sc,
                        const float* __restrict__ tt, const float* __restrict__ beta, T* __restrict__ y, int64_t n,
                        int64_t P, int64_t C) {
  for (int64_t e = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; e < n; e += int64_t(gridDim.x) * blockDim.x) {
    const int64_t c = e % C, bc = (e / (P * C)) * C + c;
    const float xv = float(x[e]);
    const float v = GELU ? gelu(xv) : xv;
    float r;
    if constexpr (BWD) {
      r = float(g[e]) * sc[bc] + v * tt[bc];
      if constexpr (GELU) r *= gelu_grad(xv);
    } else {
      r = v * sc[bc];
      if constexpr (HAS_BETA) r += beta[c];
    }
    y[e] = T(r);
  }
}

template <bool BWD, bool GELU, bool HAS_BETA, typename T>
void launch_apply(const T* x, const T* g, const float* sc, const float* tt, const float* beta, T* y, int64_t n, int64_t P,
                  int64_t C, cudaStream_t stream) {
  constexpr int N = Pack<T>::N;
  const bool vec = C % N == 0 && aligned16(x) && aligned16(y) && (!BWD || aligned16(g)) && !std::is_same_v<T, double>;
  if (vec)
    grn_apply_kernel<T, BWD, GELU, HAS_BETA><<<blocks_for(n / N), THREADS, 0, stream>>>(x, g, sc, tt, beta, y, n, P, C);
  else
    grn_apply_scalar_kernel<T, BWD, GELU, HAS_BETA><<<blocks_for(n), THREADS, 0, stream>>>(x, g, sc, tt, beta, y, n, P, C);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

std::tuple<at::Tensor, at::Tensor> grn_colsum_cuda(const at::Tensor& x_in, const c10::optional<at::Tensor>& dy_in,
                                                   bool gelu_on) {
  const c10::cuda::CUDAGuard guard(x_in.device());
  const at::Tensor x = rows4(x_in, "grn_colsum");
  const int64_t B = x.size(0), P = x.size(1) * x.size(2), C = x.size(3);
  const at::Tensor dy = dy_in.has_value() ? grn_dy(*dy_in, x, "grn_colsum") : at::Tensor();
  at::Tensor out = at::zeros({B, C}, x.options().dtype(at::kDouble));
  at::Tensor out_dy = at::zeros({dy.defined() ? C : 1}, out.options());
  if (x.numel() == 0) return {out, out_dy};
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "grn_colsum_cuda", [&] {
    using T = scalar_t;
    const T *xp = x.const_data_ptr<T>(), *gp = dy.defined() ? dy.const_data_ptr<T>() : nullptr;
    double *s1 = out.mutable_data_ptr<double>(), *s2 = out_dy.mutable_data_ptr<double>();
    if (!gp) {
      if (gelu_on) launch_colsum<T, 0, true>(xp, gp, nullptr, nullptr, s1, s2, B, P, C, stream);
      else launch_colsum<T, 0, false>(xp, gp, nullptr, nullptr, s1, s2, B, P, C, stream);
    } else {
      if (gelu_on) launch_colsum<T, 1, true>(xp, gp, nullptr, nullptr, s1, s2, B, P, C, stream);
      else launch_colsum<T, 1, false>(xp, gp, nullptr, nullptr, s1, s2, B, P, C, stream);
    }
  });
  return {out, out_dy};
}

at::Tensor grn_apply_cuda(const at::Tensor& x_in, const at::Tensor& scale, const c10::optional<at::Tensor>& beta,
                          bool gelu_on) {
  const c10::cuda::CUDAGuard guard(x_in.device());
  const at::Tensor x = rows4(x_in, "grn_apply");
  const int64_t B = x.size(0), P = x.size(1) * x.size(2), C = x.size(3);
  const at::Tensor sc = bc_float(scale, B, C, "grn_apply: scale");
  const at::Tensor bt = grn_beta(beta, C);
  at::Tensor y = at::empty_like(x);
  if (x.numel() == 0) return y;
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "grn_apply_cuda", [&] {
    using T = scalar_t;
    const T* xp = x.const_data_ptr<T>();
    T* yp = y.mutable_data_ptr<T>();
    const float *ps = sc.const_data_ptr<float>(), *pb = bt.defined() ? bt.const_data_ptr<float>() : nullptr;
    if (gelu_on) {
      if (pb) launch_apply<false, true, true>(xp, xp, ps, ps, pb, yp, x.numel(), P, C, stream);
      else launch_apply<false, true, false>(xp, xp, ps, ps, pb, yp, x.numel(), P, C, stream);
    } else {
      if (pb) launch_apply<false, false, true>(xp, xp, ps, ps, pb, yp, x.numel(), P, C, stream);
      else launch_apply<false, false, false>(xp, xp, ps, ps, pb, yp, x.numel(), P, C, stream);
    }
  });
  return y;
}

at::Tensor grn_apply_backward_cuda(const at::Tensor& x_in, const at::Tensor& dy_in, const at::Tensor& scale,
                                   const at::Tensor& t, bool gelu_on) {
  const c10::cuda::CUDAGuard guard(x_in.device());
  const at::Tensor x = rows4(x_in, "grn_apply_backward");
  const at::Tensor dy = grn_dy(dy_in, x, "grn_apply_backward");
  const int64_t B = x.size(0), P = x.size(1) * x.size(2), C = x.size(3);
  const at::Tensor sc = bc_float(scale, B, C, "grn_apply_backward: scale"), tc = bc_float(t, B, C, "grn_apply_backward: t");
  at::Tensor dx = at::empty_like(x);
  if (x.numel() == 0) return dx;
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "grn_apply_backward_cuda", [&] {
    using T = scalar_t;
    const T *xp = x.const_data_ptr<T>(), *gp = dy.const_data_ptr<T>();
    T* op = dx.mutable_data_ptr<T>();
    if (gelu_on)
      launch_apply<true, true, false>(xp, gp, sc.const_data_ptr<float>(), tc.const_data_ptr<float>(), nullptr, op,
                                      x.numel(), P, C, stream);
    else
      launch_apply<true, false, false>(xp, gp, sc.const_data_ptr<float>(), tc.const_data_ptr<float>(), nullptr, op,
                                       x.numel(), P, C, stream);
  });
  return dx;
}

}  // namespace
}  // namespace wf

TORCH_LIBRARY_IMPL(wuerstchen_fast_C, CUDA, m) {
  m.impl("modulate", &wf::modulate_cuda);
  m.impl("modulate_backward", &wf::modulate_backward_cuda);
  m.impl("ddpm_step", &wf::ddpm_step_cuda);
  m.impl("grn_colsum", &wf::grn_colsum_cuda);
  m.impl("grn_apply", &wf::grn_apply_cuda);
  m.impl("grn_apply_backward", &wf::grn_apply_backward_cuda);
}
