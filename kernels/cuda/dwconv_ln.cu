// dwconv_ln on CUDA: depthwise 3x3 conv (zero padding 1) + bias, then LayerNorm over channels (no
// affine): the first half of the ConvNeXt ResBlocks. Same math as csrc/cpu/dwconv_ln.cpp:
//   d = bias + Σ_t w[:, t] x[n(p, t)];  y = (d - mean) * rstd, rstd = 1/sqrt(var + eps)
// Backward, recomputing d and the statistics from x (nothing else is saved):
//   dd = rstd (g - mean(g) - xh mean(g xh))          (_dd kernel, dd float32 channels-last rows)
//   dw[t] = Σ_p dd ⊙ x[n(p, t)],  dbias = Σ_p dd     (_dw kernel)
//   dx[q] = Σ_t w[:, t] ⊙ dd[q - off(t)]             (_dx kernel)
// Layout: x, y, dy, dx channels-last (B, H, W, C): the host copies other layouts. Taps float32 (9, C).
// Threads: _fwd and _dd give one warp per pixel (grid-stride); lane l takes packs l, l + 32, ... of
// N channels, N = 16 / sizeof(T) (one 16-byte load per tap, coalesced over the warp) when C % N == 0
// and the pointers are 16-byte aligned, else N = 1. The conv is computed twice per pass (statistics,
// then output): the second read of the 3x3 neighbourhood hits L1/L2 and keeps registers to one pack,
// so any C runs without spills. Statistics: per pack mean/M2 (and Σg, Σg(d - mean)), Chan-merged
// across packs and lanes (warp shuffles), float32. _dw: 32 x 8 threads, lanes over 4-channel packs,
// rows over pixels, 40 float32 accumulators per thread, reduced over the block in shared memory and
// added with float32 atomics. _dx: one thread per N-channel pack of a pixel.
// Accumulation float32 for float32, bfloat16 and float16. Launched on the current stream, every
// launch checked. Limits: 3x3 depthwise, one input channel per group; H, W < 2^31.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <cstdint>

#include "../../csrc/dwconv_host.h"
#include "pack.cuh"
#include "welford.cuh"

