// Stage A's mixing block on CUDA: norm_mod (LayerNorm over channels + scalar modulation) and
// mixing_dwconv (x + (replication-padded depthwise 3x3 conv(xn) + bias)·gamma), forward and backward.
// Same math as csrc/cpu/layer_norm_2d.cpp (norm_mod) and csrc/cpu/mixing_dwconv.cpp; host checks in
// csrc/mixing_host.h and csrc/layout.h, shared with those.
//
// norm_mod: y = LN(x)·A + t, A = 1 + scale. Backward, with g the incoming gradient, per pixel:
//   dx = rstd·A·(g - mean(g) - xhat·mean(g·xhat)),  ds = Σ_pixels Σ_c g·xhat,  dt = Σ g.
//   Statistics: Welford per thread (one reciprocal per channel step, shared by the thread's pixels),
//   Chan's merge across threads; for the backward also gs = Σg and ga = Σg·(x - mean), kept relative
//   to the running mean (as kernels/cuda/layer_norm_2d.cu). float32 throughout.
//   NCHW (norm_mod_nchw_kernel): block 32 x 8; lane l takes a pack of N neighbouring pixels (one
//     16-byte load per channel, N = 16 / sizeof(T), when H·W % N == 0 and the pointers are aligned;
//     else N = 1), consecutive lanes consecutive packs (coalesced along H·W); the 8 warps split the
//     channels; the 8 partial statistics of each pixel are merged in shared memory, one pixel of the
//     pack at a time (a small buffer). grid.y over batches (looped beyond 65535).
//   NHWC (norm_mod_nhwc_kernel): one warp per pixel (grid-stride), lane l takes packs l, l + 32, ...
//     of N channels (16-byte loads when C % N == 0 and aligned), per-pack statistics Chan-merged
//     into the lane's, then across the warp with shuffles.
//   ds, dt: float32 per thread over its pixels, reduced over the block (shuffles + shared memory,
//     fixed order) to one float32 pair per block; the host sums the per-block pairs in float64
//     (at::sum, a deterministic second pass): no atomics.
//
// mixing_dwconv, NCHW planes (other layouts are copied to NCHW first, as the CPU kernel does; the
// output is returned in x's layout). P = xn replication-padded by 1, k = weight[c] (3x3), u = g·gamma:
//   forward  y[h, w] = x + gamma·(bias + Σ_{ky,kx} k[ky,kx]·P[h + ky, w + kx])
//   backward S[c, q] = Σ_{b,h,w} g·P[h + ky, w + kx] (q = 3ky + kx),  G[c] = Σ g,
//            dweight = gamma·S,  dbias = gamma·G,  dgamma = Σ_c (Σ_q k[c,q]·S[c,q] + bias[c]·G[c]),
//            dxn[h, w] = Σ_{i ∈ I(h), j ∈ J(w)} dP[i, j],  dP[i, j] = Σ k[ky,kx]·u[i - ky, j - kx] (u zero
//            outside the image), I(h) = {h + 1} ∪ {0 if h = 0} ∪ {H + 1 if h = H - 1} (the pad's rows
//            fold back onto the edge row they replicate), J(w) likewise.
//   Threads: one thread per pack of N neighbouring pixels of a row (16-byte loads when W % N == 0 and
//   aligned, else N = 1), consecutive threads along the row (coalesced). Per input row the thread
//   holds a window of N + 2 floats (the pack plus one clamped / zeroed neighbour each side, scalar
//   loads that hit L1), so registers stay at a few windows and accumulators whatever N.
//   mixing_dwconv_fwd_kernel: grid-stride over all packs.
//   mixing_dwconv_bwd_kernel: grid (chunks, planes): a block walks one (b, c) plane's packs with a
//     stride of chunks·256, writes dxn and accumulates S and G (10 float32 per thread), reduced over
//     the block in a fixed order to one float32 partial per (plane, chunk); the host reduces the
//     partials over batches and chunks in float64 (at::sum, deterministic; no atomics) and finishes
//     dweight, dbias and dgamma there.
//
// Accumulation float32 for float32, bfloat16 and float16 inputs; dx / dxn / y rounded once to the
// input dtype. Launched on the current stream, every launch checked, under a CUDAGuard for the
// input's device. No kernel keeps more than ~4N + 12 floats of state per thread; __launch_bounds__
// with a minimum block count (MIN_BLOCKS below) so ptxas does not trade spills for occupancy.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>

