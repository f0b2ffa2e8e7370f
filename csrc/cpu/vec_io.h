// Float32 vector loads/stores of float32, bfloat16 and float16 rows for the CPU kernels.
#pragma once
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>

#include <type_traits>

namespace wf {

using Vec = at::vec::Vectorized<float>;
constexpr int64_t VL = Vec::size();

// VL elements of p as float32.
template <typename T>
inline Vec ld(const T* p) {
  if constexpr (std::is_same_v<T, float>) {
    return Vec::loadu(p);
  } else if constexpr (at::vec::is_reduced_floating_point_v<T>) {
    Vec v;
    at::vec::load_to_float<T>(p, v);
    return v;
  } else {  // double (the dispatch macros instantiate it)
    float buf[VL];
    for (int64_t i = 0; i < VL; ++i) buf[i] = float(p[i]);
    return Vec::loadu(buf);
  }
}

// VL float32 values rounded to T at p.
template <typename T>
inline void st(T* p, const Vec& v) {
  if constexpr (std::is_same_v<T, float>) {
    v.store(p);
  } else {
    float buf[VL];
    v.store(buf);
    for (int64_t i = 0; i < VL; ++i) p[i] = T(buf[i]);
  }
}

// Sum of a vector's lanes, in double.
inline double hsum(const Vec& v) {
  float buf[VL];
  v.store(buf);
  double s = 0;
  for (int64_t i = 0; i < VL; ++i) s += buf[i];
  return s;
}

}  // namespace wf