namespace wf {
namespace {

constexpr int THREADS = 256, WARPS = THREADS / 32;

// Statistics (count, mean, M2 of d; backward Σg, Σg·(d - mean)): welford.cuh.

struct Pixel {
  int64_t img;  // index of the image's first pixel, b*H*W
  int y, x;
};

__device__ __forceinline__ Pixel pixel(int64_t p, int H, int W) {
  const int64_t hw = int64_t(H) * W;
  const int r = int(p % hw);
  return {p - r, r / W, r % W};
}

// d[0:N] = bias + Σ_t taps[t] ⊙ x[n(p, t)] over channels c..c+N-1.
template <typename T, int N>
__device__ __forceinline__ void conv_pack(const T* __restrict__ x, const float* __restrict__ taps,
                                          const float* __restrict__ bias, float (&d)[N], const Pixel& px, int H,
                                          int W, int64_t C, int64_t c) {
  const Pack<float, N> bv = load<float, N>(bias + c);
#pragma unroll
  for (int k = 0; k < N; ++k) d[k] = bv.v[k];
#pragma unroll
  for (int t = 0; t < 9; ++t) {
    const int yy = px.y + t / 3 - 1, xx = px.x + t % 3 - 1;
    if (yy < 0 || yy >= H || xx < 0 || xx >= W) continue;
    const Pack<T, N> v = load<T, N>(x + (px.img + int64_t(yy) * W + xx) * C + c);
    const Pack<float, N> w = load<float, N>(taps + t * C + c);
#pragma unroll
    for (int k = 0; k < N; ++k) d[k] = fmaf(float(v.v[k]), w.v[k], d[k]);
  }
}

// The statistics of one pack, as an Acc to merge.
template <typename T, int N>
__global__ void __launch_bounds__(THREADS)
dwconv_ln_fwd_kernel(const T* __restrict__ x, const float* __restrict__ taps, const float* __restrict__ bias,
                     T* __restrict__ y, int64_t P, int H, int W, int64_t C, float eps) {
  const int lane = threadIdx.x % 32;
  const int64_t packs = C / N;
  for (int64_t p = int64_t(blockIdx.x) * WARPS + threadIdx.x / 32; p < P; p += int64_t(gridDim.x) * WARPS) {
    const Pixel px = pixel(p, H, W);
    Acc s{0.f, 0.f, 0.f, 0.f, 0.f};
    float d[N], unused[N];
    for (int64_t q = lane; q < packs; q += 32) {
      conv_pack<T, N>(x, taps, bias, d, px, H, W, C, q * N);
      s = merge<false>(s, pack_acc<false, N>(d, unused));
    }
    s = warp_merge<false>(s);
    const float rstd = rsqrtf(s.m2 / float(C) + eps);
    for (int64_t q = lane; q < packs; q += 32) {
      conv_pack<T, N>(x, taps, bias, d, px, H, W, C, q * N);
      Pack<T, N> o;
#pragma unroll
      for (int k = 0; k < N; ++k) o.v[k] = T((d[k] - s.mean) * rstd);
      *reinterpret_cast<Pack<T, N>*>(y + p * C + q * N) = o;
    }
  }
}

template <typename T, int N>
__global__ void __launch_bounds__(THREADS)
dwconv_ln_dd_kernel(const T* __restrict__ x, const T* __restrict__ gy, const float* __restrict__ taps,
                    const float* __restrict__ bias, float* __restrict__ dd, int64_t P, int H, int W, int64_t C,
                    float eps) {
  const int lane = threadIdx.x % 32;
  const int64_t packs = C / N;
  for (int64_t p = int64_t(blockIdx.x) * WARPS + threadIdx.x / 32; p < P; p += int64_t(gridDim.x) * WARPS) {
    const Pixel px = pixel(p, H, W);
    Acc s{0.f, 0.f, 0.f, 0.f, 0.f};
    float d[N], g[N];
    for (int64_t q = lane; q < packs; q += 32) {
      conv_pack<T, N>(x, taps, bias, d, px, H, W, C, q * N);
      const Pack<T, N> gv = load<T, N>(gy + p * C + q * N);
#pragma unroll
      for (int k = 0; k < N; ++k) g[k] = float(gv.v[k]);
      s = merge<true>(s, pack_acc<true, N>(d, g));
    }
    s = warp_merge<true>(s);
    const float rstd = rsqrtf(s.m2 / float(C) + eps);
    // dd = rstd g + kd (d - mean) + k0: kd = -rstd² mean(g·xh), k0 = -rstd mean(g) (three roundings per value)
    const float kd = -rstd * rstd * (rstd * s.ga / float(C)), k0 = -rstd * (s.gs / float(C));
    for (int64_t q = lane; q < packs; q += 32) {
      conv_pack<T, N>(x, taps, bias, d, px, H, W, C, q * N);
      const Pack<T, N> gv = load<T, N>(gy + p * C + q * N);
      Pack<float, N> o;
#pragma unroll
      for (int k = 0; k < N; ++k) o.v[k] = fmaf(rstd, float(gv.v[k]), fmaf(kd, d[k] - s.mean, k0));
      *reinterpret_cast<Pack<float, N>*>(dd + p * C + q * N) = o;
    }
  }
}

// dw (9, C) and dbias (C,) float32, zero-initialised: block (32, 8), lanes over packs of N channels.
template <typename T, int N>
__global__ void __launch_bounds__(THREADS)
dwconv_ln_dw_kernel(const T* __restrict__ x, const float* __restrict__ dd, float* __restrict__ dw,
                    float* __restrict__ db, int64_t P, int H, int W, int64_t C) {
  const int64_t q = int64_t(blockIdx.x) * 32 + threadIdx.x;
  const bool active = q < C / N;
  const int64_t c = q * N;
  float acc[10][N];
#pragma unroll
  for (int t = 0; t < 10; ++t)
#pragma unroll
    for (int k = 0; k < N; ++k) acc[t][k] = 0.f;
  if (active) {
    for (int64_t p = int64_t(blockIdx.y) * 8 + threadIdx.y; p < P; p += int64_t(gridDim.y) * 8) {
      const Pixel px = pixel(p, H, W);
      const Pack<float, N> g = load<float, N>(dd + p * C + c);
#pragma unroll
      for (int k = 0; k < N; ++k) acc[9][k] += g.v[k];
#pragma unroll
      for (int t = 0; t < 9; ++t) {
        const int yy = px.y + t / 3 - 1, xx = px.x + t % 3 - 1;
        if (yy < 0 || yy >= H || xx < 0 || xx >= W) continue;
        const Pack<T, N> v = load<T, N>(x + (px.img + int64_t(yy) * W + xx) * C + c);
#pragma unroll
        for (int k = 0; k < N; ++k) acc[t][k] = fmaf(g.v[k], float(v.v[k]), acc[t][k]);
      }
    }
  }
  __shared__ float red[8][32][N];
#pragma unroll
  for (int t = 0; t < 10; ++t) {
#pragma unroll
    for (int k = 0; k < N; ++k) red[threadIdx.y][threadIdx.x][k] = acc[t][k];
    __syncthreads();
    if (threadIdx.y == 0 && active) {
#pragma unroll
      for (int k = 0; k < N; ++k) {
        float s = 0.f;
#pragma unroll
        for (int r = 0; r < 8; ++r) s += red[r][threadIdx.x][k];
        atomicAdd(t < 9 ? dw + t * C + c + k : db + c + k, s);
      }
    }
    __syncthreads();
  }
}

template <typename T, int N>
__global__ void __launch_bounds__(THREADS)
dwconv_ln_dx_kernel(const float* __restrict__ dd, const float* __restrict__ taps, T* __restrict__ dx, int64_t P,
                    int H, int W, int64_t C) {
  const int64_t packs = C / N, n = P * packs;
  for (int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < n; i += int64_t(gridDim.x) * blockDim.x) {
    const int64_t p = i / packs, c = (i % packs) * N;
    const Pixel px = pixel(p, H, W);
    float acc[N];
#pragma unroll
    for (int k = 0; k < N; ++k) acc[k] = 0.f;
#pragma unroll
    for (int t = 0; t < 9; ++t) {
      const int yy = px.y - (t / 3 - 1), xx = px.x - (t % 3 - 1);
      if (yy < 0 || yy >= H || xx < 0 || xx >= W) continue;
      const Pack<float, N> g = load<float, N>(dd + (px.img + int64_t(yy) * W + xx) * C + c);
      const Pack<float, N> w = load<float, N>(taps + t * C + c);
#pragma unroll
      for (int k = 0; k < N; ++k) acc[k] = fmaf(g.v[k], w.v[k], acc[k]);
    }
    Pack<T, N> o;
#pragma unroll
    for (int k = 0; k < N; ++k) o.v[k] = T(acc[k]);
    *reinterpret_cast<Pack<T, N>*>(dx + p * C + c) = o;
  }
}

// ------------------------------------------------------------------------------------ host

inline bool aligned(const void* p, int64_t bytes) { return reinterpret_cast<std::uintptr_t>(p) % bytes == 0; }

inline int64_t warp_blocks(int64_t P) { return std::min<int64_t>((P + WARPS - 1) / WARPS, int64_t(1) << 20); }

template <typename T>
constexpr int VN = 16 / int(sizeof(T));

at::Tensor dwconv_ln_cuda(const at::Tensor& x_in, const at::Tensor& weight, const at::Tensor& bias, double eps) {
  const c10::cuda::CUDAGuard guard(x_in.device());
  const DwArgs a = dw_args(x_in, weight, bias, "dwconv_ln");
  at::Tensor y = empty_channels_last(a.x);
  const int64_t P = a.B * a.H * a.W;
  if (y.numel() == 0) return y;
  TORCH_CHECK(a.H < INT32_MAX && a.W < INT32_MAX, "dwconv_ln: H and W must be below 2^31");
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, a.x.scalar_type(), "dwconv_ln_cuda", [&] {
    constexpr int N = VN<scalar_t>;
    const scalar_t* xp = a.x.const_data_ptr<scalar_t>();
    scalar_t* yp = y.mutable_data_ptr<scalar_t>();
    const float *tp = a.taps.const_data_ptr<float>(), *bp = a.bias.const_data_ptr<float>();
    const bool vec = a.C % N == 0 && aligned(xp, 16) && aligned(yp, 16) && aligned(tp, 64) && aligned(bp, 64);
    const int64_t blocks = warp_blocks(P);
    if (vec)
      dwconv_ln_fwd_kernel<scalar_t, N><<<blocks, THREADS, 0, stream>>>(xp, tp, bp, yp, P, int(a.H), int(a.W), a.C,
                                                                        float(eps));
    else
      dwconv_ln_fwd_kernel<scalar_t, 1><<<blocks, THREADS, 0, stream>>>(xp, tp, bp, yp, P, int(a.H), int(a.W), a.C,
                                                                        float(eps));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return y;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> dwconv_ln_backward_cuda(const at::Tensor& grad, const at::Tensor& x_in,
                                                                       const at::Tensor& weight,
                                                                       const at::Tensor& bias, double eps) {
  const c10::cuda::CUDAGuard guard(x_in.device());
  const DwArgs a = dw_args(x_in, weight, bias, "dwconv_ln_backward");
  TORCH_CHECK(grad.sizes() == x_in.sizes() && grad.scalar_type() == x_in.scalar_type(),
              "dwconv_ln_backward: grad must match x in shape and dtype, got ", grad.sizes(), " ", grad.scalar_type());
  const at::Tensor gy = grad.contiguous(at::MemoryFormat::ChannelsLast);
  at::Tensor dx = empty_channels_last(a.x);
  at::Tensor dwt = at::zeros({9, a.C}, a.x.options().dtype(at::kFloat)), db = at::zeros({a.C}, dwt.options());
  const int64_t P = a.B * a.H * a.W;
  if (dx.numel() > 0) {
    TORCH_CHECK(a.H < INT32_MAX && a.W < INT32_MAX, "dwconv_ln_backward: H and W must be below 2^31");
    at::Tensor dd = at::empty({P, a.C}, dwt.options());
    const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
    const int H = int(a.H), W = int(a.W);
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, a.x.scalar_type(), "dwconv_ln_backward_cuda", [&] {
      constexpr int N = VN<scalar_t>;
      const scalar_t *xp = a.x.const_data_ptr<scalar_t>(), *gp = gy.const_data_ptr<scalar_t>();
      scalar_t* dxp = dx.mutable_data_ptr<scalar_t>();
      const float *tp = a.taps.const_data_ptr<float>(), *bp = a.bias.const_data_ptr<float>();
      float *ddp = dd.mutable_data_ptr<float>(), *dwp = dwt.mutable_data_ptr<float>(), *dbp = db.mutable_data_ptr<float>();
      const bool al = aligned(tp, 64) && aligned(bp, 64) && aligned(ddp, 64);
      const bool vec = a.C % N == 0 && aligned(xp, 16) && aligned(gp, 16) && aligned(dxp, 16) && al;
      const int64_t blocks = warp_blocks(P);
      if (vec)
        dwconv_ln_dd_kernel<scalar_t, N><<<blocks, THREADS, 0, stream>>>(xp, gp, tp, bp, ddp, P, H, W, a.C, float(eps));
      else
        dwconv_ln_dd_kernel<scalar_t, 1><<<blocks, THREADS, 0, stream>>>(xp, gp, tp, bp, ddp, P, H, W, a.C, float(eps));
      C10_CUDA_KERNEL_LAUNCH_CHECK();
      // dw, dbias: 4-channel packs (one float4 of dd, 4 values of x) when C and x allow.
      const bool vec4 = a.C % 4 == 0 && aligned(xp, 4 * sizeof(scalar_t)) && al;
      const int64_t packs = vec4 ? a.C / 4 : a.C;
      const int64_t gx = (packs + 31) / 32;
      const dim3 grid(unsigned(gx), unsigned(std::min<int64_t>((P + 7) / 8, std::max<int64_t>(1, 2048 / gx))));
      if (vec4)
        dwconv_ln_dw_kernel<scalar_t, 4><<<grid, dim3(32, 8), 0, stream>>>(xp, ddp, dwp, dbp, P, H, W, a.C);
      else
        dwconv_ln_dw_kernel<scalar_t, 1><<<grid, dim3(32, 8), 0, stream>>>(xp, ddp, dwp, dbp, P, H, W, a.C);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
      const int64_t n = P * (vec ? a.C / N : a.C);
      const int64_t dx_blocks = std::min<int64_t>((n + THREADS - 1) / THREADS, int64_t(1) << 20);
      if (vec)
        dwconv_ln_dx_kernel<scalar_t, N><<<dx_blocks, THREADS, 0, stream>>>(ddp, tp, dxp, P, H, W, a.C);
      else
        dwconv_ln_dx_kernel<scalar_t, 1><<<dx_blocks, THREADS, 0, stream>>>(ddp, tp, dxp, P, H, W, a.C);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  }
  at::Tensor dw = dwt.t().contiguous().reshape(weight.sizes()).to(weight.scalar_type());
  return {dx, dw, db.to(bias.scalar_type())};
}

}  // namespace
}  // namespace wf

TORCH_LIBRARY_IMPL(wuerstchen_fast_C, CUDA, m) {
  m.impl("dwconv_ln", &wf::dwconv_ln_cuda);
  m.impl("dwconv_ln_backward", &wf::dwconv_ln_backward_cuda);
}