#include "../../csrc/mixing_host.h"
#include "pack.cuh"
#include "welford.cuh"

namespace wf {
namespace {

constexpr int THREADS = 256, LANES = 32, WARPS = THREADS / LANES;
// Every kernel declares at least 2 resident blocks per SM (<= 128 registers a thread): with the
// thread count alone, ptxas (CUDA 13) squeezes some of these kernels to 32 or 64 registers for
// occupancy and spills a few bytes; with an explicit minimum none spills (tests/test_cuda_build.py).
constexpr int MIN_BLOCKS = 2;

// 16-byte packs of T.
template <typename T>
constexpr int VN = 16 / int(sizeof(T));

inline bool aligned16(const void* p) { return reinterpret_cast<std::uintptr_t>(p) % 16 == 0; }

// Calls f(T{}) with T the C++ type of a float32 / bfloat16 / float16 scalar type (the host checks
// reject the others before; float64 is not instantiated).
template <typename F>
void dispatch_float(at::ScalarType st, const char* op, F&& f) {
  switch (st) {
    case at::kFloat: f(float{}); break;
    case at::kBFloat16: f(at::BFloat16{}); break;
    case at::kHalf: f(at::Half{}); break;
    default: TORCH_CHECK(false, op, ": supports float32, bfloat16 and float16, got ", st);
  }
}

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) v += __shfl_xor_sync(0xffffffffu, v, off);
  return v;
}

// Sums each of K values over the block (fixed order: warp shuffles, then the warps' totals in
// order); thread 0 gets the totals. Starts and ends with a barrier, so every thread must call it.
template <int K>
__device__ __forceinline__ void block_sum(float (&v)[K]) {
  __shared__ float red[WARPS][K];
  const int tid = threadIdx.y * blockDim.x + threadIdx.x, lane = tid % LANES, warp = tid / LANES;
  __syncthreads();
#pragma unroll
  for (int q = 0; q < K; ++q) {
    const float s = warp_sum(v[q]);
    if (lane == 0) red[warp][q] = s;
  }
  __syncthreads();
  if (tid == 0) {
#pragma unroll
    for (int q = 0; q < K; ++q) {
      float s = 0.f;
#pragma unroll
      for (int w = 0; w < WARPS; ++w) s += red[w][q];
      v[q] = s;
    }
  }
  __syncthreads();
}

// ============================================================================== norm_mod
// Statistics: welford.cuh (Acc, merge, warp_merge, pack_acc), merged here with __fdividef (FAST_DIV):
// the IEEE division's slow path is a call whose saved registers ptxas reports as spills.

// Output coefficients of one pixel. Forward: y = a·x + c. Backward: dx = a·g + b·x + c; ds, dt: the
// pixel's Σg·xhat and Σg.
struct Coef {
  float a, b, c, ds, dt;
};

// inv_c = 1 / C, rounded once on the host.
template <bool BWD>
__device__ __forceinline__ Coef coef(const Acc& s, float inv_c, float eps, float A, float t) {
  const float rstd = rsqrtf(s.m2 * inv_c + eps);
  if constexpr (!BWD) return {rstd * A, 0.f, t - s.mean * rstd * A, 0.f, 0.f};
  const float ds = rstd * s.ga;                      // Σ g·xhat
  const float b = -rstd * rstd * A * ds * inv_c;  // -rstd·A·mean(g·xhat)·rstd
  return {rstd * A, b, -rstd * A * (s.gs * inv_c) - b * s.mean, ds, s.gs};
}

