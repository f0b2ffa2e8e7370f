// layer_norm_2d on CUDA: LayerNorm over the channels of a (B, C, H, W) tensor, no affine.
//
// Math: y = (x - mean) * rstd over the C channels of each pixel, rstd = 1/sqrt(var + eps);
// backward recomputes mean and rstd from x and also needs Σdy and Σdy·(x - mean):
//   dx = rstd * (dy - mean(dy) - xhat * mean(dy * xhat)).
// Statistics: Welford per thread, Chan's merge across threads (welford.cuh).
// Layout and threads, a block of 32 x 8 threads:
//   NCHW: the 32 lanes take 32 neighbouring pixels (coalesced along H*W); the 8 warps split the
//         channels; partial statistics are merged across warps in shared memory.
//   NHWC: each warp takes one pixel, its lanes stride the contiguous channels; warp-shuffle merge.
// Accumulation in float32 for float32, bfloat16 and float16. Launched on the current stream and
// checked. Limits: any B, C, H, W (grid.y carries batches up to 65535, looped beyond).
#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "../../csrc/layout.h"
#include "welford.cuh"

namespace wf {
namespace {

constexpr int LANES = 32, WARPS = 8;

// One value's Welford step into a pixel's running statistics (Acc, welford.cuh).
template <bool BACKWARD>
__device__ __forceinline__ void push(Acc& a, float v, float g) {
  a.n += 1.f;
  const float new_mean = a.mean + (v - a.mean) / a.n;
  a.m2 += (v - a.mean) * (v - new_mean);
  if constexpr (BACKWARD) {
    a.ga += g * (v - new_mean) - (new_mean - a.mean) * a.gs;
    a.gs += g;
  }
  a.mean = new_mean;
}

// Merge the WARPS partials of each lane's column of a (WARPS, LANES) block; every thread gets its
// column's total. Ends with a barrier so the shared buffer can be reused.
template <bool BACKWARD>
__device__ __forceinline__ Acc column_merge(const Acc& a) {
  __shared__ Acc buf[WARPS][LANES];
  buf[threadIdx.y][threadIdx.x] = a;
  __syncthreads();
  Acc r = buf[0][threadIdx.x];
#pragma unroll
  for (int w = 1; w < WARPS; ++w) r = merge<BACKWARD>(r, buf[w][threadIdx.x]);
  __syncthreads();
  return r;
}

struct Coef {  // y = a*x + c (forward);  dx = a*dy + b*x + c (backward)
  float a, b, c;
};

template <bool BACKWARD>
__device__ __forceinline__ Coef coef(const Acc& s, int C, float eps) {
  const float rstd = rsqrtf(s.m2 / C + eps);
  if constexpr (!BACKWARD) return {rstd, 0.f, -s.mean * rstd};
  const float mdyx = rstd * s.ga / C;  // mean(dy * xhat)
  const float b = -rstd * rstd * mdyx;
  return {rstd, b, -rstd * (s.gs / C) - b * s.mean};
}

// BACKWARD = false: (x) -> y.  BACKWARD = true: (dy, x) -> dx.
template <typename T, bool BACKWARD>
__global__ void __launch_bounds__(LANES * WARPS)
ln2d_nchw_kernel(const T* __restrict__ dy, const T* __restrict__ x, T* __restrict__ out, int B, int C,
                 int64_t HW, float eps) {
  const int64_t p = int64_t(blockIdx.x) * LANES + threadIdx.x;
  const bool valid = p < HW;
  for (int b = blockIdx.y; b < B; b += gridDim.y) {
    const int64_t base = int64_t(b) * C * HW + p;
    Acc s{};
    if (valid)
      for (int c = threadIdx.y; c < C; c += WARPS)
        push<BACKWARD>(s, float(x[base + c * HW]), BACKWARD ? float(dy[base + c * HW]) : 0.f);
    const Coef q = coef<BACKWARD>(column_merge<BACKWARD>(s), C, eps);
    if (valid) {
      for (int c = threadIdx.y; c < C; c += WARPS) {
        const int64_t i = base + c * HW;
        float r = q.a * float(BACKWARD ? dy[i] : x[i]) + q.c;
        if constexpr (BACKWARD) r += q.b * float(x[i]);
        out[i] = T(r);
      }
    }
  }
}

template <typename T, bool BACKWARD>
__global__ void __launch_bounds__(LANES * WARPS)
ln2d_nhwc_kernel(const T* __restrict__ dy, const T* __restrict__ x, T* __restrict__ out, int64_t P, int C,
                 float eps) {
  const int64_t p = int64_t(blockIdx.x) * WARPS + threadIdx.y;
  if (p >= P) return;  // whole warp leaves together: no block-level barrier below
  const int64_t base = p * C;
  Acc s{};
  for (int c = threadIdx.x; c < C; c += LANES)
    push<BACKWARD>(s, float(x[base + c]), BACKWARD ? float(dy[base + c]) : 0.f);
  const Coef q = coef<BACKWARD>(warp_merge<BACKWARD>(s), C, eps);
  for (int c = threadIdx.x; c < C; c += LANES) {
    const int64_t i = base + c;
    float r = q.a * float(BACKWARD ? dy[i] : x[i]) + q.c;
    if constexpr (BACKWARD) r += q.b * float(x[i]);
    out[i] = T(r);
  }
}

template <bool BACKWARD>
void launch(const at::Tensor& dy, const at::Tensor& x, at::Tensor& out, Layout layout, double eps) {
  const int64_t B = x.size(0), C = x.size(1), HW = x.size(2) * x.size(3);
  if (x.numel() == 0) return;
  TORCH_CHECK(C <= INT32_MAX && B <= INT32_MAX, "layer_norm_2d: too many channels or batches");
  const dim3 block(LANES, WARPS);
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "layer_norm_2d_cuda", [&] {
    const scalar_t* dyp = BACKWARD ? dy.const_data_ptr<scalar_t>() : nullptr;
    const scalar_t* xp = x.const_data_ptr<scalar_t>();
    scalar_t* op = out.mutable_data_ptr<scalar_t>();
    if (layout == Layout::NCHW) {
      const dim3 grid((HW + LANES - 1) / LANES, std::min<int64_t>(B, 65535));
      ln2d_nchw_kernel<scalar_t, BACKWARD><<<grid, block, 0, stream>>>(dyp, xp, op, B, C, HW, float(eps));
    } else {
      const int64_t P = B * HW;
      ln2d_nhwc_kernel<scalar_t, BACKWARD><<<(P + WARPS - 1) / WARPS, block, 0, stream>>>(dyp, xp, op, P, C,
                                                                                          float(eps));
    }
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

at::Tensor layer_norm_2d_cuda(const at::Tensor& x_in, double eps) {
  check_float_dtype(x_in, "layer_norm_2d");
  const c10::cuda::CUDAGuard guard(x_in.device());
  const Dense d = as_dense(x_in);
  at::Tensor y = empty_in_layout(d.t, d.layout);
  launch<false>(at::Tensor(), d.t, y, d.layout, eps);
  return y;
}

at::Tensor layer_norm_2d_backward_cuda(const at::Tensor& grad, const at::Tensor& x_in, double eps) {
  check_float_dtype(x_in, "layer_norm_2d_backward");
  const c10::cuda::CUDAGuard guard(x_in.device());
  const Dense d = as_dense(x_in);
  const at::Tensor g = like_x(grad, d.t, d.layout, "layer_norm_2d_backward", "grad");
  at::Tensor dx = empty_in_layout(d.t, d.layout);
  launch<true>(g, d.t, dx, d.layout, eps);
  return dx;
}

}  // namespace
}  // namespace wf

TORCH_LIBRARY_IMPL(wuerstchen_fast_C, CUDA, m) {
  m.impl("layer_norm_2d", &wf::layer_norm_2d_cuda);
  m.impl("layer_norm_2d_backward", &wf::layer_norm_2d_backward_cuda);
}
