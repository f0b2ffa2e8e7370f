// 16-byte vector access of the CUDA kernels that move N values of T per thread (dwconv_ln.cu, mixing.cu):
// Pack<T, N> is aligned to its size, so one load or store is a single 8- or 16-byte transaction.
// Callers guarantee the alignment (the host code checks the pointers and the channel count).
#pragma once

namespace wf {

template <typename T, int N>
struct alignas(sizeof(T) * N) Pack {
  T v[N];
};

template <typename T, int N>
__device__ __forceinline__ Pack<T, N> load(const T* p) {
  return *reinterpret_cast<const Pack<T, N>*>(p);
}

// N float32 values rounded to T, stored at p in one transaction.
template <typename T, int N>
__device__ __forceinline__ void store(T* p, const float (&v)[N]) {
  Pack<T, N> o;
#pragma unroll
  for (int k = 0; k < N; ++k) o.v[k] = T(v[k]);
  *reinterpret_cast<Pack<T, N>*>(p) = o;
}

}  // namespace wf