// BWD = false: (x) -> y.  BWD = true: (g, x) -> dx, and one (ds, dt) float32 pair per block in part.
template <typename T, int N, bool BWD>
__global__ void __launch_bounds__(THREADS, MIN_BLOCKS)
norm_mod_nchw_kernel(const T* __restrict__ g, const T* __restrict__ x, const float* __restrict__ scale,
                     const float* __restrict__ shift, T* __restrict__ out, float* __restrict__ part, int B, int C,
                     int64_t HW, float inv_c, float eps) {
  __shared__ Acc buf[WARPS][LANES];
  const int lane = threadIdx.x, warp = threadIdx.y;
  const int64_t p0 = (int64_t(blockIdx.x) * LANES + lane) * N;
  const bool valid = p0 < HW;  // HW % N == 0: a pack is whole or absent
  const float A = 1.f + scale[0], t = BWD ? 0.f : shift[0];
  float dsum = 0.f, dtsum = 0.f;
  for (int b = blockIdx.y; b < B; b += gridDim.y) {
    const int64_t base = int64_t(b) * C * HW + p0;
    float n = 0.f, mean[N], m2[N], gs[N], ga[N];
#pragma unroll
    for (int k = 0; k < N; ++k) mean[k] = m2[k] = gs[k] = ga[k] = 0.f;
    if (valid) {
      for (int c = warp; c < C; c += WARPS) {
        const Pack<T, N> xv = load<T, N>(x + base + int64_t(c) * HW);
        Pack<T, N> gv;
        if constexpr (BWD) gv = load<T, N>(g + base + int64_t(c) * HW);
        n += 1.f;
        const float inv = __fdividef(1.f, n);
#pragma unroll
        for (int k = 0; k < N; ++k) {
          const float v = float(xv.v[k]), d = v - mean[k], nm = fmaf(d, inv, mean[k]);
          m2[k] = fmaf(d, v - nm, m2[k]);
          if constexpr (BWD) {
            const float gk = float(gv.v[k]);
            ga[k] = fmaf(gk, v - nm, ga[k] - (nm - mean[k]) * gs[k]);
            gs[k] += gk;
          }
          mean[k] = nm;
        }
      }
    }
    // Per pixel of the pack: merge the WARPS partials of the column, keep the coefficients in place
    // of the statistics (mean <- a, m2 <- c, gs <- b).
#pragma unroll
    for (int k = 0; k < N; ++k) {
      buf[warp][lane] = Acc{n, mean[k], m2[k], gs[k], ga[k]};
      __syncthreads();
      Acc s = buf[0][lane];
#pragma unroll
      for (int w = 1; w < WARPS; ++w) s = merge<BWD, true>(s, buf[w][lane]);
      __syncthreads();
      const Coef q = coef<BWD>(s, inv_c, eps, A, t);
      mean[k] = q.a;
      m2[k] = q.c;
      gs[k] = q.b;
      if (BWD && valid && warp == 0) {
        dsum += q.ds;
        dtsum += q.dt;
      }
    }
    if (valid) {
      for (int c = warp; c < C; c += WARPS) {
        const int64_t i = base + int64_t(c) * HW;
        const Pack<T, N> xv = load<T, N>(x + i);
        float r[N];
        if constexpr (BWD) {
          const Pack<T, N> gv = load<T, N>(g + i);
#pragma unroll
          for (int k = 0; k < N; ++k) r[k] = fmaf(mean[k], float(gv.v[k]), fmaf(gs[k], float(xv.v[k]), m2[k]));
        } else {
#pragma unroll
          for (int k = 0; k < N; ++k) r[k] = fmaf(mean[k], float(xv.v[k]), m2[k]);
        }
        store<T, N>(out + i, r);
      }
    }
  }
  if constexpr (BWD) {
    float v[2] = {dsum, dtsum};
    block_sum<2>(v);
    if (lane == 0 && warp == 0) {
      const int64_t blk = int64_t(blockIdx.y) * gridDim.x + blockIdx.x;
      part[2 * blk] = v[0];
      part[2 * blk + 1] = v[1];
    }
  }
}

