"""Helpers the tests and benchmarks share: tolerances and Triton ahead-of-time compilation."""
