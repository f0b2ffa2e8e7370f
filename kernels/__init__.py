"""Device code of wuerstchen_fast. Installed as `wuerstchen_fast.kernels`.

triton/  Triton kernels, one file per op family (kernel, launcher, compile specs).
cuda/    CUDA C++ kernels compiled into wuerstchen_fast._C (not a Python package).
"""