// The statistics of one pack of N channels, as an Acc to merge.
template <typename T, int N, bool BWD>
__global__ void __launch_bounds__(THREADS, MIN_BLOCKS)
norm_mod_nhwc_kernel(const T* __restrict__ g, const T* __restrict__ x, const float* __restrict__ scale,
                     const float* __restrict__ shift, T* __restrict__ out, float* __restrict__ part, int64_t P,
                     int C, float inv_c, float eps) {
  const int lane = threadIdx.x, packs = C / N;
  const float A = 1.f + scale[0], t = BWD ? 0.f : shift[0];
  float dsum = 0.f, dtsum = 0.f;
  for (int64_t p = int64_t(blockIdx.x) * WARPS + threadIdx.y; p < P; p += int64_t(gridDim.x) * WARPS) {
    const T *xr = x + p * C, *gr = BWD ? g + p * C : nullptr;
    Acc s{0.f, 0.f, 0.f, 0.f, 0.f};
    float v[N], gv[N];
    for (int q = lane; q < packs; q += LANES) {
      const Pack<T, N> xp = load<T, N>(xr + q * N);
#pragma unroll
      for (int k = 0; k < N; ++k) v[k] = float(xp.v[k]);
      if constexpr (BWD) {
        const Pack<T, N> gp = load<T, N>(gr + q * N);
#pragma unroll
        for (int k = 0; k < N; ++k) gv[k] = float(gp.v[k]);
      }
      s = merge<BWD, true>(s, pack_acc<BWD, N>(v, gv));
    }
    const Coef q = coef<BWD>(warp_merge<BWD, true>(s), inv_c, eps, A, t);
    if (BWD && lane == 0) {
      dsum += q.ds;
      dtsum += q.dt;
    }
    T* orow = out + p * C;
    for (int j = lane; j < packs; j += LANES) {
      const Pack<T, N> xp = load<T, N>(xr + j * N);
      float r[N];
      if constexpr (BWD) {
        const Pack<T, N> gp = load<T, N>(gr + j * N);
#pragma unroll
        for (int k = 0; k < N; ++k) r[k] = fmaf(q.a, float(gp.v[k]), fmaf(q.b, float(xp.v[k]), q.c));
      } else {
#pragma unroll
        for (int k = 0; k < N; ++k) r[k] = fmaf(q.a, float(xp.v[k]), q.c);
      }
      store<T, N>(orow + j * N, r);
    }
  }
  if constexpr (BWD) {
    float v2[2] = {dsum, dtsum};
    block_sum<2>(v2);
    if (lane == 0 && threadIdx.y == 0) {
      part[2 * blockIdx.x] = v2[0];
      part[2 * blockIdx.x + 1] = v2[1];
    }
  }
}

// ------------------------------------------------------------------------------ norm_mod host
inline int64_t capped_blocks(int64_t n, int per_block) {
  return std::max<int64_t>(1, std::min<int64_t>((n + per_block - 1) / per_block, int64_t(1) << 16));
}

// Launches the forward (g undefined) or the backward of norm_mod on x (dense, in `layout`) into out;
// returns the backward's per-block (ds, dt) float32 partials ((blocks, 2)).
template <typename T, bool BWD>
at::Tensor norm_mod_typed(const at::Tensor& g, const at::Tensor& x, const at::Tensor& A, const at::Tensor& t,
                          at::Tensor& out, Layout layout, double eps) {
  const int64_t B = x.size(0), C = x.size(1), HW = x.size(2) * x.size(3);
  TORCH_CHECK(C <= INT32_MAX && B <= INT32_MAX, "norm_mod: too many channels or batches");
  constexpr int N = VN<T>;
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const T *gp = BWD ? g.const_data_ptr<T>() : nullptr, *xp = x.const_data_ptr<T>();
  T* op = out.mutable_data_ptr<T>();
  const float *sp = A.const_data_ptr<float>(), *tp = BWD ? nullptr : t.const_data_ptr<float>();
  const bool al = aligned16(xp) && aligned16(op) && (!BWD || aligned16(gp));
  const dim3 block(LANES, WARPS);
  const float inv_c = float(1.0 / double(C));
  if (layout == Layout::NCHW) {
    const bool vec = al && HW % N == 0;
    const int64_t per = LANES * (vec ? N : 1);
    const dim3 grid(unsigned((HW + per - 1) / per), unsigned(std::min<int64_t>(B, 65535)));
    at::Tensor part = at::empty({BWD ? int64_t(grid.x) * grid.y : 0, 2}, x.options().dtype(at::kFloat));
    float* pp = BWD ? part.mutable_data_ptr<float>() : nullptr;
    if (vec)
      norm_mod_nchw_kernel<T, N, BWD><<<grid, block, 0, stream>>>(gp, xp, sp, tp, op, pp, int(B), int(C), HW,
                                                                  inv_c, float(eps));
    else
      norm_mod_nchw_kernel<T, 1, BWD><<<grid, block, 0, stream>>>(gp, xp, sp, tp, op, pp, int(B), int(C), HW,
                                                                  inv_c, float(eps));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    return part;
  }
  const int64_t P = B * HW, blocks = capped_blocks(P, WARPS);
  at::Tensor part = at::empty({BWD ? blocks : 0, 2}, x.options().dtype(at::kFloat));
  float* pp = BWD ? part.mutable_data_ptr<float>() : nullptr;
  if (al && C % N == 0)
    norm_mod_nhwc_kernel<T, N, BWD><<<blocks, block, 0, stream>>>(gp, xp, sp, tp, op, pp, P, int(C), inv_c, float(eps));
  else
    norm_mod_nhwc_kernel<T, 1, BWD><<<blocks, block, 0, stream>>>(gp, xp, sp, tp, op, pp, P, int(C), inv_c, float(eps));
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return part;
}

