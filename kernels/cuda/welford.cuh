// Per-pixel statistics of the CUDA norm kernels (layer_norm_2d.cu, dwconv_ln.cu, mixing.cu's norm_mod),
// written once: Welford (count, mean, M2) of the normalized values and, for the backward, gs = Σg and
// ga = Σg·(v - mean), kept relative to the running mean (when the mean moves by δ, ga -= δ·gs). A plain
// float32 sum over C = 1280 channels is several times less accurate than torch's own LayerNorm; Welford
// per thread and Chan's merge across threads and lanes are not.
#pragma once

namespace wf {

struct Acc {
  float n, mean, m2, gs, ga;
};

// Chan's merge, branch-free: an empty side (n = 0, all sums 0) gives weight 0 to itself and leaves the
// other intact. FAST_DIV takes b's share n_b / n with __fdividef (2 ulp) instead of the IEEE division,
// whose slow path is a call whose saved registers ptxas reports as spills in the largest kernels.
template <bool BWD, bool FAST_DIV = false>
__device__ __forceinline__ Acc merge(const Acc& a, const Acc& b) {
  const float n = a.n + b.n;
  const float wb = n > 0.f ? (FAST_DIV ? __fdividef(b.n, n) : b.n / n) : 0.f;
  const float delta = b.mean - a.mean, mean = a.mean + delta * wb;
  Acc r{n, mean, a.m2 + b.m2 + delta * delta * a.n * wb, 0.f, 0.f};
  if constexpr (BWD) {
    r.ga = a.ga - (mean - a.mean) * a.gs + b.ga - (mean - b.mean) * b.gs;
    r.gs = a.gs + b.gs;
  }
  return r;
}

// The merge of a whole warp (butterfly shuffles; every lane ends with the total).
template <bool BWD, bool FAST_DIV = false>
__device__ __forceinline__ Acc warp_merge(Acc a) {
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) {
    const Acc o{__shfl_xor_sync(0xffffffffu, a.n, off), __shfl_xor_sync(0xffffffffu, a.mean, off),
                __shfl_xor_sync(0xffffffffu, a.m2, off), BWD ? __shfl_xor_sync(0xffffffffu, a.gs, off) : 0.f,
                BWD ? __shfl_xor_sync(0xffffffffu, a.ga, off) : 0.f};
    a = merge<BWD, FAST_DIV>(a, o);
  }
  return a;
}

// The statistics of N values held by one thread (one vector load), two-pass within the thread.
template <bool BWD, int N>
__device__ __forceinline__ Acc pack_acc(const float (&v)[N], const float (&g)[N]) {
  float m = 0.f;
#pragma unroll
  for (int k = 0; k < N; ++k) m += v[k];
  m *= 1.f / N;
  Acc a{float(N), m, 0.f, 0.f, 0.f};
#pragma unroll
  for (int k = 0; k < N; ++k) {
    const float d = v[k] - m;
    a.m2 = fmaf(d, d, a.m2);
    if constexpr (BWD) {
      a.gs += g[k];
      a.ga = fmaf(g[k], d, a.ga);
    }
  }
  return a;
}

}  // namespace wf
