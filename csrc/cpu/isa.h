// The instruction set of the CPU kernels (csrc/cpu/*.cpp include this first).
//
// at::vec::Vectorized<float> is only SIMD when a translation unit is compiled for a CPU capability
// (PyTorch builds each of its kernels once per capability and picks one at run time). An extension
// compiled with the default flags gets the generic Vectorized, a loop over 8 scalars whose erf and
// exp call scalar libm. So on x86-64 the build (setup.py, CMakeLists.txt) compiles the C++ sources
// for AVX2 + FMA + F16C (x86-64-v3: Intel since 2013, AMD since 2015) with ATen's
// CPU_CAPABILITY_AVX2 vector code: its erf is a vector polynomial and exp is SLEEF's, what eager
// PyTorch itself runs on the same CPU. The CUDA sources' host code is not affected.
//
// Limits: such a build needs an AVX2 + FMA CPU. WUERSTCHEN_FAST_CPU_ISA=baseline at build time
// (CMake: -DWF_CPU_ISA=baseline) builds the generic code for older x86 CPUs; other architectures
// always build the baseline. build_info()["cpu_isa"] says which one was built.
#pragma once

#if defined(CPU_CAPABILITY_AVX2)
#if !defined(__AVX2__) || !defined(__FMA__)
#error "CPU_CAPABILITY_AVX2 needs -mavx2 -mfma (set by setup.py / CMakeLists.txt)"
#endif
#define WF_CPU_ISA "avx2"
#else
#define WF_CPU_ISA "baseline"
#endif