template <bool BWD>
at::Tensor norm_mod_launch(const at::Tensor& g, const at::Tensor& x, const at::Tensor& s, const at::Tensor& t,
                           at::Tensor& out, Layout layout, double eps) {
  at::Tensor part;
  dispatch_float(x.scalar_type(), "norm_mod", [&](auto tag) {
    part = norm_mod_typed<decltype(tag), BWD>(g, x, s, t, out, layout, eps);
  });
  return part;
}

at::Tensor norm_mod_cuda(const at::Tensor& x_in, const at::Tensor& scale, const at::Tensor& shift, double eps) {
  check_float_dtype(x_in, "norm_mod");
  const c10::cuda::CUDAGuard guard(x_in.device());
  const at::Tensor s = scalar_param(scale, x_in.device(), "norm_mod", "scale");
  const at::Tensor t = scalar_param(shift, x_in.device(), "norm_mod", "shift");
  const Dense d = as_dense(x_in);
  at::Tensor y = empty_in_layout(d.t, d.layout);
  if (y.numel() > 0) norm_mod_launch<false>(at::Tensor(), d.t, s, t, y, d.layout, eps);
  return y;
}

// (dx, ds, dt); ds, dt 0-d in scale's dtype on scale's device.
std::tuple<at::Tensor, at::Tensor, at::Tensor> norm_mod_backward_cuda(const at::Tensor& grad, const at::Tensor& x_in,
                                                                      const at::Tensor& scale, double eps) {
  check_float_dtype(x_in, "norm_mod_backward");
  const c10::cuda::CUDAGuard guard(x_in.device());
  const at::Tensor s = scalar_param(scale, x_in.device(), "norm_mod_backward", "scale");
  const Dense d = as_dense(x_in);
  const at::Tensor g = like_x(grad, d.t, d.layout, "norm_mod_backward", "grad");
  at::Tensor dx = empty_in_layout(d.t, d.layout);
  at::Tensor sums = at::zeros({2}, x_in.options().dtype(at::kDouble));
  if (dx.numel() > 0)  // the per-block pairs, summed in float64 (a fixed order)
    sums = norm_mod_launch<true>(g, d.t, s, at::Tensor(), dx, d.layout, eps).sum(0, false, at::kDouble);
  sums = sums.to(scale.device(), scale.scalar_type());
  return {dx, sums.select(0, 0).clone(), sums.select(0, 1).clone()};
}

// ============================================================================== mixing_dwconv
// win[0 .. N+1] = row[w0 - 1 .. w0 + N] as float: CLAMP replicates the edge columns (forward's
// padding), else columns outside [0, W) read 0 (the backward's u).
template <typename T, int N, bool CLAMP>
__device__ __forceinline__ void load_window(const T* __restrict__ row, int w0, int W, float (&win)[N + 2]) {
  const Pack<T, N> c = load<T, N>(row + w0);
#pragma unroll
  for (int k = 0; k < N; ++k) win[k + 1] = float(c.v[k]);
  if constexpr (CLAMP) {
    win[0] = float(row[max(w0 - 1, 0)]);
    win[N + 1] = float(row[min(w0 + N, W - 1)]);
  } else {
    win[0] = w0 > 0 ? float(row[w0 - 1]) : 0.f;
    win[N + 1] = w0 + N < W ? float(row[w0 + N]) : 0.f;
  }
}

// y = x + gamma·(bias + conv3x3(P)), one thread per pack of N pixels of a row (grid-stride).
template <typename T, int N>
__global__ void __launch_bounds__(THREADS, MIN_BLOCKS)
mixing_dwconv_fwd_kernel(const T* __restrict__ x, const T* __restrict__ xn, const float* __restrict__ w9,
                         const float* __restrict__ bias, const float* __restrict__ gamma, T* __restrict__ y,
                         int64_t planes, int C, int H, int W) {
  const int Wp = W / N;
  const int64_t n = planes * H * Wp;
  const float gm = gamma[0];
  for (int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < n; i += int64_t(gridDim.x) * blockDim.x) {
    const int w0 = int(i % Wp) * N;
    const int64_t rest = i / Wp, plane = rest / H;
    const int h = int(rest % H), c = int(plane % C);
    const T* src = xn + plane * H * W;
    const float* k = w9 + int64_t(c) * 9;
    float acc[N], win[N + 2];
    const float b = bias[c];
#pragma unroll
    for (int j = 0; j < N; ++j) acc[j] = b;
#pragma unroll
    for (int ky = 0; ky < 3; ++ky) {
      const int r = min(max(h + ky - 1, 0), H - 1);
      load_window<T, N, true>(src + int64_t(r) * W, w0, W, win);
      const float k0 = k[ky * 3], k1 = k[ky * 3 + 1], k2 = k[ky * 3 + 2];
#pragma unroll
      for (int j = 0; j < N; ++j) acc[j] = fmaf(k2, win[j + 2], fmaf(k1, win[j + 1], fmaf(k0, win[j], acc[j])));
    }
    const int64_t o = (plane * H + h) * W + w0;
    const Pack<T, N> xv = load<T, N>(x + o);
#pragma unroll
    for (int j = 0; j < N; ++j) acc[j] = fmaf(acc[j], gm, float(xv.v[j]));
    store<T, N>(y + o, acc);
  }
}

// dxn of one pack and the plane's S (part[0..8]) and G (part[9]) partials; see the file header.
// grid (chunks, min(planes, 65535)), 256 threads; part: (planes, chunks, 10) float32.
template <typename T, int N>
__global__ void __launch_bounds__(THREADS, MIN_BLOCKS)
mixing_dwconv_bwd_kernel(const T* __restrict__ g, const T* __restrict__ xn, const float* __restrict__ w9,
                         const float* __restrict__ gamma, T* __restrict__ dxn, float* __restrict__ part,
                         int64_t planes, int C, int H, int W) {
  const int Wp = W / N;
  const int64_t packs = int64_t(H) * Wp;
  const float gm = gamma[0];
  for (int64_t plane = blockIdx.y; plane < planes; plane += gridDim.y) {
    const int64_t off = plane * H * W;
    const T *gs = g + off, *ns = xn + off;
    const float* k = w9 + (plane % C) * 9;
    float s[10];
#pragma unroll
    for (int q = 0; q < 10; ++q) s[q] = 0.f;
    for (int64_t j = int64_t(blockIdx.x) * THREADS + threadIdx.x; j < packs; j += int64_t(gridDim.x) * THREADS) {
      const int h = int(j / Wp), w0 = int(j % Wp) * N;
      float win[N + 2];
      // S, G: the pack's g against the clamped 3x3 neighbourhood of xn.
      {
        float gv[N];
        const Pack<T, N> gp = load<T, N>(gs + int64_t(h) * W + w0);
#pragma unroll
        for (int n = 0; n < N; ++n) {
          gv[n] = float(gp.v[n]);
          s[9] += gv[n];
        }
#pragma unroll
        for (int ky = 0; ky < 3; ++ky) {
          const int r = min(max(h + ky - 1, 0), H - 1);
          load_window<T, N, true>(ns + int64_t(r) * W, w0, W, win);
#pragma unroll
          for (int kx = 0; kx < 3; ++kx)
#pragma unroll
            for (int n = 0; n < N; ++n) s[ky * 3 + kx] = fmaf(gv[n], win[n + kx], s[ky * 3 + kx]);
        }
      }
      // dxn: Σ over the padded rows i ∈ I(h) of dP[i, J(w)]; the column fold adds dP[i, 0] onto w = 0
      // and dP[i, W + 1] onto w = W - 1.
      float acc[N];
#pragma unroll
      for (int n = 0; n < N; ++n) acc[n] = 0.f;
      const bool left = w0 == 0, right = w0 + N == W;
      for (int e = 0; e < 3; ++e) {
        const int i = e == 0 ? h + 1 : e == 1 ? (h == 0 ? 0 : -1) : (h == H - 1 ? H + 1 : -1);
        if (i < 0) continue;
#pragma unroll
        for (int ky = 0; ky < 3; ++ky) {
          const int r = i - ky;
          if (r < 0 || r >= H) continue;
          load_window<T, N, false>(gs + int64_t(r) * W, w0, W, win);
          const float k0 = k[ky * 3], k1 = k[ky * 3 + 1], k2 = k[ky * 3 + 2];
#pragma unroll
          for (int n = 0; n < N; ++n) acc[n] = fmaf(k0, win[n + 2], fmaf(k1, win[n + 1], fmaf(k2, win[n], acc[n])));
          if (left) acc[0] = fmaf(k0, win[1], acc[0]);
          if (right) acc[N - 1] = fmaf(k2, win[N], acc[N - 1]);
        }
      }
#pragma unroll
      for (int n = 0; n < N; ++n) acc[n] *= gm;
      store<T, N>(dxn + off + int64_t(h) * W + w0, acc);
    }
    block_sum<10>(s);
    if (threadIdx.x == 0) {
      float* pp = part + (plane * gridDim.x + blockIdx.x) * 10;
#pragma unroll
      for (int q = 0; q < 10; ++q) pp[q] = s[q];
    }
  }
}

// ------------------------------------------------------------------------------ mixing_dwconv host
at::Tensor mixing_dwconv_cuda(const at::Tensor& x_in, const at::Tensor& xn_in, const at::Tensor& weight,
                              const at::Tensor& bias, const at::Tensor& gamma) {
  const c10::cuda::CUDAGuard guard(xn_in.device());
  const MixDwArgs a = mix_dw_args(xn_in, weight, bias, gamma, "mixing_dwconv");
  check_mix_residual(x_in, xn_in, "mixing_dwconv");
  const Layout out_layout = mix_out_layout(x_in);
  const at::Tensor xn = a.d.t.contiguous(), x = x_in.contiguous();
  at::Tensor y = at::empty_like(x, at::MemoryFormat::Contiguous);
  if (y.numel() > 0) {
    TORCH_CHECK(a.H < INT32_MAX && a.W < INT32_MAX && a.C < INT32_MAX, "mixing_dwconv: C, H and W must be below 2^31");
    const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
    const int64_t planes = a.B * a.C;
    const int C = int(a.C), H = int(a.H), W = int(a.W);
    dispatch_float(x.scalar_type(), "mixing_dwconv", [&](auto tag) {
      using scalar_t = decltype(tag);
      constexpr int N = VN<scalar_t>;
      const scalar_t *xp = x.const_data_ptr<scalar_t>(), *np = xn.const_data_ptr<scalar_t>();
      scalar_t* yp = y.mutable_data_ptr<scalar_t>();
      const float *wp = a.w.const_data_ptr<float>(), *bp = a.bias.const_data_ptr<float>(),
                  *gp = a.gamma.const_data_ptr<float>();
      const bool vec = W % N == 0 && aligned16(xp) && aligned16(np) && aligned16(yp);
      const int64_t n = planes * H * (vec ? W / N : W);
      const int64_t blocks = std::min<int64_t>((n + THREADS - 1) / THREADS, int64_t(1) << 20);
      if (vec)
        mixing_dwconv_fwd_kernel<scalar_t, N><<<blocks, THREADS, 0, stream>>>(xp, np, wp, bp, gp, yp, planes, C, H, W);
      else
        mixing_dwconv_fwd_kernel<scalar_t, 1><<<blocks, THREADS, 0, stream>>>(xp, np, wp, bp, gp, yp, planes, C, H, W);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  }
  return in_layout(y, out_layout);
}

// (dxn, dweight, dbias, dgamma); see the file header.
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> mixing_dwconv_backward_cuda(
    const at::Tensor& grad, const at::Tensor& xn_in, const at::Tensor& weight, const at::Tensor& bias,
    const at::Tensor& gamma) {
  const c10::cuda::CUDAGuard guard(xn_in.device());
  const MixDwArgs a = mix_dw_args(xn_in, weight, bias, gamma, "mixing_dwconv_backward");
  const at::Tensor xn = a.d.t.contiguous();
  const at::Tensor g = like_x(grad, xn, Layout::NCHW, "mixing_dwconv_backward", "grad");
  at::Tensor dxn = at::empty_like(xn, at::MemoryFormat::Contiguous);
  at::Tensor per_c = at::zeros({a.C, 10}, xn.options().dtype(at::kDouble));  // S (9) and G per channel
  if (xn.numel() > 0) {
    TORCH_CHECK(a.H < INT32_MAX && a.W < INT32_MAX && a.C < INT32_MAX,
                "mixing_dwconv_backward: C, H and W must be below 2^31");
    const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
    const int64_t planes = a.B * a.C;
    const int C = int(a.C), H = int(a.H), W = int(a.W);
    dispatch_float(xn.scalar_type(), "mixing_dwconv_backward", [&](auto tag) {
      using scalar_t = decltype(tag);
      constexpr int N = VN<scalar_t>;
      const scalar_t *gp = g.const_data_ptr<scalar_t>(), *np = xn.const_data_ptr<scalar_t>();
      scalar_t* op = dxn.mutable_data_ptr<scalar_t>();
      const float *wp = a.w.const_data_ptr<float>(), *gmp = a.gamma.const_data_ptr<float>();
      const bool vec = W % N == 0 && aligned16(gp) && aligned16(np) && aligned16(op);
      const int64_t packs = int64_t(H) * (vec ? W / N : W);
      // Each thread walks about 4 packs of its plane; at most 64 chunks per plane.
      const int64_t chunks = std::max<int64_t>(1, std::min<int64_t>(64, (packs + 4 * THREADS - 1) / (4 * THREADS)));
      const dim3 grid(unsigned(chunks), unsigned(std::min<int64_t>(planes, 65535)));
      at::Tensor part = at::empty({a.B, a.C, chunks, 10}, xn.options().dtype(at::kFloat));
      float* pp = part.mutable_data_ptr<float>();
      if (vec)
        mixing_dwconv_bwd_kernel<scalar_t, N><<<grid, THREADS, 0, stream>>>(gp, np, wp, gmp, op, pp, planes, C, H, W);
      else
        mixing_dwconv_bwd_kernel<scalar_t, 1><<<grid, THREADS, 0, stream>>>(gp, np, wp, gmp, op, pp, planes, C, H, W);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
      per_c = part.sum(at::IntArrayRef{0, 2}, false, at::kDouble);  // (C, 10), fixed order
    });
  }
  // The parameter gradients from the per-channel sums, as the CPU kernel (float64, on the device).
  const at::Tensor Sm = per_c.narrow(1, 0, 9), Gm = per_c.select(1, 9);
  const at::Tensor w64 = a.w.to(at::kDouble), b64 = a.bias.to(at::kDouble), g64 = a.gamma.to(at::kDouble);
  const at::Tensor dgamma = ((w64 * Sm).sum() + (b64 * Gm).sum()).to(gamma.scalar_type());
  const at::Tensor dweight = (Sm * g64).reshape(weight.sizes()).to(weight.scalar_type());
  const at::Tensor dbias = (Gm * g64).reshape(bias.sizes()).to(bias.scalar_type());
  return {in_layout(dxn, a.d.layout), dweight, dbias, dgamma.reshape({}).to(gamma.device())};
}

}  // namespace
}  // namespace wf

TORCH_LIBRARY_IMPL(wuerstchen_fast_C, CUDA, m) {
  m.impl("norm_mod", &wf::norm_mod_cuda);
  m.impl("norm_mod_backward", &wf::norm_mod_backward_cuda);
  m.impl("mixing_dwconv", &wf::mixing_dwconv_cuda);
  m.impl("mixing_dwconv_backward", &wf::mixing_dwconv_backward_cuda);
}
